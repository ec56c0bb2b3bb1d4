"""The dense-vs-sparse comparison runner: merging overrides, interpolation at equal budgets, and a tiny
end-to-end run of ``experiments/compare.py``'s machinery (two models, a few steps) that resumes."""
import csv
import json
import math
import os

import ml_collections
import numpy as np
import pytest

from moe_jax import compare


def test_deep_merge_merges_dicts_and_replaces_leaves():
    base = {"model": {"d_model": 8, "moe": {"k": 1, "router": "switch"}}, "seed": 0}
    out = compare.deep_merge(base, {"model": {"moe": {"k": 2}}, "seed": 3})
    assert out == {"model": {"d_model": 8, "moe": {"k": 2, "router": "switch"}}, "seed": 3}
    assert base["model"]["moe"]["k"] == 1  # the base is not modified


def test_interp_at_and_outside_the_range():
    x = np.array([10.0, 20.0, 40.0])
    y = np.array([5.0, 4.0, 3.0])
    assert compare.interp_at(x, y, 30.0) == pytest.approx(3.5)  # halfway between (20, 4) and (40, 3)
    assert compare.interp_at(x, y, 10.0) == pytest.approx(5.0)
    assert math.isnan(compare.interp_at(x, y, 5.0))  # before the first point: unknown, not extrapolated
    assert math.isnan(compare.interp_at(x, y, 41.0))


def test_unknown_override_is_an_error():
    cfg = ml_collections.ConfigDict({"base": {"model": {"d_model": 8}}, "models": {"a": {"model": {"d_modle": 4}}},
                                     "seeds": [0], "order": ["a"]})
    with pytest.raises(ValueError, match="d_modle"):
        compare.model_configs(cfg)


def _write_run(path, steps_losses, flops_per_step, summary):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step, loss in steps_losses:
            f.write(json.dumps({"step": step, "split": "val", "loss": loss, "flops": step * flops_per_step,
                                "elapsed_s": float(step)}) + "\n")
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump(summary, f)


def test_summarize_by_hand(tmp_path):
    # Model a: val loss 4.0 at step 10 and 3.0 at step 20, 1 FLOP/step. Model b: 2 FLOPs/step, losses 3.5, 2.5.
    # FLOP budget = min(final FLOPs) = min(20, 40) = 20: a -> 3.0 (its end); b at FLOPs 20 = step 10 -> 3.5.
    # Two seeds of b (2.5 and 2.7 final): mean 2.6, sample std 0.1414.
    wd = str(tmp_path)
    _write_run(f"{wd}/a/seed0", [(10, 4.0), (20, 3.0)], 1.0, {"total_params": 10, "active_params": 10})
    _write_run(f"{wd}/a/seed1", [(10, 4.0), (20, 3.0)], 1.0, {"total_params": 10, "active_params": 10})
    _write_run(f"{wd}/b/seed0", [(10, 3.5), (20, 2.5)], 2.0, {"total_params": 30, "active_params": 10})
    _write_run(f"{wd}/b/seed1", [(10, 3.7), (20, 2.7)], 2.0, {"total_params": 30, "active_params": 10})
    rows = {r["model"]: r for r in compare.summarize(wd, ["a", "b"], [0, 1])}
    assert rows["a"]["val_loss"] == pytest.approx(3.0) and rows["a"]["val_loss_std"] == pytest.approx(0.0)
    assert rows["b"]["val_loss"] == pytest.approx(2.6)
    assert rows["b"]["val_loss_std"] == pytest.approx(math.sqrt(0.02))
    assert rows["a"]["flop_budget"] == pytest.approx(20.0)
    assert rows["a"]["val_loss_at_equal_flops"] == pytest.approx(3.0)
    assert rows["b"]["val_loss_at_equal_flops"] == pytest.approx(3.6)  # (3.5 + 3.7) / 2 at step 10
    assert rows["b"]["val_ppl"] == pytest.approx(math.exp(2.6))
    text = compare.write_table(list(rows.values()), wd)
    assert "| b |" in text and "2.600 ± 0.141" in text
    assert os.path.exists(os.path.join(wd, "results.csv"))


