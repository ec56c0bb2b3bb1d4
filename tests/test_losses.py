"""Auxiliary losses: values at perfect balance, hand-computed skewed examples, padding, finite gradients."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import losses as _losses

E = 4


class losses:  # noqa: N801  -- the functions under test, jitted (eager op-by-op compiles cost more)
    load_balancing_loss = staticmethod(jax.jit(_losses.load_balancing_loss))
    router_z_loss = staticmethod(jax.jit(_losses.router_z_loss))
    cv_squared = staticmethod(jax.jit(_losses.cv_squared))
    importance_loss = staticmethod(jax.jit(_losses.importance_loss))
    smooth_load = staticmethod(jax.jit(_losses.smooth_load, static_argnums=3))
    load_loss = staticmethod(_losses.load_loss)


def _peaked_probs(experts, p_top):
    """[1, S, E]: token s puts p_top on experts[s] and spreads the rest evenly."""
    rest = (1.0 - p_top) / (E - 1)
    probs = np.full((1, len(experts), E), rest, np.float32)
    for s, e in enumerate(experts):
        probs[0, s, e] = p_top
    return jnp.asarray(probs)


# ------------------------------------------------------------------------------------------ load balancing


def test_load_balancing_perfect_balance_k1():
    # 4 tokens, token s -> expert s, probs 0.7 on its expert and 0.1 elsewhere.
    # f = [1/4]*4, P_e = (0.7 + 3 * 0.1) / 4 = 1/4  ->  E * sum_e f_e P_e = 4 * 4 * 1/16 = 1.0
    probs = _peaked_probs([0, 1, 2, 3], 0.7)
    idx = jnp.asarray([[[0], [1], [2], [3]]], jnp.int32)
    np.testing.assert_allclose(losses.load_balancing_loss(probs, idx), 1.0, rtol=1e-6)


def test_load_balancing_perfect_balance_k2():
    # K=2: token s -> (s, s+1 mod 4). Each expert gets 2 of the 8 assignments: f = 2/8 = 1/4 (counts / K*S).
    # Same probs as above: P_e = 1/4 -> loss 1.0 (not 2.0: the K is divided out).
    probs = _peaked_probs([0, 1, 2, 3], 0.7)
    idx = jnp.asarray([[[0, 1], [1, 2], [2, 3], [3, 0]]], jnp.int32)
    np.testing.assert_allclose(losses.load_balancing_loss(probs, idx), 1.0, rtol=1e-6)


def test_load_balancing_skewed_hand_example():
    # 8 tokens, K=1, experts [0,0,0,0,0,1,1,2]; each token puts 1/2 on its expert and 1/6 on the others.
    # f = [5, 2, 1, 0] / 8
    # P_0 = (5 * 1/2 + 3 * 1/6) / 8 = 3/8;  P_1 = (2 * 1/2 + 6 * 1/6) / 8 = 2/8
    # P_2 = (1/2 + 7/6) / 8 = 5/24;         P_3 = (8 * 1/6) / 8 = 1/6
    # loss = 4 * (5/8 * 3/8 + 2/8 * 2/8 + 1/8 * 5/24 + 0) = 4 * 62/192 = 31/24
    experts = [0, 0, 0, 0, 0, 1, 1, 2]
    probs = _peaked_probs(experts, 0.5)
    idx = jnp.asarray(experts, jnp.int32).reshape(1, 8, 1)
    np.testing.assert_allclose(losses.load_balancing_loss(probs, idx), 31 / 24, rtol=1e-6)
    # Only P carries a gradient: d loss / d probs[s, e] = E * f_e / T = 4 * f_e / 8.
    grad = jax.grad(lambda p: losses.load_balancing_loss(p, idx))(probs)
    np.testing.assert_allclose(grad[0, 0], 0.5 * np.array([5, 2, 1, 0]) / 8, rtol=1e-6)


def test_load_balancing_excludes_padding():
    # 4 real tokens with skewed routing, experts [0, 0, 1, 2] (0.7 on the chosen expert, 0.1 elsewhere), plus
    # 2 padding tokens that put 0.97 on expert 3 (0.01 elsewhere), which no real token chooses.
    # Padding counts in neither f nor P:
    #   f = [2, 1, 1, 0] / 4
    #   P_0 = (0.7 + 0.7 + 0.1 + 0.1) / 4 = 0.4, P_1 = P_2 = (0.1 + 0.1 + 0.7 + 0.1) / 4 = 0.25, P_3 = 0.1
    #   loss = 4 * (2/4 * 0.4 + 1/4 * 0.25 + 1/4 * 0.25 + 0) = 1.3
    # Wrong variants (each differs from 1.3, so each fails the first assertion):
    #   P over all 6 tokens (f without padding): P_0 = 1.62/6 = 0.27, P_1 = P_2 = 1.02/6 = 0.17
    #     -> 4 * (0.5 * 0.27 + 2 * 0.25 * 0.17) = 0.88
    #   P summed over padding too but divided by the 4 real tokens: P_0 = 1.62/4 = 0.405, P_1 = P_2 = 0.255
    #     -> 4 * (0.5 * 0.405 + 2 * 0.25 * 0.255) = 1.32
    #   no mask at all: f = [2, 1, 1, 2] / 6, P_3 = 2.34/6 = 0.39 -> 4 * (2*0.27 + 0.17 + 0.17 + 2*0.39) / 6 = 1.10667
    probs = _peaked_probs([0, 0, 1, 2, 3, 3], 0.7)
    probs = probs.at[0, 4:].set(jnp.asarray([0.01, 0.01, 0.01, 0.97]))
    idx = jnp.asarray([0, 0, 1, 2, 3, 3], jnp.int32).reshape(1, 6, 1)
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0]], bool)
    np.testing.assert_allclose(losses.load_balancing_loss(probs, idx, mask), 1.3, rtol=1e-6)
    np.testing.assert_allclose(losses.load_balancing_loss(probs, idx), 4 * 1.66 / 6, rtol=1e-5)
    # `valid` (dynamic k) removes assignments from f only: drop tokens 4, 5 via valid instead of mask -> f is
    # [2, 1, 1, 0] / 4 as above, but P counts them (they are real tokens): the 0.88 of the first wrong variant.
    valid = jnp.asarray([[[1], [1], [1], [1], [0], [0]]], bool)
    np.testing.assert_allclose(losses.load_balancing_loss(probs, idx, None, valid), 0.88, rtol=1e-5)


def test_load_balancing_finite_gradient_at_balance():
    probs = _peaked_probs([0, 1, 2, 3], 0.25)  # uniform probs
    idx = jnp.asarray([[[0], [1], [2], [3]]], jnp.int32)
    value, grad = jax.value_and_grad(lambda p: losses.load_balancing_loss(p, idx))(probs)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


# ------------------------------------------------------------------------------------------------ z-loss


def test_router_z_loss_by_hand():
    # token 0: logits [0, 0] -> logsumexp = ln 2 -> (ln 2)^2
    # token 1: logits [ln 3, 0] -> logsumexp = ln(3 + 1) = 2 ln 2 -> 4 (ln 2)^2
    # token 2: padding with huge logits, excluded
    # mean over real tokens = (1 + 4) / 2 (ln 2)^2 = 2.5 (ln 2)^2
    logits = jnp.asarray([[[0.0, 0.0], [math.log(3.0), 0.0], [50.0, 50.0]]])
    mask = jnp.asarray([[1, 1, 0]], bool)
    np.testing.assert_allclose(losses.router_z_loss(logits, mask), 2.5 * math.log(2) ** 2, rtol=1e-6)
    # gradient: d/dl (lse^2) = 2 lse * softmax(l), averaged over 2 tokens; token 0: 2 ln2 * 0.5 / 2
    grad = jax.grad(lambda l: losses.router_z_loss(l, mask))(logits)
    np.testing.assert_allclose(grad[0, 0], [math.log(2) / 2] * 2, rtol=1e-6)
    np.testing.assert_array_equal(grad[0, 2], [0.0, 0.0])


# ------------------------------------------------------------------------------------------------- CV^2


def test_cv_squared_by_hand_and_at_balance():
    # x = [4, 2, 1, 1]: mean 2, var = (4 + 0 + 1 + 1) / 4 = 1.5, CV^2 = 1.5 / 4 = 0.375
    np.testing.assert_allclose(losses.cv_squared(jnp.asarray([4.0, 2.0, 1.0, 1.0])), 0.375, rtol=1e-6)
    balanced = jnp.full((4,), 3.0)
    value, grad = jax.value_and_grad(losses.cv_squared)(balanced)
    assert value == 0.0
    np.testing.assert_array_equal(grad, np.zeros(4))


def test_std_based_cv_would_be_nan_at_balance():
    # The trap that cv_squared avoids: a std-based CV has a NaN gradient exactly at perfect balance.
    # (This shows that the finiteness checks in this file can fail.)
    grad = jax.grad(lambda x: (jnp.std(x) / jnp.mean(x)) ** 2)(jnp.full((4,), 3.0))
    assert not np.all(np.isfinite(grad))


def test_importance_loss_by_hand():
    # Gates of 4 tokens over 4 experts (K=2, renormalized 2/3, 1/3):
    #   t0: e0 2/3, e1 1/3;  t1: e0 2/3, e2 1/3;  t2: e3 2/3, e0 1/3;  t3: e0 2/3, e1 1/3
    # Importance = [7/3, 2/3, 1/3, 2/3], mean 1, var = (16/9 + 1/9 + 4/9 + 1/9) / 4 = 11/18 -> CV^2 = 11/18
    a, b = 2 / 3, 1 / 3
    gates = jnp.asarray([[[a, b, 0, 0], [a, 0, b, 0], [b, 0, 0, a], [a, b, 0, 0]]], jnp.float32)
    np.testing.assert_allclose(losses.importance_loss(gates), 11 / 18, rtol=1e-5)
    # A padding token with a huge gate on e3 does not count.
    padded = jnp.concatenate([gates, jnp.asarray([[[0, 0, 0, 100.0]]])], axis=1)
    mask = jnp.asarray([[1, 1, 1, 1, 0]], bool)
    np.testing.assert_allclose(losses.importance_loss(padded, mask), 11 / 18, rtol=1e-5)


def test_importance_loss_zero_with_finite_grad_at_balance():
    gates = jnp.eye(4, dtype=jnp.float32)[None]  # token s -> expert s with gate 1
    value, grad = jax.value_and_grad(losses.importance_loss)(gates)
    assert value == 0.0
    assert np.all(np.isfinite(grad))


def test_smooth_load_by_hand():
    # E=3, k=1, one token; clean [1, 0, 0], noisy [1, 0.5, -1], noise std 1.
    # e0 is in the top-1 -> threshold = 2nd largest noisy = 0.5 -> Phi((1 - 0.5) / 1) = Phi(0.5) = 0.691462
    # e1, e2 are out -> threshold = largest noisy = 1 -> Phi((0 - 1) / 1) = Phi(-1) = 0.158655
    clean = jnp.asarray([[[1.0, 0.0, 0.0]]])
    noisy = jnp.asarray([[[1.0, 0.5, -1.0]]])
    std = jnp.ones_like(clean)
    load = losses.smooth_load(clean, noisy, std, 1)
    np.testing.assert_allclose(load, [0.691462, 0.158655, 0.158655], atol=1e-5)
    # padding is excluded: a second, masked token changes nothing
    clean2 = jnp.concatenate([clean, jnp.asarray([[[9.0, 0.0, 0.0]]])], axis=1)
    noisy2 = jnp.concatenate([noisy, jnp.asarray([[[9.0, 0.0, 0.0]]])], axis=1)
    load2 = losses.smooth_load(clean2, noisy2, jnp.ones_like(clean2), 1, jnp.asarray([[1, 0]], bool))
    np.testing.assert_allclose(load2, load, atol=1e-6)
    # k >= E: every expert always selected -> equal load = number of real tokens
    np.testing.assert_allclose(losses.smooth_load(clean, noisy, std, 3), [1.0, 1.0, 1.0])


def test_load_loss_zero_with_finite_grad_at_balance():
    # 3 tokens with cyclically shifted logits -> every expert has the same smooth load -> CV^2 = 0.
    base = jnp.asarray([1.0, 0.0, -1.0])
    clean = jnp.stack([jnp.roll(base, i) for i in range(3)])[None]  # [1, 3, 3]
    std = jnp.ones_like(clean)

    def f(c):
        return losses.load_loss(c, c, std, 1)

    value, grad = jax.jit(jax.value_and_grad(f))(clean)
    np.testing.assert_allclose(value, 0.0, atol=1e-7)
    assert np.all(np.isfinite(grad))
