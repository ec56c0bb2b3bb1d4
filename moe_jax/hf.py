"""Whole causal LMs between HuggingFace ``transformers`` (PyTorch, CPU) and ``moe_jax.Transformer``.

Needs the ``interop`` extra (torch, transformers >= 5). torch is imported lazily.

    cfg, variables = from_hf(hf_model)                 # a transformers *ForCausalLM -> ModelConfig, variables
    logits, aux = Transformer(cfg).apply(variables, tokens)  # == hf_model(tokens).logits
    hf_model = to_hf(cfg, variables)                   # and back (family from the config, or family=...)
    save_hf(cfg, variables, "out_dir")                 # transformers.AutoModelForCausalLM.from_pretrained loads it
    cfg, variables = from_hf_dir("out_dir")            # strict: a missing, extra or misshapen weight is refused

Families (``FAMILIES``, by transformers' ``model_type``) and what they map to:

==========  ==============================================================================================
mixtral     router 'mixtral' (softmax, top-k, renormalized); no attention biases; every block MoE
qwen2_moe   router 'top_k' (``renormalize_top_k = norm_topk_prob``); q/k/v biases (``qkv_bias``); one shared
            expert of width ``shared_expert_intermediate_size`` with its sigmoid gate
            (``moe.shared_expert_gate``); dense blocks from ``decoder_sparse_step`` / ``mlp_only_layers``
qwen3_moe   router 'top_k'; q/k RMSNorm per head (``qk_norm='head'``); ``attention_bias`` = q/k/v and output
            biases; ``head_dim``; dense blocks as qwen2_moe
olmoe       router 'top_k'; q/k RMSNorm over all heads (``qk_norm='all'``); ``attention_bias`` as qwen3_moe
==========  ==============================================================================================

Common to all: grouped-query attention (``num_key_value_heads`` -> ``model.num_kv_heads``), RoPE base
(``rope_parameters['rope_theta']`` -> ``model.rope_base``, default RoPE only), ``rms_norm_eps`` ->
``model.norm_eps``, ``tie_word_embeddings`` -> ``model.tie_embeddings``, SwiGLU experts and dense FFNs
(``hidden_act='silu'``), dropless experts (``moe.dispatcher='dropless'``).

Weight layouts (torch ``Linear.weight`` is ``[out, in]``; ``D`` width, ``H``/``Hkv`` heads, ``Dh`` head
width, ``E`` experts, ``F`` expert width): ``q_proj.weight [H*Dh, D]`` <-> ``attn/query/kernel [D, H, Dh]``
(k, v with Hkv), ``o_proj.weight [D, H*Dh]`` <-> ``attn/out/kernel [H, Dh, D]``, ``mlp.gate.weight [E, D]``
<-> ``moe/router/gate/kernel [D, E]``, ``experts.gate_up_proj [E, 2F, D]`` (rows ``:F`` gate) <->
``moe/experts/wg``, ``wi [E, D, F]``, ``experts.down_proj [E, D, F]`` <-> ``wo [E, F, D]``, norms'
``weight`` <-> ``scale``. Every conversion is a transpose or reshape: a round trip is bit-exact.

Training loss (the ``Done`` criterion of transformers' ``*ForCausalLM(labels=...)``): transformers adds
``router_aux_loss_coef * load_balancing_loss_func(...)`` only when ``output_router_logits`` is set; its loss
pools ``f`` and ``P`` over all MoE layers and does not divide ``f`` by K, so it is K times moe_jax's
(``losses.pooled_load_balancing``). Import therefore sets ``moe.lb_scope='layers'``,
``moe.lb_loss_coef = K * router_aux_loss_coef`` (0 when ``output_router_logits`` is False) and
``moe.z_loss_coef = 0`` (no z-loss in these families); export writes the inverse. With another
``lb_scope`` or a z-loss, an exported model computes the same logits but transformers' training loss
differs (``export_notes`` says so).

Refused, each with a message naming the field: an unsupported ``model_type``, an activation other than
silu, non-default RoPE, sliding-window attention, ``clip_qkv``, attention dropout, router jitter (transformers
jitters the experts' input as well), dense layers that
``first_dense`` cannot express, and any checkpoint with a missing, extra or misshapen tensor.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from moe_jax.model import ModelConfig
from moe_jax.moe import MoEConfig

Params = Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Family:
    """How one transformers causal-LM family spells what moe_jax needs."""

    model_type: str
    experts_field: str  # number of routed experts
    expert_hidden_field: str  # F
    router: str
    norm_topk: bool  # has norm_topk_prob (else: always renormalized)
    bias: str  # 'none' | 'qkv' (qkv_bias: q, k, v) | 'attention' (attention_bias: q, k, v and o)
    qk_norm: str  # ModelConfig.qk_norm
    shared_expert: bool  # Qwen2-MoE's gated shared expert
    dense_layers: bool  # decoder_sparse_step / mlp_only_layers
    head_dim_field: bool  # the config has head_dim


FAMILIES: Dict[str, Family] = {f.model_type: f for f in (
    Family("mixtral", "num_local_experts", "intermediate_size", "mixtral", False, "none", "none", False, False, True),
    Family("qwen2_moe", "num_experts", "moe_intermediate_size", "top_k", True, "qkv", "none", True, True, False),
    Family("qwen3_moe", "num_experts", "moe_intermediate_size", "top_k", True, "attention", "head", False, True, True),
    Family("olmoe", "num_experts", "intermediate_size", "top_k", True, "attention", "all", False, False, False),
)}


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("moe_jax.hf needs PyTorch and transformers: pip install -e '.[interop]'.") from e
    return torch


def _family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"model_type={model_type!r}: unsupported architecture; moe_jax converts "
                         f"{sorted(FAMILIES)}.")
    return FAMILIES[model_type]


# -------------------------------------------------------------------------------------------- configs


def _refuse(field: str, value, why: str) -> None:
    raise ValueError(f"transformers config {field}={value!r}: {why}")


def _check_expressible(hf, fam: Family) -> None:
    """Refuse every setting of ``hf`` that moe_jax cannot compute exactly."""
    if hf.hidden_act != "silu":
        _refuse("hidden_act", hf.hidden_act, "moe_jax converts SwiGLU (silu) models only.")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type", "rope_theta"}:
        _refuse("rope_parameters", rope, "moe_jax has the default RoPE only (rope_type='default', rope_theta).")
    windowed = fam.model_type == "mixtral" or getattr(hf, "use_sliding_window", False)
    if getattr(hf, "sliding_window", None) and windowed:
        _refuse("sliding_window", hf.sliding_window, "moe_jax has no sliding-window attention; set it to None "
                "(use_sliding_window=False).")
    layer_types = getattr(hf, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        _refuse("layer_types", layer_types, "moe_jax has full causal attention in every layer only.")
    if getattr(hf, "clip_qkv", None) is not None:
        _refuse("clip_qkv", hf.clip_qkv, "moe_jax does not clip queries, keys and values; set it to None.")
    if float(getattr(hf, "router_jitter_noise", 0.0) or 0.0) != 0.0:
        _refuse("router_jitter_noise", hf.router_jitter_noise, "transformers jitters the experts' input too in "
                "training, moe_jax only the router's; set it to 0.")
    if float(getattr(hf, "attention_dropout", 0.0) or 0.0) != 0.0:
        _refuse("attention_dropout", hf.attention_dropout, "moe_jax has no attention dropout; set it to 0.")
    if fam.norm_topk and hf.num_experts_per_tok == 1 and hf.norm_topk_prob:
        _refuse("norm_topk_prob", True, "with num_experts_per_tok=1 every weight is 1 and the router gets no "
                "gradient; moe_jax refuses that (set norm_topk_prob=False).")
    if fam.qk_norm == "all" and (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads) * \
            hf.num_attention_heads != hf.hidden_size:
        _refuse("head_dim", getattr(hf, "head_dim", None), "OLMoE's q/k norms have hidden_size features: head_dim * "
                "num_attention_heads must equal hidden_size.")


def _layout(hf, fam: Family, n_layers: int) -> Tuple[int, int]:
    """``(moe_every, first_dense)`` reproducing transformers' choice of sparse layers."""
    if not fam.dense_layers:
        return 1, 0
    step = int(hf.decoder_sparse_step)
    dense = set(hf.mlp_only_layers or [])
    sparse = [i for i in range(n_layers) if i not in dense and step > 0 and (i + 1) % step == 0]
    if not sparse:
        _refuse("mlp_only_layers", hf.mlp_only_layers, "the model has no MoE layer; moe_jax.hf converts MoE models.")
    first = sparse[0]
    if sparse != [i for i in range(first, n_layers) if (i + 1) % step == 0]:
        _refuse("mlp_only_layers", hf.mlp_only_layers, f"with decoder_sparse_step={step} moe_jax can make only the "
                "first layers dense (model.first_dense); a dense layer after the first MoE layer has no moe_jax form.")
    return step, first


