"""Balance: Switch top-1, E=8, with and without the load-balancing loss, with and without the router z-loss.

Under the science protocol (``configs/compare_base.py``): ``transformers_src``, each model at its rate of
``STUDY_GRID`` chosen on validation, test-split losses, 3 seeds, the paired gap to ``lb_on_z_on``
(the default) with its 95% CI.

    python experiments/compare.py --config configs/compare_balance.py:mini --workdir runs/balance_mini --jobs 2

The expert-load plot shows whether routing collapses without the balancing loss; the z_loss column of the
training log (mean logsumexp(logits)^2) shows the size of the router logits.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import compare_base  # noqa: E402


def get_config(size=None):
    cfg = compare_base.science_config(size)
    variants = {"lb_on_z_on": (1e-2, 1e-3), "lb_on_z_off": (1e-2, 0.0), "lb_off_z_on": (0.0, 1e-3),
                "lb_off_z_off": (0.0, 0.0)}
    models = {name: compare_base.moe_model(dict(compare_base.SWITCH, lb_loss_coef=lb, z_loss_coef=z))
              for name, (lb, z) in variants.items()}
    return compare_base.make(cfg, models, seeds=(0, 1, 2),
                             title="Load balancing and router z-loss (Switch top-1, E=8)",
                             results_dir="docs/results/balance", size=size, lr_search=True,
                             lr_grid=compare_base.STUDY_GRID)
