"""Routers: ``router(x[G, S, D], mask[G, S]) -> RoutingDecision``, chosen by name from one registry.

Axes (see ``moe_jax.moe``): ``G`` groups, ``S`` tokens per group, ``D`` model width, ``E`` experts,
``K`` experts per token, ``C`` capacity.

Every router computes in float32 whatever the model's dtype (the input is cast on entry): softmax and top-k
over bfloat16 logits flip choices between near-ties and make the aux losses noisy (Switch, sec. 2.4).

Two kinds of decision:

* token choice (``kind='token_choice'``): each token picks K experts. ``expert_index`` and
  ``combine_weights`` are ``[G, S, K]``; whether an assignment fits into its expert's buffer is decided later,
  by ``capacity.assign_slots``, so that every dispatcher shares one drop rule.
* expert choice (``kind='expert_choice'``, Zhou et al. 2022): each expert picks C tokens of the group.
  ``token_index`` and ``combine_weights`` are ``[G, E, C]``. Nothing overflows, but a token may be picked by
  no expert (it is "dropped": the residual carries it).

Routers register themselves with ``@register_router('name')`` and declare whether they are causal (the
decision for token s depends only on tokens <= s). A causal model refuses a non-causal router unless the
config opts in (``MoEConfig.allow_non_causal``).

Randomness (jitter, noise, GShard's random second expert) draws from the ``'router'`` RNG stream and only in
training; evaluation is deterministic.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moe_jax import losses
from moe_jax.experts import narrow_dot_general, on_rows

Array = jax.Array


@struct.dataclass
class RoutingDecision:
    """What the router decided, handed to a dispatcher. Shapes in the module docstring.

    Attributes:
      combine_weights: ``[G, S, K]`` (token choice) or ``[G, E, C]`` (expert choice), float32.
      expert_index: ``[G, S, K]`` int32, token choice only (else None).
      token_index: ``[G, E, C]`` int32, expert choice only (else None).
      valid: same shape as ``combine_weights``, bool: the assignment exists (False for padding tokens and for
        unused ranks of dynamic-k routers). Capacity drops are *not* in here.
      router_logits: ``[G, S, E]`` float32, for the z-loss and metrics.
      router_probs: ``[G, S, E]`` float32, softmax over all experts (load-balancing loss, metrics).
      priority: optional ``[G, S]`` score; higher fills expert buffers first (batch-prioritized routing).
      aux_losses: router-specific unweighted losses (name -> scalar), e.g. ``importance``, ``load``.
      dispatch_weights: ``[G, S, E, C]`` float32, Soft MoE only (``kind='soft'``): slot ``(e, c)``'s input is
        ``sum_s dispatch_weights[g, s, e, c] * x[g, s]``; its ``combine_weights`` are ``[G, S, E, C]`` too and
        ``valid`` is ``[G, S, E, C]``.
      kind: ``'token_choice'``, ``'expert_choice'`` or ``'soft'`` (static).
    """

    combine_weights: Array
    valid: Array
    router_logits: Array
    router_probs: Array
    expert_index: Optional[Array] = None
    token_index: Optional[Array] = None
    priority: Optional[Array] = None
    dispatch_weights: Optional[Array] = None
    aux_losses: Dict[str, Array] = struct.field(default_factory=dict)
    kind: str = struct.field(pytree_node=False, default="token_choice")

    @property
    def num_experts(self) -> int:
        return self.router_logits.shape[-1]


# ----------------------------------------------------------------------------------------------- registry

_ROUTERS: Dict[str, type] = {}


def register_router(name: str) -> Callable[[type], type]:
    """Class decorator: make a router selectable by ``MoEConfig.router = name``."""

    def wrap(cls):
        if name in _ROUTERS:
            raise ValueError(f"router {name!r} is registered twice")
        cls.registry_name = name
        _ROUTERS[name] = cls
        return cls

    return wrap


def router_names() -> list:
    return sorted(_ROUTERS)


def get_router_class(name: str) -> type:
    if name not in _ROUTERS:
        raise ValueError(f"MoEConfig.router: unknown router {name!r}; known routers: {', '.join(router_names())}.")
    return _ROUTERS[name]


def is_causal(name: str) -> bool:
    return get_router_class(name).causal


class Router(nn.Module):
    """Base class. Subclasses set ``causal`` and implement ``__call__``.

    ``config`` is a ``moe_jax.moe.MoEConfig`` (not imported here to keep the arrows pointing down).
    """

    config: Any
    causal = True
    kind = "token_choice"
    registry_name = ""

    @classmethod
    def check_config(cls, config) -> None:
        """Raise ``ValueError`` naming the field and the fix if ``config`` does not fit this router."""

    @classmethod
    def replay(cls, config, decision: "RoutingDecision", expert_index: Array) -> "RoutingDecision":
        """Routing replay: ``decision`` with its experts replaced by ``expert_index [G, S, K]`` and the combine
        weights this router gives those experts (so that gradients still reach the router). Routers that
        cannot recompute their weights for given experts refuse."""
        raise ValueError(f"moe.router={config.router!r} does not support routing replay; routers that do: "
                         f"{[n for n in router_names() if get_router_class(n).replay is not Router.replay]}.")

    def logits(self, x: Array) -> Array:
        """``[G, S, D] -> [G, S, E]`` float32 logits of a bias-free linear gate."""
        gate = nn.Dense(
            self.config.num_experts,
            use_bias=False,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.normal(stddev=self.config.router_init_std),
            dot_general=narrow_dot_general,  # E < D: the fast weight gradient on CPU (experts.narrow_matmul)
            name="gate",
        )
        return on_rows(gate, x.astype(jnp.float32))


def _token_mask(mask: Optional[Array], shape) -> Array:
    return jnp.ones(shape, bool) if mask is None else mask.astype(bool)


def check_renormalize_needs_k2(config, constant: str = "1.0") -> None:
    """Refuse ``renormalize_top_k`` with K = 1: the single combine weight would be the constant ``constant``,
    so the task loss would give the router no gradient. Shared by every router whose weights are renormalized."""
    if config.k == 1 and resolved_renormalize(config):
        raise ValueError(
            f"moe.renormalize_top_k=True with k=1 (router {config.router!r}): the single combine weight would always "
            f"be {constant} and the router would get no gradient. Set renormalize_top_k=False or k>=2.")


def resolved_renormalize(config) -> bool:
    """``renormalize_top_k`` with the router's default filled in."""
    if config.renormalize_top_k is not None:
        return bool(config.renormalize_top_k)
    return bool(getattr(get_router_class(config.router), "default_renormalize", False))


