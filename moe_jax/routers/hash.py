"""The ``hash`` router (Hash layers, Roller et al. 2021): a fixed hash of the token id picks each token's one
expert; no parameters, causal.

Axes (see ``moe_jax.moe``): ``G`` groups, ``S`` tokens per group, ``D`` model width, ``E`` experts,
``K`` experts per token (1 here).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.routers._common import _NEG, _check_k1
from moe_jax.routing import RoutingDecision, Router, _token_mask, register_router

Array = jax.Array


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
