"""expert_load.png labels its lines: a legend entry per expert (E <= 10) or a colour bar (larger E), and the
dashed 1/E line."""
import json
import os

import numpy as np

from moe_jax import compare


def _run(path, num_experts):
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step in (1, 2):
            load = [list(np.full(num_experts, 1.0 / num_experts))]  # [layers][E]
            f.write(json.dumps({"step": step, "split": "train", "expert_load": load}) + "\n")
            f.write(json.dumps({"step": step, "split": "val", "loss": 3.0, "flops": 1.0, "elapsed_s": 1.0}) + "\n")


def test_expert_load_plot_labels_lines_and_balance(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figures to inspect them
    _run(tmp_path / "e4" / "seed0", 4)
    _run(tmp_path / "e16" / "seed0", 16)
    paths = compare.plot(str(tmp_path), ["e4", "e16"], [0])
    assert os.path.basename(paths[-1]) == "expert_load.png" and os.path.getsize(paths[-1]) > 0
    fig = figures[-1]
    ax4, ax16 = fig.axes[0], fig.axes[1]
    assert [t.get_text() for t in ax4.get_legend().get_texts()] == [f"expert {e}" for e in range(4)] + [
        "1/E = 1/4 (balanced)"]
    assert [t.get_text() for t in ax16.get_legend().get_texts()] == ["1/E = 1/16 (balanced)"]
    assert any(a.get_ylabel() == "expert" for a in fig.axes[2:])  # the colour bar of the E=16 panel
