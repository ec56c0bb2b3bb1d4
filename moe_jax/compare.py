"""Dense-versus-sparse comparisons: train a set of models on the same data order and seeds, then tabulate and plot.

A comparison config (``configs/compare_*.py``) holds:

* ``base``: a full training config (``configs/base.py`` layout);
* ``models``: ``{name: overrides}``, each a nested dict merged into ``base`` (``{'model': {'moe_every': 2}}``);
* ``seeds``: the seeds each model is trained with (the same seeds, hence the same data order, for all models);
* ``results_dir``: optional folder (e.g. ``docs/results/headline``) that receives a copy of the table and plots.

Each run lives in ``workdir/<model>/seed<k>``; a run whose ``summary.json`` exists is not retrained (and a
killed run resumes from its checkpoint), so rerunning the same command finishes what is missing.

Outputs in ``workdir``: ``results.md``, ``results.csv``, ``val_loss_vs_steps.png``,
``val_loss_vs_flops.png``, ``val_loss_vs_time.png``, ``expert_load.png`` (MoE models).
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
from typing import Any, Dict, List, Optional

import numpy as np


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
    order = list(cmp_cfg.get("order", None) or models)  # ConfigDict sorts its keys; `order` keeps the author's
    if sorted(order) != sorted(models):
        raise ValueError(f"compare config: order {order} must list exactly the models {sorted(models)}.")
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


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
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


def summarize(workdir: str, names: List[str], seeds: List[int]) -> List[Dict[str, Any]]:
    """One row per model: sizes, FLOPs, final / equal-FLOPs / equal-time validation loss, speed, balance."""
    runs = {n: {s: os.path.join(workdir, n, f"seed{s}") for s in seeds} for n in names}
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


def write_table(rows: List[Dict[str, Any]], workdir: str, title: str = "") -> str:
    """Write ``results.md`` and ``results.csv``; return the Markdown text."""
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    budget_flops, budget_time = rows[0]["flop_budget"], rows[0]["time_budget"]
    lines = []
    if title:
        lines += [f"## {title}", ""]
    lines += [
        "| model | total params | active params | train FLOPs/token | steps | seeds | val loss | val ppl | "
        f"val loss @ {_si(budget_flops)}FLOPs | val loss @ {budget_time:.0f}s | tokens/s | drop frac | MaxVio | "
        "router z | experts/token | used FLOPs/token |",
        "|" + "---|" * 16,
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {_si(r['total_params'])} | {_si(r['active_params'])} | "
            f"{_si(r['train_flops_per_token'])} | {r['steps']} | {r['seeds']} | "
            f"{_fmt(r['val_loss'], r['val_loss_std'])} | {r['val_ppl']:.2f} | "
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
              "instead (what a dynamic-k router spends; without dropped assignments)."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(text)
    return text


def plot(workdir: str, names: List[str], seeds: List[int]) -> List[str]:
    """Validation loss against steps, FLOPs and wall time; per-expert load over time for MoE models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {n: [curves(os.path.join(workdir, n, f"seed{s}")) for s in seeds] for n in names}
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


def find_same_run(run_cfg, reuse_dirs: List[str], seed: int) -> Optional[str]:
    """A finished run (``<dir>/<any model>/seed<seed>`` with ``summary.json``) in one of ``reuse_dirs`` whose
    ``config.json`` holds exactly ``run_cfg`` (up to ``data.cache_dir``), or None. Studies share models (the
    Switch E=8 model is in four of them); with this, each is trained once."""
    want = _run_key(json.loads(run_cfg.to_json_best_effort()))
    for root in reuse_dirs:
        for name in sorted(os.listdir(root)):
            cand = os.path.join(root, name, f"seed{seed}")
            if not (os.path.exists(os.path.join(cand, "summary.json"))
                    and os.path.exists(os.path.join(cand, "config.json"))):
                continue
            with open(os.path.join(cand, "config.json")) as f:
                if _run_key(json.load(f).get("config", {})) == want:
                    return cand
    return None


def run_comparison(cmp_cfg, workdir: str, train_fn=None, log=print, only: Optional[List[str]] = None,
                   train_missing: bool = True, reuse: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train every (model, seed) that has no ``summary.json`` yet, then write the table and plots.

    ``only``: a list of ``'model:seed'`` — train just those runs and write no table (for running the runs of one
    comparison as separate processes side by side; a final call without ``only`` then writes the table).
    ``train_missing=False``: tabulate what exists and train nothing (unfinished runs show what they logged).
    ``reuse``: workdirs of other comparisons; a missing run whose exact config finished there is copied
    (``find_same_run``) instead of trained.
    """
    if train_fn is None:
        from moe_jax.train import train as train_fn
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    configs = model_configs(cmp_cfg)
    names = list(configs)
    reuse_dirs = [os.path.abspath(r) for r in reuse or []]
    for root in reuse_dirs:  # checked once, before any training
        if not os.path.isdir(root):
            raise ValueError(f"--reuse {root!r}: no such folder; give the --workdir of an earlier comparison.")
    seeds = list(cmp_cfg.seeds)
    wanted = None
    if only:
        wanted = set()
        for item in only:
            name, _, seed = item.partition(":")
            if name not in configs or not seed.lstrip("-").isdigit() or int(seed) not in seeds:
                raise ValueError(f"--only {item!r}: expected 'model:seed' with model in {names} and seed in {seeds}.")
            wanted.add((name, int(seed)))
    for name, cfg in configs.items():
        for seed in seeds:
            if (wanted is not None and (name, seed) not in wanted) or not train_missing:
                continue
            run_dir = os.path.join(workdir, name, f"seed{seed}")
            if os.path.exists(os.path.join(run_dir, "summary.json")):
                log(f"[compare] {name} seed {seed}: done already, skipping")
                continue
            run_cfg = copy.deepcopy(cfg)
            run_cfg.seed = int(seed)
            resolve_init_ref(run_cfg, name, names, workdir, seed)
            same = None if os.path.exists(run_dir) else find_same_run(run_cfg, reuse_dirs, seed)
            if same is not None:  # an interrupted run of its own (run_dir exists) resumes instead
                log(f"[compare] {name} seed {seed}: same config as {same}, copying it")
                tmp = run_dir + ".copying"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(same, tmp)
                os.replace(tmp, run_dir)  # all or nothing: a killed copy leaves no half run behind
                continue
            log(f"[compare] training {name} seed {seed} -> {run_dir}")
            train_fn(run_cfg, run_dir)
    if wanted is not None:
        return {"rows": [], "table": "", "plots": []}
    rows = summarize(workdir, names, seeds)
    table = write_table(rows, workdir, title=cmp_cfg.get("title", ""))
    plots = plot(workdir, names, seeds)
    results_dir = cmp_cfg.get("results_dir", "")
    if results_dir:
        os.makedirs(results_dir, exist_ok=True)
        for path in [os.path.join(workdir, "results.md"), os.path.join(workdir, "results.csv")] + plots:
            shutil.copy(path, results_dir)
    return {"rows": rows, "table": table, "plots": plots}
