"""The Transformer LM: config validation, layout, causality (dense and MoE), bf16, and the FLOPs/params count."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.flops import count_model
from moe_jax.model import ModelConfig, Transformer, init_variables
from moe_jax.moe import MoEConfig

V, L = 256, 16


def _n_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def switch_cfg(capacity_compute="full", **kw) -> ModelConfig:
    # Blocks: 0 dense, 1 and 2 MoE (moe_every=1, first_dense=1). capacity_factor 0.5 forces drops in training.
    moe = MoEConfig(num_experts=4, k=1, router="switch", expert_hidden=32, capacity_factor=0.5,
                    eval_capacity_factor=0.5, dispatcher="scatter", capacity_compute=capacity_compute)
    base = dict(vocab_size=V, d_model=32, num_layers=3, num_heads=4, d_ff=64, moe_every=1, first_dense=1, moe=moe)
    base.update(kw)
    return ModelConfig(**base)


def dense_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, d_ff=64)


_CACHE = {}


def _jitted(kind: str):
    """(cfg, variables, apply(v, tokens, rng) [train], apply_eval(v, tokens)), compiled once per module."""
    if kind not in _CACHE:
        cfg = {"dense": dense_cfg, "switch": switch_cfg,
               "switch_filled": lambda: switch_cfg(capacity_compute="filled")}[kind]()
        model = Transformer(cfg)
        variables = jax.jit(lambda k: init_variables(model, k, L))(jax.random.key(0))
        apply = jax.jit(lambda v, t, r: model.apply(v, t, train=True, rngs={"router": r}))
        apply_eval = jax.jit(lambda v, t: model.apply(v, t, train=False))
        _CACHE[kind] = cfg, variables, apply, apply_eval
    return _CACHE[kind]


def _tokens(seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (2, L)), jnp.int32)  # [2, L]: one shape


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kw, match", [
    (dict(num_heads=5), r"model\.num_heads=5 does not divide model\.d_model=32"),
    (dict(d_model=36, num_heads=12), r"odd.*rotary"),  # head width 3
    (dict(dtype="float16"), r"model\.dtype"),
    (dict(activation="tanh"), r"model\.activation"),
    (dict(moe_every=-1), r"model\.moe_every"),
    (dict(first_dense=4), r"model\.first_dense"),
    (dict(moe_every=4), r"model\.moe_every=4 .*places no MoE block"),  # 3 blocks: (i+1) % 4 never 0
    (dict(moe_every=1, first_dense=3), r"places no MoE block"),
    (dict(moe=None), r"model\.moe is missing"),
    (dict(num_layers=0), r"model\.num_layers"),
    # GShard top-2 with a capacity in a causal LM needs token-major slots
    (dict(moe=MoEConfig(num_experts=4, k=2, router="gshard")), r"model\.moe: .*slot_order='token_major'"),
    (dict(moe=MoEConfig(router="expert_choice", k=1)), r"model\.moe: .*non-causal.*allow_non_causal"),
])
def test_model_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        switch_cfg(**kw).validate()


def test_from_config_and_layout():
    cfg = ModelConfig.from_config(
        {"d_model": 32, "num_layers": 6, "num_heads": 4, "d_ff": 64, "moe_every": 2, "first_dense": 2,
         "moe": {"num_experts": 4, "k": 1, "router": "switch", "expert_hidden": 32}}, vocab_size=V)
    # (i + 1) % 2 == 0 -> 1, 3, 5; first_dense=2 removes block 1.
    assert cfg.moe_blocks == (3, 5)
    assert ModelConfig(V, num_layers=4, moe_every=1, first_dense=1, moe=MoEConfig()).moe_blocks == (1, 2, 3)
    shapes = jax.eval_shape(lambda: init_variables(Transformer(cfg), jax.random.key(0), L))["params"]
    assert sorted(i for i in range(6) if "moe" in shapes[f"block_{i}"]) == [3, 5]
    assert sorted(i for i in range(6) if "ffn" in shapes[f"block_{i}"]) == [0, 1, 2, 4]
    # a dense config ignores its (unused) moe section
    assert ModelConfig.from_config({"moe_every": 0, "moe": {"k": 99}}, V).moe is None
    with pytest.raises(ValueError, match=r"model: unknown field\(s\) \['n_layers'\]"):
        ModelConfig.from_config({"n_layers": 2}, V)


# ------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("kind", ["dense", "switch", "switch_filled"])
def test_whole_model_is_causal(kind):
    """Changing tokens t+1.. never changes the logits at positions <= t (and changing token t does change
    logits at t: the test can fail). For the MoE model, in training mode with drops (capacity factor 0.5).

    Bit for bit, except with ``capacity_compute='filled'``: there an expert computes as many rows as it has
    tokens (rounded to a quantum), later tokens change that count, and XLA:CPU's GEMM may round a row's
    result differently at another row count (seen: 1.2e-7 on logits of order 0.1). Routing and drops stay
    causal; the tolerance below is float rounding, far below what a leaked token or a changed drop causes."""
    cfg, variables, apply, apply_eval = _jitted(kind)
    rng = np.random.default_rng(0)
    x = rng.integers(0, V, (2, L)).astype(np.int32)
    cut = [4, 10]  # row b: tokens after position cut[b] are replaced
    x2 = x.copy()
    for b, t in enumerate(cut):
        x2[b, t + 1:] = (x[b, t + 1:] + 1 + rng.integers(0, V - 1, L - t - 1)) % V
    key = jax.random.key(3)
    for fn in (lambda t: apply(variables, t, key), lambda t: apply_eval(variables, t)):
        (y1, aux1), (y2, _) = fn(jnp.asarray(x)), fn(jnp.asarray(x2))
        y1, y2 = np.asarray(y1), np.asarray(y2)
        for b, t in enumerate(cut):
            if kind == "switch_filled":
                np.testing.assert_allclose(y1[b, : t + 1], y2[b, : t + 1], rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_array_equal(y1[b, : t + 1], y2[b, : t + 1])
            assert np.abs(y1[b, t + 1] - y2[b, t + 1]).max() > 1e-3  # later positions do see the change
        if kind != "dense":
            assert float(aux1["metrics"]["drop_fraction"].max()) > 0  # capacity was binding: drops happened


def test_aux_sums_moe_layers():
    cfg, variables, apply, _ = _jitted("switch")
    _, aux = apply(variables, _tokens(), jax.random.key(1))
    n_moe, e = 2, cfg.moe.num_experts
    assert aux["metrics"]["expert_load"].shape == (n_moe, e)
    np.testing.assert_allclose(np.asarray(aux["metrics"]["expert_load"]).sum(-1), 1.0, rtol=1e-6)
    expected = sum(cfg.moe.lb_loss_coef * aux["losses"]["load_balancing"][i]
                   + cfg.moe.z_loss_coef * aux["losses"]["z_loss"][i] for i in range(n_moe))
    np.testing.assert_allclose(float(aux["aux_loss"]), float(expected), rtol=1e-6)
    _, dense_vars, _, dense_apply = _jitted("dense")
    dense_aux = dense_apply(dense_vars, _tokens())[1]
    assert float(dense_aux["aux_loss"]) == 0.0 and dense_aux["metrics"] == {}


# ------------------------------------------------------------------------------------------------- bf16


def test_bfloat16_compute_float32_params_and_router():
    model16 = Transformer(switch_cfg(dtype="bfloat16"))
    _, variables, _, apply_eval32 = _jitted("switch")
    shapes16 = jax.eval_shape(lambda: init_variables(model16, jax.random.key(0), L))
    assert {x.dtype for x in jax.tree.leaves(shapes16["params"])} == {jnp.dtype(jnp.float32)}  # params float32
    assert jax.tree.structure(shapes16) == jax.tree.structure(variables)
    tokens = _tokens()

    @jax.jit
    def run(v, t):
        return model16.apply(v, t, train=False, capture_intermediates=True, mutable=["intermediates"])

    (logits, aux), state = run(variables, tokens)
    inter = state["intermediates"]
    assert logits.dtype == jnp.float32 and aux["aux_loss"].dtype == jnp.float32
    # the router's gate runs in float32, the experts, attention and dense FFN in bfloat16
    assert inter["block_1"]["moe"]["router"]["gate"]["__call__"][0].dtype == jnp.float32
    assert inter["block_0"]["attn"]["query"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["block_0"]["ffn"]["__call__"][0].dtype == jnp.bfloat16
    # same params in float32: logits agree to bf16 precision (~0.005 here, logits up to ~0.5) except where a
    # near-tie in the router or a capacity drop flips (measured: 1 position of 32).
    logits32, _ = apply_eval32(variables, tokens)
    assert np.isfinite(np.asarray(logits)).all()
    err = np.abs(np.asarray(logits) - np.asarray(logits32)).max(-1)  # [2, L]
    assert np.mean(err < 0.02) >= 0.9, err
    assert np.median(err) > 0  # bf16 really ran


# ------------------------------------------------------------------------------------------------ FLOPs


def test_counts_switch_by_hand():
    # V=256, D=32, 4 blocks, F=64, blocks 1 and 3 MoE with E=4 experts of width 32, K=1, tied, L=16.
    moe = MoEConfig(num_experts=4, k=1, router="switch", expert_hidden=32, dispatcher="scatter")
    cfg = ModelConfig(vocab_size=V, d_model=32, num_layers=4, num_heads=4, d_ff=64, moe_every=2, moe=moe)
    c = count_model(cfg, seq_len=L)
    # embedding 256*32 = 8192; norms 2*32*4 + 32 = 288; attention 4*32*32*4 = 16384;
    # dense FFN 2 blocks * 2*32*64 = 8192; routers 2 * 32*4 = 256; experts 2 * 4*2*32*32 = 16384
    assert c.total_params == 8192 + 288 + 16384 + 8192 + 256 + 16384 == 49696
    assert c.routed_expert_params == 16384 and c.router_params == 256
    # active: minus (E-K)/E = 3/4 of the routed expert params
    assert c.active_params == 49696 - 16384 * 3 // 4 == 37408
    # matmul: attention 16384 + dense FFN 8192 + 1 expert/layer 4096 + routers 256 + unembedding 8192
    assert c.matmul_params == 37120
    # 6 * 37120 + 12 * 4 blocks * L=16 * D=32
    assert c.train_flops_per_token == 6 * 37120 + 12 * 4 * 16 * 32 == 247296
    assert c.dispatch_flops_per_token == 0  # scatter dispatcher
    variables = jax.eval_shape(lambda: init_variables(Transformer(cfg), jax.random.key(0), L))
    assert _n_params(variables["params"]) == c.total_params


def test_counts_mixtral_like_by_hand():
    # GLU experts, untied embeddings, K=2 of E=4, one shared expert of width 16, einsum dispatch; block 0 dense.
    moe = MoEConfig(num_experts=4, k=2, router="mixtral", expert_hidden=16, glu=True, activation="silu",
                    num_shared_experts=1, slot_order="token_major", dispatcher="einsum")
    cfg = ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, d_ff=48, glu=True, activation="silu",
                      tie_embeddings=False, moe_every=1, first_dense=1, moe=moe)
    c = count_model(cfg, seq_len=L)
    # embed 8192 + unembed 8192 + norms 2*32*2+32=160 + attention 4*32*32*2=8192 + dense GLU 3*32*48=4608
    # + router 32*4=128 + experts 4*3*32*16=6144 + shared 3*32*16=1536
    assert c.total_params == 8192 + 8192 + 160 + 8192 + 4608 + 128 + 6144 + 1536 == 37152
    assert c.router_params == 128
    assert c.active_params == 37152 - 6144 * 2 // 4 == 34080
    # matmul: attention 8192 + dense 4608 + router 128 + 2 experts 3072 + shared 1536 + unembedding 8192
    assert c.matmul_params == 25728
    assert c.train_flops_per_token == 6 * 25728 + 12 * 2 * 16 * 32
    # einsum dispatch: C = ceil(1.25 * 2 * 16 / 4) = 10; 3 (train) * 2 einsums * 2*E*C*D flops per MoE layer
    assert c.dispatch_flops_per_token == 3 * 2 * 2 * 4 * 10 * 32 == 15360
    variables = jax.eval_shape(lambda: init_variables(Transformer(cfg), jax.random.key(0), L))
    assert _n_params(variables["params"]) == c.total_params
    assert "active" in c.summary() and "einsum dispatch" in c.summary()


@pytest.mark.parametrize("router, extra, router_params", [
    ("hash", {}, 0),  # a fixed token -> expert table: no parameters
    ("noisy_top_k", {"k": 2, "slot_order": "token_major"}, 2 * 32 * 4),  # gate + noise matrices
    ("deepseek", {"k": 2, "slot_order": "token_major"}, 32 * 4),  # its bias is 'moe_state', not a param
    ("soft_moe", {"group_size": 1, "num_slots": 2, "allow_non_causal": True}, 32 * 4 * 2 + 1),  # Phi + scale
])
def test_counts_other_routers_match_init(router, extra, router_params):
    moe = MoEConfig(num_experts=4, router=router, expert_hidden=32, **extra)
    cfg = ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, d_ff=64, moe_every=2, moe=moe)
    c = count_model(cfg, seq_len=L)
    variables = jax.eval_shape(lambda: init_variables(Transformer(cfg), jax.random.key(0), L))
    assert _n_params(variables["params"]) == c.total_params and c.router_params == router_params
    experts_per_token = 4 * 2 / 1 if router == "soft_moe" else moe.k  # soft: E * slots / S with S = 1
    assert c.active_params == c.total_params - c.routed_expert_params + round(
        experts_per_token * c.routed_expert_params / 4)


# ------------------------------------------------------------- attention options (GQA, biases, q/k norm)


def _np_rms(x, scale, eps, axes):
    return x / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + eps) * scale


def _np_rotary(x, base):  # x: [B, L, H, Dh], the rotate-half layout
    _, l, _, dh = x.shape
    inv = 1.0 / base ** (np.arange(0, dh, 2) / dh)
    ang = np.arange(l)[:, None] * inv[None]  # [L, Dh/2]
    ang = np.concatenate([ang, ang], -1)[None, :, None]  # [1, L, 1, Dh]
    cos, sin = np.cos(ang), np.sin(ang)
    rot = np.concatenate([-x[..., dh // 2:], x[..., : dh // 2]], -1)
    return x * cos + rot * sin


def _np_attention(p, x, h, hkv, dh, qk_norm, eps, base):
    """Reference: transformers' eager attention written out in numpy (float64), params in moe_jax's layout."""
    lin = lambda name: np.einsum("bld,dhe->blhe", x, p[name]["kernel"]) + p[name].get("bias", 0.0)
    q, k, v = lin("query"), lin("key"), lin("value")
    if qk_norm != "none":
        axes = (-1,) if qk_norm == "head" else (-2, -1)
        q, k = _np_rms(q, p["q_norm"]["scale"], eps, axes), _np_rms(k, p["k_norm"]["scale"], eps, axes)
    q, k = _np_rotary(q, base), _np_rotary(k, base)
    k, v = np.repeat(k, h // hkv, axis=2), np.repeat(v, h // hkv, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
    l = x.shape[1]
    s = np.where(np.tril(np.ones((l, l), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", a, v)
    return np.einsum("bqhd,hde->bqe", out, p["out"]["kernel"]) + p["out"].get("bias", 0.0)


@pytest.mark.parametrize("opts", [
    dict(num_kv_heads=2, qkv_bias=True, qk_norm="head"),  # Qwen3-MoE-like (head_dim != D / H)
    dict(num_kv_heads=1, qkv_bias=True, out_bias=True, qk_norm="all", rope_base=500.0, norm_eps=1e-5),  # OLMoE
])
def test_attention_options_match_numpy_reference(opts):
    from moe_jax.model import CausalSelfAttention

    h, dh = 4, 6
    opts = dict(opts)
    base, eps = opts.pop("rope_base", 10000.0), opts.pop("norm_eps", 1e-6)
    attn = CausalSelfAttention(h, base, head_dim=dh, norm_eps=eps, **opts)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 16)), jnp.float32)
    params = attn.init(jax.random.key(0), x)["params"]
    # random (not init's ones/zeros) norm scales and biases, so that a misplaced one shows
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)
    hkv = opts["num_kv_heads"]
    assert params["key"]["kernel"].shape == (16, hkv, dh) and params["query"]["kernel"].shape == (16, h, dh)
    assert params["query"]["bias"].shape == (h, dh) and params["value"]["bias"].shape == (hkv, dh)
    assert ("bias" in params["out"]) == opts.get("out_bias", False)
    norm_shape = (dh,) if opts["qk_norm"] == "head" else (hkv, dh)
    assert params["k_norm"]["scale"].shape == norm_shape
    y = attn.apply({"params": params}, x)
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    ref = _np_attention(p64, np.asarray(x, np.float64), h, hkv, dh, opts["qk_norm"], eps, base)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads_and_defaults_keep_the_tree():
    """A GQA model (Hkv = 2 of H = 4) equals the MHA model whose key/value kernels repeat each kv head for
    its 2 query heads; with num_kv_heads = H (or 0) the param tree is today's (no extra leaves)."""
    gqa = ModelConfig(vocab_size=V, d_model=32, num_layers=1, num_heads=4, d_ff=64, num_kv_heads=2)
    mha = dataclasses.replace(gqa, num_kv_heads=0)
    vg = jax.jit(lambda k: init_variables(Transformer(gqa), k, L))(jax.random.key(0))
    vm = jax.tree.map(lambda a: a, vg)
    attn = dict(vm["params"]["block_0"]["attn"])
    for name in ("key", "value"):
        attn[name] = {"kernel": jnp.repeat(vg["params"]["block_0"]["attn"][name]["kernel"], 2, axis=1)}
    vm["params"]["block_0"]["attn"] = attn
    shapes_mha = jax.eval_shape(lambda: init_variables(Transformer(mha), jax.random.key(0), L))
    assert jax.tree.structure(shapes_mha) == jax.tree.structure(vm)
    assert sorted(shapes_mha["params"]["block_0"]["attn"]) == ["key", "out", "query", "value"]
    tokens = _tokens()
    yg, _ = jax.jit(Transformer(gqa).apply)(vg, tokens)
    ym, _ = jax.jit(Transformer(mha).apply)(vm, tokens)
    # equal up to float rounding: the two programs group the same sums differently (2.4e-7 seen)
    np.testing.assert_allclose(np.asarray(yg), np.asarray(ym), rtol=1e-5, atol=1e-6)
    c = count_model(gqa, seq_len=L)
    assert c.total_params == _n_params(vg["params"])  # q, out: 32*32 each; k, v: 32*16 each


