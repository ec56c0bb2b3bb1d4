"""The MoE layer: router -> dispatch -> experts -> combine (+ shared experts).

Axes, used in every einsum string and shape comment of the package:

====  ==========================================================================================
``B``  batch
``L``  sequence length
``D``  model width
``F``  FFN (expert) hidden width
``H``  attention heads
``T``  tokens, ``T = B * L``
``G``  groups: tokens are split into G groups of S tokens; capacity and priority are per group
``S``  tokens per group (``MoEConfig.group_size``; default: one sequence, ``S = L``)
``E``  experts
``K``  experts per token
``C``  capacity: buffer slots per expert and group (``capacity.compute_capacity``)
====  ==========================================================================================

Example::

    cfg = MoEConfig(num_experts=8, k=2, router="mixtral", expert_hidden=256, slot_order="token_major")
    layer = MoELayer(cfg)
    variables = layer.init({"params": key}, x)            # x: [B, L, D]
    y, stats = layer.apply(variables, x, train=True, rngs={"router": key})
    loss = task_loss(y) + stats.aux_loss
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from moe_jax import dispatch as dispatch_lib
from moe_jax import parallel
from moe_jax import losses, routing
from moe_jax import routers  # noqa: F401  (registers base, sinkhorn, hash, soft_moe, deepseek, ...)
from moe_jax.capacity import compute_capacity
from moe_jax.experts import ACTIVATIONS, BatchedExperts, DenseFFN

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Everything an MoE layer needs. ``MoEConfig(**config_dict)`` builds one from an ml_collections dict.

    Routing:
      num_experts: E. k: experts per token (K; for expert choice, the average, i.e. the capacity factor c).
      router: a name from ``routing.router_names()``.
      renormalize_top_k: divide the K chosen probabilities by their sum; None = the router's default
        (mixtral, gshard, noisy_top_k: on; top_k, switch: off). Refused with K = 1.
      second_policy: GShard's 2nd-expert policy, 'all' or 'random' (training only).
      jitter_eps: Switch's multiplicative input jitter; None = router default (switch: 1e-2, others 0).
      noise_eps: floor of the noisy-top-k noise scale.
      router_init_std: std of the router's normal init.
    Capacity and dispatch:
      dispatcher: 'einsum', 'scatter', 'dropless' or 'auto' (fastest measured on the backend).
      group_size: S, tokens per group; None = the sequence length. Must divide B*L. 'auto': the sequence
        length, except for dispatcher='einsum', whose cost grows with S: there the largest divisor of L up to
        max(F/4, 4*E/K) (``dispatch.einsum_group_size``; smaller groups drop a little more).
      capacity_factor / eval_capacity_factor: train and eval ``cf`` in ``C = ceil(cf * K * S / E)``.
      capacity_multiple, min_capacity: rounding of C.
      slot_order: 'choice_major' (all first choices first; GShard) or 'token_major' (strictly causal).
      dropless_block_size: rows per block of the dropless layout; None = automatic.
      dropless_impl: 'auto' (the fastest measured on the backend, ``dispatch.default_dropless_impl``:
        'grouped' on CPU, 'gmm' on a Hopper GPU in bfloat16/float16, 'blocks' on other GPUs), 'grouped' (a loop over experts on rows sorted by expert), 'ragged_dot'
        (``jax.lax.ragged_dot``), 'blocks' (block-padded rows, weights gathered per block) or 'gmm' (rows
        sorted by expert through ragged GEMM kernels forward and backward: Pallas Mosaic GPU kernels,
        Hopper GPUs and bfloat16 only; ``moe_jax.gmm``).
      capacity_compute: how the capacity dispatchers run the experts: 'filled' (with 'scatter' and token
        choice, each expert only on its filled buffer rows, rounded up to a small quantum:
        ``experts.sorted_rows_ffn``, a loop of one FFN per expert; the einsum dispatcher's buffer and expert
        choice's are not packed that way, and they run the same loop on all ``G*C`` rows), 'full' (all
        ``G*C`` rows as one batched matmul) or 'auto' ('filled' on CPU, 'full' elsewhere, and always 'full'
        under a device mesh). Same result either way up to float rounding: with
        'filled' a row's result can differ in the last bits with how many rows its expert computes, which
        later tokens change (XLA:CPU's GEMM blocking); the routing and the drops stay exactly causal.
        docs/perf.md.
    Experts:
      expert_hidden: F. activation: 'gelu', 'relu', 'silu'. glu: gated (SwiGLU with silu).
      num_shared_experts, shared_expert_hidden: always-on experts (None width = F).
      shared_expert_gate: scale the shared experts' output by a per-token sigmoid gate,
        ``sigmoid(x . g) * shared(x)`` with ``g [D, 1]`` (param ``shared_gate/kernel``; Qwen2-MoE's
        ``shared_expert_gate``). Needs ``num_shared_experts >= 1``.
    Losses (weights of the aux terms in ``MoEStats.aux_loss``):
      lb_loss_coef (Switch), z_loss_coef (ST-MoE), importance_loss_coef, load_loss_coef (Shazeer),
      dynamic_loss_coef (top_p's router-entropy loss), seq_aux_coef (DeepSeek-V3 sequence-wise balance, alpha).
      lb_scope: over which tokens the load-balancing loss pools ``f`` and ``P`` (``LB_SCOPES``): 'batch' (all
        tokens of the layer's batch; under ``jit`` on a mesh that is the global batch of every data-parallel
        device), 'group' (each group of S tokens, then the mean over groups), 'sequence' (each sequence, then
        the mean: HF Switch, DeepSeek's sequence-wise loss), 'layers' (pooled over the batch and over every
        MoE layer of the model, as transformers' causal LMs: ``Transformer`` computes it from each layer's
        ``MoEStats.balance``; the layer's own ``aux_loss`` then leaves it out) or 'global' ('batch', and under
        ``pmap`` the counts and probabilities are summed over the devices first, ``parallel.PMAP_AXIS``).
    Router-specific (``moe_jax.routers``):
      top_p: cumulative-probability threshold p of router='top_p' (Huang et al. 2024; k is the cap K_max).
      confidence_threshold: router='confidence' takes top-1 if its probability exceeds this, else top-2.
      num_slots: Soft MoE slots per expert (C of router='soft_moe').
      score_func: DeepSeek affinity, 'sigmoid' (V3) or 'softmax' (V2).
      n_groups, topk_groups: DeepSeek group-limited routing (experts in n_groups groups, keep topk_groups).
      routed_scaling: DeepSeek factor on the routed experts' combine weights.
      bias_update_rate: DeepSeek aux-loss-free bias step gamma (0 = off); applied when 'moe_state' is mutable.
      sinkhorn_iters: Sinkhorn rounds of router='sinkhorn' (S-BASE).
      base_iters, base_eps: auction budget (rounds) and relative bid step of router='base'.
      hash_seed: selects the hash function of router='hash'.
    Causality:
      allow_non_causal: let a causal model use a non-causal router or priority order anyway.
    """

    num_experts: int = 8
    k: int = 1
    router: str = "top_k"
    renormalize_top_k: Optional[bool] = None
    second_policy: str = "all"
    jitter_eps: Optional[float] = None
    noise_eps: float = 1e-2
    router_init_std: float = 0.02
    dispatcher: str = "auto"
    group_size: Optional[Any] = None
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    capacity_multiple: int = 1
    min_capacity: int = 1
    slot_order: str = "choice_major"
    dropless_block_size: Optional[int] = None
    dropless_impl: str = "auto"
    capacity_compute: str = "auto"
    expert_hidden: int = 256
    activation: str = "gelu"
    glu: bool = False
    num_shared_experts: int = 0
    shared_expert_hidden: Optional[int] = None
    shared_expert_gate: bool = False
    lb_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    importance_loss_coef: float = 1e-2
    load_loss_coef: float = 1e-2
    dynamic_loss_coef: float = 1e-4
    seq_aux_coef: float = 1e-4
    lb_scope: str = "batch"
    top_p: float = 0.4
    confidence_threshold: float = 0.5
    num_slots: int = 1
    score_func: str = "sigmoid"
    n_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0
    bias_update_rate: float = 1e-3
    sinkhorn_iters: int = 8
    base_iters: int = 1000
    base_eps: float = 1e-3
    hash_seed: int = 0
    allow_non_causal: bool = False

    @classmethod
    def from_dict(cls, d) -> "MoEConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"moe config: unknown field(s) {unknown}; known fields: {sorted(names)}.")
        return cls(**d)

    @property
    def uses_capacity(self) -> bool:
        return self.resolved_dispatcher() != "dropless"

    def resolved_group_size(self, seq_len: int) -> int:
        """S for sequences of length ``seq_len`` (``group_size`` None -> L, 'auto' -> see the field doc)."""
        if self.group_size == "auto":
            if self.resolved_dispatcher() == "einsum":
                return dispatch_lib.einsum_group_size(seq_len, self.num_experts, self.k, self.expert_hidden)
            return seq_len
        return self.group_size or seq_len

    def resolved_dropless_impl(self, sharded: bool = False, dtype=None) -> str:
        """``dtype``: the experts' compute dtype ('gmm' is the GPU default for bfloat16/float16 only)."""
        if self.dropless_impl == "auto":
            return dispatch_lib.default_dropless_impl(sharded=sharded, dtype=dtype)
        return self.dropless_impl

    def resolved_capacity_compute(self, sharded: bool = False) -> str:
        if self.capacity_compute == "auto":
            return "filled" if jax.default_backend() == "cpu" and not sharded else "full"
        return self.capacity_compute

    def resolved_dispatcher(self) -> str:
        return dispatch_lib.default_dispatcher() if self.dispatcher == "auto" else self.dispatcher

    def validate(self, causal: bool = False) -> "MoEConfig":
        """Raise ``ValueError`` naming the field and the fix. ``causal``: the layer sits in a causal model."""
        if self.num_experts < 1:
            raise ValueError(f"moe.num_experts must be >= 1, got {self.num_experts}.")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"moe.k={self.k!r} must be an integer >= 1 (the experts each token is sent to); "
                             "use e.g. k=1 (Switch) or k=2 (GShard, Mixtral).")
        if self.k > self.num_experts:
            raise ValueError(f"moe.k={self.k} must be between 1 and num_experts={self.num_experts}: a token "
                             "cannot choose more experts than exist. Lower k or raise num_experts.")
        router_cls = routing.get_router_class(self.router)
        if self.dispatcher != "auto" and self.dispatcher not in dispatch_lib.DISPATCHERS:
            raise ValueError(f"moe.dispatcher: unknown {self.dispatcher!r}; choose one of "
                             f"{sorted(dispatch_lib.DISPATCHERS) + ['auto']}.")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is None or not value > 0:
                raise ValueError(f"moe.{name} must be > 0, got {value!r}; use e.g. 1.25, or "
                                 "dispatcher='dropless' for no capacity limit.")
        if self.capacity_compute not in ("auto", "filled", "full"):
            raise ValueError(f"moe.capacity_compute must be 'auto', 'filled' or 'full', got {self.capacity_compute!r}.")
        if self.slot_order not in ("choice_major", "token_major"):
            raise ValueError(f"moe.slot_order must be 'choice_major' or 'token_major', got {self.slot_order!r}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"moe.activation: unknown {self.activation!r}; choose one of {sorted(ACTIVATIONS)}.")
        if self.group_size is not None and self.group_size != "auto" and not (
                isinstance(self.group_size, int) and self.group_size >= 1):
            raise ValueError(f"moe.group_size must be an int >= 1, None or 'auto', got {self.group_size!r}.")
        if self.expert_hidden < 1:
            raise ValueError(f"moe.expert_hidden must be >= 1, got {self.expert_hidden}.")
        if self.resolved_dispatcher() == "dropless" and router_cls.kind != "token_choice":
            raise ValueError(f"moe.dispatcher='dropless' with router {self.router!r}: dropless needs a "
                             "token-choice router. Use dispatcher='scatter' or 'einsum'.")
        if self.shared_expert_gate and self.num_shared_experts < 1:
            raise ValueError("moe.shared_expert_gate=True needs moe.num_shared_experts >= 1 (it gates the shared "
                             "experts' output).")
        if self.lb_scope not in LB_SCOPES:
            raise ValueError(f"moe.lb_scope: unknown {self.lb_scope!r}; choose one of {list(LB_SCOPES)}.")
        router_cls.check_config(self)
        if causal and not self.allow_non_causal:
            if not router_cls.causal:
                raise ValueError(
                    f"moe.router={self.router!r} is non-causal (a token's routing depends on later tokens), "
                    "but this layer is in a causal model. Choose a causal router "
                    f"({', '.join(n for n in routing.router_names() if routing.is_causal(n))}) "
                    "or set moe.allow_non_causal=True if the leak is intended.")
            if self.k >= 2 and self.uses_capacity and self.slot_order == "choice_major":
                raise ValueError(
                    f"moe.slot_order='choice_major' with k={self.k} and a capacity in a causal model: a later "
                    "token's first choice can evict an earlier token's second choice, which leaks the future. "
                    "Set moe.slot_order='token_major' (strictly causal), or dispatcher='dropless', or "
                    "moe.allow_non_causal=True.")
        return self


@struct.dataclass
class MoEStats:
    """What one MoE layer reports. ``aux_loss`` is the weighted sum that the model adds to its loss.

    ``losses``: unweighted terms (``load_balancing``, ``z_loss``, router-specific ones).
    ``metrics``: ``drop_fraction`` (assignments that lost their slot), ``expert_drop_fraction`` ``[E]`` (of the
    assignments routed to expert e, the fraction that lost their slot; 0 for an expert nothing was routed to;
    all 0 for expert choice and Soft MoE, where experts drop nothing), ``nonfinite_tokens`` (real tokens whose
    input holds a NaN/Inf: routed nowhere, counted in no other statistic, output NaN), ``capacity_factor`` (actual:
    ``C * E / (K * S)``; for dropless the factor that would have been needed, ``E * max_e f_e``),
    ``expert_load`` ``[E]`` (fraction of assignments routed to each expert, before drops), ``max_vio``
    (``max_e load_e / mean_e load_e - 1``, Wang et al. 2024), ``router_entropy`` (mean over tokens, nats),
    ``top1_prob`` (mean of the largest router probability), ``experts_per_token`` (mean kept assignments per
    real token), ``experts_per_token_hist`` ``[K+1]`` (token choice only: fraction of real tokens with 0..K
    kept assignments; its mean is ``experts_per_token``). Soft MoE (``kind='soft'``): ``expert_load`` is each
    expert's share of the combine weights, nothing is dropped, ``experts_per_token = E``, ``capacity_factor``
    is ``num_slots * E / S``.
    ``balance``: with ``lb_scope='layers'`` only, this layer's share of the pooled load-balancing loss
    (``losses.load_balancing_parts``: ``counts [E]``, ``n_assigned``, ``prob_sum [E]``, ``n_tokens``).
    ``routing``: only when the layer is called with ``return_routing=True`` (token choice): its decisions,
    ``expert_index [B, L, K]`` int32 and ``weights [B, L, K]`` (combine weights, before capacity drops).
    """

    aux_loss: Array
    losses: Dict[str, Array]
    metrics: Dict[str, Array]
    balance: Optional[Dict[str, Array]] = None
    routing: Optional[Dict[str, Array]] = None


def _loss_coefs(cfg: MoEConfig) -> Dict[str, float]:
    return {
        "load_balancing": cfg.lb_loss_coef,
        "z_loss": cfg.z_loss_coef,
        "importance": cfg.importance_loss_coef,
        "load": cfg.load_loss_coef,
        "dynamic": cfg.dynamic_loss_coef,
        "seq_balance": cfg.seq_aux_coef,
    }


def _lb_pooled(probs, index, mask, valid, rows):
    return losses.load_balancing_loss(probs, index, mask, valid)


def _lb_per_part(probs, index, mask, valid, rows):
    """Mean over ``rows`` equal parts of the tokens (groups or sequences) of each part's loss; parts without a
    real token count nowhere."""
    part = lambda a: a.reshape((rows, 1, -1) + a.shape[2:])  # [G, S, ...] -> [R, 1, G*S/R, ...]
    per = jax.vmap(losses.load_balancing_loss)(part(probs), part(index), part(mask), part(valid))  # [R]
    real = jnp.any(part(mask), axis=(1, 2)).astype(jnp.float32)
    return jnp.sum(per * real) / jnp.maximum(jnp.sum(real), 1.0)


def _lb_global(probs, index, mask, valid, rows):
    parts = losses.load_balancing_parts(probs, index, mask, valid)
    try:  # under pmap: pool over the devices of the data-parallel axis
        parts = jax.lax.psum(parts, parallel.PMAP_AXIS)
    except NameError:  # no such axis bound: the batch is already global
        pass
    return losses.pooled_load_balancing([parts])


#: lb_scope -> ``fn(router_probs [G, S, E], expert_index [G, S, K], mask [G, S], valid [G, S, K], rows)``,
#: the layer's load-balancing loss (``rows``: groups for 'group', sequences for 'sequence'). For 'layers' the
#: layer's own pooled value is reported, and ``Transformer`` pools across layers.
LB_SCOPES = {
    "batch": _lb_pooled,
    "group": lambda p, i, m, v, rows: _lb_per_part(p, i, m, v, p.shape[0]),
    "sequence": _lb_per_part,
    "layers": _lb_pooled,
    "global": _lb_global,
}


def routing_stats(cfg: MoEConfig, decision: routing.RoutingDecision, kept: Array, mask: Array,
                  capacity: Optional[int], num_sequences: Optional[int] = None) -> MoEStats:
    """Aux losses and metrics of one routing decision (pure; shapes in ``MoEStats``).

    ``num_sequences``: B, for ``lb_scope='sequence'`` (default: one sequence per group)."""
    e = cfg.num_experts
    m = mask.astype(jnp.float32)  # [G, S]
    n_tokens = jnp.maximum(jnp.sum(m), 1.0)
    group_size = mask.shape[1]
    balance = None
    terms = {"z_loss": losses.router_z_loss(decision.router_logits, mask)}
    extra_metrics = {}
    if decision.kind == "token_choice":
        terms["load_balancing"] = LB_SCOPES[cfg.lb_scope](decision.router_probs, decision.expert_index, mask,
                                                          decision.valid, num_sequences or mask.shape[0])
        if cfg.lb_scope == "layers":
            balance = losses.load_balancing_parts(decision.router_probs, decision.expert_index, mask,
                                                  decision.valid)
        assigned = decision.valid.astype(jnp.float32) * m[..., None]  # [G, S, K]
        per_expert = jnp.sum(jax.nn.one_hot(decision.expert_index, e) * assigned[..., None], axis=(0, 1, 2))
        n_assigned = jnp.maximum(jnp.sum(assigned), 1.0)
        n_kept = jnp.sum(kept.astype(jnp.float32) * m[..., None])
        drop_fraction = (jnp.sum(assigned) - n_kept) / n_assigned  # 0 (not 1) when nothing was assigned
        kept_per_expert = jnp.sum(jax.nn.one_hot(decision.expert_index, e)
                                  * (kept.astype(jnp.float32) * m[..., None])[..., None], axis=(0, 1, 2))  # [E]
        expert_drop = (per_expert - kept_per_expert) / jnp.maximum(per_expert, 1.0)  # 0 for an idle expert
        experts_per_token = n_kept / n_tokens
        n_per_token = jnp.sum(kept.astype(jnp.int32), axis=-1)  # [G, S] kept experts of each token
        hist = jnp.sum(jax.nn.one_hot(n_per_token, kept.shape[-1] + 1) * m[..., None], axis=(0, 1))  # [K+1]
        extra_metrics["experts_per_token_hist"] = hist / n_tokens
    elif decision.kind == "soft":  # Soft MoE: every real token feeds every slot; nothing is dropped
        per_expert = jnp.sum(decision.router_probs * m[..., None], axis=(0, 1))  # combine mass per expert
        n_assigned = jnp.maximum(jnp.sum(per_expert), 1e-20)
        drop_fraction = jnp.zeros((), jnp.float32)
        expert_drop = jnp.zeros((e,), jnp.float32)
        experts_per_token = jnp.asarray(float(e), jnp.float32)
        slots = decision.combine_weights.shape[-1]
        extra_metrics["capacity_factor"] = jnp.asarray(slots * e / group_size, jnp.float32)
    else:  # expert choice: [G, E, C]; a token is dropped if no expert took it
        per_expert = jnp.sum(kept.astype(jnp.float32), axis=(0, 2))
        n_assigned = jnp.maximum(jnp.sum(per_expert), 1.0)
        g = mask.shape[0]
        taken = jnp.zeros(mask.shape, jnp.float32).at[
            jnp.arange(g)[:, None, None], decision.token_index].max(kept.astype(jnp.float32))
        drop_fraction = (jnp.sum(m) - jnp.sum(taken * m)) / n_tokens  # 0 (not 1) for an all-padding batch
        expert_drop = jnp.zeros((e,), jnp.float32)  # an expert takes its C tokens; only tokens go untaken
        experts_per_token = jnp.sum(kept.astype(jnp.float32)) / n_tokens
    terms.update(decision.aux_losses)
    load = per_expert / n_assigned  # [E]
    if capacity is not None:
        actual_cf = jnp.asarray(capacity * e / (cfg.k * group_size), jnp.float32)
    else:
        actual_cf = e * jnp.max(load)
    probs = decision.router_probs
    entropy = -jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-30)), axis=-1)  # [G, S]
    metrics = {
        "drop_fraction": drop_fraction,
        "expert_drop_fraction": expert_drop,
        "capacity_factor": actual_cf,
        "expert_load": load,
        "max_vio": e * jnp.max(load) - 1.0,
        "router_entropy": jnp.sum(entropy * m) / n_tokens,
        "top1_prob": jnp.sum(jnp.max(probs, axis=-1) * m) / n_tokens,
        "experts_per_token": experts_per_token,
    }
    metrics.update(extra_metrics)
    coefs = _loss_coefs(cfg)
    unknown = sorted(set(terms) - set(coefs))
    if unknown:
        raise ValueError(f"router {cfg.router!r} returned aux loss(es) {unknown} with no weight in moe._loss_coefs; "
                         "add a coefficient field to MoEConfig and an entry in _loss_coefs.")
    pooled_elsewhere = {"load_balancing"} if balance is not None else set()  # Transformer pools it
    aux = sum(coefs[name] * value for name, value in terms.items() if name not in pooled_elsewhere)
    return MoEStats(aux_loss=jnp.asarray(aux, jnp.float32), losses=terms, metrics=metrics, balance=balance)


