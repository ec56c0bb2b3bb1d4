"""Dense-versus-sparse comparisons: train a set of models on the same data order and seeds, then tabulate and plot.

A comparison config (``configs/compare_*.py``) holds:

* ``base``: a full training config (``configs/base.py`` layout);
* ``models``: ``{name: overrides}``, each a nested dict merged into ``base`` (``{'model': {'moe_every': 2}}``);
* ``seeds``: a tuple of the seeds each model is trained with (the same seeds, hence the same data order, for
  all models); from the command line ``--config.seeds=0,1,2`` or ``--config.seeds='[0,1,2]'``;
* ``lr_search`` / ``lr_grid``: with ``lr_search=True``, every model (each on its own) is trained at every
  learning rate of ``lr_grid`` with the seeds ``seeds[:lr_select_seeds]``; its learning rate is the one with
  the lowest mean *validation* loss (``choose_lr``), and the remaining seeds are trained at that rate only.
  Every reported number then comes from the runs at the chosen rate, and the losses in the table are
  *test*-split losses (``data.test_split``; the ``transformers_src`` corpus always has one), which the
  choice never reads; ``lr_grids``: ``{model: grid}``, a model's own grid in place of ``lr_grid`` (models of
  different sizes want different rates: a scaling study widens the small widths' grid), from the command line
  ``--config.lr_grids.NAME=1e-2,2e-2,4e-2``;
* ``gap_reference``: the model the paired gaps are taken against (default: the first model); a scaling study
  (``scaling``: ``{arm: [model per size]}``, ``moe_jax/scaling.py``) pairs each model with the ``dense`` arm's
  model of its size instead;
* ``results_dir``: optional folder (e.g. ``docs/results/headline``) that receives a copy of the table and
  plots, only when asked (``publish=True``, ``experiments/compare.py --publish``), and in ``runs/`` the record
  of every run the table reads (``write_records``: config, summary, gzipped metrics; no checkpoints), which
  ``--reuse <results_dir>/runs`` copies instead of training again.

Each run lives in ``workdir/<model>/seed<k>`` (with ``lr_search``: ``workdir/<model>/lr<lr>/seed<k>``); a run
whose ``summary.json`` exists is not retrained (and a killed run resumes from its checkpoint), so rerunning the
same command finishes what is missing.

Outputs in ``workdir``: ``results.md``, ``results.csv`` (per model; with the paired gap's 95% t-interval),
``gaps.csv`` (per seed), ``lr_grid.csv`` and ``loss_vs_lr.png`` (with ``lr_search``), ``val_loss_vs_steps.png``,
``val_loss_vs_flops.png``, ``val_loss_vs_time.png``, ``expert_load.png`` (MoE models).
"""
from __future__ import annotations

import copy
import csv
import gzip
import json
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from moe_jax import stats


def deep_merge(base: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Recursively merge ``overrides`` into a copy of ``base`` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def model_configs(cmp_cfg) -> Dict[str, Any]:
    """``{name: full training ConfigDict}`` from a comparison config."""
    import ml_collections

    base = cmp_cfg.base.to_dict()
    models = cmp_cfg.models.to_dict()
    # ConfigDict sorts its keys; `order` keeps the author's order. A subset (--config.order=dense,switch) runs
    # and tabulates part of a study.
    order = cmp_cfg.get("order", None) or list(models)
    if isinstance(order, str):
        order = [order]
    # --config.order=a,b arrives as ('a,b',): split each entry on commas
    order = [p.strip() for o in order for p in re.sub(r"[\[\]()'\"]", "", str(o)).split(",") if p.strip()]
    unknown = [n for n in order if n not in models]
    if unknown or len(set(order)) != len(order):
        import difflib

        hints = [f"{u!r} -> {m[0]!r}?" for u in unknown for m in [difflib.get_close_matches(u, list(models), 1)] if m]
        raise ValueError(f"compare config: order={order} must list models of {sorted(models)}, each once"
                         + (f" ({unknown} are not models" + (f"; did you mean {', '.join(hints)}" if hints else "")
                            + ")" if unknown else "") + ".")
    out = {}
    for name in order:
        overrides = models[name]
        unknown = set(_flatten(overrides)) - set(_flatten(base))
        if unknown:
            raise ValueError(f"compare config: models.{name} overrides unknown field(s) {sorted(unknown)} "
                             "(not in base); fix the spelling or add the field to the base config.")
        out[name] = ml_collections.ConfigDict(deep_merge(base, overrides))
    return out


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def comparison_seeds(cmp_cfg) -> List[int]:
    """``config.seeds`` as a list of distinct non-negative ints (a tuple, list, int or ``'0,1,2'`` string)."""
    raw = cmp_cfg.get("seeds", None)
    if isinstance(raw, str):
        raw = [p for p in re.sub(r"[\[\]()]", "", raw).split(",") if p.strip()]
        try:
            raw = [int(p) for p in raw]
        except ValueError:
            raise ValueError(f"compare config: seeds={cmp_cfg.seeds!r} is not a list of integers; write "
                             "--config.seeds=0,1,2.") from None
    elif isinstance(raw, (int, np.integer)) and not isinstance(raw, bool):
        raw = [raw]
    if raw is None or isinstance(raw, bool) or not isinstance(raw, (list, tuple)):
        raise ValueError(f"compare config: seeds={raw!r} must be a tuple of integers, e.g. --config.seeds=0,1,2.")
    seeds = list(raw)
    if not seeds:
        raise ValueError("compare config: seeds is empty; give at least one seed, e.g. --config.seeds=0,1,2.")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise ValueError(f"compare config: seeds={tuple(seeds)!r}: every seed must be an integer >= 0 "
                             f"(got {s!r}); e.g. --config.seeds=0,1,2.")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"compare config: seeds={tuple(seeds)!r} repeats a seed; list each seed once.")
    return [int(s) for s in seeds]


def _check_grid(raw, field: str) -> List[float]:
    """A learning-rate grid of the config field ``field``, validated and sorted."""
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        raw = [raw]
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ValueError(f"compare config: {field}={raw!r} is empty, but lr_search=True needs 3-5 learning "
                         f"rates, e.g. --config.{field}=1e-3,2e-3,4e-3 (or set --config.lr_search=False).")
    for lr in raw:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"compare config: {field}={tuple(raw)!r}: every learning rate must be a positive "
                             f"number (got {lr!r}); e.g. --config.{field}=1e-3,2e-3,4e-3.")
    if len(set(raw)) != len(raw):
        raise ValueError(f"compare config: {field}={tuple(raw)!r} repeats a learning rate; list each once.")
    return sorted(float(x) for x in raw)