def test_tiny_comparison_end_to_end_and_resume(tmp_path):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import base, compare_base

    text = tmp_path / "corpus.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 200)
    cfg = base.make_config("tiny", data=dict(corpus=str(text), cache_dir=str(tmp_path / "cache"), seq_len=16,
                                             batch_size=8),  # 8: the test process has 8 fake devices (data=-1)
                           model=dict(d_model=32, num_layers=2, d_ff=64),
                           train=dict(steps=6, warmup_steps=2, log_every=3, eval_every=3, eval_batches=1,
                                      ckpt_every=3, sample_tokens=0))
    models = {"dense": {}, "switch": compare_base.moe_model(dict(compare_base.SWITCH, num_experts=4))}
    cmp_cfg = compare_base.make(cfg, models, seeds=(0,), title="tiny")
    wd = str(tmp_path / "cmp")
    out = compare.run_comparison(cmp_cfg, wd, log=lambda *a: None)
    rows = {r["model"]: r for r in out["rows"]}
    assert list(rows) == ["dense", "switch"]  # the config's order, not ConfigDict's sorted keys
    assert rows["dense"]["steps"] == 6 and rows["switch"]["steps"] == 6
    assert rows["switch"]["total_params"] > rows["dense"]["total_params"]
    assert rows["switch"]["active_params"] == pytest.approx(rows["dense"]["active_params"], rel=0.05)
    assert np.isfinite(rows["switch"]["drop_fraction"]) and math.isnan(rows["dense"]["drop_fraction"])
    # Used FLOPs: one MoE block (of 2, moe_every=2), one routed expert = 2 * D * F = 2 * 32 * 64 = 4096 weights,
    # K = 1: train FLOPs/token - 6 * 4096 * (1 - kept experts/token).
    ept = rows["switch"]["experts_per_token"]
    assert 0 < ept <= 1
    assert rows["switch"]["used_flops_per_token"] == pytest.approx(
        rows["switch"]["train_flops_per_token"] - 6 * 4096 * (1 - ept))
    assert math.isnan(rows["dense"]["used_flops_per_token"])
    assert rows["switch"]["router_z"] > 0 and math.isnan(rows["dense"]["router_z"])  # logsumexp^2 of the logits
    for name in ("results.md", "results.csv", "val_loss_vs_steps.png", "val_loss_vs_flops.png",
                 "val_loss_vs_time.png", "expert_load.png"):
        assert os.path.getsize(os.path.join(wd, name)) > 0, name
    # Rerunning trains nothing: finished runs are skipped.
    logs = []
    compare.run_comparison(cmp_cfg, wd, train_fn=lambda *a: pytest.fail("retrained a finished run"),
                           log=logs.append)
    assert sum("skipping" in line for line in logs) == 2
    # Another comparison reusing this workdir: runs with the same config are copied, not trained; a model with
    # a different config (E=2 instead of 4) is trained.
    models2 = dict(models, switch_e2=compare_base.moe_model(dict(compare_base.SWITCH, num_experts=2)))
    cmp2 = compare_base.make(cfg, models2, seeds=(0,), title="tiny2")
    wd2, trained, logs = str(tmp_path / "cmp2"), [], []
    compare.run_comparison(cmp2, wd2, train_fn=lambda c, d: trained.append(os.path.basename(os.path.dirname(d))),
                           log=logs.append, only=["dense:0", "switch:0", "switch_e2:0"], reuse=[wd])
    assert trained == ["switch_e2"]
    assert sum("copying" in line for line in logs) == 2
    for name in ("dense", "switch"):
        with open(os.path.join(wd2, name, "seed0", "summary.json")) as f, \
                open(os.path.join(wd, name, "seed0", "summary.json")) as g:
            assert json.load(f) == json.load(g)
    with pytest.raises(ValueError, match="no such folder"):
        compare.run_comparison(cmp2, str(tmp_path / "cmp3"), train_fn=lambda *a: None, log=logs.append,
                               only=["switch_e2:0"], reuse=[str(tmp_path / "missing")])


def _science_cfg(models, **kw):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import base, compare_base

    cfg = base.make_config("tiny", train=dict(steps=10))
    return compare_base.make(cfg, models, **kw)


def _fake_train(losses):
    """A train_fn that writes what a finished run writes, with (val, test) losses from
    ``losses(model, lr, seed)``; records the runs it was asked for."""
    calls = []

    def train_fn(run_cfg, run_dir):
        parts = run_dir.split(os.sep)
        model = parts[-3] if parts[-2].startswith("lr") else parts[-2]
        lr, seed = float(run_cfg.train.learning_rate), int(run_cfg.seed)
        val, test = losses(model, lr, seed)
        calls.append((model, lr, seed))
        _write_run(run_dir, [(10, val)], 1.0, {"val_loss": val, "test_loss": test, "total_params": 10,
                                                "active_params": 10, "train_tokens": 1000})
    return train_fn, calls


def test_lr_selection_reads_only_validation_losses(tmp_path):
    # Model b: validation prefers lr 2e-3 (3.0 vs 3.2, 3.4); a planted test loss of 0.0 at lr 1e-3 would win if
    # the choice read the test split. Model a: validation prefers 1e-3. Seeds 1, 2 train only the chosen rate.
    def losses(model, lr, seed):
        if model == "a":
            return {1e-3: 3.5, 2e-3: 3.6, 4e-3: 3.9}[lr], 3.5 + 0.01 * seed
        val = {1e-3: 3.2, 2e-3: 3.0, 4e-3: 3.4}[lr]
        test = 0.0 if lr == 1e-3 else 3.3 + 0.02 * seed  # gap a - b per seed: 0.2, 0.19, 0.18
        return val, test

    cmp_cfg = _science_cfg({"a": {}, "b": {}}, seeds=(0, 1, 2), lr_search=True, lr_grid=(4e-3, 1e-3, 2e-3))
    train_fn, calls = _fake_train(losses)
    wd = str(tmp_path / "cmp")
    out = compare.run_comparison(cmp_cfg, wd, train_fn=train_fn, log=lambda *a: None)
    assert out["lr_info"]["a"]["chosen"] == 1e-3 and out["lr_info"]["b"]["chosen"] == 2e-3
    # a's rate is the grid's smallest (its best may lie below the grid): said; b's is inside: not said
    assert "edge of the grid for a (0.001, the smallest):" in out["note"] and "b (" not in out["note"]
    assert sorted(c for c in calls if c[2] > 0) == [("a", 1e-3, 1), ("a", 1e-3, 2), ("b", 2e-3, 1), ("b", 2e-3, 2)]
    assert len(calls) == 2 * 3 + 4  # the grid at seed 0, the chosen rate at seeds 1 and 2
    rows = {r["model"]: r for r in out["rows"]}
    assert rows["b"]["lr"] == 2e-3 and rows["b"]["test_loss"] == pytest.approx(3.32)  # mean of 3.30, 3.32, 3.34
    gap = out["gaps"][0]
    assert gap["metric"] == "test" and gap["gaps"] == pytest.approx({0: 0.2, 1: 0.19, 2: 0.18})
    # mean 0.19, s = 0.01, half-width t_{0.975,2} * 0.01 / sqrt(3) = 4.303 * 0.005774 = 0.02484
    assert gap["mean"] == pytest.approx(0.19) and gap["half_width"] == pytest.approx(0.02484, abs=1e-4)
    text = open(os.path.join(wd, "results.md")).read()
    assert "**3.000**" in text and "[+0.165, +0.215]" in text and "contains 0" not in text
    for name in ("results.csv", "gaps.csv", "lr_grid.csv", "loss_vs_lr.png"):
        assert os.path.getsize(os.path.join(wd, name)) > 0
    with open(os.path.join(wd, "results.csv")) as f:
        head = f.readline()
    assert "gap_ci95_lo" in head and "test_loss" in head
    # The choice itself, with a planted test value: only validation losses are read.
    assert compare.choose_lr({1e-3: [3.2], 2e-3: [3.0], 4e-3: [float("nan")]}) == 2e-3


