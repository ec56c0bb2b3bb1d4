"""Switch Transformer (Fedus et al. 2021): top-1 routing with jitter, capacity factor 1.25, every other
block MoE with 8 experts of the dense FFN's width (same active params per token as the dense model).

    python experiments/train.py --config configs/switch_top1.py:tiny --workdir /tmp/switch_tiny
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402


def get_config(size=None):
    return base.make_config(size, model=dict(moe_every=2), moe=dict(
        num_experts=8, k=1, router="switch", capacity_factor=1.25, eval_capacity_factor=2.0,
        lb_loss_coef=1e-2, z_loss_coef=1e-3))
