"""Generation with a key/value cache: prefill the prompts, then one compiled decode step per new token.

Axes (see ``moe_jax.model``): ``B`` prompts, ``M`` cache length (``max_len``: prompt plus new tokens),
``Hkv`` key/value heads, ``Dh`` head width, ``V`` vocabulary, ``N`` new tokens.

Layout of a batch (right padding, per-row positions). Row ``b`` holds its prompt of ``len_b`` tokens at
positions ``0 .. len_b - 1`` and the rest of the ``[B, M]`` window is padding (id 0). Cache slot = position:

1. **prefill**: one forward pass of the whole ``[B, M]`` window with ``positions = 0 .. M-1`` writes every slot
   of the cache ``[B, M, Hkv, Dh]`` of each block; the first new token of row ``b`` comes from the logits at
   position ``len_b - 1``. The slots from ``len_b`` on hold keys of padding for now.
2. **decode step** ``i`` (``0 .. N-1``): row ``b`` feeds its newest token at position ``len_b + i``, writes its
   key/value at that slot and attends to slots ``<= len_b + i``. Every slot it reads was written by the
   prompt or by an earlier step, so padding is never seen and rows of different lengths decode together.

So a row decodes exactly as it would alone, and the prefill and decode shapes depend only on ``(B, M)``: the
whole loop (``lax.fori_loop`` over decode steps, ``N`` traced) compiles once per ``(B, M)`` and sampling
setting. ``max_len`` must hold ``max_b len_b + N``.

MoE layers at decode route every token dropless (``decode_model``: ``dispatcher='dropless'``, one group per
sequence), whatever the training dispatcher: no capacity, so no token is ever dropped and a token's output
does not depend on the other tokens of its batch. The parameters are the same; only token-choice routers
decode (expert choice and Soft MoE mix the tokens of a group).

Sampling (``Sampling``): greedy (``temperature=0``), temperature, top-k, top-p (nucleus), applied in that
order (temperature, then the top-k filter, then the top-p filter on the renormalised rest). Step ``i`` draws
with ``fold_in(key(seed), i)``, the same in the cached and the uncached loop (``generate_uncached``, the full
forward over the whole window at every step: the reference of the tests and of ``bench_decode.py``).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import routing
from moe_jax.model import Transformer

Array = jax.Array
Cache = Tuple[Tuple[Array, Array], ...]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits.

    temperature: 0 = greedy (argmax; top_k and top_p are then ignored), else logits / temperature.
    top_k: keep the k most likely tokens (0 = all). top_p: keep the smallest set of most likely tokens whose
    probability reaches p (1.0 = all; the most likely token is always kept).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> "Sampling":
        """From ``'greedy'`` or ``'temperature=0.8,top_k=40,top_p=0.95'`` (any subset, defaults otherwise)."""
        spec = (spec or "").strip()
        if spec == "greedy":
            return cls(temperature=0.0).validate()
        names = [f.name for f in dataclasses.fields(cls)]
        values: Dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, eq, value = part.partition("=")
            key = key.strip()
            if key not in names or not eq:
                raise ValueError(f"sampling: unknown option {part!r}; use 'greedy' or key=value pairs of "
                                 f"{names}, e.g. 'temperature=0.8,top_k=40'.")
            try:
                values[key] = int(value) if key == "top_k" else float(value)
            except ValueError:
                raise ValueError(f"sampling.{key}: {value.strip()!r} is not a number.") from None
        return cls(**values).validate()

    def validate(self, vocab_size: Optional[int] = None) -> "Sampling":
        if not self.temperature >= 0:
            raise ValueError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature!r}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"sampling.top_k must be an integer >= 0 (0 = all tokens), got {self.top_k!r}.")
        if vocab_size is not None and self.top_k > vocab_size:
            raise ValueError(f"sampling.top_k={self.top_k} exceeds the vocabulary ({vocab_size} tokens); "
                             "lower it or use 0 (all tokens).")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p must be in (0, 1] (1 = all tokens), got {self.top_p!r}.")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_logits(logits: Array, rng: Array, sampling: Sampling) -> Array:
    """``logits[B, V] -> token ids [B]`` int32 (see ``Sampling``)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    neg = jnp.finfo(jnp.float32).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)  # [B, V] most likely first
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        keep_sorted = before < sampling.top_p  # the first token has before = 0: always kept
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def can_cache(model: Transformer) -> bool:
    """Dense, or MoE with a token-choice router: decodable one token at a time (``decode_model``)."""
    cfg = model.config
    return cfg.moe is None or routing.get_router_class(cfg.moe.router).kind == "token_choice"