def test_compare_writes_only_into_workdir_unless_published(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative results_dir would land here
    cmp_cfg = _science_cfg({"a": {}, "b": {}}, seeds=(0,), results_dir="docs/results/x")
    train_fn, _ = _fake_train(lambda m, lr, s: (3.0 if m == "a" else 2.9, None))
    out = compare.run_comparison(cmp_cfg, str(tmp_path / "wd"), train_fn=train_fn, log=lambda *a: None)
    assert not os.path.exists(tmp_path / "docs")
    assert "One seed: no confidence interval" in out["note"] and "One learning rate" in out["note"]
    assert out["gaps"][0]["metric"] == "val" and out["gaps"][0]["mean"] == pytest.approx(0.1)
    compare.run_comparison(cmp_cfg, str(tmp_path / "wd"), train_missing=False, log=lambda *a: None, publish=True)
    assert os.path.exists(tmp_path / "docs" / "results" / "x" / "results.md")
    cmp_cfg.results_dir = ""
    with pytest.raises(ValueError, match="--publish.*results_dir"):
        compare.run_comparison(cmp_cfg, str(tmp_path / "wd"), train_missing=False, publish=True)


@pytest.mark.parametrize("value", ["0,1,2", "[0,1,2]", "(0,1,2)"])
def test_seeds_from_the_command_line(value, monkeypatch):
    import sys

    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=False)
    argv = ["prog", f"--config={root}/configs/compare_quick.py", f"--config.seeds={value}",
            "--config.lr_grid=1e-3,3e-3"]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    fv(argv)
    assert compare.comparison_seeds(fv.config) == [0, 1, 2]
    assert tuple(fv.config.lr_grid) == (1e-3, 3e-3)


def test_per_model_grid_from_the_command_line(monkeypatch):
    import sys

    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=False)
    argv = ["prog", f"--config={root}/configs/compare_scaling.py", "--config.lr_grids.moe_d32=1e-2,2e-2,4e-2"]
    monkeypatch.setattr(sys, "argv", argv)
    fv(argv)
    grids = compare.lr_grids(fv.config, list(compare.model_configs(fv.config)))
    assert grids["moe_d32"] == [1e-2, 2e-2, 4e-2] and grids["dense_d32"] == [4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 0.128]
    assert grids["moe_d128"] == [1e-3, 2e-3, 4e-3, 8e-3]


def test_bad_comparison_inputs_name_the_field():
    cfg = _science_cfg({"a": {}}, seeds=(0,), lr_search=True, lr_grid=())
    with pytest.raises(ValueError, match=r"lr_grid=\(\) is empty"):
        compare.run_comparison(cfg, "/nonexistent/never", train_fn=lambda *a: None)
    cfg.lr_grid = (1e-3, -2e-3)
    with pytest.raises(ValueError, match="lr_grid.*positive"):
        compare.lr_grid(cfg)
    cfg.lr_grid = (0.0,)
    with pytest.raises(ValueError, match="lr_grid.*positive"):
        compare.lr_grid(cfg)
    cfg.seeds = ()
    with pytest.raises(ValueError, match="seeds is empty"):
        compare.comparison_seeds(cfg)
    cfg.seeds = (0, -1)
    with pytest.raises(ValueError, match=r"seeds=.*integer >= 0"):
        compare.comparison_seeds(cfg)
    with pytest.raises(ValueError, match="seeds='0,x' is not a list of integers"):
        compare.comparison_seeds(ml_collections.ConfigDict({"seeds": "0,x"}))
    assert compare.comparison_seeds(ml_collections.ConfigDict({"seeds": "[3, 4]"})) == [3, 4]


