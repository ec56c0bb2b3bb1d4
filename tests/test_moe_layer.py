"""MoELayer end to end: config errors, hand-computed MoEStats, drops, router gradients, dtypes, determinism."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.experts import DenseFFN
from moe_jax.moe import MoEConfig, MoELayer

# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_experts=4, k=5), "k=5"),
        (dict(num_experts=4, k=1, router="top_k", renormalize_top_k=True), "renormalize_top_k"),
        (dict(num_experts=4, k=1, router="mixtral"), "renormalize_top_k"),  # mixtral renormalizes by default
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(eval_capacity_factor=0.0), "eval_capacity_factor"),
        (dict(router="no_such_router"), "router"),
        (dict(router="switch", k=2), "k=2"),
        (dict(router="gshard", k=3), "k=3"),
        (dict(router="noisy_top_k", k=1), "k=1"),
        (dict(second_policy="sometimes", k=2), "second_policy"),
        (dict(dispatcher="magic"), "dispatcher"),
        (dict(slot_order="random"), "slot_order"),
        (dict(router="expert_choice", dispatcher="dropless"), "dispatcher='dropless'"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    # the message names the field as `moe.<field>` or `MoEConfig.<field>`
    cfg = MoEConfig(**kwargs)
    with pytest.raises(ValueError, match=r"(moe|MoEConfig)\." + field):
        cfg.validate()


def test_unknown_router_lists_known_ones():
    with pytest.raises(ValueError) as err:
        MoEConfig(router="no_such_router").validate()
    for name in ["top_k", "switch", "gshard", "mixtral", "noisy_top_k", "expert_choice"]:
        assert name in str(err.value)


def test_non_causal_router_refused_in_causal_layer_unless_opted_in():
    cfg = MoEConfig(router="expert_choice", k=1)
    cfg.validate(causal=False)  # fine outside a causal model
    with pytest.raises(ValueError, match=r"moe.router='expert_choice' is non-causal.*allow_non_causal"):
        cfg.validate(causal=True)
    MoEConfig(router="expert_choice", k=1, allow_non_causal=True).validate(causal=True)


def test_choice_major_k2_refused_in_causal_layer():
    with pytest.raises(ValueError, match=r"slot_order='choice_major'.*token_major"):
        MoEConfig(k=2, slot_order="choice_major", dispatcher="scatter").validate(causal=True)
    MoEConfig(k=2, slot_order="token_major", dispatcher="scatter").validate(causal=True)
    MoEConfig(k=2, slot_order="choice_major", dispatcher="dropless").validate(causal=True)  # nothing drops
    MoEConfig(k=1, slot_order="choice_major", dispatcher="scatter").validate(causal=True)  # K=1 is causal


def test_group_size_must_divide_tokens():
    cfg = MoEConfig(num_experts=4, k=1, expert_hidden=8, group_size=3)
    x = jnp.ones((2, 4, 4))  # 8 tokens, groups of 3 do not fit
    with pytest.raises(ValueError, match=r"moe.group_size=3 does not divide"):
        jax.eval_shape(MoELayer(cfg).init, jax.random.key(0), x)


def test_dropless_impl_checked_at_run_time():
    cfg = MoEConfig(num_experts=4, k=1, expert_hidden=8, dispatcher="dropless", dropless_impl="fast")
    with pytest.raises(ValueError, match="dropless_impl"):
        jax.eval_shape(MoELayer(cfg).init, jax.random.key(0), jnp.ones((1, 4, 4)))


# --------------------------------------------------------------------------------------------- helpers


def make_params(cfg: MoEConfig, d: int, seed: int = 0):
    """The layer's params built directly with numpy (an eager ``layer.init`` costs seconds of op-by-op
    compiles on CPU). ``test_make_params_matches_init`` holds the structure against ``MoELayer.init``."""
    rng = np.random.default_rng(seed)
    e, f = cfg.num_experts, cfg.expert_hidden

    def normal(shape, std):
        return jnp.asarray(rng.normal(size=shape) * std, jnp.float32)

    router = {"gate": {"kernel": normal((d, e), cfg.router_init_std)}}
    if cfg.router == "noisy_top_k":
        router["noise"] = {"kernel": jnp.zeros((d, e), jnp.float32)}
    experts = {"wi": normal((e, d, f), d ** -0.5), "wo": normal((e, f, d), f ** -0.5)}
    if cfg.glu:
        experts["wg"] = normal((e, d, f), d ** -0.5)
    params = {"router": router, "experts": experts}
    if cfg.num_shared_experts:
        width = cfg.num_shared_experts * (cfg.shared_expert_hidden or f)
        params["shared"] = {"wi": normal((d, width), d ** -0.5), "wo": normal((width, d), width ** -0.5)}
        if cfg.glu:
            params["shared"]["wg"] = normal((d, width), d ** -0.5)
    return params


def test_make_params_matches_init():
    cfg = MoEConfig(num_experts=4, k=2, router="noisy_top_k", expert_hidden=8, glu=True, num_shared_experts=2)
    x = jnp.zeros((1, 4, 8))
    init = jax.eval_shape(MoELayer(cfg).init, jax.random.key(0), x)  # traces, compiles nothing
    assert set(init) == {"params"}
    shapes = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), init["params"])
    assert shapes == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), make_params(cfg, 8))


# ----------------------------------------------------------------------------------- hand-computed stats

# B=1, L=8, D=E=4. Token s is the one-hot row of expert EXPERTS[s]; the gate kernel is ln(3) * I, so each
# token's logits are ln 3 on its expert and 0 elsewhere: probs 3/6 = 1/2 there and 1/6 on the others.
EXPERTS = [0, 0, 0, 0, 0, 1, 1, 2]
X_ONEHOT = jnp.asarray(np.eye(4, dtype=np.float32)[EXPERTS][None])  # [1, 8, 4]


def _hand_layer(**kw):
    # eval capacity: C = ceil(1.25 * 1 * 8 / 4) = ceil(2.5) = 3
    cfg = MoEConfig(num_experts=4, k=1, router="top_k", expert_hidden=8, eval_capacity_factor=1.25,
                    dispatcher=kw.pop("dispatcher", "scatter"), **kw)
    layer = MoELayer(cfg)
    params = make_params(cfg, 4)
    params["router"]["gate"]["kernel"] = math.log(3.0) * jnp.eye(4)
    return layer, {"params": params}


def test_stats_hand_example_and_dropped_tokens_are_zero():
    layer, variables = _hand_layer()
    y, stats = jax.jit(lambda v, x, m: layer.apply(v, x, m))(variables, X_ONEHOT, jnp.ones((1, 8), bool))
    m = stats.metrics
    # e0 gets t0..t4 in slots 0..4; C = 3 keeps t0, t1, t2 and drops t3, t4. e1 gets t5, t6; e2 gets t7.
    np.testing.assert_allclose(m["drop_fraction"], 2 / 8, rtol=1e-6)  # 2 of 8 assignments dropped
    np.testing.assert_allclose(m["capacity_factor"], 3 * 4 / (1 * 8), rtol=1e-6)  # C*E/(K*S) = 1.5
    np.testing.assert_allclose(m["expert_load"], [5 / 8, 2 / 8, 1 / 8, 0], rtol=1e-6)  # before drops
    np.testing.assert_allclose(m["max_vio"], 4 * 5 / 8 - 1, rtol=1e-6)  # max/mean - 1 = 1.5
    np.testing.assert_allclose(m["top1_prob"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(m["experts_per_token"], 6 / 8, rtol=1e-6)
    # entropy of (1/2, 1/6, 1/6, 1/6) = 1/2 ln 2 + 1/2 ln 6
    np.testing.assert_allclose(m["router_entropy"], 0.5 * math.log(2) + 0.5 * math.log(6), rtol=1e-6)
    # load balancing: 31/24 (derivation in test_losses); z-loss: logsumexp = ln(3 + 3) -> (ln 6)^2
    np.testing.assert_allclose(stats.losses["load_balancing"], 31 / 24, rtol=1e-5)
    np.testing.assert_allclose(stats.losses["z_loss"], math.log(6) ** 2, rtol=1e-5)
    np.testing.assert_allclose(stats.aux_loss, 1e-2 * 31 / 24 + 1e-3 * math.log(6) ** 2, rtol=1e-5)
    # dropped tokens (t3, t4) contribute exactly zero (no shared experts); kept ones do not
    y = np.asarray(y[0])
    assert np.all(y[3:5] == 0.0)
    assert np.all(np.abs(y[[0, 1, 2, 5, 6, 7]]).sum(-1) > 0)
    # each kept token is its expert's output times the combine weight 1/2; the expert in numpy:
    # gelu(x wi) wo with flax's default tanh-approximate gelu
    wi, wo = (np.asarray(variables["params"]["experts"][n], np.float64) for n in ("wi", "wo"))
    for s in [0, 1, 2, 5, 6, 7]:
        e, xs = EXPERTS[s], np.asarray(X_ONEHOT[0, s], np.float64)
        h = xs @ wi[e]
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
        np.testing.assert_allclose(y[s], 0.5 * (h @ wo[e]), atol=1e-5)

    # With the last token (t7, expert 2) as padding:
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1, 1, 0]], bool)
    y_m, stats_m = jax.jit(lambda v, x, m: layer.apply(v, x, m))(variables, X_ONEHOT, mask)
    m = stats_m.metrics
    np.testing.assert_allclose(m["drop_fraction"], 2 / 7, rtol=1e-6)  # 7 real assignments, 2 dropped
    np.testing.assert_allclose(m["expert_load"], [5 / 7, 2 / 7, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(m["max_vio"], 4 * 5 / 7 - 1, rtol=1e-6)
    np.testing.assert_allclose(m["capacity_factor"], 1.5, rtol=1e-6)  # C * E / (K * S): S counts padding
    # f = [5, 2, 0, 0] / 7; P_0 = (5/2 + 2/6) / 7 = 17/42, P_1 = (2/2 + 5/6) / 7 = 11/42
    # LB = 4 * (5/7 * 17/42 + 2/7 * 11/42) = 428/294
    np.testing.assert_allclose(stats_m.losses["load_balancing"], 428 / 294, rtol=1e-5)
    assert np.all(np.asarray(y_m[0, 7]) == 0.0)  # padding is routed nowhere
    np.testing.assert_allclose(y_m[0, :7], y[:7], atol=1e-6)

    # An all-padding batch: nothing assigned, so nothing dropped (drop_fraction 0, not 1), output zero,
    # finite losses.
    y_0, stats_0 = jax.jit(lambda v, x, m: layer.apply(v, x, m))(variables, X_ONEHOT, jnp.zeros((1, 8), bool))
    assert float(stats_0.metrics["drop_fraction"]) == 0.0
    assert float(stats_0.metrics["experts_per_token"]) == 0.0
    assert np.all(np.asarray(y_0) == 0.0)
    assert np.isfinite(float(stats_0.aux_loss))


def test_dropped_token_gets_only_the_shared_expert():
    layer, variables = _hand_layer(num_shared_experts=1)
    y, _ = jax.jit(layer.apply)(variables, X_ONEHOT)
    shared = DenseFFN(8, "gelu").apply({"params": variables["params"]["shared"]}, X_ONEHOT)
    # dropped t3, t4: exactly the shared FFN; kept tokens: shared FFN plus something
    np.testing.assert_allclose(y[0, 3:5], shared[0, 3:5], atol=1e-6)
    assert float(jnp.abs(y[0, :3] - shared[0, :3]).min()) > 0


# Expert choice, E = D = 2, S = 4 (same logits as test_routing.X2): probs t0 [.75,.25], t1 [.25,.75],
# t2 [.8,.2], t3 [.1,.9]. capacity_factor 0.5: C = ceil(0.5 * 1 * 4 / 2) = 1 -> e0 takes t2, e1 takes t3.
# Expert choice uses the training capacity factor at eval too (C is the work each expert does, not a drop limit),
# so eval_capacity_factor=2.0 must not matter.
def test_expert_choice_stats_hand_example():
    cfg = MoEConfig(num_experts=2, k=1, router="expert_choice", expert_hidden=8, capacity_factor=0.5,
                    eval_capacity_factor=2.0, dispatcher="einsum")
    x = jnp.asarray([[[math.log(3), 0], [0, math.log(3)], [math.log(4), 0], [0, math.log(9)]]], jnp.float32)
    layer = MoELayer(cfg)
    params = make_params(cfg, 2)
    params["router"]["gate"]["kernel"] = jnp.eye(2)
    y, stats = jax.jit(layer.apply)({"params": params}, x)
    m = stats.metrics
    np.testing.assert_allclose(m["drop_fraction"], 0.5, rtol=1e-6)  # t0, t1 taken by nobody
    np.testing.assert_allclose(m["expert_load"], [0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(m["capacity_factor"], 1 * 2 / (1 * 4), rtol=1e-6)
    np.testing.assert_allclose(m["experts_per_token"], 2 / 4, rtol=1e-6)
    np.testing.assert_allclose(m["top1_prob"], (.75 + .75 + .8 + .9) / 4, rtol=1e-6)
    assert np.all(np.asarray(y[0, :2]) == 0.0)
    assert np.all(np.abs(np.asarray(y[0, 2:])).sum(-1) > 0)
    assert "load_balancing" not in stats.losses and "z_loss" in stats.losses


# ------------------------------------------------------------------------------- dispatchers in the layer


def test_dispatchers_agree_inside_the_layer():
    # Same params, K=2 with drops (cf 0.5): einsum == scatter. With a large capacity nothing drops and
    # dropless (both impls) == einsum.
    x = jax.random.normal(jax.random.key(1), (2, 8, 8))
    variants = [("einsum", 0.5, "blocks"), ("scatter", 0.5, "blocks"), ("einsum", 4.0, "blocks"),
                ("dropless", None, "blocks"), ("dropless", None, "ragged_dot")]

    def cfg_of(name, cf, impl):
        return MoEConfig(num_experts=4, k=2, router="mixtral", expert_hidden=16, dispatcher=name,
                         eval_capacity_factor=cf or 1.0, dropless_impl=impl, slot_order="token_major",
                         router_init_std=1.0)

    params = make_params(cfg_of(*variants[0]), 8)

    @jax.jit
    def run_all(params, x):  # one compile for all five layers
        return {v: MoELayer(cfg_of(*v)).apply({"params": params}, x) for v in variants}

    outs = run_all(params, x)
    y_e, s_e = outs[("einsum", 0.5, "blocks")]
    y_s, s_s = outs[("scatter", 0.5, "blocks")]
    assert float(s_e.metrics["drop_fraction"]) > 0
    np.testing.assert_allclose(y_e, y_s, atol=1e-5)
    np.testing.assert_allclose(s_e.metrics["drop_fraction"], s_s.metrics["drop_fraction"])
    y_big, s_big = outs[("einsum", 4.0, "blocks")]
    assert float(s_big.metrics["drop_fraction"]) == 0.0
    for impl in ["blocks", "ragged_dot"]:
        y_d, s_d = outs[("dropless", None, impl)]
        np.testing.assert_allclose(y_d, y_big, atol=1e-5)
        assert float(s_d.metrics["drop_fraction"]) == 0.0
    assert float(jnp.abs(y_big - y_e).max()) > 1e-3  # the drops did change something


def test_capacity_compute_filled_equals_full():
    # scatter with the experts on their filled rows only ('filled', the CPU default) == all G*C buffer rows
    # ('full'), in output, stats and gradients; K=2 at train capacity factor 0.5, so something drops.
    x = jax.random.normal(jax.random.key(2), (2, 8, 8))
    r = jax.random.normal(jax.random.key(3), (2, 8, 8))

    def cfg_of(compute):
        return MoEConfig(num_experts=4, k=2, router="mixtral", expert_hidden=16, dispatcher="scatter",
                         capacity_factor=0.5, slot_order="token_major", router_init_std=1.0, glu=True,
                         capacity_compute=compute)

    assert cfg_of("auto").resolved_capacity_compute() == ("filled" if jax.default_backend() == "cpu" else "full")
    assert cfg_of("auto").resolved_capacity_compute(sharded=True) == "full"
    params = make_params(cfg_of("full"), 8)

    @jax.jit
    def run_both(params, x):
        def loss(compute):
            def f(params, x):
                y, stats = MoELayer(cfg_of(compute)).apply({"params": params}, x, train=True)
                return jnp.sum(y * r) + stats.aux_loss, (y, stats)
            return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)
        return {c: loss(c) for c in ("full", "filled")}

    outs = run_both(params, x)
    (l_full, (y_full, s_full)), g_full = outs["full"]
    (l_fill, (y_fill, s_fill)), g_fill = outs["filled"]
    assert float(s_full.metrics["drop_fraction"]) > 0
    np.testing.assert_allclose(y_fill, y_full, atol=1e-5)
    np.testing.assert_allclose(l_fill, l_full, atol=1e-5)
    np.testing.assert_allclose(s_fill.metrics["drop_fraction"], s_full.metrics["drop_fraction"])
    for a, b in zip(jax.tree.leaves(g_fill), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="moe.capacity_compute"):
        cfg_of("some").validate()


def test_group_size_splits_sequences_into_independent_groups():
    # x [B=2, L=8, D] with group_size=4 is G=4 groups of S=4 tokens: the same as a batch of four length-4
    # sequences with one group per sequence (group_size=None). Capacity is per group:
    # eval  C = ceil(1.0 * 2 * 4 / 4) = 2 -> capacity_factor metric C*E/(K*S) = 2*4/(2*4) = 1.0
    # train C = ceil(0.5 * 2 * 4 / 4) = 1 -> 0.5
    x = jax.random.normal(jax.random.key(1), (2, 8, 8))
    kw = dict(num_experts=4, k=2, router="mixtral", expert_hidden=8, dispatcher="scatter", router_init_std=1.0,
              slot_order="token_major", capacity_factor=0.5, eval_capacity_factor=1.0)
    grouped, per_seq = MoELayer(MoEConfig(group_size=4, **kw)), MoELayer(MoEConfig(**kw))
    variables = {"params": make_params(MoEConfig(**kw), 8)}

    @jax.jit
    def run(v, x):
        return (grouped.apply(v, x), per_seq.apply(v, x.reshape(4, 4, 8)),
                grouped.apply(v, x, train=True, rngs={"router": jax.random.key(0)}))

    (y_g, s_g), (y_s, s_s), (_, s_train) = run(variables, x)
    np.testing.assert_allclose(y_g.reshape(4, 4, 8), y_s, atol=1e-6)
    for name in ["drop_fraction", "expert_load", "capacity_factor", "top1_prob"]:
        np.testing.assert_allclose(s_g.metrics[name], s_s.metrics[name], rtol=1e-6)
    assert float(s_g.metrics["drop_fraction"]) > 0
    np.testing.assert_allclose(s_g.metrics["capacity_factor"], 1.0)
    np.testing.assert_allclose(s_train.metrics["capacity_factor"], 0.5)
    assert float(s_train.metrics["drop_fraction"]) > float(s_g.metrics["drop_fraction"])


# ------------------------------------------------------------------------------------ gradients, dtypes


@pytest.mark.parametrize("router, k, dispatcher", [("top_k", 1, "scatter"), ("mixtral", 2, "einsum"),
                                                   ("top_k", 2, "dropless")])
def test_task_loss_gradient_reaches_router(router, k, dispatcher):
    cfg = MoEConfig(num_experts=4, k=k, router=router, expert_hidden=8, dispatcher=dispatcher)
    x = jax.random.normal(jax.random.key(1), (2, 4, 8))
    target = jax.random.normal(jax.random.key(2), (2, 4, 8))
    layer = MoELayer(cfg)
    variables = {"params": make_params(cfg, 8)}

    @jax.jit
    def task_grad(params):
        def loss(p):
            y, _ = layer.apply({"params": p}, x, train=True, rngs={"router": jax.random.key(3)})
            return jnp.sum((y - target) ** 2)  # task loss only: no aux loss
        return jax.grad(loss)(params)

    g = task_grad(variables["params"])
    gate = np.asarray(g["router"]["gate"]["kernel"])
    assert np.all(np.isfinite(gate))
    assert np.abs(gate).sum() > 1e-6, "no gradient reaches the router"


def test_bfloat16_layer_keeps_router_in_float32():
    cfg = MoEConfig(num_experts=4, k=2, router="mixtral", expert_hidden=8, dispatcher="scatter")
    x = jax.random.normal(jax.random.key(1), (2, 4, 8))
    layer16 = MoELayer(cfg, dtype=jnp.bfloat16)
    variables = {"params": make_params(cfg, 8)}

    @jax.jit
    def run(v, x):
        return layer16.apply(v, x.astype(jnp.bfloat16), capture_intermediates=True, mutable=["intermediates"])

    (y16, stats), state = run(variables, x)
    decision = state["intermediates"]["router"]["__call__"][0]
    assert decision.router_logits.dtype == jnp.float32
    assert decision.router_probs.dtype == jnp.float32
    assert decision.combine_weights.dtype == jnp.float32
    assert state["intermediates"]["router"]["gate"]["__call__"][0].dtype == jnp.float32
    assert y16.dtype == jnp.bfloat16
    assert stats.aux_loss.dtype == jnp.float32
    y32, _ = jax.jit(MoELayer(cfg).apply)(variables, x)
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("router, k", [("switch", 1), ("noisy_top_k", 2)])
def test_eval_is_deterministic_and_needs_no_rng(router, k):
    cfg = MoEConfig(num_experts=4, k=k, router=router, expert_hidden=8, second_policy="random" if k == 2 else "all",
                    dispatcher="scatter")
    x = jax.random.normal(jax.random.key(1), (2, 4, 8))
    layer = MoELayer(cfg)
    variables = {"params": make_params(cfg, 8)}
    run = jax.jit(lambda v, x: layer.apply(v, x, train=False))
    y1, s1 = run(variables, x)
    y2, s2 = run(variables, x)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(s1.aux_loss, s2.aux_loss)
    # training draws from the 'router' stream: without it, a clear flax error
    with pytest.raises(Exception, match="router"):
        layer.apply(variables, x, train=True)


# ------------------------------------------------------------------------------------- README example


def test_readme_example_inside_a_model():
    cfg = MoEConfig(num_experts=8, k=2, router="mixtral", expert_hidden=256, slot_order="token_major")

    # The docstring example's config and calls, inside a model with a Dense before and after.
    class TinyModel(nn.Module):
        @nn.compact
        def __call__(self, tokens, train: bool):
            h = nn.Dense(16)(tokens)
            y, stats = MoELayer(cfg, causal=True)(h, train=train)
            h = h + y  # residual: dropped tokens pass through
            return nn.Dense(3)(h), stats

    model = TinyModel()
    inputs = jax.random.normal(jax.random.key(1), (2, 8, 5))
    labels = jax.random.randint(jax.random.key(2), (2, 8), 0, 3)
    params = jax.jit(lambda k, x: model.init({"params": k}, x, train=False))(jax.random.key(3), inputs)["params"]

    @jax.jit
    def loss_and_grad(params, rng):
        def loss_fn(p):
            logits, stats = model.apply({"params": p}, inputs, train=True, rngs={"router": rng})
            ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))
            return ce + stats.aux_loss, (ce, stats)
        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss, (ce, stats)), grads = loss_and_grad(params, jax.random.key(4))
    assert np.isfinite(float(loss)) and float(loss) > float(ce)  # aux terms are positive
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)), path
        assert np.abs(g).sum() > 0, f"no gradient for {jax.tree_util.keystr(path)}"


def test_bfloat16_einsum_gradients_match_scatter():
    """In bfloat16 the einsum's custom backward (routing weights' gradient gathered, float32 dot products)
    gives the gradients of the scatter path, with drops (cf 0.5), in the parameters' float32 dtype."""
    base = dict(num_experts=4, k=2, router="mixtral", expert_hidden=16, capacity_factor=0.5,
                slot_order="token_major", router_init_std=1.0)
    cfgs = {name: MoEConfig(dispatcher=name, **base) for name in ("einsum", "scatter")}
    x = jax.random.normal(jax.random.key(3), (2, 8, 8))
    r = jax.random.normal(jax.random.key(4), (2, 8, 8))
    params = make_params(cfgs["einsum"], 8)

    @jax.jit
    def grads(params, x):
        def loss(name):
            def f(p, x):
                y, stats = MoELayer(cfgs[name], dtype=jnp.bfloat16).apply({"params": p}, x.astype(jnp.bfloat16),
                                                                          train=True)
                return jnp.sum(y.astype(jnp.float32) * r), stats.metrics["drop_fraction"]
            return jax.grad(f, argnums=(0, 1), has_aux=True)(params, x)
        return {name: loss(name) for name in cfgs}

    out = grads(params, x)
    (g_e, drop_e), (g_s, drop_s) = out["einsum"], out["scatter"]
    assert float(drop_e) > 0 and float(drop_e) == float(drop_s)
    flat_e, flat_s = jax.tree.leaves_with_path(g_e), jax.tree.leaves_with_path(g_s)
    assert [p for p, _ in flat_e] == [p for p, _ in flat_s]
    for (path, a), (_, b) in zip(flat_e, flat_s):
        assert a.dtype == b.dtype, path
        scale = float(jnp.abs(b).max())
        assert scale > 0, path  # every gradient, the router's included, is reached
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=0.03 * scale,
                                   err_msg=str(path))
    assert g_e[0]["router"]["gate"]["kernel"].dtype == jnp.float32