def test_tied_embeddings_share_one_array():
    """Tied: no unembed param, and the logits are final_norm(h) @ embed^T (perturbing the embedding's row v
    changes logit v at every position even where token v never occurs)."""
    cfg = ModelConfig(vocab_size=V, d_model=32, num_layers=1, num_heads=4, d_ff=64, tie_embeddings=True)
    model = Transformer(cfg)
    v = jax.jit(lambda k: init_variables(model, k, L))(jax.random.key(0))
    assert "unembed" not in v["params"]
    tokens = jnp.zeros((1, L), jnp.int32)  # only token 0 occurs
    apply = jax.jit(model.apply)
    y1, _ = apply(v, tokens)
    emb = v["params"]["embed"]["embedding"]
    v2 = {"params": {**v["params"], "embed": {"embedding": emb.at[7].add(1.0)}}}
    y2, _ = apply(v2, tokens)
    d = np.abs(np.asarray(y2 - y1)).max(axis=(0, 1))
    assert d[7] > 1e-3 and np.all(d[np.arange(V) != 7] == 0)
    untied = dataclasses.replace(cfg, tie_embeddings=False)
    assert jax.eval_shape(lambda: init_variables(Transformer(untied), jax.random.key(0), L))["params"][
        "unembed"]["kernel"].shape == (32, V)


@pytest.mark.parametrize("kw, match", [
    (dict(num_kv_heads=3), r"model\.num_kv_heads=3 does not divide model\.num_heads=4"),
    (dict(qk_norm="layer"), r"model\.qk_norm"),
    (dict(head_dim=5), r"head width 5 .*odd"),
    (dict(num_kv_heads=-1), r"model\.num_kv_heads"),
    (dict(norm_eps=0.0), r"model\.norm_eps"),
])
def test_attention_option_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        switch_cfg(**kw).validate()