def test_science_configs_build_valid_runs():
    import importlib
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from moe_jax import train as train_lib

    full, variants = [1e-3, 2e-3, 4e-3, 8e-3], [2e-3, 4e-3, 8e-3]  # LR_GRID; STUDY_GRID (the MoE-variant studies)
    for name, spec, grid in (("scaling", None, full), ("scaling", "gpu", full), ("headline", "mini,swiglu", full),
                             ("experts", "mini", variants), ("capacity", "mini", variants),
                             ("balance", "mini", variants), ("routers", "mini", variants)):
        cmp_cfg = importlib.import_module(f"configs.compare_{name}").get_config(spec)
        runs = compare.model_configs(cmp_cfg)
        assert cmp_cfg.lr_search and compare.lr_grid(cmp_cfg) == grid, name
        assert spec == "gpu" or len(cmp_cfg.seeds) >= 3, name
        for run_name, run_cfg in runs.items():
            assert run_cfg.data.corpus == "transformers_src"
            m = train_lib.validate_config(run_cfg)
            if name == "experts" and m.moe is not None:
                assert m.moe.dispatcher == "dropless"  # no drops at any expert count
            if name == "headline":  # SwiGLU on dense blocks and experts alike
                assert m.glu and m.activation == "silu"
                assert m.moe is None or (m.moe.glu and m.moe.activation == "silu")
        if name == "scaling":
            assert len(cmp_cfg.scaling.dense) == len(cmp_cfg.scaling.moe) >= 3
            grids = compare.lr_grids(cmp_cfg, list(runs))  # CPU: the widths below 128 search their own grids
            small, mid = [4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1], [4e-3, 8e-3, 1.6e-2]
            want = {"d32": small, "d64": small, "d96": mid} if spec is None else {}
            assert grids == {n: want.get(n.split("_")[-1], full) for n in runs}
            assert spec == "gpu" or sorted(runs) == sorted(f"{a}_d{d}" for a in ("dense", "moe") for d in (32, 64, 96, 128))
            assert sorted(cmp_cfg.scaling.dense + cmp_cfg.scaling.moe) == sorted(runs)


def test_scaling_study_through_run_comparison(tmp_path):
    # Dense d{i}: N = active - embedding = 1e5 * 4^i, test loss 40 N^-0.4 + 2.5; MoE m{i}: same N, the dense loss
    # of 2N, so each MoE is worth 2x its N (multiplier 2.0). No learning-rate search here. Three seeds: seed s
    # adds (-0.01, 0, +0.01)[s] to every dense loss and (+0.02, 0, -0.02)[s] to every MoE loss, so the means
    # (and the fits) are the noiseless ones, and at size i the paired gap d{i} - m{i} per seed is
    # base_i - 0.03, base_i, base_i + 0.03 with base_i = 40 N_i^-0.4 (1 - 2^-0.4): mean base_i, std 0.03,
    # 95% half-width t_{0.975,2} * 0.03 / sqrt(3) = 4.3027 * 0.017321 = 0.07453.
    from moe_jax import stats

    fit = {"a": 40.0, "alpha": 0.4, "c": 2.5}
    sizes = {f"{arm}{i}": 1e5 * 4 ** i for arm in ("d", "m") for i in range(3)}
    offset = {"d": (-0.01, 0.0, 0.01), "m": (0.02, 0.0, -0.02)}

    def train_fn(run_cfg, run_dir):
        name, seed = run_dir.split(os.sep)[-2], int(run_dir.split(os.sep)[-1][len("seed"):])
        n = sizes[name]
        loss = float(stats.power_law(n * (2 if name[0] == "m" else 1), fit)) + offset[name[0]][seed]
        _write_run(run_dir, [(10, loss + 0.1)], 1.0, {"val_loss": loss + 0.1, "test_loss": loss,
                                                      "active_params": n + 1000, "embedding_params": 1000,
                                                      "train_flops_per_token": 6 * n, "train_tokens": 10 ** 6})

    cmp_cfg = _science_cfg({k: {} for k in sizes}, seeds=(0, 1, 2))
    cmp_cfg.scaling = {"dense": ["d0", "d1", "d2"], "moe": ["m0", "m1", "m2"]}
    out = compare.run_comparison(cmp_cfg, str(tmp_path), train_fn=train_fn, log=lambda *a: None)
    np.testing.assert_allclose(out["scaling"]["multipliers"]["moe"], [2.0, 2.0, 2.0], rtol=1e-3)
    pairs = out["scaling"]["pairs"]["moe"]
    assert [(g["reference"], g["model"], g["metric"], g["n"]) for g in pairs] == [
        ("d0", "m0", "test", 3), ("d1", "m1", "test", 3), ("d2", "m2", "test", 3)]
    for i, g in enumerate(pairs):
        base = 40 * (1e5 * 4 ** i) ** -0.4 * (1 - 2 ** -0.4)
        np.testing.assert_allclose([g["gaps"][s] for s in (0, 1, 2)], [base - 0.03, base, base + 0.03], atol=1e-9)
        assert g["mean"] == pytest.approx(base, abs=1e-9) and g["std"] == pytest.approx(0.03, rel=1e-6)
        assert (g["lo"], g["hi"]) == (pytest.approx(base - 0.07453, abs=1e-5), pytest.approx(base + 0.07453, abs=1e-5))
    md = (tmp_path / "scaling.md").read_text()
    assert "| moe | d1 | m1 | test |" in md and f"[{pairs[1]['lo']:+.3f}, {pairs[1]['hi']:+.3f}]" in md
    with open(tmp_path / "scaling.csv") as f:
        csv_rows = {r["model"]: r for r in csv.DictReader(f)}
    assert float(csv_rows["m2"]["gap_vs_dense"]) == pytest.approx(pairs[2]["mean"])
    assert csv_rows["d0"]["gap_vs_dense"] == "nan"
    # dense sizes 1e5, 4e5, 1.6e6: m2's dense equivalent 2 * 1.6e6 lies beyond them, m0's and m1's inside
    assert [csv_rows[m]["extrapolated"] for m in ("m0", "m1", "m2")] == ["False", "False", "True"]
    assert "| 3.2e+06 (extrapolated) | 2.00 (extrapolated) |" in md and md.count("(extrapolated) |") == 2
    assert "over 3 sizes (0 degree(s) of freedom; it passes through them)" in md
    # results.md, results.csv and gaps.csv take the same per-size pairs, not every model against d0
    assert out["gaps"] == pairs
    results_md = (tmp_path / "results.md").read_text()
    assert "| d0 - m0 | test |" in results_md and "| d2 - m2 | test |" in results_md
    assert "d0 - d1" not in results_md and "d0 - m2" not in results_md
    with open(tmp_path / "results.csv") as f:
        res = {r["model"]: r for r in csv.DictReader(f)}
    assert res["m1"]["gap_reference"] == "d1" and float(res["m1"]["gap_vs_reference"]) == pytest.approx(pairs[1]["mean"])
    assert res["d1"]["gap_reference"] == "" and res["d1"]["gap_vs_reference"] == "nan"
    with open(tmp_path / "gaps.csv") as f:
        assert sorted({(r["reference"], r["model"]) for r in csv.DictReader(f)}) == [
            ("d0", "m0"), ("d1", "m1"), ("d2", "m2")]
    assert out["scaling"]["fits"]["dense"]["alpha"] == pytest.approx(0.4, rel=1e-3)
    assert "Scaling:" in out["table"] and os.path.getsize(tmp_path / "scaling.png") > 0
    assert out["rows"][0]["tokens"] == 10 * 8 * 64  # steps * B * L of the tiny size
    # --config.order running part of the study: sizes pair by their place in the config's lists. d1,d2,m1,m2:
    # d1-m1, d2-m2. d1,m1,m2: m2's partner d2 is not run, so the arm gets no pairs (the report wants one per
    # size it shows). d2,m1: one model per arm, but not of one size: no pair (not d2 - m1).
    names = ["d1", "d2", "m1", "m2"]
    runs = compare.run_dirs(str(tmp_path), names, [0, 1, 2])
    arms, got = compare._scaling_pairs(cmp_cfg, names, runs, [0, 1, 2])
    assert arms == {"dense": ["d1", "d2"], "moe": ["m1", "m2"]}
    assert [(g["reference"], g["model"]) for g in got["moe"]] == [("d1", "m1"), ("d2", "m2")]
    arms, got = compare._scaling_pairs(cmp_cfg, ["d1", "m1", "m2"], runs, [0, 1, 2])
    assert arms == {"dense": ["d1"], "moe": ["m1", "m2"]} and got == {}
    arms, got = compare._scaling_pairs(cmp_cfg, ["d2", "m1"], runs, [0, 1, 2])  # not a pair: nothing
    assert got == {}


