"""Helpers shared by the routers of ``moe_jax.routers``."""
from __future__ import annotations

import jax
import jax.numpy as jnp

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
