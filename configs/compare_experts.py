"""Expert count: Switch top-1 with E = 1 (dense), 2, 4, 8, 16, 32 experts at fixed active FLOPs per token.

    python experiments/compare.py --config configs/compare_experts.py --workdir runs/experts
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base, compare_base  # noqa: E402


def get_config(size=None):
    cfg = base.make_config(size)
    models = {"e1_dense": {}}
    for e in (2, 4, 8, 16, 32):
        models[f"e{e}"] = compare_base.moe_model(dict(compare_base.SWITCH, num_experts=e))
    return compare_base.make(cfg, models, seeds=(0,), title="Expert count (Switch top-1, equal active FLOPs)",
                             results_dir="docs/results/experts", size=size)