def lr_grid(cmp_cfg) -> List[float]:
    """The learning-rate grid (``config.lr_grid``) when ``config.lr_search`` is on, else ``[]``."""
    if not cmp_cfg.get("lr_search", False):
        return []
    return _check_grid(cmp_cfg.get("lr_grid", None), "lr_grid")


def lr_grids(cmp_cfg, names: List[str]) -> Dict[str, List[float]]:
    """Per model of ``names`` its learning-rate grid: ``config.lr_grids[model]`` where the config gives one,
    else ``config.lr_grid``; ``{}`` without ``lr_search``. A key of ``lr_grids`` that is not a model is an
    error (a misspelt name would silently search the shared grid)."""
    base = lr_grid(cmp_cfg)
    per = cmp_cfg.get("lr_grids", None) or {}
    per = per.to_dict() if hasattr(per, "to_dict") else dict(per)
    if not base:
        if per:
            raise ValueError(f"compare config: lr_grids is given for {sorted(per)} but lr_search is off; set "
                             "--config.lr_search=True or drop lr_grids.")
        return {}
    models = set(cmp_cfg.models.to_dict())
    unknown = sorted(k for k in per if k not in models)
    if unknown:
        raise ValueError(f"compare config: lr_grids names {unknown}, which are not models of the comparison "
                         f"{sorted(models)}; rename each key to a model's name or drop it.")
    return {n: _check_grid(per[n], f"lr_grids.{n}") if n in per else base for n in names}


def lr_tag(lr: float) -> str:
    """Folder name of a learning rate's runs: ``lr0.002``."""
    return f"lr{lr:g}"


def select_seeds(cmp_cfg, seeds: List[int]) -> List[int]:
    """The seeds the learning rate is chosen with: the first ``config.lr_select_seeds`` (default 1)."""
    k = cmp_cfg.get("lr_select_seeds", 1)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(seeds):
        raise ValueError(f"compare config: lr_select_seeds={k!r} must be an integer in [1, len(seeds)={len(seeds)}].")
    return seeds[:k]


def _summary(run_dir: str) -> Dict[str, Any]:
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def choose_lr(val_losses: Dict[float, List[float]]) -> Optional[float]:
    """The learning rate with the lowest mean validation loss (``{lr: [val loss per selection seed]}``); a rate
    with a missing or non-finite loss (diverged, not run) cannot win; ties go to the smaller rate. None if no
    rate has all its losses."""
    best, best_loss = None, float("inf")
    for lr in sorted(val_losses):
        v = val_losses[lr]
        if not v or not all(x is not None and np.isfinite(x) for x in v):
            continue
        m = float(np.mean(v))
        if m < best_loss:
            best, best_loss = lr, m
    return best


def lr_search_table(workdir: str, names: List[str], grid, sel: List[int]) -> Dict[str, Dict[str, Any]]:
    """Per model: ``{'val': {lr: [val loss per selection seed]}, 'chosen': lr}``. Reads only ``val_loss`` of
    the runs' ``summary.json`` (the test split is never looked at here). ``grid``: ``{model: rates}``
    (``lr_grids``)."""
    out = {}
    for n in names:
        val = {}
        for lr in grid[n]:
            val[lr] = [_summary(os.path.join(workdir, n, lr_tag(lr), f"seed{s}")).get("val_loss") for s in sel]
        out[n] = {"val": val, "chosen": choose_lr(val)}
    return out


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    """The JSON lines of ``path``, or of ``path + '.gz'`` where only that exists (a published run record)."""
    if not os.path.exists(path):
        path += ".gz"
        if not os.path.exists(path):
            return []
    rows = []
    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill; the run rewrites it on resume
                    continue
    return rows


def curves(run_dir: str) -> Dict[str, np.ndarray]:
    """Validation curve of one run: step, flops (training FLOPs so far), time (s), val loss; plus train stats.

    Later records win when a resumed run logged a step twice.
    """
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    val = {}
    train = {}
    for r in rows:
        if r.get("split") == "val":
            val[r["step"]] = r
        elif r.get("split") == "train":
            train[r["step"]] = r
    steps = sorted(val)
    out = {
        "step": np.array(steps, float),
        "flops": np.array([val[s].get("flops", np.nan) for s in steps], float),
        "time": np.array([val[s].get("elapsed_s", np.nan) for s in steps], float),
        "val_loss": np.array([val[s]["loss"] for s in steps], float),
    }
    tsteps = sorted(train)
    out["train_step"] = np.array(tsteps, float)
    for key in ("tokens_per_s", "drop_fraction", "max_vio"):
        out[key] = np.array([train[s].get(key, np.nan) for s in tsteps], float)
    # mean over MoE layers of the kept experts per token (dynamic-k routers spend what this says)
    out["experts_per_token"] = np.array([np.mean(train[s]["moe/experts_per_token"])
                                         if train[s].get("moe/experts_per_token") else np.nan for s in tsteps], float)
    # mean over MoE layers of logsumexp(router logits)^2: the size of the router logits (router z-loss)
    out["router_z"] = np.array([np.mean(train[s]["moe/z_loss"]) if train[s].get("moe/z_loss") else np.nan
                                for s in tsteps], float)
    loads = [train[s].get("expert_load") for s in tsteps]
    out["expert_load"] = loads if any(l is not None for l in loads) else None
    return out