def decode_model(model: Transformer) -> Transformer:
    """The same model (same parameter tree) with its MoE layers dropless and one group per sequence."""
    cfg = model.config
    if cfg.moe is None:
        return model
    kind = routing.get_router_class(cfg.moe.router).kind
    if kind != "token_choice":
        raise ValueError(f"model.moe.router={cfg.moe.router!r} ({kind}) mixes the tokens of a group, so it cannot "
                         "decode one token at a time; decode a token-choice model (top_k, switch, mixtral, ...).")
    moe = dataclasses.replace(cfg.moe, dispatcher="dropless", group_size=None)
    return Transformer(dataclasses.replace(cfg, moe=moe))


def init_cache(model: Transformer, batch: int, max_len: int) -> Cache:
    """Zeros: one ``(k, v)`` ``[B, M, Hkv, Dh]`` per block, in the compute dtype."""
    cfg = model.config
    shape = (batch, max_len, cfg.kv_heads, cfg.resolved_head_dim)
    return tuple((jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
                 for _ in range(cfg.num_layers))


def prefill(model: Transformer, variables, tokens: Array, cache: Cache) -> Tuple[Array, Cache]:
    """``tokens[B, M]`` at positions ``0..M-1`` -> ``(logits[B, M, V], cache)`` (``model`` = ``decode_model``)."""
    b, m = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (b, m))
    logits, _, cache = model.apply(variables, tokens, positions=positions, cache=cache)
    return logits, cache


def decode_step(model: Transformer, variables, token: Array, position: Array, cache: Cache) -> Tuple[Array, Cache]:
    """``token[B]`` at ``position[B]`` -> ``(logits[B, V], cache)`` with that slot written."""
    logits, _, cache = model.apply(variables, token[:, None], positions=position[:, None].astype(jnp.int32),
                                   cache=cache)
    return logits[:, 0], cache


def pad_prompts(prompts: Sequence[Sequence[int]], num_new: int, max_len: Optional[int], vocab_size: int
                ) -> Tuple[np.ndarray, np.ndarray, int]:
    """``(tokens[B, M] int32 right-padded with 0, lengths[B], M)``; errors name the field."""
    if not len(prompts):
        raise ValueError("prompts: give at least one prompt.")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() == 0:
        raise ValueError(f"prompt: prompt {int(np.argmin(lengths))} is empty; a prompt needs at least one token "
                         "(the model continues it).")
    if not isinstance(num_new, (int, np.integer)) or num_new < 1:
        raise ValueError(f"num_tokens must be an integer >= 1, got {num_new!r}.")
    need = int(lengths.max()) + int(num_new)
    max_len = need if max_len is None else int(max_len)
    if lengths.max() > max_len:
        raise ValueError(f"max_len={max_len}: a prompt holds {int(lengths.max())} tokens, longer than max_len; "
                         "shorten the prompt or raise max_len.")
    if need > max_len:
        raise ValueError(f"max_len={max_len} is too short for a prompt of {int(lengths.max())} tokens plus "
                         f"num_tokens={num_new}; raise max_len to >= {need} or lower num_tokens.")
    tokens = np.zeros((len(prompts), max_len), np.int32)
    for i, p in enumerate(prompts):
        ids = np.asarray(p, np.int64)
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"prompt {i}: token ids must lie in [0, {vocab_size}) (model.vocab_size), got "
                             f"[{ids.min()}, {ids.max()}].")
        tokens[i, : len(ids)] = ids
    return tokens, lengths, max_len


_COMPILED: Dict[Any, Any] = {}


def _generate_fn(model: Transformer, sampling: Sampling, cached: bool):
    """Jitted ``(variables, tokens[B, M], lengths[B], num_new, rng) -> new tokens [B, M]`` (first N columns)."""
    key = (model.config, sampling, cached)
    if key in _COMPILED:
        return _COMPILED[key]

    def run(variables, tokens, lengths, num_new, rng):
        b, m = tokens.shape
        rows = jnp.arange(b)
        out = jnp.zeros((b, m), jnp.int32)
        if cached:
            logits, cache = prefill(model, variables, tokens, init_cache(model, b, m))
            last = logits[rows, lengths - 1]  # [B, V]

            def body(i, carry):
                last, cache, out = carry
                tok = sample_logits(last, jax.random.fold_in(rng, i), sampling)  # [B]
                last, cache = decode_step(model, variables, tok, lengths + i, cache)
                return last, cache, out.at[:, i].set(tok)

            return jax.lax.fori_loop(0, num_new, body, (last, cache, out))[2]

        def body(i, carry):  # uncached: the whole window again at every step
            window, out = carry
            logits, _ = model.apply(variables, window, train=False)
            tok = sample_logits(logits[rows, lengths + i - 1], jax.random.fold_in(rng, i), sampling)
            return window.at[rows, lengths + i].set(tok, mode="drop"), out.at[:, i].set(tok)

        return jax.lax.fori_loop(0, num_new, body, (tokens, out))[1]

    fn = _COMPILED[key] = jax.jit(run)
    return fn


