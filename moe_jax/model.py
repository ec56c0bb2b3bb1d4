"""Decoder-only Transformer language model whose blocks use a dense FFN or an MoE layer.

Axes (see ``moe_jax.moe``): ``B`` batch, ``L`` sequence length, ``D`` model width, ``H`` heads,
``Dh`` head width (``D / H`` unless ``head_dim`` is set), ``Hkv`` key/value heads (grouped-query attention;
``Hkv = H`` by default), ``F`` FFN width, ``V`` vocabulary.

Architecture (pre-norm, as GPT-2/T5/LLaMA)::

    h_0 = Embed(tokens)                                    # [B, L, D]
    for block i:  h = h + Attn(RMSNorm(h))                  # causal MHA/GQA, rotary positions (Su et al. 2021)
                  h = h + FFN_i(RMSNorm(h))                 # DenseFFN or MoELayer, per the layout
    logits = RMSNorm(h) @ W_out  (W_out = Embed^T if tied) # [B, L, V], float32

Layout: block ``i`` (0-based) is an MoE block iff ``moe_every > 0``, ``i >= first_dense`` and
``(i + 1) % moe_every == 0`` (``moe_every=1``: every block; ``2``: blocks 1, 3, 5, ... as in Switch/GShard).

Precision: parameters are always float32; ``dtype='bfloat16'`` runs the matmuls and the residual
sub-layers in bfloat16 while the residual stream, the attention softmax, the norms' statistics, the router
(inside ``MoELayer``) and the logits stay float32.

Non-gradient state: a router may keep variables in the ``'moe_state'`` collection (DeepSeek's balancing
bias) and update them itself when applied with ``train=True`` and ``mutable=['moe_state']``; the model only
passes that collection through (``moe_jax.train`` carries it in the train state).

Example::

    cfg = ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4, d_ff=256, moe_every=2,
                      moe=MoEConfig(num_experts=4, k=1, router="switch", expert_hidden=128))
    model = Transformer(cfg)
    variables = model.init({"params": key}, tokens, train=False)     # tokens: [B, L] int
    logits, aux = model.apply(variables, tokens, train=True, rngs={"router": key})
    loss = cross_entropy(logits, targets) + aux["aux_loss"]
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.experts import ACTIVATIONS, DenseFFN, on_rows
from moe_jax import losses
from moe_jax.moe import MoEConfig, MoELayer

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MOE_STATE = "moe_state"  # variable collection of non-gradient router state
QK_NORMS = ("none", "head", "all")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the Transformer. Build it from ``config.model`` with ``ModelConfig.from_config``.

    Attributes:
      vocab_size: V (from the tokenizer, not from the config file).
      d_model, num_layers, num_heads, d_ff: D, number of blocks, H, dense FFN width F.
      activation, glu: of the dense FFN ('gelu' | 'relu' | 'silu'; glu + silu = SwiGLU).
      tie_embeddings: the output projection is the transposed input embedding.
      dtype: compute dtype name, 'float32' or 'bfloat16' (params stay float32).
      moe_every, first_dense: the layout (module docstring). moe: the MoE layers' config (None if dense).
      rope_base: rotary base frequency (transformers' ``rope_theta``). norm_eps: RMSNorm epsilon (of every
        norm, the q/k norms included).
      num_kv_heads: Hkv, key/value heads of grouped-query attention (Ainslie et al. 2023): query head ``h``
        reads key/value head ``h // (H / Hkv)``. None or 0 = H (multi-head attention).
      head_dim: Dh; None or 0 = D / H.
      qkv_bias: biases on the query, key and value projections (Qwen2). out_bias: a bias on the output
        projection (with qkv_bias: transformers' ``attention_bias``, OLMoE/Qwen3).
      qk_norm: RMSNorm on queries and keys before the rotation: 'none', 'head' (over each head's Dh
        features, one scale ``[Dh]`` shared by the heads: Qwen3) or 'all' (over all of a token's query
        (key) features, a scale ``[H, Dh]`` (``[Hkv, Dh]``): OLMoE).
      dropout: residual dropout rate on the attention and FFN outputs (training only; rng stream
        ``'dropout'``). On a 5 MB corpus several epochs overfit, and the larger (MoE) models more so.
    """

    vocab_size: int
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    d_ff: int = 512
    activation: str = "gelu"
    glu: bool = False
    tie_embeddings: bool = True
    dtype: str = "float32"
    moe_every: int = 0
    first_dense: int = 0
    moe: Optional[MoEConfig] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    dropout: float = 0.0
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: str = "none"

    @classmethod
    def from_config(cls, model_cfg, vocab_size: int) -> "ModelConfig":
        """From the ``config.model`` ConfigDict (or a plain dict) and the tokenizer's vocabulary size."""
        d = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
        moe = d.pop("moe", None)
        names = {f.name for f in dataclasses.fields(cls)} - {"vocab_size", "moe"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"model: unknown field(s) {unknown}; known fields: {sorted(names | {'moe'})}.")
        moe_cfg = None
        if d.get("moe_every", 0) and moe is not None:
            moe_cfg = moe if isinstance(moe, MoEConfig) else MoEConfig.from_dict(moe)
        return cls(vocab_size=vocab_size, moe=moe_cfg, **d)

    @property
    def resolved_head_dim(self) -> int:
        """Dh: ``head_dim`` or ``D / H``."""
        return self.head_dim or self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Hkv: ``num_kv_heads`` or H."""
        return self.num_kv_heads or self.num_heads

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    def is_moe_block(self, i: int) -> bool:
        return self.moe_every > 0 and i >= self.first_dense and (i + 1) % self.moe_every == 0

    @property
    def moe_blocks(self) -> Tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_moe_block(i))

    def validate(self) -> "ModelConfig":
        """Raise ``ValueError`` naming the field (``model.<name>``) and the fix."""
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}.")
        for name in ("num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"model.{name} must be a positive integer, or None/0 for the default, got {value!r}.")
        if not self.head_dim and self.d_model % self.num_heads:
            raise ValueError(f"model.num_heads={self.num_heads} does not divide model.d_model={self.d_model}; "
                             "choose num_heads among the divisors of d_model (head width = d_model / num_heads), "
                             "or set model.head_dim.")
        if self.resolved_head_dim % 2:
            raise ValueError(f"model head width {self.resolved_head_dim} (model.head_dim, or d_model / num_heads) is "
                             "odd, but rotary positions rotate pairs of features: choose an even head width.")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"model.num_kv_heads={self.num_kv_heads} does not divide "
                             f"model.num_heads={self.num_heads}; "
                             "each key/value head serves num_heads / num_kv_heads query heads.")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"model.qk_norm: unknown {self.qk_norm!r}; choose one of {list(QK_NORMS)}.")
        if not self.norm_eps > 0:
            raise ValueError(f"model.norm_eps must be > 0, got {self.norm_eps!r}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation: unknown {self.activation!r}; choose one of {sorted(ACTIVATIONS)}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype: unknown {self.dtype!r}; choose one of {sorted(DTYPES)} "
                             "(params are float32 either way; this is the compute dtype).")
        if not isinstance(self.moe_every, int) or self.moe_every < 0:
            raise ValueError(f"model.moe_every must be an integer >= 0 (0 = all dense), got {self.moe_every!r}.")
        if not isinstance(self.first_dense, int) or not 0 <= self.first_dense <= self.num_layers:
            raise ValueError(f"model.first_dense must be between 0 and model.num_layers={self.num_layers}, "
                             f"got {self.first_dense!r}.")
        if self.moe_every > 0:
            if self.moe is None:
                raise ValueError("model.moe_every > 0 but model.moe is missing: give the MoE layers' config "
                                 "(fields of moe_jax.moe.MoEConfig) or set model.moe_every=0 for a dense model.")
            if not self.moe_blocks:
                raise ValueError(f"model.moe_every={self.moe_every} with model.num_layers={self.num_layers} and "
                                 f"model.first_dense={self.first_dense} places no MoE block; lower moe_every or "
                                 "first_dense, or set moe_every=0 for a dense model.")
            try:
                self.moe.validate(causal=True)
            except ValueError as e:
                raise ValueError(f"model.moe: {e}") from e
        if not self.rope_base > 0:
            raise ValueError(f"model.rope_base must be > 0, got {self.rope_base!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout!r}.")
        return self


def rotary(x: Array, base: float = 10000.0, positions: Optional[Array] = None) -> Array:
    """Rotary position embedding (Su et al. 2021, eq. 34) of ``x[B, L, H, Dh]`` at positions ``0..L-1``, or at
    ``positions[B, L]`` (int; per-row positions of cached decoding).

    Feature pairs ``(x_i, x_{i + Dh/2})`` (the "rotate half" layout of GPT-NeoX/LLaMA) are rotated by the
    angle ``pos * base^(-2i/Dh)``. Computed in float32, returned in ``x.dtype``.
    """
    _, l, _, dh = x.shape
    half = dh // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / dh)  # [Dh/2]
    pos = jnp.arange(l, dtype=jnp.float32)[None, :] if positions is None else positions.astype(jnp.float32)
    angle = pos[..., None] * inv_freq  # [B or 1, L, Dh/2]
    cos = jnp.cos(angle)[:, :, None, :]  # [B or 1, L, 1, Dh/2]
    sin = jnp.sin(angle)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def write_kv(cache: Tuple[Array, Array], k: Array, v: Array, start: Array) -> Tuple[Array, Array]:
    """Key/value cache ``(k[B, M, Hkv, Dh], v[B, M, Hkv, Dh])`` with ``k, v [B, L, Hkv, Dh]`` written at slots
    ``start[b] .. start[b] + L - 1`` of row ``b`` (slot = position)."""
    put = jax.vmap(lambda buf, new, s: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (s, 0, 0)))
    return put(cache[0], k, start), put(cache[1], v, start)


def _dense_init():
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class CausalSelfAttention(nn.Module):
    """``x[B, L, D] -> [B, L, D]``: multi-head (or grouped-query) attention, causal mask, rotary q/k.

    Params: ``query`` kernel ``[D, H, Dh]``, ``key`` and ``value`` kernels ``[D, Hkv, Dh]``, ``out`` kernel
    ``[H, Dh, D]``; with ``qkv_bias`` a ``bias`` ``[H, Dh]`` (``[Hkv, Dh]``) on each of the first three, with
    ``out_bias`` a ``bias`` ``[D]`` on ``out``; with ``qk_norm`` ``q_norm/scale`` and ``k_norm/scale``
    (``ModelConfig``). By default (``Hkv = H``, ``Dh = D / H``, no bias, no norm): ``4 * D * D`` params.
    Query head ``h`` attends with key/value head ``h // (H / Hkv)``. Scores and softmax in float32.
    """

    num_heads: int
    rope_base: float = 10000.0
    dtype: Any = jnp.float32
    num_kv_heads: Optional[int] = None  # None = num_heads
    head_dim: Optional[int] = None  # None = D / H
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: str = "none"
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: Array, positions: Optional[Array] = None, kv: Optional[Tuple[Array, Array]] = None):
        """``kv``: a key/value cache ``(k, v)`` ``[B, M, Hkv, Dh]`` (``moe_jax.decode``); then ``positions[B, L]``
        (contiguous per row) are where ``x`` sits, its keys and values are written there, queries attend to the
        slots ``<=`` their position, and the result is ``(y, kv)``."""
        b, l, d = x.shape
        h = self.num_heads
        hkv = self.num_kv_heads or h
        dh = self.head_dim or d // h
        proj = lambda name, heads: nn.DenseGeneral((heads, dh), use_bias=self.qkv_bias, dtype=self.dtype,
                                                   param_dtype=jnp.float32, kernel_init=_dense_init(), name=name)
        q = on_rows(proj("query", h), x)  # [B, L, H, Dh]
        k = on_rows(proj("key", hkv), x)  # [B, L, Hkv, Dh]
        v = on_rows(proj("value", hkv), x)  # [B, L, Hkv, Dh]
        if self.qk_norm != "none":
            axes = (-1,) if self.qk_norm == "head" else (-2, -1)
            norm = lambda name: nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype, param_dtype=jnp.float32,
                                           reduction_axes=axes, feature_axes=axes, name=name)
            q, k = norm("q_norm")(q), norm("k_norm")(k)
        q, k = rotary(q, self.rope_base, positions), rotary(k, self.rope_base, positions)
        if kv is None:
            causal = jnp.tril(jnp.ones((l, l), bool))[None]  # [1, L(q), L(k)]
        else:  # cached: keys are the M cache slots; slot j is visible from position p iff j <= p
            kv = k, v = write_kv(kv, k, v, positions[:, 0])  # [B, M, Hkv, Dh]
            causal = jnp.arange(k.shape[1])[None, None, :] <= positions[:, :, None]  # [B, L, M]
        # Each key/value head serves H / Hkv consecutive query heads (transformers' repeat_kv); no-op for MHA.
        k = jnp.repeat(k, h // hkv, axis=2)  # [B, Lk, H, Dh]
        v = jnp.repeat(v, h // hkv, axis=2)  # [B, Lk, H, Dh]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(dh)
        scores = jnp.where(causal[:, None], scores, jnp.finfo(jnp.float32).min)  # [B, H, L, Lk]
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, L, H, Dh]
        out_proj = nn.DenseGeneral(d, axis=(-2, -1), use_bias=self.out_bias, dtype=self.dtype,
                                   param_dtype=jnp.float32, kernel_init=_dense_init(), name="out")
        y = on_rows(out_proj, out, feature_dims=2)  # [B, L, D]
        return y if kv is None else (y, kv)


class Block(nn.Module):
    """Pre-norm block: ``h + Attn(norm(h))``, then ``h + FFN(norm(h))`` with a dense or MoE FFN.

    ``__call__(h[B, L, D], token_ids[B, L], train, return_routing, replay) -> (h[B, L, D], MoEStats or None)``
    (``return_routing`` and ``replay [B, L, K]``: ``MoELayer``'s); with a key/value cache ``kv`` (and
    ``positions``, see ``CausalSelfAttention``) ``-> (h, stats, kv)``.
    """

    config: ModelConfig
    use_moe: bool

    @nn.compact
    def __call__(self, h: Array, token_ids: Array, train: bool, return_routing: bool = False,
                 replay: Optional[Array] = None, positions: Optional[Array] = None,
                 kv: Optional[Tuple[Array, Array]] = None):
        cfg = self.config
        dtype = cfg.compute_dtype
        norm = lambda name: nn.RMSNorm(epsilon=cfg.norm_eps, dtype=dtype, param_dtype=jnp.float32, name=name)
        drop = lambda y: nn.Dropout(cfg.dropout, deterministic=not train)(y) if cfg.dropout > 0 else y
        attn = CausalSelfAttention(cfg.num_heads, cfg.rope_base, dtype, num_kv_heads=cfg.kv_heads,
                                   head_dim=cfg.resolved_head_dim, qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias,
                                   qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, name="attn")
        a = attn(norm("attn_norm")(h), positions, kv)
        if kv is not None:
            a, kv = a
        h = h + drop(a.astype(jnp.float32))
        x = norm("ffn_norm")(h)
        if self.use_moe:
            y, stats = MoELayer(cfg.moe, causal=True, dtype=dtype, name="moe")(
                x, train=train, token_ids=token_ids, return_routing=return_routing, replay=replay)
        else:
            y, stats = DenseFFN(cfg.d_ff, cfg.activation, cfg.glu, dtype=dtype, name="ffn")(x), None
        h = h + drop(y.astype(jnp.float32))
        return (h, stats) if kv is None else (h, stats, kv)


class Transformer(nn.Module):
    """``tokens[B, L] int -> (logits[B, L, V] float32, aux)``.

    ``aux``: ``aux_loss`` (scalar float32: sum of the MoE layers' weighted aux losses; 0 for a dense model),
    ``losses`` and ``metrics`` (dicts of the MoE layers' unweighted losses and metrics stacked on a leading
    ``[num_moe_layers]`` axis, e.g. ``metrics['expert_load']: [n, E]``; empty for a dense model). Layer
    ``j`` of those stacks is block ``config.moe_blocks[j]``. With ``moe.lb_scope='layers'``, ``aux_loss``
    holds ``lb_loss_coef`` times the load-balancing loss pooled over all MoE layers (transformers' causal LMs),
    also reported as ``aux['pooled_load_balancing']``; ``losses['load_balancing']`` stays per layer.

    Routing replay: ``return_routing=True`` adds ``aux['routing']`` (``expert_index`` and ``weights``
    ``[n, B, L, K]``, token-choice routers); ``replay=aux['routing']['expert_index']`` (``[n, B, L, K]`` int)
    runs a forward pass with those experts (``MoELayer``).

    Cached decoding (``moe_jax.decode``): ``__call__(tokens, positions=positions[B, L], cache=cache)`` with
    ``cache`` a tuple of one ``(k, v)`` ``[B, M, Hkv, Dh]`` per block returns ``(logits, aux, cache)``.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config.validate()
        self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.float32, param_dtype=jnp.float32,
                              embedding_init=nn.initializers.normal(stddev=0.02))
        self.blocks = [Block(cfg, cfg.is_moe_block(i), name=f"block_{i}") for i in range(cfg.num_layers)]
        self.final_norm = nn.RMSNorm(epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=jnp.float32)
        if not cfg.tie_embeddings:
            self.unembed = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                                    param_dtype=jnp.float32, kernel_init=nn.initializers.normal(stddev=0.02))

    def __call__(self, tokens: Array, *, train: bool = False, return_routing: bool = False,
                 replay: Optional[Array] = None, positions: Optional[Array] = None,
                 cache: Optional[Tuple[Tuple[Array, Array], ...]] = None):
        if tokens.ndim != 2:
            raise ValueError(f"Transformer expects tokens of shape [B, L], got {tokens.shape}.")
        cfg = self.config
        n_moe = len(cfg.moe_blocks)
        if replay is not None and (replay.ndim != 4 or replay.shape[0] != n_moe):
            raise ValueError(f"Transformer: replay must be [num_moe_layers={n_moe}, B, L, K], got {replay.shape}.")
        h = self.embed(tokens)  # [B, L, D] float32
        all_stats, new_cache = [], []
        for i, block in enumerate(self.blocks):
            layer_replay = None if replay is None or not block.use_moe else replay[len(all_stats)]
            if cache is None:
                h, stats = block(h, tokens, train, return_routing, layer_replay)
            else:
                h, stats, kv = block(h, tokens, train, return_routing, layer_replay, positions, cache[i])
                new_cache.append(kv)
            if stats is not None:
                all_stats.append(stats)
        h = self.final_norm(h)  # [B, L, D]
        if cfg.tie_embeddings:
            emb = self.embed.embedding.astype(cfg.compute_dtype)
            logits = on_rows(lambda rows: jnp.einsum("nd,vd->nv", rows, emb), h.astype(cfg.compute_dtype))
        else:
            logits = on_rows(self.unembed, h.astype(cfg.compute_dtype))
        logits = logits.astype(jnp.float32)  # [B, L, V]
        aux = stack_moe_stats(all_stats, cfg.moe.lb_loss_coef if cfg.moe is not None else 0.0)
        if cache is not None:
            return logits, aux, tuple(new_cache)
        return logits, aux