def interp_at(x: np.ndarray, y: np.ndarray, at: float) -> float:
    """``y`` at ``x = at`` by linear interpolation; NaN outside the measured range."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) == 0 or at < x[0] - 1e-9 or at > x[-1] * (1 + 1e-9):
        return float("nan")
    return float(np.interp(at, x, y))


def _mean_std(values: List[float]) -> tuple:
    v = np.array([x for x in values if np.isfinite(x)], float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "n/a"
    if not np.isfinite(std):  # one seed: no spread to report
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def used_flops_per_token(run_dir: str, train_flops_per_token: Optional[float], experts_per_token: float) -> float:
    """Training FLOPs per token with the routed experts counted at the run's measured kept experts per token
    (per MoE layer) instead of K: what a dynamic-k router (top-p, confidence) spends, and, for a capacity
    router, the useful work without the dropped assignments. NaN for dense models, Soft MoE and expert choice.

    ``train_flops_per_token + n_moe * 6 * P_expert * (experts_per_token - K)``, ``P_expert`` the weights of one
    routed expert (``moe_jax.flops`` conventions).
    """
    path = os.path.join(run_dir, "config.json")
    if train_flops_per_token is None or not np.isfinite(experts_per_token) or not os.path.exists(path):
        return float("nan")
    import ml_collections

    from moe_jax import routing
    from moe_jax.flops import routed_expert_weights
    from moe_jax.train import validate_config

    with open(path) as f:
        resolved = json.load(f)
    cfg = validate_config(ml_collections.ConfigDict(resolved["config"]), resolved.get("vocab_size"))
    m = cfg.moe
    if m is None or not cfg.moe_blocks or routing.get_router_class(m.router).kind != "token_choice":
        return float("nan")
    per_expert = routed_expert_weights(cfg)
    return float(train_flops_per_token + len(cfg.moe_blocks) * 6 * per_expert * (experts_per_token - m.k))


def run_dirs(workdir: str, names: List[str], seeds: List[int], lrs: Optional[Dict[str, float]] = None
             ) -> Dict[str, Dict[int, str]]:
    """``{model: {seed: run folder}}``; ``lrs``: the chosen learning rate per model (``lr_search`` layout)."""
    return {n: {s: os.path.join(workdir, n, *([lr_tag(lrs[n])] if lrs else []), f"seed{s}") for s in seeds}
            for n in names}


def summarize(workdir: str, names: List[str], seeds: List[int],
              runs: Optional[Dict[str, Dict[int, str]]] = None) -> List[Dict[str, Any]]:
    """One row per model: sizes, FLOPs, final / equal-FLOPs / equal-time validation loss, test loss (if the
    corpus has a test split), speed, balance. ``runs``: ``run_dirs(...)`` (default: ``workdir/<model>/seed<k>``)."""
    runs = runs or run_dirs(workdir, names, seeds)
    data = {n: {s: curves(d) for s, d in r.items()} for n, r in runs.items()}
    summaries = {}
    for n in names:
        for s in seeds:
            path = os.path.join(runs[n][s], "summary.json")
            if os.path.exists(path):
                with open(path) as f:
                    summaries.setdefault(n, json.load(f))
    # Budgets shared by every model: the smallest final FLOPs / wall time reached by any run.
    finals_flops = [c["flops"][-1] for n in names for c in data[n].values() if len(c["flops"])]
    finals_time = [c["time"][-1] for n in names for c in data[n].values() if len(c["time"])]
    flop_budget = min(finals_flops) if finals_flops else float("nan")
    time_budget = min(finals_time) if finals_time else float("nan")
    rows = []
    for n in names:
        cs = list(data[n].values())
        final = [c["val_loss"][-1] if len(c["val_loss"]) else float("nan") for c in cs]
        at_flops = [interp_at(c["flops"], c["val_loss"], flop_budget) for c in cs]
        at_time = [interp_at(c["time"], c["val_loss"], time_budget) for c in cs]
        tps = [np.nanmedian(c["tokens_per_s"]) if len(c["tokens_per_s"]) else float("nan") for c in cs]
        drop = [c["drop_fraction"][-1] if len(c["drop_fraction"]) else float("nan") for c in cs]
        vio = [c["max_vio"][-1] if len(c["max_vio"]) else float("nan") for c in cs]
        router_z = [c["router_z"][-1] if len(c["router_z"]) else float("nan") for c in cs]
        ept = [np.nanmean(c["experts_per_token"]) if np.isfinite(c["experts_per_token"]).any() else float("nan")
               for c in cs]
        summ = summaries.get(n, {})
        fm, fs = _mean_std(final)
        test = [_summary(runs[n][s]).get("test_loss") for s in seeds]
        tm, ts = _mean_std([x if x is not None else float("nan") for x in test])
        used = [used_flops_per_token(runs[n][s], summ.get("flops_per_token"), e) for s, e in zip(seeds, ept)]
        rows.append({
            "model": n,
            "total_params": summ.get("total_params"),
            "active_params": summ.get("active_params"),
            "train_flops_per_token": summ.get("flops_per_token"),
            "steps": max([int(c["step"][-1]) for c in cs if len(c["step"])], default=0),  # any seed that ran
            "seeds": len([c for c in cs if len(c["val_loss"])]),
            "val_loss": fm, "val_loss_std": fs,
            "val_ppl": math.exp(fm) if np.isfinite(fm) else float("nan"),
            "test_loss": tm, "test_loss_std": ts,
            "val_loss_at_equal_flops": _mean_std(at_flops)[0], "val_loss_at_equal_flops_std": _mean_std(at_flops)[1],
            "val_loss_at_equal_time": _mean_std(at_time)[0], "val_loss_at_equal_time_std": _mean_std(at_time)[1],
            "tokens_per_s": _mean_std(tps)[0],
            "drop_fraction": _mean_std(drop)[0],
            "max_vio": _mean_std(vio)[0],
            "router_z": _mean_std(router_z)[0],
            "experts_per_token": _mean_std(ept)[0],
            "used_flops_per_token": _mean_std(used)[0],
            "flop_budget": flop_budget, "time_budget": time_budget,
        })
    return rows


def _si(x) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def paired_gaps(runs: Dict[str, Dict[int, str]], names: List[str], seeds: List[int], reference: str
                ) -> List[Dict[str, Any]]:
    """For each model but ``reference``: the per-seed paired gap ``loss[reference, s] - loss[model, s]``
    (positive: the model is better) and its 95% t-interval over seeds (``stats.t_interval``). The loss is the
    test loss when every run of the pair has one, else the last validation loss (``metric`` says which)."""
    if reference not in names:
        raise ValueError(f"compare config: gap_reference={reference!r} is not a model; choose one of {names}.")
    summ = {n: {s: _summary(runs[n][s]) for s in seeds} for n in names}
    out = []
    for n in names:
        if n == reference:
            continue
        pair = [summ[reference][s] for s in seeds] + [summ[n][s] for s in seeds]
        key = "test_loss" if all(p.get("test_loss") is not None for p in pair) else "val_loss"
        gaps = {}
        for s in seeds:
            a, b = summ[reference][s].get(key), summ[n][s].get(key)
            if a is not None and b is not None:
                gaps[s] = float(a) - float(b)
        ci = stats.t_interval(list(gaps.values()))
        out.append({"model": n, "reference": reference, "metric": key.replace("_loss", ""), "gaps": gaps, **ci})
    return out


def grid_edges(lr_info: Optional[Dict[str, Dict[str, Any]]]) -> List[str]:
    """The models whose chosen learning rate is the smallest or largest rate of the grid, as
    ``'model (lr, largest)'``: their best rate may lie outside the grid."""
    out = []
    for n, info in (lr_info or {}).items():
        grid = sorted(info["val"])
        if info["chosen"] is not None and len(grid) > 1 and info["chosen"] in (grid[0], grid[-1]):
            out.append(f"{n} ({info['chosen']:g}, the {'largest' if info['chosen'] == grid[-1] else 'smallest'})")
    return out


def trust_note(seeds: List[int], searched: bool, gaps: List[Dict[str, Any]],
               lr_info: Optional[Dict[str, Dict[str, Any]]] = None) -> str:
    """What the table can and cannot say, from how it was measured."""
    parts = []
    edges = grid_edges(lr_info)
    if edges:
        parts.append(f"Chosen learning rate at the edge of the grid for {', '.join(edges)}: a rate outside the "
                     "grid may be better for it; widen --config.lr_grid (or the model's lr_grids entry) to be sure.")
    if len(seeds) < 2:
        parts.append("One seed: no confidence interval. A gap smaller than the seed-to-seed spread is not a "
                     "result; rerun with --config.seeds=0,1,2 for a 95% interval.")
    if not searched:
        parts.append("One learning rate for every model: a gap can come from one model suiting that rate "
                     "better (docs/results/README.md, learning-rate study: at the mini size on Shakespeare, "
                     "Switch led dense by 0.054 nats at lr 2e-3, but at each model's best rate dense was ahead, "
                     "4.384 vs 4.397); the headline config (configs/compare_headline.py) searches a grid per "
                     "model and reports 3 seeds.")
    if gaps and all(g["metric"] == "val" for g in gaps):
        parts.append("Losses are validation losses (the corpus has no test split).")
    for g in gaps:
        if g["n"] >= 2 and np.isfinite(g["lo"]):
            verdict = ("above 0: the model is ahead" if g["lo"] > 0 else
                       "below 0: the model is behind" if g["hi"] < 0 else "contains 0: no measured difference")
            parts.append(f"{g['reference']} - {g['model']}: 95% CI {verdict}.")
    return " ".join(parts)


def write_table(rows: List[Dict[str, Any]], workdir: str, title: str = "",
                lr_info: Optional[Dict[str, Dict[str, Any]]] = None,
                gaps: Optional[List[Dict[str, Any]]] = None, note: str = "") -> str:
    """Write ``results.md`` and ``results.csv`` (and ``gaps.csv``, ``lr_grid.csv`` when given); return the
    Markdown text. ``lr_info``: ``lr_search_table`` output; ``gaps``: ``paired_gaps`` output."""
    gaps = gaps or []
    by_model = {g["model"]: g for g in gaps}
    for r in rows:
        r["lr"] = (lr_info or {}).get(r["model"], {}).get("chosen", r.get("lr", float("nan")))
        g = by_model.get(r["model"], {})
        r["gap_vs_reference"] = g.get("mean", float("nan"))
        r["gap_ci95_lo"], r["gap_ci95_hi"] = g.get("lo", float("nan")), g.get("hi", float("nan"))
        r["gap_metric"], r["gap_reference"] = g.get("metric", ""), g.get("reference", "")
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if gaps:
        with open(os.path.join(workdir, "gaps.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["reference", "model", "metric", "seed", "gap"])
            for g in gaps:
                for seed, v in g["gaps"].items():
                    w.writerow([g["reference"], g["model"], g["metric"], seed, v])
    if lr_info:
        with open(os.path.join(workdir, "lr_grid.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "lr", "val_loss_mean", "chosen"])
            for n, info in lr_info.items():
                for lr, v in info["val"].items():
                    ok = [x for x in v if x is not None]
                    w.writerow([n, lr, float(np.mean(ok)) if ok and len(ok) == len(v) else float("nan"),
                                lr == info["chosen"]])
    budget_flops, budget_time = rows[0]["flop_budget"], rows[0]["time_budget"]
    lines = []
    if title:
        lines += [f"## {title}", ""]
    lines += [
        "| model | total params | active params | train FLOPs/token | steps | seeds | lr | test loss | val loss | "
        f"val ppl | val loss @ {_si(budget_flops)}FLOPs | val loss @ {budget_time:.0f}s | tokens/s | drop frac | "
        "MaxVio | router z | experts/token | used FLOPs/token |",
        "|" + "---|" * 18,
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {_si(r['total_params'])} | {_si(r['active_params'])} | "
            f"{_si(r['train_flops_per_token'])} | {r['steps']} | {r['seeds']} | {r['lr']:g} | "
            f"{_fmt(r['test_loss'], r['test_loss_std'])} | {_fmt(r['val_loss'], r['val_loss_std'])} | "
            f"{r['val_ppl']:.2f} | "
            f"{_fmt(r['val_loss_at_equal_flops'], r['val_loss_at_equal_flops_std'])} | "
            f"{_fmt(r['val_loss_at_equal_time'], r['val_loss_at_equal_time_std'])} | "
            f"{r['tokens_per_s']:.0f} | {r['drop_fraction']:.3f} | {r['max_vio']:.3f} | {r['router_z']:.2f} | "
            f"{r['experts_per_token']:.2f} | {_si(r['used_flops_per_token'])} |"
            .replace("nan", "n/a"))
    lines += ["", "val loss: mean ± sample std over seeds of the last validation loss (nats/token); "
              "@ FLOPs / @ s: interpolated at the smallest training-FLOPs / wall-time budget that every run reached. "
              "drop frac, MaxVio, router z (mean logsumexp(router logits)^2, the z-loss), experts/token: MoE "
              "layers' means at the last log step (experts/token: mean over training; dense: n/a). Train "
              "FLOPs/token count K experts per token; used FLOPs/token count the experts/token the run kept "
              "instead (what a dynamic-k router spends; without dropped assignments). lr: the model's "
              "learning rate (with a learning-rate search: the one chosen on the validation split); test loss: "
              "mean ± std over seeds on the test split, which the choice never reads (n/a: no test split)."]
    if gaps:
        lines += ["", "Paired gap (reference minus model, nats/token; positive: the model is better), per seed and "
                  "its 95% t-interval over seeds:", "",
                  "| reference - model | loss | per-seed gaps | mean | std | 95% CI | seeds |", "|" + "---|" * 7]
        for g in gaps:
            lines.append(f"| {g['reference']} - {g['model']} | {g['metric']} | {stats.gap_cells(g)} |")
    if lr_info:
        grid = sorted({lr for info in lr_info.values() for lr in info["val"]})
        lines += ["", "Learning-rate search: mean validation loss at each rate (selection seeds); **bold** = "
                  "chosen (lowest validation loss; the test split is not read); -: not in the model's grid:", "",
                  "| model | chosen lr | " + " | ".join(f"{lr:g}" for lr in grid) + " |",
                  "|" + "---|" * (2 + len(grid))]
        for n, info in lr_info.items():
            cells = []
            for lr in grid:
                v = info["val"].get(lr, [])
                m = float(np.mean(v)) if v and all(x is not None for x in v) else float("nan")
                cell = "-" if lr not in info["val"] else f"{m:.3f}" if np.isfinite(m) else "n/a"
                cells.append(f"**{cell}**" if lr == info["chosen"] else cell)
            chosen = f"{info['chosen']:g}" if info["chosen"] is not None else "n/a"
            lines.append(f"| {n} | {chosen} | " + " | ".join(cells) + " |")
    if note:
        lines += ["", f"trust: {note}"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(text)
    return text


def plot_lr(workdir: str, lr_info: Dict[str, Dict[str, Any]]) -> str:
    """``loss_vs_lr.png``: per model, mean validation loss (selection seeds) against the learning rate, the
    chosen rate marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(lr_info)
    cols = min(4, len(names))
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for i, (ax, n) in enumerate(zip(axes.flat, names)):
        info = lr_info[n]
        lrs = sorted(info["val"])
        ys = [float(np.mean(info["val"][lr])) if all(x is not None for x in info["val"][lr]) else np.nan
              for lr in lrs]
        ax.plot(lrs, ys, "o-", color=f"C{i}")
        if info["chosen"] is not None:
            ax.plot([info["chosen"]], [float(np.mean(info["val"][info["chosen"]]))], "k*", ms=12, label="chosen")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(lrs)
        ax.set_xticklabels([f"{x:g}" for x in lrs], fontsize=8)
        ax.set_title(n, fontsize=9)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(workdir, "loss_vs_lr.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(workdir: str, names: List[str], seeds: List[int],
         runs: Optional[Dict[str, Dict[int, str]]] = None) -> List[str]:
    """Validation loss against steps, FLOPs and wall time; per-expert load over time for MoE models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = runs or run_dirs(workdir, names, seeds)
    data = {n: [curves(runs[n][s]) for s in seeds] for n in names}
    paths = []
    for key, xlabel, fname in (("step", "training step", "val_loss_vs_steps.png"),
                               ("flops", "training FLOPs", "val_loss_vs_flops.png"),
                               ("time", "wall time (s)", "val_loss_vs_time.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, n in enumerate(names):
            for j, c in enumerate(data[n]):
                if len(c["val_loss"]):
                    ax.plot(c[key], c["val_loss"], color=f"C{i}", alpha=0.9 if j == 0 else 0.5,
                            label=n if j == 0 else None)
        if key == "flops":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"Validation loss vs {xlabel}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(workdir, fname)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    moe = [n for n in names if data[n] and data[n][0]["expert_load"] is not None]
    if moe:
        cols = min(4, len(moe))
        rows = -(-len(moe) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.4 * rows), squeeze=False)
        for ax in axes.flat[len(moe):]:
            ax.set_visible(False)
        for ax, n in zip(axes.flat, moe):
            c = data[n][0]
            load = np.array([np.mean(np.asarray(l, float).reshape(-1, np.shape(l)[-1]), axis=0)
                             for l in c["expert_load"] if l is not None])  # [steps, E], mean over layers
            steps = c["train_step"][: len(load)]
            num_e = load.shape[1]
            # up to 10 experts: a legend entry each; more: one colour scale over the expert index
            cmap = plt.get_cmap("tab10" if num_e <= 10 else "viridis")
            for e in range(num_e):
                ax.plot(steps, load[:, e], lw=1, color=cmap(e if num_e <= 10 else e / max(num_e - 1, 1)),
                        label=f"expert {e}")
            ax.axhline(1.0 / num_e, color="k", ls="--", lw=0.8, label=f"1/E = 1/{num_e} (balanced)")
            if num_e <= 10:
                ax.legend(fontsize=6, ncol=2, loc="upper right")
            else:
                bar = fig.colorbar(plt.cm.ScalarMappable(norm=plt.Normalize(0, num_e - 1), cmap=cmap), ax=ax)
                bar.set_label("expert")
                ax.legend(handles=[ax.get_lines()[-1]], fontsize=6, loc="upper right")  # the 1/E line
            ax.set_title(f"{n}: per-expert load")
            ax.set_xlabel("training step")
            ax.set_ylabel("fraction of assignments")
        fig.tight_layout()
        path = os.path.join(workdir, "expert_load.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


RECORD_FILES = ("config.json", "summary.json")


def write_records(workdir: str, run_list: List[str], dest: str) -> None:
    """Copy the record of each run of ``run_list`` (folders under ``workdir``) to the same relative path under
    ``dest``: ``config.json``, ``summary.json`` and ``metrics.jsonl`` as ``metrics.jsonl.gz`` (about 20 kB a
    run; no checkpoints, TensorBoard events or samples). That is what the table, the plots and ``--reuse``
    read, so a published study can be re-tabulated, re-analysed or extended on another machine. ``dest`` is
    replaced as a whole (written beside it, then swapped in), so it never mixes records of two versions."""
    tmp, old = dest + ".writing", dest + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for run_dir in run_list:
        out = os.path.join(tmp, os.path.relpath(run_dir, workdir))
        os.makedirs(out, exist_ok=True)
        for name in RECORD_FILES:
            if os.path.exists(os.path.join(run_dir, name)):
                shutil.copy(os.path.join(run_dir, name), out)
        metrics = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(metrics):
            with open(metrics, "rb") as src, open(os.path.join(out, "metrics.jsonl.gz"), "wb") as raw:
                with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:  # mtime=0: same run, same bytes
                    shutil.copyfileobj(src, gz)
        elif os.path.exists(metrics + ".gz"):  # a run copied from a record
            shutil.copy(metrics + ".gz", out)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(dest):
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def resolve_init_ref(run_cfg, name: str, names: List[str], workdir: str, seed: int) -> None:
    """``init.from_dir='@other'`` -> ``workdir/other/seed<seed>``: start from another run of this comparison (same
    seed; it must come earlier in ``order``, so it is trained first). Used by the upcycling study."""
    init = run_cfg.get("init")
    ref = init.get("from_dir", "") if init is not None else ""
    if not (isinstance(ref, str) and ref.startswith("@")):
        return
    source = ref[1:]
    if source not in names[: names.index(name)]:
        raise ValueError(f"compare config: models.{name}.init.from_dir={ref!r} must name a model listed before "
                         f"{name!r} in order (got order {names}); put {source!r} first.")
    run_cfg.init.from_dir = os.path.join(workdir, source, f"seed{seed}")


def _run_key(config_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The fields that decide a run's result: the whole config except where the data cache lives."""
    d = json.loads(json.dumps(config_dict))
    d.get("data", {}).pop("cache_dir", None)
    return d


