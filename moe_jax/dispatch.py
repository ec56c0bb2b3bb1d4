"""Moving tokens to experts and back. One interface, three implementations, one loop reference.

Axes (see ``moe_jax.moe``): ``G`` groups, ``S`` tokens per group, ``D`` width, ``E`` experts, ``K`` choices,
``C`` capacity, ``T = G*S`` tokens, ``N = T*K`` assignments, ``NB`` blocks of ``b`` rows.

Every dispatcher is a pure function pair ``dispatch(x, plan) -> expert input`` and ``combine(y, plan) ->
[G, S, D]``, with a ``plan`` made once from the ``RoutingDecision`` (slot positions; these are integers and
carry no gradient). ``run(x, decision, experts, capacity)`` chains the three. They agree exactly wherever
their semantics agree (same capacity, same slot order); the tests hold each against ``loop_reference``.

1. ``einsum`` (GShard, Switch, Mesh-TF): one-hot masks ``dispatch[G, S, E, C]`` and ``combine[G, S, E, C]``,
   ``x_e = einsum('gsec,gsd->egcd')``. Simple and MXU/TensorCore friendly, but the two einsums cost
   ``2 * T * E * C * D = 2 * cf * K * T * S * D`` multiply-adds: linear in the *group size* S (C grows with
   S/E; E cancels), so its overhead over the expert FFN (``4 * K * T * D * F``) is about ``cf * S / (2 F)``.
   Keep ``S`` well below ``F``. The backward runs two more (d x, d ye); the routing weights' gradient is
   gathered, not a fifth einsum (``einsum_combine_weighted``).
2. ``scatter`` (capacity buffer): compute each kept assignment's flat buffer row ``e*G*C + g*C + c``; gather the
   tokens into ``[E, G*C, D]`` and gather the results back, weighted. No ``[G, S, E, C]`` tensor; the data
   movement is ``O(E*G*C*D + N*D)``, independent of S. Dropped assignments point at an all-zero row.
   An expert's kept rows are packed first (group after group), so with ``filled_only`` (``MoEConfig.
   capacity_compute='filled'``, the CPU default) each expert runs only on its filled rows
   (``BatchedExperts(x, rows_used)``) instead of all ``G*C``: about ``1/cf`` of the expert FLOPs.
3. ``dropless`` (no capacity, static shapes): sort the N assignments by expert; pad each expert's run of rows
   to a multiple of the block size ``b``; the padded rows fit in the static bound
   ``R = b * ceil((N + E*(b-1)) / b)`` rows, i.e. ``NB = R / b`` blocks, each owned by one expert. The
   experts then run as a batched matmul over blocks with per-block gathered weights
   (``BatchedExperts.blocks``). Cost: useful work plus at most ``E*(b-1)`` padding rows (we pick ``b`` so that
   this is <= 25% of N and in practice about half of that), plus gathering ``NB`` copies of the expert weights
   (``NB*D*F`` values; small next to ``b*D*F`` multiply-adds per block; its backward is a scatter-add of
   ``[NB, D, F]`` into ``[E, D, F]``, which is what makes this layout slow on CPU at large E).
   Without padding, on rows sorted by expert (``ragged_dot_experts``): ``dropless_impl='grouped'``
   (``experts.sorted_rows_ffn``: a loop over experts, each one FFN per chunk of its rows, forward and
   backward; the CPU default) or ``'ragged_dot'`` (``jax.lax.ragged_dot``: on CPU a masked dense product
   costing E times the useful work; on GPU with jax 0.11 its weight gradient is also dense-masked) or
   ``'gmm'`` (``gmm.grouped_matmul``: ragged GEMM kernels forward and backward, Pallas Mosaic GPU
   kernels; Hopper, bfloat16: the GPU default there). ``dropless_impl='auto'`` picks per backend and dtype
   (``default_dropless_impl``).
4. All gathers of token rows use ``take_rows``, whose backward is a gather as well (no scatter-add). The
   token-choice combines sum each token's K weighted rows with ``weighted_sum_k``, whose backward gets the
   routing weights' gradient as one batched dot. Measured costs and the choice of defaults: docs/perf.md.

Token-choice and expert-choice decisions are both supported by ``einsum`` and ``scatter``; ``dropless`` is
token choice only (expert choice never overflows by construction). Soft MoE decisions (``kind='soft'``, dense
``[G, S, E, C]`` dispatch and combine weights) run on ``einsum`` (``run_soft``); ``scatter`` delegates to it and
``dropless`` refuses them.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import gmm as gmm_lib
from moe_jax.capacity import assign_slots
from moe_jax.routing import RoutingDecision

Array = jax.Array


class CapacityPlan(NamedTuple):
    """Slot assignment for the capacity dispatchers.

    Token choice: ``expert [G,S,K]``, ``slot [G,S,K]``, ``kept [G,S,K]``, ``weight [G,S,K]`` (0 where dropped),
    ``group_counts [G,E]`` (kept assignments of each group to each expert).
    Expert choice: ``token [G,E,C]``, ``kept [G,E,C]``, ``weight [G,E,C]``.
    """

    kind: str
    capacity: int
    num_experts: int
    kept: Array
    weight: Array
    expert: Optional[Array] = None
    slot: Optional[Array] = None
    token: Optional[Array] = None
    group_counts: Optional[Array] = None


def make_capacity_plan(decision: RoutingDecision, capacity: int, slot_order: str = "choice_major") -> CapacityPlan:
    """Decide which assignments fit (``capacity.assign_slots``) and zero the weights of the others."""
    e = decision.num_experts
    if decision.kind == "expert_choice":
        kept = decision.valid
        return CapacityPlan("expert_choice", capacity, e, kept, jnp.where(kept, decision.combine_weights, 0.0),
                            token=decision.token_index)
    slot = assign_slots(decision.expert_index, decision.valid, e, decision.priority, slot_order)
    kept = decision.valid & (slot < capacity)
    weight = jnp.where(kept, decision.combine_weights, 0.0)
    onehot = jax.nn.one_hot(decision.expert_index, e, dtype=jnp.int32)  # [G, S, K, E]
    group_counts = jnp.sum(onehot * kept[..., None].astype(jnp.int32), axis=(1, 2))  # [G, E]
    return CapacityPlan("token_choice", capacity, e, kept, weight, expert=decision.expert_index, slot=slot,
                        group_counts=group_counts)


# ------------------------------------------------------------------------------------ row gathers (perf)


@jax.custom_vjp
def take_rows(x: Array, idx: Array, inverse: Array) -> Array:
    """``out[i] = x[idx[i]]``, a zero row where ``idx[i] == len(x)``: ``x[A, ...]``, ``idx[B]`` -> ``[B, ...]``.

    ``inverse [A, M]`` must list, for every source row ``j``, all ``i`` with ``idx[i] == j`` (padded with ``B``).
    It makes the backward pass a gather too, ``dx[j] = sum_m dout[inverse[j, m]]``: autodiff of a plain
    gather would emit a scatter-add into ``[A, ...]``, which XLA runs as a serial loop on CPU and with atomics
    on GPU. Dispatch gathers token rows into a buffer (``M = K``: a token's K assignments); combine gathers
    buffer rows back (``M = 1``: a row holds one assignment).
    """
    return _gather_rows(x, idx)


def _gather_rows(x: Array, idx: Array) -> Array:
    x_pad = jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)], axis=0)
    return x_pad.at[idx].get(mode="promise_in_bounds")


def _take_rows_fwd(x, idx, inverse):
    return _gather_rows(x, idx), (idx, inverse)


def _take_rows_bwd(res, g):
    idx, inverse = res
    dx = jnp.sum(_gather_rows(g, inverse.reshape(-1)).reshape(inverse.shape + g.shape[1:]), axis=1)
    return dx, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


@jax.custom_vjp
def weighted_sum_k(y: Array, weight: Array) -> Array:
    """``sum_k weight[..., k] * y[..., k, :]``: ``y[..., K, D]``, ``weight[..., K]`` (y's dtype) -> ``[..., D]``.

    The combine of token choice: each token's K expert outputs, weighted by its routing weights. The forward
    is the plain weighted sum; the backward gets the weights' gradient ``d weight[..., k] = <dy, y[..., k, :]>``
    as one batched dot (an einsum over D, accumulated in float32) instead of autodiff's multiply-and-reduce,
    which XLA:CPU hands to YNNPACK as a reduction: forward + backward at ``[8, 1024, K, 512]`` took 8.7 against
    18.3 ms at K=1 and 14.0 against 17.5 ms at K=2, and the layer 0.980-0.996 of its time (docs/perf.md,
    "What the library does for speed on CPU"). Same values up to summation order; the weights' gradient
    accumulates in float32."""
    return jnp.sum(y * weight[..., None], axis=-2)


def _weighted_sum_k_fwd(y, weight):
    return weighted_sum_k(y, weight), (y, weight)


def _weighted_sum_k_bwd(res, dy):
    y, weight = res
    dy = dy.astype(y.dtype)
    dweight = jnp.einsum("...kd,...d->...k", y, dy, preferred_element_type=jnp.float32).astype(weight.dtype)
    return _sum_extra_axes(dy[..., None, :] * weight[..., None], y), _sum_extra_axes(dweight, weight)


def _sum_extra_axes(ct, primal):
    """A custom VJP's cotangent summed over the ``shard_map`` mesh axes along which it varies and its primal
    does not, as autodiff's transpose of the implicit broadcast between them does (``weighted_sum_k`` inside
    the expert-parallel combine: the rows vary along more axes than the weights). Outside ``shard_map``,
    nothing varies and ``ct`` is returned as it is. (A cotangent never varies along fewer axes than its primal
    here: ``dy`` varies along the axes of both inputs.)"""
    extra = _varying_axes(ct) - _varying_axes(primal)
    return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _varying_axes(x) -> set:
    """The ``shard_map`` mesh axes along which ``x`` varies (empty outside ``shard_map``)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax 0.10
    return set(manual.varying) if manual is not None else set(getattr(aval, "vma", ()))


weighted_sum_k.defvjp(_weighted_sum_k_fwd, _weighted_sum_k_bwd)


def _inverse_rows(rows: Array, num_rows: int) -> Array:
    """``rows[N]`` (distinct targets, or ``num_rows`` = nowhere) -> ``[num_rows]``: the ``n`` that landed on
    each row, ``N`` where none did."""
    n = rows.shape[0]
    return jnp.full((num_rows,), n, jnp.int32).at[rows].set(jnp.arange(n, dtype=jnp.int32), mode="drop")


# ------------------------------------------------------------------------------------------------ einsum


def _einsum_support(plan: CapacityPlan, group_size: int, dtype) -> tuple:
    """The one-hot factors of the masks (no gradient): ``(oe [G,S,K,E], oc [G,S,K,C])`` for token choice,
    ``(onehot [G,E,C,S],)`` for expert choice."""
    c, e = plan.capacity, plan.num_experts
    if plan.kind == "expert_choice":
        return (jax.nn.one_hot(plan.token, group_size, dtype=dtype) * plan.kept[..., None].astype(dtype),)
    oe = jax.nn.one_hot(plan.expert, e, dtype=dtype)  # [G, S, K, E]
    oc = jax.nn.one_hot(jnp.where(plan.kept, plan.slot, c), c, dtype=dtype)  # [G, S, K, C]; dropped -> 0 row
    return oe, oc


def _einsum_mask(support: tuple, weight: Optional[Array], dtype) -> Array:
    """``[G, S, E, C]``: the dispatch mask (``weight=None``) or the combine mask from ``_einsum_support``."""
    if len(support) == 1:  # expert choice
        w = support[0] if weight is None else support[0] * weight[..., None].astype(dtype)
        return jnp.transpose(w, (0, 3, 1, 2))
    oe, oc = support
    if weight is None:
        return jnp.einsum("gske,gskc->gsec", oe, oc)
    return jnp.einsum("gske,gskc,gsk->gsec", oe, oc, weight.astype(dtype))


def einsum_masks(plan: CapacityPlan, group_size: int, dtype) -> tuple:
    """``(dispatch, combine)``, both ``[G, S, E, C]`` in ``dtype``."""
    support = _einsum_support(plan, group_size, dtype)
    return _einsum_mask(support, None, dtype), _einsum_mask(support, plan.weight, dtype)


def einsum_group_size(seq_len: int, num_experts: int, k: int, hidden: int) -> int:
    """The group size S that ``MoEConfig.group_size='auto'`` gives the einsum dispatcher.

    The largest divisor of ``seq_len`` not above ``max(hidden // 4, 4 * ceil(E / K))``. Why: forward and
    backward run four ``[G,S,E,C]`` einsums (dispatch, combine, and their transposes for d x and d ye; the
    routing weights' gradient is a gather, ``einsum_combine_weighted``) against three FFN products, so the
    overhead over the experts is about ``(4/3) * cf * S / (2F)``; ``S <= F/4`` keeps it near ``0.17 * cf``
    (0.21 at cf = 1.25) for any E and K.
    The floor ``4 * E / K`` keeps at least 4 expected assignments per expert and group: smaller groups make
    the capacity ``C = ceil(cf*K*S/E)`` too coarse and drop more. Capacity stays per group (DESIGN.md), so
    with 'auto' the einsum drops exactly what 'scatter' drops with ``group_size`` set to the same S.
    """
    limit = max(hidden // 4, 4 * -(-num_experts // k), 1)
    return max(s for s in range(1, min(seq_len, limit) + 1) if seq_len % s == 0)


# Both products are written as ``dot_general`` with the mask as the left operand, so that the product's natural
# output is ``[G, E*C, D]`` (D minor) and the change to the experts' ``[E, G*C, D]`` is a transpose of whole
# D-rows. ``jnp.einsum('gsec,gsd->egcd')`` let XLA:CPU emit ``[G, D, E*C]`` and then transpose D into the minor
# position, element by element: about 12 ms per transpose at E=64, T=8192, D=512, three of them per step
# (docs/perf.md, "What the library does for speed on CPU").


def einsum_dispatch(x: Array, dispatch_mask: Array) -> Array:
    """``x[G, S, D]``, mask ``[G, S, E, C]`` -> ``[E, G*C, D]``."""
    g, s, e, c = dispatch_mask.shape
    d = x.shape[-1]
    xg = jax.lax.dot_general(dispatch_mask.reshape(g, s, e * c), x, (((1,), (1,)), ((0,), (0,))))  # [G, E*C, D]
    return jnp.transpose(xg.reshape(g, e, c, d), (1, 0, 2, 3)).reshape(e, g * c, d)


def einsum_combine(ye: Array, combine_mask: Array) -> Array:
    """``ye[E, G*C, D]``, combine ``[G, S, E, C]`` -> ``[G, S, D]``."""
    g, s, e, c = combine_mask.shape
    d = ye.shape[-1]
    yg = jnp.transpose(ye.reshape(e, g, c, d), (1, 0, 2, 3)).reshape(g, e * c, d)
    return jax.lax.dot_general(combine_mask.reshape(g, s, e * c), yg, (((2,), (1,)), ((0,), (0,))))  # [G, S, D]


def _einsum_rows(plan: CapacityPlan, num_groups: int, group_size: int) -> tuple:
    """``(token_row, buffer_row)`` of every assignment (shape of ``plan.kept``) in the einsum layout: token
    ``g*S + s``, buffer row ``e*G*C + g*C + c`` of ``ye[E, G*C, D]``, ``E*G*C`` (a zero row) where not kept.
    Token choice: ``token_row`` is None (assignment ``[g, s, k]`` belongs to token ``g*S + s``)."""
    if plan.kind == "expert_choice":  # the scatter buffer's rows are the einsum's
        return _token_ids(plan, num_groups, group_size), _buffer_rows(plan, num_groups)
    c, e = plan.capacity, plan.num_experts
    rows = plan.expert * (num_groups * c) + jnp.arange(num_groups)[:, None, None] * c + plan.slot
    return None, jnp.where(plan.kept, rows, e * num_groups * c)


@jax.custom_vjp
def einsum_combine_weighted(ye: Array, weight: Array, support: tuple, token_row: Array, buffer_row: Array) -> Array:
    """``einsum_combine(ye, combine_mask)`` with the combine mask built from the routing weights, and a
    backward that gets the weights' gradient without a ``[G, S, E, C]`` einsum.

    Autodiff of the plain combine computes ``d combine[g,s,e,c] = <dy[g,s], ye[e,g,c]>`` for all ``G*S*E*C``
    entries (an einsum as large as the combine itself, which would be the dispatcher's fifth ``[G,S,E,C]``
    einsum) and then reads back only the ``K`` entries per token that the one-hot masks select. Here the
    backward gathers exactly those: ``d weight = <dy[token], ye[buffer_row]>`` (0 where not kept), ``M*D``
    multiply-adds for the ``M`` assignments. ``d ye`` is the transposed einsum, as before; ``support``,
    ``token_row`` and ``buffer_row`` (``_einsum_support``, ``_einsum_rows``) carry no gradient.
    """
    return _combine_weighted_fwd(ye, weight, support, token_row, buffer_row)[0]


def _combine_weighted_fwd(ye, weight, support, token_row, buffer_row):
    # the mask is rebuilt in the backward from its one-hot factors (``K * (E + C)`` per token, not ``E * C``)
    return einsum_combine(ye, _einsum_mask(support, weight, ye.dtype)), (ye, weight, support, token_row, buffer_row)


def _combine_weighted_bwd(res, dy):
    ye, weight, support, token_row, buffer_row = res
    mask = _einsum_mask(support, weight, ye.dtype)
    e, gc, d = ye.shape
    dye = einsum_dispatch(dy.astype(mask.dtype), mask).astype(ye.dtype)  # the combine's transpose: [E, G*C, D]
    rows = _gather_rows(ye.reshape(e * gc, d), buffer_row.reshape(-1))  # [M, D]; 0 where dropped
    if token_row is None:  # token choice: weight [G, S, K], assignment (g, s, k) -> token (g, s)
        dweight = jnp.einsum("gskd,gsd->gsk", rows.reshape(weight.shape + (d,)), dy,
                             preferred_element_type=jnp.float32)
    else:
        dweight = jnp.einsum("md,md->m", rows, dy.reshape(-1, d)[token_row.reshape(-1)],
                             preferred_element_type=jnp.float32).reshape(weight.shape)
    dweight = dweight.astype(weight.dtype)
    return dye, dweight, None, None, None


einsum_combine_weighted.defvjp(_combine_weighted_fwd, _combine_weighted_bwd)


# ----------------------------------------------------------------------------------------------- scatter


def _buffer_rows(plan: CapacityPlan, num_groups: int) -> Array:
    """Flat row ``e*G*C + g*C + c`` of each kept assignment; ``E*G*C`` (one past the end) if dropped."""
    c, e = plan.capacity, plan.num_experts
    end = e * num_groups * c
    if plan.kind == "expert_choice":
        g_idx = jnp.arange(num_groups)[:, None, None]
        rows = jnp.arange(e)[None, :, None] * (num_groups * c) + g_idx * c + jnp.arange(c)[None, None, :]
        return jnp.where(plan.kept, rows, end)  # [G, E, C]
    # Token choice: an expert's rows are its kept assignments packed group after group (group g starts after
    # the kept rows of groups < g), so expert e's filled rows are exactly [0, n_e) of its G*C
    # (``_rows_used``): the experts can skip the empty tail. Row e*G*C + g*C + c would do as well.
    offset = jnp.cumsum(plan.group_counts, axis=0) - plan.group_counts  # [G, E] kept rows of earlier groups
    start = jnp.take_along_axis(offset, plan.expert.reshape(num_groups, -1), axis=1).reshape(plan.expert.shape)
    rows = plan.expert * (num_groups * c) + start + plan.slot
    return jnp.where(plan.kept, rows, end)  # [G, S, K]


def _rows_used(plan: CapacityPlan) -> Array:
    """``[E]``: filled rows of each expert's ``G*C`` buffer rows (token choice; they come first)."""
    return jnp.sum(plan.group_counts, axis=0)


def _token_ids(plan: CapacityPlan, num_groups: int, group_size: int) -> Array:
    """Flat token id ``g*S + s`` of each assignment (shape of ``plan.kept``)."""
    g_idx = jnp.arange(num_groups)[:, None, None] * group_size
    if plan.kind == "expert_choice":
        return g_idx + plan.token
    s_idx = jnp.arange(group_size)[None, :, None]
    return jnp.broadcast_to(g_idx + s_idx, plan.kept.shape)


def scatter_dispatch(x: Array, plan: CapacityPlan) -> Array:
    """``x[G, S, D]`` -> ``[E, G*C, D]``: an inverse map (buffer row -> token) then one gather."""
    g, s, d = x.shape
    c, e = plan.capacity, plan.num_experts
    if plan.kind == "token_choice":
        k = plan.kept.shape[-1]
        rows = _buffer_rows(plan, g).reshape(g * s, k)  # [T, K]; E*G*C where dropped
        row_assignment = _inverse_rows(rows.reshape(-1), e * g * c)  # [E*G*C]; T*K for an empty slot
        # an empty slot reads the zero row T; the backward gathers each token's K rows (take_rows)
        return take_rows(x.reshape(g * s, d), row_assignment // k, rows).reshape(e, g * c, d)
    rows = _buffer_rows(plan, g).reshape(-1)
    tokens = _token_ids(plan, g, s).reshape(-1)
    # Each kept row is written once; dropped ones (row == E*G*C) fall off the end (mode='drop').
    row_token = jnp.full((e * g * c,), g * s, jnp.int32).at[rows].set(tokens, mode="drop")
    x_pad = jnp.concatenate([x.reshape(g * s, d), jnp.zeros((1, d), x.dtype)], axis=0)  # [T+1, D]
    return x_pad[row_token].reshape(e, g * c, d)


def scatter_combine(ye: Array, plan: CapacityPlan, group_size: int) -> Array:
    """``ye[E, G*C, D]`` -> ``[G, S, D]``: gather each assignment's row, weight, sum over choices."""
    e, gc, d = ye.shape
    g = gc // plan.capacity
    rows = _buffer_rows(plan, g)
    if plan.kind == "token_choice":
        k = rows.shape[-1]
        inverse = _inverse_rows(rows.reshape(-1), e * gc)[:, None]  # [E*G*C, 1] assignment of each row
        gathered = take_rows(ye.reshape(e * gc, d), rows.reshape(-1), inverse).reshape(g, group_size, k, d)
        return weighted_sum_k(gathered, plan.weight.astype(ye.dtype))  # [G, S, D]
    y_pad = jnp.concatenate([ye.reshape(e * gc, d), jnp.zeros((1, d), ye.dtype)], axis=0)
    gathered = y_pad[rows]  # [G, S, K, D] or [G, E, C, D]
    weighted = gathered * plan.weight[..., None].astype(ye.dtype)
    if plan.kind == "expert_choice":
        tokens = _token_ids(plan, g, group_size).reshape(-1)
        out = jnp.zeros((g * group_size, d), ye.dtype).at[tokens].add(weighted.reshape(-1, d))
        return out.reshape(g, group_size, d)
    return jnp.sum(weighted, axis=2)


# ---------------------------------------------------------------------------------------------- dropless


class DroplessPlan(NamedTuple):
    """Sorted, block-padded layout. ``row_of_assignment [G,S,K]`` (R if the assignment is invalid),
    ``row_token [R]`` (T for padding rows), ``block_expert [NB]``, ``weight [G,S,K]``, ``group_sizes [E]``."""

    block_size: int
    num_blocks: int
    row_of_assignment: Array
    row_token: Array
    block_expert: Array
    weight: Array
    kept: Array
    group_sizes: Array


def default_block_size(num_assignments: int, num_experts: int) -> int:
    """Largest power of two ``b`` in [8, 512] with ``E * b <= N / 4`` (padding at most 25% of the rows)."""
    b = 8
    while b * 2 <= 512 and num_experts * (b * 2) * 4 <= num_assignments:
        b *= 2
    return b


def sorted_counts(sorted_key: Array, num_experts: int) -> Array:
    """``sorted_key [N]`` (expert ids in ascending order; ``num_experts`` = invalid, sorted last) -> ``[E]``
    int32 rows per expert, from E + 1 binary searches. ``jnp.bincount`` gives the same counts with a
    scatter-add of N ones into E + 1 counters; on an H200 the dropless layer at N = 131072, E = 8 spent 0.87 ms
    in a scatter fusion that the E = 64 run did not show, most likely that one (docs/perf.md, "GPU: what is
    known"; not re-measured since). On CPU the two cost the same."""
    bounds = jnp.searchsorted(sorted_key, jnp.arange(num_experts + 1, dtype=sorted_key.dtype), side="left")
    return (bounds[1:] - bounds[:-1]).astype(jnp.int32)


def make_dropless_plan(decision: RoutingDecision, block_size: Optional[int] = None) -> DroplessPlan:
    if decision.kind != "token_choice":
        raise ValueError("dispatcher='dropless' supports token-choice routers only; expert choice has a fixed "
                         "capacity by construction. Use dispatcher='scatter' or 'einsum'.")
    g, s, k = decision.expert_index.shape
    e = decision.num_experts
    n = g * s * k
    b = block_size or default_block_size(n, e)
    num_blocks = -(-(n + e * (b - 1)) // b)
    r = num_blocks * b
    expert = decision.expert_index.reshape(n)
    valid = decision.valid.reshape(n)
    key = jnp.where(valid, expert, e)  # invalid assignments sort last
    order = jnp.argsort(key, stable=True)  # [N]
    sorted_key = key[order]
    counts = sorted_counts(sorted_key, e)  # [E] valid assignments per expert
    padded = (counts + b - 1) // b * b  # [E]
    padded_start = jnp.cumsum(padded) - padded  # [E]
    start = jnp.cumsum(counts) - counts  # [E] unpadded start in the sorted order
    pos = jnp.arange(n)
    safe_key = jnp.minimum(sorted_key, e - 1)
    row_sorted = jnp.where(sorted_key < e, padded_start[safe_key] + pos - start[safe_key], r)  # [N]
    row_of_assignment = jnp.zeros((n,), jnp.int32).at[order].set(row_sorted.astype(jnp.int32))
    token = jnp.arange(n) // k  # flat token id g*S + s of each assignment
    row_token = jnp.full((r,), g * s, jnp.int32).at[row_of_assignment].set(token, mode="drop")
    block_start = jnp.arange(num_blocks) * b
    block_expert = jnp.searchsorted(jnp.cumsum(padded), block_start, side="right")
    block_expert = jnp.minimum(block_expert, e - 1).astype(jnp.int32)
    weight = jnp.where(decision.valid, decision.combine_weights, 0.0)
    return DroplessPlan(b, num_blocks, row_of_assignment.reshape(g, s, k), row_token, block_expert, weight,
                        decision.valid, counts)


def dropless_dispatch(x: Array, plan: DroplessPlan) -> Array:
    """``x[G, S, D]`` -> ``[NB, b, D]`` rows sorted by expert, each expert's run padded to whole blocks."""
    g, s, d = x.shape
    x_pad = jnp.concatenate([x.reshape(g * s, d), jnp.zeros((1, d), x.dtype)], axis=0)
    return x_pad[plan.row_token].reshape(plan.num_blocks, plan.block_size, d)


def dropless_combine(yb: Array, plan: DroplessPlan) -> Array:
    """``yb[NB, b, D]`` -> ``[G, S, D]``."""
    d = yb.shape[-1]
    y_pad = jnp.concatenate([yb.reshape(-1, d), jnp.zeros((1, d), yb.dtype)], axis=0)
    gathered = y_pad[plan.row_of_assignment]  # [G, S, K, D]
    return weighted_sum_k(gathered, plan.weight.astype(yb.dtype))


SORTED_IMPLS = ("ragged_dot", "grouped", "gmm")


def default_dropless_impl(backend: Optional[str] = None, sharded: bool = False, dtype=None) -> str:
    """What ``MoEConfig.dropless_impl='auto'`` resolves to (the fastest measured there, see docs/perf.md):

    * CPU: ``'grouped'`` (``experts.sorted_rows_ffn``, a loop of per-expert GEMMs on rows sorted by expert);
    * GPU, bfloat16/float16 experts, a Hopper GPU with Pallas Mosaic GPU: ``'gmm'``
      (``gmm.grouped_matmul``; on an H200, jax 0.11.2, T=8192, K=2, fwd+bwd: 0.8 vs 1.2 ms for ``'blocks'``
      at E=8, 1.3 vs 2.4 ms at E=64);
    * other GPUs and dtypes: ``'blocks'`` (it beat ``'ragged_dot'`` on an H100, whose transpose, the
      weight gradient, lowers to a dense masked ``[E, N, F]`` product with jax 0.11).

    Under a device mesh (``sharded``) it is ``'blocks'``: the expert-parallel path runs ``'blocks'`` or
    ``'ragged_dot'`` (``grouped``'s loop carries are rejected by shard_map's varying-axis types)."""
    backend = backend or jax.default_backend()
    if sharded:
        return "blocks"
    if backend == "cpu":
        return "grouped"
    half = dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if half and backend == jax.default_backend() and gmm_lib.mosaic_unavailable_reason() is None:
        return "gmm"
    return "blocks"


def ragged_dot_experts(x: Array, decision: RoutingDecision, params: Dict[str, Array], activation: str,
                       dtype, impl: str = "ragged_dot") -> Array:
    """Dropless on rows sorted by expert, no padding: ``x[G, S, D]`` -> ``[G, S, D]``.

    ``params`` are the stacked expert weights ``wi/wg [E, D, F]``, ``wo [E, F, D]``. ``impl``:
    ``'ragged_dot'`` uses ``jax.lax.ragged_dot`` (correct everywhere; with jax 0.10/0.11 its weight gradient
    is a dense masked product, E times the work), ``'grouped'`` uses ``experts.sorted_rows_ffn`` (CPU),
    ``'gmm'`` uses ``gmm.grouped_matmul`` (Pallas Mosaic GPU kernels, Hopper only, with a VJP of ragged
    GEMMs). The sort and its inverse are ``take_rows`` gathers, so the backward pass has no scatter-add
    either.
    """
    from moe_jax.experts import get_activation, sorted_rows_chunk, sorted_rows_ffn

    if impl not in SORTED_IMPLS:
        raise ValueError(f"MoEConfig.dropless_impl: unknown {impl!r}; choose one of {SORTED_IMPLS}.")
    g, s, k = decision.expert_index.shape
    d = x.shape[-1]
    e = decision.num_experts
    n = g * s * k
    t = g * s
    key = jnp.where(decision.valid, decision.expert_index, e).reshape(n)  # invalid assignments sort last
    order = jnp.argsort(key, stable=True).astype(jnp.int32)  # [N] sorted row -> assignment
    sorted_key = key[order]
    counts = sorted_counts(sorted_key, e)  # [E]
    row_valid = sorted_key < e  # [N]
    row_of_assignment = _inverse_rows(jnp.where(row_valid, order, n), n)  # [N]; N if invalid
    row_token = jnp.where(row_valid, order // k, t)  # [N]; T (the zero row) past the valid rows
    xs = take_rows(x.reshape(t, d), row_token, row_of_assignment.reshape(t, k)).astype(dtype)  # [N, D] sorted
    if impl == "grouped":
        cast = {name: w.astype(dtype) for name, w in params.items()}
        ys = sorted_rows_ffn(xs, counts, cast, activation, sorted_rows_chunk(n, e))  # [N, D]
    else:
        if impl == "gmm":  # the Mosaic kernels leave rows outside the groups unwritten: cover them all
            backend = gmm_lib.resolve_backend()
            full = gmm_lib.cover_all_rows(counts, n)  # the zero rows of dropped assignments join expert E-1
            matmul = lambda a, w: gmm_lib.grouped_matmul(a, w.astype(dtype), full, backend)
        else:
            matmul = lambda a, w: jax.lax.ragged_dot(a, w.astype(dtype), counts)
        act = get_activation(activation)
        h = matmul(xs, params["wi"])
        h = act(matmul(xs, params["wg"])) * h if "wg" in params else act(h)
        ys = matmul(h, params["wo"])  # [N, D]
    ys = jnp.where(row_valid[:, None], ys, 0)
    inverse = jnp.where(row_valid, order, n)[:, None]  # [N, 1] assignment held by each sorted row
    y = take_rows(ys, row_of_assignment, inverse).reshape(g, s, k, d)  # [G, S, K, D]
    w = jnp.where(decision.valid, decision.combine_weights, 0.0).astype(ys.dtype)
    return weighted_sum_k(y, w)


# ------------------------------------------------------------------------------------------ run / registry


class DispatchResult(NamedTuple):
    y: Array  # [G, S, D]
    kept: Array  # [G, S, K] or [G, E, C] bool: the assignment reached its expert
    capacity: Optional[int]  # C, or None for dropless


def run_soft(x, decision, experts, *_, **__) -> DispatchResult:
    """Soft MoE (``kind='soft'``): the decision's dense ``dispatch_weights``/``combine_weights [G, S, E, C]``
    are the einsum masks themselves (C = slots per expert, from the decision). ``kept``: ``[G, E, C]``, all
    True (no slot is ever empty or dropped)."""
    g, _, e, c = decision.dispatch_weights.shape
    ye = experts(einsum_dispatch(x, decision.dispatch_weights.astype(x.dtype)))  # [E, G*C, D]
    y = einsum_combine(ye, decision.combine_weights.astype(ye.dtype))
    return DispatchResult(y, jnp.ones((g, e, c), bool), c)


def _all_rows(xe: Array) -> Array:
    """``[E]``: all ``N`` rows of a buffer ``xe [E, N, D]`` (``BatchedExperts(xe, rows_used)`` then runs the
    per-expert loop on every row: on XLA:CPU faster than the batched matmul, docs/perf.md, "Every E")."""
    return jnp.full((xe.shape[0],), xe.shape[1], jnp.int32)


def run_einsum(x, decision, experts, capacity, slot_order="choice_major", filled_only=False, **_) -> DispatchResult:
    """``filled_only``: the experts run as a per-expert loop on all ``G*C`` buffer rows (same result; faster
    on CPU) instead of one batched matmul."""
    if decision.kind == "soft":
        return run_soft(x, decision, experts)
    plan = make_capacity_plan(decision, capacity, slot_order)
    g, s = x.shape[:2]
    support = _einsum_support(plan, s, x.dtype)
    xe = einsum_dispatch(x, _einsum_mask(support, None, x.dtype))
    # filled_only (capacity_compute='filled', the CPU default): an einsum buffer is not packed (each group's
    # slots come first within the group), so every row is computed, but through the per-expert loop
    ye = experts(xe, rows_used=_all_rows(xe)) if filled_only else experts(xe)
    y = einsum_combine_weighted(ye, plan.weight, support, *_einsum_rows(plan, g, s))
    return DispatchResult(y, plan.kept, capacity)


def run_scatter(x, decision, experts, capacity, slot_order="choice_major", filled_only=False, **_) -> DispatchResult:
    """``filled_only``: run each expert on its filled buffer rows only (``experts(xe, rows_used=...)``,
    ``experts.sorted_rows_ffn``; token choice), not on all ``G*C`` rows; expert choice (whose buffer rows are
    all filled but for invalid picks): the same loop on all rows. Same result; faster on CPU."""
    if decision.kind == "soft":  # dense mixtures have no sparse buffer layout: the einsum path is the one
        return run_soft(x, decision, experts)
    plan = make_capacity_plan(decision, capacity, slot_order)
    xe = scatter_dispatch(x, plan)
    if filled_only:
        ye = experts(xe, rows_used=_rows_used(plan) if plan.kind == "token_choice" else _all_rows(xe))
    else:
        ye = experts(xe)
    return DispatchResult(scatter_combine(ye, plan, x.shape[1]), plan.kept, capacity)


def run_dropless(x, decision, experts, capacity=None, block_size=None, impl="blocks", **_) -> DispatchResult:
    if decision.kind == "soft":
        raise ValueError("moe.dispatcher='dropless' cannot run a Soft MoE router (kind 'soft'): its slots are "
                         "dense mixtures of all tokens, there is no token->expert assignment to sort. Use "
                         "moe.dispatcher='einsum' (or 'scatter', which delegates to einsum).")
    if impl == "auto":
        impl = default_dropless_impl(dtype=experts.dtype)
    if impl in SORTED_IMPLS:
        if decision.kind != "token_choice":
            raise ValueError("dispatcher='dropless' supports token-choice routers only.")
        y = ragged_dot_experts(x, decision, experts.params(x.shape[-1]), experts.activation, experts.dtype, impl)
        return DispatchResult(y, decision.valid, None)
    if impl != "blocks":
        raise ValueError(f"MoEConfig.dropless_impl must be 'auto', 'grouped', 'blocks', 'ragged_dot' or 'gmm', "
                         f"got {impl!r}.")
    plan = make_dropless_plan(decision, block_size)
    yb = experts.blocks(dropless_dispatch(x, plan), plan.block_expert)
    return DispatchResult(dropless_combine(yb, plan), plan.kept, None)


DISPATCHERS: Dict[str, Callable[..., DispatchResult]] = {
    "einsum": run_einsum,
    "scatter": run_scatter,
    "dropless": run_dropless,
}


def default_dispatcher(backend: Optional[str] = None) -> str:
    """The dispatcher that ``dispatcher='auto'`` resolves to on a backend (the fastest measured there, see
    docs/perf.md): ``'scatter'`` on CPU (1-thread XLA:CPU) and on GPU (H100, H200; bf16) alike. The einsum
    costs more at every E on CPU and at K=2 on GPU (at K=1, E <= 32 on an H200 its 'auto' groups ran 2-7%
    faster, but they drop more tokens). Dropless is another semantics (no drops): on CPU it costs more at small
    K/E; on an H200 dropless 'gmm' beat it at T=65536, E=8 and tied at E=64, and (with JAX's
    forward kernel) lost at T=8192."""
    backend = backend or jax.default_backend()
    return "scatter"


def get_dispatcher(name: str) -> Callable[..., DispatchResult]:
    if name == "auto":
        name = default_dispatcher()
    if name not in DISPATCHERS:
        raise ValueError(f"MoEConfig.dispatcher: unknown {name!r}; choose one of {sorted(DISPATCHERS) + ['auto']}.")
    return DISPATCHERS[name]


# ------------------------------------------------------------------------------------------ loop reference


def loop_reference(
    x: Array,
    decision: RoutingDecision,
    expert_one: Callable[[int, Array], Array],
    capacity: Optional[int],
    slot_order: str = "choice_major",
) -> tuple:
    """Slow, obvious reference (tests only): returns ``(y[G, S, D], kept)``.

    The discrete parts of the decision (indices, validity) are read as concrete numbers and walked with
    Python loops in the documented priority order; the continuous parts (``x``, combine weights, expert
    params inside ``expert_one``) stay traced, so ``jax.grad`` through this reference is meaningful.
    ``capacity=None`` means no limit. Batch priority (``decision.priority``) is honoured.
    """
    g_n, s_n, d = x.shape
    valid = np.asarray(decision.valid)
    rows = [[jnp.zeros((d,), x.dtype) for _ in range(s_n)] for _ in range(g_n)]
    if decision.kind == "expert_choice":
        token = np.asarray(decision.token_index)
        _, e_n, c_n = token.shape
        for g in range(g_n):
            for e in range(e_n):
                for c in range(c_n):
                    if valid[g, e, c]:
                        s = int(token[g, e, c])
                        rows[g][s] = rows[g][s] + decision.combine_weights[g, e, c] * expert_one(e, x[g, s])
        return jnp.stack([jnp.stack(r) for r in rows]), valid
    expert = np.asarray(decision.expert_index)
    k_n = expert.shape[-1]
    kept = np.zeros_like(valid)
    prio = None if decision.priority is None else np.asarray(decision.priority)
    for g in range(g_n):
        tokens = list(range(s_n)) if prio is None else list(np.argsort(-prio[g], kind="stable"))
        if slot_order == "token_major":
            order = [(s, k) for s in tokens for k in range(k_n)]
        else:
            order = [(s, k) for k in range(k_n) for s in tokens]
        used = {}
        for s, k in order:
            if not valid[g, s, k]:
                continue
            e = int(expert[g, s, k])
            if capacity is None or used.get(e, 0) < capacity:
                used[e] = used.get(e, 0) + 1
                kept[g, s, k] = True
                rows[g][s] = rows[g][s] + decision.combine_weights[g, s, k] * expert_one(e, x[g, s])
    return jnp.stack([jnp.stack(r) for r in rows]), kept
