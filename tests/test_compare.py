"""The dense-vs-sparse comparison runner: merging overrides, interpolation at equal budgets, and a tiny
end-to-end run of ``experiments/compare.py``'s machinery (two models, a few steps) that resumes."""
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