def run_key(run_cfg) -> Dict[str, Any]:
    """``_run_key`` of a run's ConfigDict: two runs with equal keys train the same model on the same data (what
    ``--reuse`` copies by)."""
    return _run_key(json.loads(run_cfg.to_json_best_effort()))


def find_same_run(run_cfg, reuse_dirs: List[str], seed: int) -> Optional[str]:
    """A finished run (``<dir>/<any model>/seed<seed>`` or ``<dir>/<any model>/lr<rate>/seed<seed>``, with
    ``summary.json``) in one of ``reuse_dirs`` (or in its ``runs/``, the records of a published study) whose
    ``config.json`` holds exactly ``run_cfg`` (up to ``data.cache_dir``), or None. Studies share models (the
    Switch E=8 model is in four of them); with this, each is trained once."""
    want = run_key(run_cfg)
    # a published study (``<results_dir>``) keeps its run records in ``runs/`` (``write_records``)
    roots = [r for root in reuse_dirs for r in (root, os.path.join(root, "runs")) if os.path.isdir(r)]
    for root in roots:
        cands = []
        for name in sorted(os.listdir(root)):
            cands.append(os.path.join(root, name, f"seed{seed}"))
            if os.path.isdir(os.path.join(root, name)):  # a learning-rate search's runs: <model>/lr<rate>/seed<s>
                cands += [os.path.join(root, name, sub, f"seed{seed}")
                          for sub in sorted(os.listdir(os.path.join(root, name))) if sub.startswith("lr")]
        for cand in cands:
            if not (os.path.exists(os.path.join(cand, "summary.json"))
                    and os.path.exists(os.path.join(cand, "config.json"))):
                continue
            with open(os.path.join(cand, "config.json")) as f:
                if _run_key(json.load(f).get("config", {})) == want:
                    return cand
    return None


