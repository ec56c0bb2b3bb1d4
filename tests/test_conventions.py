"""Routing conventions of the field: load-balancing scopes (by hand, and against transformers' functions where
it has them), the sigmoid-gated shared expert (by hand), and routing replay (a pass replaying its own
decisions gives the same output and gradients)."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from moe_jax import losses, moe
from moe_jax.model import ModelConfig, Transformer, init_variables
from moe_jax.moe import MoEConfig, MoELayer

# Hand example, E = 2, K = 1, two groups of S = 2 tokens:
#   group 0 chooses (e0, e0), probs (0.8, 0.2), (0.6, 0.4): f = (1, 0), P = (0.7, 0.3)       -> 2 * 0.7 = 1.4
#   group 1 chooses (e1, e0), probs (0.3, 0.7), (0.5, 0.5): f = (.5, .5), P = (0.4, 0.6)     -> 2 * 0.5 = 1.0
#   pooled:                     f = (3/4, 1/4), P = (0.55, 0.45) -> 2 * (0.4125 + 0.1125) = 1.05
PROBS = np.array([[[0.8, 0.2], [0.6, 0.4]], [[0.3, 0.7], [0.5, 0.5]]], np.float32)  # [G=2, S=2, E=2]
INDEX = np.array([[[0], [0]], [[1], [0]]], np.int32)  # [G, S, K=1]
MASK = np.ones((2, 2), bool)
VALID = np.ones((2, 2, 1), bool)


def _scope(name, rows, probs=PROBS, index=INDEX, mask=MASK, valid=VALID):
    return float(moe.LB_SCOPES[name](jnp.asarray(probs), jnp.asarray(index), jnp.asarray(mask), jnp.asarray(valid),
                                     rows))


def test_load_balancing_scopes_by_hand():
    assert _scope("batch", 2) == pytest.approx(1.05, rel=1e-6)
    assert _scope("group", 2) == pytest.approx((1.4 + 1.0) / 2, rel=1e-6)
    # one group of S = 4 tokens holding B = 2 sequences: 'group' pools them, 'sequence' averages the two
    one = lambda a: a.reshape((1, 4) + a.shape[2:])
    args = dict(probs=one(PROBS), index=one(INDEX), mask=one(MASK), valid=one(VALID))
    assert _scope("group", 2, **args) == pytest.approx(1.05, rel=1e-6)
    assert _scope("sequence", 2, **args) == pytest.approx(1.2, rel=1e-6)
    # a sequence of padding only counts nowhere: sequence 1 masked -> sequence 0's 1.4
    assert _scope("sequence", 2, **{**args, "mask": np.array([[1, 1, 0, 0]], bool)}) == pytest.approx(1.4, rel=1e-6)
    # 'layers': group 0 as layer A, group 1 as layer B, pooled before the product (not the mean, 1.2)
    parts = [losses.load_balancing_parts(jnp.asarray(PROBS[i:i + 1]), jnp.asarray(INDEX[i:i + 1])) for i in (0, 1)]
    assert float(losses.pooled_load_balancing(parts)) == pytest.approx(1.05, rel=1e-6)
    assert float(losses.pooled_load_balancing(parts[:1])) == pytest.approx(1.4, rel=1e-6)


def test_global_scope_pools_over_pmap_devices():
    """Under pmap each device holds one group: 'batch' gives each device its own loss (1.4, 1.0), 'global' the
    loss of the whole batch (1.05) on both."""
    from moe_jax.parallel import PMAP_AXIS

    if jax.local_device_count() < 2:
        pytest.skip("needs 2 devices")
    fn = lambda name: jax.pmap(lambda p, i: moe.LB_SCOPES[name](p, i, jnp.ones(p.shape[:2], bool),
                                                                jnp.ones(i.shape, bool), 1),
                               axis_name=PMAP_AXIS, devices=jax.local_devices()[:2])
    split = lambda a: jnp.asarray(a)[:, None]  # [2 devices, G=1, S, ...]
    np.testing.assert_allclose(fn("batch")(split(PROBS), split(INDEX)), [1.4, 1.0], rtol=1e-6)
    np.testing.assert_allclose(fn("global")(split(PROBS), split(INDEX)), [1.05, 1.05], rtol=1e-6)


def test_scopes_against_transformers():
    """'layers' == transformers' causal-LM load_balancing_loss_func (pooled over layers) / K; 'sequence' ==
    Switch Transformers' load_balancing_loss_func (per sequence, mean over sequences; K = 1)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as mixtral_lb
    from transformers.models.switch_transformers.modeling_switch_transformers import \
        load_balancing_loss_func as switch_lb

    rng = np.random.default_rng(0)
    b, l, e, k = 2, 6, 4, 2
    logits = [rng.normal(size=(b * l, e)).astype(np.float32) for _ in range(3)]  # 3 layers
    parts = []
    for lg in logits:
        probs = jax.nn.softmax(jnp.asarray(lg), -1)
        _, idx = jax.lax.top_k(probs, k)
        parts.append(losses.load_balancing_parts(probs[None], idx[None]))
    hf = float(mixtral_lb(tuple(torch.from_numpy(x) for x in logits), e, k))
    assert k * float(losses.pooled_load_balancing(parts)) == pytest.approx(hf, rel=1e-6)

    probs = jax.nn.softmax(jnp.asarray(logits[0].reshape(1, b * l, e)), -1)  # one group holding 2 sequences
    idx = jnp.argmax(probs, -1)[..., None]
    ours = float(moe.LB_SCOPES["sequence"](probs, idx, jnp.ones((1, b * l), bool), jnp.ones(idx.shape, bool), b))
    theirs = float(switch_lb(torch.from_numpy(np.array(probs).reshape(b, l, e)),
                             torch.from_numpy(np.array(idx).reshape(b, l))))
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_layers_scope_in_the_model_is_pooled_once():
    """With lb_scope='layers' the model's aux_loss is coef * (loss pooled over both MoE layers) + z-losses;
    the per-layer values are still reported, and the pooled one is not their mean."""
    cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, d_ff=32, moe_every=1,
                      moe=MoEConfig(num_experts=4, k=2, router="mixtral", expert_hidden=16, dispatcher="dropless",
                                    lb_scope="layers", lb_loss_coef=0.5, z_loss_coef=0.25))
    model = Transformer(cfg)
    v = jax.jit(lambda k: init_variables(model, k, 8))(jax.random.key(0))
    v = jax.tree.map(lambda a: a * 20.0 if a.ndim == 2 and a.shape[-1] == 4 else a, v)  # sharp, unbalanced routers
    _, aux = jax.jit(model.apply)(v, jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 8))))
    pooled = float(aux["pooled_load_balancing"])
    per_layer = np.asarray(aux["losses"]["load_balancing"])
    assert abs(pooled - per_layer.mean()) > 1e-4
    want = 0.5 * pooled + 0.25 * float(np.sum(aux["losses"]["z_loss"]))
    assert float(aux["aux_loss"]) == pytest.approx(want, rel=1e-6)


