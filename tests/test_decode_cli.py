"""experiments/sample.py, experiments/evaluate.py and moe_jax/evaluation.py on a tiny trained run (2 steps of the
tiny switch model of test_train.py), and bench_decode's table on a tiny model. CLI errors: exit 2, one line."""
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import decode, evaluation
from moe_jax import data as data_lib
from moe_jax import train as train_lib
from test_train import ROOT, SUBPROCESS_ENV, tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decode_run")
    config = tiny_config(tmp, **{"train.steps": 2, "train.warmup_steps": 1, "train.ckpt_every": 0,
                                 "train.keep_ckpts": 1, "train.eval_batches": 1})
    train_lib.train(config, str(tmp / "run"))
    return tmp / "run"


def _cli(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), *args], cwd=ROOT,
                          env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)


def test_sample_cli_decodes_and_reports_speed(run_dir):
    out = _cli("sample.py", f"--workdir={run_dir}", "--prompt=to be", "--num_tokens=5", "--sampling=greedy",
               "--batch=2")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().split("\n")
    assert lines[0].startswith("[step 2] to be") and lines[0] == lines[1]  # greedy: both rows alike
    assert lines[-1].startswith("decode: 2 x 5 tokens, max_len 10,") and "tokens/s" in lines[-1]
    # the library path gives the same text
    _, model, variables, tokenizer, _ = decode.load_for_decoding(str(run_dir))
    text, _ = decode.sample_text(model, variables, tokenizer, "to be", 5, sampling=decode.Sampling(0.0))
    assert lines[0] == f"[step 2] to be{text}"


def test_cli_errors_are_one_line(run_dir, tmp_path):
    empty, untrained, other_vocab = tmp_path / "empty", tmp_path / "untrained", tmp_path / "vocab"
    empty.mkdir()
    untrained.mkdir()
    shutil.copy(run_dir / "config.json", untrained / "config.json")
    shutil.copytree(run_dir, other_vocab)
    resolved = json.loads((other_vocab / "config.json").read_text())
    resolved["vocab_size"] = 300  # as if trained with another tokenizer: the bytes tokenizer has 256 ids
    (other_vocab / "config.json").write_text(json.dumps(resolved))
    cases = [
        (["sample.py", f"--workdir={empty}"], "is missing or empty"),
        (["sample.py", f"--workdir={untrained}"], "has no checkpoint yet"),
        (["sample.py", f"--workdir={run_dir}", "--prompt=to be or not", "--max_len=8"],
         "max_len=8: a prompt holds 12 tokens, longer than max_len"),
        (["sample.py", f"--workdir={run_dir}", "--prompt="], "prompt: empty"),
        (["sample.py", f"--workdir={run_dir}", "--sampling=top_q=0.9"], "sampling: unknown option 'top_q=0.9'"),
        (["sample.py", f"--workdir={other_vocab}"], "vocab_size: the checkpoint's model has 300 tokens"),
        (["evaluate.py", f"--workdir={untrained}"], "has no checkpoint yet"),
    ]
    for args, message in cases:
        out = _cli(*args)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        err = out.stderr.strip().split("\n")
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (args, err)


def test_evaluate_matches_eval_step_and_by_hand(run_dir):
    config, model, variables, tokenizer, _ = decode.load_for_decoding(str(run_dir))
    val = data_lib.prepare_data(config.data, cache_dir=config.data.cache_dir).val
    lens = evaluation.token_byte_lengths(tokenizer)
    res = evaluation.evaluate(model, variables, val, lens, 8, 32, max_batches=2)
    batches = data_lib.eval_batches(val, 8, 32, 2)
    state = train_lib.TrainState(step=0, params=variables["params"], opt_state=None, moe_state={})
    eval_step = jax.jit(train_lib.make_eval_step(model))
    ces = [float(eval_step(state, jnp.asarray(b))["ce"]) for b in batches]
    assert res["tokens"] == 2 * 8 * 32 and res["bytes"] == res["tokens"]  # bytes tokenizer: 1 byte per token
    assert res["loss"] == pytest.approx(np.mean(ces), rel=1e-5)  # equal-sized batches: mean of means
    assert res["bits_per_byte"] == pytest.approx(res["loss"] / math.log(2), rel=1e-9)
    assert res["ppl"] == pytest.approx(math.exp(res["loss"]))
    assert res["moe_blocks"] == [1] and np.asarray(res["expert_load"]).shape == (1, 4)
    np.testing.assert_allclose(np.sum(res["expert_load"], axis=1), 1.0, rtol=1e-5)
    assert 0.0 <= res["drop_fraction"][0] <= 1.0
    # the CLI on a user's file: the numbers of the library call
    text = tokenizer.decode(val[: 3 * 33])
    path = run_dir.parent / "held.txt"
    path.write_text(text)
    out = _cli("evaluate.py", f"--workdir={run_dir}", f"--file={path}", "--batch_size=3", "--seq_len=32",
               f"--output={run_dir.parent / 'e.json'}")
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads((run_dir.parent / "e.json").read_text())
    want = evaluation.evaluate(model, variables, tokenizer.encode(text), lens, 3, 32)
    assert got["tokens"] == 96 and got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert "| block | drop fraction | expert load |" in out.stdout


def test_bpe_byte_lengths():
    class Fake:  # SentencePiece pieces: a byte piece, a word with the space marker, a plain piece
        vocab_size = 3
        id_to_piece = staticmethod(lambda i: ["<0x0A>", "\u2581th\u00e9", "ab"][i])
    np.testing.assert_array_equal(evaluation.token_byte_lengths(Fake()), [1, 1 + 2 + 2, 2])  # é: 2 bytes


def test_bench_decode_table(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import bench_decode
    out = tmp_path / "b.md"
    rows = bench_decode.main(["--size", "tiny", "--num_new", "3", "--prompt_len", "2", "--repeats", "1",
                              "--models", "switch_top1", "--out", str(out)])
    assert [r["model"] for r in rows] == ["switch_top1"]
    table = out.read_text().strip().split("\n")
    assert table[0].startswith("Command: `python experiments/bench_decode.py --size tiny")
    assert table[4].startswith("| model | total params |") and len(table) == 7
    for r, line in zip(rows, table[6:]):
        assert line.startswith(f"| {r['model']} (`configs/") and line.endswith(f"| {r['speedup']:.1f}x |")
        assert r["speedup"] == pytest.approx(r["cached_tokens_per_s"] / r["uncached_tokens_per_s"])
    assert json.loads((tmp_path / "b.json").read_text())["rows"][0]["model"] == "switch_top1"
