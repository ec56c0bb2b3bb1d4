"""Headline study: dense vs Switch top-1 and GShard top-2 MoEs with the same active FLOPs per token, plus a
dense model with the MoE's total parameters (upper reference), 3 seeds.

    python experiments/compare.py --config configs/compare_headline.py --workdir runs/headline
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base, compare_base  # noqa: E402


def get_config(size=None):
    cfg = base.make_config(size)
    top2 = dict(compare_base.TOP2, expert_hidden=cfg.model.d_ff // 2)
    models = {
        "dense": {},
        "switch_top1_e8": compare_base.moe_model(compare_base.SWITCH),
        "gshard_top2_e8": compare_base.moe_model(top2),
        "dense_total_params": compare_base.dense_with_params_of(cfg, num_experts=8),
    }
    return compare_base.make(cfg, models, seeds=(0, 1, 2), title="Headline: dense vs MoE at equal active FLOPs",
                             results_dir="docs/results/headline", size=size)
