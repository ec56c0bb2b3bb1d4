"""A rerun never destroys a run: a changed shape is refused with the workdir untouched, --restart keeps the old
run aside, a truncated checkpoint costs one warning line and no traceback, all truncated says it starts over;
with stdout not a terminal, progress lines. One CLI workdir, runs in sequence (each pays import + compile)."""
import hashlib
import os
import re
import subprocess

import pytest

from moe_jax import train as train_lib
from test_train import ROOT, SUBPROCESS_ENV, SWITCH_TINY, TINY, _cli, _corpus, _records


def _tree_hash(path) -> dict:
    """{relative path: sha256} of every file under ``path``."""
    out = {}
    for dirpath, _, names in os.walk(path):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _truncate(work, step):
    """Cut every array chunk of checkpoint ``step`` to 10 bytes (what a full disk or a bad copy leaves)."""
    for dirpath, _, names in os.walk(work / "checkpoints" / str(step) / "state"):
        for n in names:
            if os.path.basename(dirpath) == "d":
                with open(os.path.join(dirpath, n), "r+b") as f:
                    f.truncate(10)


def _run(work, overrides, *extra):
    out = subprocess.run(_cli(work, SWITCH_TINY, overrides) + list(extra), cwd=ROOT, env=SUBPROCESS_ENV,
                         capture_output=True, text=True, timeout=300)
    return out.returncode, out.stdout + out.stderr


def test_rerun_refuses_changed_shape_recovers_from_truncation_and_restart_keeps_old_run(tmp_path):
    work = tmp_path / "run"
    base = {**TINY, "data.corpus": _corpus(tmp_path), "data.cache_dir": str(tmp_path / "cache"),
            "train.steps": 16, "train.keep_ckpts": 3}

    # 1. A run with stdout to a pipe (no terminal): a progress line per step (progress_every_s tiny).
    rc, log = _run(work, {**base, "train.progress_every_s": 1e-9})
    assert rc == 0, log[-3000:]
    progress = re.findall(r"^progress: step (\d+)/16 \(\d+%\).*elapsed \S+", log, re.M)
    assert progress[-1] == "16" and len(progress) >= 8, log[-3000:]
    assert re.search(r"^progress: step 16/16 \(100%\), loss \d+\.\d{3}, \d+ tokens/s, elapsed \S+, ETA 0s$", log,
                     re.M), log[-3000:]
    assert sorted(int(p) for p in os.listdir(work / "checkpoints")) == [8, 16]

    # 2. The same workdir with another model shape: refused in one line naming both fields; nothing changed.
    before = _tree_hash(work)
    rc, log = _run(work, {**base, "model.moe.num_experts": 8, "data.seq_len": 16})
    assert rc == 1, log[-3000:]
    lines = log.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in log, log
    assert re.fullmatch(rf"error: --workdir {re.escape(str(work))} holds a run \(config\.json\) whose config differs "
                        r"in fields its checkpoints cannot follow: data\.seq_len 32 -> 16, model\.moe\.num_experts "
                        r"4 -> 8\. Use a new --workdir, or pass --restart .*", lines[0]), lines[0]
    assert _tree_hash(work) == before

    # 3. The latest checkpoint truncated, and more steps asked for (a change that applies): resumes from the
    # previous one with one warning line and no traceback (none from orbax's abandoned reads either).
    _truncate(work, 16)
    rc, log = _run(work, {**base, "train.steps": 24})
    assert rc == 0, log[-3000:]
    assert "Traceback" not in log and "Event loop is closed" not in log, log[-3000:]
    warnings = [ln for ln in log.splitlines() if "WARNING" in ln or "warning" in ln]
    assert len(warnings) <= 3 and len(warnings) >= 1, warnings
    assert re.search(r"WARNING: checkpoint step 16 does not load \(.*\); moved it to .*/checkpoints/16\.broken-\d+; "
                     "trying the previous one\.", log), log[-3000:]
    assert re.search(r"resuming from step 8; applying the changed .*train\.steps 16 -> 24", log), log[-3000:]
    assert [r["step"] for r in _records(work)] == list(range(1, 25))

    # 4. Every checkpoint truncated: one line per checkpoint, then one saying where they went and that the run
    # starts from step 0; the old metrics are kept next to them.
    for step in (8, 16, 24):
        _truncate(work, step)
    rc, log = _run(work, {**base, "train.steps": 4, "train.warmup_steps": 1, "train.ckpt_every": 4})
    assert rc == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    m = re.search(r"^WARNING: no checkpoint in (\S+) loads; moved the unreadable ones to (.*); starting from "
                  r"step 0\.$", log, re.M)
    assert m and m.group(1) == str(work / "checkpoints"), log[-3000:]
    moved = m.group(2).split(", ")
    assert [os.path.basename(p).split(".")[0] for p in moved] == ["24", "16", "8"] and all(map(os.path.isdir, moved))
    assert [r["step"] for r in _records(work)] == [1, 2, 3, 4]
    assert any(n.startswith("metrics.jsonl.broken-") for n in os.listdir(work))

    # 5. --restart with the changed shape: the old run is moved aside whole (byte-identical) and a new one trains.
    before = _tree_hash(work)
    rc, log = _run(work, {**base, "model.moe.num_experts": 8, "train.steps": 2, "train.warmup_steps": 1},
                   "--restart")
    assert rc == 0, log[-3000:]
    aside = f"{work}.old-1"
    assert f"--restart: moved the previous run in {work} to {aside}; starting from step 0" in log
    assert _tree_hash(aside) == before
    assert [r["step"] for r in _records(work)] == [1, 2]
    assert train_lib.load_checkpoint(str(work))[1].config.moe.num_experts == 8


@pytest.mark.parametrize("stored, requested, refused, applied", [
    ({"train": {"steps": 10, "lr": 1}}, {"train": {"steps": 20, "lr": 1}}, [], ["train.steps 10 -> 20"]),
    ({"model": {"d_model": 8}}, {"model": {"d_model": 16}}, ["model.d_model 8 -> 16"], []),
    ({"data": {"corpus": "a"}, "mesh": {"data": -1}}, {"data": {"corpus": "b"}, "mesh": {"data": 2}},
     ["data.corpus 'a' -> 'b'"], ["mesh.data -1 -> 2"]),
    ({"train": {}}, {"train": {"progress_every_s": 30.0}}, [], ["train.progress_every_s (absent) -> 30.0"]),
])
def test_resume_changes_classifies_fields(stored, requested, refused, applied):
    assert train_lib.resume_changes(stored, requested) == (refused, applied)


def test_move_run_aside_moves_only_run_files(tmp_path):
    work = tmp_path / "w"
    (work / "checkpoints" / "8").mkdir(parents=True)
    (work / "metrics.jsonl").write_text("{}\n")
    (work / "notes.txt").write_text("mine")
    (tmp_path / "w.old-1").mkdir()  # taken: the next free number is used
    aside = train_lib.move_run_aside(str(work))
    assert aside == f"{work}.old-2"
    assert sorted(os.listdir(aside)) == ["checkpoints", "metrics.jsonl"] and os.listdir(work) == ["notes.txt"]
    assert train_lib.move_run_aside(str(work)) is None  # nothing left to move
