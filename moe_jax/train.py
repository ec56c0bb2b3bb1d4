"""Training: config validation, train state, optimizer, jitted train/eval steps, the loop, checkpoints.

``train(config, workdir) -> summary`` is the one entry point (``experiments/train.py`` and the comparison
scripts call it). A run directory holds::

    workdir/config.json        the resolved config (vocab size filled in)
    workdir/metrics.jsonl      one JSON object per log/eval event: {"step", "split": "train"|"val", ...}
    workdir/tb/                TensorBoard events (tensorboardX)
    workdir/checkpoints/<step> orbax checkpoints: train state, data-iterator state, config
    workdir/sample.txt, summary.json

Semantics:

* **Loss** = LM cross-entropy (mean over all B*L next-token predictions) + the MoE layers' weighted aux
  losses; the cross-entropy is logged on its own (``ce``) so that dense and sparse models compare fairly.
* **Optimizer**: AdamW, global-norm clipping (``train.grad_clip``; 0 = off), learning rate linear warmup from
  ``lr / warmup_steps`` to ``lr`` over ``warmup_steps`` updates, then cosine decay to
  ``lr * end_lr_ratio`` at ``train.steps``. No weight decay on 1-D params (norm scales) and the embedding.
* **Randomness**: the step's RNG is ``fold_in(key(seed), step)`` (inside the jitted step), the data order
  comes from the iterator's saved state: a resumed run repeats an uninterrupted one bit for bit on CPU.
* **Resume**: rerunning the same command restores the latest checkpoint that loads (a leftover temporary or
  broken step directory is skipped) and continues; ``metrics.jsonl`` is cut back to the restored step.
  The stored config is compared first (``resume_changes``): changed steps, cadences and schedule apply (one
  log line); any other change is refused (``WorkdirConflictError``) with the workdir untouched, unless
  ``restart=True`` (``--restart``) moves the old run to ``<workdir>.old-<n>``. A checkpoint is broken only if
  it fails to load under its own stored config: one warning line, moved to ``<step>.broken-<time>``.
* **Progress**: with stdout not a terminal (no tqdm bar), a ``progress:`` line every
  ``train.progress_every_s`` seconds (step, loss, tokens/s, elapsed, ETA).
* **Host syncs**: metrics stay on the device and are fetched only at log, eval and checkpoint steps.
* **Divergence**: a non-finite loss or gradient norm stops the run (``TrainingDivergedError``) naming the
  first bad step; checkpoints are only written after the losses up to that step were checked, so the last
  checkpoint is always a finite state.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from moe_jax import parallel
from moe_jax.flops import count_model
from moe_jax.model import MOE_STATE, ModelConfig, Transformer, init_variables

Array = jax.Array
CKPT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"


class TrainingDivergedError(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite."""


# ------------------------------------------------------------------------------------------ validation


def _require(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"config.{field}: {msg}")


def config_vocab_size(config) -> int:
    """The vocabulary size the config asks for (bytes: 256) before any tokenizer is built."""
    return 256 if config.data.tokenizer == "bytes" else int(config.data.vocab_size)


