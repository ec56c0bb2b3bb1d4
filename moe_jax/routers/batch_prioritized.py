"""The ``batch_prioritized`` router (V-MoE's batch prioritized routing, Riquelme et al. 2021): top-k, with the
capacity filled by router confidence instead of token order. Not causal.

Axes (see ``moe_jax.moe``): ``G`` groups, ``S`` tokens per group, ``D`` model width, ``E`` experts,
``K`` experts per token.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.routing import RoutingDecision, TopKRouter, _token_mask, register_router

Array = jax.Array


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
