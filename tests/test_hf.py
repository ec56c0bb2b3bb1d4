"""Whole causal LMs in and out of transformers (moe_jax/hf.py): tiny random Mixtral, Qwen2-MoE, Qwen3-MoE and
OLMoE models built from configs (no downloads). Logits, the training loss (cross-entropy + transformers' aux
loss) and every gradient agree with transformers' to 1e-5 relative; export -> from_pretrained -> the same
logits; a round trip is bit-exact; what cannot be converted exactly is refused by name."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moe_jax import hf  # noqa: E402
from moe_jax.model import Transformer  # noqa: E402

V, B, L = 64, 2, 8
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.02, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "mixtral": dict(intermediate_size=48, num_local_experts=4, tie_word_embeddings=True),
    "qwen2_moe": dict(intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                      num_experts=4, mlp_only_layers=[0]),  # block 0 dense; q/k/v biases
    "qwen3_moe": dict(intermediate_size=40, moe_intermediate_size=24, num_experts=4, head_dim=6, norm_topk_prob=True,
                      attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "olmoe": dict(intermediate_size=24, num_experts=4, attention_bias=True, rms_norm_eps=1e-6),
}
_MODELS = {}


def _hf_model(family, **overrides):
    """A random transformers model of ``family``; every weight (norm scales and biases too) perturbed so that
    a misplaced tensor shows."""
    key = (family, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        torch.manual_seed(0)
        config = transformers.AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **overrides})
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        _MODELS[key] = model.eval()
    return _MODELS[key]


def _batch(seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, L + 1)).astype(np.int64)  # [B, L+1]: inputs, targets


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_logits_loss_gradients_export_and_round_trip(family, tmp_path):
    """One family end to end:

    * logits of the imported model == transformers' (1e-5 relative);
    * transformers' training loss (cross-entropy + router_aux_loss_coef * its pooled load-balancing loss) ==
      the loss of moe_jax's train step with the mapped coefficients (lb_scope='layers', lb_loss_coef =
      K * router_aux_loss_coef, no z-loss), and so are all gradients;
    * export -> a directory transformers loads -> the same logits; and back, bit for bit."""
    import optax

    from moe_jax import train as train_lib

    model = _hf_model(family)
    cfg, variables = hf.from_hf(model)
    assert cfg.moe.lb_scope == "layers" and cfg.moe.z_loss_coef == 0.0
    assert cfg.moe.lb_loss_coef == pytest.approx(2 * 0.02)
    batch = _batch(1)
    inputs = np.ascontiguousarray(batch[:, :-1])
    model.train()  # no dropout, no jitter in these configs: the logits are the eval logits
    try:
        model.zero_grad()
        out = model(torch.from_numpy(inputs), labels=torch.zeros(B, L, dtype=torch.long),
                    shift_labels=torch.from_numpy(np.ascontiguousarray(batch[:, 1:])))
        out.loss.backward()
    finally:
        model.eval()
    assert out.aux_loss.item() > 1.0  # K * moe_jax's (which is ~1 near balance): the aux term is in the loss
    grads_hf = {name: p.grad for name, p in model.named_parameters()}
    ref_logits = out.logits.detach().numpy()

    def loss_fn(params):  # the loss of moe_jax.train's train step
        logits, aux = Transformer(cfg).apply({"params": params}, jnp.asarray(inputs), train=True,
                                             rngs={"router": jax.random.key(0)})
        return train_lib.cross_entropy(logits, jnp.asarray(batch[:, 1:])) + aux["aux_loss"], (aux["aux_loss"], logits)

    (loss, (aux_loss, logits)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    assert _rel(logits, ref_logits) < 1e-5
    assert _rel(loss, out.loss.item()) < 1e-5
    assert _rel(aux_loss, 0.02 * out.aux_loss.item()) < 1e-5
    want = hf.params_from_state_dict(cfg, grads_hf, family)["params"]
    for (path, g), (_, w) in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                                 jax.tree_util.tree_flatten_with_path(want)[0]):
        assert _rel(g, w) < 1e-5, path
    if family == "qwen2_moe":  # and moe_jax.train's own step reports that loss (one compile, one family)
        tx = optax.sgd(0.0)
        state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                                     opt_state=tx.init(variables["params"]), moe_state={})
        step = train_lib.make_train_step(Transformer(cfg), tx, lambda s: 0.0)
        _, metrics = jax.jit(step)(state, jnp.asarray(batch, jnp.int32), jax.random.key(0))
        assert _rel(metrics["loss"], out.loss.item()) < 1e-5

    # export -> a directory transformers loads -> the same logits; and back to moe_jax bit for bit
    hf.save_hf(cfg, variables, str(tmp_path))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert loaded.config.model_type == family
    with torch.no_grad():
        assert _rel(loaded(torch.from_numpy(inputs)).logits.numpy(), logits) < 1e-5
    cfg2, variables2 = hf.from_hf_dir(str(tmp_path))
    assert cfg2 == cfg
    flat = lambda v: jax.tree_util.tree_flatten_with_path(v)[0]
    assert [p for p, _ in flat(variables2)] == [p for p, _ in flat(variables)]
    for (path, a), (_, b) in zip(flat(variables2), flat(variables)):
        np.testing.assert_array_equal(a, b, err_msg=str(path))
    # the original transformers tensors come back exactly too
    back = hf.state_dict_from_params(cfg, variables, family)
    for name, t in model.state_dict().items():
        np.testing.assert_array_equal(back[name], t.numpy(), err_msg=name)


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("family, overrides, match", [
    ("mixtral", dict(sliding_window=4), r"sliding_window=4"),
    ("qwen2_moe", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0), r"sliding_window|layer_types"),
    ("olmoe", dict(clip_qkv=2.0), r"clip_qkv=2\.0"),
    ("mixtral", dict(router_jitter_noise=0.1), r"router_jitter_noise=0\.1"),
    ("mixtral", dict(hidden_act="gelu"), r"hidden_act='gelu'"),
    ("qwen3_moe", dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), r"rope_parameters"),
    ("qwen2_moe", dict(num_hidden_layers=3, mlp_only_layers=[1]), r"mlp_only_layers=\[1\]"),
])
def test_inexpressible_options_are_refused_by_name(family, overrides, match):
    config = transformers.AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **overrides})
    with pytest.raises(ValueError, match=match):
        hf.model_config_from_hf(config)


def test_unsupported_architecture_is_refused():
    config = transformers.AutoConfig.for_model("llama", vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=4, intermediate_size=64)
    with pytest.raises(ValueError, match=r"model_type='llama': unsupported architecture"):
        hf.model_config_from_hf(config)


def test_checkpoint_with_extra_missing_or_misshapen_tensor_is_refused(tmp_path):
    model = _hf_model("olmoe")
    cfg = hf.model_config_from_hf(model.config)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    bad = dict(sd)
    bad["model.layers.0.mlp.extra_bias"] = np.zeros(3, np.float32)
    del bad["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(ValueError, match=r"extra keys \['model\.layers\.0\.mlp\.extra_bias'\], missing keys "
                                         r"\['model\.layers\.1\.self_attn\.k_norm\.weight'\]"):
        hf.params_from_state_dict(cfg, bad, "olmoe")
    bad = dict(sd)
    bad["model.layers.1.mlp.gate.weight"] = np.zeros((5, 32), np.float32)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate\.weight: shape \(5, 32\).*\(4, 32\)"):
        hf.params_from_state_dict(cfg, bad, "olmoe")
    # a saved directory whose weights do not fit its config.json: transformers' own report is refused
    model.save_pretrained(str(tmp_path))
    config = transformers.AutoConfig.from_pretrained(str(tmp_path))
    config.num_experts = 5
    config.save_pretrained(str(tmp_path))
    with pytest.raises(Exception, match=r"gate|size mismatch|mismatch"):
        hf.from_hf_dir(str(tmp_path))


def test_export_refuses_what_a_family_cannot_express():
    model = _hf_model("mixtral")
    cfg, variables = hf.from_hf(model)
    import dataclasses

    scatter = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatcher="scatter", slot_order="token_major"))
    with pytest.raises(ValueError, match=r"model\.moe\.dispatcher='scatter'"):
        hf.hf_config_from(scatter)
    with pytest.raises(ValueError, match=r"model\.qk_norm='none' cannot be exported to transformers' olmoe"):
        hf.hf_config_from(cfg, "olmoe")
    biased = dataclasses.replace(cfg, qkv_bias=True)
    with pytest.raises(ValueError, match=r"model\.qkv_bias/out_bias"):
        hf.hf_config_from(biased, "mixtral")


def test_convert_script_both_ways_is_bit_exact(tmp_path):
    """experiments/convert.py: transformers dir -> moe_jax run directory -> transformers dir, every tensor
    equal; the run directory's config is the imported one."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("convert", os.path.join(os.path.dirname(__file__), "..",
                                                                          "experiments", "convert.py"))
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    model = _hf_model("qwen2_moe")
    model.save_pretrained(str(tmp_path / "src"))
    convert.hf_to_workdir(str(tmp_path / "src"), str(tmp_path / "run"))
    cfg, _ = hf.load_workdir(str(tmp_path / "run"))
    assert cfg == hf.model_config_from_hf(model.config)
    model_type, notes = convert.workdir_to_hf(str(tmp_path / "run"), str(tmp_path / "out"))
    assert model_type == "qwen2_moe" and notes == []
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).state_dict()
    want = model.state_dict()
    assert sorted(back) == sorted(want)
    for name in want:
        assert torch.equal(back[name], want[name]), name
    with pytest.raises(ValueError, match=r"already holds checkpoints"):
        convert.hf_to_workdir(str(tmp_path / "src"), str(tmp_path / "run"))