def validate_config(config, vocab_size: Optional[int] = None) -> ModelConfig:
    """Check the whole config once, at start; raise ``ValueError`` naming the field and the fix.

    Returns the validated ``ModelConfig`` (with ``vocab_size``, default: what the config asks for).
    """
    for section in ("data", "model", "train"):
        _require(section in config, section, f"missing section; start from configs/base.py.")
    data, tr = config.data, config.train
    _require(isinstance(config.get("seed", 0), int) and config.get("seed", 0) >= 0, "seed",
             f"must be an integer >= 0, got {config.get('seed')!r}.")
    _require(data.tokenizer in ("bytes", "bpe"), "data.tokenizer",
             f"unknown {data.tokenizer!r}; choose 'bytes' or 'bpe'.")
    if data.tokenizer == "bpe":
        _require(int(data.get("vocab_size", 0)) >= 2, "data.vocab_size",
                 f"must be >= 2 for the BPE tokenizer, got {data.get('vocab_size')!r}.")
    _require(int(data.seq_len) >= 2, "data.seq_len", f"must be >= 2, got {data.seq_len!r}.")
    _require(int(data.batch_size) >= 1, "data.batch_size", f"must be >= 1, got {data.batch_size!r}.")
    _require(int(tr.steps) >= 1, "train.steps", f"must be >= 1, got {tr.steps!r}.")
    _require(float(tr.learning_rate) > 0, "train.learning_rate", f"must be > 0, got {tr.learning_rate!r}.")
    _require(0 <= int(tr.warmup_steps) <= int(tr.steps), "train.warmup_steps",
             f"must be between 0 and train.steps={tr.steps}, got {tr.warmup_steps!r}.")
    _require(0.0 <= float(tr.end_lr_ratio) <= 1.0, "train.end_lr_ratio",
             f"must be in [0, 1] (final lr = learning_rate * end_lr_ratio), got {tr.end_lr_ratio!r}.")
    _require(float(tr.weight_decay) >= 0, "train.weight_decay", f"must be >= 0, got {tr.weight_decay!r}.")
    _require(float(tr.grad_clip) >= 0, "train.grad_clip", f"must be >= 0 (0 = no clipping), got {tr.grad_clip!r}.")
    _require(int(tr.log_every) >= 1, "train.log_every", f"must be >= 1, got {tr.log_every!r}.")
    _require(int(tr.eval_every) >= 0, "train.eval_every", f"must be >= 0 (0 = only at the end), got {tr.eval_every!r}.")
    _require(int(tr.eval_batches) >= 1, "train.eval_batches", f"must be >= 1, got {tr.eval_batches!r}.")
    _require(int(tr.ckpt_every) >= 0, "train.ckpt_every",
             f"must be >= 0 (0 = only at the end), got {tr.ckpt_every!r}.")
    _require(int(tr.keep_ckpts) >= 1, "train.keep_ckpts", f"must be >= 1, got {tr.keep_ckpts!r}.")
    _require(int(tr.sample_tokens) >= 0, "train.sample_tokens", f"must be >= 0, got {tr.sample_tokens!r}.")
    _require(float(tr.get("progress_every_s", 0.0)) >= 0, "train.progress_every_s",
             f"must be >= 0 (0 = off), got {tr.get('progress_every_s')!r}.")
    if (config.get("init") or {}).get("from_dir"):  # dense -> MoE conversion (moe_jax/upcycle.py)
        from moe_jax.upcycle import ConvertOptions
        ConvertOptions.from_config(config.init)
    model_cfg = ModelConfig.from_config(config.model, vocab_size or config_vocab_size(config)).validate()
    if model_cfg.moe is not None and model_cfg.moe.group_size:
        s, t = model_cfg.moe.resolved_group_size(int(data.seq_len)), int(data.batch_size) * int(data.seq_len)
        _require(int(data.seq_len) % s == 0 or model_cfg.moe.allow_non_causal, "model.moe.group_size",
                 f"{s} does not divide data.seq_len = {data.seq_len}: in this causal model a group must hold whole "
                 "sequences (else a sequence's later tokens could take expert slots before another's earlier "
                 "ones). Choose a divisor of data.seq_len, or None (= data.seq_len).")
        _require(t % s == 0, "model.moe.group_size",
                 f"{s} does not divide data.batch_size * data.seq_len = {t} tokens per batch; choose a divisor "
                 "(e.g. data.seq_len) or None (one sequence per group).")
    return model_cfg


# ------------------------------------------------------------------------------------- state, optimizer


@struct.dataclass
class TrainState:
    """Everything that changes during training. A pytree; checkpointed as a whole.

    ``moe_state``: the model's ``'moe_state'`` collection (non-gradient router state), ``{}`` if none.
    """

    step: Array
    params: Any
    opt_state: Any
    moe_state: Any


