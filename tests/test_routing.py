"""Every router on a hand-built example: which expert, which slot, what weight, what is dropped.

The gate kernel is set to the identity (D = E), so the router logits equal the input rows and every
probability below is a fraction that can be checked by hand.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import dispatch, routing
from moe_jax.moe import MoEConfig

L2, L4 = math.log(2.0), math.log(4.0)

# One group (G=1), S=4 tokens, E=D=4. Rows are the logits:
#   t0: [ln4, ln2, 0, 0] -> probs [1/2, 1/4, 1/8, 1/8]
#   t1: [ln4, 0, ln2, 0] -> probs [1/2, 1/8, 1/4, 1/8]
#   t2: [ln2, 0, 0, ln4] -> probs [1/4, 1/8, 1/8, 1/2]
#   t3: [ln4, ln2, 0, 0] -> probs [1/2, 1/4, 1/8, 1/8]
X4 = jnp.asarray([[[L4, L2, 0, 0], [L4, 0, L2, 0], [L2, 0, 0, L4], [L4, L2, 0, 0]]], jnp.float32)
PROBS4 = np.array([[[.5, .25, .125, .125], [.5, .125, .25, .125], [.25, .125, .125, .5], [.5, .25, .125, .125]]])


def route(cfg, x, mask=None, capacity=None, train=False, rngs=None, kernel=None, extra_params=None):
    """Init the router named in cfg, set its gate kernel (identity by default), apply it."""
    cls = routing.get_router_class(cfg.router)
    module = cls(cfg)
    # eval_shape: the param structure without running (and compiling) the initializers
    shapes = jax.eval_shape(lambda: module.init({"params": jax.random.key(0), "router": jax.random.key(1)}, x,
                                                mask, capacity=capacity))
    params = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), dict(shapes["params"]))
    d, e = params["gate"]["kernel"].shape
    params["gate"] = {"kernel": jnp.eye(d, e, dtype=jnp.float32) if kernel is None else kernel}
    params.update(extra_params or {})
    return module.apply({"params": params}, x, mask, capacity=capacity, train=train, rngs=rngs)


def test_registry_contents_and_causality_flags():
    names = routing.router_names()
    for name in ["top_k", "switch", "gshard", "mixtral", "noisy_top_k", "expert_choice"]:
        assert name in names
    assert routing.is_causal("top_k") and routing.is_causal("mixtral") and routing.is_causal("noisy_top_k")
    assert not routing.is_causal("expert_choice")
    with pytest.raises(ValueError, match=r"MoEConfig.router.*known routers: .*expert_choice.*top_k"):
        routing.get_router_class("no_such_router")


def test_top_k_k1_hand_example():
    cfg = MoEConfig(num_experts=4, k=1, router="top_k")
    dec = route(cfg, X4)
    np.testing.assert_allclose(dec.router_probs, PROBS4, atol=1e-6)
    np.testing.assert_allclose(dec.router_logits, X4, atol=1e-6)
    # argmax of each token: e0, e0, e3, e0; weight = its softmax probability 1/2 (not renormalized)
    np.testing.assert_array_equal(dec.expert_index[0, :, 0], [0, 0, 3, 0])
    np.testing.assert_allclose(dec.combine_weights[0, :, 0], [.5, .5, .5, .5], atol=1e-6)
    # capacity C=2: e0 receives t0 (slot 0), t1 (slot 1), t3 (slot 2 -> dropped); e3 receives t2 (slot 0)
    plan = dispatch.make_capacity_plan(dec, capacity=2)
    np.testing.assert_array_equal(plan.slot[0, :, 0], [0, 1, 0, 2])
    np.testing.assert_array_equal(plan.kept[0, :, 0], [True, True, True, False])
    np.testing.assert_allclose(plan.weight[0, :, 0], [.5, .5, .5, 0.0], atol=1e-6)


def test_top_k_k2_hand_example_both_slot_orders():
    cfg = MoEConfig(num_experts=4, k=2, router="top_k")  # renormalize off by default
    dec = route(cfg, X4)
    # top-2 per token: t0 (e0 1/2, e1 1/4), t1 (e0 1/2, e2 1/4), t2 (e3 1/2, e0 1/4), t3 (e0 1/2, e1 1/4)
    np.testing.assert_array_equal(dec.expert_index[0], [[0, 1], [0, 2], [3, 0], [0, 1]])
    np.testing.assert_allclose(dec.combine_weights[0], [[.5, .25]] * 4, atol=1e-6)
    # choice_major slots: k=0: t0->e0 #0, t1->e0 #1, t2->e3 #0, t3->e0 #2
    #                     k=1: t0->e1 #0, t1->e2 #0, t2->e0 #3, t3->e1 #1
    cm = dispatch.make_capacity_plan(dec, capacity=3, slot_order="choice_major")
    np.testing.assert_array_equal(cm.slot[0], [[0, 0], [1, 0], [0, 3], [2, 1]])
    # C=3: only t2's second choice (e0 #3) is dropped; t3's *first* choice got e0's last slot.
    np.testing.assert_array_equal(cm.kept[0], [[1, 1], [1, 1], [1, 0], [1, 1]])
    np.testing.assert_allclose(cm.weight[0], [[.5, .25], [.5, .25], [.5, 0], [.5, .25]], atol=1e-6)
    # token_major slots: t0: e0 #0, e1 #0; t1: e0 #1, e2 #0; t2: e3 #0, e0 #2; t3: e0 #3, e1 #1
    tm = dispatch.make_capacity_plan(dec, capacity=3, slot_order="token_major")
    np.testing.assert_array_equal(tm.slot[0], [[0, 0], [1, 0], [0, 2], [3, 1]])
    # C=3: now t3's first choice (e0 #3) is dropped and t2's second choice is kept.
    np.testing.assert_array_equal(tm.kept[0], [[1, 1], [1, 1], [1, 1], [0, 1]])
    np.testing.assert_allclose(tm.weight[0], [[.5, .25], [.5, .25], [.5, .25], [0, .25]], atol=1e-6)


@pytest.mark.parametrize("name", ["mixtral", "gshard"])
def test_renormalized_top2_hand_example(name):
    cfg = MoEConfig(num_experts=4, k=2, router=name)  # both renormalize by default
    dec = route(cfg, X4)
    np.testing.assert_array_equal(dec.expert_index[0], [[0, 1], [0, 2], [3, 0], [0, 1]])
    # (1/2, 1/4) / (3/4) = (2/3, 1/3)
    np.testing.assert_allclose(dec.combine_weights[0], [[2 / 3, 1 / 3]] * 4, atol=1e-6)
    # router_probs stay the softmax over all experts (used by the load-balancing loss)
    np.testing.assert_allclose(dec.router_probs, PROBS4, atol=1e-6)
    assert bool(jnp.all(dec.valid))
    # C=2, choice_major: e0 gets t0 #0, t1 #1, t3 #2 (drop), t2's 2nd #3 (drop); e1 gets t0 #0, t3 #1
    plan = dispatch.make_capacity_plan(dec, capacity=2)
    np.testing.assert_array_equal(plan.kept[0], [[1, 1], [1, 1], [1, 0], [0, 1]])
    np.testing.assert_allclose(plan.weight[0], [[2 / 3, 1 / 3], [2 / 3, 1 / 3], [2 / 3, 0], [0, 1 / 3]],
                               atol=1e-6)


def test_gshard_random_second_policy():
    # GShard: in training the 2nd expert is dispatched with probability min(1, 2 * g2 / (g1 + g2)).
    #   64 tokens [ln4, ln4, 0, 0]: g1 = g2 -> probability 1 -> always kept
    #   64 tokens [20, 0, -20, -20]: g2 / (g1 + g2) ~ 2e-9 -> essentially never kept
    #   128 tokens = t0 of X4: g2 / (g1 + g2) = 1/3 -> kept with probability 2/3 (std of the mean 0.042)
    rows = [[L4, L4, 0, 0]] * 64 + [[20.0, 0, -20, -20]] * 64 + [[L4, L2, 0, 0]] * 128
    x = jnp.asarray([rows], jnp.float32)  # [1, 256, 4]
    cfg = MoEConfig(num_experts=4, k=2, router="gshard", second_policy="random")
    dec = route(cfg, x, train=True, rngs={"router": jax.random.key(3)})
    valid = np.asarray(dec.valid[0])
    assert valid[:, 0].all()  # first choices always dispatched
    assert valid[:64, 1].all()
    assert not valid[64:128, 1].any()
    frac = valid[128:, 1].mean()
    assert 2 / 3 - 0.17 < frac < 2 / 3 + 0.17, frac
    # combine weights are the renormalized top-2 either way (t0: 2/3, 1/3)
    np.testing.assert_allclose(dec.combine_weights[0, 128:], [[2 / 3, 1 / 3]] * 128, atol=1e-6)
    # evaluation: deterministic, every second choice dispatched, no 'router' rng needed
    dec_eval = route(cfg, x, train=False)
    assert bool(jnp.all(dec_eval.valid))


def test_switch_hand_example_and_jitter():
    cfg = MoEConfig(num_experts=4, k=1, router="switch")
    dec = route(cfg, X4)  # eval: no jitter, no rng needed
    np.testing.assert_array_equal(dec.expert_index[0, :, 0], [0, 0, 3, 0])
    np.testing.assert_allclose(dec.combine_weights[0, :, 0], [.5] * 4, atol=1e-6)
    # train: input multiplied by U(0.99, 1.01) -> logits move by at most 1.01% of ln 4 ~ 0.014: same argmax,
    # weights within ~1% of 1/2, but not exactly 1/2 any more.
    dec_t = route(cfg, X4, train=True, rngs={"router": jax.random.key(5)})
    np.testing.assert_array_equal(dec_t.expert_index[0, :, 0], [0, 0, 3, 0])
    np.testing.assert_allclose(dec_t.combine_weights[0, :, 0], [.5] * 4, atol=0.01)
    assert not np.allclose(dec_t.combine_weights, dec.combine_weights, atol=1e-7, rtol=0)


def test_noisy_top_k_hand_example():
    cfg = MoEConfig(num_experts=4, k=2, router="noisy_top_k")
    dec = route(cfg, X4)  # eval: H(x) = clean logits
    np.testing.assert_array_equal(dec.expert_index[0], [[0, 1], [0, 2], [3, 0], [0, 1]])
    # softmax over the two kept logits (ln4, ln2) = (4, 2) / 6 = (2/3, 1/3)
    np.testing.assert_allclose(dec.combine_weights[0], [[2 / 3, 1 / 3]] * 4, atol=1e-6)
    # importance = summed gates [7/3, 2/3, 1/3, 2/3] -> CV^2 = 11/18 (see test_losses)
    np.testing.assert_allclose(dec.aux_losses["importance"], 11 / 18, rtol=1e-5)
    # eval load = CV^2 of hard counts [4, 2, 1, 1] = 1.5 / 4 = 0.375
    np.testing.assert_allclose(dec.aux_losses["load"], 0.375, rtol=1e-5)
    # training with the noise kernel at -30: softplus(-30 x) ~ 0, so the noise scale is the floor
    # noise_eps=1e-2; the logit margins (>= ln 2) dwarf it, so the choices are the eval ones.
    noise_kernel = jnp.full((4, 4), -30.0)
    dec_t = route(cfg, X4, train=True, rngs={"router": jax.random.key(2)},
                  extra_params={"noise": {"kernel": noise_kernel}})
    np.testing.assert_array_equal(dec_t.expert_index, dec.expert_index)
    np.testing.assert_allclose(dec_t.combine_weights, dec.combine_weights, atol=0.03)
    assert np.isfinite(dec_t.aux_losses["load"]) and np.isfinite(dec_t.aux_losses["importance"])


# Expert choice, E = D = 2, S = 4:
#   t0: [ln3, 0] -> probs [.75, .25];  t1: [0, ln3] -> [.25, .75]
#   t2: [ln4, 0] -> [.8, .2];          t3: [0, ln9] -> [.1, .9]
X2 = jnp.asarray([[[math.log(3), 0], [0, math.log(3)], [L4, 0], [0, math.log(9)]]], jnp.float32)


def test_expert_choice_hand_example():
    cfg = MoEConfig(num_experts=2, k=1, router="expert_choice")
    # C=1: e0 takes its best token t2 (.8), e1 takes t3 (.9); t0 and t1 are dropped (taken by nobody).
    dec = route(cfg, X2, capacity=1)
    assert dec.kind == "expert_choice"
    np.testing.assert_array_equal(dec.token_index[0], [[2], [3]])
    np.testing.assert_allclose(dec.combine_weights[0], [[.8], [.9]], atol=1e-6)
    # C=2: e0 takes t2 (.8), t0 (.75); e1 takes t3 (.9), t1 (.75): every token exactly once.
    dec = route(cfg, X2, capacity=2)
    np.testing.assert_array_equal(dec.token_index[0], [[2, 0], [3, 1]])
    np.testing.assert_allclose(dec.combine_weights[0], [[.8, .75], [.9, .75]], atol=1e-6)
    assert bool(jnp.all(dec.valid))


def test_expert_choice_padding_is_never_chosen_before_real_tokens():
    cfg = MoEConfig(num_experts=2, k=1, router="expert_choice")
    mask = jnp.asarray([[1, 1, 0, 1]], bool)  # t2 is padding
    # C=2: e0 scores [.75, .25, pad, .1] -> t0, t1; e1 scores [.25, .75, pad, .9] -> t3, t1
    dec = route(cfg, X2, mask=mask, capacity=2)
    np.testing.assert_array_equal(dec.token_index[0], [[0, 1], [3, 1]])
    np.testing.assert_allclose(dec.combine_weights[0], [[.75, .25], [.9, .75]], atol=1e-6)
    # C=4: the padding token comes last, is not valid and has weight 0
    dec = route(cfg, X2, mask=mask, capacity=4)
    np.testing.assert_array_equal(dec.token_index[0], [[0, 1, 3, 2], [3, 1, 0, 2]])
    np.testing.assert_array_equal(dec.valid[0], [[1, 1, 1, 0], [1, 1, 1, 0]])
    np.testing.assert_allclose(dec.combine_weights[0], [[.75, .25, .1, 0], [.9, .75, .25, 0]], atol=1e-6)


def test_token_choice_padding_is_invalid():
    cfg = MoEConfig(num_experts=4, k=2, router="mixtral")
    mask = jnp.asarray([[1, 0, 1, 1]], bool)
    dec = route(cfg, X4, mask=mask)
    np.testing.assert_array_equal(dec.valid[0], [[1, 1], [0, 0], [1, 1], [1, 1]])
    # t1 takes no slot: e0 gets t0 #0, t3 #1 (first choices), then t2's second choice #2
    plan = dispatch.make_capacity_plan(dec, capacity=2)
    np.testing.assert_array_equal(plan.kept[0], [[1, 1], [0, 0], [1, 0], [1, 1]])


@pytest.mark.parametrize("name, k", [("top_k", 2), ("noisy_top_k", 2), ("expert_choice", 1)])
def test_router_computes_in_float32(name, k):
    cfg = MoEConfig(num_experts=4, k=k, router=name)
    dec = route(cfg, X4.astype(jnp.bfloat16), capacity=2)
    assert dec.router_logits.dtype == jnp.float32
    assert dec.router_probs.dtype == jnp.float32
    assert dec.combine_weights.dtype == jnp.float32


def test_narrow_matmul_gradients_by_hand():
    # x[3, 2] @ w[2, 1] (E=1 < D=2), loss = sum(g * (x @ w)) with g = [1, 2, 3]:
    #   dw = x^T g = [1*1 + 3*2 + 5*3, 2*1 + 4*2 + 6*3] = [22, 28];  dx = g w^T = [[1, -1], [2, -2], [3, -3]].
    from moe_jax.experts import narrow_matmul
    x = jnp.asarray([[1., 2.], [3., 4.], [5., 6.]])
    w = jnp.asarray([[1.], [-1.]])
    g = jnp.asarray([[1.], [2.], [3.]])
    dx, dw = jax.grad(lambda x, w: jnp.sum(g * narrow_matmul(x, w)), argnums=(0, 1))(x, w)
    np.testing.assert_array_equal(np.asarray(dw), [[22.], [28.]])
    np.testing.assert_array_equal(np.asarray(dx), [[1., -1.], [2., -2.], [3., -3.]])
    np.testing.assert_array_equal(np.asarray(narrow_matmul(x, w)), [[-1.], [-1.], [-1.]])


def test_router_gate_gradients_match_the_plain_product(monkeypatch):
    # The gate runs through experts.narrow_dot_general; its gradients (gate kernel and input) must equal those
    # of the plain lax.dot_general, for a narrow gate (E=4 < D=16, narrow_matmul) and a wide one (E=16 > D=8,
    # which falls through to lax.dot_general).
    for d, e in [(16, 4), (8, 16)]:
        cfg = MoEConfig(num_experts=e, k=2, router="top_k")
        x = jax.random.normal(jax.random.key(0), (2, 8, d))
        module = routing.get_router_class("top_k")(cfg)
        params = module.init({"params": jax.random.key(1)}, x)["params"]

        def loss(params, x):
            dec = module.apply({"params": params}, x)
            return jnp.sum(dec.combine_weights * jnp.arange(1.0, 3.0)) + jnp.sum(dec.router_logits ** 2)

        got = jax.grad(loss, argnums=(0, 1))(params, x)
        with monkeypatch.context() as m:
            m.setattr(routing, "narrow_dot_general", jax.lax.dot_general)
            want = jax.grad(loss, argnums=(0, 1))(params, x)
        assert float(jnp.max(jnp.abs(got[0]["gate"]["kernel"]))) > 0
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                     got, want)


def test_narrow_matmul_weight_gradient_is_computed_as_e_by_d_on_cpu():
    # The point of narrow_matmul: the compiled weight gradient is a dot into [E, D] (then a small transpose),
    # not a dot into [D, E], which XLA:CPU runs several times slower (docs/perf.md, "What the library does for
    # speed on CPU"). Without the barrier XLA folds the transpose back and the [E, D] dot disappears.
    if jax.default_backend() != "cpu":
        pytest.skip("checks XLA:CPU's compiled dots")
    from moe_jax.experts import narrow_matmul
    x, w = jnp.ones((64, 32)), jnp.ones((32, 4))
    for f, want in [(narrow_matmul, True), (jnp.matmul, False)]:
        hlo = jax.jit(jax.grad(lambda w, x: jnp.sum(f(x, w) ** 2))).lower(w, x).compile().as_text()
        dots = [line for line in hlo.splitlines() if " dot(" in line]
        assert dots, hlo
        assert any("f32[4,32]" in line.split(" dot(")[0] for line in dots) is want, dots
