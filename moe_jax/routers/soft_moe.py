"""The ``soft_moe`` router (Soft MoE, Puigcerver et al. 2023): dense softmax mixtures, dispatch over tokens and
combine over slots. Not causal unless ``group_size=1``.

Axes (see ``moe_jax.moe``): ``G`` groups, ``S`` tokens per group, ``D`` model width, ``E`` experts,
``K`` experts per token; ``C`` slots per expert.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.experts import on_rows
from moe_jax.routers._common import _NEG
from moe_jax.routing import RoutingDecision, Router, _token_mask, register_router

Array = jax.Array


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