def test_only_items_pick_single_grid_runs(tmp_path):
    # Grid (1e-3, 2e-3), seeds 0, 1, selection seed 0. 'b:0:2e-3' trains exactly one grid run; 'a:0' the
    # whole grid of a; nothing else is trained and no table is written.
    cmp_cfg = _science_cfg({"a": {}, "b": {}}, seeds=(0, 1), lr_search=True, lr_grid=(1e-3, 2e-3))
    train_fn, calls = _fake_train(lambda m, lr, s: (3.0 + lr, 3.0))
    wd = str(tmp_path / "cmp")
    out = compare.run_comparison(cmp_cfg, wd, train_fn=train_fn, log=lambda *a: None, only=["b:0:2e-3", "a:0"])
    assert sorted(calls) == [("a", 1e-3, 0), ("a", 2e-3, 0), ("b", 2e-3, 0)] and out["table"] == ""
    names, seeds = ["a", "b"], [0, 1]
    grid = {n: [1e-3, 2e-3] for n in names}  # as compare.lr_grids gives it
    assert compare.parse_only(["a:1", "b:0:0.001"], names, seeds, grid, [0]) == {("a", 1, None), ("b", 0, 1e-3)}
    # a rate matches as its run folder names it: 0.0010 and 1e-3 are both lr0.001
    assert compare.parse_only(["b:0:0.0010", "a:0:1e-3"], names, seeds, grid, [0]) == {("b", 0, 1e-3), ("a", 0, 1e-3)}
    for bad, match in [("a:0:3e-3", "not a rate of a.s lr_grid"), ("a:1:1e-3", "not a selection seed"),
                       ("c:0", "expected 'model:seed' or 'model:seed:lr'"), ("a:0:1e-3:x", "expected"),
                       ("a:5", "seed in"), ("a:0:fast", "not a rate")]:
        with pytest.raises(ValueError, match=match):
            compare.parse_only([bad], names, seeds, grid, [0])
    with pytest.raises(ValueError, match="no lr_search"):
        compare.parse_only(["a:0:1e-3"], names, seeds, {}, [])


