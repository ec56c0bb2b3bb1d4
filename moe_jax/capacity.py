"""Expert capacity and slot assignment: the one place where drop semantics are fixed.

Axes (see ``moe_jax.moe``): ``G`` groups, ``S`` tokens per group, ``E`` experts, ``K`` experts per token,
``C`` capacity (buffer slots per expert and group).

Capacity (DESIGN.md)::

    C = ceil(capacity_factor * K * S / E), rounded up to a multiple of ``capacity_multiple``,
        at least ``min_capacity``, at most ``S`` (an expert never receives more than S tokens of a group,
        so slots beyond S could never be filled).

Priority when an expert overflows (token choice), ``slot_order``:

* ``'choice_major'`` (GShard, Switch, Mesh-TF; the DESIGN.md default): all first choices of a group before
  any second choice, and within one choice earlier tokens first. For K = 1 this is causal. For K >= 2 it is
  *not* strictly causal: a later token's first choice can take the slot that an earlier token's second
  choice wanted, so the earlier token's output depends on the future whenever second choices are dropped.
* ``'token_major'``: token by token, each token's choices in rank order: ``(s=0, k=0), (s=0, k=1),
  (s=1, k=0), ...``. Whether an assignment of token ``s`` is kept depends only on tokens ``<= s``: strictly
  causal for any K. A causal MoE layer with K >= 2 and a finite capacity must use this order (or dropless);
  ``moe.MoEConfig.validate`` says so.
* a ``priority`` score (batch-prioritized routing, Riquelme et al. 2021): tokens with a higher score fill
  buffers first, choice-major among them. Non-causal.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp


def compute_capacity(
    group_size: int,
    num_experts: int,
    k: int,
    capacity_factor: float,
    capacity_multiple: int = 1,
    min_capacity: int = 1,
) -> int:
    """Slots per expert and group: ``ceil(cf * K * S / E)``, rounded and clipped (see module docstring).

    All arguments are static Python numbers; the result is a Python int.

    >>> compute_capacity(group_size=8, num_experts=4, k=2, capacity_factor=1.0)  # 1.0*2*8/4 = 4
    4
    >>> compute_capacity(8, 4, 1, 1.25)  # ceil(1.25*1*8/4) = ceil(2.5) = 3
    3
    >>> compute_capacity(8, 4, 1, 1.25, capacity_multiple=4)  # 3 -> 4
    4
    """
    if capacity_factor is None or not capacity_factor > 0:
        raise ValueError(
            f"capacity_factor must be > 0, got {capacity_factor!r}. Use e.g. 1.25, or choose "
            "dispatcher='dropless' for no capacity limit."
        )
    if capacity_multiple < 1:
        raise ValueError(f"capacity_multiple must be >= 1, got {capacity_multiple}.")
    if min_capacity < 1:
        raise ValueError(f"min_capacity must be >= 1, got {min_capacity}.")
    # Guard against float noise: 1.25 * 2 * 8 / 4 must be exactly 5, not 5.000000001 -> 6.
    raw = capacity_factor * k * group_size / num_experts
    cap = int(math.ceil(round(raw, 9)))
    cap = int(math.ceil(cap / capacity_multiple) * capacity_multiple)
    cap = max(cap, min_capacity)
    return int(min(cap, group_size))


SORT_FROM_EXPERTS = 32  # assign_slots(method='auto') sorts from this many experts on (docstring: measured)


def assign_slots(
    expert_index: jax.Array,
    valid: jax.Array,
    num_experts: int,
    priority: Optional[jax.Array] = None,
    slot_order: str = "choice_major",
    method: str = "auto",
) -> jax.Array:
    """Position of each token-expert assignment inside its expert's buffer.

    Args:
      expert_index: ``[G, S, K]`` int, the chosen expert of each token and choice rank.
      valid: ``[G, S, K]`` bool, False for assignments that do not exist (padding tokens, or unused ranks of
        dynamic-k routers). Invalid assignments take no slot.
      num_experts: ``E``.
      priority: optional ``[G, S]`` float score; if given, tokens with higher score fill buffers first
        (batch-prioritized routing). Without it, earlier tokens first.
      slot_order: ``'choice_major'`` or ``'token_major'`` (module docstring).
      method: how each assignment's rank among its expert's assignments is counted (same result):
        ``'cumsum'``, a running count over a one-hot ``[G, K*S, E]`` int32 (work and memory grow with E);
        ``'sort'``, a stable sort of the ``K*S`` expert ids per group, then each position minus the start of
        its run (independent of E); ``'auto'``: ``'sort'`` when ``E >= SORT_FROM_EXPERTS`` (32). On XLA:CPU
        (jax 0.10.2, one thread, G=8, K*S=1024) the cumsum took 0.60 / 1.83 / 4.17 / 18.32 ms at
        E = 8 / 32 / 64 / 256 and the sort 1.51 / 1.25 / 1.41 / 1.61 ms
        (experiments/probes/assign_slots_cumsum_vs_sort.py).

    Returns:
      ``[G, S, K]`` int32 slot index ``c``; an assignment is kept iff ``valid & (c < C)``. Invalid
      assignments get a large position (never kept).
    """
    if slot_order not in ("choice_major", "token_major"):
        raise ValueError(f"slot_order must be 'choice_major' or 'token_major', got {slot_order!r}.")
    if method == "auto":
        method = "sort" if num_experts >= SORT_FROM_EXPERTS else "cumsum"
    if method not in ("cumsum", "sort"):
        raise ValueError(f"assign_slots: method must be 'auto', 'cumsum' or 'sort', got {method!r}.")
    g, s, k = expert_index.shape
    key = jnp.where(valid, expert_index, num_experts).astype(jnp.int32)  # [G, S, K]; invalid: E (no expert)
    if priority is not None:
        order = jnp.argsort(-priority, axis=1, stable=True)  # [G, S] token ids, best first
        key = jnp.take_along_axis(key, order[:, :, None], axis=1)
    if slot_order == "token_major":
        ranked = key.reshape(g, s * k)  # [G, S*K] expert ids in priority order
    else:
        ranked = jnp.transpose(key, (0, 2, 1)).reshape(g, k * s)  # [G, K*S]
    position = _rank_in_expert(ranked, num_experts, method)  # [G, K*S]: earlier assignments to the same expert
    if slot_order == "token_major":
        position = position.reshape(g, s, k)  # [G, S, K]
    else:
        position = position.reshape(g, k, s).transpose(0, 2, 1)  # [G, S, K]
    if priority is not None:
        inverse = jnp.argsort(order, axis=1)  # [G, S]
        position = jnp.take_along_axis(position, inverse[:, :, None], axis=1)
    big = jnp.iinfo(jnp.int32).max // 2
    return jnp.where(valid, position, big).astype(jnp.int32)


def _rank_in_expert(ranked: jax.Array, num_experts: int, method: str) -> jax.Array:
    """``ranked [G, M]`` expert ids (``num_experts`` = none) -> ``[G, M]``: how many earlier entries of the
    same row hold the same id (any value where the id is ``num_experts``)."""
    if method == "cumsum":
        onehot = jax.nn.one_hot(ranked, num_experts, dtype=jnp.int32)  # [G, M, E]; id E: a zero row
        return jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)
    g, m = ranked.shape
    order = jnp.argsort(ranked, axis=1, stable=True)  # [G, M]: same ids together, earlier entries first
    ids = jnp.take_along_axis(ranked, order, axis=1)
    idx = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (g, m))
    run_start = jnp.concatenate([jnp.ones((g, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    rank = idx - jax.lax.cummax(jnp.where(run_start, idx, 0), axis=1)  # position minus the start of its run
    return jnp.zeros((g, m), jnp.int32).at[jnp.arange(g)[:, None], order].set(rank, unique_indices=True)
