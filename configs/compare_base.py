"""Shared pieces of the dense-vs-sparse comparison configs (``experiments/compare.py``).

A comparison config has ``base`` (a training config), ``models`` (``{name: nested overrides}``), ``seeds``,
``title`` and ``results_dir`` (where the committed table and plots go; '' = only the workdir).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ml_collections  # noqa: E402

from configs import base  # noqa: E402

# The headline architecture: every other block MoE (Switch, GShard), E=8 experts of the dense FFN's width F
# for top-1; top-2 experts have width F/2 so that both use the dense model's active FLOPs per token.
SWITCH = dict(num_experts=8, k=1, router="switch", capacity_factor=1.25, eval_capacity_factor=2.0,
              lb_loss_coef=1e-2, z_loss_coef=1e-3)
TOP2 = dict(num_experts=8, k=2, router="gshard", capacity_factor=1.25, eval_capacity_factor=2.0,
            slot_order="token_major", lb_loss_coef=1e-2, z_loss_coef=1e-3)


def moe_model(moe: dict, moe_every: int = 2, **model) -> dict:
    """Overrides that turn the dense base into an MoE model."""
    return {"model": dict(moe_every=moe_every, moe=dict(moe), **model)}


def dense_with_params_of(base_cfg, num_experts: int, moe_every: int = 2) -> dict:
    """A dense model whose total FFN parameters equal those of an MoE with ``num_experts`` experts of width
    ``d_ff`` in every ``moe_every``-th block (the upper reference: same total, not same active, params)."""
    layers, d_ff = base_cfg.model.num_layers, base_cfg.model.d_ff
    n_moe = layers // moe_every
    total_ffn_width = (layers - n_moe) * d_ff + n_moe * num_experts * d_ff
    return {"model": dict(d_ff=total_ffn_width // layers)}


def make(base_cfg, models: dict, seeds=(0,), title: str = "", results_dir: str = "",
         size=None) -> ml_collections.ConfigDict:
    """The comparison config. ``size``: the config size the study was built at; a size other than the default
    'small' tags the title and sends the committed results to ``<results_dir>_<size>`` (so that a CPU-sized
    study, e.g. ``configs/compare_routers.py:mini``, does not overwrite the full-size one)."""
    if size and size != "small":
        title = f"{title} [{size}]" if title else f"[{size}]"
        results_dir = f"{results_dir}_{size}" if results_dir else ""
    c = ml_collections.ConfigDict()
    c.base = base_cfg
    c.models = ml_collections.ConfigDict(models)
    c.order = list(models)  # table and plot order (ConfigDict sorts keys)
    c.seeds = list(seeds)
    c.title = title
    c.results_dir = results_dir
    return c