def test_run_plan_lists_missing_runs_with_their_waits(tmp_path):
    cmp_cfg = _science_cfg({"a": {}, "b": {}}, seeds=(0, 1, 2), lr_search=True, lr_grid=(1e-3, 2e-3))
    wd = str(tmp_path / "cmp")
    # a's grid is done and a's seed 1 too; b has nothing.
    for lr in ("lr0.001", "lr0.002"):
        _write_run(os.path.join(wd, "a", lr, "seed0"), [(10, 3.0)], 1.0, {"val_loss": 3.0})
    _write_run(os.path.join(wd, "a", "lr0.002", "seed1"), [(10, 3.0)], 1.0, {"val_loss": 3.0})
    plan = compare.run_plan(cmp_cfg, wd)
    assert plan == [("b:0:0.001", []), ("b:0:0.002", []), ("a:2", []),
                    ("b:1", ["b:0:0.001", "b:0:0.002"]), ("b:2", ["b:0:0.001", "b:0:0.002"])]
    plain = _science_cfg({"a": {}, "b": {}}, seeds=(0, 1))
    assert compare.run_plan(plain, str(tmp_path / "p")) == [("a:0", []), ("a:1", []), ("b:0", []), ("b:1", [])]


def test_run_comparison_trains_in_run_plan_order(tmp_path):
    # One walk (compare.run_order) drives both: the order run_comparison trains in is the order --jobs schedules.
    # Validation prefers 2e-3 for a and 1e-3 for b, so a's seed 1 trains at 2e-3 and b's at 1e-3.
    cmp_cfg = _science_cfg({"a": {}, "b": {}}, seeds=(0, 1), lr_search=True, lr_grid=(1e-3, 2e-3))
    wd = str(tmp_path / "cmp")
    items = [item for item, _ in compare.run_plan(cmp_cfg, wd)]
    assert items == ["a:0:0.001", "a:0:0.002", "b:0:0.001", "b:0:0.002", "a:1", "b:1"]
    train_fn, calls = _fake_train(lambda m, lr, s: ((3.0 if (m == "a") == (lr == 2e-3) else 3.5), 3.0))
    compare.run_comparison(cmp_cfg, wd, train_fn=train_fn, log=lambda *a: None)
    assert calls == [("a", 1e-3, 0), ("a", 2e-3, 0), ("b", 1e-3, 0), ("b", 2e-3, 0), ("a", 2e-3, 1), ("b", 1e-3, 1)]
    assert compare.run_plan(cmp_cfg, wd) == []  # all done: nothing left to schedule


def test_per_model_lr_grids(tmp_path):
    # a searches the shared grid (1e-3, 2e-3); b its own (lr_grids.b, given unsorted: 4e-3, 8e-3, 1.6e-2).
    # Validation: 1e-3 -> 3.2, 2e-3 -> 3.1, 4e-3 -> 3.3, 8e-3 -> 3.0, 1.6e-2 -> 3.4, so a chooses 2e-3 (its grid's
    # largest: an edge) and b 8e-3 (inside its own grid, though above every rate of the shared one).
    cmp_cfg = _science_cfg({"a": {}, "b": {}}, seeds=(0, 1), lr_search=True, lr_grid=(1e-3, 2e-3),
                           lr_grids={"b": (1.6e-2, 4e-3, 8e-3)})
    assert compare.lr_grids(cmp_cfg, ["a", "b"]) == {"a": [1e-3, 2e-3], "b": [4e-3, 8e-3, 1.6e-2]}
    wd = str(tmp_path / "cmp")
    items = [item for item, _ in compare.run_plan(cmp_cfg, wd)]
    assert items == ["a:0:0.001", "a:0:0.002", "b:0:0.004", "b:0:0.008", "b:0:0.016", "a:1", "b:1"]
    val = {1e-3: 3.2, 2e-3: 3.1, 4e-3: 3.3, 8e-3: 3.0, 1.6e-2: 3.4}
    train_fn, calls = _fake_train(lambda m, lr, s: (val[lr], 3.0))
    out = compare.run_comparison(cmp_cfg, wd, train_fn=train_fn, log=lambda *a: None)
    assert calls == [("a", 1e-3, 0), ("a", 2e-3, 0), ("b", 4e-3, 0), ("b", 8e-3, 0), ("b", 1.6e-2, 0),
                     ("a", 2e-3, 1), ("b", 8e-3, 1)]
    assert out["lr_info"]["a"]["chosen"] == 2e-3 and out["lr_info"]["b"]["chosen"] == 8e-3
    assert "a (0.002, the largest)" in out["note"] and "b (" not in out["note"]
    text = open(os.path.join(wd, "results.md")).read()
    assert "| a | 0.002 | 3.200 | **3.100** | - | - | - |" in text
    assert "| b | 0.008 | - | - | 3.300 | **3.000** | 3.400 |" in text
    grids = compare.lr_grids(cmp_cfg, ["a", "b"])
    assert compare.parse_only(["b:0:8e-3", "a:0:1e-3"], ["a", "b"], [0, 1], grids, [0]) == {("b", 0, 8e-3),
                                                                                         ("a", 0, 1e-3)}
    with pytest.raises(ValueError, match=r"0.001' is not a rate of b's lr_grid \[0.004, 0.008, 0.016\]"):
        compare.parse_only(["b:0:0.001"], ["a", "b"], [0, 1], grids, [0])
    # bad per-model grids name their field
    for bad, match in [({"c": (1e-3,)}, r"lr_grids names \['c'\], which are not models"),
                       ({"b": ()}, r"lr_grids.b=\(\) is empty"), ({"b": (1e-3, 0.0)}, "lr_grids.b=.*positive")]:
        cmp_cfg.lr_grids = bad
        with pytest.raises(ValueError, match=match):
            compare.lr_grids(cmp_cfg, ["a", "b"])
    cmp_cfg.lr_grids, cmp_cfg.lr_search = {"b": (1e-3,)}, False
    with pytest.raises(ValueError, match="lr_grids is given for \\['b'\\] but lr_search is off"):
        compare.lr_grids(cmp_cfg, ["a", "b"])


