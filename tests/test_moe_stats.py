"""MoEStats on the hand example of test_moe_layer: the per-expert drop fraction, and NaN/Inf tokens, which
are routed nowhere, counted in no statistic, reported in ``nonfinite_tokens`` and NaN in the output."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_moe_layer import X_ONEHOT, _hand_layer  # B=1, L=8, E=4, experts [0,0,0,0,0,1,1,2], C=3


def test_expert_drop_fraction_by_hand():
    layer, variables = _hand_layer()
    _, stats = jax.jit(layer.apply)(variables, X_ONEHOT)
    # e0 gets t0..t4 and C = 3 keeps t0, t1, t2: 2 of its 5 assignments dropped; e1 (t5, t6) and e2 (t7) fit;
    # e3 gets nothing: 0, not 0/0.
    np.testing.assert_allclose(stats.metrics["expert_drop_fraction"], [2 / 5, 0, 0, 0], rtol=1e-6)
    assert float(stats.metrics["nonfinite_tokens"]) == 0.0
    # With t0 and t1 as padding, e0 gets t2, t3, t4, which fit: nothing dropped anywhere.
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1]], bool)
    _, stats_m = jax.jit(layer.apply)(variables, X_ONEHOT, mask)
    np.testing.assert_allclose(stats_m.metrics["expert_drop_fraction"], [0, 0, 0, 0], atol=0)


@pytest.mark.parametrize("dispatcher", ["scatter", "einsum"])
def test_nonfinite_tokens_are_routed_nowhere_and_counted_nowhere(dispatcher):
    layer, variables = _hand_layer(dispatcher=dispatcher)
    clean, _ = jax.jit(layer.apply)(variables, X_ONEHOT)
    x = X_ONEHOT.at[0, 1, 0].set(jnp.nan).at[0, 6, 2].set(jnp.inf)  # t1 (expert 0) NaN, t6 (expert 1) Inf
    y, stats = jax.jit(layer.apply)(variables, x)
    m = stats.metrics
    # Left: e0 gets t0, t2, t3, t4 -> C = 3 keeps t0, t2, t3, drops t4; e1 gets t5; e2 gets t7.
    # 6 assignments, 1 dropped. Were t1 and t6 counted, expert_load would be [5, 2, 1, 0] / 8.
    assert float(m["nonfinite_tokens"]) == 2.0
    np.testing.assert_allclose(m["drop_fraction"], 1 / 6, rtol=1e-6)
    np.testing.assert_allclose(m["expert_load"], [4 / 6, 1 / 6, 1 / 6, 0], rtol=1e-6)
    np.testing.assert_allclose(m["expert_drop_fraction"], [1 / 4, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(m["experts_per_token"], 5 / 6, rtol=1e-6)  # 5 kept of 6 real finite tokens
    np.testing.assert_allclose(m["top1_prob"], 0.5, rtol=1e-6)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves((stats.losses, m, stats.aux_loss)))
    y = np.asarray(y[0])
    assert np.isnan(y[[1, 6]]).all()  # the bad tokens' outputs stay visibly bad
    assert np.isfinite(y[[0, 2, 3, 4, 5, 7]]).all()  # and poison no other token of the group
    np.testing.assert_allclose(y[[0, 2, 5, 7]], np.asarray(clean[0])[[0, 2, 5, 7]], atol=1e-6)
    assert np.all(y[4] == 0.0) and np.abs(y[3]).sum() > 0  # t4 is now the dropped one, t3 is kept