def parse_only(only: List[str], names: List[str], seeds: List[int], grid, sel: List[int]) -> set:
    """``--only`` items -> a set of ``(model, seed, lr or None)``. ``'model:seed'`` is every run of that model
    and seed (with ``lr_search``, its whole grid at a selection seed); ``'model:seed:lr'`` is one grid run, so
    that the grid too can be split across processes. ``lr`` must be a rate of ``lr_grid``; at a seed that is
    not a selection seed it must be omitted (that seed trains at the chosen rate, unknown until the grid is
    done). ``grid``: ``{model: rates}`` (``lr_grids``; ``{}`` without a search)."""
    wanted = set()
    form = "'model:seed' or 'model:seed:lr'" if grid else "'model:seed'"
    for item in only:
        parts = item.split(":")
        name, seed = parts[0], parts[1] if len(parts) > 1 else ""
        if (len(parts) not in (2, 3) or name not in names or not seed.lstrip("-").isdigit()
                or int(seed) not in seeds):
            raise ValueError(f"--only {item!r}: expected {form} with model in {names} and seed in {seeds}.")
        lr = None
        if len(parts) == 3:
            mgrid = grid.get(name, [])
            try:
                match = [g for g in mgrid if lr_tag(g) == lr_tag(float(parts[2]))]  # as the folders name them
            except ValueError:
                match = []
            if not grid:
                raise ValueError(f"--only {item!r}: a learning rate is given but this comparison has no "
                                 "lr_search; write 'model:seed'.")
            if not match:
                raise ValueError(f"--only {item!r}: {parts[2]!r} is not a rate of {name}'s lr_grid {list(mgrid)}.")
            if int(seed) not in sel:
                raise ValueError(f"--only {item!r}: seed {seed} is not a selection seed {sel}; it trains at the "
                                 f"chosen rate only: write '{name}:{seed}'.")
            lr = match[0]
        wanted.add((name, int(seed), lr))
    return wanted


