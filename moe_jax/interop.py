"""Weight interchange between HuggingFace ``transformers`` MoE blocks (PyTorch, CPU) and ``moe_jax.MoELayer``.

Needs the ``interop`` extra (``pip install -e .[interop]``: torch and transformers >= 5, whose MoE blocks keep
the experts as fused 3-D tensors). torch is imported lazily: importing this module does not need it.

    cfg, variables = from_hf(block, hf_config, seq_len=L)        # transformers block -> moe_jax layer
    y, stats = MoELayer(cfg).apply(variables, x)                  # == block(x)
    block, hf_config = to_hf("mixtral", cfg, variables, d_model)  # and back

Supported blocks (``KINDS``) and their weight layouts (torch ``Linear.weight`` is ``[out, in]``; moe_jax
kernels are ``[in, out]``; ``E`` experts, ``D`` model width, ``F`` expert width):

==============  ==========================================  ================================================
kind            transformers                                moe_jax (``MoELayer`` params / ``moe_state``)
==============  ==========================================  ================================================
mixtral         ``MixtralSparseMoeBlock``: ``gate.weight``  ``router/gate/kernel [D,E]``, router 'mixtral'
                ``[E,D]``; ``experts.gate_up_proj           (softmax, top-k, renormalized), dropless,
                [E,2F,D]`` (rows ``:F`` gate, ``F:`` up),   ``experts/wg`` = gate^T, ``wi`` = up^T,
                ``experts.down_proj [E,D,F]``               ``wo`` = down^T (SwiGLU)
switch          ``SwitchTransformersSparseMLP``:            router 'switch' (top-1 softmax probability),
                ``router.classifier.weight [E,D]`` (no      ``experts/wi [E,D,F]``, ``wo [E,F,D]`` (no GLU),
                bias), ``experts.expert_i.wi/wo.weight``,   capacity: ``expert_capacity`` slots per expert
                ``expert_capacity``                         and sequence (see below), einsum dispatcher
qwen2_moe       ``Qwen2MoeSparseMoeBlock``: as mixtral      router 'top_k' (``renormalize_top_k`` =
                (``norm_topk_prob``) + ``shared_expert``    ``norm_topk_prob``), dropless, one shared expert
                MLP and ``shared_expert_gate [1,D]``        ``shared/{wg,wi,wo}`` with its sigmoid gate
                                                            ``shared_gate/kernel [D,1]`` (see below)
deepseek_v3     ``DeepseekV3MoE``: ``gate.weight [E,D]``,   router 'deepseek' (sigmoid, group-limited,
                ``gate.e_score_correction_bias [E]``,       ``routed_scaling``), ``moe_state/router/
                experts as mixtral, ``shared_experts`` MLP  expert_bias``, ``shared/{wg,wi,wo}``, dropless
==============  ==========================================  ================================================

Semantic differences found (the tests pin each one):

* **Load-balancing loss, top-k blocks** (Mixtral, Qwen2-MoE ``load_balancing_loss_func``): transformers counts
  all K choices in ``f`` without dividing by K, so its value is exactly ``K *`` moe_jax's (which is 1.0 at
  perfect balance for any K; DESIGN.md).
* **Load-balancing loss, Switch**: transformers averages ``f_e * P_e`` over groups (sequences) and experts
  (``E^2 * mean_{g,e}``), moe_jax pools ``f`` and ``P`` over all groups first; they agree for one group, and
  transformers' value is the mean over sequences of moe_jax's per-sequence loss. The z-loss agrees (mean over
  tokens of ``logsumexp^2``).
* **Switch capacity**: transformers fixes ``expert_capacity`` slots per expert and sequence; moe_jax derives
  ``C = ceil(cf * K * S / E)`` per group. ``from_hf(..., seq_len=S)`` sets ``group_size=None`` (one group =
  one sequence) and ``capacity_factor = eval_capacity_factor = C * E / S``, so that both keep exactly the same
  tokens: the first ``C`` tokens of each sequence that choose an expert (Switch's priority is the token
  position, as moe_jax's choice-major order for K = 1). Dropped tokens give 0 in both. transformers
  routes a dropped token nowhere but still reports its argmax expert to the loss, as moe_jax does.
* **Qwen2-MoE's shared-expert gate** ``sigmoid(x . g) * shared(x)`` is ``MoEConfig.shared_expert_gate``
  (``to_hf`` refuses ungated shared experts for this kind).
* **DeepSeek-V3**: transformers implements neither the sequence-wise balance loss nor the bias update (those
  are training-side); only the forward pass and the bias (``e_score_correction_bias`` <-> ``expert_bias``)
  are compared. Group scores are the sum of the top-2 biased scores in both (transformers needs >= 2 experts
  per group).
* **Activations**: moe_jax's 'gelu' is the tanh approximation (``flax.linen.gelu``), transformers' 'gelu' is
  exact (erf); 'gelu' maps to transformers' 'gelu_pytorch_tanh' / 'gelu_new', and an exact-'gelu' block is
  refused. Jitter (Switch, Mixtral) applies only in training in both.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from moe_jax.moe import MoEConfig

Params = Dict[str, Any]
KINDS = ("mixtral", "switch", "qwen2_moe", "deepseek_v3")

_ACT_FROM_HF = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
_ACT_TO_HF = {"silu": "silu", "relu": "relu", "gelu": "gelu_pytorch_tanh"}


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("moe_jax.interop needs PyTorch and transformers: pip install -e '.[interop]'.") from e
    return torch


def _act_from_hf(name: str, field: str) -> str:
    if name not in _ACT_FROM_HF:
        raise ValueError(f"{field}={name!r} has no exact moe_jax activation (moe_jax has {sorted(_ACT_TO_HF)}; its "
                         "'gelu' is the tanh approximation, transformers' 'gelu_pytorch_tanh'). Use one of "
                         f"{sorted(_ACT_FROM_HF)}.")
    return _ACT_FROM_HF[name]


def _act_to_hf(name: str) -> str:
    if name not in _ACT_TO_HF:
        raise ValueError(f"moe.activation={name!r}: no transformers counterpart; use one of {sorted(_ACT_TO_HF)}.")
    return _ACT_TO_HF[name]


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy().copy()


def _set(param, value: np.ndarray) -> None:
    torch = _torch()
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.ascontiguousarray(np.asarray(value, np.float32))))


def _fused_from_hf(experts) -> Params:
    """transformers >= 5 fused experts -> ``{wg, wi [E,D,F], wo [E,F,D]}``."""
    if not hasattr(experts, "gate_up_proj"):
        raise ValueError("this transformers version keeps experts as a list of modules; moe_jax.interop reads the "
                         "fused layout of transformers >= 5 (experts.gate_up_proj / down_proj). Install the "
                         "'interop' extra's version.")
    gate_up = _np(experts.gate_up_proj)  # [E, 2F, D]
    f = gate_up.shape[1] // 2
    return {"wg": gate_up[:, :f].transpose(0, 2, 1), "wi": gate_up[:, f:].transpose(0, 2, 1),
            "wo": _np(experts.down_proj).transpose(0, 2, 1)}


def _fused_to_hf(experts, p: Params) -> None:
    if "wg" not in p:
        raise ValueError("transformers' fused experts are gated (SwiGLU): set moe.glu=True.")
    gate_up = np.concatenate([np.asarray(p["wg"]).transpose(0, 2, 1), np.asarray(p["wi"]).transpose(0, 2, 1)], 1)
    _set(experts.gate_up_proj, gate_up)  # [E, 2F, D]
    _set(experts.down_proj, np.asarray(p["wo"]).transpose(0, 2, 1))  # [E, D, F]


def _mlp_from_hf(mlp) -> Params:
    """A gated MLP (gate_proj, up_proj, down_proj Linears) -> DenseFFN params ``{wg, wi [D,F], wo [F,D]}``."""
    return {"wg": _np(mlp.gate_proj.weight).T, "wi": _np(mlp.up_proj.weight).T, "wo": _np(mlp.down_proj.weight).T}


def _mlp_to_hf(mlp, p: Params) -> None:
    _set(mlp.gate_proj.weight, np.asarray(p["wg"]).T)
    _set(mlp.up_proj.weight, np.asarray(p["wi"]).T)
    _set(mlp.down_proj.weight, np.asarray(p["wo"]).T)


def _f32(tree):
    return {k: (_f32(v) if isinstance(v, dict) else np.asarray(v, np.float32)) for k, v in tree.items()}


# ------------------------------------------------------------------------------------------- converters


class _Converter:
    """One transformers block type: config and weights, both ways."""

    kind = ""
    block_class = ""  # class name of the transformers block

    def moe_config(self, hf, seq_len: Optional[int]) -> MoEConfig:
        raise NotImplementedError

    def hf_config(self, cfg: MoEConfig, d_model: int, seq_len: Optional[int]):
        raise NotImplementedError

    def new_block(self, hf_config):
        raise NotImplementedError

    def params_from_hf(self, block, cfg: MoEConfig) -> Params:
        raise NotImplementedError

    def params_to_hf(self, block, cfg: MoEConfig, variables: Params) -> None:
        raise NotImplementedError


class _Mixtral(_Converter):
    kind, block_class = "mixtral", "MixtralSparseMoeBlock"

    def moe_config(self, hf, seq_len):
        return MoEConfig(num_experts=hf.num_local_experts, k=hf.num_experts_per_tok, router="mixtral",
                         renormalize_top_k=True, jitter_eps=float(hf.router_jitter_noise or 0.0),
                         dispatcher="dropless", expert_hidden=hf.intermediate_size,
                         activation=_act_from_hf(hf.hidden_act, "hidden_act"), glu=True)

    def hf_config(self, cfg, d_model, seq_len):
        from transformers import MixtralConfig

        if cfg.router != "mixtral" or cfg.num_shared_experts:
            raise ValueError(f"to_hf('mixtral'): needs moe.router='mixtral' and no shared experts (got router="
                             f"{cfg.router!r}, num_shared_experts={cfg.num_shared_experts}).")
        return MixtralConfig(hidden_size=d_model, intermediate_size=cfg.expert_hidden, num_local_experts=cfg.num_experts,
                             num_experts_per_tok=cfg.k, hidden_act=_act_to_hf(cfg.activation),
                             router_jitter_noise=float(cfg.jitter_eps or 0.0))

    def new_block(self, hf):
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        return MixtralSparseMoeBlock(hf)

    def params_from_hf(self, block, cfg):
        return {"router": {"gate": {"kernel": _np(block.gate.weight).T}}, "experts": _fused_from_hf(block.experts)}

    def params_to_hf(self, block, cfg, variables):
        p = variables["params"]
        _set(block.gate.weight, np.asarray(p["router"]["gate"]["kernel"]).T)
        _fused_to_hf(block.experts, p["experts"])


class _Qwen2Moe(_Mixtral):
    kind, block_class = "qwen2_moe", "Qwen2MoeSparseMoeBlock"

    def moe_config(self, hf, seq_len):
        k = hf.num_experts_per_tok
        return MoEConfig(num_experts=hf.num_experts, k=k, router="top_k", renormalize_top_k=bool(hf.norm_topk_prob),
                         dispatcher="dropless", expert_hidden=hf.moe_intermediate_size,
                         activation=_act_from_hf(hf.hidden_act, "hidden_act"), glu=True, num_shared_experts=1,
                         shared_expert_hidden=hf.shared_expert_intermediate_size, shared_expert_gate=True)

    def hf_config(self, cfg, d_model, seq_len):
        from transformers import Qwen2MoeConfig

        if cfg.router not in ("top_k", "mixtral") or cfg.num_shared_experts != 1 or not cfg.shared_expert_gate:
            raise ValueError(f"to_hf('qwen2_moe'): needs moe.router='top_k' (or 'mixtral'), num_shared_experts=1 and "
                             f"shared_expert_gate=True (got router={cfg.router!r}, num_shared_experts="
                             f"{cfg.num_shared_experts}, shared_expert_gate={cfg.shared_expert_gate}).")
        from moe_jax.routing import resolved_renormalize

        return Qwen2MoeConfig(hidden_size=d_model, moe_intermediate_size=cfg.expert_hidden, num_experts=cfg.num_experts,
                              num_experts_per_tok=cfg.k, norm_topk_prob=resolved_renormalize(cfg),
                              shared_expert_intermediate_size=cfg.shared_expert_hidden or cfg.expert_hidden,
                              hidden_act=_act_to_hf(cfg.activation))

    def new_block(self, hf):
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        return Qwen2MoeSparseMoeBlock(hf)

    def params_from_hf(self, block, cfg):
        params = super().params_from_hf(block, cfg)
        params["shared"] = _mlp_from_hf(block.shared_expert)
        params["shared_gate"] = {"kernel": _np(block.shared_expert_gate.weight).T}  # [D, 1]
        return params

    def params_to_hf(self, block, cfg, variables):
        super().params_to_hf(block, cfg, variables)
        _mlp_to_hf(block.shared_expert, variables["params"]["shared"])
        _set(block.shared_expert_gate.weight, np.asarray(variables["params"]["shared_gate"]["kernel"]).T)


class _DeepseekV3(_Mixtral):
    kind, block_class = "deepseek_v3", "DeepseekV3MoE"

    def moe_config(self, hf, seq_len):
        if hf.n_routed_experts // hf.n_group < 2:
            raise ValueError(f"deepseek_v3: n_group={hf.n_group} leaves fewer than 2 experts per group, which "
                             "transformers' group score (top-2 sum) cannot handle.")
        return MoEConfig(num_experts=hf.n_routed_experts, k=hf.num_experts_per_tok, router="deepseek",
                         score_func="sigmoid", n_groups=hf.n_group, topk_groups=hf.topk_group,
                         renormalize_top_k=bool(hf.norm_topk_prob), routed_scaling=float(hf.routed_scaling_factor),
                         dispatcher="dropless", expert_hidden=hf.moe_intermediate_size,
                         activation=_act_from_hf(hf.hidden_act, "hidden_act"), glu=True,
                         num_shared_experts=hf.n_shared_experts, shared_expert_hidden=hf.moe_intermediate_size,
                         lb_loss_coef=0.0)

    def hf_config(self, cfg, d_model, seq_len):
        from transformers import DeepseekV3Config

        if cfg.router != "deepseek" or cfg.score_func != "sigmoid":
            raise ValueError(f"to_hf('deepseek_v3'): needs moe.router='deepseek' with score_func='sigmoid' (got "
                             f"{cfg.router!r}, {cfg.score_func!r}).")
        if cfg.num_shared_experts and (cfg.shared_expert_hidden or cfg.expert_hidden) != cfg.expert_hidden:
            raise ValueError("to_hf('deepseek_v3'): DeepSeek-V3's shared experts have the routed experts' width: "
                             "set moe.shared_expert_hidden=None or equal to expert_hidden.")
        from moe_jax.routing import resolved_renormalize

        return DeepseekV3Config(hidden_size=d_model, moe_intermediate_size=cfg.expert_hidden,
                                n_routed_experts=cfg.num_experts, num_experts_per_tok=cfg.k, n_group=cfg.n_groups,
                                topk_group=cfg.topk_groups, norm_topk_prob=resolved_renormalize(cfg),
                                routed_scaling_factor=cfg.routed_scaling, n_shared_experts=cfg.num_shared_experts,
                                hidden_act=_act_to_hf(cfg.activation))

    def new_block(self, hf):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

        if not hf.n_shared_experts:
            raise ValueError("to_hf('deepseek_v3'): transformers' DeepseekV3MoE always has shared experts; set "
                             "moe.num_shared_experts >= 1.")
        return DeepseekV3MoE(hf)

    def params_from_hf(self, block, cfg):
        params = super().params_from_hf(block, cfg)
        params["shared"] = _mlp_from_hf(block.shared_experts)
        return params

    def moe_state_from_hf(self, block) -> Params:
        return {"router": {"expert_bias": _np(block.gate.e_score_correction_bias)}}

    def params_to_hf(self, block, cfg, variables):
        super().params_to_hf(block, cfg, variables)
        _mlp_to_hf(block.shared_experts, variables["params"]["shared"])
        state = variables.get("moe_state", {}).get("router", {})
        if "expert_bias" in state:
            _set(block.gate.e_score_correction_bias, np.asarray(state["expert_bias"]))


class _Switch(_Converter):
    kind, block_class = "switch", "SwitchTransformersSparseMLP"

    def moe_config(self, hf, seq_len):
        if hf.router_bias:
            raise ValueError("switch: router_bias=True; moe_jax's routers have no bias. Use a block with "
                             "router_bias=False.")
        if seq_len is None or seq_len < 1:
            raise ValueError("from_hf(switch block): give seq_len=L (the sequence length) so that moe_jax's capacity "
                             "factor reproduces transformers' fixed expert_capacity per sequence.")
        cf = hf.expert_capacity * hf.num_experts / seq_len  # C = ceil(cf * 1 * L / E) = expert_capacity
        return MoEConfig(num_experts=hf.num_experts, k=1, router="switch", jitter_eps=float(hf.router_jitter_noise),
                         dispatcher="einsum", capacity_factor=cf, eval_capacity_factor=cf, group_size=None,
                         expert_hidden=hf.d_ff, activation=_act_from_hf(hf.dense_act_fn, "dense_act_fn"), glu=False)

    def hf_config(self, cfg, d_model, seq_len):
        from transformers import SwitchTransformersConfig

        from moe_jax.capacity import compute_capacity

        if cfg.router != "switch" or cfg.glu or cfg.num_shared_experts:
            raise ValueError(f"to_hf('switch'): needs moe.router='switch', glu=False and no shared experts (got "
                             f"router={cfg.router!r}, glu={cfg.glu}, num_shared_experts={cfg.num_shared_experts}).")
        if cfg.capacity_factor != cfg.eval_capacity_factor:
            raise ValueError("to_hf('switch'): transformers uses one expert_capacity in training and evaluation; set "
                             "moe.eval_capacity_factor = moe.capacity_factor.")
        if seq_len is None or cfg.group_size not in (None, seq_len):
            raise ValueError("to_hf('switch'): give seq_len=L; transformers' capacity is per sequence, so "
                             "moe.group_size must be None or L.")
        if cfg.resolved_dispatcher() == "dropless":
            capacity = seq_len  # never drops
        else:
            capacity = compute_capacity(seq_len, cfg.num_experts, 1, cfg.capacity_factor, cfg.capacity_multiple,
                                        cfg.min_capacity)
        return SwitchTransformersConfig(d_model=d_model, d_ff=cfg.expert_hidden, num_experts=cfg.num_experts,
                                        expert_capacity=capacity, router_bias=False,
                                        router_jitter_noise=float(cfg.jitter_eps if cfg.jitter_eps is not None else 1e-2),
                                        dense_act_fn=_act_to_hf(cfg.activation), dropout_rate=0.0)

    def new_block(self, hf):
        from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

        return SwitchTransformersSparseMLP(hf)

    def params_from_hf(self, block, cfg):
        experts = [block.experts[f"expert_{e}"] for e in range(cfg.num_experts)]
        return {"router": {"gate": {"kernel": _np(block.router.classifier.weight).T}},
                "experts": {"wi": np.stack([_np(x.wi.weight).T for x in experts]),  # [E, D, F]
                            "wo": np.stack([_np(x.wo.weight).T for x in experts])}}  # [E, F, D]

    def params_to_hf(self, block, cfg, variables):
        p = variables["params"]
        _set(block.router.classifier.weight, np.asarray(p["router"]["gate"]["kernel"]).T)
        for e in range(cfg.num_experts):
            _set(block.experts[f"expert_{e}"].wi.weight, np.asarray(p["experts"]["wi"][e]).T)
            _set(block.experts[f"expert_{e}"].wo.weight, np.asarray(p["experts"]["wo"][e]).T)


_CONVERTERS: Dict[str, _Converter] = {c.kind: c for c in (_Mixtral(), _Switch(), _Qwen2Moe(), _DeepseekV3())}


def _converter(kind: str) -> _Converter:
    if kind not in _CONVERTERS:
        raise ValueError(f"interop: unknown kind {kind!r}; choose one of {list(KINDS)}.")
    return _CONVERTERS[kind]


def kind_of(block) -> str:
    """The ``KINDS`` entry of a transformers block, from its class name."""
    name = type(block).__name__
    for c in _CONVERTERS.values():
        if c.block_class == name:
            return c.kind
    raise ValueError(f"interop: unsupported transformers block {name}; supported: "
                     f"{[c.block_class for c in _CONVERTERS.values()]}.")


# ------------------------------------------------------------------------------------------------ API


def moe_config_from_hf(kind: str, hf_config, seq_len: Optional[int] = None) -> MoEConfig:
    """The ``MoEConfig`` that computes what the transformers block of ``hf_config`` computes (module docstring)."""
    return _converter(kind).moe_config(hf_config, seq_len).validate()


def from_hf(block, hf_config, seq_len: Optional[int] = None) -> Tuple[MoEConfig, Params]:
    """``(MoEConfig, variables)`` of an ``MoELayer`` equal to the transformers ``block`` (in eval mode).

    ``variables``: ``{'params': ...}`` (plus ``'moe_state'`` for DeepSeek's bias), float32 numpy arrays.
    ``seq_len``: the sequence length, needed for Switch's capacity.
    """
    conv = _converter(kind_of(block))
    cfg = conv.moe_config(hf_config, seq_len).validate()
    variables = {"params": _f32(conv.params_from_hf(block, cfg))}
    if hasattr(conv, "moe_state_from_hf"):
        variables["moe_state"] = _f32(conv.moe_state_from_hf(block))
    return cfg, variables


def to_hf(kind: str, cfg: MoEConfig, variables: Params, d_model: int, seq_len: Optional[int] = None):
    """``(block, hf_config)``: a new transformers block (eval mode, float32) holding ``variables``' weights."""
    conv = _converter(kind)
    hf_config = conv.hf_config(cfg.validate(), d_model, seq_len)
    hf_config._experts_implementation = "eager"  # a standalone block; the per-expert loop of transformers
    block = conv.new_block(hf_config)
    conv.params_to_hf(block, cfg, jax_to_numpy(variables))
    return block.eval(), hf_config


def jax_to_numpy(tree):
    """A pytree of arrays (jax or numpy) as nested dicts of float32 numpy arrays."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: jax_to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)
