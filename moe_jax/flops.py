"""Parameter and FLOP accounting of the Transformer LM (``moe_jax.model``), in one function.

Conventions (``count_model``):

* **total_params**: every trainable parameter (embedding, norms, attention, FFNs, routers, all experts;
  the output projection once more if embeddings are untied). Non-gradient state (``'moe_state'``) is not a
  parameter.
* **active_params** (per token): ``total_params - sum_moe_layers (E - K) / E * routed_expert_params``, i.e.
  a token uses K of the E routed experts of each MoE layer; routers and shared experts are always active.
  For expert choice, K is the average number of experts per token (the capacity factor ``c``); for Soft
  MoE it is ``E * num_slots / S`` (every expert runs ``num_slots`` slots per group of S tokens; with a
  small S this counts repeated evaluations and can exceed ``total_params``).
* **matmul_params** (per token): the active weights that take part in a matrix multiply: attention
  ``4 D^2`` per block, dense FFN ``(2 or 3) D F``, router gate(s), ``K`` routed experts, shared experts,
  and the output projection ``V D`` (the transposed embedding when tied). Not counted: the input embedding
  (a lookup) and the norm scales (elementwise).
* **train_flops_per_token** ``= 6 * matmul_params + 12 * num_layers * L * D``. A matmul with N weights
  costs ``2N`` FLOPs per token forward and ``4N`` backward (Kaplan et al. 2020, sec. 2.1). Attention's
  ``QK^T`` and ``AV`` cost ``2 * L * D`` FLOPs each per token and layer forward, times 3 for training,
  counted over the whole ``L x L`` score matrix (PaLM, Chowdhery et al. 2022, app. B; our attention computes
  the masked half too). Softmax, norms, activations, top-k and the optimizer are not counted.
* The count is **dispatch-free**: it counts the useful token-expert work only, not the empty capacity slots
  nor the one-hot dispatch/combine einsums. The latter are reported on their own as
  ``dispatch_flops_per_token`` (``dispatcher='einsum'`` and Soft MoE, else 0): two einsums of
  ``2 * E * C * D`` FLOPs per token forward (``[G,S,E,C] x [G,S,D]``; ``E * C ~ cf * K * S``; Soft MoE:
  ``C = num_slots``), times 3 for training, per MoE layer; they grow with the group size S.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from moe_jax import routing
from moe_jax.capacity import compute_capacity
from moe_jax.model import ModelConfig
from moe_jax.moe import MoELayer


@dataclasses.dataclass(frozen=True)
class ModelCounts:
    """Result of ``count_model`` (all ints; conventions in the module docstring)."""

    total_params: int
    active_params: int
    matmul_params: int
    embedding_params: int
    routed_expert_params: int
    router_params: int
    attention_flops_per_token: int
    train_flops_per_token: int
    dispatch_flops_per_token: int
    seq_len: int

    def summary(self) -> str:
        m = lambda n: f"{n / 1e6:.3f}M"
        line = (f"params: total {m(self.total_params)}, active/token {m(self.active_params)} "
                f"(matmul {m(self.matmul_params)}, embedding {m(self.embedding_params)}, routed experts "
                f"{m(self.routed_expert_params)}, routers {self.router_params}); training FLOPs/token "
                f"{self.train_flops_per_token / 1e6:.2f}M (attention {self.attention_flops_per_token / 1e6:.2f}M "
                f"at L={self.seq_len})")
        if self.dispatch_flops_per_token:
            line += f" + einsum dispatch {self.dispatch_flops_per_token / 1e6:.2f}M"
        return line


def routed_expert_weights(cfg: ModelConfig) -> int:
    """Weights of one routed expert of ``cfg.moe``: ``(2 or 3) * D * expert_hidden`` (MLP or GLU)."""
    return (3 if cfg.moe.glu else 2) * cfg.d_model * cfg.moe.expert_hidden


def _moe_nonrouted_params(cfg: ModelConfig, seq_len: int) -> int:
    """Parameters of one MoE layer other than the routed experts (router + shared experts + anything a router
    adds), from the module's own abstract init (``jax.eval_shape``: no computation)."""
    layer = MoELayer(cfg.moe, causal=True, dtype=cfg.compute_dtype)  # as model.py builds it
    s = cfg.moe.resolved_group_size(seq_len)  # None -> L; 'auto' -> per dispatcher
    x = jax.ShapeDtypeStruct((1, s, cfg.d_model), cfg.compute_dtype)
    ids = jax.ShapeDtypeStruct((1, s), jnp.int32)
    shapes = jax.eval_shape(lambda x, ids: layer.init({"params": jax.random.key(0), "router": jax.random.key(1)},
                                                      x, train=False, token_ids=ids), x, ids)
    params = shapes["params"]
    n = lambda tree: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
    return n(params) - n(params.get("experts", {}))


