"""The README's main job: a quick dense-vs-Switch comparison (one seed; 10 min 11 s on 2 idle CPU cores).

    python experiments/compare.py --config configs/compare_quick.py --workdir runs/quick

Shakespeare, the small model, one seed and one learning rate (2e-3) for both models, 300 steps. It prints the
paired gap (dense minus MoE, validation loss: Shakespeare has no test split here) and a ``trust:`` line: with
one seed there is no confidence interval, and with one shared learning rate the sign of a gap of a few
hundredths of a nat is not established (docs/results/README.md, learning-rate study). The protocol that can
establish it is the headline study's (configs/compare_headline.py: data-rich corpus, per-model learning rate,
test split, 3 seeds).
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