def run_order(names: List[str], seeds: List[int], grid, sel: List[int]):
    """The runs of a comparison in training order, as ``(model, seed, lr, grid_run)``. Without a grid: every
    model at every seed (``lr`` None). With one: first each model's grid at the selection seeds ``sel``
    (``grid_run`` True), then each model at the remaining seeds, at its chosen rate (``lr`` None: known only
    once the grid is done). ``run_comparison`` trains in this order and ``run_plan`` schedules it. ``grid``:
    ``{model: rates}`` (``lr_grids``; ``{}`` without a search)."""
    if not grid:
        for n in names:
            for s in seeds:
                yield n, s, None, False
        return
    for n in names:
        for s in sel:
            for lr in grid[n]:
                yield n, s, lr, True
    for n in names:
        for s in seeds[len(sel):]:
            yield n, s, None, False


def run_plan(cmp_cfg, workdir: str) -> List[Tuple[str, List[str]]]:
    """The runs of a comparison that have no ``summary.json`` yet, as ``[(only item, [items it waits for])]``
    in training order: each is one ``--only`` item (``'model:seed:lr'`` for a grid run, ``'model:seed'``
    otherwise). A seed at a model's chosen rate waits for that model's grid runs. For running a comparison in
    parallel processes (``experiments/compare.py --jobs N``)."""
    workdir = os.path.abspath(workdir)
    names = list(model_configs(cmp_cfg))
    seeds = comparison_seeds(cmp_cfg)
    grid = lr_grids(cmp_cfg, names)
    sel = select_seeds(cmp_cfg, seeds) if grid else []
    done = lambda *parts: os.path.exists(os.path.join(workdir, *parts, "summary.json"))
    plan = []
    for n, s, lr, grid_run in run_order(names, seeds, grid, sel):
        if not grid:
            if not done(n, f"seed{s}"):
                plan.append((f"{n}:{s}", []))
        elif grid_run:
            if not done(n, lr_tag(lr), f"seed{s}"):
                plan.append((f"{n}:{s}:{lr:g}", []))
        elif not any(done(n, lr_tag(g), f"seed{s}") for g in grid[n]):
            waits = [f"{n}:{t}:{g:g}" for t in sel for g in grid[n] if not done(n, lr_tag(g), f"seed{t}")]
            plan.append((f"{n}:{s}", waits))
    return plan


