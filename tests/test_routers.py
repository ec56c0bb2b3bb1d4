"""Routers of the ``moe_jax.routers`` package: BASE, S-BASE, hash, Soft MoE, DeepSeek, batch priority, top-p, confidence.

Hand-built examples: the gate kernel is set so that the logits are known numbers (``x`` rows are unit vectors
or ``[m, 0]``), and the expected experts, slots and weights are derived in the comments. Plus equivalence with
``dispatch.loop_reference``, brute force for the balanced assignment, a bias-update run for DeepSeek, and a
causality check of every registered router against its ``causal`` flag.
"""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import dispatch, routing
from moe_jax.capacity import compute_capacity
from moe_jax.experts import BatchedExperts
from moe_jax.moe import MoEConfig, MoELayer, routing_stats
from moe_jax.routers import balanced_assignment, fine_grained, hash_expert, sequence_balance_loss, sinkhorn_log


# These graphs are tiny and run in microseconds: the tests pay for compilation, which LLVM optimisation makes
# about 3x slower on CPU. So every test function compiles once, without it.
_FAST_XLA = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn):
    """``jax.jit`` compiled without LLVM optimisation; the executable is cached by argument shapes."""
    jitted, cache = jax.jit(fn), {}

    def call(*args):
        leaves, treedef = jax.tree.flatten(args)
        if any(isinstance(a, jax.core.Tracer) for a in leaves):  # under jax.grad: the plain jit
            return jitted(*args)
        key = (treedef, tuple((np.shape(a), str(getattr(a, "dtype", type(a)))) for a in leaves))
        if key not in cache:
            cache[key] = jitted.lower(*args).compile(compiler_options=_FAST_XLA)
        return cache[key](*args)

    return call


def _route(cfg, x, kernel=None, mask=None, train=False, token_ids=None, capacity=None, state=None):
    """Apply router ``cfg.router`` alone on ``x[G, S, D]`` with the gate kernel replaced (one compile)."""
    module = routing.get_router_class(cfg.router)(cfg)

    @fast_jit
    def run(x, kernel, mask, token_ids, state):
        variables = dict(module.init({"params": jax.random.key(0)}, x, mask, token_ids=token_ids,
                                     capacity=capacity))
        if kernel is not None:
            variables["params"] = dict(variables["params"], gate={"kernel": kernel})
        if state is not None:
            variables["moe_state"] = state
        return module.apply(variables, x, mask, capacity=capacity, train=train, token_ids=token_ids,
                            rngs={"router": jax.random.key(1)})

    return run(x, None if kernel is None else jnp.asarray(kernel, jnp.float32), mask, token_ids, state)


def _expert_one(params, num_experts, d, hidden):
    """``(e, x[D]) -> [D]``: expert e of ``BatchedExperts`` with ``params`` (one compile per e)."""
    experts = BatchedExperts(num_experts, d, hidden)
    per_expert = [fast_jit(functools.partial(lambda e, v: experts.apply({"params": params}, e, v, method="one"),
                                             e)) for e in range(num_experts)]
    return lambda e, v: per_expert[e](v)


def _margins(m):
    """Tokens ``[m_s, 0]`` with gate kernel ``[[1, 0], [0, 0]]``: logits ``[m_s, 0]`` (E=2)."""
    x = jnp.stack([jnp.asarray(m, jnp.float32), jnp.zeros(len(m))], -1)[None]  # [1, S, 2]
    return x, jnp.asarray([[1.0, 0.0], [0.0, 0.0]])


def _sig(v):
    return 1.0 / (1.0 + np.exp(-np.asarray(v, np.float64)))


# ------------------------------------------------------------------------------------------------- hash


def _lowbias32(token, seed, e):
    """Plain-Python reference of ``hash_expert`` (32-bit wrap-around by masking)."""
    m = 0xFFFFFFFF
    x = (token + seed * 0x9E3779B9) & m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    x ^= x >> 16
    return x % e


