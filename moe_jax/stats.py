"""Statistics of the comparisons: paired t-intervals over seeds, scaling-law fits, effective-parameter multipliers.

* ``t_interval(x)``: mean, sample std and the two-sided 95% Student-t interval of the mean of ``x`` (``n >= 2``).
  Used on the per-seed paired gaps ``loss_dense[s] - loss_moe[s]`` (same seed = same data order and init stream).
* ``fit_power_law(n, loss)``: least squares ``loss ~ a * n**-alpha + c`` (``a, alpha`` > 0).
* ``dense_equivalent(loss, fit)``: the ``n`` at which the fitted dense curve reaches ``loss`` (Clark et al. 2022's
  effective parameter count); ``inf`` below the dense curve's asymptote ``c``.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import numpy as np

# Two-sided 95% quantiles t_{0.975, df} of Student's t, used when scipy is not installed (df 1..30; beyond,
# the normal quantile 1.96 is within 0.05).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """``t_{0.975, df}``: scipy's value if scipy is installed, else the 3-digit table above."""
    if df < 1:
        raise ValueError(f"t_quantile_975: df must be >= 1, got {df}.")
    try:
        from scipy import stats

        return float(stats.t.ppf(0.975, df))
    except ImportError:
        return _T975[df - 1] if df <= len(_T975) else 1.96


def t_interval(values: Sequence[float]) -> Dict[str, float]:
    """``{'n', 'mean', 'std', 'half_width', 'lo', 'hi'}``: the sample mean, sample std (ddof=1) and the 95%
    t-interval ``mean ± t_{0.975, n-1} * std / sqrt(n)``; NaNs are dropped; with fewer than 2 values the std
    and interval are NaN."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    if n < 2:
        return {"n": n, "mean": mean, "std": float("nan"), "half_width": float("nan"), "lo": float("nan"),
                "hi": float("nan")}
    std = float(x.std(ddof=1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "half_width": half, "lo": mean - half, "hi": mean + half}


def gap_cells(gap: Dict) -> str:
    """Markdown cells ``per-seed gaps | mean | std | 95% CI | seeds`` of one paired gap (``t_interval`` fields
    plus ``gaps``: ``{seed: gap}``), as the comparison and scaling tables print it."""
    per = ", ".join(f"{v:+.3f}" for v in gap["gaps"].values()) or "n/a"
    ci = f"[{gap['lo']:+.3f}, {gap['hi']:+.3f}]" if np.isfinite(gap["lo"]) else "n/a (one seed)"
    std = f"{gap['std']:.3f}" if np.isfinite(gap["std"]) else "n/a"
    return f"{per} | {gap['mean']:+.3f} | {std} | {ci} | {gap['n']}"


def _fit_fixed_alpha(n: np.ndarray, loss: np.ndarray, alpha: float) -> Tuple[float, float, float]:
    """Least-squares ``(a, c, sse)`` of ``loss ~ a * n**-alpha + c`` at a fixed ``alpha``."""
    x = n ** -alpha
    design = np.stack([x, np.ones_like(x)], axis=1)
    (a, c), *_ = np.linalg.lstsq(design, loss, rcond=None)
    return float(a), float(c), float(np.sum((design @ np.array([a, c]) - loss) ** 2))


def fit_power_law(n: Sequence[float], loss: Sequence[float]) -> Dict[str, float]:
    """``{'a', 'alpha', 'c', 'rmse', 'at_bound'}`` of ``loss ~ a * n**-alpha + c`` by least squares over ``alpha``
    (a log grid on [1e-3, 3], then golden-section refinement; ``a`` and ``c`` are linear given ``alpha``).
    Needs >= 3 points with distinct ``n`` (3 points are fitted exactly when the curve can pass through them).
    ``n`` is rescaled by its geometric mean inside the fit, so ``a`` is returned for the raw ``n``."""
    n = np.asarray(n, float)
    loss = np.asarray(loss, float)
    ok = np.isfinite(n) & np.isfinite(loss) & (n > 0)
    n, loss = n[ok], loss[ok]
    if len(np.unique(n)) < 3:
        raise ValueError(f"fit_power_law: needs >= 3 finite points with distinct sizes, got {len(np.unique(n))}.")
    scale = float(np.exp(np.mean(np.log(n))))
    u = n / scale

    def sse(alpha):
        a, c, e = _fit_fixed_alpha(u, loss, alpha)
        return e if a > 0 else np.inf

    grid = np.geomspace(1e-3, 3.0, 400)
    errs = np.array([sse(al) for al in grid])
    i = int(np.argmin(errs))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = sse(x1), sse(x2)
    for _ in range(80):
        if f1 < f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - g * (hi - lo)
            f1 = sse(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + g * (hi - lo)
            f2 = sse(x2)
    alpha = (lo + hi) / 2
    if not np.isfinite(sse(alpha)):
        raise ValueError("fit_power_law: no decreasing power law fits these points (the loss does not fall with n).")
    a, c, e = _fit_fixed_alpha(u, loss, alpha)
    # alpha at an end of the searched range: the points do not pin down a power law with an asymptote (e.g. a
    # loss linear in log N gives alpha -> 0, c -> -inf); the fit and its multipliers are then not meaningful.
    at_bound = bool(alpha <= grid[1] or alpha >= grid[-2])
    return {"a": a * scale ** alpha, "alpha": float(alpha), "c": c, "rmse": math.sqrt(e / len(n)),
            "at_bound": at_bound}


def power_law(n, fit: Dict[str, float]):
    """``a * n**-alpha + c``."""
    return fit["a"] * np.asarray(n, float) ** -fit["alpha"] + fit["c"]


def dense_equivalent(loss: float, fit: Dict[str, float]) -> float:
    """The size ``n`` with ``power_law(n, fit) == loss``: ``((loss - c) / a) ** (-1 / alpha)``; ``inf`` when
    ``loss <= c`` (better than the fitted curve ever gets)."""
    if not np.isfinite(loss):
        return float("nan")
    if loss <= fit["c"]:
        return float("inf")
    return float(((loss - fit["c"]) / fit["a"]) ** (-1.0 / fit["alpha"]))


def effective_multiplier(moe_loss: float, moe_n: float, dense_fit: Dict[str, float]) -> float:
    """``dense_equivalent(moe_loss) / moe_n``: how many times more parameters (of the kind ``moe_n`` counts) a
    dense model needs to match the MoE's loss."""
    return dense_equivalent(moe_loss, dense_fit) / float(moe_n)