def lr_schedule(learning_rate: float, steps: int, warmup_steps: int, end_lr_ratio: float) -> Callable:
    """``count -> lr``: ``lr * (count+1)/warmup`` for ``count < warmup``, then cosine from ``lr`` to
    ``lr * end_lr_ratio`` at ``count = steps``. ``count`` = updates done before this one."""
    lr, w, ratio = float(learning_rate), int(warmup_steps), float(end_lr_ratio)
    decay = max(int(steps) - w, 1)

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = lr * jnp.minimum(1.0, (t + 1.0) / max(w, 1))
        progress = jnp.clip((t - w) / decay, 0.0, 1.0)
        cosine = lr * (ratio + (1.0 - ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return jnp.where(t < w, warm, cosine)

    return schedule


def weight_decay_mask(params) -> Any:
    """True for the params that get weight decay: matrices and expert stacks, not norms nor the embedding."""
    def decay(path, p):
        names = [str(getattr(k, "key", k)) for k in path]
        return p.ndim >= 2 and "embed" not in names

    return jax.tree_util.tree_map_with_path(decay, params)


def make_optimizer(train_cfg) -> Tuple[optax.GradientTransformation, Callable]:
    schedule = lr_schedule(train_cfg.learning_rate, train_cfg.steps, train_cfg.warmup_steps, train_cfg.end_lr_ratio)
    parts = []
    if float(train_cfg.grad_clip) > 0:
        parts.append(optax.clip_by_global_norm(float(train_cfg.grad_clip)))
    parts.append(optax.adamw(schedule, b1=float(train_cfg.get("adam_b1", 0.9)), b2=float(train_cfg.get("adam_b2", 0.95)),
                             eps=1e-8, weight_decay=float(train_cfg.weight_decay), mask=weight_decay_mask))
    return optax.chain(*parts), schedule


def create_state(model: Transformer, tx: optax.GradientTransformation, rng: Array, seq_len: int) -> TrainState:
    moe = model.config.moe
    s = moe.resolved_group_size(seq_len) if moe is not None else seq_len
    # the smallest init batch whose B*L tokens the MoE group size divides (1 unless groups span sequences)
    variables = init_variables(model, rng, seq_len, batch_size=s // math.gcd(s, seq_len))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      moe_state=variables.get(MOE_STATE, {}))


def initial_state(config, model: Transformer, tx: optax.GradientTransformation, fresh: TrainState, batches=None):
    """``(TrainState, upcycle.Initial)`` converted from the run named by ``config.init.from_dir``
    (``moe_jax.upcycle``: upcycling, splitting, or a plain copy), or ``None`` if none is named.

    ``fresh``: a randomly initialised state of ``model`` (on the host), which gives the parts that are new
    (routers, ``'moe_state'``); the optimizer state is reset (``tx.init`` of the converted params).
    ``batches(n)``: n training batches ``[B, L+1]`` for the neuron importances (split_importance, shared experts).
    """
    from moe_jax import upcycle

    init_cfg = config.get("init")
    if not init_cfg or not init_cfg.get("from_dir"):
        return None
    variables = {"params": fresh.params, **({MOE_STATE: fresh.moe_state} if fresh.moe_state else {})}
    initial = upcycle.initial_from_source(init_cfg, model.config, variables, batches)
    params = jax.tree.map(jnp.asarray, initial.variables["params"])
    state = TrainState(step=jnp.asarray(initial.step, jnp.int32), params=params, opt_state=tx.init(params),
                       moe_state=jax.tree.map(jnp.asarray, initial.variables.get(MOE_STATE, {})))
    return state, initial


# ---------------------------------------------------------------------------------------------- steps


def _apply(model, params, moe_state, inputs, rng, train: bool):
    """``(logits, aux, new_moe_state)``; the ``'moe_state'`` collection is mutable in training only."""
    variables = {"params": params}
    if moe_state:
        variables[MOE_STATE] = moe_state
    rngs = {"router": rng, "dropout": jax.random.fold_in(rng, 1)} if rng is not None else None
    if moe_state and train:
        (logits, aux), updates = model.apply(variables, inputs, train=True, rngs=rngs, mutable=[MOE_STATE])
        return logits, aux, updates[MOE_STATE]
    logits, aux = model.apply(variables, inputs, train=train, rngs=rngs)
    return logits, aux, moe_state


def cross_entropy(logits: Array, targets: Array) -> Array:
    """Mean next-token cross-entropy (nats) of ``logits[B, L, V]`` against ``targets[B, L]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_train_step(model: Transformer, tx: optax.GradientTransformation, schedule: Callable) -> Callable:
    """``train_step(state, batch[B, L+1] int32, rng) -> (state, metrics)``: pure, jit it once outside.

    ``rng`` is the run's base key; the step folds in ``state.step``. ``metrics`` (device arrays): ``loss``,
    ``ce``, ``aux_loss``, ``grad_norm``, ``lr`` and ``moe`` (``{'losses', 'metrics'}`` stacked per MoE layer).
    """

    def train_step(state: TrainState, batch: Array, rng: Array, axis_name: Optional[str] = None):
        inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, L]
        step_rng = jax.random.fold_in(rng, state.step)

        def loss_fn(params):
            logits, aux, moe_state = _apply(model, params, state.moe_state, inputs, step_rng, train=True)
            ce = cross_entropy(logits, targets)
            return ce + aux["aux_loss"], (ce, aux, moe_state)

        (loss, (ce, aux, moe_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        if axis_name is not None:  # pmap data parallelism (parallel.pmap_train_step): average over devices
            grads, loss, ce, aux, moe_state = jax.lax.pmean((grads, loss, ce, aux, moe_state), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "ce": ce, "aux_loss": aux["aux_loss"], "grad_norm": optax.global_norm(grads),
                   "lr": schedule(state.step), "moe": {"losses": aux["losses"], "metrics": aux["metrics"]}}
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, moe_state=moe_state)
        return new_state, metrics

    return train_step


def make_eval_step(model: Transformer) -> Callable:
    """``eval_step(state, batch[B, L+1]) -> {'ce': mean cross-entropy}`` (deterministic, eval capacity)."""

    def eval_step(state: TrainState, batch: Array):
        logits, _, _ = _apply(model, state.params, state.moe_state, batch[:, :-1], None, train=False)
        return {"ce": cross_entropy(logits, batch[:, 1:])}

    return eval_step


# ------------------------------------------------------------------------------------- metrics output


def _json_step(line: str) -> float:
    """The step of one metrics.jsonl line; a line cut by a kill -9 counts as infinitely late (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsWriter:
    """JSON lines (``metrics.jsonl``) and TensorBoard events; both cut back to ``start_step`` on resume."""

    def __init__(self, workdir: str, start_step: int):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.enabled = jax.process_index() == 0  # multi-host: only the first process writes
        if not self.enabled:
            return
        if os.path.exists(self.path):  # drop what a killed run logged after its last checkpoint
            with open(self.path) as f:
                kept = [line for line in f if _json_step(line) <= start_step]
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)  # atomic: a kill now leaves the old or the new file
        self._file = open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self._tb = None

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is None:
            return
        step, split = record["step"], record["split"]
        for key, value in record.items():
            if key in ("step", "split"):
                continue
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"{split}/{key}", value, step)
            elif isinstance(value, list) and key.startswith("moe/"):  # [layers] or [layers][E]
                for layer, v in enumerate(value):
                    if isinstance(v, list):
                        if len(v) <= 16:
                            for e, ve in enumerate(v):
                                self._tb.add_scalar(f"{split}/{key}/layer{layer}/e{e}", ve, step)
                    else:
                        self._tb.add_scalar(f"{split}/{key}/layer{layer}", v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _log(msg: str) -> None:
    """One line to stdout, flushed (stdout redirected to a file is block-buffered), clear of the tqdm bar."""
    import sys

    from tqdm import tqdm
    tqdm.write(msg)
    sys.stdout.flush()


def _duration(seconds: float) -> str:
    """``'1h02m'``, ``'3m05s'`` or ``'12s'``."""
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_line(step: int, steps: int, loss: Optional[float], tokens_per_s: Optional[float],
                  elapsed_s: float, eta_s: Optional[float]) -> str:
    """``progress: step 120/2000 (6%), loss 3.412, 1180 tokens/s, elapsed 1m40s, ETA 26m30s``."""
    parts = [f"progress: step {step}/{steps} ({100 * step // max(steps, 1)}%)"]
    if loss is not None:
        parts.append(f"loss {loss:.3f}")
    if tokens_per_s:
        parts.append(f"{tokens_per_s:.0f} tokens/s")
    parts.append(f"elapsed {_duration(elapsed_s)}")
    if eta_s is not None:
        parts.append(f"ETA {_duration(eta_s)}")
    return ", ".join(parts)


def _summarize_window(window: List[Tuple[int, Dict[str, Any]]]) -> Dict[str, Any]:
    """Host-side mean over the steps of one log window; raises on the first non-finite loss/grad norm."""
    for step, m in window:
        for key in ("loss", "grad_norm"):
            value = float(m[key])
            if not math.isfinite(value):
                raise TrainingDivergedError(f"non-finite {key} ({value}) at step {step}")
    mean = lambda xs: np.mean(np.stack([np.asarray(x, np.float64) for x in xs]), axis=0)
    out = {key: float(mean([m[key] for _, m in window])) for key in ("loss", "ce", "aux_loss", "grad_norm")}
    out["lr"] = float(window[-1][1]["lr"])
    for group in ("losses", "metrics"):
        for key in window[0][1]["moe"][group]:
            out[f"moe/{key}"] = mean([m["moe"][group][key] for _, m in window]).tolist()  # per MoE layer
    if "moe/drop_fraction" in out:  # scalar summaries over the MoE layers (compare.py reads these)
        out["drop_fraction"] = float(np.mean(out["moe/drop_fraction"]))
        out["max_vio"] = float(np.mean(out["moe/max_vio"]))
        out["expert_load"] = out["moe/expert_load"]  # [layers][E]
    return out


# ------------------------------------------------------------------------------------------ checkpoints


def check_workdir(workdir: str) -> str:
    """Absolute ``workdir``, created; a clear error if it cannot be created or written."""
    path = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"workdir {path!r} is not writable ({e.strerror or e}); pass a --workdir you can "
                              "create and write to.") from e
    return path


def _checkpoint_manager(workdir: str, keep: int):
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)  # leftovers of interrupted saves
    return ocp.CheckpointManager(os.path.join(workdir, CKPT_DIR), options=options)


def _save(mngr, state: TrainState, data_state: Dict[str, Any], resolved: Dict[str, Any], meta: Dict[str, Any]
          ) -> int:
    import orbax.checkpoint as ocp
    step = int(jax.device_get(state.step))
    if step in mngr.all_steps():
        return step
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                            config=ocp.args.JsonSave(resolved), meta=ocp.args.JsonSave(meta)),
              force=True)
    mngr.wait_until_finished()
    return step


