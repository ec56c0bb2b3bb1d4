"""The README's commands in the order written.

* Static: every config file they name exists (with its size), and every folder a command reads (--from,
  --reuse) is the --workdir of an earlier command, or (--reuse) a study published in the checkout (a
  ``docs/results/<study>/`` folder with its ``runs/`` records).
* Run: every ``python ...`` command of the README's ``bash`` blocks, in order, in a fresh folder that holds
  the checkout's ``experiments/``, ``configs/``, ``moe_jax/`` and ``docs/`` (links), a small corpus (``my_texts/``,
  ``my_text.txt``) and a tiny transformers model for ``path/to/hf_model_dir``, each with tiny overrides
  appended (a 2-layer D=32 model, 2 steps, byte tokens, one seed, one learning rate, two models of a study).
  The installs and the test command itself are skipped. A README change that breaks a command, its order or
  its flags fails here.
"""
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
from test_readme_corpus import _words  # deterministic pseudo-random text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("   #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if "experiments/" in part:
                    out.append(shlex.split(part))
    return out


def _flag(argv, name):
    for i, a in enumerate(argv):
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def test_readme_commands_name_existing_configs_and_earlier_workdirs():
    commands = _commands()
    assert len(commands) >= 8
    made = set()
    for argv in commands:
        script = next(a for a in argv if a.startswith("experiments/"))
        assert os.path.isfile(os.path.join(ROOT, script)), script
        config = _flag(argv, "config")
        if config:
            path, _, size = config.partition(":")
            spec = importlib.util.spec_from_file_location("readme_cfg", os.path.join(ROOT, path))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.get_config(size or None)  # the size exists
        source, reuse = _flag(argv, "from"), _flag(argv, "reuse")
        assert source is None or source in made, f"{' '.join(argv)} reads {source}, which no earlier command creates"
        assert reuse is None or reuse in made or os.path.isdir(os.path.join(ROOT, reuse, "runs")), (
            f"{' '.join(argv)} reuses {reuse}, neither an earlier command's workdir nor a published study with runs/")
        if _flag(argv, "workdir"):
            made.add(_flag(argv, "workdir"))


