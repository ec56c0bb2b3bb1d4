"""Dynamic-k routers: ``top_p`` (Huang et al. 2024: experts until their probabilities sum to ``top_p``, with
the router-entropy loss) and ``confidence`` (top-1 if its probability exceeds ``confidence_threshold``,
else top-2). Both causal; their capacity is computed from ``K_max = moe.k``.

Axes (see ``moe_jax.moe``): ``G`` groups, ``S`` tokens per group, ``D`` model width, ``E`` experts,
``K`` experts per token (``K_max`` here).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.routers._common import _renormalize
from moe_jax.routing import RoutingDecision, Router, _token_mask, register_router, resolved_renormalize

Array = jax.Array


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
