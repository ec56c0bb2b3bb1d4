"""The ``deepseek`` router (DeepSeekMoE, Dai et al. 2024; DeepSeek-V3, DeepSeek-AI 2024): sigmoid or softmax
scores, group-limited top-k, aux-loss-free bias balancing, the sequence-wise balance loss; and
``fine_grained``, the config transformation to fine-grained experts. Causal.

Axes (see ``moe_jax.moe``): ``G`` groups, ``S`` tokens per group, ``D`` model width, ``E`` experts,
``K`` experts per token.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.routers._common import _renormalize
from moe_jax.routing import (RoutingDecision, Router, _token_mask, check_renormalize_needs_k2, register_router,
                             resolved_renormalize)

Array = jax.Array


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
