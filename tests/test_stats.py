"""moe_jax.stats (t-interval, power-law fit, effective-parameter multiplier) and moe_jax.scaling's report, on
hand examples and synthetic points with known parameters."""
import math
import os

import numpy as np
import pytest

from moe_jax import scaling, stats


def test_t_interval_hand_example():
    # gaps 0.1, 0.2, 0.3: mean 0.2; s = sqrt(((-0.1)^2 + 0 + 0.1^2) / 2) = 0.1; t_{0.975, 2} = 4.303;
    # half-width = 4.303 * 0.1 / sqrt(3) = 0.2484; interval [-0.0484, 0.4484].
    ci = stats.t_interval([0.1, 0.2, 0.3])
    assert ci["n"] == 3
    assert ci["mean"] == pytest.approx(0.2)
    assert ci["std"] == pytest.approx(0.1)
    assert ci["half_width"] == pytest.approx(0.2484, abs=1e-4)
    assert ci["lo"] == pytest.approx(-0.0484, abs=1e-4) and ci["hi"] == pytest.approx(0.4484, abs=1e-4)


def test_t_quantile_matches_table_and_one_value_has_no_interval(monkeypatch):
    assert stats.t_quantile_975(2) == pytest.approx(4.303, abs=5e-4)
    assert stats.t_quantile_975(10) == pytest.approx(2.228, abs=5e-4)
    import builtins

    real_import = builtins.__import__

    def no_scipy(name, *a, **k):  # the fallback table when scipy is missing
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert stats.t_quantile_975(2) == 4.303 and stats.t_quantile_975(4) == 2.776
    one = stats.t_interval([0.5, float("nan")])  # NaN dropped: one value, no spread
    assert one["n"] == 1 and one["mean"] == 0.5 and math.isnan(one["half_width"])


def test_power_law_fit_recovers_known_parameters():
    a, alpha, c = 50.0, 0.35, 2.0
    n = np.array([1e5, 3e5, 1e6, 3e6])
    fit = stats.fit_power_law(n, a * n ** -alpha + c)
    assert fit["alpha"] == pytest.approx(alpha, rel=1e-3)
    assert fit["c"] == pytest.approx(c, abs=1e-3)
    assert fit["a"] == pytest.approx(a, rel=1e-2)
    assert fit["rmse"] < 1e-6 and not fit["at_bound"]
    # A loss linear in log N has no asymptote: alpha runs to the end of the range, and the fit says so.
    assert stats.fit_power_law(n, 5.0 - 0.1 * np.log(n))["at_bound"]
    with pytest.raises(ValueError, match="distinct sizes"):
        stats.fit_power_law([1e5, 1e5, 2e5], [3.0, 3.0, 2.9])


def test_dense_equivalent_and_multiplier():
    fit = {"a": 50.0, "alpha": 0.5, "c": 2.0}
    # dense loss at N = 1e4: 50 / 100 + 2 = 2.5. An MoE with N = 2500 reaching 2.5 is worth 1e4 dense params: x4.
    assert stats.dense_equivalent(2.5, fit) == pytest.approx(1e4)
    assert stats.effective_multiplier(2.5, 2500, fit) == pytest.approx(4.0)
    assert stats.dense_equivalent(1.9, fit) == math.inf  # below the asymptote c


def test_scaling_report_on_synthetic_arms(tmp_path):
    # Dense: L = 40 N^-0.4 + 2.5 at N = 1e5, 4e5, 1.6e6. MoE: the dense loss of 3x its N (multiplier 3).
    d = {"a": 40.0, "alpha": 0.4, "c": 2.5}
    ns = [1e5, 4e5, 1.6e6]
    pts = {"dense": [dict(model=f"d{i}", n=n, loss=float(stats.power_law(n, d)), loss_std=0.0, metric="test",
                          flops=6 * n * 1e6) for i, n in enumerate(ns)],
           "moe": [dict(model=f"m{i}", n=n, loss=float(stats.power_law(3 * n, d)), loss_std=0.0, metric="test",
                        flops=6 * n * 1e6) for i, n in enumerate(ns)]}
    out = scaling.scaling_report(pts, str(tmp_path))
    assert out["fits"]["dense"]["alpha"] == pytest.approx(0.4, rel=1e-3)
    np.testing.assert_allclose(out["multipliers"]["moe"], [3.0, 3.0, 3.0], rtol=1e-3)
    assert "| moe | m1 |" in out["text"] and "3.00 |" in out["text"]
    for name in ("scaling.md", "scaling.csv", "scaling.png"):
        assert os.path.getsize(tmp_path / name) > 0
