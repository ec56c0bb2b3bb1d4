"""Mixtral (Jiang et al. 2024): top-2 of 8 SwiGLU experts with renormalized gates in every block, SwiGLU
dense parts, untied embeddings. Experts are 2/3 of the dense FFN width (a GLU has 3 matrices instead of 2),
so one expert has the parameters of the dense FFN and a token uses two of them.

Causal LM with K=2 and a capacity: slot_order='token_major' (see gshard_top2.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402


def get_config(size=None):
    c = base.make_config(size, model=dict(moe_every=1, glu=True, activation="silu", tie_embeddings=False),
                         moe=dict(num_experts=8, k=2, router="mixtral", renormalize_top_k=True, glu=True,
                                  activation="silu", capacity_factor=1.25, eval_capacity_factor=2.0,
                                  slot_order="token_major", lb_loss_coef=1e-2, z_loss_coef=1e-3))
    c.model.d_ff = c.model.d_ff * 2 // 3
    c.model.moe.expert_hidden = c.model.d_ff
    return c