def stack_moe_stats(all_stats, coef: float = 0.0) -> Dict[str, Any]:
    """Sum the layers' aux losses and stack their losses/metrics on a leading ``[num_moe_layers]`` axis.

    ``coef``: weight of the load-balancing loss pooled across layers (``lb_scope='layers'``)."""
    if not all_stats:
        return {"aux_loss": jnp.zeros((), jnp.float32), "losses": {}, "metrics": {}}
    stack = lambda *xs: jnp.stack([jnp.asarray(x, jnp.float32) for x in xs])
    out = {
        "aux_loss": sum(s.aux_loss for s in all_stats).astype(jnp.float32),
        "losses": jax.tree.map(stack, *[s.losses for s in all_stats]),
        "metrics": jax.tree.map(stack, *[s.metrics for s in all_stats]),
    }
    if all_stats[0].balance is not None:  # moe.lb_scope == 'layers': pooled across the MoE layers
        pooled = losses.pooled_load_balancing([s.balance for s in all_stats])
        out["pooled_load_balancing"] = pooled
        out["aux_loss"] = out["aux_loss"] + coef * pooled
    if all_stats[0].routing is not None:
        out["routing"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[s.routing for s in all_stats])
    return out


def init_variables(model: Transformer, rng: Array, seq_len: int, batch_size: int = 1) -> Dict[str, Any]:
    """``{'params': ..., ['moe_state': ...]}`` of a freshly initialised model (other collections dropped)."""
    params_rng, router_rng = jax.random.split(rng)
    tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
    variables = model.init({"params": params_rng, "router": router_rng}, tokens, train=False)
    return {k: v for k, v in variables.items() if k in ("params", MOE_STATE)}