def test_parallel_runs_respect_waits_and_report_a_failure(tmp_path, monkeypatch):
    # The scheduler of `compare.py --jobs`, with each run replaced by a tiny Python process that appends its
    # item to a file (no JAX): every seed-1 run starts after its model's grid runs finished.
    import sys

    order = tmp_path / "order.txt"
    code = "import sys, time; time.sleep(0.2); open(sys.argv[1], 'a').write(sys.argv[2] + '\\n'); sys.exit(sys.argv[2] == 'b:1')"
    cmp_cfg = _science_cfg({"a": {}, "b": {}}, seeds=(0, 1), lr_search=True, lr_grid=(1e-3, 2e-3))
    wd = str(tmp_path / "cmp")
    with pytest.raises(RuntimeError, match=r"--jobs: 1 run\(s\) failed: b:1 \(log .*b_1.log\)"):
        compare.run_parallel(cmp_cfg, wd, jobs=2, log=lambda *a: None,
                             command=lambda item: [sys.executable, "-c", code, str(order), item])
    done = order.read_text().split()
    assert sorted(done) == ["a:0:0.001", "a:0:0.002", "a:1", "b:0:0.001", "b:0:0.002", "b:1"]
    for model in ("a", "b"):
        assert done.index(f"{model}:1") > max(done.index(f"{model}:0:0.001"), done.index(f"{model}:0:0.002"))
    # argv of a child: the command's own flags without --jobs/--publish, plus --only
    argv = ["--config", "c.py", "--jobs", "2", "--publish", "--workdir=w", "--config.seeds=0,1", "--only=x:0"]
    assert compare.child_command("py", "s.py", argv, "a:0") == [
        "py", "s.py", "--config", "c.py", "--workdir=w", "--config.seeds=0,1", "--only=a:0"]


def test_stopping_parallel_runs_stops_their_processes(tmp_path):
    # `kill` of a `compare.py --jobs 2` parent must not leave its runs training unseen: the parent (here a
    # small script around run_parallel) gets SIGTERM once both children wrote their pids, and after it exits
    # no child is alive. Without the handler the children (60 s sleeps) outlive it, re-parented.
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pids = tmp_path / "pids"
    pids.mkdir()
    child = "import os, sys, time; open(os.path.join(sys.argv[1], str(os.getpid())), 'w').close(); time.sleep(60)"
    parent = f"""
import sys
sys.path.insert(0, {root!r})
from configs import base, compare_base
from moe_jax import compare
cfg = compare_base.make(base.make_config("tiny", train=dict(steps=10)), {{"a": {{}}, "b": {{}}}}, seeds=(0,))
compare.run_parallel(cfg, {str(tmp_path / "cmp")!r}, jobs=2, log=print,
                     command=lambda item: [sys.executable, "-c", {child!r}, {str(pids)!r}])
"""
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    started = []
    try:
        deadline = time.time() + 120
        while len(started) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            started = [int(p) for p in os.listdir(pids)]
        assert len(started) == 2, proc.communicate()[0] if proc.poll() is not None else "children never started"
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode != 0
        assert out.count("the same command resumes it") == 2, out
        for pid in started:
            with pytest.raises(ProcessLookupError):  # gone: stopped and reaped by the parent
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_order_runs_part_of_a_study():
    cmp_cfg = _science_cfg({"a": {}, "b": {}, "c": {}}, seeds=(0,))
    assert list(compare.model_configs(cmp_cfg)) == ["a", "b", "c"]
    cmp_cfg.order = ("c", "a")  # as --config.order=c,a gives it
    assert list(compare.model_configs(cmp_cfg)) == ["c", "a"]
    for bad, match in [(("a", "x"), r"\[.x.\] are not models"), (("a", "a"), "each once")]:
        cmp_cfg.order = bad
        with pytest.raises(ValueError, match=match):
            compare.model_configs(cmp_cfg)


def test_reuse_finds_a_grid_run_by_its_config(tmp_path):
    # A learning-rate search keeps its runs in <model>/lr<rate>/seed<s>; the same config (up to data.cache_dir)
    # is found there, a different rate is not.
    cmp_cfg = _science_cfg({"a": {}}, seeds=(0,))
    run_cfg = compare.model_configs(cmp_cfg)["a"]
    run_cfg.seed, run_cfg.train.learning_rate = 0, 2e-3
    found = tmp_path / "other" / "dense" / "lr0.002" / "seed0"
    _write_run(str(found), [(10, 3.0)], 1.0, {"val_loss": 3.0})
    stored = json.loads(run_cfg.to_json_best_effort())
    stored["data"]["cache_dir"] = "/elsewhere"
    (found / "config.json").write_text(json.dumps({"config": stored}))
    assert compare.find_same_run(run_cfg, [str(tmp_path / "other")], 0) == str(found)
    run_cfg.train.learning_rate = 4e-3
    assert compare.find_same_run(run_cfg, [str(tmp_path / "other")], 0) is None


