"""More routers: balanced assignment (BASE, S-BASE), hash, Soft MoE, DeepSeek, batch priority, dynamic k.

Axes (see ``moe_jax.moe``): ``G`` groups, ``S`` tokens per group, ``D`` model width, ``E`` experts,
``K`` experts per token (``K_max`` for the dynamic-k routers), ``C`` capacity (Soft MoE: slots per expert).

Every router here registers itself in ``routing``'s registry (``MoEConfig.router = name``); ``moe.py``
imports this module once so that the names exist. Shapes and conventions are those of ``routing.py``:
token-choice decisions are ``[G, S, K]``, ranks a router does not use are ``valid=False``, and capacity
drops are decided later by ``capacity.assign_slots`` (so the capacity dispatchers and dropless all work).

==================  =======  ======================================  =========================================
name                causal   aux losses (besides Switch LB, z-loss)  reference
==================  =======  ======================================  =========================================
base                no       -                                       Lewis et al. 2021 (BASE layers)
sinkhorn            no       -                                       Clark et al. 2022 (S-BASE)
hash                yes      -                                       Roller et al. 2021 (Hash layers)
soft_moe            no       -                                       Puigcerver et al. 2023 (Soft MoE)
deepseek            yes      ``seq_balance``                         Dai et al. 2024; DeepSeek-AI 2024 (V3)
batch_prioritized   no       -                                       Riquelme et al. 2021 (V-MoE, BPR)
top_p               yes      ``dynamic`` (router entropy)            Huang et al. 2024
confidence          yes      -                                       top-1 / top-2 by a confidence threshold
==================  =======  ======================================  =========================================

"Causal" means: in a causal layer with ``slot_order='token_major'`` (or dropless), the output at position t
does not depend on tokens after t. BASE and S-BASE are causal at evaluation (greedy) but not in training;
the registry flag describes training, the stricter case.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.experts import on_rows
from moe_jax.routing import (RoutingDecision, Router, TopKRouter, _token_mask, check_renormalize_needs_k2,
                             register_router, resolved_renormalize)

Array = jax.Array
_NEG = -1e9  # a finite "minus infinity" for masked logits (keeps logsumexp and softmax free of NaN)


def _renormalize(weights: Array, valid: Array) -> Array:
    """Divide the valid weights of each token by their sum (``[G, S, K]``); invalid ones become 0."""
    w = jnp.where(valid, weights, 0.0)
    return w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-20)


def _check_k1(config, name: str) -> None:
    if config.k != 1:
        raise ValueError(f"moe.k={config.k} with router={name!r}: {name} routes each token to one expert. Set "
                         "moe.k=1.")


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


# -------------------------------------------------------------------------------------------------- hash


def hash_expert(token_ids: Array, num_experts: int, seed: int = 0) -> Array:
    """Fixed hash of token ids to experts: ``[...] int -> [...] int32`` in ``[0, E)``.

    ``h = lowbias32(id + seed * 0x9E3779B9 mod 2^32)`` (Wellons' 32-bit integer mixer:
    ``x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16``), then ``h mod E``.
    Pure uint32 arithmetic, identical on every backend.
    """
    x = token_ids.astype(jnp.uint32) + jnp.uint32((seed * 0x9E3779B9) & 0xFFFFFFFF)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    x = x ^ (x >> 16)
    return (x % jnp.uint32(num_experts)).astype(jnp.int32)


@register_router("hash")
class HashRouter(Router):
    """Hash layers (Roller et al. 2021): a fixed hash of the token id picks the expert (``hash_expert``).

    The paper's random hash is a fixed random map vocab -> experts; an integer hash is one without a table
    and without knowing the vocabulary size (``moe.hash_seed`` picks another map). Needs the layer's
    ``token_ids [B, L]``. Combine weight 1 and no router parameters: nothing to learn, no aux loss (the
    reported Switch loss is a constant imbalance measure, ``router_probs`` being the one-hot choice, and the
    z-loss is 0). Causal: the choice depends on the token's own id only.
    """

    @classmethod
    def check_config(cls, config) -> None:
        _check_k1(config, "hash")

    @nn.compact
    def __call__(self, x, mask=None, *, capacity=None, train=False, token_ids=None) -> RoutingDecision:
        cfg = self.config
        g, s, _ = x.shape
        if token_ids is None:
            raise ValueError("moe.router='hash' needs the token ids: call MoELayer(...)(x, mask, "
                             "token_ids=ids[B, L]) (the model passes its input ids).")
        if token_ids.shape != (g, s):
            raise ValueError(f"router='hash': token_ids shape {token_ids.shape} != the group shape {(g, s)}.")
        tok = _token_mask(mask, (g, s))
        index = hash_expert(token_ids, cfg.num_experts, cfg.hash_seed)[..., None]  # [G, S, 1]
        onehot = jax.nn.one_hot(index[..., 0], cfg.num_experts, dtype=jnp.float32)  # [G, S, E]
        return RoutingDecision(
            combine_weights=jnp.ones((g, s, 1), jnp.float32),
            expert_index=index,
            valid=tok[..., None],
            router_logits=jnp.where(onehot > 0, 0.0, _NEG),  # logsumexp = 0: zero z-loss
            router_probs=onehot,
        )


# ---------------------------------------------------------------------------------------------- Soft MoE


@register_router("soft_moe")
class SoftMoERouter(Router):
    """Soft MoE (Puigcerver et al. 2023): every slot is a softmax mixture of the group's tokens.

    Slot parameters ``Phi [D, E, C]`` (``C = moe.num_slots`` per expert). Logits ``L[s, e, c] = scale *
    <x_s / |x_s|, Phi_ec / |Phi_ec|>`` (the paper's l2 normalisation with a learned scalar ``scale``, init 1,
    sec. 2.3). Dispatch weights ``D = softmax over s`` (each slot's input is ``sum_s D[s,e,c] x_s``), combine
    weights ``softmax over (e, c)`` (each token's output is ``sum_ec C[s,e,c] y_ec``); both ``[G, S, E, C]``,
    decision ``kind='soft'``. Padding tokens get dispatch and combine weight 0. Nothing is dropped.
    ``router_logits [G, S, E]`` is ``logsumexp_c L`` (its z-loss is that of the combine softmax) and
    ``router_probs`` the combine mass per expert. Runs on the einsum dispatcher (scatter delegates to it);
    dropless refuses it (no discrete assignment).

    Non-causal: every slot mixes the whole group, the future included. It is valid as is for encoders /
    per-position (non-autoregressive) models; in a decoder only with ``moe.group_size=1`` (each slot then
    holds one token and the layer is a per-token dense mixture of E*C expert calls; opt in with
    ``moe.allow_non_causal=True``).
    """

    causal = False
    kind = "soft"

    @classmethod
    def check_config(cls, config) -> None:
        if config.num_slots < 1:
            raise ValueError(f"moe.num_slots must be >= 1 (slots per expert for Soft MoE), got {config.num_slots}.")

    @nn.compact
    def __call__(self, x, mask=None, *, capacity=None, train=False, token_ids=None) -> RoutingDecision:
        cfg = self.config
        g, s, d = x.shape
        e, c = cfg.num_experts, cfg.num_slots
        x = x.astype(jnp.float32)
        phi = self.param("slots", nn.initializers.normal(stddev=d ** -0.5), (d, e, c), jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (), jnp.float32)
        xn = x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)
        phin = phi * jax.lax.rsqrt(jnp.sum(phi * phi, axis=0, keepdims=True) + 1e-6)
        logits = scale * on_rows(lambda rows: jnp.einsum("nd,dec->nec", rows, phin), xn)  # [G, S, E, C]
        tok = _token_mask(mask, (g, s))
        real = tok[:, :, None, None]
        dispatch = jax.nn.softmax(jnp.where(real, logits, _NEG), axis=1) * real  # softmax over tokens
        combine = jax.nn.softmax(logits.reshape(g, s, e * c), axis=-1).reshape(g, s, e, c) * real
        router_logits = jax.nn.logsumexp(logits, axis=-1)  # [G, S, E]
        return RoutingDecision(
            combine_weights=combine,
            dispatch_weights=dispatch,
            valid=jnp.broadcast_to(real, logits.shape),
            router_logits=router_logits,
            router_probs=jax.nn.softmax(router_logits, axis=-1),
            kind="soft",
        )


# ---------------------------------------------------------------------------------------------- DeepSeek


def group_limited_top_k(scores: Array, k: int, n_groups: int, topk_groups: int) -> Array:
    """DeepSeek-V2/V3 node-limited routing: ``[G, S, E]`` selection scores -> ``[G, S, K]`` expert ids.

    Experts are split into ``n_groups`` consecutive groups of ``E / n_groups``; a group's score is the sum of
    its two largest scores (its largest if it has one expert); the ``topk_groups`` best groups stay, and the
    top-k is taken among their experts only.
    """
    g, s, e = scores.shape
    if n_groups > 1:
        per = e // n_groups
        grouped = scores.reshape(g, s, n_groups, per)  # [G, S, n_groups, E/n_groups]
        group_score = jnp.sum(jax.lax.top_k(grouped, min(2, per))[0], axis=-1)  # [G, S, n_groups]
        _, keep = jax.lax.top_k(group_score, topk_groups)  # [G, S, topk_groups]
        group_ok = jnp.sum(jax.nn.one_hot(keep, n_groups, dtype=jnp.int32), axis=-2) > 0  # [G, S, n_groups]
        scores = jnp.where(jnp.repeat(group_ok, per, axis=-1), scores, -jnp.inf)
    return jax.lax.top_k(scores, k)[1]


def sequence_balance_loss(scores: Array, expert_index: Array, valid: Array, mask: Array) -> Array:
    """DeepSeek-V3 sequence-wise balance loss (eqs. 17-20), one sequence = one group, averaged over groups.

    ``f_i = E / (K T) * #{t: i in topk(t)}``, ``P_i = 1/T sum_t s'_{i,t}`` with ``s' = s / sum_j s_j``;
    ``L = sum_i f_i P_i`` (1.0 under perfect balance; the coefficient ``alpha`` is ``moe.seq_aux_coef``).
    Args: ``scores [G, S, E]`` (non-negative affinities), ``expert_index``/``valid [G, S, K]``, ``mask [G, S]``.
    """
    e, k = scores.shape[-1], expert_index.shape[-1]
    m = mask.astype(jnp.float32)
    t = jnp.sum(m, axis=1)  # [G] real tokens per sequence
    v = valid.astype(jnp.float32) * m[..., None]
    counts = jnp.sum(jax.nn.one_hot(expert_index, e) * v[..., None], axis=(1, 2))  # [G, E]
    f = jax.lax.stop_gradient(counts * e / (k * jnp.maximum(t, 1.0))[:, None])
    s_norm = scores / jnp.maximum(jnp.sum(scores, axis=-1, keepdims=True), 1e-20)
    p = jnp.sum(s_norm * m[..., None], axis=1) / jnp.maximum(t, 1.0)[:, None]  # [G, E]
    per_seq = jnp.sum(f * p, axis=-1)  # [G]
    has = (t > 0).astype(jnp.float32)
    return jnp.sum(per_seq * has) / jnp.maximum(jnp.sum(has), 1.0)


def fine_grained(config, m: int, num_shared_experts=None):
    """DeepSeekMoE fine-grained experts: split each of E experts (hidden F, K active) into ``m`` experts of
    hidden ``F/m`` with ``m*K`` active, same parameters and FLOPs: ``num_experts=m*E, k=m*K,
    expert_hidden=F/m``. Shared experts follow ``shared_expert_hidden`` (None: the new, small width, as in
    DeepSeekMoE). Works on any ``dataclasses`` config (``MoEConfig``)."""
    if m < 1 or config.expert_hidden % m:
        raise ValueError(f"fine_grained: m={m} must be >= 1 and divide moe.expert_hidden={config.expert_hidden}.")
    changes = dict(num_experts=config.num_experts * m, k=config.k * m, expert_hidden=config.expert_hidden // m)
    if num_shared_experts is not None:
        changes["num_shared_experts"] = num_shared_experts
    return dataclasses.replace(config, **changes)


@register_router("deepseek")
class DeepSeekRouter(Router):
    """DeepSeekMoE / DeepSeek-V3 routing (Dai et al. 2024; DeepSeek-AI 2024, sec. 2.1.2).

    * scores ``s = sigmoid(x W)`` (V3) or ``softmax(x W)`` (V2): ``moe.score_func``.
    * selection on ``s + b`` with a per-expert bias ``b`` (auxiliary-loss-free balancing), group-limited:
      ``moe.n_groups`` groups, the best ``moe.topk_groups`` kept by the sum of their top-2 biased scores, then
      top-k inside them (``group_limited_top_k``).
    * combine weights: the *unbiased* scores of the chosen experts, normalized to sum 1
      (``renormalize_top_k``, default on), times ``moe.routed_scaling``.
    * bias ``b`` lives in the variable collection ``'moe_state'`` (``expert_bias [E]``), outside the
      gradient. In training, when that collection is mutable (``apply(..., mutable=['moe_state'])``), it is
      nudged after the decision, like BatchNorm statistics: ``b += bias_update_rate * sign(mean(load) -
      load)`` with ``load`` the number of the batch's real assignments per expert (eq. 16 neighbourhood:
      overloaded experts go down by gamma, underloaded ones up). The bias is used in evaluation too.
    * aux loss ``seq_balance``: the complementary sequence-wise balance loss (eqs. 17-20), one group = one
      sequence, weight ``moe.seq_aux_coef``. V3 uses no Switch loss: set ``lb_loss_coef=0``.
    * fine-grained and shared experts are configuration: ``fine_grained(config, m)`` and
      ``moe.num_shared_experts``.
    ``router_probs`` (metrics, Switch loss) is ``s / sum(s)``. Causal (each token's choice depends on itself
    and on the bias, which only changes between steps).
    """

    default_renormalize = True

    @classmethod
    def check_config(cls, config) -> None:
        e = config.num_experts
        if config.score_func not in ("sigmoid", "softmax"):
            raise ValueError(f"moe.score_func must be 'sigmoid' or 'softmax', got {config.score_func!r}.")
        if config.n_groups < 1 or e % config.n_groups:
            raise ValueError(f"moe.n_groups={config.n_groups} must be >= 1 and divide moe.num_experts={e}.")
        if not 1 <= config.topk_groups <= config.n_groups:
            raise ValueError(f"moe.topk_groups={config.topk_groups} must be between 1 and moe.n_groups="
                             f"{config.n_groups}.")
        if config.k > config.topk_groups * (e // config.n_groups):
            raise ValueError(f"moe.k={config.k} exceeds the {config.topk_groups * (e // config.n_groups)} experts "
                             "in the kept groups (topk_groups * num_experts / n_groups). Raise moe.topk_groups or "
                             "lower moe.k.")
        if not config.routed_scaling > 0:
            raise ValueError(f"moe.routed_scaling must be > 0, got {config.routed_scaling}.")
        if config.bias_update_rate < 0:
            raise ValueError(f"moe.bias_update_rate must be >= 0 (0 disables the bias), got "
                             f"{config.bias_update_rate}.")
        check_renormalize_needs_k2(config, constant="routed_scaling")

    @nn.compact
    def __call__(self, x, mask=None, *, capacity=None, train=False, token_ids=None) -> RoutingDecision:
        cfg = self.config
        e = cfg.num_experts
        logits = self.logits(x)  # [G, S, E]
        scores = jax.nn.sigmoid(logits) if cfg.score_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
        bias = self.variable("moe_state", "expert_bias", lambda: jnp.zeros((e,), jnp.float32))
        select = jax.lax.stop_gradient(scores) + bias.value  # [G, S, E]
        index = group_limited_top_k(select, cfg.k, cfg.n_groups, cfg.topk_groups)  # [G, S, K]
        tok = _token_mask(mask, x.shape[:2])
        valid = jnp.broadcast_to(tok[..., None], index.shape)
        weights = jnp.take_along_axis(scores, index, axis=-1)
        if resolved_renormalize(cfg):
            weights = _renormalize(weights, valid)
        weights = weights * cfg.routed_scaling
        if train and self.is_mutable_collection("moe_state") and not self.is_initializing():
            load = jnp.sum(jax.nn.one_hot(index, e) * valid[..., None], axis=(0, 1, 2))  # [E]
            bias.value = bias.value + cfg.bias_update_rate * jnp.sign(jnp.mean(load) - load)
        return RoutingDecision(
            combine_weights=weights,
            expert_index=index.astype(jnp.int32),
            valid=valid,
            router_logits=logits,
            router_probs=scores / jnp.sum(scores, axis=-1, keepdims=True),
            aux_losses={"seq_balance": sequence_balance_loss(scores, index, valid, tok)},
        )


# ------------------------------------------------------------------------------------ batch prioritized


@register_router("batch_prioritized")
class BatchPrioritizedRouter(TopKRouter):
    """Batch Prioritized Routing (Riquelme et al. 2021, V-MoE sec. 4.1): top-k, but expert buffers are
    filled in order of router confidence (the token's largest probability), not position.

    ``priority [G, S] = max_e p(e | x_s)`` (padding: -1, last); ``capacity.assign_slots`` sorts by it
    (choice-major among equal priorities). Useful with small capacity factors: the confident tokens keep
    their expert. Non-causal: a later, more confident token can take an earlier token's slot.
    """

    causal = False

    @nn.compact
    def __call__(self, x, mask=None, *, capacity=None, train=False, token_ids=None) -> RoutingDecision:
        decision = super().__call__(x, mask, capacity=capacity, train=train, token_ids=token_ids)
        tok = _token_mask(mask, x.shape[:2])
        priority = jnp.where(tok, jnp.max(decision.router_probs, axis=-1), -1.0)
        return decision.replace(priority=priority)


# --------------------------------------------------------------------------------------------- dynamic k


class _DynamicKRouter(Router):
    """Shared body: softmax, the K_max = ``moe.k`` best experts, ``_keep(probs_sorted)`` decides the ranks."""

    default_renormalize = False

    def _keep(self, top: Array) -> Array:
        raise NotImplementedError

    def _aux(self, probs: Array, tok: Array) -> dict:
        return {}

    @nn.compact
    def __call__(self, x, mask=None, *, capacity=None, train=False, token_ids=None) -> RoutingDecision:
        cfg = self.config
        logits = self.logits(x)  # [G, S, E]
        probs = jax.nn.softmax(logits, axis=-1)
        top, index = jax.lax.top_k(probs, cfg.k)  # [G, S, K_max], descending
        tok = _token_mask(mask, x.shape[:2])
        valid = self._keep(top) & tok[..., None]
        weights = _renormalize(top, valid) if resolved_renormalize(cfg) else jnp.where(valid, top, 0.0)
        return RoutingDecision(combine_weights=weights, expert_index=index.astype(jnp.int32), valid=valid,
                               router_logits=logits, router_probs=probs, aux_losses=self._aux(probs, tok))


def router_entropy(probs: Array, mask: Array) -> Array:
    """Mean over real tokens of ``-sum_e p log p`` (``[G, S, E]``, ``[G, S]`` -> scalar)."""
    m = mask.astype(jnp.float32)
    ent = -jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-30)), axis=-1)
    return jnp.sum(ent * m) / jnp.maximum(jnp.sum(m), 1.0)


@register_router("top_p")
class TopPRouter(_DynamicKRouter):
    """Top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts", eqs. 4-6).

    A token takes experts in decreasing probability until their cumulative probability reaches
    ``moe.top_p``: rank ``r`` is used iff the probabilities of ranks ``< r`` sum to less than p (rank 0
    always), at most ``K_max = moe.k`` ranks; unused ranks are ``valid=False``. Combine weights: the softmax
    probabilities of the used experts (``renormalize_top_k`` optional, default off). Aux loss ``dynamic``:
    the mean router entropy, minimized (weight ``moe.dynamic_loss_coef``): it sharpens the distribution so
    that the threshold is met with few experts. Capacity comes from K_max. Causal.
    """

    @classmethod
    def check_config(cls, config) -> None:
        if not 0 < config.top_p <= 1:
            raise ValueError(f"moe.top_p must be in (0, 1], got {config.top_p}.")
        if config.k < 2:
            raise ValueError(f"moe.k={config.k} with router='top_p': k is the cap K_max on experts per token; "
                             "with k=1 top-p is top-1. Set moe.k >= 2 (e.g. num_experts).")

    def _keep(self, top):
        before = jnp.cumsum(top, axis=-1) - top  # probability mass of the higher ranks
        return before < self.config.top_p

    def _aux(self, probs, tok):
        return {"dynamic": router_entropy(probs, tok)}


@register_router("confidence")
class ConfidenceRouter(_DynamicKRouter):
    """Confidence-threshold routing: top-1 if the largest probability exceeds ``moe.confidence_threshold``,
    else top-2 (``moe.k`` must be 2). Combine weights: softmax probabilities of the used experts
    (``renormalize_top_k`` optional). Causal."""

    @classmethod
    def check_config(cls, config) -> None:
        if not 0 < config.confidence_threshold < 1:
            raise ValueError(f"moe.confidence_threshold must be in (0, 1), got {config.confidence_threshold}.")
        if config.k != 2:
            raise ValueError(f"moe.k={config.k} with router='confidence': it uses top-1 or top-2, so k (= K_max) "
                             "must be 2.")

    def _keep(self, top):
        second = top[..., :1] <= self.config.confidence_threshold  # [G, S, 1]
        return jnp.concatenate([jnp.ones_like(second), second], axis=-1)