def model_config_from_hf(hf) -> ModelConfig:
    """The ``ModelConfig`` computing what transformers' ``hf`` config computes (module docstring)."""
    fam = _family(hf.model_type)
    _check_expressible(hf, fam)
    d, h = hf.hidden_size, hf.num_attention_heads
    dh = getattr(hf, "head_dim", None) or d // h
    k = hf.num_experts_per_tok
    moe_every, first_dense = _layout(hf, fam, hf.num_hidden_layers)
    shared = dict(num_shared_experts=1, shared_expert_hidden=hf.shared_expert_intermediate_size,
                  shared_expert_gate=True) if fam.shared_expert else {}
    lb = k * float(hf.router_aux_loss_coef) if getattr(hf, "output_router_logits", False) else 0.0
    moe = MoEConfig(num_experts=getattr(hf, fam.experts_field), k=k, router=fam.router,
                    renormalize_top_k=bool(hf.norm_topk_prob) if fam.norm_topk else True,
                    jitter_eps=0.0, dispatcher="dropless",
                    expert_hidden=getattr(hf, fam.expert_hidden_field), activation="silu", glu=True,
                    lb_loss_coef=lb, z_loss_coef=0.0, lb_scope="layers", **shared)
    biased = bool(getattr(hf, {"qkv": "qkv_bias", "attention": "attention_bias"}.get(fam.bias, "_none"), False))
    cfg = ModelConfig(vocab_size=hf.vocab_size, d_model=d, num_layers=hf.num_hidden_layers, num_heads=h,
                      d_ff=hf.intermediate_size if fam.dense_layers else moe.expert_hidden, activation="silu",
                      glu=True, tie_embeddings=bool(hf.tie_word_embeddings), moe_every=moe_every,
                      first_dense=first_dense, moe=moe, rope_base=float(hf.rope_parameters["rope_theta"]),
                      norm_eps=float(hf.rms_norm_eps), num_kv_heads=hf.num_key_value_heads,
                      head_dim=None if dh * h == d else dh, qkv_bias=biased,
                      out_bias=biased and fam.bias == "attention", qk_norm=fam.qk_norm)
    return canonical(cfg.validate())