def test_scaling_cpu_widest_runs_are_the_headline_runs():
    # docs/results/README.md and configs/compare_scaling.py promise that --reuse of the headline study copies
    # the D=128 runs: their configs must be the same (up to data.cache_dir).
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import compare_headline, compare_scaling

    head = compare.model_configs(compare_headline.get_config("mini"))
    scal = compare.model_configs(compare_scaling.get_config())
    key = compare.run_key
    assert key(scal["dense_d128"]) == key(head["dense"])
    assert key(scal["moe_d128"]) == key(head["switch_top1_e8"])
    assert key(scal["moe_d64"]) != key(head["switch_top1_e8"])


def test_variant_studies_share_runs_with_the_headline():
    # The variant studies share models, so --reuse trains each shared model once (the
    # commands in docs/results/README.md rely on it): dense = the headline's dense; capped Switch E=8 = the
    # headline's Switch; dropless Switch E=8 in the capacity and the expert-count study.
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import compare_balance, compare_capacity, compare_experts, compare_headline, compare_routers

    studies = {m.__name__.split("_")[-1]: m.get_config("mini") for m in
               (compare_balance, compare_capacity, compare_experts, compare_routers)}
    key = compare.run_key
    head = compare.model_configs(compare_headline.get_config("mini"))
    m = {n: compare.model_configs(c) for n, c in studies.items()}
    assert key(m["experts"]["e1_dense"]) == key(m["routers"]["dense"]) == key(head["dense"])
    assert (key(m["capacity"]["cf1_25"]) == key(m["balance"]["lb_on_z_on"]) == key(m["routers"]["switch"])
            == key(head["switch_top1_e8"]))
    assert key(m["experts"]["e8"]) == key(m["capacity"]["dropless"]) != key(head["switch_top1_e8"])


def test_published_run_records_retabulate_and_are_reused_elsewhere(tmp_path, monkeypatch):
    # --publish writes each run's record (config, summary, gzipped metrics) into <results_dir>/runs; a new
    # workdir that reuses the published study trains nothing and prints the same table (same losses, same gap).
    monkeypatch.chdir(tmp_path)
    # a and b differ in config (as the models of a study do): --reuse matches runs by their config
    cmp_cfg = _science_cfg({"a": {"train": {"weight_decay": 0.0}}, "b": {}}, seeds=(0, 1), lr_search=True,
                           lr_grid=(1e-3, 2e-3), results_dir="pub")
    fake, calls = _fake_train(lambda m, lr, s: ((3.0 if lr == 1e-3 else 3.1) + (0.2 if m == "a" else 0.0),
                                                 2.5 + (0.2 if m == "a" else 0.0) + 0.01 * s))

    def train_fn(run_cfg, run_dir):  # what moe_jax.train writes too: config.json, read by --reuse
        fake(run_cfg, run_dir)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({"config": json.loads(run_cfg.to_json_best_effort())}, f)
        os.makedirs(os.path.join(run_dir, "checkpoints", "10"))  # not part of a record

    first = compare.run_comparison(cmp_cfg, str(tmp_path / "wd"), train_fn=train_fn, log=lambda *a: None,
                                   publish=True)
    assert len(calls) == 2 * 2 + 2  # grid (2 rates) at seed 0 for a and b, then seed 1 at the chosen rate
    records = sorted(os.path.relpath(r, tmp_path / "pub" / "runs")
                     for r, _, files in os.walk(tmp_path / "pub" / "runs") if "summary.json" in files)
    assert records == [os.path.join(m, lr, f"seed{s}") for m in ("a", "b")
                       for lr, s in (("lr0.001", 0), ("lr0.001", 1), ("lr0.002", 0))]
    rec = tmp_path / "pub" / "runs" / "b" / "lr0.001" / "seed1"
    assert sorted(os.listdir(rec)) == ["config.json", "metrics.jsonl.gz", "summary.json"]
    assert compare.curves(str(rec))["val_loss"].tolist() == [3.0]  # read through the .gz
    again = compare.run_comparison(cmp_cfg, str(tmp_path / "wd2"), train_fn=train_fn, log=lambda *a: None,
                                   reuse=[str(tmp_path / "pub")])
    assert len(calls) == 6  # every run came from a record
    assert first["gaps"][0]["gaps"] == pytest.approx({0: 0.2, 1: 0.2})  # a - b: (2.7 + 0.01 s) - (2.5 + 0.01 s)
    assert again["gaps"][0]["gaps"] == pytest.approx(first["gaps"][0]["gaps"])
    assert [r["test_loss"] for r in again["rows"]] == pytest.approx([r["test_loss"] for r in first["rows"]])
    # republishing replaces the records as a whole: a model left out of the study leaves none behind
    cmp_cfg.order = ("b",)
    compare.run_comparison(cmp_cfg, str(tmp_path / "wd"), train_fn=train_fn, log=lambda *a: None, publish=True)
    assert sorted(os.listdir(tmp_path / "pub" / "runs")) == ["b"]