def child_command(python: str, script: str, argv: List[str], item: str) -> List[str]:
    """The command of one run of ``run_parallel``: ``script`` with its arguments ``argv`` less ``--jobs``,
    ``--only``, ``--publish`` and ``--table_only``, plus ``--only=item``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--jobs", "--only"):
            skip = True
            continue
        if a.startswith(("--jobs=", "--only=", "--publish", "--nopublish", "--table_only", "--notable_only")):
            continue
        out.append(a)
    return [python, script] + out + [f"--only={item}"]


def run_parallel(cmp_cfg, workdir: str, jobs: int, command, log=print) -> None:
    """Train the missing runs of a comparison ``jobs`` at a time (``run_plan``): ``command(item)`` is the
    argv of the process that trains ``--only`` item (``child_command``); each process is pinned to one CPU
    core where the OS allows and logs to ``<workdir>/logs/<item>.log``. A failed run stops new starts and,
    once the running ones end, raises with the path of its log. Interrupted (Ctrl-C, or SIGTERM as ``kill``
    sends it), it stops its running runs before it exits, so none is left training unseen; each resumes from
    its last checkpoint when the same command runs again."""
    running: Dict[str, Any] = {}

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if main_thread else None
    try:
        _schedule(cmp_cfg, workdir, jobs, command, log, running)
    except BaseException:
        live = {item: (proc, path) for item, (_, proc, path, _) in running.items() if proc.poll() is None}
        for proc, _ in live.values():
            proc.terminate()
        for item, (proc, path) in live.items():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log(f"[compare] stopped {item} (its log: {path}); the same command resumes it")
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _schedule(cmp_cfg, workdir, jobs, command, log, running) -> None:
    """The loop of ``run_parallel``; ``running`` (item -> (slot, process, log, start)) is the caller's, so
    that it can stop the processes it holds."""
    plan = run_plan(cmp_cfg, workdir)
    logs = os.path.join(os.path.abspath(workdir), "logs")
    os.makedirs(logs, exist_ok=True)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    finished, failed = set(), []
    pending = list(plan)
    log(f"[compare] {len(plan)} runs to train, {jobs} at a time; logs in {logs}")
    while pending or running:
        free = [c for c in range(jobs) if c not in {slot for slot, _, _, _ in running.values()}]
        # a ready run that waited for a grid goes first: a model's seeds finish before the next model's grid
        ready = sorted([(item, waits) for item, waits in pending if all(w in finished for w in waits)],
                       key=lambda p: not p[1])
        while free and ready and not failed:
            (item, _), slot = ready.pop(0), free.pop(0)
            pending = [p for p in pending if p[0] != item]
            path = os.path.join(logs, item.replace(":", "_") + ".log")
            core = cores[slot % len(cores)] if cores and len(cores) >= jobs else None
            pin = (lambda c=core: os.sched_setaffinity(0, {c})) if core is not None else None
            with open(path, "a") as f:
                proc = subprocess.Popen(command(item), stdout=f, stderr=subprocess.STDOUT, preexec_fn=pin)
            running[item] = (slot, proc, path, time.time())
            log(f"[compare] started {item}" + (f" on core {core}" if core is not None else "") + f" -> {path}")
        if failed and not running:
            break
        if not running and pending and not ready:
            raise RuntimeError(f"--jobs: runs {[p[0] for p in pending]} wait for runs that never finished")
        time.sleep(0.5)
        for item, (slot, proc, path, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[item]
            if proc.returncode == 0:
                finished.add(item)
                log(f"[compare] finished {item} in {time.time() - t0:.0f} s")
            else:
                failed.append((item, path))
                log(f"[compare] {item} failed (exit {proc.returncode}); see {path}")
    if failed:
        raise RuntimeError(f"--jobs: {len(failed)} run(s) failed: "
                           + "; ".join(f"{i} (log {p})" for i, p in failed))


def _train_one(name, cfg, seed, run_dir, names, workdir, reuse_dirs, train_fn, log, lr=None) -> None:
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        log(f"[compare] {name} seed {seed}{'' if lr is None else f' lr {lr:g}'}: done already, skipping")
        return
    run_cfg = copy.deepcopy(cfg)
    run_cfg.seed = int(seed)
    if lr is not None:
        run_cfg.train.learning_rate = float(lr)
    resolve_init_ref(run_cfg, name, names, workdir, seed)
    same = None if os.path.exists(run_dir) else find_same_run(run_cfg, reuse_dirs, seed)
    if same is not None:  # an interrupted run of its own (run_dir exists) resumes instead
        log(f"[compare] {name} seed {seed}: same config as {same}, copying it")
        tmp = run_dir + ".copying"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(same, tmp)
        os.replace(tmp, run_dir)  # all or nothing: a killed copy leaves no half run behind
        return
    log(f"[compare] training {name} seed {seed}{'' if lr is None else f' lr {lr:g}'} -> {run_dir}")
    train_fn(run_cfg, run_dir)


_DENSE_ARM = "dense"  # the arm of a scaling study the others are paired with, size by size


def _scaling_pairs(cmp_cfg, names: List[str], runs, seeds: List[int]):
    """A scaling study's arms ``{arm: [model per size]}`` (the models of ``names``: ``--config.order`` may run
    part of it) and its paired gaps ``{arm: [dense of size i - model of size i]}`` (arms with one model per
    dense size); ``({}, {})`` without ``config.scaling``."""
    if not cmp_cfg.get("scaling", None):
        return {}, {}
    all_models = set(cmp_cfg.models.to_dict())
    full = cmp_cfg.scaling.to_dict()
    for k, v in full.items():
        unknown = [m for m in v if m not in all_models]
        if unknown:
            raise ValueError(f"compare config: scaling.{k} lists {unknown}, which are not models of the "
                             f"comparison {sorted(all_models)}.")
    arms = {k: [m for m in v if m in names] for k, v in full.items()}
    dense = full.get(_DENSE_ARM, [])
    pairs = {}
    for k, v in full.items():  # size i of arm k pairs with size i of the dense arm, both of them run
        if k == _DENSE_ARM or len(v) != len(dense):
            continue
        both = [(d, m) for d, m in zip(dense, v) if m in names]
        if both and all(d in names for d, _ in both):
            pairs[k] = [paired_gaps(runs, [d, m], seeds, d)[0] for d, m in both]
    return arms, pairs


def run_comparison(cmp_cfg, workdir: str, train_fn=None, log=print, only: Optional[List[str]] = None,
                   train_missing: bool = True, reuse: Optional[List[str]] = None,
                   publish: bool = False) -> Dict[str, Any]:
    """Train every (model, seed) that has no ``summary.json`` yet, then write the table and plots.

    With ``lr_search``: first every (model, rate of ``lr_grid``) at the selection seeds, then each model's
    chosen rate (lowest mean validation loss) at the remaining seeds.
    ``only``: a list of ``'model:seed'`` or ``'model:seed:lr'`` (``parse_only``) — train just those runs and
    write no table (for running the runs of one comparison as separate processes side by side; a final call
    without ``only`` then writes the table). With ``lr_search``, ``'model:seed'`` at a selection seed trains
    the whole grid, ``'model:seed:lr'`` one rate of it, and another seed the chosen rate (its grid runs must be
    done).
    ``train_missing=False``: tabulate what exists and train nothing (unfinished runs show what they logged).
    ``reuse``: workdirs of other comparisons; a missing run whose exact config finished there is copied
    (``find_same_run``) instead of trained.
    ``publish``: also copy the table and plots into the config's ``results_dir`` (a checkout folder such as
    ``docs/results/headline``); without it nothing is written outside ``workdir``.
    """
    if train_fn is None:
        from moe_jax.train import train as train_fn
    results_dir = cmp_cfg.get("results_dir", "")
    if publish and not results_dir:
        raise ValueError("--publish: this comparison config has no results_dir to copy the results into; set "
                         "--config.results_dir=docs/results/NAME.")
    workdir = os.path.abspath(workdir)
    configs = model_configs(cmp_cfg)
    names = list(configs)
    seeds = comparison_seeds(cmp_cfg)
    grid = lr_grids(cmp_cfg, names)
    sel = select_seeds(cmp_cfg, seeds) if grid else []
    reference = cmp_cfg.get("gap_reference", "") or names[0]
    if reference not in names:
        raise ValueError(f"compare config: gap_reference={reference!r} is not a model; choose one of {names}.")
    reuse_dirs = [os.path.abspath(r) for r in reuse or []]
    for root in reuse_dirs:  # checked once, before any training
        if not os.path.isdir(root):
            raise ValueError(f"--reuse {root!r}: no such folder; give the --workdir of an earlier comparison.")
    wanted = parse_only(only, names, seeds, grid, sel) if only else None
    os.makedirs(workdir, exist_ok=True)

    def todo(name, seed, lr=None):
        return train_missing and (wanted is None or (name, seed, None) in wanted or (name, seed, lr) in wanted)
    args = dict(names=names, workdir=workdir, reuse_dirs=reuse_dirs, train_fn=train_fn, log=log)
    lr_info = None
    for name, seed, lr, grid_run in run_order(names, seeds, grid, sel):
        if grid and not grid_run:  # a remaining seed: the chosen rate, once the grid is done
            lr_info = lr_info or lr_search_table(workdir, names, grid, sel)  # read once, after the grid
            lr = lr_info[name]["chosen"]
        if not todo(name, seed, lr):
            continue
        if grid and lr is None:
            raise ValueError(f"compare: {name} seed {seed} needs {name}'s chosen learning rate, but its "
                             f"grid runs at seeds {sel} are not all finished; train those first.")
        run_dir = os.path.join(workdir, name, *([lr_tag(lr)] if grid else []), f"seed{seed}")
        _train_one(name, configs[name], seed, run_dir, lr=lr, **args)
    if grid:  # the grid runs are all before the first chosen-rate run, so a table read then still holds
        lr_info = lr_info or lr_search_table(workdir, names, grid, sel)
    if wanted is not None:
        return {"rows": [], "table": "", "plots": []}
    if grid:
        missing = [n for n in names if lr_info[n]["chosen"] is None]
        if missing:
            raise ValueError(f"compare: no learning rate could be chosen for {missing} (grid runs missing or all "
                             "diverged); finish the grid runs or widen --config.lr_grid.")
        runs = run_dirs(workdir, names, seeds, {n: lr_info[n]["chosen"] for n in names})
    else:
        runs = run_dirs(workdir, names, seeds)
    rows = summarize(workdir, names, seeds, runs)
    summaries = {n: next((x for x in (_summary(runs[n][sd]) for sd in seeds) if x), {}) for n in names}
    for r, n in zip(rows, names):
        if not grid:
            r["lr"] = float(configs[n].train.learning_rate)
        d = configs[n].data
        r["tokens"] = r["steps"] * int(d.batch_size) * int(d.seq_len)  # per run, at the last step logged
        n_train = summaries[n].get("train_tokens")
        r["epochs"] = r["tokens"] / n_train if n_train else float("nan")
    arms, pairs = _scaling_pairs(cmp_cfg, names, runs, seeds)
    # a scaling study pairs each model with the dense model of its size; any other study, with the reference
    gaps = [g for v in pairs.values() for g in v] if pairs else paired_gaps(runs, names, seeds, reference)
    note = trust_note(seeds, bool(grid), gaps, lr_info)
    title = cmp_cfg.get("title", "")
    if rows and np.isfinite(rows[0]["epochs"]):
        r0 = rows[0]
        title += (f"\n\nData: {configs[names[0]].data.corpus}, {r0['tokens'] / r0['epochs']:,.0f} training tokens; "
                  f"{r0['tokens']:,} tokens per run = {r0['epochs']:.3g} epochs.")
    table = write_table(rows, workdir, title=title, lr_info=lr_info, gaps=gaps, note=note)
    plots = plot(workdir, names, seeds, runs)
    if lr_info:
        plots.append(plot_lr(workdir, lr_info))
    written = [os.path.join(workdir, f) for f in ("results.md", "results.csv", "gaps.csv", "lr_grid.csv")]
    scaling = None
    if arms:
        from moe_jax import scaling as scaling_lib

        scaling = scaling_lib.scaling_report(scaling_lib.arm_points(rows, runs, arms, summaries), workdir,
                                             dense_arm=_DENSE_ARM, pairs=pairs)
        table += "\n" + scaling["text"]
        plots.append(scaling["plot"])
        written += [os.path.join(workdir, "scaling.md"), os.path.join(workdir, "scaling.csv")]
    if publish:
        os.makedirs(results_dir, exist_ok=True)
        for path in [p for p in written if os.path.exists(p)] + plots:
            shutil.copy(path, results_dir)
        grid_runs = [os.path.join(workdir, n, lr_tag(g), f"seed{t}") for n in names for g in grid.get(n, [])
                     for t in sel]
        table_runs = [d for n in names for d in runs[n].values()]
        write_records(workdir, sorted({d for d in grid_runs + table_runs
                                       if os.path.exists(os.path.join(d, "summary.json"))}),
                      os.path.join(results_dir, "runs"))
    return {"rows": rows, "table": table, "plots": plots, "gaps": gaps, "lr_info": lr_info, "note": note,
            "scaling": scaling}
