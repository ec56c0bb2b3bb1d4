"""Shared defaults of the training configs and the helper that builds them.

Every config file does ``from configs import base`` and returns ``base.make_config(size, ...)``. Sizes:

* ``'small'`` (the default): D=256, 4 blocks, F=1024, Shakespeare with a 4096-piece BPE, L=128, B=16:
  4.2M active params per token (dense: 4.2M total; switch_top1: 11.5M total), 26.7M training FLOPs/token;
  measured ~2800 tokens/s on 2 idle CPU cores (``taskset -c 0,1``), so 1000 steps (2M tokens) take
  ~13 minutes (~30 on 2 cores shared with other work, ~1200 tokens/s); on one H100, 400-680k tokens/s.
  2000 steps, the default, are ~2.7 epochs of the 1.5M training tokens. Residual dropout 0.1: without it,
  the larger models overfit (H100, 2000 steps, seed 0, no dropout: dense 4.07, a dense model with switch's
  11.5M params 4.08, switch_top1 4.04 nats/token).
* ``'mini'`` (config string ``configs/<name>.py:mini``): the small size at half the width (D=128, F=512, same
  4 blocks, BPE, L and B), no dropout, 1000 steps (2M tokens, 1.3 epochs): 1.3M params dense, 8.7M training
  FLOPs/token, ~5000 tokens/s for the dense model on one CPU core, so a run takes about 8 minutes on one core.
  The CPU-sized studies of ``docs/results/README.md`` use it (two runs side by side on 2 cores).
* ``'tiny'`` (config string ``configs/<name>.py:tiny``): byte tokenizer, D=64, 2 blocks, L=64, B=8,
  200 steps; trains in well under a minute on 2 CPU cores.

The fields (``config.data``, ``config.model`` with ``config.model.moe`` = the fields of
``moe_jax.moe.MoEConfig``, ``config.train``, ``config.mesh``) are listed with comments in ``base_config``;
``moe_jax.train.validate_config`` checks them at start.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Dict, Optional

import ml_collections
from ml_collections import config_dict

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # config files are loaded by path; make `moe_jax` importable from a checkout
    sys.path.insert(0, _ROOT)

from moe_jax.moe import MoEConfig  # noqa: E402

SIZES: Dict[str, Dict[str, Dict[str, Any]]] = {
    "small": {
        "data": dict(corpus="shakespeare", tokenizer="bpe", vocab_size=4096, seq_len=128, batch_size=16),
        "model": dict(d_model=256, num_layers=4, num_heads=4, d_ff=1024, dropout=0.1),
        "train": dict(steps=2000, learning_rate=2e-3, warmup_steps=100, log_every=25, eval_every=250,
                      eval_batches=16, ckpt_every=250, sample_tokens=200),
    },
    "mini": {
        "data": dict(corpus="shakespeare", tokenizer="bpe", vocab_size=4096, seq_len=128, batch_size=16),
        "model": dict(d_model=128, num_layers=4, num_heads=4, d_ff=512, dropout=0.0),
        "train": dict(steps=1000, learning_rate=2e-3, warmup_steps=50, log_every=25, eval_every=125,
                      eval_batches=16, ckpt_every=250, sample_tokens=100),
    },
    "tiny": {
        "data": dict(corpus="shakespeare", tokenizer="bytes", vocab_size=256, seq_len=64, batch_size=8),
        "model": dict(d_model=64, num_layers=2, num_heads=4, d_ff=256),
        "train": dict(steps=200, learning_rate=3e-3, warmup_steps=20, log_every=20, eval_every=100,
                      eval_batches=4, ckpt_every=100, sample_tokens=100),
    },
}


def _optional_type(annotation: str):
    inner = annotation.replace("Optional[", "").rstrip("]")
    # Any (e.g. group_size: an int or 'auto') -> object: the override keeps whatever type it is given.
    return {"int": int, "float": float, "bool": bool, "str": str, "Any": object}.get(inner, object)


def moe_defaults() -> ml_collections.ConfigDict:
    """Every ``MoEConfig`` field with its default; ``None`` defaults become typed placeholders so that
    ``--config.model.moe.group_size=64`` style overrides parse."""
    out = {}
    for f in dataclasses.fields(MoEConfig):
        value = f.default
        if value is None:
            value = config_dict.placeholder(_optional_type(str(f.type)))
        out[f.name] = value
    return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
    """All fields with their defaults (a dense model of the 'small' size)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(
        # 'shakespeare' | 'transformers_src' (docs/corpus.md) | a .txt file | a folder of .txt | a glob (moe_jax/data.py)
        corpus="shakespeare",
        tokenizer="bpe",  # 'bytes' (256 ids) | 'bpe' (SentencePiece, trained on the training split)
        vocab_size=4096,  # bpe only
        seq_len=128, batch_size=16,  # L and the global B
        cache_dir="",  # '' = ~/.cache/moe_jax or $MOE_JAX_CACHE
        test_split=False,  # also hold out a test split (moe_jax/data.py; 'transformers_src' always has one)
    ))
    c.model = ml_collections.ConfigDict(dict(
        d_model=256, num_layers=4, num_heads=4, d_ff=1024, activation="gelu", glu=False, tie_embeddings=True,
        dtype="float32",
        rope_base=10000.0, norm_eps=1e-6,  # rotary base (transformers' rope_theta), RMSNorm epsilon
        num_kv_heads=0, head_dim=0,  # 0 = num_heads (grouped-query attention if fewer), d_model / num_heads
        qkv_bias=False, out_bias=False,  # attention projection biases
        qk_norm="none",  # 'none' | 'head' (Qwen3) | 'all' (OLMoE): RMSNorm on queries and keys
        moe_every=0,  # 0 = all dense; n = blocks i with (i + 1) % n == 0 are MoE
        first_dense=0,  # the first k blocks are dense regardless
        dropout=0.0,  # residual dropout (training only)
    ))
    c.model.moe = moe_defaults()
    c.train = ml_collections.ConfigDict(dict(
        steps=1000,
        learning_rate=2e-3, warmup_steps=100, end_lr_ratio=0.1,  # linear warmup, cosine to lr * end_lr_ratio
        weight_decay=0.1, grad_clip=1.0, adam_b1=0.9, adam_b2=0.95,  # AdamW; grad_clip 0 = off
        log_every=25,  # train metrics (host sync) every n steps
        eval_every=200, eval_batches=16,  # validation loss every n steps (0 = only at the end), on n batches
        test_batches=64,  # test loss at the end on at most n batches, if the corpus has a test split
        ckpt_every=200, keep_ckpts=3,  # checkpoint every n steps (0 = only at the end), keep the last k
        sample_tokens=200, sample_prompt="",  # text sample at the end (0 = none)
        debug_step_delay_s=0.0,  # sleep after each step (only to test kill-and-resume); 0 = off
        progress_every_s=30.0,  # stdout not a terminal (no progress bar): a progress line every n s; 0 = off
    ))
    # Device mesh (moe_jax/parallel.py, docs/parallel.md): -1 = the rest of the devices; the expert-parallel
    # degree is mesh.expert. pmap: the older jax.pmap data-parallel path instead of jit + shardings.
    # distributed: call jax.distributed.initialize() first (multi-host; settings from the environment).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, expert=1, model=1, pmap=False, distributed=False))
    # Start from another run's checkpoint instead of a random init (moe_jax/upcycle.py): a dense run upcycled
    # or split into an MoE, or copied. Used only when the workdir has no checkpoint yet; the optimizer is reset.
    c.init = ml_collections.ConfigDict(dict(
        from_dir="",  # the source run's --workdir ('' = random init); '@name' = run `name` of the same comparison
        step=-1,  # the source checkpoint's step (-1 = latest)
        method="upcycle",  # 'upcycle' | 'split_random' | 'split_kmeans' | 'split_importance' | 'copy'
        router="auto",  # 'auto' | 'fresh' | 'zeros' | 'centroids' (auto: centroids for split_kmeans)
        noise_std=0.0,  # upcycle: relative noise on each expert's copy
        seed=0, kmeans_iters=30,
        importance_batches=4,  # batches for the Taylor neuron importances (split_importance, shared experts)
        restart_step=False,  # True: start at step 0 (new schedule, data order); False: continue the source's
    ))
    return c


def make_config(size: Optional[str] = None, *, model: Optional[Dict[str, Any]] = None,
                moe: Optional[Dict[str, Any]] = None, train: Optional[Dict[str, Any]] = None,
                data: Optional[Dict[str, Any]] = None) -> ml_collections.ConfigDict:
    """The base config at ``size`` ('small' if None/''; or 'tiny'), then the given overrides.

    ``moe.expert_hidden`` defaults to the size's ``d_ff`` (so a top-1 MoE has the dense model's active
    params per token).
    """
    size = size or "small"
    if size not in SIZES:
        raise ValueError(f"config size {size!r}: choose one of {sorted(SIZES)} (e.g. configs/dense.py:tiny).")
    c = base_config()
    for section, values in SIZES[size].items():
        c[section].update(values)
    for section, values in (("data", data), ("model", model), ("train", train)):
        if values:
            c[section].update(values)
    c.model.moe.expert_hidden = c.model.d_ff  # after the model overrides, so it follows an overridden d_ff
    if moe:
        c.model.moe.update(moe)
    return c
