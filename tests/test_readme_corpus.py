"""The README's "Your own corpus" section, followed as a user would, and ``python -m moe_jax.data``'s defaults.

The training command is parsed from README.md itself, so a change to the README that breaks it breaks this test.
It runs in a temporary folder that holds ``my_texts/`` (a few small .txt files), with the cache in
``$MOE_JAX_CACHE`` pointed at a temporary folder, for a few steps instead of the config's 200.
"""
import json
import math
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_section(title):
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def _words(n, seed):
    """n pseudo-random words (deterministic), as lines of 12 words."""
    vocab = ["the", "king", "sea", "of", "light", "and", "a", "ship", "to", "night", "we", "sing", "old"]
    out, x = [], seed
    for i in range(n):
        x = (x * 1103515245 + 12345) % 2 ** 31
        out.append(vocab[x % len(vocab)] + ("\n" if i % 12 == 11 else " "))
    return "".join(out)


def test_readme_corpus_section_trains_on_a_folder_of_txt_files(tmp_path):
    section = _readme_section("Your own corpus")
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the corpus section should show one command"
    argv = shlex.split(blocks[0])
    assert argv[:2] == ["python", "experiments/train.py"]
    corpus = next(a.split("=", 1)[1] for a in argv if a.startswith("--config.data.corpus="))
    workdir = argv[argv.index("--workdir") + 1]
    # the section promises a folder of .txt files, recursively, and a cache in $MOE_JAX_CACHE
    for needle in ("a folder", "`*.txt`", "recursively", "glob", "MOE_JAX_CACHE", "~/.cache/moe_jax", "20%",
                   "10%", "90%"):
        assert needle in section, needle

    folder = tmp_path / corpus
    (folder / "more").mkdir(parents=True)
    for i in range(4):  # ~4 x 2.9k characters: held-out files of <= 20% leave >= 1 eval batch of 8 x 65 bytes
        (folder / f"part{i}.txt").write_text(_words(500, seed=i))
    (folder / "more" / "part4.txt").write_text(_words(500, seed=4))
    (folder / "notes.md").write_text("not a .txt file: left out of a folder corpus\n")
    cache = tmp_path / "cache"

    cmd = [sys.executable, os.path.join(ROOT, argv[1])]
    for a in argv[2:]:  # configs/... relative to the checkout, everything else as written
        cmd.append(os.path.join(ROOT, a) if a.startswith("configs/") else a)
    # a few steps instead of the config's 200 (the README's command otherwise unchanged)
    cmd += ["--config.train.steps=3", "--config.train.warmup_steps=1", "--config.train.log_every=1",
            "--config.train.eval_every=0", "--config.train.eval_batches=1", "--config.train.ckpt_every=0",
            "--config.train.sample_tokens=0"]
    env = dict(os.environ, MOE_JAX_CACHE=str(cache), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    lines = [json.loads(line) for line in open(tmp_path / workdir / "metrics.jsonl")]
    train_steps = [r["step"] for r in lines if r.get("split") == "train"]
    val = [r for r in lines if r.get("split") == "val"]
    assert max(train_steps) == 3
    assert val and val[-1]["step"] == 3 and math.isfinite(val[-1]["loss"]), val  # validation at the end
    # the token ids went to the cache named by MOE_JAX_CACHE, not to ~/.cache
    assert any(p.name == "train.u16" for p in (cache / "tokens").rglob("*")), list(cache.rglob("*"))


def test_data_command_line_defaults_equal_the_configs():
    from configs import base
    from moe_jax import data

    defaults = vars(data.cli_parser().parse_args([]))
    cfg = base.base_config().data
    for field in ("corpus", "tokenizer", "vocab_size", "cache_dir"):
        assert defaults[field] == cfg[field], (field, defaults[field], cfg[field])
    # and the sizes that train a BPE use the same vocabulary
    for size, spec in base.SIZES.items():
        if spec["data"]["tokenizer"] == "bpe":
            assert spec["data"]["vocab_size"] == defaults["vocab_size"], size


def test_data_command_line_runs_on_a_folder(tmp_path, capsys, monkeypatch):
    from moe_jax import data

    for i in range(3):
        (tmp_path / f"t{i}.txt").write_text(_words(300, seed=10 + i))
    monkeypatch.setenv("MOE_JAX_CACHE", str(tmp_path / "cache"))
    data.main(["--corpus", str(tmp_path), "--tokenizer", "bytes"])
    out = json.loads(capsys.readouterr().out)
    assert out["train_works"] + len(out["val_works"]) == 3 and len(out["val_works"]) == 1
    assert out["vocab_size"] == 256 and out["train_tokens"] == out["train_bytes"]
