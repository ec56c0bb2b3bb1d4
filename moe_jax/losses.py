"""Auxiliary losses of MoE routers. Pure functions, float32, padding excluded everywhere.

Axes: ``G`` groups, ``S`` tokens per group, ``E`` experts, ``K`` experts per token. ``mask`` is ``[G, S]``
(1 for real tokens, 0 for padding); ``None`` means all tokens are real.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp


def _mask_or_ones(mask: Optional[jax.Array], shape) -> jax.Array:
    if mask is None:
        return jnp.ones(shape, jnp.float32)
    return mask.astype(jnp.float32)


def load_balancing_loss(
    router_probs: jax.Array,
    expert_index: jax.Array,
    mask: Optional[jax.Array] = None,
    valid: Optional[jax.Array] = None,
) -> jax.Array:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4), generalised to K choices.

    ``loss = E * sum_e f_e * P_e`` where ``f_e`` is the fraction of token-expert assignments that go to
    expert ``e`` (all K choices counted, before any capacity drop, divided by K so that ``sum_e f_e = 1``) and
    ``P_e`` is the mean router probability of ``e``. Under perfect balance ``f_e = P_e = 1/E`` and the loss is
    exactly 1.0, for any K. Only ``P`` carries a gradient (``f`` comes from an argmax).

    Args:
      router_probs: ``[G, S, E]`` softmax probabilities.
      expert_index: ``[G, S, K]`` chosen experts.
      mask: ``[G, S]`` real-token mask; padding counts in neither ``f`` nor ``P``.
      valid: ``[G, S, K]`` optional; assignments that do not exist (dynamic-k) count nowhere.
    Returns:
      scalar float32.
    """
    return pooled_load_balancing([load_balancing_parts(router_probs, expert_index, mask, valid)])


def load_balancing_parts(
    router_probs: jax.Array,
    expert_index: jax.Array,
    mask: Optional[jax.Array] = None,
    valid: Optional[jax.Array] = None,
) -> Dict[str, jax.Array]:
    """The sums behind ``load_balancing_loss``, to pool over several layers or devices before the product:
    ``counts [E]`` (assignments per expert), ``n_assigned``, ``prob_sum [E]`` (router probability summed over
    real tokens) and ``n_tokens``. Shapes and arguments as ``load_balancing_loss``."""
    num_experts = router_probs.shape[-1]
    m = _mask_or_ones(mask, router_probs.shape[:2])  # [G, S]
    if valid is None:
        v = jnp.broadcast_to(m[..., None], expert_index.shape)
    else:
        v = valid.astype(jnp.float32) * m[..., None]  # [G, S, K]
    return {"counts": jnp.sum(jax.nn.one_hot(expert_index, num_experts) * v[..., None], axis=(0, 1, 2)),
            "n_assigned": jnp.sum(v),
            "prob_sum": jnp.sum(router_probs.astype(jnp.float32) * m[..., None], axis=(0, 1)),
            "n_tokens": jnp.sum(m)}


def pooled_load_balancing(parts: Sequence[Dict[str, jax.Array]]) -> jax.Array:
    """``E * sum_e f_e * P_e`` with ``f`` and ``P`` pooled over every entry of ``parts`` (layers, devices)
    before the product, as transformers' ``load_balancing_loss_func`` pools the layers of a causal LM (whose
    value is K times this one: it does not divide ``f`` by K). 1.0 at perfect balance."""
    total = lambda name: sum(p[name] for p in parts)
    f = total("counts") / jnp.maximum(total("n_assigned"), 1.0)
    p = total("prob_sum") / jnp.maximum(total("n_tokens"), 1.0)
    return f.shape[-1] * jnp.sum(jax.lax.stop_gradient(f) * p)


def router_z_loss(router_logits: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over real tokens of ``logsumexp(logits)^2``.

    Args: ``router_logits`` ``[G, S, E]``; ``mask`` ``[G, S]``. Returns a float32 scalar.
    """
    m = _mask_or_ones(mask, router_logits.shape[:2])
    z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)  # [G, S]
    return jnp.sum(z**2 * m) / jnp.maximum(jnp.sum(m), 1.0)


def cv_squared(x: jax.Array, eps: float = 1e-10) -> jax.Array:
    """Squared coefficient of variation ``var(x) / (mean(x)^2 + eps)`` of a ``[E]`` vector.

    Written with the variance, never the standard deviation: ``sqrt`` has an infinite derivative at 0, so
    ``std``-based versions return NaN gradients exactly at perfect balance. Here the value is 0 and the
    gradient is 0 there.
    """
    x = x.astype(jnp.float32)
    mean = jnp.mean(x)
    var = jnp.mean((x - mean) ** 2)
    return var / (mean**2 + eps)


def importance_loss(gates: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """Shazeer et al. 2017, eq. 6: ``CV(Importance)^2`` with ``Importance_e = sum_x gates(x)_e``.

    Args: ``gates`` ``[G, S, E]`` combine weights (zero for unchosen experts); ``mask`` ``[G, S]``.
    """
    m = _mask_or_ones(mask, gates.shape[:2])
    importance = jnp.sum(gates.astype(jnp.float32) * m[..., None], axis=(0, 1))  # [E]
    return cv_squared(importance)


def smooth_load(
    clean_logits: jax.Array,
    noisy_logits: jax.Array,
    noise_std: jax.Array,
    k: int,
    mask: Optional[jax.Array] = None,
) -> jax.Array:
    """Shazeer et al. 2017, eqs. 8-10: differentiable expected load per expert.

    ``P(x, e) = Phi((clean_e - kth_excluding(noisy, k, e)) / noise_std_e)``: the probability that expert ``e``
    stays in the top-k if only its own noise were drawn again. ``kth_excluding`` is the k-th largest noisy
    logit among the *other* experts: the (k+1)-th largest overall if ``e`` is in the top k, else the k-th.

    Args: ``[G, S, E]`` clean logits, noisy logits and noise scale (> 0); ``mask`` ``[G, S]``.
    Returns: ``[E]`` load (sum over real tokens).
    """
    num_experts = clean_logits.shape[-1]
    if k >= num_experts:
        # Every expert is always selected: the load is deterministic and equal.
        m = _mask_or_ones(mask, clean_logits.shape[:2])
        return jnp.full((num_experts,), jnp.sum(m))
    top, _ = jax.lax.top_k(noisy_logits, k + 1)  # [G, S, K+1]
    threshold_if_in = top[..., k : k + 1]  # (k+1)-th largest
    threshold_if_out = top[..., k - 1 : k]  # k-th largest
    is_in = noisy_logits >= threshold_if_out  # [G, S, E]
    threshold = jnp.where(is_in, threshold_if_in, threshold_if_out)
    prob = jax.scipy.stats.norm.cdf((clean_logits - threshold) / noise_std)
    m = _mask_or_ones(mask, clean_logits.shape[:2])
    return jnp.sum(prob * m[..., None], axis=(0, 1))


def load_loss(
    clean_logits: jax.Array,
    noisy_logits: jax.Array,
    noise_std: jax.Array,
    k: int,
    mask: Optional[jax.Array] = None,
) -> jax.Array:
    """Shazeer et al. 2017, eq. 11: ``CV(Load)^2`` of the smooth load estimator (``smooth_load``)."""
    return cv_squared(smooth_load(clean_logits, noisy_logits, noise_std, k, mask))