def restore_latest(mngr, abstract_state, move_aside: bool = True, requested: Optional[Dict[str, Any]] = None,
                   broken: Optional[List[str]] = None
                   ) -> Optional[Tuple[TrainState, Dict[str, Any], Dict[str, Any], Dict[str, Any]]]:
    """``(state, data_state, resolved_config, meta)`` of the newest checkpoint that loads, or None.

    Orbax writes a step into a temporary directory and renames it when complete, and lists only complete
    steps, so an interrupted save is invisible here. Each step's own stored config is read first: if
    ``requested`` (a config as a dict) differs from it in a field a checkpoint cannot follow
    (``resume_changes``), ``WorkdirConflictError`` is raised and nothing is moved. A step that fails to load
    (under its own config) is broken: one warning line, it is moved aside (``<step>.broken-<time>``; only
    skipped if ``move_aside=False``), its new path appended to ``broken``, and the previous one is tried.
    """
    import orbax.checkpoint as ocp
    _quiet_abandoned_reads()
    workdir = os.path.dirname(str(mngr.directory))
    for step in sorted(mngr.all_steps(), reverse=True):
        own = None
        try:
            own = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception:  # noqa: BLE001 - an unreadable config means a broken step (handled below)
            pass
        if own is not None and requested is not None:
            refused, _ = resume_changes(own.get("config", {}), requested)
            if refused:
                raise WorkdirConflictError(_conflict_message(workdir, refused, f"checkpoint step {step}"))
        try:
            if own is None:
                raise ValueError("its stored config does not read")
            out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=ocp.args.JsonRestore(),
                                                             config=ocp.args.JsonRestore(),
                                                             meta=ocp.args.JsonRestore()))
            return out["state"], out["data"], out["config"], out["meta"]
        except Exception as e:  # noqa: BLE001 - any failure to load means: try the previous step
            path = os.path.join(str(mngr.directory), str(step))
            aside = f"{path}.broken-{int(time.time())}"
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:160]  # one line
            _log(f"WARNING: checkpoint step {step} does not load ({reason}); "
                 + (f"moved it to {aside}; " if move_aside else "") + "trying the previous one.")
            if move_aside and os.path.isdir(path):
                shutil.move(path, aside)  # else the next save of this step would collide with it
                mngr.reload()
                if broken is not None:
                    broken.append(aside)
    return None


