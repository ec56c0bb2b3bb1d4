"""Routers: every causal router of the registry in the headline model (E=8, every other block), at equal
active FLOPs per token: K=1 routers use experts of the dense FFN's width F, K=2 routers (and the dynamic-k ones,
capped at K_max=2) experts of width F/2. The table's experts/token column says what dynamic-k routers spend.

Under the science protocol (``configs/compare_base.py``): ``transformers_src``, each model at its rate of
``STUDY_GRID`` chosen on validation, test-split losses, 3 seeds, the paired gap to ``dense`` with its 95% CI.

    python experiments/compare.py --config configs/compare_routers.py:mini --workdir runs/routers_mini --jobs 2

Non-causal routers (expert_choice, base, sinkhorn, soft_moe, batch_prioritized) see the future in a decoder
and are left out (see docs/routers.md).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import compare_base  # noqa: E402


def get_config(size=None):
    cfg = compare_base.science_config(size)
    f = cfg.model.d_ff
    # The K=1 rows are exactly the Switch model of the other studies (compare_base.SWITCH), the K=2 rows fill
    # capacity token by token (slot_order, as compare_base.TOP2), which matters only when K > 1.
    common = dict(num_experts=8, capacity_factor=1.25, eval_capacity_factor=2.0, lb_loss_coef=1e-2, z_loss_coef=1e-3)
    routers = {
        "top_k_k1": dict(router="top_k", k=1),
        "switch": dict(router="switch", k=1),
        "hash": dict(router="hash", k=1, lb_loss_coef=0.0),
        # GShard's own second-expert policy (dispatch the 2nd expert with probability 2*g2): with
        # second_policy='all' it would be the same model as mixtral_top2 (both renormalize the top-2 weights).
        "gshard_top2_rand": dict(router="gshard", k=2, expert_hidden=f // 2, second_policy="random"),
        "mixtral_top2": dict(router="mixtral", k=2, expert_hidden=f // 2),
        "noisy_top2": dict(router="noisy_top_k", k=2, expert_hidden=f // 2),
        "deepseek_top2": dict(router="deepseek", k=2, expert_hidden=f // 2, lb_loss_coef=0.0),
        "top_p_kmax2": dict(router="top_p", k=2, expert_hidden=f // 2),
        "confidence_kmax2": dict(router="confidence", k=2, expert_hidden=f // 2),
    }
    models = {"dense": {}}
    for name, r in routers.items():
        slots = dict(slot_order="token_major") if r["k"] > 1 else {}
        models[name] = compare_base.moe_model(dict(common, **slots, **r))
    return compare_base.make(cfg, models, seeds=(0, 1, 2), title="Causal routers at equal active FLOPs (E=8)",
                             results_dir="docs/results/routers", size=size, lr_search=True,
                             lr_grid=compare_base.STUDY_GRID)
