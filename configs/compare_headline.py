"""Headline study: dense vs Switch top-1 and GShard top-2 MoEs with the same active FLOPs per token, plus a
dense model with the MoE's total parameters (upper reference), under the science protocol
(``configs/compare_base.py``): the data-rich ``transformers_src`` corpus, each model at its own learning rate
of ``LR_GRID`` chosen on the validation split (seed 0), test-split losses over 3 seeds, the paired
dense-minus-MoE gap with its 95% t-interval.

    python experiments/compare.py --config configs/compare_headline.py:mini --workdir runs/headline_mini
    python experiments/compare.py --config configs/compare_headline.py --workdir runs/headline       # GPU size
    python experiments/compare.py --config configs/compare_headline.py:mini,swiglu --workdir runs/headline_swiglu

Config string ``SIZE[,swiglu]``: the model size (``configs/base.py``; '' = 'small') and SwiGLU FFNs on every
model. Runs: 4 models x (4 rates at seed 0 + 2 more seeds at the chosen rate) = 24.
A user corpus is one flag: ``--config.base.data.corpus=DIR --config.base.data.test_split=True``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import compare_base  # noqa: E402


def parse_spec(spec):
    """``'SIZE[,swiglu]'`` -> (size or None, swiglu)."""
    parts = [p for p in (spec or "").split(",") if p]
    glu = "swiglu" in parts
    rest = [p for p in parts if p != "swiglu"]
    if len(rest) > 1:
        raise ValueError(f"config string {spec!r}: write SIZE[,swiglu], e.g. mini,swiglu.")
    return (rest[0] if rest else None), glu


def get_config(spec=None):
    size, glu = parse_spec(spec)
    cfg = compare_base.science_config(size)
    top2 = dict(compare_base.TOP2, expert_hidden=cfg.model.d_ff // 2)
    models = {
        "dense": {},
        "switch_top1_e8": compare_base.moe_model(compare_base.SWITCH),
        "gshard_top2_e8": compare_base.moe_model(top2),
        "dense_total_params": compare_base.dense_with_params_of(cfg, num_experts=8),
    }
    if glu:
        models = compare_base.swiglu(models)
    title = "Headline: dense vs MoE at equal active FLOPs, per-model learning rate, test split" + (
        " (SwiGLU)" if glu else "")
    return compare_base.make(cfg, models, seeds=(0, 1, 2), title=title,
                             results_dir="docs/results/headline" + ("_swiglu" if glu else ""), size=size,
                             lr_search=True, lr_grid=compare_base.LR_GRID, lr_select_seeds=1)
