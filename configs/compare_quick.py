"""The README's main job: a quick dense-vs-Switch comparison (one seed, about 5-10 minutes on 2 CPU cores).

    python experiments/compare.py --config configs/compare_quick.py --workdir runs/quick

Same data, model and optimizer as the headline study (configs/compare_headline.py), fewer steps.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base, compare_base  # noqa: E402


def get_config(size=None):
    cfg = base.make_config(size, train=dict(steps=300, warmup_steps=30, eval_every=100, ckpt_every=100,
                                            log_every=25, sample_tokens=100))
    models = {
        "dense": {},
        "switch_top1_e8": compare_base.moe_model(compare_base.SWITCH),
    }
    return compare_base.make(cfg, models, seeds=(0,), title="Quick: dense vs Switch top-1 (E=8)", size=size)
