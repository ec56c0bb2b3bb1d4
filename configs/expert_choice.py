"""Expert choice routing (Zhou et al. 2022): each expert takes its top-C tokens of the group, capacity
factor c = 2 (on average two experts per token), every other block MoE with 8 experts.

NON-CAUSAL. Which tokens an expert takes depends on the scores of every token of the group, later ones
included, so in a decoder the output at position t depends on tokens after t: the training loss is
optimistic (the model can "see" the future through the routing) and autoregressive sampling does not match
training. We set moe.allow_non_causal=True to study it anyway; do not compare its loss with causal models
as if it were a fair language-modelling number.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402


def get_config(size=None):
    return base.make_config(size, model=dict(moe_every=2), moe=dict(
        num_experts=8, k=2, router="expert_choice", capacity_factor=1.0, eval_capacity_factor=1.0,
        dispatcher="scatter", allow_non_causal=True,  # the leak is intended: see the docstring
        lb_loss_coef=0.0, z_loss_coef=1e-3))
