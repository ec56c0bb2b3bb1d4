"""Scaling curves: dense and Switch top-1 (E=8, every other block, the headline's capacity factor 1.25) at 4
widths, each model at its own learning rate (validation split), test-split losses on ``transformers_src``.
After the table: test loss vs training FLOPs per arm, ``L(N) = a N^-alpha + c`` fitted per arm, and the MoE's
effective-parameter multiplier at each width (``moe_jax/scaling.py``).

    python experiments/compare.py --config configs/compare_scaling.py --workdir runs/scaling         # CPU
    python experiments/compare.py --config configs/compare_scaling.py:gpu --workdir runs/scaling_gpu

CPU (default): D = 32, 64, 96, 128 (F = 4D, 4 blocks, 4 heads), L=128, B=16, 1000 steps (2.0M tokens = 0.15
epochs of the 13.25M training tokens: no token is seen twice), the ``mini`` size's schedule and cadence, seeds
0, 1, 2 (the rate chosen on seed 0; seeds 1 and 2 train at it only). Each width has its own grid: the small
widths want larger rates (with the shared 1e-3..8e-3 both picked 8e-3, the largest), so D = 32 and 64 search
``SMALL_GRID`` (4e-3 .. 1.28e-1, 6 rates), D = 96 ``MID_GRID`` (4e-3 .. 1.6e-2, between the best rates of
D = 64 and 128: 1.6e-2 and 4e-3) and D = 128 the headline's ``LR_GRID`` (1e-3 .. 8e-3):
2 arms x (2 x (6 + 2) + (3 + 2) + (4 + 2)) = 54 runs. At D=128 the runs are exactly the headline's ``dense`` and
``switch_top1_e8`` runs (``configs/compare_headline.py:mini``), so ``--reuse docs/results/headline_mini``
copies those 12 from the published records instead of training them. 'gpu': D = 128, 256, 384, 512 (F = 4D,
6 blocks, 8 heads), L=256, B=64, 4000 steps (65.5M tokens, ~5 epochs), one seed, ``LR_GRID`` for all.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import compare_base  # noqa: E402

SMALL_GRID = (4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1)  # the CPU study's D = 32 and 64
MID_GRID = (4e-3, 8e-3, 1.6e-2)  # its D = 96
SIZES = {
    "cpu": dict(widths=(32, 64, 96, 128), layers=4, heads=4, seq_len=128, batch_size=16, steps=1000),
    "gpu": dict(widths=(128, 256, 384, 512), layers=6, heads=8, seq_len=256, batch_size=64, steps=4000),
}


def get_config(spec=None):
    spec = spec or "cpu"
    if spec not in SIZES:
        raise ValueError(f"configs/compare_scaling.py:{spec}: choose one of {sorted(SIZES)}.")
    s = SIZES[spec]
    if spec == "cpu":  # the mini size's own schedule: its D=128 runs equal the headline's (reusable)
        cfg = compare_base.science_config("mini")
    else:
        cfg = compare_base.science_config("mini", steps=s["steps"], warmup_steps=max(50, s["steps"] // 20),
                                          eval_every=max(1, s["steps"] // 4), ckpt_every=max(1, s["steps"] // 4),
                                          sample_tokens=0)
    assert cfg.train.steps == s["steps"]
    cfg.data.seq_len, cfg.data.batch_size = s["seq_len"], s["batch_size"]
    cfg.model.num_layers, cfg.model.num_heads = s["layers"], s["heads"]
    models, arms = {}, {"dense": [], "moe": []}
    for d in s["widths"]:
        width = dict(d_model=d, d_ff=4 * d)
        models[f"dense_d{d}"] = {"model": width}
        moe = dict(compare_base.SWITCH, expert_hidden=4 * d)
        models[f"moe_d{d}"] = compare_base.moe_model(moe, **width)
        arms["dense"].append(f"dense_d{d}")
        arms["moe"].append(f"moe_d{d}")
    order = arms["dense"] + arms["moe"]
    own = {}  # the CPU study's widths below 128 search their own grids; the rest LR_GRID
    if spec == "cpu":
        own = {f"{arm}_d{d}": SMALL_GRID if d <= 64 else MID_GRID for arm in ("dense", "moe")
               for d in s["widths"] if d < 128}
    c = compare_base.make(cfg, {k: models[k] for k in order}, seeds=(0, 1, 2) if spec == "cpu" else (0,),
                          title=f"Scaling: dense vs Switch top-1 E=8 over width [{spec}]",
                          results_dir=f"docs/results/scaling_{spec}", lr_search=True, lr_grid=compare_base.LR_GRID,
                          lr_grids=own)
    c.scaling = arms
    return c
