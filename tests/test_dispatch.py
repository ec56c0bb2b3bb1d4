"""Every dispatcher equals ``dispatch.loop_reference`` in output and gradients, drops included.

The routing decision is built by hand (random but fixed numpy integers, skewed so that capacity overflows);
the combine weights, the input and the expert parameters are differentiated. Gradients are taken of
``sum(y * R)`` for a fixed random ``R``.
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import capacity as capacity_lib
from moe_jax import dispatch
from moe_jax import gmm as gmm_lib
from moe_jax.experts import BatchedExperts
from moe_jax.routing import RoutingDecision

G, S, D, F, E = 2, 6, 4, 8, 4


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    kind: str = "token_choice"
    k: int = 1
    capacity: Optional[int] = 2
    slot_order: str = "choice_major"
    priority: bool = False
    glu: bool = True
    seed: int = 0
    sort_slots: bool = False  # capacity.assign_slots counts slots by sorting (its 'auto' from 32 experts on)


def _decision_arrays(case: Case, seed: int):
    """Concrete (numpy) discrete parts of a decision + initial combine weights."""
    rng = np.random.default_rng(seed)
    if case.kind == "expert_choice":
        c = case.capacity
        token = np.stack([np.stack([rng.permutation(S)[:c] for _ in range(E)]) for _ in range(G)])  # [G, E, C]
        valid = rng.random((G, E, c)) > 0.2
        w = rng.uniform(0.1, 1.0, (G, E, c)).astype(np.float32)
        return dict(token_index=token.astype(np.int32), valid=valid, priority=None), w
    # skewed token choice: the last expert is popular, so it overflows at C=2 (S=6 tokens per group) and the
    # last row of the [E, G*C] buffer is taken (a dropped assignment wrongly sent there would collide)
    p = np.array([0.25, 0.1, 0.1, 0.55])
    idx = np.stack([np.stack([rng.choice(E, size=case.k, replace=False, p=p) for _ in range(S)])
                    for _ in range(G)])  # [G, S, K]
    valid = np.ones((G, S, case.k), bool)
    valid[0, 4, :] = False  # a padding token
    if case.k == 2:
        valid[1, 2, 1] = False  # an assignment that does not exist (dynamic k)
    w = rng.uniform(0.1, 1.0, (G, S, case.k)).astype(np.float32)
    prio = rng.random((G, S)).astype(np.float32) if case.priority else None
    return dict(expert_index=idx.astype(np.int32), valid=valid, priority=prio), w


def _decision(case: Case, arrays, w) -> RoutingDecision:
    # The discrete parts stay numpy arrays (concrete even under jit: the loop reference reads them with
    # np.asarray). Logits/probs are not used by dispatchers.
    zeros = np.zeros((G, S, E), np.float32)
    return RoutingDecision(combine_weights=w, router_logits=zeros, router_probs=zeros,
                           kind="expert_choice" if case.kind == "expert_choice" else "token_choice", **arrays)


def _module(case: Case) -> BatchedExperts:
    return BatchedExperts(E, D, F, activation="gelu", glu=case.glu)


def _loss_fn(case: Case, arrays, runners, jit=True):
    """(x, params, w) -> [(loss, (y, kept)), grads] for each ``runner(module, x, decision) -> (y, kept)``.

    All runners of a case are compiled together (one jit). The loop reference runs eagerly (``jit=False``):
    compiling its unrolled Python loop costs seconds per case, while its small eager ops are compiled once
    per shape and reused by every case.
    """
    module = _module(case)
    r = jnp.asarray(np.random.default_rng(123).normal(size=(G, S, D)), jnp.float32)

    def value_and_grads(runner):
        def f(x, params, w):
            y, kept = module.apply({"params": params}, x, _decision(case, arrays, w),
                                   method=lambda m, x, dec: runner(m, x, dec))
            return jnp.sum(y * r), (y, kept)
        return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)

    def fn(x, params, w):
        return [value_and_grads(runner)(x, params, w) for runner in runners]

    return jax.jit(fn) if jit else fn


def _reference_runner(case):
    def run(m, x, dec):
        return dispatch.loop_reference(x, dec, m.one, case.capacity, case.slot_order)
    return run


def _dispatcher_runner(case, name, **kw):
    def run(m, x, dec):
        res = dispatch.DISPATCHERS[name](x, dec, m, case.capacity, slot_order=case.slot_order, **kw)
        return res.y, res.kept
    return run


def _expert_params(glu: bool):
    """BatchedExperts params drawn with numpy (std 1/sqrt(fan-in)); no init to compile."""
    rng = np.random.default_rng(0)
    params = {"wi": rng.normal(size=(E, D, F)) / np.sqrt(D), "wo": rng.normal(size=(E, F, D)) / np.sqrt(F)}
    if glu:
        params["wg"] = rng.normal(size=(E, D, F)) / np.sqrt(D)
    return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def _inputs(case):
    x = jnp.asarray(np.random.default_rng(7).normal(size=(G, S, D)), jnp.float32)
    return x, _expert_params(case.glu)


def _assert_same(case, ref, out):
    (ref_loss, (ref_y, ref_kept)), ref_grads = ref
    (loss, (y, kept)), grads = out
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(ref_kept))
    np.testing.assert_allclose(y, ref_y, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=1e-5)
    gx, gp, gw = grads
    rgx, rgp, rgw = ref_grads
    np.testing.assert_allclose(gx, rgx, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(gw, rgw, atol=1e-5, rtol=1e-5)
    assert set(gp) == set(rgp) == ({"wi", "wg", "wo"} if case.glu else {"wi", "wo"})
    for name in gp:
        np.testing.assert_allclose(gp[name], rgp[name], atol=1e-5, rtol=1e-5)
    # dropped assignments get no weight gradient; kept ones do (for a random R, almost surely nonzero)
    rgw = np.asarray(rgw)
    ref_kept = np.asarray(ref_kept)
    assert np.all(rgw[~ref_kept] == 0.0)
    assert np.all(rgw[ref_kept] != 0.0)


CAPACITY_CASES = [
    Case("tc_k1", k=1, seed=1),
    Case("tc_k2_choice_major", k=2, glu=False, seed=2),
    Case("tc_k2_token_major", k=2, slot_order="token_major", seed=2),
    Case("tc_k2_priority", k=2, priority=True, seed=3),  # batch-prioritized buffer order
    Case("expert_choice", kind="expert_choice", capacity=3, seed=4),
    Case("tc_k2_token_major_priority_sorted", k=2, slot_order="token_major", priority=True, sort_slots=True, seed=3),
]


@pytest.mark.parametrize("case", CAPACITY_CASES, ids=lambda c: c.name)
def test_capacity_dispatchers_match_loop_reference(case, monkeypatch):
    if case.sort_slots:
        monkeypatch.setattr(capacity_lib, "SORT_FROM_EXPERTS", 1)
    arrays, w0 = _decision_arrays(case, seed=case.seed)
    x, params = _inputs(case)
    w0 = jnp.asarray(w0)
    ref = _loss_fn(case, arrays, [_reference_runner(case)], jit=False)(x, params, w0)[0]
    ref_kept = np.asarray(ref[0][1][1])
    # the case must actually drop something and keep something, else it tests nothing about drops
    valid = arrays["valid"]
    if case.kind == "expert_choice":
        # nothing overflows; a token is dropped when no expert took it (and invalid picks count nowhere)
        taken = np.zeros((G, S), bool)
        for g in range(G):
            taken[g, arrays["token_index"][g][valid[g]]] = True
        assert taken.any() and not taken.all() and not valid.all(), "case has no dropped token"
    else:
        assert ref_kept.any() and (valid & ~ref_kept).any(), "case has no capacity drops"
        last = ref_kept[G - 1] & (arrays["expert_index"][G - 1] == E - 1)
        assert last.sum() == case.capacity, "the last buffer row should be in use"
    runners = [_dispatcher_runner(case, "einsum"), _dispatcher_runner(case, "scatter"),
               _dispatcher_runner(case, "scatter", filled_only=True),  # experts on their filled rows only
               _dispatcher_runner(case, "einsum", filled_only=True)]  # the per-expert loop on all rows
    outs = _loss_fn(case, arrays, runners)(x, params, w0)
    for out in outs:
        _assert_same(case, ref, out)


@pytest.mark.parametrize("glu", [False, True])
def test_capacity_buffer_filled_rows_match_batched_experts(glu):
    """``sorted_rows_ffn`` with ``stride`` (what ``BatchedExperts(x, rows_used)`` runs for 'filled') against the
    batched FFN: E=4 experts, M=32 buffer rows each (chunk 32, so the row quantum is 2), rows_used 0, 5, 32, 8.

    Expert 1 has 5 filled rows and computes 6 (row 5 is an empty, zero row computed anyway), rows 6..31 are
    skipped. Expert 0 computes nothing, expert 2 everything, expert 3 exactly 8 rows. Over the filled rows (and
    a cotangent that is zero elsewhere, as the dispatcher's is) output and all gradients equal the batched
    form; outside them the output and d x are exactly 0.
    """
    from moe_jax.experts import ffn_apply, sorted_rows_ffn

    e, m, d, f = 4, 32, 3, 5
    rng = np.random.default_rng(5)
    used = np.array([0, 5, 32, 8], np.int32)
    filled = np.arange(m)[None, :, None] < used[:, None, None]  # [E, M, 1]
    x = jnp.asarray(rng.normal(size=(e, m, d)) * filled, jnp.float32)  # empty rows are zero, as in the buffer
    r = jnp.asarray(rng.normal(size=(e, m, d)) * filled, jnp.float32)
    params = {"wi": rng.normal(size=(e, d, f)), "wo": rng.normal(size=(e, f, d))}
    if glu:
        params["wg"] = rng.normal(size=(e, d, f))
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}

    def batched(x, p):
        return jnp.sum(ffn_apply(p, x, "silu", "end,edf->enf", "enf,efd->end", jnp.float32) * r)

    def skipping(x, p):
        y = sorted_rows_ffn(x.reshape(e * m, d), jnp.asarray(used), p, "silu", m, m).reshape(e, m, d)
        return jnp.sum(y * r), y

    (ref, (gx_ref, gp_ref)) = jax.value_and_grad(batched, argnums=(0, 1))(x, params)
    ((val, y), (gx, gp)) = jax.jit(jax.value_and_grad(skipping, argnums=(0, 1), has_aux=True))(x, params)
    np.testing.assert_allclose(val, ref, rtol=1e-5, atol=1e-5)
    y_ref = ffn_apply(params, x, "silu", "end,edf->enf", "enf,efd->end", jnp.float32)
    np.testing.assert_allclose(np.asarray(y) * filled, np.asarray(y_ref) * filled, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(y)[~np.broadcast_to(filled, y.shape)] == 0.0)
    np.testing.assert_allclose(np.asarray(gx) * filled, np.asarray(gx_ref) * filled, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(gx)[~np.broadcast_to(filled, gx.shape)] == 0.0)
    assert set(gp) == set(gp_ref)
    for k in gp:
        np.testing.assert_allclose(gp[k], gp_ref[k], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(gp["wi"])[0] == 0.0) and np.any(np.asarray(gp["wi"])[1] != 0.0)


DROPLESS_CASES = [
    Case("dropless_k1", k=1, capacity=None, glu=False),
    Case("dropless_k2", k=2, capacity=None),
]


@pytest.mark.parametrize("case", DROPLESS_CASES, ids=lambda c: c.name)
def test_dropless_matches_loop_reference(case, monkeypatch):
    # 'gmm' runs the Mosaic GPU kernels on a Hopper GPU; here the same custom VJP and row layout run with
    # the 'xla' kernels (tests/test_gmm.py checks those against hand-derived numbers)
    monkeypatch.setattr(gmm_lib, "resolve_backend", lambda backend="auto": "xla")
    arrays, w0 = _decision_arrays(case, seed=11)
    x, params = _inputs(case)
    w0 = jnp.asarray(w0)
    ref = _loss_fn(case, arrays, [_reference_runner(case)], jit=False)(x, params, w0)[0]
    # capacity=None in the reference: every valid assignment is kept
    np.testing.assert_array_equal(np.asarray(ref[0][1][1]), arrays["valid"])
    variants = [dict(impl="blocks"), dict(impl="blocks", block_size=2), dict(impl="ragged_dot"),
                dict(impl="grouped"), dict(impl="gmm")]
    outs = _loss_fn(case, arrays, [_dispatcher_runner(case, "dropless", **kw) for kw in variants])(x, params, w0)
    for out in outs:
        _assert_same(case, ref, out)


def test_dropless_never_drops_under_skewed_routers():
    """100 random inputs, routers skewed up to 'every token to one expert'; one compiled function.

    Reference: every expert applied to every token (dense), then each token's K outputs gathered and
    weighted: no notion of capacity at all.
    """
    k = 2
    module = BatchedExperts(E, D, F, activation="gelu", glu=True)
    params = _expert_params(glu=True)
    zeros = jnp.zeros((G, S, E), jnp.float32)

    def one_seed(seed):
        kx, ks, kf, kg, kw, kv = jax.random.split(jax.random.key(seed), 6)
        x = jax.random.normal(kx, (G, S, D))
        # skew: a favourite expert gets a logit bonus between 0 and 30 (30 = all tokens pick it first)
        bonus = jax.random.uniform(ks, ()) * 30.0
        fav = jax.random.randint(kf, (), 0, E)
        logits = jax.random.gumbel(kg, (G, S, E)) + bonus * jax.nn.one_hot(fav, E)
        _, idx = jax.lax.top_k(logits, k)  # [G, S, K] distinct experts
        w = jax.random.uniform(kw, (G, S, k), minval=0.1, maxval=1.0)
        valid = jnp.broadcast_to(jax.random.uniform(kv, (G, S, 1)) > 0.1, (G, S, k))
        dec = RoutingDecision(combine_weights=w, valid=valid, router_logits=zeros, router_probs=zeros,
                              expert_index=idx.astype(jnp.int32))

        def run(m):
            blocks = dispatch.run_dropless(x, dec, m, impl="blocks")
            ragged = dispatch.run_dropless(x, dec, m, impl="ragged_dot")
            dense = m(jnp.broadcast_to(x.reshape(1, G * S, D), (E, G * S, D)))  # [E, T, D]
            picked = dense[idx.reshape(-1, k), jnp.arange(G * S)[:, None]]  # [T, K, D]
            ref = jnp.sum(picked * (w * valid).reshape(-1, k, 1), axis=1).reshape(G, S, D)
            return blocks.y, ragged.y, ref, jnp.all(blocks.kept == valid), jnp.max(jnp.sum(
                jax.nn.one_hot(idx[..., 0], E), axis=(0, 1)))

        return module.apply({"params": params}, method=run)

    blocks, ragged, ref, kept_all, max_first = jax.jit(lambda s: jax.lax.map(one_seed, s))(jnp.arange(100))
    assert bool(jnp.all(kept_all))
    # some seeds really are extreme: all G*S first choices on one expert
    assert int(jnp.max(max_first)) == G * S
    np.testing.assert_allclose(blocks, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ragged, ref, atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(ref))) > 0.1


def test_dropless_refuses_expert_choice_and_unknown_names():
    case = Case("ec", kind="expert_choice", capacity=2)
    arrays, w = _decision_arrays(case, 0)
    dec = _decision(case, arrays, jnp.asarray(w))
    with pytest.raises(ValueError, match="token-choice"):
        dispatch.make_dropless_plan(dec)
    with pytest.raises(ValueError, match="MoEConfig.dispatcher"):
        dispatch.get_dispatcher("magic")
    with pytest.raises(ValueError, match="dropless_impl"):
        dispatch.run_dropless(jnp.zeros((G, S, D)), _decision(Case("t", k=1), *_decision_arrays(Case("t"), 0)),
                              None, impl="fast")


def test_dropless_block_bound():
    # R = b * ceil((N + E(b-1)) / b) rows always hold every expert's run padded to whole blocks.
    # N = 12, E = 4, b = 8: ceil((12 + 28) / 8) = 5 blocks; worst case (counts [3,3,3,3]) pads to 4 blocks.
    case = Case("b", k=1, capacity=None)
    arrays, w = _decision_arrays(case, 0)
    arrays = dict(arrays, expert_index=np.tile(np.array([0, 1, 2, 3, 0, 1], np.int32).reshape(1, S, 1), (G, 1, 1)),
                  valid=np.ones((G, S, 1), bool))
    plan = jax.jit(dispatch.make_dropless_plan, static_argnums=1)(_decision(case, arrays, jnp.asarray(w)), 8)
    assert plan.num_blocks == 5
    # expert counts [4, 4, 2, 2] -> one block each, in expert order, then one spare block
    np.testing.assert_array_equal(plan.group_sizes, [4, 4, 2, 2])
    np.testing.assert_array_equal(plan.block_expert[:4], [0, 1, 2, 3])
    # every assignment has its own row inside its expert's block
    rows = np.asarray(plan.row_of_assignment).reshape(-1)
    assert len(set(rows.tolist())) == rows.size
    experts = arrays["expert_index"].reshape(-1)
    np.testing.assert_array_equal(rows // 8, experts)
    # b = 4: counts [4, 4, 2, 2] pad to exactly one block each (a run that fills its block gets no extra one)
    plan4 = jax.jit(dispatch.make_dropless_plan, static_argnums=1)(_decision(case, arrays, jnp.asarray(w)), 4)
    assert plan4.num_blocks == -(-(12 + 4 * 3) // 4)  # 6
    np.testing.assert_array_equal(plan4.block_expert[:4], [0, 1, 2, 3])
    np.testing.assert_array_equal(np.asarray(plan4.row_of_assignment).reshape(-1) // 4, experts)


@pytest.mark.parametrize("glu,chunk", [(False, 32), (True, 32), (False, 16)])
def test_sorted_rows_ffn_matches_per_row_experts(glu, chunk):
    """``sorted_rows_ffn`` (the CPU dropless kernel) against every row through its own expert.

    60 rows sorted by expert with group sizes 0, 37, 5, 11 (53 real rows, 7 trailing rows belong to no expert).
    Chunk 32, so the row quantum is 2: expert 1 runs one full chunk and a remainder of 5 rounded to 6 (one row
    of expert 2 computed with expert 1's weights, then overwritten), expert 2 spills into expert 3, expert 3
    into the trailing rows. Chunk 16 (quantum 1): expert 1 runs two full chunks (the backward's first piece,
    then one more through its chunk loop) and a remainder of 5. Over the 53 real rows output and gradients
    equal the reference; the trailing rows are the caller's to mask (the cotangent is zero there, as in
    ``ragged_dot_experts``).
    """
    from moe_jax.experts import ffn_apply, sorted_rows_ffn

    e, n, d, f = 4, 60, 3, 5
    sizes = np.array([0, 37, 5, 11], np.int32)
    owner = np.repeat(np.arange(e), sizes)  # [53] expert of each real row
    real = len(owner)
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    r = jnp.asarray(rng.normal(size=(n, d)) * (np.arange(n) < real)[:, None], jnp.float32)
    params = {"wi": rng.normal(size=(e, d, f)) / np.sqrt(d), "wo": rng.normal(size=(e, f, d)) / np.sqrt(f)}
    if glu:
        params["wg"] = rng.normal(size=(e, d, f)) / np.sqrt(d)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    onehot = jnp.asarray(np.eye(e)[owner], jnp.float32)  # [53, E]

    def reference(x, p):
        every = ffn_apply(p, jnp.broadcast_to(x[:real], (e, real, d)), "gelu", "end,edf->enf", "enf,efd->end",
                          jnp.float32)  # [E, 53, D]: every real row through every expert
        y = jnp.einsum("ne,end->nd", onehot, every)
        return jnp.sum(y * r[:real]), y

    def kernel(x, p):
        y = sorted_rows_ffn(x, jnp.asarray(sizes), p, "gelu", chunk)
        return jnp.sum(y * r), y

    (ref, y_ref), (gx_ref, gp_ref) = jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)(x, params)
    (val, y), (gx, gp) = jax.jit(jax.value_and_grad(kernel, argnums=(0, 1), has_aux=True))(x, params)
    np.testing.assert_allclose(val, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[:real], y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx[:real], gx_ref[:real], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(gx)[real:] == 0.0)
    for k in gp_ref:
        np.testing.assert_allclose(gp[k], gp_ref[k], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(gp["wi"])[0] == 0.0)  # expert 0 owns no row


def test_sorted_counts_are_the_rows_of_each_expert():
    # experts 0, 0, 2, 2, 2 and two invalid assignments (key E = 3, sorted last): 2 rows, 0 rows, 3 rows
    key = jnp.array([0, 0, 2, 2, 2, 3, 3], jnp.int32)
    np.testing.assert_array_equal(dispatch.sorted_counts(key, 3), [2, 0, 3])
    assert dispatch.sorted_counts(key, 3).dtype == jnp.int32
    # random keys: the same as bincount
    rand = jnp.sort(jax.random.randint(jax.random.key(0), (257,), 0, 9))
    np.testing.assert_array_equal(dispatch.sorted_counts(rand, 8), jnp.bincount(rand, length=9)[:8])


@pytest.mark.parametrize("rows", [100, 256, 384])
def test_rows_t_matmul_is_the_weight_gradient_product(rows):
    """``experts._rows_t_matmul(u, v) == u.T @ v``, also where it splits the rows (a multiple of 128: the
    first r - 16 through a materialized transpose, the last 16 as a plain dot)."""
    from moe_jax.experts import _rows_t_matmul

    rng = np.random.default_rng(rows)
    u, v = rng.normal(size=(rows, 24)).astype(np.float32), rng.normal(size=(rows, 8)).astype(np.float32)
    got = np.asarray(jax.jit(_rows_t_matmul)(u, v))
    np.testing.assert_allclose(got, u.astype(np.float64).T @ v, rtol=1e-4, atol=1e-4)


def test_weighted_sum_k_by_hand_and_against_autodiff():
    """One token, K=2, D=2: y_0 = (1, 2), y_1 = (3, 4), weights (0.25, 0.75) -> 0.25 y_0 + 0.75 y_1 = (2.5, 3.5).
    With the cotangent dy = (2, 1): d weight_k = <dy, y_k> = (2 + 2, 6 + 4) = (4, 10) and d y_k = w_k dy =
    (0.5, 0.25), (1.5, 0.75). Then on random shapes the custom backward (a batched dot for d weight) equals
    autodiff of the plain weighted sum, in float32 and in bfloat16 (dtypes kept)."""
    y = jnp.array([[[[1.0, 2.0], [3.0, 4.0]]]])  # [G=1, S=1, K=2, D=2]
    w = jnp.array([[[0.25, 0.75]]])
    out, vjp = jax.vjp(dispatch.weighted_sum_k, y, w)
    np.testing.assert_allclose(out, [[[2.5, 3.5]]])
    dy, dw = vjp(jnp.array([[[2.0, 1.0]]]))
    np.testing.assert_allclose(dw, [[[4.0, 10.0]]])
    np.testing.assert_allclose(dy, [[[[0.5, 0.25], [1.5, 0.75]]]])

    plain = lambda y, w: jnp.sum(y * w[..., None], axis=-2)
    kr = jax.random.split(jax.random.key(0), 3)
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
        y = jax.random.normal(kr[0], (2, 3, 2, 8)).astype(dtype)
        w = jax.random.uniform(kr[1], (2, 3, 2)).astype(dtype)
        r = jax.random.normal(kr[2], (2, 3, 8)).astype(dtype)
        got = jax.grad(lambda y, w: jnp.sum(dispatch.weighted_sum_k(y, w).astype(jnp.float32) * r), (0, 1))(y, w)
        want = jax.grad(lambda y, w: jnp.sum(plain(y, w).astype(jnp.float32) * r), (0, 1))(y, w)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype == dtype
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