def _runnable_commands():
    """``(env, argv)`` of each README command that runs a script (``python ...``, possibly after ``VAR=value``
    words), in order; pip installs and the test command are left out."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("   #")[0].split("  #")[0].strip()
            for part in line.split("&&"):
                words = shlex.split(part)
                env = {}
                while words and re.match(r"^[A-Z_]+=", words[0]):
                    k, v = words.pop(0).split("=", 1)
                    env[k] = v
                if words[:1] == ["python"] and "pytest" not in words:
                    out.append((env, words))
    return out


TRAIN_TINY = dict(
    data=dict(corpus="my_texts/", tokenizer="bytes", vocab_size=256, seq_len=16, batch_size=8),
    model=dict(d_model=32, num_layers=2, num_heads=2, d_ff=64),
    train=dict(steps=2, warmup_steps=1, log_every=1, eval_every=2, eval_batches=1, ckpt_every=2, sample_tokens=0,
               test_batches=1),
)


def _overrides(prefix, moe_hidden=64):
    flags = [f"--{prefix}{group}.{k}={v}" for group, fields in TRAIN_TINY.items() for k, v in fields.items()]
    return flags + [f"--{prefix}model.moe.expert_hidden={moe_hidden}"]


def _load_config(path_spec):
    path, _, size = path_spec.partition(":")
    spec = importlib.util.spec_from_file_location("readme_cfg", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(size or None)


def _tiny_args(argv, tmp):
    """The tiny overrides appended to one README command (the command's own flags stay as written)."""
    script = os.path.basename(argv[1])
    if script in ("train.py", "upcycle.py"):
        return _overrides("config.")
    if script == "compare.py":
        cfg = _load_config(_flag(argv, "config"))
        extra = _overrides("config.base.") + ["--config.seeds=0", "--config.base.data.test_split=True"]
        if cfg.get("lr_search", False):
            extra.append("--config.lr_grid=3e-3")
        extra.append("--config.order=" + ",".join(list(cfg.order)[:2]))
        return extra
    if script == "sample.py":
        return ["--num_tokens=4"]
    if script == "evaluate.py":
        return ["--max_batches=1"]
    if script == "bench_layer.py":
        return ["--experts=8", "--k=1", "--repeats=1", "--dispatchers=einsum"]
    if script == "bench_decode.py":
        return ["--size=tiny", "--num_new=4", "--repeats=1", "--models=switch_top1", f"--out={tmp}/bench_decode.md"]
    return []


def _tiny_hf_model(path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    config = transformers.AutoConfig.for_model(
        "mixtral", vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        tie_word_embeddings=True)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)


def test_readme_commands_run_in_order(tmp_path):
    commands = _runnable_commands()
    scripts = [os.path.basename(argv[1]) for _, argv in commands]
    assert scripts[0] == "compare.py" and {"train.py", "sample.py", "evaluate.py", "upcycle.py", "convert.py",
                                            "bench_decode.py", "bench_layer.py"} <= set(scripts)
    for name in ("experiments", "configs", "moe_jax", "docs"):  # docs/: published studies for --reuse
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    (tmp_path / "my_texts").mkdir()
    for i in range(10):  # 10 files: train / validation / test splits of whole files
        (tmp_path / "my_texts" / f"part{i}.txt").write_text(_words(400, seed=i))
    (tmp_path / "my_text.txt").write_text(_words(200, seed=99))
    hf_dir = tmp_path / "path" / "to" / "hf_model_dir"
    _tiny_hf_model(str(hf_dir))
    # one compilation cache for all commands: the same tiny model recurs (train, --restart, sample, evaluate)
    env = dict(os.environ, MOE_JAX_CACHE=str(tmp_path / "cache"), PYTHONPATH=ROOT, MOE_JAX_VERBOSE="1",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    fast = "--xla_backend_optimization_level=0"  # compiles ~3x faster (tests/conftest.py); one CPU device
    env["XLA_FLAGS"] = fast
    times = []
    for cmd_env, argv in commands:
        if any(a.startswith("--config.mesh.") for a in argv):  # a mesh for accelerators: 8 CPU devices stand in
            cmd_env = dict(cmd_env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
        if "XLA_FLAGS" in cmd_env:
            cmd_env = dict(cmd_env, XLA_FLAGS=f"{cmd_env['XLA_FLAGS']} {fast}")
        # absolute scratch paths of the README (/tmp/hf_export) go into this test's folder
        args = [str(tmp_path) + a if a.startswith("/tmp/") else a for a in argv[1:]]
        tiny = _tiny_args(argv, tmp_path)
        names = {t.split("=", 1)[0] for t in tiny}  # a README flag that a tiny override sets is replaced
        cmd = [sys.executable] + [a for a in args if a.split("=", 1)[0] not in names] + tiny
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=tmp_path, env=dict(env, **cmd_env), capture_output=True, text=True,
                              timeout=600)
        shown = " ".join(argv)
        times.append((round(time.time() - t0, 1), shown))
        assert proc.returncode == 0, (f"README command failed: {shown}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
                                      f"\ntimes so far: {times}")
        workdir, script = _flag(argv, "workdir"), os.path.basename(argv[1])
        if script == "train.py":
            with open(tmp_path / workdir / "summary.json") as f:
                assert json.load(f)["step"] == 2, shown
        elif script == "upcycle.py":  # the converted checkpoint at step 0, for train.py to continue
            assert os.listdir(tmp_path / workdir / "checkpoints") and (tmp_path / workdir / "init_report.json").exists()
        elif script == "compare.py":
            assert (tmp_path / workdir / "results.md").stat().st_size > 0, shown
            assert "trust:" in proc.stdout or not _load_config(_flag(argv, "config")).get("lr_search"), shown
        elif script == "sample.py":
            assert "tokens/s" in proc.stdout + proc.stderr, shown
        elif script == "convert.py" and _flag(argv, "to_hf"):
            assert os.path.exists(os.path.join(_flag(cmd, "to_hf"), "config.json")), shown
        if "--restart" in argv:
            assert (tmp_path / f"{workdir}.old-1" / "summary.json").exists(), shown
    print("\n".join(f"{t:6.1f} s  {c}" for t, c in times))
