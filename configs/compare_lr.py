"""Learning rate: the dense baseline and Switch top-1 (E=8) at peak learning rates 1e-3, 2e-3 (the default of
every other study), 4e-3 and 8e-3. Does the MoE's gain over dense depend on a learning rate tuned for one of them?

    python experiments/compare.py --config configs/compare_lr.py:mini --workdir runs/lr_mini
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base, compare_base  # noqa: E402

LEARNING_RATES = {"lr1e_3": 1e-3, "lr2e_3": 2e-3, "lr4e_3": 4e-3, "lr8e_3": 8e-3}


def get_config(size=None):
    cfg = base.make_config(size)
    models = {}
    for tag, lr in LEARNING_RATES.items():
        models[f"dense_{tag}"] = {"train": dict(learning_rate=lr)}
        models[f"switch_{tag}"] = dict(compare_base.moe_model(compare_base.SWITCH), train=dict(learning_rate=lr))
    return compare_base.make(cfg, models, seeds=(0,), title="Learning rate: dense vs Switch top-1 (E=8)",
                             results_dir="docs/results/lr", size=size)
