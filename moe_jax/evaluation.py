"""Scoring a trained model on held-out text: loss, perplexity, bits per byte, and the MoE layers' routing.

``evaluate(model, variables, tokens, byte_lengths, batch_size, seq_len)`` runs the model as in training's
evaluation (``train=False``: the configured dispatcher at ``eval_capacity_factor``) over the disjoint windows
of ``data.eval_batches`` (each window of ``L + 1`` tokens scores its last ``L``) and returns:

* ``loss``: mean next-token cross-entropy in nats over the scored targets; ``ppl = exp(loss)``;
* ``bits_per_byte``: the summed cross-entropy in bits over the UTF-8 bytes of the scored targets
  (``token_byte_lengths``), comparable across tokenizers;
* per MoE layer (block ``model.config.moe_blocks[j]``): ``expert_load[j]`` ``[E]`` (fraction of the
  assignments routed to each expert) and ``drop_fraction[j]`` (assignments that lost their slot at the eval
  capacity), both as means over the batches.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_jax import data as data_lib

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def token_byte_lengths(tokenizer) -> np.ndarray:
    """``[V]`` int: the UTF-8 bytes each token id stands for (bytes: 1; BPE: a byte piece ``<0xNN>`` is one
    byte, another piece its text with SentencePiece's ``\u2581`` read as a space)."""
    if isinstance(tokenizer, data_lib.ByteTokenizer):
        return np.ones(256, np.int64)
    pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    return np.array([1 if _BYTE_PIECE.match(p) else len(p.replace("\u2581", " ").encode("utf-8"))
                     for p in pieces], np.int64)


def evaluate(model, variables, tokens: np.ndarray, byte_lengths: np.ndarray, batch_size: int, seq_len: int,
             max_batches: Optional[int] = None) -> Dict[str, Any]:
    """See the module docstring. ``tokens [N]``: the text's ids; fewer than ``batch_size`` windows of
    ``seq_len + 1`` tokens shrink the batch to the windows there are."""
    tokens = np.asarray(tokens)
    windows = len(tokens) // (seq_len + 1)
    if windows < 1:
        raise ValueError(f"seq_len={seq_len}: the text has {len(tokens)} tokens, fewer than one window of "
                         f"seq_len + 1 = {seq_len + 1}; pass a smaller --seq_len or a longer text.")
    batches = data_lib.eval_batches(tokens, min(batch_size, windows), seq_len, max_batches)

    @jax.jit
    def score(batch):
        logits, aux = model.apply(variables, batch[:, :-1], train=False)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])  # [B, L]
        return jnp.sum(nll), aux["metrics"]

    nll, metrics = 0.0, []
    for batch in batches:
        s, m = score(jnp.asarray(batch))
        nll += float(s)
        metrics.append(jax.device_get(m))
    targets = np.concatenate([b[:, 1:].reshape(-1) for b in batches])
    n_bytes = int(np.sum(byte_lengths[targets]))
    loss = nll / targets.size
    out = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
           "tokens": int(targets.size), "bytes": n_bytes, "batches": len(batches),
           "batch_size": int(batches[0].shape[0]), "seq_len": seq_len}
    if metrics and metrics[0]:
        out["moe_blocks"] = list(model.config.moe_blocks)
        out["expert_load"] = np.mean([m["expert_load"] for m in metrics], axis=0).tolist()  # [n, E]
        out["drop_fraction"] = np.mean([m["drop_fraction"] for m in metrics], axis=0).tolist()  # [n]
    return out


def format_table(result: Dict[str, Any]) -> str:
    """Markdown: the scores, then one row per MoE layer (drop fraction, expert load)."""
    lines = ["| tokens | bytes | loss (nats) | ppl | bits/byte |", "| --- | --- | --- | --- | --- |",
             f"| {result['tokens']} | {result['bytes']} | {result['loss']:.4f} | {result['ppl']:.2f} | "
             f"{result['bits_per_byte']:.4f} |"]
    if "moe_blocks" in result:
        lines += ["", "| block | drop fraction | expert load |", "| --- | --- | --- |"]
        for blk, drop, load in zip(result["moe_blocks"], result["drop_fraction"], result["expert_load"]):
            lines.append(f"| {blk} | {drop:.4f} | {' '.join(f'{x:.3f}' for x in load)} |")
    return "\n".join(lines)
