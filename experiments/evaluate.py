"""Score a checkpoint: loss, perplexity and bits per byte on the built-in held-out (validation) split or on a
text file, with each MoE layer's expert load and drop fraction at the eval capacity (moe_jax/evaluation.py).

    python experiments/evaluate.py --workdir runs/switch_tiny
    python experiments/evaluate.py --workdir runs/switch_tiny --file my_text.txt --max_batches 0

Prints a Markdown table and writes it with the numbers as JSON to --output (default
<workdir>/eval_<val|file name>.json). Bad input ends with one line naming the field and exit code 2.
"""
import json
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from absl import app, flags, logging  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by experiments/train.py.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_FILE = flags.DEFINE_string("file", None, "A UTF-8 text file to score (default: the run's validation split).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Windows per batch (default: the run's data.batch_size).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Scored tokens per window (default: the run's data.seq_len).")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 0, "At most this many batches (0 = the whole text).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON output path (default: in the workdir).")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from moe_jax import data as data_lib
    from moe_jax import decode, evaluation

    try:
        for name, flag in (("batch_size", _BATCH), ("seq_len", _SEQ_LEN)):
            if flag.value is not None and flag.value < 1:
                raise ValueError(f"{name} must be >= 1, got {flag.value}.")
        if _MAX_BATCHES.value < 0:
            raise ValueError(f"max_batches must be >= 0 (0 = all), got {_MAX_BATCHES.value}.")
        if _FILE.value is not None and not os.path.isfile(_FILE.value):
            raise FileNotFoundError(f"file: {_FILE.value!r} is not a file; pass a UTF-8 text file.")
        config, model, variables, tokenizer, step = decode.load_for_decoding(_WORKDIR.value, _STEP.value)
        if _FILE.value is None:
            tokens = data_lib.prepare_data(config.data, cache_dir=config.data.get("cache_dir") or None).val
            source = "val"
        else:
            try:
                with open(_FILE.value, encoding="utf-8-sig") as f:
                    tokens = tokenizer.encode(f.read())
            except UnicodeDecodeError as e:
                raise ValueError(f"file: {_FILE.value!r} is not UTF-8 text ({e.reason}).") from None
            source = os.path.basename(_FILE.value)
        result = evaluation.evaluate(model, variables, tokens, evaluation.token_byte_lengths(tokenizer),
                                     _BATCH.value or int(config.data.batch_size),
                                     _SEQ_LEN.value or int(config.data.seq_len), _MAX_BATCHES.value or None)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    result.update({"workdir": os.path.abspath(_WORKDIR.value), "step": step, "source": source})
    table = evaluation.format_table(result)
    out = _OUTPUT.value or os.path.join(_WORKDIR.value, f"eval_{source}.json")
    with open(out, "w") as f:
        json.dump({**result, "table": table}, f, indent=1)
    print(f"[step {step}] {source}: {result['batches']} batches of {result['batch_size']} x {result['seq_len']}")
    print(table)
    print(f"written: {out}")


if __name__ == "__main__":
    app.run(main)
