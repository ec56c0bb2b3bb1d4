"""Capacity: Switch top-1, E=8, training capacity factor 1.0, 1.25, 2.0 and dropless: drops against quality.

Under the science protocol (``configs/compare_base.py``): ``transformers_src``, each model at its rate of
``STUDY_GRID`` chosen on validation, test-split losses, 3 seeds, the paired gap to ``dropless`` with its 95% CI.

    python experiments/compare.py --config configs/compare_capacity.py:mini --workdir runs/capacity_mini --jobs 2
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import compare_base  # noqa: E402


def get_config(size=None):
    cfg = compare_base.science_config(size)
    models = {}
    for cf in (1.0, 1.25, 2.0):
        models[f"cf{cf}".replace(".", "_")] = compare_base.moe_model(dict(compare_base.SWITCH, capacity_factor=cf))
    models["dropless"] = compare_base.moe_model(dict(compare_base.SWITCH, dispatcher="dropless"))
    return compare_base.make(cfg, models, seeds=(0, 1, 2), title="Capacity factor vs dropless (Switch top-1, E=8)",
                             results_dir="docs/results/capacity", size=size, lr_search=True,
                             lr_grid=compare_base.STUDY_GRID, gap_reference="dropless")
