"""The bad-input table of docs/errors.md: each mistake, run in-process, and the one-line message it gets.

    python experiments/bad_inputs.py            # rewrite docs/errors.md
    python experiments/bad_inputs.py --check    # exit 1 if docs/errors.md is out of date (tests/test_bad_inputs.py)

Command-line mistakes (flag typos, a missing --config file) are in the table's second part, checked by
tests/test_user_errors.py in a subprocess. Paths in messages are shown relative to a scratch folder ``<tmp>``.
"""
import os
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

DOC = os.path.join(_ROOT, "docs", "errors.md")

CONFIG_CASES = [  # (field, bad value) on configs/switch_top1.py:tiny, checked by train.validate_config
    ("seed", -1), ("data.tokenizer", "words"), ("data.seq_len", 1), ("data.batch_size", 0),
    ("train.steps", 0), ("train.learning_rate", 0.0), ("train.warmup_steps", 500), ("train.end_lr_ratio", 2.0),
    ("train.weight_decay", -1.0), ("train.grad_clip", -1.0), ("train.log_every", 0), ("train.eval_every", -1),
    ("train.eval_batches", 0), ("train.ckpt_every", -1), ("train.keep_ckpts", 0), ("train.sample_tokens", -1),
    ("train.progress_every_s", -1.0), ("model.num_heads", 3), ("model.activation", "tanh"),
    ("model.dropout", 1.0), ("model.moe.k", 0), ("model.moe.k", 2), ("model.moe.num_experts", 0),
    ("model.moe.group_size", 128), ("model.moe.capacity_factor", 0.0), ("model.moe.dispatcher", "magic"),
    ("model.moe.router", "nope"), ("model.moe.slot_order", "random"),
]


def _set(c, field, value):
    *path, last = field.split(".")
    node = c
    for p in path:
        node = node[p]
    node[last] = value


def _message(fn) -> str:
    from moe_jax.cli import one_line
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is what the table shows
        return one_line(str(e))
    return "(no error)"


def cases(tmp: str):
    """``[(area, input, message)]``, each message with ``tmp`` shown as ``<tmp>``."""
    from configs import compare_headline, compare_quick, compare_scaling, switch_top1
    from moe_jax import compare, data, train

    out = []
    for field, value in CONFIG_CASES:
        c = switch_top1.get_config("tiny")
        _set(c, field, value)
        out.append(("config", f"--config.{field}={value!r}", _message(lambda: train.validate_config(c))))
    empty = os.path.join(tmp, "empty")
    os.makedirs(empty, exist_ok=True)
    for corpus in (os.path.join(tmp, "no_such.txt"), os.path.join(tmp, "*.nothing"), empty):
        out.append(("data", f"--config.data.corpus={corpus!r}", _message(lambda: data._list_files(corpus))))
    bpe = _with(switch_top1.get_config("tiny"), "data.tokenizer", "bpe", "data.vocab_size", 1)
    out.append(("config", "--config.data.tokenizer='bpe' --config.data.vocab_size=1",
                _message(lambda: train.validate_config(bpe))))
    stored = {"config": switch_top1.get_config("tiny").to_dict()}
    run = os.path.join(tmp, "run")
    os.makedirs(run, exist_ok=True)
    import json
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(stored, f)
    changed = switch_top1.get_config("tiny")
    changed.model.moe.num_experts = 16
    out.append(("train.py resume", "rerun of a workdir with --config.model.moe.num_experts=16",
                _message(lambda: train.check_resume(run, json.loads(changed.to_json_best_effort())))))
    cmp = compare_quick.get_config("mini")
    out.append(("compare.py", f"--reuse={os.path.join(tmp, 'missing')}",
                _message(lambda: compare.run_comparison(cmp, os.path.join(tmp, "cmp"), train_missing=False,
                                                        reuse=[os.path.join(tmp, "missing")], log=lambda *a: None))))
    out.append(("compare.py", "--only=nosuchmodel:0",
                _message(lambda: compare.run_comparison(cmp, os.path.join(tmp, "cmp"), train_missing=False,
                                                        only=["nosuchmodel:0"], log=lambda *a: None))))
    head = compare_headline.get_config("mini")
    out.append(("compare.py", "--only=dense:0:3e-3 (a rate outside lr_grid)",
                _message(lambda: compare.run_comparison(head, os.path.join(tmp, "cmp"), train_missing=False,
                                                        only=["dense:0:3e-3"], log=lambda *a: None))))
    scaling = compare_scaling.get_config()
    scaling.lr_grids.moe_d32 = (0.0, 1e-2)
    out.append(("compare.py", "--config.lr_grids.moe_d32=0,1e-2 (configs/compare_scaling.py)",
                _message(lambda: compare.lr_grids(scaling, ["moe_d32"]))))
    scaling = compare_scaling.get_config()
    scaling.lr_grids.moe_d23 = (1e-2,)
    out.append(("compare.py", "a config's lr_grids names moe_d23, not a model",
                _message(lambda: compare.lr_grids(scaling, ["moe_d32"]))))
    head.order = ("dense", "swich_top1_e8")
    out.append(("compare.py", "--config.order=dense,swich_top1_e8",
                _message(lambda: compare.model_configs(head))))
    return [(a, i.replace(tmp, "<tmp>"), m.replace(tmp, "<tmp>")) for a, i, m in out]