def canonical(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with the defaults spelled one way (``num_kv_heads`` = Hkv, ``head_dim`` None when D / H), so
    that configs from transformers and from a run directory compare equal."""
    default_dh = cfg.d_model // cfg.num_heads if cfg.d_model % cfg.num_heads == 0 else None
    return dataclasses.replace(cfg, num_kv_heads=cfg.kv_heads,
                               head_dim=None if cfg.resolved_head_dim == default_dh else cfg.resolved_head_dim)


def infer_family(cfg: ModelConfig) -> str:
    """The family an exported model takes when none is named: Qwen2-MoE for a gated shared expert, Qwen3-MoE
    for per-head q/k norms, OLMoE for whole q/k norms, else Mixtral."""
    if cfg.moe is not None and cfg.moe.shared_expert_gate:
        return "qwen2_moe"
    return {"head": "qwen3_moe", "all": "olmoe"}.get(cfg.qk_norm, "mixtral")


def _need(ok: bool, field: str, value, family: str, fix: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} cannot be exported to transformers' {family}: {fix}")


def hf_config_from(cfg: ModelConfig, family: Optional[str] = None):
    """A transformers config of ``family`` (default ``infer_family``) computing what ``cfg`` computes."""
    from transformers import AutoConfig

    from moe_jax.routing import resolved_renormalize

    cfg = cfg.validate()
    family = family or infer_family(cfg)
    fam = _family(family)
    m = cfg.moe
    _need(m is not None, "model.moe_every", cfg.moe_every, family, "export MoE models (moe_every >= 1).")
    _need(m.router in ("top_k", "mixtral"), "model.moe.router", m.router, family, "use router 'top_k' or 'mixtral'.")
    _need(m.resolved_dispatcher() == "dropless", "model.moe.dispatcher", m.dispatcher, family,
          "transformers' experts never drop a token: train with dispatcher='dropless'.")
    _need(m.activation == "silu" and m.glu, "model.moe.activation", m.activation, family, "needs silu with glu=True.")
    _need(not m.jitter_eps, "model.moe.jitter_eps", m.jitter_eps, family, "transformers' jitter also scales the "
          "experts' input; set jitter_eps=0.")
    renorm = resolved_renormalize(m)
    _need(fam.norm_topk or renorm, "model.moe.renormalize_top_k", m.renormalize_top_k, family,
          "Mixtral always renormalizes the top-k weights.")
    dense = [i for i in range(cfg.num_layers) if not cfg.is_moe_block(i)]
    _need(fam.dense_layers or not dense, "model.moe_every", cfg.moe_every, family,
          f"every block is MoE in {family} (set moe_every=1, first_dense=0), or use qwen2_moe / qwen3_moe.")
    _need(not dense or (cfg.activation == "silu" and cfg.glu), "model.activation", cfg.activation, family,
          "dense blocks must be SwiGLU (activation='silu', glu=True).")
    _need(m.shared_expert_gate == fam.shared_expert and (m.num_shared_experts > 0) == fam.shared_expert,
          "model.moe.shared_expert_gate", m.shared_expert_gate, family,
          "qwen2_moe has exactly the gated shared expert (num_shared_experts >= 1, shared_expert_gate=True); the "
          "others have no shared expert.")
    _need(cfg.qk_norm == fam.qk_norm, "model.qk_norm", cfg.qk_norm, family, f"{family} has qk_norm={fam.qk_norm!r}.")
    bias_ok = {"none": not cfg.qkv_bias and not cfg.out_bias, "qkv": not cfg.out_bias,
               "attention": cfg.qkv_bias == cfg.out_bias}[fam.bias]
    _need(bias_ok, "model.qkv_bias/out_bias", (cfg.qkv_bias, cfg.out_bias), family,
          {"none": "no attention biases", "qkv": "q/k/v biases only (out_bias=False)",
           "attention": "attention_bias biases q, k, v and o together (qkv_bias == out_bias)"}[fam.bias] + ".")
    dh = cfg.resolved_head_dim
    _need(fam.head_dim_field or dh * cfg.num_heads == cfg.d_model, "model.head_dim", cfg.head_dim, family,
          "the head width must be d_model / num_heads.")
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads, hidden_act="silu",
              rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
              rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
              num_experts_per_tok=m.k, router_aux_loss_coef=m.lb_loss_coef / m.k,
              output_router_logits=m.lb_loss_coef > 0, attention_dropout=0.0)
    kw[fam.experts_field] = m.num_experts
    kw[fam.expert_hidden_field] = m.expert_hidden
    if fam.head_dim_field:
        kw["head_dim"] = dh
    if fam.norm_topk:
        kw["norm_topk_prob"] = renorm
    if fam.model_type == "mixtral":
        kw.update(sliding_window=None, router_jitter_noise=0.0)
    if fam.bias != "none":
        kw["qkv_bias" if fam.bias == "qkv" else "attention_bias"] = cfg.qkv_bias
    if fam.dense_layers:
        kw.update(decoder_sparse_step=cfg.moe_every, mlp_only_layers=list(range(cfg.first_dense)),
                  intermediate_size=cfg.d_ff, use_sliding_window=False)
    if fam.shared_expert:
        kw["shared_expert_intermediate_size"] = m.num_shared_experts * (m.shared_expert_hidden or m.expert_hidden)
    if fam.model_type == "olmoe":
        kw["clip_qkv"] = None
    return AutoConfig.for_model(fam.model_type, **kw)


def export_notes(cfg: ModelConfig) -> List[str]:
    """Where transformers' *training loss* of an export differs from moe_jax's (the logits never do)."""
    m, notes = cfg.moe, []
    if m is None:
        return notes
    if m.lb_loss_coef > 0 and m.lb_scope != "layers":
        notes.append(f"moe.lb_scope={m.lb_scope!r}: transformers pools the load-balancing loss over all layers "
                     "(lb_scope='layers'); its aux loss will differ.")
    if m.z_loss_coef > 0:
        notes.append(f"moe.z_loss_coef={m.z_loss_coef}: transformers has no router z-loss.")
    if cfg.dropout > 0:
        notes.append(f"model.dropout={cfg.dropout}: transformers' model has no residual dropout (training only).")
    return notes


# -------------------------------------------------------------------------------------------- weights


@dataclasses.dataclass(frozen=True)
class _W:
    """One transformers tensor and the moe_jax leaves it becomes."""

    key: str
    shape: Tuple[int, ...]
    paths: Tuple[Tuple[str, ...], ...]
    to_jax: Callable[[np.ndarray], Sequence[np.ndarray]]
    to_hf: Callable[[Sequence[np.ndarray]], np.ndarray]


def _linear(key, shape, path):  # torch [out, in] <-> [in, out]
    return _W(key, shape, (path,), lambda a: (a.T,), lambda xs: xs[0].T)


def _same(key, shape, path, jax_shape=None):  # identical up to a reshape
    return _W(key, shape, (path,), lambda a: (a.reshape(jax_shape or shape),), lambda xs: xs[0].reshape(shape))


def _heads_in(key, n, dh, d, path):  # [n*Dh, D] <-> [D, n, Dh]
    return _W(key, (n * dh, d), (path,), lambda a: (a.T.reshape(d, n, dh),), lambda xs: xs[0].reshape(d, n * dh).T)


def _heads_out(key, h, dh, d, path):  # [D, H*Dh] <-> [H, Dh, D]
    return _W(key, (d, h * dh), (path,), lambda a: (a.T.reshape(h, dh, d),), lambda xs: xs[0].reshape(h * dh, d).T)


def _fused_gate_up(key, e, f, d, prefix):  # [E, 2F, D] (rows :F gate) <-> wg, wi [E, D, F]
    return _W(key, (e, 2 * f, d), (prefix + ("wg",), prefix + ("wi",)),
              lambda a: (a[:, :f].transpose(0, 2, 1), a[:, f:].transpose(0, 2, 1)),
              lambda xs: np.concatenate([xs[0].transpose(0, 2, 1), xs[1].transpose(0, 2, 1)], axis=1))


def _weight_map(cfg: ModelConfig, fam: Family) -> List[_W]:
    d, h, hkv, dh, v = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.resolved_head_dim, cfg.vocab_size
    out = [_same("model.embed_tokens.weight", (v, d), ("embed", "embedding")),
           _same("model.norm.weight", (d,), ("final_norm", "scale"))]
    if not cfg.tie_embeddings:
        out.append(_linear("lm_head.weight", (v, d), ("unembed", "kernel")))
    for i in range(cfg.num_layers):
        pre, blk = f"model.layers.{i}.", f"block_{i}"
        a = pre + "self_attn."
        out += [_same(pre + "input_layernorm.weight", (d,), (blk, "attn_norm", "scale")),
                _same(pre + "post_attention_layernorm.weight", (d,), (blk, "ffn_norm", "scale"))]
        for name, proj, n in (("query", "q_proj", h), ("key", "k_proj", hkv), ("value", "v_proj", hkv)):
            out.append(_heads_in(a + proj + ".weight", n, dh, d, (blk, "attn", name, "kernel")))
            if cfg.qkv_bias:
                out.append(_same(a + proj + ".bias", (n * dh,), (blk, "attn", name, "bias"), (n, dh)))
        out.append(_heads_out(a + "o_proj.weight", h, dh, d, (blk, "attn", "out", "kernel")))
        if cfg.out_bias:
            out.append(_same(a + "o_proj.bias", (d,), (blk, "attn", "out", "bias")))
        for name, n in (("q_norm", h), ("k_norm", hkv)):
            if cfg.qk_norm == "head":
                out.append(_same(a + name + ".weight", (dh,), (blk, "attn", name, "scale")))
            elif cfg.qk_norm == "all":
                out.append(_same(a + name + ".weight", (n * dh,), (blk, "attn", name, "scale"), (n, dh)))
        mlp = pre + "mlp."
        if cfg.is_moe_block(i):
            m = cfg.moe
            e, f = m.num_experts, m.expert_hidden
            out += [_linear(mlp + "gate.weight", (e, d), (blk, "moe", "router", "gate", "kernel")),
                    _fused_gate_up(mlp + "experts.gate_up_proj", e, f, d, (blk, "moe", "experts")),
                    _W(mlp + "experts.down_proj", (e, d, f), ((blk, "moe", "experts", "wo"),),
                       lambda a: (a.transpose(0, 2, 1),), lambda xs: xs[0].transpose(0, 2, 1))]
            if m.num_shared_experts:
                fs = m.num_shared_experts * (m.shared_expert_hidden or f)
                out += _mlp(mlp + "shared_expert.", d, fs, (blk, "moe", "shared"))
                out.append(_linear(mlp + "shared_expert_gate.weight", (1, d), (blk, "moe", "shared_gate", "kernel")))
        else:
            out += _mlp(mlp, d, cfg.d_ff, (blk, "ffn"))
    return out


def _mlp(prefix, d, f, path):
    return [_linear(prefix + "gate_proj.weight", (f, d), path + ("wg",)),
            _linear(prefix + "up_proj.weight", (f, d), path + ("wi",)),
            _linear(prefix + "down_proj.weight", (d, f), path + ("wo",))]


def _abstract_params(cfg: ModelConfig) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
    import jax

    from moe_jax.model import Transformer, init_variables

    shapes = jax.eval_shape(lambda: init_variables(Transformer(cfg), jax.random.key(0), 2))
    if shapes.get("moe_state"):
        raise ValueError("moe_jax.hf: this model keeps router state ('moe_state'), which none of the supported "
                         "families has.")
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    return {tuple(p.key for p in path): tuple(leaf.shape) for path, leaf in flat}


def _nest(flat: Dict[Tuple[str, ...], np.ndarray]) -> Params:
    out: Params = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def params_from_state_dict(cfg: ModelConfig, state_dict: Dict[str, Any], family: Optional[str] = None) -> Params:
    """``{'params': ...}`` (float32 numpy) of ``Transformer(cfg)`` from a transformers state dict.

    Strict: a key the mapping does not expect (extra), a key it expects but does not find (missing) and a
    tensor of the wrong shape are each refused by name. With tied embeddings ``lm_head.weight`` may be
    present but must equal ``model.embed_tokens.weight``."""
    fam = _family(family or infer_family(cfg))
    wmap = _weight_map(cfg, fam)
    sd = {k: (v if isinstance(v, np.ndarray) else v.detach().to("cpu").float().numpy()) for k, v in state_dict.items()}
    if cfg.tie_embeddings and "lm_head.weight" in sd:
        head = sd.pop("lm_head.weight")
        emb = sd.get("model.embed_tokens.weight")
        if emb is None or head.shape != emb.shape or not np.array_equal(head, emb):
            raise ValueError("checkpoint: tie_word_embeddings=True but lm_head.weight differs from "
                             "model.embed_tokens.weight; convert with tie_word_embeddings=False.")
    expected = {w.key for w in wmap}
    extra, missing = sorted(set(sd) - expected), sorted(expected - set(sd))
    if extra or missing:
        raise ValueError(f"checkpoint does not match the {fam.model_type} config: extra keys {extra[:8]}"
                         f"{' ...' if len(extra) > 8 else ''}, missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}; no weight is dropped or invented.")
    flat = {}
    for w in wmap:
        a = sd[w.key]
        if tuple(a.shape) != w.shape:
            raise ValueError(f"checkpoint key {w.key}: shape {tuple(a.shape)}, but the config gives {w.shape}.")
        for path, x in zip(w.paths, w.to_jax(np.asarray(a, np.float32))):
            flat[path] = np.ascontiguousarray(x)
    _check_tree(cfg, flat)
    return {"params": _nest(flat)}


def _check_tree(cfg: ModelConfig, flat: Dict[Tuple[str, ...], Any]) -> None:
    """The mapped leaves are exactly ``Transformer(cfg)``'s params, each with its shape."""
    want = _abstract_params(cfg)
    extra, missing = sorted(set(flat) - set(want)), sorted(set(want) - set(flat))
    if extra or missing:
        raise ValueError(f"moe_jax params do not match model config: extra {['/'.join(p) for p in extra]}, "
                         f"missing {['/'.join(p) for p in missing]}.")
    for path, shape in want.items():
        if tuple(np.shape(flat[path])) != shape:
            raise ValueError(f"moe_jax param {'/'.join(path)}: shape {tuple(np.shape(flat[path]))}, but the model "
                             f"config gives {shape}.")


def state_dict_from_params(cfg: ModelConfig, variables: Params, family: Optional[str] = None
                           ) -> Dict[str, np.ndarray]:
    """The transformers state dict (float32 numpy) of ``variables`` (strict as ``params_from_state_dict``)."""
    import jax

    fam = _family(family or infer_family(cfg))
    if variables.get("moe_state"):
        raise ValueError("variables hold 'moe_state' (router state), which transformers' "
                         f"{fam.model_type} has no place for.")
    flat = {tuple(p.key for p in path): np.asarray(leaf, np.float32)
            for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
    _check_tree(cfg, flat)
    sd = {w.key: np.ascontiguousarray(w.to_hf([flat[p] for p in w.paths])) for w in _weight_map(cfg, fam)}
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


# ---------------------------------------------------------------------------------------------- API


def from_hf(model) -> Tuple[ModelConfig, Params]:
    """``(ModelConfig, variables)`` of the transformers causal LM ``model`` (any ``*ForCausalLM`` of
    ``FAMILIES``; its weights are read, not changed)."""
    cfg = model_config_from_hf(model.config)
    return cfg, params_from_state_dict(cfg, model.state_dict(), model.config.model_type)


def to_hf(cfg: ModelConfig, variables: Params, family: Optional[str] = None):
    """A new transformers ``*ForCausalLM`` (float32, eval mode) holding ``variables``."""
    torch = _torch()
    from transformers import AutoModelForCausalLM

    hf_config = hf_config_from(cfg, family)
    sd = state_dict_from_params(cfg, variables, hf_config.model_type)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
    return model.eval()


def save_hf(cfg: ModelConfig, variables: Params, out_dir: str, family: Optional[str] = None):
    """Write a directory that ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads."""
    model = to_hf(cfg, variables, family)
    model.save_pretrained(out_dir)
    return model


def from_hf_dir(path: str) -> Tuple[ModelConfig, Params]:
    """``from_hf`` of ``AutoModelForCausalLM.from_pretrained(path)`` (float32), refusing a checkpoint whose
    tensors transformers reports as missing, unexpected or mismatched."""
    torch = _torch()
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(path)
    _family(hf_config.model_type)  # an unsupported architecture fails before loading any weight
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise ValueError(f"{path}: transformers could not load the checkpoint exactly: {bad}.")
    return from_hf(model.eval())


# ------------------------------------------------------------------------------------- run directories


def config_fields(cfg: ModelConfig) -> Dict[str, Any]:
    """``cfg`` as the ``config.model`` fields of a training config (``moe`` as a dict; None -> 0 where the base
    config has an int)."""
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ("vocab_size", "moe")}
    out.update(num_kv_heads=cfg.num_kv_heads or 0, head_dim=cfg.head_dim or 0)
    out["moe"] = {k: v for k, v in dataclasses.asdict(cfg.moe).items() if v is not None}
    return out


def save_workdir(workdir: str, cfg: ModelConfig, variables: Params, config) -> str:
    """Write ``variables`` as step 0 of a run directory (``config.json`` + ``checkpoints/0``, fresh AdamW
    state from ``config.train``), the layout ``moe_jax.train`` writes; ``config`` is a full training
    ConfigDict whose ``model`` section is replaced by ``cfg``. Read it back with ``load_workdir``, or start a
    training run from it with ``--config.init.from_dir=WORKDIR --config.init.method=copy`` (the data's
    tokenizer must have the model's vocabulary). Returns the checkpoint's path."""
    import json
    import os

    import jax
    import jax.numpy as jnp

    from moe_jax import train as train_lib

    workdir = train_lib.check_workdir(workdir)
    mngr = train_lib._checkpoint_manager(workdir, int(config.train.keep_ckpts))
    if mngr.all_steps():
        raise ValueError(f"--workdir {workdir} already holds checkpoints {list(mngr.all_steps())}; choose a new one.")
    fields = config_fields(cfg)
    config.model.update({k: v for k, v in fields.items() if k != "moe"})
    config.model.moe.update(fields["moe"])
    if canonical(train_lib.validate_config(config, cfg.vocab_size)) != canonical(cfg):
        raise ValueError("moe_jax.hf.save_workdir: the training config does not reproduce the model config.")
    params = jax.tree.map(jnp.asarray, variables["params"])
    tx, _ = train_lib.make_optimizer(config.train)
    state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                 moe_state={})
    resolved = train_lib.resolved_config(config, cfg.vocab_size)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(resolved, f, indent=2)
    step = train_lib._save(mngr, state, {}, resolved, {"elapsed_s": 0.0, "flops": 0.0})
    return os.path.join(workdir, train_lib.CKPT_DIR, str(step))


def load_workdir(workdir: str, step: int = -1) -> Tuple[ModelConfig, Params]:
    """``(ModelConfig, variables)`` of a run directory's checkpoint (-1: the latest), without its data."""
    from moe_jax.upcycle import read_run

    run = read_run(workdir, step)
    variables = {"params": run.params}
    if run.moe_state:
        variables["moe_state"] = run.moe_state
    return canonical(run.model_config()), variables