_QUIET_HOOK_INSTALLED = False


def _quiet_abandoned_reads() -> None:
    """Silence the late ``RuntimeError: Event loop is closed`` of reads a failed restore abandoned.

    When one array of a checkpoint fails to read, orbax's restore coroutine raises at once and orbax closes
    its event loop (``asyncio_utils.run_sync``); the other TensorStore reads of the same restore are still in
    flight, and when each completes, TensorStore's done-callback calls ``loop.call_soon_threadsafe`` on the
    closed loop. That ``RuntimeError`` is raised in a TensorStore thread and reported through
    ``sys.unraisablehook`` (a traceback per abandoned read, dozens per broken checkpoint) although nothing
    is wrong any more. This hook drops exactly those reports and passes every other one on.
    """
    global _QUIET_HOOK_INSTALLED
    import sys
    if _QUIET_HOOK_INSTALLED:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook

    # The same abandoned reads, when one fails after the restore gave up (a truncated file), end as an asyncio
    # task whose exception nobody retrieves; asyncio logs it with a traceback at garbage collection. Drop those
    # (a TensorStore read error, reported already by the checkpoint's warning line); keep every other record.
    import logging

    def drop_abandoned_read(record):
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage().startswith("Task exception was never retrieved")
                    and exc is not None and "tensorstore_spec" in str(exc))

    logging.getLogger("asyncio").addFilter(drop_abandoned_read)
    _QUIET_HOOK_INSTALLED = True


# ---------------------------------------------------------------------------------------- resume safety


class WorkdirConflictError(ValueError):
    """The workdir holds a run whose config a checkpoint of it cannot continue as (the message names the
    fields and the two ways out)."""


