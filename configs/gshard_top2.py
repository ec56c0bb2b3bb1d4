"""GShard (Lepikhin et al. 2020): top-2 with renormalized gates and the random second-expert policy,
capacity factor 1.25 (times K=2), every other block MoE with 8 experts.

Causal LM: with K=2 and a capacity, 'choice_major' slot order lets a later token's first choice evict an
earlier token's second choice (a leak of the future), so we use slot_order='token_major'.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402


def get_config(size=None):
    return base.make_config(size, model=dict(moe_every=2), moe=dict(
        num_experts=8, k=2, router="gshard", second_policy="random", capacity_factor=1.25,
        eval_capacity_factor=2.0, slot_order="token_major", lb_loss_coef=1e-2, z_loss_coef=1e-3))
