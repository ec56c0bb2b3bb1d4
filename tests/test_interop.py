"""Weight interchange with HuggingFace transformers (moe_jax/interop.py): small random blocks built locally (no
downloads), run in PyTorch and in moe_jax on the same input; outputs and aux losses agree to float32 tolerance,
and a round trip reproduces the weights exactly. Skipped when torch/transformers are missing."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from moe_jax import interop, losses  # noqa: E402
from moe_jax.moe import MoELayer  # noqa: E402

D, B, L = 16, 2, 8


def _random_block(kind, hf_config, seed=0):
    hf_config._experts_implementation = "eager"
    block = interop._converter(kind).new_block(hf_config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return block.eval()


def _x(seed=0, b=B):
    return np.random.default_rng(seed).standard_normal((b, L, D)).astype(np.float32)


def _torch(block, x):
    with torch.no_grad():
        return block(torch.from_numpy(x)).numpy()


def _jax(cfg, variables, x):
    return jax.jit(lambda v, x: MoELayer(cfg).apply(v, x))(variables, x)


def _state(block):
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


def _round_trip(kind, block, cfg, variables, seq_len=None):
    """moe_jax -> a new transformers block: the same tensors, bit for bit."""
    back, _ = interop.to_hf(kind, cfg, variables, D, seq_len=seq_len)
    before, after = _state(block), _state(back)
    assert sorted(before) == sorted(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    return back


def test_mixtral_block_outputs_and_load_balancing_loss():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    hf = MixtralConfig(hidden_size=D, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2)
    block = _random_block("mixtral", hf)
    x = _x()
    cfg, variables = interop.from_hf(block, hf)
    assert (cfg.router, cfg.k, cfg.glu, cfg.activation, cfg.dispatcher) == ("mixtral", 2, True, "silu", "dropless")
    y, stats = _jax(cfg, variables, x)
    np.testing.assert_allclose(y, _torch(block, x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        logits = block.gate(torch.from_numpy(x))[0]
    # transformers counts all K choices in f without dividing by K: K times moe_jax's loss.
    hf_lb = float(load_balancing_loss_func((logits,), 4, 2))
    assert hf_lb == pytest.approx(2 * float(stats.losses["load_balancing"]), rel=1e-5)
    np.testing.assert_allclose(np.asarray(logits).reshape(B, L, 4),
                               np.einsum("bld,de->ble", x, variables["params"]["router"]["gate"]["kernel"]),
                               rtol=1e-5, atol=1e-5)
    back = _round_trip("mixtral", block, cfg, variables)
    np.testing.assert_array_equal(_torch(back, x), _torch(block, x))


def test_switch_block_capacity_drops_and_aux_losses():
    """expert_capacity=2 of L=8 tokens over 4 experts: both drop the same tokens (the later ones of each
    sequence), outputs agree, the z-loss agrees, and transformers' load-balancing loss is the mean over
    sequences of moe_jax's per-sequence loss (equal to moe_jax's layer loss for one sequence)."""
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        load_balancing_loss_func, router_z_loss_func)

    hf = SwitchTransformersConfig(d_model=D, d_ff=8, num_experts=4, expert_capacity=2, dense_act_fn="relu")
    block = _random_block("switch", hf)
    x = _x(1)
    cfg, variables = interop.from_hf(block, hf, seq_len=L)
    assert (cfg.router, cfg.k, cfg.glu, cfg.group_size) == ("switch", 1, False, None)
    y, stats = _jax(cfg, variables, x)
    np.testing.assert_allclose(y, _torch(block, x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        kept, _, logits = block.router(torch.from_numpy(x))
    hf_drop = 1.0 - float(kept.sum()) / (B * L)
    assert hf_drop > 0.1 and float(stats.metrics["drop_fraction"]) == pytest.approx(hf_drop)
    dropped = (kept.sum(-1) == 0).numpy()  # [B, L]
    assert np.all(np.asarray(y)[dropped] == 0.0)  # dropped tokens: zero output (the residual carries them)
    assert float(router_z_loss_func(logits)) == pytest.approx(float(stats.losses["z_loss"]), rel=1e-5)
    probs = torch.softmax(logits, dim=-1)
    hf_lb = float(load_balancing_loss_func(probs, logits.argmax(-1)))
    p, idx = np.asarray(probs), np.asarray(logits.argmax(-1))[..., None]
    per_seq = [float(losses.load_balancing_loss(p[g:g + 1], idx[g:g + 1])) for g in range(B)]
    assert hf_lb == pytest.approx(np.mean(per_seq), rel=1e-5)
    _, one = _jax(cfg, variables, x[:1])
    assert float(load_balancing_loss_func(probs[:1], logits[:1].argmax(-1))) == pytest.approx(
        float(one.losses["load_balancing"]), rel=1e-5)
    back = _round_trip("switch", block, cfg, variables, seq_len=L)
    assert back.router.expert_capacity == 2
    with pytest.raises(ValueError, match="give seq_len=L"):
        interop.from_hf(block, hf)


def test_qwen2_moe_block_with_shared_expert():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    hf = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=8, shared_expert_intermediate_size=12, num_experts=4,
                        num_experts_per_tok=2, norm_topk_prob=False)
    block = _random_block("qwen2_moe", hf)
    x = _x(2)
    assert block.shared_expert_gate.weight.detach().abs().min().item() > 0  # a random gate: sigmoid(x . g) varies by token
    cfg, variables = interop.from_hf(block, hf)
    assert cfg.router == "top_k" and cfg.renormalize_top_k is False and cfg.shared_expert_hidden == 12
    assert cfg.shared_expert_gate
    y, stats = _jax(cfg, variables, x)
    np.testing.assert_allclose(y, _torch(block, x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        logits = block.gate(torch.from_numpy(x))[0]
    assert float(load_balancing_loss_func((logits,), 4, 2)) == pytest.approx(
        2 * float(stats.losses["load_balancing"]), rel=1e-5)
    back = _round_trip("qwen2_moe", block, cfg, variables)
    np.testing.assert_array_equal(_torch(back, x), _torch(block, x))


def test_deepseek_v3_block_with_bias_groups_and_shared_experts():
    """Sigmoid scores, group-limited top-2 (4 groups, keep 2) on the biased scores, unbiased renormalized
    weights times routed_scaling_factor, one shared expert; the bias is carried and changes the choice."""
    from transformers import DeepseekV3Config

    hf = DeepseekV3Config(hidden_size=D, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2,
                          n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5)
    block = _random_block("deepseek_v3", hf)
    bias = np.linspace(-0.4, 0.4, 8).astype(np.float32)
    with torch.no_grad():
        block.gate.e_score_correction_bias.copy_(torch.from_numpy(bias))
    x = _x(3)
    cfg, variables = interop.from_hf(block, hf)
    assert (cfg.router, cfg.n_groups, cfg.topk_groups, cfg.routed_scaling) == ("deepseek", 4, 2, 2.5)
    np.testing.assert_array_equal(variables["moe_state"]["router"]["expert_bias"], bias)
    y, _ = _jax(cfg, variables, x)
    expected = _torch(block, x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    unbiased = {**variables, "moe_state": {"router": {"expert_bias": np.zeros(8, np.float32)}}}
    assert np.abs(np.asarray(_jax(cfg, unbiased, x)[0]) - expected).max() > 1e-3  # the bias matters here
    back = _round_trip("deepseek_v3", block, cfg, variables)
    np.testing.assert_array_equal(_torch(back, x), expected)


def test_unsupported_settings_are_refused():
    from transformers import MixtralConfig, SwitchTransformersConfig

    with pytest.raises(ValueError, match="hidden_act='gelu' has no exact moe_jax activation"):
        interop.moe_config_from_hf("mixtral", MixtralConfig(hidden_size=D, intermediate_size=8, hidden_act="gelu"))
    with pytest.raises(ValueError, match="router_bias=True"):
        interop.moe_config_from_hf("switch", SwitchTransformersConfig(d_model=D, router_bias=True), seq_len=L)
    with pytest.raises(ValueError, match="unknown kind 'olmoe'"):
        interop.moe_config_from_hf("olmoe", None)
    with pytest.raises(ValueError, match="unsupported transformers block Linear"):
        interop.kind_of(torch.nn.Linear(2, 2))
