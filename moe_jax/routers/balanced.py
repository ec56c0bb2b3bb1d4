"""Balanced-assignment routers: ``base`` (BASE layers, Lewis et al. 2021: a balanced linear assignment by
auction in training, greedy at evaluation) and ``sinkhorn`` (S-BASE, Clark et al. 2022: top-k on
Sinkhorn-balanced probabilities). Neither is causal in training: a token's expert depends on the whole group.

Axes (see ``moe_jax.moe``): ``G`` groups, ``S`` tokens per group, ``D`` model width, ``E`` experts,
``K`` experts per token.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.routers._common import _NEG, _check_k1, _renormalize
from moe_jax.routing import (RoutingDecision, Router, _token_mask, check_renormalize_needs_k2, register_router,
                             resolved_renormalize)

Array = jax.Array


# ------------------------------------------------------------------------------------------- BASE layers


def balanced_assignment(scores: Array, num_iters: int, rel_eps: float = 1e-3) -> Array:
    """Balanced linear assignment by a Jacobi auction (Bertsekas 1988): each expert takes exactly S/E tokens.

    Maximises ``sum_s scores[g, s, assign[g, s]]`` subject to every expert receiving ``S / E`` tokens of each
    group. Experts are objects with ``S/E`` identical slots; tokens are bidders. Each round, every unassigned
    token bids for its best expert ``e1`` (value ``a_se - p_e``) the price that makes it indifferent to its
    second best plus ``eps``; each expert keeps its ``S/E`` highest bids (standing and new), evicts the rest,
    and once full its price becomes its lowest kept bid. Prices only rise; evicted tokens bid again.

    Optimality: when every token is assigned within ``num_iters`` rounds, the assignment satisfies
    eps-complementary slackness and its total score is within ``S * eps`` of the optimum (Bertsekas 1988);
    with ``eps`` below ``gap / S`` (``gap``: the smallest difference between two assignments' totals) it is
    exactly optimal. ``eps = rel_eps * (max - min score of the group)``. If the budget runs out, the tokens
    still unassigned fill the free slots in token order (balance is always exact; optimality is then not
    guaranteed). Rounds stop early once all tokens are assigned (``lax.while_loop``).

    Cost per round: a top-2 over ``[G, S, E]`` and one sort of ``[G, S]``. Random scores with S=256, E=8
    finish in ~50 rounds; skewed ones in a few hundred (more for larger S).

    Args:
      scores: ``[G, S, E]`` float32 token-expert affinities (no gradient is taken through the assignment).
      num_iters: static budget of auction rounds.
      rel_eps: bid increment relative to the score range of the group.
    Returns:
      ``[G, S]`` int32 expert of each token; every expert appears exactly ``S / E`` times per group.
    """
    g, s, e = scores.shape
    if s % e:
        raise ValueError(f"balanced_assignment: S={s} tokens per group is not a multiple of E={e} experts.")
    scores = jax.lax.stop_gradient(scores.astype(jnp.float32))
    cap = s // e
    if e == 1:
        return jnp.zeros((g, s), jnp.int32)
    span = jnp.max(scores, axis=(1, 2)) - jnp.min(scores, axis=(1, 2))  # [G]
    eps = (rel_eps * span + 1e-6)[:, None]  # [G, 1]
    g_idx = jnp.arange(g)[:, None]
    positions = jnp.arange(s)[None, :]

    def cond(state):
        it, _, assign, _ = state
        return (it < num_iters) & jnp.any(assign < 0)

    def body(state):
        it, price, assign, bid = state  # [], [G, E], [G, S] (-1: unassigned), [G, S] standing bid
        value = scores - price[:, None, :]  # [G, S, E]
        top2, idx2 = jax.lax.top_k(value, 2)  # [G, S, 2]
        e1 = idx2[..., 0]
        new_bid = price[g_idx, e1] + top2[..., 0] - top2[..., 1] + eps  # p_e1 + (v1 - v2) + eps
        free = assign < 0
        target = jnp.where(free, e1, assign)  # [G, S]
        offer = jnp.where(free, new_bid, bid)
        # Each expert keeps its `cap` best offers: sort by (expert, offer descending), rank within the expert.
        order = jnp.lexsort((-offer, target), axis=-1)  # [G, S]
        t_sorted = jnp.take_along_axis(target, order, axis=-1)
        o_sorted = jnp.take_along_axis(offer, order, axis=-1)
        counts = jnp.sum(jax.nn.one_hot(target, e, dtype=jnp.int32), axis=1)  # [G, E]
        start = jnp.cumsum(counts, axis=-1) - counts  # [G, E] first sorted position of each expert
        rank = positions - jnp.take_along_axis(start, t_sorted, axis=-1)  # [G, S]
        kept = jnp.zeros((g, s), bool).at[g_idx, order].set(rank < cap)
        assign = jnp.where(kept, target, -1)
        bid = jnp.where(kept, offer, -jnp.inf)
        lowest_kept = jnp.take_along_axis(o_sorted, jnp.minimum(start + cap - 1, s - 1), axis=-1)  # [G, E]
        price = jnp.where(counts >= cap, lowest_kept, price)
        return it + 1, price, assign, bid

    init = (jnp.asarray(0), jnp.zeros((g, e), jnp.float32), jnp.full((g, s), -1, jnp.int32),
            jnp.full((g, s), -jnp.inf, jnp.float32))
    _, _, assign, _ = jax.lax.while_loop(cond, body, init)
    # Budget exhausted: the i-th unassigned token takes the i-th free slot (experts in index order).
    free = assign < 0
    load = jnp.sum(jax.nn.one_hot(assign, e, dtype=jnp.int32), axis=1)  # [G, E] (-1 rows are all zero)
    room_end = jnp.cumsum(cap - load, axis=-1)  # [G, E]
    nth_free = jnp.cumsum(free.astype(jnp.int32), axis=-1) - 1  # [G, S]
    fill = jax.vmap(lambda ends, n: jnp.searchsorted(ends, n, side="right"))(room_end, nth_free)
    return jnp.where(free, jnp.minimum(fill, e - 1), assign).astype(jnp.int32)


@register_router("base")
class BaseRouter(Router):
    """BASE layers (Lewis et al. 2021): balanced top-1 assignment in training, greedy top-1 in evaluation.

    Training: ``balanced_assignment`` of the gate scores ``h_s . w_e`` gives every expert exactly ``S/E``
    tokens of the group (the paper balances over the whole batch; here the unit is the group, ``S`` =
    ``moe.group_size``, which must be a multiple of E). Padding tokens enter the auction with score 0 for
    every expert and are then invalid, so real tokens are balanced up to the slots padding occupied.
    Evaluation: each token goes to its highest-scoring expert (no balancing; drops follow the eval capacity).
    Combine weight: ``sigmoid(h_s . w_e)`` of the chosen expert (paper, sec. 2.2), which is what trains the
    gate. No auxiliary loss (the Switch loss is then constant in training; set ``lb_loss_coef=0``).
    Non-causal in training (the assignment uses every token of the group); causal in evaluation.
    With capacity dispatchers choose ``capacity_factor >= 1`` so that ``C >= S/E``.
    """

    causal = False

    @classmethod
    def check_config(cls, config) -> None:
        _check_k1(config, "base")
        if config.base_iters < 1:
            raise ValueError(f"moe.base_iters must be >= 1 (auction rounds), got {config.base_iters}.")
        if not config.base_eps > 0:
            raise ValueError(f"moe.base_eps must be > 0 (relative auction bid step, e.g. 1e-3), got "
                             f"{config.base_eps}.")
        if isinstance(config.group_size, int) and config.group_size % config.num_experts:
            raise ValueError(f"moe.group_size={config.group_size} is not a multiple of moe.num_experts="
                             f"{config.num_experts}: BASE gives every expert exactly group_size/num_experts "
                             "tokens. Change group_size or num_experts.")

    @nn.compact
    def __call__(self, x, mask=None, *, capacity=None, train=False, token_ids=None) -> RoutingDecision:
        cfg = self.config
        g, s, _ = x.shape
        logits = self.logits(x)  # [G, S, E]
        tok = _token_mask(mask, (g, s))
        if train:
            if s % cfg.num_experts:
                raise ValueError(f"router='base': the group has S={s} tokens, not a multiple of moe.num_experts="
                                 f"{cfg.num_experts}. Set moe.group_size to a multiple of num_experts.")
            scores = jnp.where(tok[..., None], logits, 0.0)
            index = balanced_assignment(scores, cfg.base_iters, cfg.base_eps)[..., None]  # [G, S, 1]
        else:
            index = jnp.argmax(logits, axis=-1)[..., None]  # [G, S, 1]
        weights = jax.nn.sigmoid(jnp.take_along_axis(logits, index, axis=-1))  # [G, S, 1]
        return RoutingDecision(
            combine_weights=weights,
            expert_index=index.astype(jnp.int32),
            valid=tok[..., None],
            router_logits=logits,
            router_probs=jax.nn.softmax(logits, axis=-1),
        )


# ------------------------------------------------------------------------------------------------ S-BASE


def sinkhorn_log(logits: Array, mask: Array, num_iters: int) -> Array:
    """Log-space Sinkhorn: ``[G, S, E]`` -> ``log pi`` with every real token's row summing to 1 and the
    expert columns as equal as ``num_iters`` rounds make them (Cuturi 2013; Clark et al. 2022, S-BASE).

    Each round divides every expert column by its total over the group's real tokens, then every token's
    row by its total. The target column mass (real tokens / E) is the same for all experts, so it shifts
    each row by one constant and does not change any token's ranking; it is left out. Padding rows are
    held at ``-1e9`` (mass 0). No gradient flows through this (it only selects).
    """
    real = mask[..., None]
    log_p = jnp.where(real, jax.lax.stop_gradient(logits.astype(jnp.float32)), _NEG)

    def round_(_, lp):
        lp = lp - jax.nn.logsumexp(lp, axis=1, keepdims=True)  # experts: equal mass
        lp = lp - jax.nn.logsumexp(lp, axis=2, keepdims=True)  # tokens: mass 1
        return jnp.where(real, lp, _NEG)

    return jax.lax.fori_loop(0, num_iters, round_, log_p)


@register_router("sinkhorn")
class SinkhornRouter(Router):
    """S-BASE (Clark et al. 2022): Sinkhorn-balanced selection, softmax combine weights.

    Training: ``moe.sinkhorn_iters`` rounds of log-space Sinkhorn on the group's ``[S, E]`` logits give
    balanced assignment probabilities; each token takes the top-k of those. The combine weights are the
    original softmax probabilities of the chosen experts (``renormalize_top_k``: default off). Evaluation:
    plain top-k of the softmax (greedy). Non-causal in training (the expert normalisation sums over the
    whole group); causal in evaluation.
    """

    causal = False
    default_renormalize = False

    @classmethod
    def check_config(cls, config) -> None:
        if config.sinkhorn_iters < 1:
            raise ValueError(f"moe.sinkhorn_iters must be >= 1, got {config.sinkhorn_iters}.")
        check_renormalize_needs_k2(config)

    @nn.compact
    def __call__(self, x, mask=None, *, capacity=None, train=False, token_ids=None) -> RoutingDecision:
        cfg = self.config
        logits = self.logits(x)  # [G, S, E]
        probs = jax.nn.softmax(logits, axis=-1)
        tok = _token_mask(mask, x.shape[:2])
        select = sinkhorn_log(logits, tok, cfg.sinkhorn_iters) if train else probs
        _, index = jax.lax.top_k(select, cfg.k)  # [G, S, K]
        weights = jnp.take_along_axis(probs, index, axis=-1)
        valid = jnp.broadcast_to(tok[..., None], index.shape)
        if resolved_renormalize(cfg):
            weights = _renormalize(weights, valid)
        return RoutingDecision(combine_weights=weights, expert_index=index.astype(jnp.int32), valid=valid,
                               router_logits=logits, router_probs=probs)