def count_model(cfg: ModelConfig, seq_len: int) -> ModelCounts:
    """Total and active parameters and training FLOPs per token of ``Transformer(cfg)`` at length ``seq_len``.

    See the module docstring for every convention. ``total_params`` equals the size of the initialised
    model's ``'params'`` exactly (tested).
    """
    cfg.validate()
    d, v, n_layers = cfg.d_model, cfg.vocab_size, cfg.num_layers
    mult = lambda glu: 3 if glu else 2  # wi, wo (+ wg)
    embedding = v * d
    norms = 2 * d * n_layers + d
    h, hkv, dh = cfg.num_heads, cfg.kv_heads, cfg.resolved_head_dim
    attn_bias = (h + 2 * hkv) * dh * cfg.qkv_bias + d * cfg.out_bias
    qk_norm = {"none": 0, "head": 2 * dh, "all": (h + hkv) * dh}[cfg.qk_norm]
    attention = (2 * (h + hkv) * dh * d) * n_layers  # query, key, value, out kernels (4 D^2 for MHA)
    norms += (attn_bias + qk_norm) * n_layers
    dense_ffn = mult(cfg.glu) * d * cfg.d_ff
    n_moe = len(cfg.moe_blocks)
    n_dense = n_layers - n_moe
    routed = routed_active = moe_other = router = dispatch = 0
    if n_moe:
        m = cfg.moe
        per_expert = routed_expert_weights(cfg)
        routed = n_moe * m.num_experts * per_expert
        s = m.resolved_group_size(seq_len)
        soft = routing.get_router_class(m.router).kind == "soft"
        # Expert evaluations per token: K (token choice; expert choice: the capacity factor c), or for Soft
        # MoE E * num_slots slots shared by the S tokens of a group.
        evals = m.num_experts * m.num_slots / s if soft else m.k
        routed_active = int(round(n_moe * evals * per_expert))
        moe_other = n_moe * _moe_nonrouted_params(cfg, seq_len)
        shared = n_moe * (mult(m.glu) * d * m.num_shared_experts * (m.shared_expert_hidden or m.expert_hidden))
        router = moe_other - shared
        if soft:
            c = m.num_slots
        elif m.resolved_dispatcher() == "einsum":
            c = compute_capacity(s, m.num_experts, m.k, m.capacity_factor, m.capacity_multiple, m.min_capacity)
        else:
            c = 0
        dispatch = n_moe * 3 * 2 * (2 * m.num_experts * c * d)
    unembed = 0 if cfg.tie_embeddings else v * d
    total = embedding + norms + attention + n_dense * dense_ffn + routed + moe_other + unembed
    active = total - routed + routed_active
    matmul = attention + n_dense * dense_ffn + routed_active + moe_other + v * d
    attn_flops = 12 * n_layers * seq_len * h * dh
    return ModelCounts(
        total_params=total,
        active_params=active,
        matmul_params=matmul,
        embedding_params=embedding,
        routed_expert_params=routed,
        router_params=router,
        attention_flops_per_token=attn_flops,
        train_flops_per_token=6 * matmul + attn_flops,
        dispatch_flops_per_token=dispatch,
        seq_len=seq_len,
    )
