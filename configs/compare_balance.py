"""Balance: Switch top-1, E=8, with and without the load-balancing loss, with and without the router z-loss.

    python experiments/compare.py --config configs/compare_balance.py --workdir runs/balance

The expert-load plot shows whether routing collapses without the balancing loss; the z_loss column of the
training log (mean logsumexp(logits)^2) shows the size of the router logits.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base, compare_base  # noqa: E402


def get_config(size=None):
    cfg = base.make_config(size)
    variants = {"lb_on_z_on": (1e-2, 1e-3), "lb_on_z_off": (1e-2, 0.0), "lb_off_z_on": (0.0, 1e-3),
                "lb_off_z_off": (0.0, 0.0)}
    models = {name: compare_base.moe_model(dict(compare_base.SWITCH, lb_loss_coef=lb, z_loss_coef=z))
              for name, (lb, z) in variants.items()}
    return compare_base.make(cfg, models, seeds=(0,), title="Load balancing and router z-loss (Switch top-1, E=8)",
                             results_dir="docs/results/balance", size=size)