# ------------------------------------------------------------------------------- sigmoid-gated shared expert


def test_sigmoid_gated_shared_expert_by_hand():
    """y = routed(x) + sigmoid(x . g) * shared(x): the gated layer's output minus the routed-only layer's is the
    ungated layer's shared part scaled per token by sigmoid(x . g) (computed here in numpy)."""
    base = dict(num_experts=4, k=2, router="mixtral", expert_hidden=16, dispatcher="dropless", glu=True,
                activation="silu")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 16)), jnp.float32)
    gated_cfg = MoEConfig(**base, num_shared_experts=1, shared_expert_gate=True)
    v = jax.jit(MoELayer(gated_cfg).init)(jax.random.key(0), x)
    assert v["params"]["shared_gate"]["kernel"].shape == (16, 1)
    g = np.random.default_rng(1).normal(size=(16, 1)).astype(np.float32)
    v = {"params": {**v["params"], "shared_gate": {"kernel": jnp.asarray(g)}}}
    y_gated, _ = jax.jit(MoELayer(gated_cfg).apply)(v, x)
    ungated = {"params": {k: a for k, a in v["params"].items() if k != "shared_gate"}}
    y_ungated, _ = jax.jit(MoELayer(MoEConfig(**base, num_shared_experts=1)).apply)(ungated, x)
    routed = {"params": {k: a for k, a in v["params"].items() if k not in ("shared_gate", "shared")}}
    y_routed, _ = jax.jit(MoELayer(MoEConfig(**base)).apply)(routed, x)
    gate = 1.0 / (1.0 + np.exp(-(np.asarray(x) @ g)))  # [B, L, 1]
    np.testing.assert_allclose(np.asarray(y_gated), np.asarray(y_routed) + gate * np.asarray(y_ungated - y_routed),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"moe\.shared_expert_gate=True needs moe\.num_shared_experts >= 1"):
        MoEConfig(**base, shared_expert_gate=True).validate()
    with pytest.raises(ValueError, match=r"moe\.lb_scope"):
        MoEConfig(**base, lb_scope="micro_batch").validate()


