"""The trainer: schedule, weight-decay mask, config validation, learning, kill -9 and resume, interrupted saves,
NaN stop, workdir errors. Subprocess runs of experiments/train.py are few and tiny (each pays import + compile)."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moe_jax import train as train_lib
from moe_jax.model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import base as config_base  # noqa: E402
from configs import switch_top1  # noqa: E402

# Tiny switch model on bytes; fields set here are also passed as --config.* flags to the subprocess runs.
TINY = {
    "data.seq_len": 32, "data.batch_size": 8,  # 8: the default mesh spreads the batch over conftest's 8 devices
    "model.d_model": 32, "model.d_ff": 64, "model.moe.expert_hidden": 32, "model.moe.num_experts": 4,
    "train.steps": 24, "train.warmup_steps": 4, "train.log_every": 1, "train.eval_every": 0,
    "train.eval_batches": 2, "train.ckpt_every": 8, "train.keep_ckpts": 2, "train.sample_tokens": 0,
}


def _corpus(tmp_path) -> str:
    rng = np.random.default_rng(0)
    words = "to be or not to be that is the question whether tis nobler in the mind".split()
    text = "\n".join(" ".join(rng.choice(words, 10)) for _ in range(300))  # ~15 kB, 10% held out
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return str(path)


def tiny_config(tmp_path, **overrides) -> ml_collections.ConfigDict:
    c = switch_top1.get_config("tiny")
    for key, value in {**TINY, "data.corpus": _corpus(tmp_path), "data.cache_dir": str(tmp_path / "cache"),
                       **overrides}.items():
        *path, last = key.split(".")
        node = c
        for p in path:
            node = node[p]
        node[last] = value
    return c


def _records(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


# -------------------------------------------------------------------------------------- pure pieces


def test_lr_schedule_by_hand():
    s = train_lib.lr_schedule(1.0, steps=10, warmup_steps=2, end_lr_ratio=0.1)
    # warmup: (count + 1) / 2; then cosine over the 8 remaining updates from 1.0 to 0.1
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 6: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)), 10: 0.1, 50: 0.1}
    for count, lr in expected.items():
        assert float(s(count)) == pytest.approx(lr, rel=1e-6), count
    assert float(train_lib.lr_schedule(2.0, 10, 0, 0.0)(0)) == pytest.approx(2.0)  # no warmup: full lr


def test_weight_decay_mask():
    cfg = train_lib.validate_config(switch_top1.get_config("tiny"))
    shapes = jax.eval_shape(lambda: Transformer(cfg).init({"params": jax.random.key(0)},
                                                          jnp.zeros((1, 8), jnp.int32)))["params"]
    mask = train_lib.weight_decay_mask(shapes)
    assert mask["embed"]["embedding"] is False and mask["final_norm"]["scale"] is False
    assert mask["block_0"]["attn_norm"]["scale"] is False
    assert mask["block_0"]["attn"]["query"]["kernel"] is True and mask["block_0"]["ffn"]["wi"] is True
    assert mask["block_1"]["moe"]["experts"]["wi"] is True and mask["block_1"]["moe"]["router"]["gate"]["kernel"]


@pytest.mark.parametrize("field, value, match", [
    ("data.tokenizer", "words", r"config\.data\.tokenizer: unknown 'words'"),
    ("data.seq_len", 1, r"config\.data\.seq_len"),
    ("train.warmup_steps", 500, r"config\.train\.warmup_steps: must be between 0 and train\.steps=200"),
    ("train.end_lr_ratio", 2.0, r"config\.train\.end_lr_ratio"),
    ("train.learning_rate", 0.0, r"config\.train\.learning_rate"),
    ("train.log_every", 0, r"config\.train\.log_every"),
    ("model.num_heads", 3, r"model\.num_heads=3 does not divide model\.d_model=64"),
    ("model.moe.k", 2, r"model\.moe: .*Switch is top-1"),
    ("model.moe.group_size", 48, r"config\.model\.moe\.group_size: 48 does not divide"),
])
def test_invalid_config_errors(field, value, match):
    c = switch_top1.get_config("tiny")
    section, *rest = field.split(".")
    node = c[section]
    for p in rest[:-1]:
        node = node[p]
    node[rest[-1]] = value
    with pytest.raises(ValueError, match=match):
        train_lib.validate_config(c)


def test_all_configs_validate():
    import importlib
    for name in ("dense", "switch_top1", "gshard_top2", "mixtral_top2", "expert_choice"):
        mod = importlib.import_module(f"configs.{name}")
        for size in (None, "mini", "tiny"):
            cfg = train_lib.validate_config(mod.get_config(size))
            assert (cfg.moe is None) == (name == "dense")
    # Every model of every comparison study builds a valid training config at every size.
    from moe_jax import compare
    for name in ("quick", "headline", "experts", "capacity", "balance", "routers", "sweep", "lr"):
        mod = importlib.import_module(f"configs.compare_{name}")
        for size in (None, "mini"):
            cmp_cfg = mod.get_config(size)
            for run_cfg in compare.model_configs(cmp_cfg).values():
                train_lib.validate_config(run_cfg)
            if size == "mini" and cmp_cfg.results_dir:
                assert cmp_cfg.results_dir.endswith("_mini")  # a CPU-sized study never overwrites the full one
    with pytest.raises(ValueError, match="config size 'huge'"):
        config_base.make_config("huge")


def test_unwritable_workdir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match=r"workdir .*a_file/run.* is not writable"):
        train_lib.train(tiny_config(tmp_path), str(blocker / "run"))
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="is not writable"):
            train_lib.check_workdir(str(ro))


# ------------------------------------------------------------------------------------------- learning


def test_loss_decreases_on_repeated_text_and_moe_state_is_carried():
    """The jitted train step on one repeated sentence with a DeepSeek-routed MoE (its balancing bias lives in
    'moe_state'): the cross-entropy falls from ~ln(256) below 1, and the bias moves and is carried between
    steps in the train state."""
    c = switch_top1.get_config("tiny")
    c.train.update(dict(steps=40, warmup_steps=5, learning_rate=1e-2))
    c.model.moe.update(dict(router="deepseek", k=2, slot_order="token_major", bias_update_rate=1e-2,
                            lb_loss_coef=0.0))
    cfg = train_lib.validate_config(c)
    model = Transformer(cfg)
    tx, schedule = train_lib.make_optimizer(c.train)
    state = jax.jit(lambda k: train_lib.create_state(model, tx, k, 32))(jax.random.key(0))
    bias = lambda st: np.asarray(st.moe_state["block_1"]["moe"]["router"]["expert_bias"])
    np.testing.assert_array_equal(bias(state), np.zeros(8))
    step = jax.jit(train_lib.make_train_step(model, tx, schedule))
    text = np.frombuffer(b"to be or not to be, that is the question. " * 8, np.uint8).astype(np.int32)
    batch = np.stack([text[i: i + 33] for i in range(0, 16, 4)])  # [4, 33]
    ces, biases = [], []
    for _ in range(40):
        state, m = step(state, batch, jax.random.key(1))
        ces.append(float(m["ce"]))
        biases.append(bias(state))
    assert ces[0] == pytest.approx(math.log(256), abs=0.3)
    assert ces[-1] < 1.0 and ces[-1] < ces[0] / 4, ces
    # each step moves every bias entry by exactly +-gamma or 0 (sign of the load imbalance), and it accumulates
    steps = np.diff(np.stack([np.zeros(8)] + biases), axis=0)
    assert np.allclose(np.abs(steps)[np.abs(steps) > 0], 1e-2) and np.abs(biases[-1]).max() > 1.5e-2
    assert float(m["aux_loss"]) > 0 and m["moe"]["metrics"]["expert_load"].shape == (1, 8)
    assert int(state.step) == 40


# --------------------------------------------------------------------------------- kill -9 and resume


# Subprocess runs: one CPU device and no LLVM optimisation (a third of the compile time; both runs of a
# comparison use the same flags, so results stay exactly comparable).
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
                  "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"}
SWITCH_TINY = os.path.join(ROOT, "configs", "switch_top1.py") + ":tiny"


def _cli(workdir, config_path, overrides):
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "train.py"), f"--config={config_path}",
           f"--workdir={workdir}"]
    return cmd + [f"--config.{k}={v}" for k, v in overrides.items()]


def test_kill9_resume_matches_uninterrupted_run(tmp_path):
    """kill -9 a CLI run a few steps after a checkpoint; the same command resumes from that checkpoint and
    logs, for every step the killed (so far uninterrupted) run had logged past it, exactly the same losses,
    then finishes. A leftover temporary directory of an interrupted save and a half-written metrics line are
    ignored. TensorBoard events are written."""
    work = tmp_path / "killed"
    overrides = {**TINY, "data.corpus": _corpus(tmp_path), "data.cache_dir": str(tmp_path / "cache")}
    config_path, env = SWITCH_TINY, SUBPROCESS_ENV
    proc = subprocess.Popen(_cli(work, config_path, {**overrides, "train.debug_step_delay_s": 0.2}), cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpts = lambda: sorted(int(p) for p in os.listdir(work / "checkpoints") if p.isdigit())
    deadline = time.time() + 150
    try:
        while time.time() < deadline and proc.poll() is None:  # wait for a checkpoint and 3 steps past it
            if (work / "metrics.jsonl").exists() and (work / "checkpoints").is_dir() and ckpts() and max(
                    (r["step"] for r in _records(work)), default=0) >= ckpts()[-1] + 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    last = ckpts()[-1]
    before = _records(work)  # steps 1 .. >= last + 3 of the uninterrupted run
    assert last in (8, 16) and before[-1]["step"] < 24, (last, before[-1]["step"])
    with open(work / "metrics.jsonl", "a") as f:  # a line cut by the kill
        f.write('{"step": 99, "split": "tr')
    # an interrupted save of the next checkpoint: a temporary directory with partial content
    partial = work / "checkpoints" / f"{last + 8}.orbax-checkpoint-tmp"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_bytes(b"\0" * 100)

    out = subprocess.run(_cli(work, config_path, overrides), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"resuming from step {last}" in out.stdout + out.stderr
    after = _records(work)
    assert [r["step"] for r in after] == list(range(1, 25))  # cut back to the checkpoint, then logged once each
    redone = [r for r in before if r["step"] > last]
    assert len(redone) >= 3
    for a, b in zip(redone, after[last:]):
        assert a["step"] == b["step"]
        for key in ("loss", "ce", "aux_loss", "grad_norm", "lr", "moe/expert_load"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])  # exact on CPU
    assert after[-1]["loss"] < after[0]["loss"] - 1.0
    val = _records(work, "val")
    assert [r["step"] for r in val] == [24] and math.isfinite(val[0]["loss"])
    assert sorted(ckpts()) == [16, 24]  # keep_ckpts=2
    assert any(p.startswith("events.out.tfevents") for p in os.listdir(work / "tb"))
    # experiments/sample.py's path: the latest checkpoint, then a few sampled tokens
    cfg, model, variables, tokenizer, step = train_lib.load_checkpoint(str(work))
    assert step == 24 and cfg.data.seq_len == 32
    text = train_lib.sample_text(model, variables, tokenizer, cfg, "to be", 6, temperature=0.0)
    assert text == train_lib.sample_text(model, variables, tokenizer, cfg, "to be", 6, temperature=0.0)
    assert 1 <= len(text) <= 6


# ------------------------------------------------------------------------------------ divergence


def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path):
    """lr=1e30 without warmup: step 1 (initial params) is finite and its update makes params ~1e30, so the
    products in step 2 overflow: the CLI stops with exit code 1 naming step 2, and checkpoint 1 stays the
    latest (finite) one."""
    work = tmp_path / "nan"
    overrides = {**TINY, "data.corpus": _corpus(tmp_path), "data.cache_dir": str(tmp_path / "cache"),
                 "train.learning_rate": 1e30, "train.warmup_steps": 0, "train.ckpt_every": 1,
                 "train.grad_clip": 0.0, "train.steps": 6}
    out = subprocess.run(_cli(work, SWITCH_TINY, overrides), cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    assert re.search(r"error: non-finite (loss|grad_norm) \((nan|inf)\) at step 2: stopping\. The last good "
                     r"checkpoint \(step 1\) in .* is kept", out.stderr), out.stderr[-3000:]
    assert sorted(int(p) for p in os.listdir(work / "checkpoints") if p.isdigit()) == [1]
    assert [r["step"] for r in _records(work)] == [1] and math.isfinite(_records(work)[0]["loss"])

    # the kept checkpoint restores; a complete-looking but broken newer step is moved aside and skipped
    (work / "checkpoints" / "5").mkdir()
    with open(work / "config.json") as f:
        cfg = ml_collections.ConfigDict(json.load(f)["config"])
    model_cfg = train_lib.validate_config(cfg, 256)
    tx, _ = train_lib.make_optimizer(cfg.train)
    abstract = jax.eval_shape(lambda: train_lib.create_state(Transformer(model_cfg), tx, jax.random.key(0), 32))
    state, data_state, resolved, _ = train_lib.restore_latest(train_lib._checkpoint_manager(str(work), 2), abstract)
    assert int(state.step) == 1 and data_state["step"] == 1 and resolved["vocab_size"] == 256
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    assert not (work / "checkpoints" / "5").exists() and any(p.startswith("5.broken") for p in
                                                             os.listdir(work / "checkpoints"))