class MoELayer(nn.Module):
    """``(x[B, L, D], mask[B, L]) -> (y[B, L, D], MoEStats)``.

    Attributes:
      config: ``MoEConfig``.
      causal: the layer sits in a causal model (validation refuses non-causal routing unless opted in).
      dtype: compute dtype of the experts (the router is always float32); params are float32.
    Call arguments: ``mask`` (1 = real token; padding is routed nowhere and counts in no statistic),
    ``train`` (capacity factor, jitter, noise), ``token_ids [B, L]`` (hash routing), ``return_routing`` (put
    the decisions in ``MoEStats.routing``), ``replay [B, L, K]`` int (routing replay: use these experts instead
    of the router's choice; the combine weights are recomputed from the router at those experts, so the router
    still gets its gradient: ``routing.Router.replay``).
    """

    config: MoEConfig
    causal: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Optional[Array] = None, *, train: bool = False,
                 token_ids: Optional[Array] = None, return_routing: bool = False, replay: Optional[Array] = None):
        cfg = self.config.validate(self.causal)
        if x.ndim != 3:
            raise ValueError(f"MoELayer expects x of shape [B, L, D], got {x.shape}.")
        b, l, d = x.shape
        s = cfg.resolved_group_size(l)
        t = b * l
        if self.causal and not cfg.allow_non_causal and l % s:
            raise ValueError(
                f"moe.group_size={s} does not divide the sequence length L={l}: groups would span sequences, and in a "
                "causal model a sequence's later tokens could then take expert slots before another sequence's "
                "earlier ones (a leak across the batch). Choose a group size that divides L (or None = L), or set "
                "moe.allow_non_causal=True.")
        if t % s:
            raise ValueError(f"moe.group_size={s} does not divide the B*L={b}*{l}={t} tokens of the batch; choose "
                             "a group size that divides B*L (e.g. the sequence length, or None).")
        g = t // s
        if mask is None:
            mask = jnp.ones((b, l), bool)
        elif mask.shape != (b, l):
            raise ValueError(f"MoELayer: mask shape {mask.shape} != (B, L) = {(b, l)}.")
        xg = x.reshape(g, s, d)  # [G, S, D]
        mg = mask.reshape(g, s).astype(bool)  # [G, S]
        # A token with a NaN/Inf feature is routed nowhere and counts in no statistic (it would poison its whole
        # group: einsum dispatch multiplies it by zeros); its output row is NaN, so the loss still shows it.
        finite = jnp.all(jnp.isfinite(xg), axis=-1)  # [G, S]
        nonfinite = jnp.sum(mg & ~finite).astype(jnp.float32)
        mg = mg & finite
        xg = jnp.where(finite[..., None], xg, jnp.zeros((), xg.dtype))
        tg = None if token_ids is None else token_ids.reshape(g, s)
        dispatcher = cfg.resolved_dispatcher()
        router_cls = routing.get_router_class(cfg.router)
        if dispatcher == "dropless":
            capacity = None
        else:
            # Expert choice keeps its training capacity at eval: for it C is not a drop limit but the number of
            # tokens each expert computes, and changing it changes the function.
            keep_train_cf = train or router_cls.kind == "expert_choice"
            cf = cfg.capacity_factor if keep_train_cf else cfg.eval_capacity_factor
            capacity = compute_capacity(s, cfg.num_experts, cfg.k, cf, cfg.capacity_multiple, cfg.min_capacity)
        router = router_cls(cfg, name="router")
        decision = router(xg, mg, capacity=capacity, train=train, token_ids=tg)
        if replay is not None:
            if replay.shape != (b, l, cfg.k):
                raise ValueError(f"MoELayer: replay shape {replay.shape} != (B, L, K) = {(b, l, cfg.k)}.")
            decision = router_cls.replay(cfg, decision, replay.reshape(g, s, cfg.k).astype(jnp.int32))
        experts = BatchedExperts(cfg.num_experts, d, cfg.expert_hidden, cfg.activation, cfg.glu,
                                 dtype=self.dtype, name="experts")
        mesh = parallel.context_mesh()  # set by `with jax.set_mesh(mesh)`; see parallel.py
        impl = cfg.resolved_dropless_impl(sharded=mesh is not None, dtype=self.dtype)
        if mesh is None:
            result = dispatch_lib.get_dispatcher(dispatcher)(
                xg.astype(self.dtype), decision, experts, capacity, slot_order=cfg.slot_order,
                block_size=cfg.dropless_block_size, impl=impl,
                filled_only=cfg.resolved_capacity_compute() == "filled")
        else:
            parallel.check_layer_divisibility(mesh, cfg.num_experts, g, (b, l), s)
            result = parallel.run_expert_parallel(
                xg.astype(self.dtype), decision, experts, capacity, dispatcher=dispatcher, mesh=mesh,
                slot_order=cfg.slot_order, block_size=cfg.dropless_block_size, impl=impl)
        y = result.y
        if cfg.num_shared_experts > 0:
            width = cfg.num_shared_experts * (cfg.shared_expert_hidden or cfg.expert_hidden)
            # n shared experts of width F are exactly one FFN of width n*F (the hidden units just concatenate).
            shared = DenseFFN(width, cfg.activation, cfg.glu, dtype=self.dtype, name="shared")(xg)  # [G, S, D]
            if cfg.shared_expert_gate:
                gate = nn.Dense(1, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                                kernel_init=nn.initializers.normal(stddev=cfg.router_init_std), name="shared_gate")
                shared = jax.nn.sigmoid(gate(xg).astype(jnp.float32)).astype(shared.dtype) * shared
            y = y + shared
        stats = routing_stats(cfg, decision, result.kept, mg, capacity, num_sequences=b)
        stats.metrics["nonfinite_tokens"] = nonfinite
        y = jnp.where(finite[..., None], y, jnp.asarray(jnp.nan, y.dtype))
        if return_routing and decision.kind == "token_choice":
            stats = stats.replace(routing={"expert_index": decision.expert_index.reshape(b, l, -1),
                                           "weights": decision.combine_weights.reshape(b, l, -1)})
        return y.reshape(b, l, d).astype(x.dtype), stats  # [B, L, D]