# ---------------------------------------------------------------------------------------- routing replay


def _replay_model():
    return ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, d_ff=32, moe_every=1,
                       moe=MoEConfig(num_experts=4, k=2, router="mixtral", expert_hidden=16, dispatcher="dropless"))


def test_replaying_own_decisions_gives_same_output_and_gradients():
    cfg = _replay_model()
    model = Transformer(cfg)
    v = jax.jit(lambda k: init_variables(model, k, 8))(jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 8)))
    _, aux = jax.jit(lambda v, t: model.apply(v, t, return_routing=True))(v, tokens)
    routing = aux["routing"]
    assert routing["expert_index"].shape == (2, 2, 8, 2) and routing["weights"].shape == (2, 2, 8, 2)
    np.testing.assert_allclose(np.asarray(routing["weights"]).sum(-1), 1.0, rtol=1e-6)  # mixtral: renormalized

    def loss(params, replay):
        logits, aux = model.apply({"params": params}, tokens, replay=replay)
        return jnp.mean(logits ** 2) + aux["aux_loss"], logits

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (l0, y0), g0 = grad(v["params"], None)
    (l1, y1), g1 = grad(v["params"], routing["expert_index"])
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0))
    assert float(l1) == float(l0)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # other decisions change the output, and the router still gets a gradient through the replayed weights
    other = (routing["expert_index"] + 1) % 4
    (_, y2), g2 = grad(v["params"], other)
    assert np.abs(np.asarray(y2 - y0)).max() > 1e-4
    assert np.abs(np.asarray(g2["block_0"]["moe"]["router"]["gate"]["kernel"])).max() > 0


def test_replay_refusals():
    cfg = _replay_model()
    model = Transformer(cfg)
    v = jax.jit(lambda k: init_variables(model, k, 8))(jax.random.key(0))
    tokens = jnp.zeros((2, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"replay must be \[num_moe_layers=2, B, L, K\]"):
        model.apply(v, tokens, replay=jnp.zeros((1, 2, 8, 2), jnp.int32))
    hash_cfg = MoEConfig(num_experts=4, k=1, router="hash", expert_hidden=16, dispatcher="dropless")
    x = jnp.ones((2, 8, 16))
    lv = MoELayer(hash_cfg).init(jax.random.key(0), x, token_ids=jnp.zeros((2, 8), jnp.int32))
    with pytest.raises(ValueError, match=r"moe\.router='hash' does not support routing replay"):
        MoELayer(hash_cfg).apply(lv, x, token_ids=jnp.zeros((2, 8), jnp.int32), replay=jnp.zeros((2, 8, 1), jnp.int32))