def _with(c, *pairs):
    for field, value in zip(pairs[::2], pairs[1::2]):
        _set(c, field, value)
    return c


CLI_ROWS = [  # checked by tests/test_user_errors.py (subprocess, exit code 2 or 1)
    ("train.py", "--config.train.stpes=2", "2", "error: --config.train.stpes: the config has no field 'stpes' (did you "
     "mean --config.train.steps?); the fields and their defaults are in configs/base.py."),
    ("train.py", "--config=configs/no_such.py:tiny", "2", "error: --config=configs/no_such.py:tiny: no such config file "
     "(looked at '<repo>/configs/no_such.py'). Pass a file of configs/, e.g. --config=configs/switch_top1.py:tiny."),
    ("train.py", "--config=configs/switch_top1.py:huge", "2", "error: flag --config=configs/switch_top1.py:huge: the "
     "config file failed to load: ValueError: config size 'huge': choose one of ['mini', 'small', 'tiny'] ..."),
    ("train.py", "--config.train.steps=abc", "2", "error: flag --config.train.steps=abc: invalid literal for int() "
     "with base 10: 'abc'. Run with --helpfull for the flags."),
    ("train.py", "(no --workdir)", "2", "error: flag --workdir=None: Flag --workdir must have a value other than "
     "None. Run with --helpfull for the flags."),
]


def render(rows) -> str:
    lines = ["# Bad inputs and their messages", "",
             "Generated by `python experiments/bad_inputs.py` (tests/test_bad_inputs.py checks it is current). Every "
             "mistake is one `error: ...` line on stderr: exit code 2 for the command line (before anything is "
             "imported or compiled), 1 for the rest. `MOE_JAX_VERBOSE=1` shows the full traceback instead. A "
             "rerun with a changed model or data shape is refused; `--restart` moves the old run to "
             "`<workdir>.old-<n>` (kept) and starts over.", "",
             "## Config, data, resume, comparisons (checked in-process)", "",
             "| # | where | input | message (after `error: `) |", "| --- | --- | --- | --- |"]
    esc = lambda t: str(t).replace("|", "\\|")
    for i, (area, inp, msg) in enumerate(rows, 1):
        lines.append(f"| {i} | {area} | `{esc(inp)}` | {esc(msg)} |")
    lines += ["", "## Command line (checked by tests/test_user_errors.py)", "",
              "| where | input | exit | output |", "| --- | --- | --- | --- |"]
    for area, inp, code, msg in CLI_ROWS:
        lines.append(f"| {area} | `{esc(inp)}` | {code} | {esc(msg)} |")
    return "\n".join(lines) + "\n"


def generate() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return render(cases(tmp))


def main(argv):
    text = generate()
    if "--check" in argv:
        with open(DOC) as f:
            ok = f.read() == text
        print("docs/errors.md is " + ("up to date" if ok else "out of date: run python experiments/bad_inputs.py"))
        return 0 if ok else 1
    with open(DOC, "w") as f:
        f.write(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
