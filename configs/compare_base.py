"""Shared pieces of the dense-vs-sparse comparison configs (``experiments/compare.py``).

A comparison config has ``base`` (a training config), ``models`` (``{name: nested overrides}``), ``seeds`` (a
tuple), ``lr_search`` / ``lr_grid`` / ``lr_select_seeds`` (per-model learning-rate search, ``moe_jax/compare.py``),
``gap_reference``, ``title`` and ``results_dir`` (where ``--publish`` copies the table and plots; '' = nowhere).

The science protocol of the studies (docs/corpus.md, docs/results/README.md): the data-rich corpus
``transformers_src`` (``science_config``), every model at its own learning rate of ``LR_GRID`` chosen on the
validation split, test-split losses, 3 seeds, dropless dispatch for MoE rows whose point is not the capacity.
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


# The learning-rate grid of the science protocol: log-spaced, factor 2, from half the 2e-3 default to 4x it
# (on transformers_src at the mini size, dense and Switch both still improved from 2e-3 to 4e-3, so 8e-3 is in).
LR_GRID = (1e-3, 2e-3, 4e-3, 8e-3)
# The grid of the studies that compare MoE variants (expert count, capacity, balance, routers): the headline's
# grid less 1e-3, which was 0.40-0.45 nats worse than 4e-3 on validation for dense, Switch and GShard at mini
# (docs/results/headline_mini/lr_grid.csv); a third fewer runs. The trust line says when a model's choice sits
# at an edge; widen it with --config.lr_grid at other sizes.
STUDY_GRID = (2e-3, 4e-3, 8e-3)
# Switch top-1 and GShard top-2 without drops (dropless dispatch, ``moe_jax/dispatch.py``): the expert-count
# and headline curves then show routing, not capacity artefacts.
SWITCH_DROPLESS = dict(SWITCH, dispatcher="dropless")
TOP2_DROPLESS = dict(TOP2, dispatcher="dropless")


def science_config(size=None, **train):
    """The base training config of the science protocol at ``size``: the ``transformers_src`` corpus (BPE
    4096; its test split is built in), the size's model and optimizer, ``train`` overrides."""
    return base.make_config(size, data=dict(corpus="transformers_src"), train=train or None)


def swiglu(models: dict) -> dict:
    """Every model of ``models`` with SwiGLU FFNs (silu + GLU) in its dense blocks and in its experts: the same
    activation for dense and MoE (the FFN then has 3 weight matrices; widths unchanged)."""
    out = {}
    for name, ov in models.items():
        ov = dict(ov)
        model = dict(ov.get("model", {}), activation="silu", glu=True)
        model["moe"] = dict(model.get("moe", {}), activation="silu", glu=True)
        ov["model"] = model
        out[name] = ov
    return out


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
         size=None, lr_search: bool = False, lr_grid=LR_GRID, lr_select_seeds: int = 1,
         gap_reference: str = "", lr_grids=None) -> ml_collections.ConfigDict:
    """The comparison config. ``size``: the config size the study was built at; a size other than the default
    'small' tags the title and sends the committed results to ``<results_dir>_<size>`` (so that a CPU-sized
    study, e.g. ``configs/compare_routers.py:mini``, does not overwrite the full-size one). ``lr_grids``:
    ``{model: grid}``, a model's own grid in place of ``lr_grid`` (each entry can then be overridden from the
    command line, ``--config.lr_grids.NAME=...``)."""
    if size and size != "small":
        title = f"{title} [{size}]" if title else f"[{size}]"
        results_dir = f"{results_dir}_{size}" if results_dir else ""
    c = ml_collections.ConfigDict()
    c.base = base_cfg
    c.models = ml_collections.ConfigDict(models)
    c.order = tuple(models)  # table and plot order (ConfigDict sorts keys); --config.order=a,b runs a part
    c.seeds = tuple(seeds)  # a tuple, so that --config.seeds=0,1,2 (or '[0,1,2]') parses
    c.lr_search = bool(lr_search)
    c.lr_grid = tuple(float(x) for x in lr_grid)
    c.lr_grids = ml_collections.ConfigDict({k: tuple(float(x) for x in v) for k, v in (lr_grids or {}).items()})
    c.lr_select_seeds = int(lr_select_seeds)
    c.gap_reference = gap_reference
    c.title = title
    c.results_dir = results_dir
    return c
