"""Scaling curves of a comparison: loss against size and training FLOPs per arm, power-law fits, and the MoE's
effective-parameter multiplier (Clark et al. 2022: the dense size with the MoE's loss, over the MoE's size).

A comparison config with a ``scaling`` field ``{arm: [model names, smallest first]}`` (e.g.
``configs/compare_scaling.py``: ``{'dense': [...], 'moe': [...]}``, the same widths in both) gets, after the
table, ``scaling.md``, ``scaling.csv`` and ``scaling.png`` in its workdir:

* ``N`` of a model: its **active non-embedding** parameters per token (``active_params - embedding_params``
  of the run's ``summary.json``): what a token computes with, without the embedding lookup, which dominates
  the smallest models and does not scale with depth x width (Kaplan et al. 2020);
* the loss: the mean over seeds of the test loss (validation loss if the corpus has no test split);
* per arm, ``L(N) = a * N**-alpha + c`` fitted by least squares (``stats.fit_power_law``; >= 3 sizes);
* per MoE size, ``dense_equivalent(L_moe) / N_moe`` against the dense arm's fit (``inf``: the MoE is below
  the dense curve's asymptote ``c``; a multiplier outside the measured dense sizes is an extrapolation);
* per MoE size, the paired gap ``loss[dense at that size, s] - loss[MoE, s]`` per seed ``s`` and its 95%
  t-interval over seeds (``pairs``, from ``compare.paired_gaps``; the comparison's own table, results.csv and
  gaps.csv take the same pairs for a scaling study).
"""
from __future__ import annotations

import csv
import os
from typing import Any, Dict, List, Optional

import numpy as np

from moe_jax import stats


