"""Design sweep behind the headline study (one seed, no dropout): where does the MoE put its extra parameters?

    python experiments/compare.py --config configs/compare_sweep.py --workdir runs/sweep
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base, compare_base  # noqa: E402


def get_config(size=None):
    cfg = base.make_config(size, model=dict(dropout=0.0),
                           train=dict(steps=2000, eval_every=250, ckpt_every=1000, sample_tokens=0))
    sw = compare_base.SWITCH
    top2 = dict(compare_base.TOP2, expert_hidden=cfg.model.d_ff // 2)
    models = {
        "dense": {},
        "sw_e8_every2": compare_base.moe_model(sw),
        "sw_e8_every1": compare_base.moe_model(sw, moe_every=1),
        "sw_e16_every2": compare_base.moe_model(dict(sw, num_experts=16)),
        "sw_e16_every1": compare_base.moe_model(dict(sw, num_experts=16), moe_every=1),
        "top2_e8_every2": compare_base.moe_model(top2),
        "dense_total_e8_every2": compare_base.dense_with_params_of(cfg, 8),
    }
    return compare_base.make(cfg, models, seeds=(0,), title="Design sweep (no dropout, one seed)", size=size)
