"""Dense baseline: every block has a dense GELU FFN (no MoE layers).

    python experiments/train.py --config configs/dense.py --workdir runs/dense
    python experiments/train.py --config configs/dense.py:tiny --workdir /tmp/dense_tiny
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402


def get_config(size=None):
    return base.make_config(size, model=dict(moe_every=0))