def arm_points(rows: List[Dict[str, Any]], runs: Dict[str, Dict[int, str]], arms: Dict[str, List[str]],
               summaries: Dict[str, Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """``{arm: [{'model', 'n', 'loss', 'loss_std', 'flops'}]}`` from the comparison's rows. ``summaries``: one
    ``summary.json`` per model (sizes)."""
    by_model = {r["model"]: r for r in rows}
    out = {}
    for arm, models in arms.items():
        pts = []
        for m in models:
            if m not in by_model:
                raise ValueError(f"compare config: scaling.{arm} lists {m!r}, which is not a model of the comparison.")
            r, s = by_model[m], summaries.get(m, {})
            use_test = np.isfinite(r.get("test_loss", float("nan")))
            n = (s.get("active_params") or np.nan) - (s.get("embedding_params") or 0)
            pts.append({"model": m, "n": float(n), "loss": r["test_loss"] if use_test else r["val_loss"],
                        "loss_std": r["test_loss_std"] if use_test else r["val_loss_std"],
                        "metric": "test" if use_test else "val",
                        "flops": float(s.get("train_flops_per_token") or np.nan) * r.get("tokens", np.nan)})
        out[arm] = pts
    return out


def scaling_report(points: Dict[str, List[Dict[str, Any]]], workdir: str, dense_arm: str = "dense",
                   pairs: Optional[Dict[str, List[Dict[str, Any]]]] = None) -> Dict[str, Any]:
    """Fits each arm, computes the multipliers of every other arm against ``dense_arm``, writes
    ``scaling.md`` / ``scaling.csv`` / ``scaling.png``; returns ``{'fits', 'multipliers', 'pairs', 'text',
    'plot'}``. ``pairs``: per arm but ``dense_arm``, one paired gap per size (``compare.paired_gaps`` of the
    arm's model against the dense model of the same position: ``{'reference', 'model', 'metric', 'gaps',
    'mean', 'std', 'lo', 'hi', 'n'}``)."""
    pairs = pairs or {}
    for arm, gs in pairs.items():
        if arm not in points or arm == dense_arm or len(gs) != len(points[arm]):
            raise ValueError(f"scaling_report: pairs[{arm!r}] needs one gap per size of a non-dense arm "
                             f"(got {len(gs)} for arms {sorted(points)}).")
    fits = {}
    for arm, pts in points.items():
        try:
            fits[arm] = stats.fit_power_law([p["n"] for p in pts], [p["loss"] for p in pts])
        except ValueError as e:
            fits[arm] = {"error": str(e)}
    mults = {}
    dfit = fits.get(dense_arm, {})
    for arm, pts in points.items():
        if arm == dense_arm:
            continue
        mults[arm] = [stats.effective_multiplier(p["loss"], p["n"], dfit) if "a" in dfit else float("nan")
                      for p in pts]
    lines = ["## Scaling: loss vs active non-embedding parameters N and training FLOPs", "",
             "| arm | model | N | train FLOPs | loss | loss std | dense-equivalent N | multiplier |",
             "|" + "---|" * 8]
    rows = []
    dense_n = [p["n"] for p in points.get(dense_arm, [])]
    for arm, pts in points.items():
        for i, p in enumerate(pts):
            m = mults[arm][i] if arm in mults else float("nan")
            eq = m * p["n"] if np.isfinite(m) or m == np.inf else float("nan")
            # read off the dense fit outside the dense sizes measured: an extrapolation, marked as one
            extrapolated = bool(dense_n) and not np.isnan(eq) and not min(dense_n) <= eq <= max(dense_n)
            g = pairs[arm][i] if arm in pairs else {}
            rows.append(dict(arm=arm, model=p["model"], n=p["n"], flops=p["flops"], loss=p["loss"],
                             loss_std=p["loss_std"], metric=p["metric"], dense_equivalent_n=eq, multiplier=m,
                             extrapolated=extrapolated,
                             gap_vs_dense=g.get("mean", float("nan")), gap_lo=g.get("lo", float("nan")),
                             gap_hi=g.get("hi", float("nan")), gap_seeds=g.get("n", 0)))
            mark = " (extrapolated)" if extrapolated else ""
            lines.append((f"| {arm} | {p['model']} | {p['n']:.4g} | {p['flops']:.3g} | {p['loss']:.3f} | "
                          f"{p['loss_std']:.3f} | {eq:.4g}{mark} | {m:.2f}{mark} |").replace("nan", "n/a"))
    if pairs:
        lines += ["", f"Paired gap at each size ({dense_arm} minus the model of the same size, same seed, "
                  "nats/token; positive: the model is better), per seed and its 95% t-interval over seeds:", "",
                  f"| arm | {dense_arm} | model | loss | per-seed gaps | mean | std | 95% CI | seeds |", "|" + "---|" * 9]
        for arm, gs in pairs.items():
            for g in gs:
                lines.append(f"| {arm} | {g['reference']} | {g['model']} | {g['metric']} | {stats.gap_cells(g)} |")
    lines += ["", "Fits L(N) = a * N^-alpha + c (least squares):", ""]
    for arm, f in fits.items():
        dof = len(points[arm]) - 3
        lines.append(f"- {arm}: " + (f"a={f['a']:.4g}, alpha={f['alpha']:.3f}, c={f['c']:.3f}, rmse={f['rmse']:.4f} "
                                     f"over {len(points[arm])} sizes ({dof} degree(s) of freedom"
                                     + ("; it passes through them)" if dof == 0 else ")")
                                     if "a" in f else f"no fit ({f['error']})")
                     + (" **(alpha at the end of the searched range [0.001, 3]: these points do not determine "
                        "a power law with an asymptote; its multipliers mean nothing)**" if f.get("at_bound") else ""))
    lines += ["", "multiplier: the dense size with the model's loss on the dense fit, over the model's N "
              "(Clark et al. 2022); inf: below the dense fit's asymptote c; (extrapolated): the dense-equivalent "
              "N lies outside the dense sizes measured, so it is read off the fit beyond its points."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(workdir, "scaling.md"), "w") as f:
        f.write(text)
    with open(os.path.join(workdir, "scaling.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    path = _plot(points, fits, workdir)
    return {"fits": fits, "multipliers": mults, "pairs": pairs, "text": text, "plot": path}


def _plot(points, fits, workdir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (arm, pts) in enumerate(points.items()):
        fl = np.array([p["flops"] for p in pts])
        n = np.array([p["n"] for p in pts])
        y = np.array([p["loss"] for p in pts])
        e = np.nan_to_num(np.array([p["loss_std"] for p in pts]))
        ax1.errorbar(fl, y, yerr=e, fmt="o-", color=f"C{i}", label=arm, capsize=3)
        ax2.errorbar(n, y, yerr=e, fmt="o", color=f"C{i}", label=arm, capsize=3)
        if "a" in fits.get(arm, {}):
            xs = np.geomspace(n.min() / 1.5, n.max() * 1.5, 100)
            f = fits[arm]
            ax2.plot(xs, stats.power_law(xs, f), "-", color=f"C{i}", alpha=0.6,
                     label=f"{arm} fit: alpha={f['alpha']:.2f}, c={f['c']:.2f}")
    for ax, xl in ((ax1, "training FLOPs (whole run)"), (ax2, "active non-embedding params N")):
        ax.set_xscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(f"{'test' if all(p['metric'] == 'test' for ps in points.values() for p in ps) else 'val'} loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_title("Loss vs training FLOPs")
    ax2.set_title("Loss vs N, with L(N) = a N^-alpha + c")
    fig.tight_layout()
    path = os.path.join(workdir, "scaling.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