def test_hash_router_hand_example():
    # lowbias32 of ids 0,1,2,3,7,100 is 0, 1753845952, 3507691905, 1408362973, 2492178918, 1217483446;
    # mod 4 -> experts 0, 0, 1, 1, 2, 2. With seed 1 the map changes to 2, 0, 2, 2, 3, 3.
    ids = jnp.asarray([[0, 1, 2, 3, 7, 100], [7, 7, 100, 0, 1, 1]])
    assert [_lowbias32(i, 0, 4) for i in [0, 1, 2, 3, 7, 100]] == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(hash_expert(ids[0], 4, 0), [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(hash_expert(ids[0], 4, 1), [_lowbias32(i, 1, 4) for i in [0, 1, 2, 3, 7, 100]])
    np.testing.assert_array_equal(hash_expert(ids[0], 4, 1), [2, 0, 2, 2, 3, 3])
    cfg = MoEConfig(num_experts=4, k=1, router="hash")
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]], bool)
    dec = _route(cfg, jnp.ones((2, 6, 3)), mask=mask, token_ids=ids, train=True)
    np.testing.assert_array_equal(dec.expert_index[..., 0], [[0, 0, 1, 1, 2, 2], [2, 2, 2, 0, 0, 0]])
    np.testing.assert_array_equal(dec.combine_weights, np.ones((2, 6, 1)))  # weight 1, no parameters
    np.testing.assert_array_equal(dec.valid[..., 0], mask)  # the padding token takes no slot
    np.testing.assert_allclose(jax.nn.logsumexp(dec.router_logits, -1), 0.0, atol=1e-6)  # zero z-loss
    with pytest.raises(ValueError, match="token_ids"):
        _route(cfg, jnp.ones((2, 6, 3)))


# ------------------------------------------------------------------------------------------- BASE layers


