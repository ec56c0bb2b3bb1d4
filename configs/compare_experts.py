"""Expert count: Switch top-1 with E = 1 (dense), 2, 4, 8, 16, 32 experts at fixed active FLOPs per token, with
dropless dispatch (no capacity, so no token is dropped at any E: the curve shows routing, not drops), under
the science protocol (``configs/compare_base.py``: ``transformers_src``, each model at its rate of
``STUDY_GRID`` chosen on validation, test split, 3 seeds): 6 models x (3 rates + 2 seeds) = 30 runs.

    python experiments/compare.py --config configs/compare_experts.py:mini --workdir runs/experts_mini
    python experiments/compare.py --config configs/compare_experts.py:mini --workdir /tmp/e --config.seeds=0 \\
        --config.lr_search=False     # one seed, the base learning rate: 6 runs
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import compare_base  # noqa: E402

EXPERTS = (2, 4, 8, 16, 32)


def get_config(size=None):
    cfg = compare_base.science_config(size)
    models = {"e1_dense": {}}
    for e in EXPERTS:
        models[f"e{e}"] = compare_base.moe_model(dict(compare_base.SWITCH_DROPLESS, num_experts=e))
    return compare_base.make(cfg, models, seeds=(0, 1, 2), title="Expert count (Switch top-1, dropless, "
                             "equal active FLOPs)", results_dir="docs/results/experts", size=size,
                             lr_search=True, lr_grid=compare_base.STUDY_GRID)