@dataclasses.dataclass
class Generation:
    """``tokens[B, N]`` int32 (new tokens only); ``compile_s`` (0 if already compiled for this shape),
    ``decode_s`` (prefill + N steps, after compiling), ``tokens_per_s`` = ``B * N / decode_s``."""

    tokens: np.ndarray
    compile_s: float
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens.size / max(self.decode_s, 1e-12)


def generate(model: Transformer, variables, prompts: Sequence[Sequence[int]], num_new: int,
             sampling: Sampling = Sampling(temperature=0.0), seed: int = 0, max_len: Optional[int] = None,
             cached: bool = True) -> Generation:
    """Continue each prompt (a list of ids) by ``num_new`` tokens; ``max_len`` (M, default: longest prompt +
    ``num_new``) fixes the compiled shape. ``cached=False``: the uncached reference (full forward per token;
    for a router that cannot cache, ``can_cache``, the model as configured, at its eval capacity)."""
    cfg = model.config
    sampling.validate(cfg.vocab_size)
    dec = decode_model(model) if cached or can_cache(model) else model
    tokens, lengths, max_len = pad_prompts(prompts, num_new, max_len, cfg.vocab_size)
    fn = _generate_fn(dec, sampling, cached)
    args = (variables, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(num_new, jnp.int32),
            jax.random.key(seed))
    t0 = time.perf_counter()
    sig = (id(fn), tokens.shape, jax.tree.structure(variables))
    compiled = _COMPILED.get(sig)
    if compiled is None:
        compiled = _COMPILED[sig] = fn.lower(*args).compile()
    t1 = time.perf_counter()
    out = np.asarray(jax.block_until_ready(compiled(*args)))
    t2 = time.perf_counter()
    return Generation(out[:, :num_new], compile_s=t1 - t0, decode_s=t2 - t1)


def generate_uncached(model, variables, prompts, num_new, sampling=Sampling(temperature=0.0), seed=0,
                      max_len=None) -> Generation:
    """The reference: the full forward over the ``[B, M]`` window at every step (same sampling draws)."""
    return generate(model, variables, prompts, num_new, sampling, seed, max_len, cached=False)


# ------------------------------------------------------------------------------------------ checkpoints


def load_for_decoding(workdir: str, step: Optional[int] = None):
    """``train.load_checkpoint`` with one-line errors: a missing or empty workdir, no checkpoint yet, and a
    checkpoint whose vocabulary (``vocab_size`` in ``config.json``) differs from the tokenizer's."""
    import json
    import os

    from moe_jax import data as data_lib
    from moe_jax import train as train_lib

    path = os.path.abspath(os.path.expanduser(workdir))
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.listdir(path):
        raise FileNotFoundError(f"workdir {path!r} is missing or empty; pass the --workdir of a run of "
                                "experiments/train.py.")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"workdir {path!r} has no config.json: not a run directory of experiments/train.py.")
    ckpt_dir = os.path.join(path, train_lib.CKPT_DIR)
    steps = [d for d in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []) if d.isdigit()]
    if not steps:
        raise FileNotFoundError(f"workdir {path!r} has no checkpoint yet (no {ckpt_dir}/<step>); train first.")
    if step is not None and str(step) not in steps:
        raise FileNotFoundError(f"step={step}: no such checkpoint in {ckpt_dir}; have {sorted(map(int, steps))}.")
    with open(cfg_path) as f:
        resolved = json.load(f)
    import ml_collections
    data_cfg = ml_collections.ConfigDict(resolved["config"]["data"])
    tokenizer = data_lib.prepare_data(data_cfg, cache_dir=data_cfg.get("cache_dir") or None).tokenizer
    if int(resolved["vocab_size"]) != int(tokenizer.vocab_size):
        raise ValueError(f"vocab_size: the checkpoint's model has {resolved['vocab_size']} tokens (config.json) but "
                         f"its tokenizer (data.tokenizer={data_cfg.tokenizer!r}, data.vocab_size="
                         f"{data_cfg.get('vocab_size')}) has {tokenizer.vocab_size}; decode with the tokenizer the "
                         "run was trained with (same data.corpus, data.tokenizer, data.vocab_size).")
    return train_lib.load_checkpoint(path, step)


def sample_text(model, variables, tokenizer, prompt: str, num_tokens: int, seed: int = 0,
                sampling: Sampling = Sampling(temperature=0.8, top_k=40)) -> Tuple[str, Generation]:
    """Decode ``num_tokens`` tokens after ``prompt`` (text; must encode to >= 1 token)."""
    if not prompt:
        raise ValueError("prompt: empty; give some text to continue (e.g. --prompt='ROMEO:').")
    ids = [int(i) for i in tokenizer.encode(prompt)]
    gen = generate(model, variables, [ids], num_tokens, sampling, seed, cached=can_cache(model))
    return tokenizer.decode(gen.tokens[0]), gen