# Fields a resumed run may change: they are read anew each run and shape no saved state (the learning-rate
# schedule is a function of the step; the mesh only places the restored arrays; init is used only without a
# checkpoint). Every other field (model, data, tokenizer, corpus, seed, optimizer structure) is refused.
RESUMABLE_FIELDS = (
    "train.steps", "train.learning_rate", "train.warmup_steps", "train.end_lr_ratio", "train.weight_decay",
    "train.log_every", "train.eval_every", "train.eval_batches", "train.ckpt_every", "train.keep_ckpts",
    "train.sample_tokens", "train.sample_prompt", "train.debug_step_delay_s", "train.progress_every_s",
    "data.cache_dir", "mesh.", "init.",
)
_ABSENT = object()


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):  # an empty section adds no field
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(stored: Dict[str, Any], requested: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    """``(refused, applied)``: the fields in which ``requested`` differs from a run's ``stored`` config, each
    as ``'name: old -> new'``. ``applied``: ``RESUMABLE_FIELDS`` and fields only one side has (added to or
    removed from the code since the run started); ``refused``: the rest."""
    a, b = _flat(stored), _flat(requested)
    refused, applied = [], []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if old == new:
            continue
        show = lambda v: "(absent)" if v is _ABSENT else repr(v)
        line = f"{key} {show(old)} -> {show(new)}"
        resumable = any(key == f or (f.endswith(".") and key.startswith(f)) for f in RESUMABLE_FIELDS)
        (applied if resumable or _ABSENT in (old, new) else refused).append(line)
    return refused, applied


def _conflict_message(workdir: str, refused: List[str], where: str = "config.json") -> str:
    return (f"--workdir {workdir} holds a run ({where}) whose config differs in fields its checkpoints cannot "
            f"follow: {', '.join(refused)}. Use a new --workdir, or pass --restart to move that run aside to "
            f"{workdir}.old-<n> (kept, not deleted) and start over.")


RUN_FILES = (CKPT_DIR, METRICS_FILE, "config.json", "summary.json", "sample.txt", "tb", "init_report.json")


def move_run_aside(workdir: str) -> Optional[str]:
    """Move the run files of ``workdir`` (``RUN_FILES``, ``metrics.jsonl.*``) into a new sibling folder
    ``<workdir>.old-<n>`` (n = 1, 2, ...) and return its path; None if there was no run. Deletes nothing."""
    names = [n for n in sorted(os.listdir(workdir)) if n in RUN_FILES or n.startswith(METRICS_FILE + ".")]
    if not names:
        return None
    n = 1
    while os.path.exists(f"{workdir}.old-{n}"):
        n += 1
    aside = f"{workdir}.old-{n}"
    os.makedirs(aside)
    for name in names:
        shutil.move(os.path.join(workdir, name), os.path.join(aside, name))
    return aside


def check_resume(workdir: str, requested: Dict[str, Any]) -> List[str]:
    """The applicable changes (``resume_changes``) of ``requested`` against ``workdir/config.json``;
    ``WorkdirConflictError`` if any change is refused. ``[]`` for a workdir without a stored config."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            stored = json.load(f)["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # unreadable: each checkpoint's own stored config is checked in restore_latest
    refused, applied = resume_changes(stored, requested)
    if refused:
        raise WorkdirConflictError(_conflict_message(workdir, refused))
    return applied


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def resolved_config(config, vocab_size: int) -> Dict[str, Any]:
    return {"config": json.loads(config.to_json_best_effort()), "vocab_size": int(vocab_size)}


def load_checkpoint(workdir: str, step: Optional[int] = None):
    """``(config, model, variables, tokenizer, step)`` from a run directory (for sampling and analysis)."""
    from moe_jax import data as data_lib
    workdir = os.path.abspath(workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        resolved = json.load(f)
    config = ml_collections.ConfigDict(resolved["config"])
    token_data = data_lib.prepare_data(config.data, cache_dir=config.data.get("cache_dir") or None)
    model_cfg = validate_config(config, token_data.tokenizer.vocab_size)
    model = Transformer(model_cfg)
    tx, _ = make_optimizer(config.train)
    abstract = jax.eval_shape(lambda: create_state(model, tx, jax.random.key(0), int(config.data.seq_len)))
    abstract = parallel.restore_target(abstract, None)  # onto one device, whatever mesh saved it
    mngr = _checkpoint_manager(workdir, int(config.train.keep_ckpts))
    if step is None:
        restored = restore_latest(mngr, abstract, move_aside=False)
        if restored is None:
            raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, CKPT_DIR)}; train first.")
        state = restored[0]
    else:
        import orbax.checkpoint as ocp
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    variables = {"params": state.params}
    if state.moe_state:
        variables[MOE_STATE] = state.moe_state
    return config, model, variables, token_data.tokenizer, int(state.step)


def sample_text(model, variables, tokenizer, config, prompt: str, num_tokens: int, seed: int = 0,
                temperature: float = 0.8, top_k: Optional[int] = 40) -> str:
    """Decode ``num_tokens`` sampled tokens after ``prompt`` (an empty prompt starts from a newline) with the
    key/value cache of ``moe_jax.decode``."""
    from moe_jax import decode
    sampling = decode.Sampling(temperature=temperature, top_k=min(top_k or 0, model.config.vocab_size))
    return decode.sample_text(model, variables, tokenizer, prompt or "\n", num_tokens, seed, sampling)[0]


# ----------------------------------------------------------------------------------------------- loop


def train(config: ml_collections.ConfigDict, workdir: str, restart: bool = False) -> Dict[str, Any]:
    """Train (or resume) a language model as ``config`` says, in ``workdir``; return a summary dict.

    A workdir that holds a run of a config its checkpoints cannot follow (``resume_changes``) is refused
    (``WorkdirConflictError``) before anything in it changes; ``restart=True`` first moves that run aside
    (``move_run_aside``) and starts over. Changes that can apply (steps, cadences, the schedule) are applied
    and logged in one line.

    Summary keys: ``workdir``, ``step``, ``resumed_from`` (None for a fresh run), ``train_loss``,
    ``train_ce``, ``val_loss``, ``val_ppl``, ``tokens_per_s`` (mean over the run's log windows, compile
    excluded), ``total_params``, ``active_params``, ``train_flops_per_token``, ``wall_s``, ``sample``.
    """
    from tqdm import tqdm

    from moe_jax import data as data_lib

    t_start = time.time()
    workdir = check_workdir(workdir)  # a bad workdir fails before any expensive work
    # Multi-host: before any other JAX call (validation already asks for the backend).
    parallel.initialize_distributed(bool((config.get("mesh") or {}).get("distributed", False)))
    early = validate_config(config)
    parallel.validate_mesh_config(config.get("mesh"), batch_size=int(config.data.batch_size),
                                  num_experts=early.moe.num_experts if early.moe is not None else None)
    tr = config.train
    seq_len, batch_size, seed = int(config.data.seq_len), int(config.data.batch_size), int(config.get("seed", 0))
    requested = json.loads(config.to_json_best_effort())
    if restart:
        aside = move_run_aside(workdir) if jax.process_index() == 0 else None
        if aside:
            _log(f"--restart: moved the previous run in {workdir} to {aside}; starting from step 0")
    check_resume(workdir, requested)  # before anything in the workdir changes

    token_data = data_lib.prepare_data(config.data, cache_dir=config.data.get("cache_dir") or None)
    vocab_size = int(token_data.tokenizer.vocab_size)
    model_cfg = validate_config(config, vocab_size)
    model = Transformer(model_cfg)
    counts = count_model(model_cfg, seq_len)
    _log(f"model: {model_cfg.num_layers} blocks, MoE blocks {list(model_cfg.moe_blocks)}, vocab {vocab_size}; "
         + counts.summary())
    resolved = resolved_config(config, vocab_size)

    tx, schedule = make_optimizer(tr)
    rng = jax.random.key(seed)
    init_rng, step_rng = jax.random.split(rng)
    # The one place where the steps are jitted (shardings for a mesh go here).
    # (parallel.make_runner: jit with NamedShardings over config.mesh, or pmap with config.mesh.pmap)
    runner = parallel.make_runner(config.get("mesh"), lambda key: create_state(model, tx, key, seq_len),
                                  make_train_step(model, tx, schedule), make_eval_step(model), batch_size=batch_size,
                                  num_experts=model_cfg.moe.num_experts if model_cfg.moe is not None else None)
    _log(f"parallelism: {runner.describe()}")
    init_fn, train_step, eval_step, host = runner.init, runner.train_step, runner.eval_step, runner.host_state

    mngr = _checkpoint_manager(workdir, int(tr.keep_ckpts))
    broken: List[str] = []
    restored = restore_latest(mngr, runner.abstract_state(init_rng), requested=requested, broken=broken)
    if restored is None and broken:
        kept = os.path.join(workdir, METRICS_FILE)
        if os.path.exists(kept):  # its lines describe the unreadable run: keep them next to it
            os.replace(kept, f"{kept}.broken-{int(time.time())}")
        _log(f"WARNING: no checkpoint in {os.path.join(workdir, CKPT_DIR)} loads; moved the unreadable ones to "
             f"{', '.join(broken)}; starting from step 0.")
    batches = data_lib.BatchIterator(token_data.train, batch_size, seq_len, seed)
    initial = None
    flops0 = 0.0  # training FLOPs before `start` (a converted run: those of its source run)
    if restored is None:
        resumed_from, elapsed0, t_init = None, 0.0, time.time()
        importance_data = lambda n: [data_lib.BatchIterator(token_data.train, batch_size, seq_len, seed + 1).batch_at(i)
                                     for i in range(n)]
        state = init_fn(init_rng)
        converted = initial_state(config, model, tx, host(state), importance_data)  # config.init.from_dir
        if converted is not None:
            state, initial = converted
            state = runner.place(jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), state,
                                              runner.abstract_state(init_rng)))
            if initial.data_state:
                try:
                    batches.restore(initial.data_state)
                except ValueError as e:
                    raise ValueError(f"config.init.from_dir: {e} Or set init.restart_step=True.") from None
            elapsed0, flops0 = initial.meta["elapsed_s"] + time.time() - t_init, initial.meta["flops"]
            from moe_jax.upcycle import write_report
            write_report(workdir, initial)
            _log(f"initialised from {initial.report['from_dir']} step {initial.report['source_step']} "
                 f"({initial.report['method']}) at step {initial.step}")
    else:
        state, data_state, old, meta = restored
        state = runner.place(state)
        elapsed0 = float(meta.get("elapsed_s", 0.0))
        flops0 = float(meta["flops"]) if "flops" in meta else None
        batches.restore(data_state)
        resumed_from = int(jax.device_get(host(state).step))
        _, changed = resume_changes(old.get("config", {}), resolved["config"])
        _log(f"resuming from step {resumed_from}" + (f"; applying the changed {', '.join(changed)}" if changed
                                                      else ""))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(resolved, f, indent=2)
    start = int(jax.device_get(host(state).step))
    val_batches = data_lib.eval_batches(token_data.val, batch_size, seq_len, int(tr.eval_batches))
    writer = MetricsWriter(workdir, start)
    steps, log_every, eval_every, ckpt_every = int(tr.steps), int(tr.log_every), int(tr.eval_every), int(tr.ckpt_every)
    delay = float(tr.get("debug_step_delay_s", 0.0))
    tokens_per_step = batch_size * seq_len
    last_ckpt = max(mngr.all_steps(), default=None)
    t_run = time.time()
    # x-axes of the comparison plots: wall time of this run (plus that of the runs it resumes) and FLOPs.
    if flops0 is None:  # a checkpoint without a clock: count every step with this model
        flops0 = float(start) * tokens_per_step * counts.train_flops_per_token
    clock = lambda step: {"elapsed_s": elapsed0 + time.time() - t_run,
                          "flops": flops0 + float(step - start) * tokens_per_step * counts.train_flops_per_token}

    def evaluate(state, batches=val_batches) -> Dict[str, float]:
        ces = [eval_step(state, b)["ce"] for b in batches]
        ce = float(np.mean(jax.device_get(ces))) if ces else float("nan")
        return {"loss": ce, "ppl": float(math.exp(min(ce, 50.0)))}

    window: List[Tuple[int, Any]] = []
    last_train: Dict[str, Any] = {}
    last_val: Dict[str, float] = {}
    last_val_step = None
    throughput: List[float] = []
    if initial is not None and start < steps:  # a converted model, before its first update
        init_val = evaluate(state)
        writer.write({"step": start, "split": "val", **init_val, **clock(start)})
        _log(f"step {start} (converted): val loss {init_val['loss']:.4f} ppl {init_val['ppl']:.2f}")
    t_window, n_window = time.time(), 0
    bar = tqdm(total=steps, initial=start, disable=None, dynamic_ncols=True, desc="train")
    # Not a terminal (a file, CI, nohup, SLURM): no bar, but a progress line every progress_every_s seconds.
    progress_every = float(tr.get("progress_every_s", 0.0)) if bar.disable else 0.0
    t_progress, t_timed, n_timed = time.time(), None, 0  # t_timed: end of the first (compiling) step
    try:
        for step in range(start + 1, steps + 1):  # `step` = number of updates done after this iteration
            state, metrics = train_step(state, next(batches), step_rng)
            window.append((step, metrics))
            n_window += 1
            if step == start + 1:  # exclude the compile from the throughput
                jax.block_until_ready(metrics["loss"])
                _log(f"first step (compile included): {time.time() - t_window:.1f}s")
                t_window, n_window = time.time(), 0
                t_timed = t_window
            else:
                n_timed += 1
            if delay:
                time.sleep(delay)
            bar.update(1)
            is_log, is_eval = step % log_every == 0 or step == steps, eval_every and step % eval_every == 0
            is_ckpt = (ckpt_every and step % ckpt_every == 0) or step == steps
            if (is_log or is_ckpt) and window:
                try:
                    summary = _summarize_window(jax.device_get(window))
                except TrainingDivergedError as e:
                    raise TrainingDivergedError(
                        f"{e}: stopping. The last good checkpoint "
                        f"({'step ' + str(last_ckpt) if last_ckpt is not None else 'none yet'}) in "
                        f"{os.path.join(workdir, CKPT_DIR)} is kept; lower train.learning_rate, raise "
                        "train.warmup_steps or set train.grad_clip.") from None
                elapsed = time.time() - t_window
                if n_window and elapsed > 0:
                    summary["tokens_per_s"] = n_window * tokens_per_step / elapsed
                    throughput.append(summary["tokens_per_s"])
                window, last_train = [], summary
                writer.write({"step": step, "split": "train", **summary, **clock(step)})
                bar.set_postfix(loss=f"{summary['loss']:.3f}", tok_s=f"{summary.get('tokens_per_s', 0):.0f}")
            if is_eval:
                last_val, last_val_step = evaluate(state), step
                writer.write({"step": step, "split": "val", **last_val, **clock(step)})
                _log(f"step {step}: val loss {last_val['loss']:.4f} ppl {last_val['ppl']:.2f}")
            if is_ckpt:
                last_ckpt = _save(mngr, host(state), batches.state(), resolved, clock(step))
            if is_log or is_ckpt or is_eval:
                t_window, n_window = time.time(), 0
            if progress_every and time.time() - t_progress >= progress_every:
                t_progress = time.time()
                rate = n_timed / (t_progress - t_timed) if n_timed and t_timed and t_progress > t_timed else None
                _log(progress_line(step, steps, last_train.get("loss"), rate and rate * tokens_per_step,
                                   t_progress - t_start, (steps - step) / rate if rate else None))
        if last_val_step != steps:  # the last step was no eval step, or the run was already complete
            last_val = evaluate(state)
            if start < steps:
                writer.write({"step": steps, "split": "val", **last_val, **clock(steps)})
    finally:
        bar.close()
        writer.close()
    test = {}
    if token_data.test.size:  # the held-out test split (data.test_split): once, at the end, never for choices
        test_batches = data_lib.eval_batches(token_data.test, batch_size, seq_len,
                                             int(tr.get("test_batches", 64)))
        test = {"test_loss": evaluate(state, test_batches)["loss"], "test_batches": len(test_batches)}
    state = host(state)
    variables = {"params": state.params, **({MOE_STATE: state.moe_state} if state.moe_state else {})}
    sample = ""
    if int(tr.sample_tokens):
        sample = sample_text(model, variables, token_data.tokenizer, config, tr.get("sample_prompt", ""),
                             int(tr.sample_tokens), seed=seed)
        with open(os.path.join(workdir, "sample.txt"), "w") as f:
            f.write(sample)
        _log(f"sample:\n{sample}")
    result = {
        "workdir": workdir, "step": int(jax.device_get(state.step)), "resumed_from": resumed_from,
        "train_loss": last_train.get("loss"), "train_ce": last_train.get("ce"),
        "val_loss": last_val.get("loss"), "val_ppl": last_val.get("ppl"), **test,
        "tokens_per_s": float(np.mean(throughput)) if throughput else None,
        "total_params": counts.total_params, "active_params": counts.active_params,
        "embedding_params": counts.embedding_params, "train_tokens": int(token_data.train.size),
        "train_flops_per_token": counts.train_flops_per_token, "flops_per_token": counts.train_flops_per_token,
        "wall_s": time.time() - t_start, "sample": sample,
    }
    summary_path = os.path.join(workdir, "summary.json")
    if os.path.exists(summary_path):  # a rerun of a finished run trains nothing: keep what the run measured
        with open(summary_path) as f:
            previous = json.load(f)
        result.update({k: v for k, v in previous.items() if result.get(k) is None and k != "resumed_from"})
    with open(summary_path, "w") as f:
        json.dump(result, f, indent=2)
    _log(f"done: step {result['step']}, val loss {result['val_loss']:.4f}, "
         f"tokens/s {result['tokens_per_s'] or float('nan'):.0f}, wall {result['wall_s']:.1f}s")
    return result