@register_router("top_k")
class TopKRouter(Router):
    """Token choice: softmax over all E experts, keep the K largest (Shazeer 2017 without noise).

    ``combine_weights`` are the softmax probabilities of the chosen experts; with ``renormalize_top_k`` they
    are divided by their sum (Mixtral, GShard). Optional multiplicative input jitter (Switch) and GShard's
    random second-expert policy. Causal.
    """

    default_renormalize = False
    default_jitter = 0.0

    @classmethod
    def check_config(cls, config) -> None:
        check_renormalize_needs_k2(config)
        if config.second_policy not in ("all", "random"):
            raise ValueError(f"MoEConfig.second_policy must be 'all' or 'random', got {config.second_policy!r}.")

    def jitter(self) -> float:
        return self.config.jitter_eps if self.config.jitter_eps is not None else self.default_jitter

    @nn.compact
    def __call__(self, x, mask=None, *, capacity=None, train=False, token_ids=None) -> RoutingDecision:
        cfg = self.config
        x = x.astype(jnp.float32)
        eps = self.jitter()
        if train and eps > 0:
            # Switch Transformer: multiply the router input by U(1 - eps, 1 + eps), training only.
            rng = self.make_rng("router")
            x = x * jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
        logits = self.logits(x)  # [G, S, E]
        probs = jax.nn.softmax(logits, axis=-1)
        weights, index = jax.lax.top_k(probs, cfg.k)  # [G, S, K]
        if resolved_renormalize(cfg):
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        valid = jnp.broadcast_to(_token_mask(mask, x.shape[:2])[..., None], index.shape)
        if train and cfg.k >= 2 and cfg.second_policy == "random":
            # GShard (Lepikhin et al. 2020, Alg. 1): dispatch the 2nd expert with probability
            # min(1, 2 * g2 / (g1 + g2)); only in training.
            g = weights[..., :2]
            g2 = g[..., 1] / jnp.sum(g, axis=-1)
            u = jax.random.uniform(self.make_rng("router"), g2.shape)
            valid = valid.at[..., 1].set(valid[..., 1] & (u < 2.0 * g2))
        return RoutingDecision(
            combine_weights=weights,
            expert_index=index.astype(jnp.int32),
            valid=valid,
            router_logits=logits,
            router_probs=probs,
        )

    @classmethod
    def replay(cls, config, decision, expert_index):
        """The probabilities at the given experts (renormalized as ``__call__`` does); the same values and
        gradients as ``__call__`` when ``expert_index`` is its own choice."""
        weights = jnp.take_along_axis(decision.router_probs, expert_index, axis=-1)  # [G, S, K]
        if resolved_renormalize(config):
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return decision.replace(combine_weights=weights, expert_index=expert_index)


@register_router("switch")
class SwitchRouter(TopKRouter):
    """Switch Transformer top-1 (Fedus et al. 2021): top-k with K = 1 and input jitter 1e-2 by default."""

    default_jitter = 1e-2

    @classmethod
    def check_config(cls, config) -> None:
        if config.k != 1:
            raise ValueError(f"MoEConfig.k={config.k} with router='switch': Switch is top-1. Set k=1, or use "
                             "router='top_k' / 'gshard' / 'mixtral' for K >= 2.")
        super().check_config(config)