def _brute_force_balanced(scores):
    s, e = scores.shape
    best = -np.inf
    for perm in set(itertools.permutations(np.repeat(np.arange(e), s // e))):
        best = max(best, float(scores[np.arange(s), perm].sum()))
    return best


def test_balanced_assignment_is_balanced_and_optimal():
    rs = np.random.RandomState(0)
    scores = rs.randn(8, 6, 3).astype(np.float32)  # 90 balanced assignments per group
    scores[4:] += np.asarray([2.0, 0.0, -1.0], np.float32)  # skewed groups: greedy would overload expert 0
    assign = np.asarray(fast_jit(lambda a: balanced_assignment(a, 200))(jnp.asarray(scores)))
    for g in range(8):
        np.testing.assert_array_equal(np.bincount(assign[g], minlength=3), [2, 2, 2])
        got = float(scores[g, np.arange(6), assign[g]].sum())
        span = scores[g].max() - scores[g].min()
        # eps-optimal: within S * eps = 6 * 1e-3 * span of the optimum (and in practice equal to it).
        assert got >= _brute_force_balanced(scores[g]) - 6 * 1e-3 * span - 1e-5, g
    # A budget of one round cannot finish: the unassigned tokens fill the free slots, still exactly balanced.
    short = np.asarray(balanced_assignment(jnp.asarray(scores[4:5]), 1))
    np.testing.assert_array_equal(np.bincount(short[0], minlength=3), [2, 2, 2])


def test_base_router_hand_example():
    # logits [m_s, 0], m = [3, 2, 1, 0.5]: every token prefers e0. Balanced (2 per expert), the best total is
    # tokens 0, 1 -> e0 (3 + 2 + 0 + 0 = 5). Weight = sigmoid(score of the chosen expert):
    # sigmoid(3), sigmoid(2), sigmoid(0), sigmoid(0). Evaluation is greedy: all on e0, weights sigmoid(m).
    cfg = MoEConfig(num_experts=2, k=1, router="base")
    x, kernel = _margins([3.0, 2.0, 1.0, 0.5])
    dec = _route(cfg, x, kernel, train=True)
    np.testing.assert_array_equal(dec.expert_index[0, :, 0], [0, 0, 1, 1])
    np.testing.assert_allclose(dec.combine_weights[0, :, 0], _sig([3, 2, 0, 0]), rtol=1e-6)
    dec = _route(cfg, x, kernel, train=False)
    np.testing.assert_array_equal(dec.expert_index[0, :, 0], [0, 0, 0, 0])
    np.testing.assert_allclose(dec.combine_weights[0, :, 0], _sig([3, 2, 1, 0.5]), rtol=1e-6)
    # The router gets its gradient through the sigmoid weight.
    g = jax.grad(lambda k: jnp.sum(_route(cfg, x, k, train=True).combine_weights))(kernel)
    assert float(jnp.abs(g[0, 0])) > 0
    with pytest.raises(ValueError, match="moe.group_size"):
        _route(cfg, x[:, :3], kernel, train=True)  # S=3 is not a multiple of E=2


# ------------------------------------------------------------------------------------------------ S-BASE


def test_sinkhorn_router_hand_example():
    # logits [m_s, 0], m = [3, 2, 1, 0.5]. Sinkhorn converges to P(s -> e0) = sigmoid(m_s + d) with d set by
    # sum_s sigmoid(m_s + d) = 2 (balanced): d ~= -1.61, P(e0) ~= [0.80, 0.60, 0.35, 0.25]. Top-1 on that:
    # tokens 0, 1 -> e0 and 2, 3 -> e1. Weights: the ORIGINAL softmax, sigmoid(3), sigmoid(2), then
    # P(e1) = sigmoid(-1), sigmoid(-0.5). Evaluation: greedy, all -> e0 with sigmoid(m).
    cfg = MoEConfig(num_experts=2, k=1, router="sinkhorn", sinkhorn_iters=8)
    x, kernel = _margins([3.0, 2.0, 1.0, 0.5])
    p = np.exp(np.asarray(sinkhorn_log(x @ kernel, jnp.ones((1, 4), bool), 8)))[0]
    np.testing.assert_allclose(p[:, 0], [0.80, 0.60, 0.35, 0.25], atol=0.01)
    np.testing.assert_allclose(p.sum(0), [2.0, 2.0], atol=0.01)  # balanced columns
    dec = _route(cfg, x, kernel, train=True)
    np.testing.assert_array_equal(dec.expert_index[0, :, 0], [0, 0, 1, 1])
    np.testing.assert_allclose(dec.combine_weights[0, :, 0], _sig([3, 2, -1, -0.5]), rtol=1e-5)
    dec = _route(cfg, x, kernel, train=False)
    np.testing.assert_array_equal(dec.expert_index[0, :, 0], [0, 0, 0, 0])
    # A padding token neither takes a slot nor pulls the balance: with token 3 masked, the three real tokens
    # split 1.5 / 1.5, d ~= -2 and token 1 (m=2) sits on the fence; drop m to 1.9: tokens 1, 2 -> e1.
    mask = jnp.asarray([[1, 1, 1, 0]], bool)
    x2, _ = _margins([3.0, 1.9, 1.0, 100.0])
    dec = _route(cfg, x2, kernel, mask=mask, train=True)
    np.testing.assert_array_equal(dec.expert_index[0, :3, 0], [0, 1, 1])
    np.testing.assert_array_equal(dec.valid[0, :, 0], [True, True, True, False])


# ---------------------------------------------------------------------------------------------- Soft MoE


def test_soft_moe_matches_slot_loop_and_dispatchers():
    g_n, s_n, d_n, e_n, c_n = 2, 4, 4, 2, 2
    cfg = MoEConfig(num_experts=e_n, router="soft_moe", num_slots=c_n, expert_hidden=8, dispatcher="einsum")
    x = jax.random.normal(jax.random.key(3), (g_n, s_n, d_n))
    mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
    scatter_cfg = MoEConfig(**{**cfg.__dict__, "dispatcher": "scatter"})

    @fast_jit
    def run():  # one compile: init, decision, the layer with einsum and with scatter (which delegates)
        variables = MoELayer(cfg).init(jax.random.key(4), x, mask)
        dec = routing.get_router_class("soft_moe")(cfg).apply({"params": variables["params"]["router"]}, x, mask)
        return variables, dec, MoELayer(cfg).apply(variables, x, mask), MoELayer(scatter_cfg).apply(variables, x, mask)

    variables, dec, (y, stats), (y_scatter, _) = run()
    dw, cw = np.asarray(dec.dispatch_weights), np.asarray(dec.combine_weights)  # [G, S, E, C]
    np.testing.assert_allclose(dw.sum(1), 1.0, rtol=1e-5)  # each slot: a convex mixture of real tokens
    np.testing.assert_array_equal(dw[1, 2:], 0.0)  # padding feeds no slot
    np.testing.assert_allclose(cw.sum((2, 3)), np.asarray(mask, np.float32), rtol=1e-5)  # per token: 1 (or 0)
    one = _expert_one(variables["params"]["experts"], e_n, d_n, 8)
    ref = np.zeros((g_n, s_n, d_n))
    for g in range(g_n):
        for e in range(e_n):
            for c in range(c_n):
                slot_in = (dw[g, :, e, c, None] * np.asarray(x[g])).sum(0)  # slot = sum_s D[s,e,c] x_s
                slot_out = np.asarray(one(e, jnp.asarray(slot_in)))
                ref[g] += cw[g, :, e, c, None] * slot_out[None]  # y_s = sum_ec C[s,e,c] f_e(slot)
    np.testing.assert_allclose(y, ref, atol=1e-5)
    np.testing.assert_array_equal(y[1, 2:], 0.0)  # padding gets nothing
    np.testing.assert_allclose(y_scatter, y, atol=1e-6)
    assert float(stats.metrics["drop_fraction"]) == 0.0
    np.testing.assert_allclose(stats.metrics["capacity_factor"], c_n * e_n / s_n)  # slots per token
    np.testing.assert_allclose(stats.metrics["expert_load"].sum(), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="dropless"):
        MoEConfig(router="soft_moe", dispatcher="dropless").validate()
    with pytest.raises(ValueError, match="dropless"):
        dispatch.run_dropless(x, dec, None)


# ---------------------------------------------------------------------------------------------- DeepSeek


def _logit(p):
    p = np.asarray(p, np.float64)
    return np.log(p / (1 - p))


def test_deepseek_group_limited_top_k_bias_and_weights():
    # E=4 in n_groups=2 groups {0,1}, {2,3}; topk_groups=1, k=2, scaling 2.5. Token s has x = unit vector s, so
    # its logits are kernel row s = logit(scores) and its sigmoid scores are:
    #   t0: [0.9, 0.1, 0.8, 0.7] group sums of top-2: g0 = 1.0, g1 = 1.5 -> g1 -> experts (2, 3)
    #       (plain top-2 would take 0 and 2). Weights [0.8, 0.7] / 1.5 * 2.5 = [1.3333, 1.1667].
    #   t1: [0.6, 0.5, 0.2, 0.3]: g0 = 1.1, g1 = 0.5 -> experts (0, 1), weights [0.6, 0.5] / 1.1 * 2.5.
    scores = np.asarray([[0.9, 0.1, 0.8, 0.7], [0.6, 0.5, 0.2, 0.3]])
    kernel = np.zeros((4, 4))
    kernel[:2] = _logit(scores)
    x = jnp.eye(4)[None, :2]  # [1, 2, 4]
    cfg = MoEConfig(num_experts=4, k=2, router="deepseek", n_groups=2, topk_groups=1, routed_scaling=2.5)
    dec = _route(cfg, x, kernel)
    np.testing.assert_array_equal(dec.expert_index[0], [[2, 3], [0, 1]])
    np.testing.assert_allclose(dec.combine_weights[0], [[0.8 / 1.5 * 2.5, 0.7 / 1.5 * 2.5],
                                                        [0.6 / 1.1 * 2.5, 0.5 / 1.1 * 2.5]], rtol=1e-5)
    # Perfect balance (each expert once): f_i = E/(K T) * 1 = 1, so the sequence loss is sum_i P_i = 1.
    np.testing.assert_allclose(dec.aux_losses["seq_balance"], 1.0, rtol=1e-5)
    # Bias [0, 0, 0.4, 0.4] (selection only). t1 biased: [0.6, 0.5, 0.6, 0.7] -> g1 = 1.3 > g0 = 1.1 ->
    # experts (3, 2) by biased score; weights from the UNBIASED scores [0.3, 0.2] / 0.5 * 2.5 = [1.5, 1.0].
    state = {"expert_bias": jnp.asarray([0.0, 0.0, 0.4, 0.4])}
    dec = _route(cfg, x, kernel, state=state)
    np.testing.assert_array_equal(dec.expert_index[0], [[2, 3], [3, 2]])
    np.testing.assert_allclose(dec.combine_weights[0, 1], [1.5, 1.0], rtol=1e-5)
    # Sequence loss by hand: counts [0, 0, 2, 2] -> f = 4 / (2 * 2) * counts = [0, 0, 2, 2];
    # s' = s / sum s: t0 [.36, .04, .32, .28], t1 [.375, .3125, .125, .1875] -> P = [.3675, .17625, .2225, .23375]
    # L = 2 * (.2225 + .23375) = 0.9125.
    np.testing.assert_allclose(dec.aux_losses["seq_balance"], 0.9125, rtol=1e-5)
    np.testing.assert_allclose(
        sequence_balance_loss(jnp.asarray(scores)[None], dec.expert_index, dec.valid, jnp.ones((1, 2))), 0.9125,
        rtol=1e-5)
    # softmax scores (V2 style), no groups: weights are the renormalized softmax of the top-2, times scaling.
    cfg2 = MoEConfig(num_experts=4, k=2, router="deepseek", score_func="softmax", routed_scaling=2.0)
    dec = _route(cfg2, x, kernel)
    p = np.exp(kernel[:2]) / np.exp(kernel[:2]).sum(-1, keepdims=True)
    top = np.sort(p, -1)[:, ::-1][:, :2]
    np.testing.assert_allclose(dec.combine_weights[0], top / top.sum(-1, keepdims=True) * 2.0, rtol=1e-5)


def test_deepseek_bias_moves_and_max_vio_falls_on_a_skewed_stream():
    e, steps = 4, 40
    cfg = MoEConfig(num_experts=e, k=2, router="deepseek", bias_update_rate=0.02, router_init_std=0.3)
    x = jax.random.normal(jax.random.key(5), (4, 16, 8))  # fixed input, 64 tokens
    module = routing.get_router_class("deepseek")(cfg)
    variables = fast_jit(module.init)({"params": jax.random.key(6)}, x)
    assert "expert_bias" in variables["moe_state"] and "expert_bias" not in str(variables["params"])
    # Skew: expert 0's column gets a large constant through a constant feature -> most tokens pick expert 0.
    x = x.at[..., 0].set(3.0)
    params = variables["params"]
    params = {"gate": {"kernel": params["gate"]["kernel"].at[0, 0].set(1.0)}}

    def max_vio(dec):
        load = jnp.sum(jax.nn.one_hot(dec.expert_index, e), axis=(0, 1, 2))
        return jnp.max(load) / jnp.mean(load) - 1.0

    @fast_jit
    def run(state):
        def step(state, _):
            dec, new = module.apply({"params": params, "moe_state": state}, x, train=True,
                                    mutable=["moe_state"])
            return new["moe_state"], max_vio(dec)
        return jax.lax.scan(step, state, None, length=steps)

    state, vio = run(variables["moe_state"])
    bias, vio = np.asarray(state["expert_bias"]), np.asarray(vio)
    assert vio[0] > 0.8, vio[0]  # the stream is skewed
    assert vio[-5:].max() < 0.5 * vio[0], vio  # and the bias balances it
    assert bias[0] < -0.1 and np.all(bias[1:] > bias[0]), bias  # the overloaded expert was pushed down
    # Without a mutable 'moe_state' (or in evaluation) nothing moves and nothing fails.
    @fast_jit
    def frozen(state):
        _, same = module.apply({"params": params, "moe_state": state}, x, train=False, mutable=["moe_state"])
        module.apply({"params": params, "moe_state": state}, x, train=True)  # not mutable: no update, no error
        return same["moe_state"]["expert_bias"]

    np.testing.assert_array_equal(frozen(state), bias)


def test_fine_grained_helper():
    cfg = fine_grained(MoEConfig(num_experts=8, k=2, expert_hidden=256, router="deepseek"), 4, num_shared_experts=1)
    assert (cfg.num_experts, cfg.k, cfg.expert_hidden, cfg.num_shared_experts) == (32, 8, 64, 1)
    with pytest.raises(ValueError, match="expert_hidden"):
        fine_grained(MoEConfig(expert_hidden=10), 4)


# ------------------------------------------------------------------------------------ batch prioritized


def test_batch_prioritized_fills_by_confidence_and_matches_loop_reference():
    # logits [m_s, 0], m = [0.5, 1, 3, 2]: all prefer e0, confidence sigmoid(m) is highest for token 2.
    # C = 1 per expert: position order would give e0's slot to token 0; priority gives it to token 2.
    cfg = MoEConfig(num_experts=2, k=1, router="batch_prioritized", expert_hidden=4)
    x, kernel = _margins([0.5, 1.0, 3.0, 2.0])
    dec = _route(cfg, x, kernel)
    np.testing.assert_allclose(dec.priority[0], _sig([0.5, 1, 3, 2]), rtol=1e-6)
    experts = BatchedExperts(2, 2, 4)
    ev = fast_jit(experts.init)(jax.random.key(0), jnp.ones((2, 1, 2)))
    ref, ref_kept = dispatch.loop_reference(x, dec, _expert_one(ev["params"], 2, 2, 4), capacity=1)
    np.testing.assert_array_equal(ref_kept[0, :, 0], [False, False, True, False])
    for run in (dispatch.run_einsum, dispatch.run_scatter):
        out = fast_jit(lambda x, d: experts.apply(ev, x, d, method=lambda m, x, d: run(x, d, m, 1)))(x, dec)
        np.testing.assert_array_equal(out.kept, ref_kept)
        np.testing.assert_allclose(out.y, ref, atol=1e-6)
    with pytest.raises(ValueError, match="non-causal"):
        cfg.validate(causal=True)


# --------------------------------------------------------------------------------------------- dynamic k


def _prob_tokens(probs):
    """Tokens ``x = unit vector s`` with kernel rows ``log p``: softmax(logits) = p exactly."""
    probs = np.asarray(probs, np.float64)
    kernel = np.zeros((len(probs), probs.shape[1]))
    kernel[:, :] = np.log(probs)
    return jnp.eye(len(probs))[None], kernel


def test_top_p_hand_example():
    # p = 0.7, K_max = 3. Rank r is used iff the higher ranks' mass is < 0.7:
    #   t0 [.5, .3, .15, .05]: e0 (mass before 0), e1 (0.5) ; e2 has 0.8 before -> 2 experts, weights .5, .3
    #   t1 [.8, .1, .05, .05]: e0 only (0.8 before rank 1)                      -> 1 expert
    #   t2 [.25]*4           : ranks before-mass 0, .25, .5 -> capped at K_max  -> 3 experts
    #   t3 [.05, .15, .35, .45]: e3 (0), e2 (0.45); rank 2 has 0.8 before      -> 2 experts
    probs = [[.5, .3, .15, .05], [.8, .1, .05, .05], [.25] * 4, [.05, .15, .35, .45]]
    cfg = MoEConfig(num_experts=4, k=3, router="top_p", top_p=0.7)
    x, kernel = _prob_tokens(probs)
    dec = _route(cfg, x, kernel)
    np.testing.assert_array_equal(dec.valid[0], [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(dec.expert_index[0, 3, :2], [3, 2])
    np.testing.assert_allclose(dec.combine_weights[0, 0], [.5, .3, 0.0], rtol=1e-5)  # softmax probs, unused 0
    p = np.asarray(probs)
    np.testing.assert_allclose(dec.aux_losses["dynamic"], np.mean(-(p * np.log(p)).sum(-1)), rtol=1e-5)
    # With a capacity: histogram of experts per token (K_max + 1 bins) and the mean, through the layer stats.
    def stats_at(dec, capacity):
        def fn(dec):
            kept = dispatch.make_capacity_plan(dec, capacity, "token_major").kept
            return kept, routing_stats(cfg, dec, kept, jnp.ones((1, 4), bool), capacity)
        return fast_jit(fn)(dec)

    kept, stats = stats_at(dec, 4)
    np.testing.assert_allclose(stats.metrics["experts_per_token_hist"], [0, .25, .5, .25])
    np.testing.assert_allclose(stats.metrics["experts_per_token"], 2.0)
    # C = 1, token_major: t0 takes e0 and e1; t1's e0 is full -> nothing; t2 (experts 0, 1, 2 by index on the
    # tie) keeps only e2; t3 keeps e3, its e2 is full. Experts per token 2, 0, 1, 1 -> hist [.25, .5, .25, 0].
    kept, stats = stats_at(dec, 1)
    np.testing.assert_array_equal(kept[0], [[1, 1, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0]])
    np.testing.assert_allclose(stats.metrics["experts_per_token_hist"], [.25, .5, .25, 0])


def test_confidence_hand_example():
    # threshold 0.6: t0 top-1 0.7 > 0.6 -> e0 only; t1 top-1 0.5 <= 0.6 -> e0 and e1 (weights .5, .3).
    cfg = MoEConfig(num_experts=4, k=2, router="confidence", confidence_threshold=0.6)
    x, kernel = _prob_tokens([[.7, .2, .05, .05], [.5, .3, .1, .1]])
    dec = _route(cfg, x, kernel)
    np.testing.assert_array_equal(dec.valid[0], [[True, False], [True, True]])
    np.testing.assert_array_equal(dec.expert_index[0, 1], [0, 1])
    np.testing.assert_allclose(dec.combine_weights[0], [[.7, 0], [.5, .3]], rtol=1e-5)


@pytest.mark.parametrize("router,kw", [("top_p", dict(k=3, top_p=0.6)),
                                       ("confidence", dict(k=2, confidence_threshold=0.4))])
def test_dynamic_k_layer_matches_loop_reference(router, kw):
    """einsum, scatter (capacity from K_max, drops) and dropless against ``dispatch.loop_reference``."""
    g_n, s_n, d_n, e_n = 2, 8, 4, 4
    cfgs = {name: MoEConfig(num_experts=e_n, router=router, expert_hidden=8, dispatcher=name, router_init_std=0.5,
                            slot_order="token_major", eval_capacity_factor=0.75, **kw)
            for name in ("einsum", "scatter", "dropless")}
    x = jax.random.normal(jax.random.key(7), (g_n, s_n, d_n))
    mask = jnp.ones((g_n, s_n), bool).at[1, -1].set(False)

    @fast_jit
    def run():  # one compile: init, the router's decision, the layer with each dispatcher
        variables = MoELayer(cfgs["einsum"]).init(jax.random.key(8), x, mask)
        dec = routing.get_router_class(router)(cfgs["einsum"]).apply(
            {"params": variables["params"]["router"]}, x, mask)
        return variables, dec, {name: MoELayer(c).apply(variables, x, mask) for name, c in cfgs.items()}

    variables, dec, outs = run()
    k_max = cfgs["einsum"].k
    n_used = np.asarray(dec.valid).sum(-1)
    assert n_used[np.asarray(mask)].min() == 1 and n_used.max() == k_max  # really dynamic
    one = _expert_one(variables["params"]["experts"], e_n, d_n, 8)
    m = np.asarray(mask)
    # C from K_max: ceil(0.75 * K_max * 8 / 4) = 3 (confidence, K_max=2) or 5 (top_p, K_max=3).
    capacity = compute_capacity(s_n, e_n, k_max, 0.75)
    for name, cap in (("einsum", capacity), ("dropless", None)):
        ref, kept = dispatch.loop_reference(x, dec, one, cap, slot_order="token_major")
        names = ("einsum", "scatter") if cap else ("dropless",)
        per_token = np.asarray(kept).sum(-1)[m]
        for n in names:
            y, stats = outs[n]
            np.testing.assert_allclose(y, ref, atol=1e-5, err_msg=n)
            np.testing.assert_allclose(stats.metrics["experts_per_token_hist"],
                                       np.bincount(per_token, minlength=k_max + 1) / m.sum(), atol=1e-6)
            np.testing.assert_allclose(stats.metrics["experts_per_token"], per_token.mean(), rtol=1e-6)
        if cap:
            assert float(outs["einsum"][1].metrics["drop_fraction"]) > 0  # the capacity really binds


# ------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("kwargs,field", [
    (dict(router="base", k=2), "moe.k"),
    (dict(router="base", num_experts=4, group_size=6), "moe.group_size"),
    (dict(router="base", base_iters=0), "moe.base_iters"),
    (dict(router="sinkhorn", sinkhorn_iters=0), "moe.sinkhorn_iters"),
    (dict(router="hash", k=2), "moe.k"),
    (dict(router="soft_moe", num_slots=0), "moe.num_slots"),
    (dict(router="soft_moe", dispatcher="dropless"), "dropless"),
    (dict(router="deepseek", k=2, num_experts=4, n_groups=3), "moe.n_groups"),
    (dict(router="deepseek", k=2, num_experts=4, n_groups=2, topk_groups=3), "moe.topk_groups"),
    (dict(router="deepseek", k=3, num_experts=4, n_groups=2, topk_groups=1), "moe.topk_groups"),
    (dict(router="deepseek", k=2, score_func="relu"), "moe.score_func"),
    (dict(router="deepseek", k=1), "renormalize_top_k"),
    (dict(router="top_p", k=2, top_p=0.0), "moe.top_p"),
    (dict(router="top_p", k=1), "moe.k"),
    (dict(router="confidence", k=3), "moe.k"),
    (dict(router="confidence", k=2, confidence_threshold=1.5), "moe.confidence_threshold"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        MoEConfig(**kwargs).validate()


@pytest.mark.parametrize("name", ["base", "sinkhorn", "soft_moe", "batch_prioritized"])
def test_non_causal_routers_refused_in_causal_layer(name):
    with pytest.raises(ValueError, match="allow_non_causal"):
        MoEConfig(router=name, k=1).validate(causal=True)
    MoEConfig(router=name, k=1, allow_non_causal=True).validate(causal=True)


# --------------------------------------------------------------------------------------------- causality

B, L, D, E = 1, 8, 8, 4
# A valid config per router (k etc.); cf 0.5 makes C = ceil(0.5 * K * 8 / 4) = K, so assignments are dropped.
CAUSALITY_CONFIG = {
    "switch": dict(k=1), "base": dict(k=1), "hash": dict(k=1), "soft_moe": dict(k=1, num_slots=2),
    "expert_choice": dict(k=1), "top_p": dict(k=3, top_p=0.5), "confidence": dict(k=2, confidence_threshold=0.5),
    "deepseek": dict(k=2, n_groups=2, topk_groups=1), "sinkhorn": dict(k=1), "batch_prioritized": dict(k=1),
}


def _leaks(name):
    """Does the training output at positions <= t change when the tokens after t change (any t)?"""
    kw = dict(num_experts=E, router=name, expert_hidden=8, dispatcher="scatter", slot_order="token_major",
              capacity_factor=0.5, eval_capacity_factor=0.5, router_init_std=1.0, allow_non_causal=True)
    # Routers registered elsewhere get k=2, or k=1 if they refuse it; others belong in CAUSALITY_CONFIG.
    candidates = [CAUSALITY_CONFIG[name]] if name in CAUSALITY_CONFIG else [dict(k=2), dict(k=1)]
    for i, extra in enumerate(candidates):
        try:
            cfg = MoEConfig(**{**kw, **extra}).validate()
            break
        except ValueError:
            if i == len(candidates) - 1:
                raise
    layer = MoELayer(cfg, causal=True)
    kx, ka, ki, kj = jax.random.split(jax.random.key(0), 4)
    x, x_alt = jax.random.normal(kx, (B, L, D)), 3.0 * jax.random.normal(ka, (B, L, D))
    ids, ids_alt = jax.random.randint(ki, (B, L), 0, 50), jax.random.randint(kj, (B, L), 0, 50)
    # Row t of ``after`` marks the positions after t; the last row (t = L-1) changes nothing: the reference.
    after = jnp.arange(L)[None, :] > jnp.arange(L)[:, None]  # [t, position]

    @fast_jit
    def run():  # one compile per router; all L variants in one vmapped call
        variables = layer.init({"params": jax.random.key(1), "router": jax.random.key(1)}, x, token_ids=ids)

        def apply(x, ids):
            return layer.apply(variables, x, train=True, token_ids=ids, rngs={"router": jax.random.key(2)})
        xs = jnp.where(after[:, None, :, None], x_alt[None], x[None])  # [L, B, L, D]
        ys, stats = jax.vmap(apply)(xs, jnp.where(after[:, None, :], ids_alt[None], ids[None]))
        diff = jnp.max(jnp.abs(ys - ys[-1:]), axis=(1, 3))  # [L, L]
        return jnp.max(jnp.where(after, 0.0, diff)), stats.metrics["drop_fraction"][-1]

    before, drops = run()
    return float(before) > 1e-5, float(drops)


def test_every_router_is_causal_iff_its_flag_says_so():
    """Training mode, token-major slots, capacity drops: the measured leak must match ``Router.causal``."""
    report = {}
    for name in routing.router_names():
        leaks, drops = _leaks(name)
        report[name] = (leaks, drops)
        if name not in ("soft_moe", "expert_choice"):  # these drop nothing / by construction
            assert drops > 0, f"{name}: the check needs capacity drops"
    wrong = {n: v for n, v in report.items() if v[0] == routing.get_router_class(n).causal}
    assert not wrong, f"measured leak disagrees with the causal flag (name: (leaks, drop_fraction)): {wrong}"


def test_registry_names_are_stable_and_each_module_name_says_its_routers():
    # The registry names are configs' public API; the module of each router is named after its family.
    where = {"top_k": "routing", "switch": "routing", "gshard": "routing", "mixtral": "routing",
             "noisy_top_k": "routing", "expert_choice": "routing",
             "base": "routers.balanced", "sinkhorn": "routers.balanced", "hash": "routers.hash",
             "soft_moe": "routers.soft_moe", "deepseek": "routers.deepseek",
             "batch_prioritized": "routers.batch_prioritized", "top_p": "routers.dynamic_k",
             "confidence": "routers.dynamic_k"}
    assert routing.router_names() == sorted(where)
    for name, module in where.items():
        assert routing.get_router_class(name).__module__ == f"moe_jax.{module}", name