@register_router("gshard")
class GShardRouter(TopKRouter):
    """GShard top-2 (Lepikhin et al. 2020): renormalized top-2 gates, ``second_policy`` 'all' or 'random'."""

    default_renormalize = True

    @classmethod
    def check_config(cls, config) -> None:
        if config.k != 2:
            raise ValueError(f"MoEConfig.k={config.k} with router='gshard': GShard is top-2. Set k=2, or use "
                             "router='top_k' or 'mixtral' for other K.")
        super().check_config(config)


@register_router("mixtral")
class MixtralRouter(TopKRouter):
    """Mixtral top-k (Jiang et al. 2024): softmax over all experts, keep the top k, renormalize them.

    Equivalent to a softmax over the k chosen logits.
    """

    default_renormalize = True


@register_router("noisy_top_k")
class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017, eqs. 3-5) with importance and load losses (eqs. 6-11).

    ``H(x) = x W_g + eps * softplus(x W_noise)``, ``eps ~ N(0, 1)`` in training only (plus a floor
    ``noise_eps`` on the scale so that the load estimator's Phi stays finite); the K largest of ``H`` are kept
    and the combine weights are a softmax over those K (so K >= 2: with K = 1 the weight is always 1).
    ``W_noise`` starts at zero as in the paper. ``aux_losses``: ``importance`` (CV^2 of summed gates) and
    ``load`` (CV^2 of the smooth load estimator; in evaluation, of the hard counts, without gradient).
    """

    default_renormalize = True

    @classmethod
    def check_config(cls, config) -> None:
        if config.k < 2:
            raise ValueError("MoEConfig.k=1 with router='noisy_top_k': its gates are a softmax over the K kept "
                             "logits, so K=1 gives weight 1 and no router gradient. Set k>=2.")
        if config.renormalize_top_k is False:
            raise ValueError("MoEConfig.renormalize_top_k=False with router='noisy_top_k': Shazeer et al.'s gates are "
                             "always a softmax over the K kept logits. Leave renormalize_top_k unset (None), or use "
                             "router='top_k' for unnormalized top-k gates.")

    @nn.compact
    def __call__(self, x, mask=None, *, capacity=None, train=False, token_ids=None) -> RoutingDecision:
        cfg = self.config
        x = x.astype(jnp.float32)
        clean = self.logits(x)  # [G, S, E]
        noise_std = jax.nn.softplus(on_rows(
            nn.Dense(cfg.num_experts, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                     kernel_init=nn.initializers.zeros, dot_general=narrow_dot_general, name="noise"), x)
        ) + cfg.noise_eps
        if train:
            noisy = clean + jax.random.normal(self.make_rng("router"), clean.shape) * noise_std
        else:
            noisy = clean
        top_logits, index = jax.lax.top_k(noisy, cfg.k)  # [G, S, K]
        weights = jax.nn.softmax(top_logits, axis=-1)
        tok = _token_mask(mask, x.shape[:2])
        valid = jnp.broadcast_to(tok[..., None], index.shape)
        gates = jnp.sum(jax.nn.one_hot(index, cfg.num_experts) * weights[..., None], axis=-2)  # [G, S, E]
        aux = {"importance": losses.importance_loss(gates, tok)}
        if train:
            aux["load"] = losses.load_loss(clean, noisy, noise_std, cfg.k, tok)
        else:
            hard = jnp.sum(jax.nn.one_hot(index, cfg.num_experts) * valid[..., None], axis=(0, 1, 2))
            aux["load"] = jax.lax.stop_gradient(losses.cv_squared(hard))
        return RoutingDecision(
            combine_weights=weights,
            expert_index=index.astype(jnp.int32),
            valid=valid,
            router_logits=clean,
            router_probs=jax.nn.softmax(clean, axis=-1),
            aux_losses=aux,
        )


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens of the group.

    ``S = softmax(X W_g)`` over experts, per token; then ``top_k`` of ``S^T`` along tokens gives each expert C
    tokens and their weights (eq. 1). C comes from ``capacity.compute_capacity`` with K as the average
    number of experts per token (the paper's capacity factor c). Padding tokens are never chosen before real
    ones and get weight 0. Non-causal: a token's selection depends on the scores of every token of the group,
    later ones included.
    """

    causal = False
    kind = "expert_choice"

    @nn.compact
    def __call__(self, x, mask=None, *, capacity=None, train=False, token_ids=None) -> RoutingDecision:
        if capacity is None:
            raise ValueError("expert_choice needs a capacity; it cannot run with dispatcher='dropless'.")
        x = x.astype(jnp.float32)
        logits = self.logits(x)  # [G, S, E]
        probs = jax.nn.softmax(logits, axis=-1)
        tok = _token_mask(mask, x.shape[:2])
        scores = jnp.where(tok[..., None], probs, -1.0)  # padding last
        weights, token_index = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity)  # [G, E, C]
        valid = jnp.take_along_axis(tok[:, None, :], token_index, axis=2)  # [G, 1, S] -> [G, E, C]
        weights = jnp.where(valid, weights, 0.0)
        return RoutingDecision(
            combine_weights=weights,
            token_index=token_index.astype(jnp.int32),
            valid=valid,
            router_logits=logits,
            router_probs=probs,
            kind="expert_choice",
        )
