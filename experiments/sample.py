"""Sample text from the latest checkpoint of a run directory, with a key/value cache (moe_jax/decode.py).

    python experiments/sample.py --workdir /tmp/switch_tiny --prompt "ROMEO:" --num_tokens 200
    python experiments/sample.py --workdir /tmp/switch_tiny --prompt "ROMEO:" --sampling greedy
    python experiments/sample.py --workdir /tmp/switch_tiny --sampling "temperature=0.9,top_p=0.95" --batch 4

The decode loop compiles once per (batch, max_len) and sampling setting; the last line reports the decode
speed (prefill + steps, compile excluded). Bad input (no checkpoint, empty prompt, prompt longer than
--max_len, unknown sampling option, a checkpoint of another vocabulary) ends with one line naming the field
and exit code 2.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)

from absl import app, flags, logging  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by experiments/train.py.")
_PROMPT = flags.DEFINE_string("prompt", "\n", "Text to continue (at least one token).")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 200, "New tokens per sample.")
_SAMPLING = flags.DEFINE_string("sampling", "temperature=0.8,top_k=40",
                                "'greedy' or key=value pairs of temperature (0 = greedy), top_k (0 = all), "
                                "top_p (1 = all).")
_BATCH = flags.DEFINE_integer("batch", 1, "Samples of the prompt decoded together (independent draws).")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "Cache length M (default: prompt + num_tokens).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    from moe_jax import decode

    try:
        sampling = decode.Sampling.parse(_SAMPLING.value)
        if not _PROMPT.value:
            raise ValueError("prompt: empty; give some text to continue (e.g. --prompt='ROMEO:').")
        if _BATCH.value < 1:
            raise ValueError(f"batch must be >= 1, got {_BATCH.value}.")
        config, model, variables, tokenizer, step = decode.load_for_decoding(_WORKDIR.value, _STEP.value)
        ids = [int(i) for i in tokenizer.encode(_PROMPT.value)]
        gen = decode.generate(model, variables, [ids] * _BATCH.value, _NUM_TOKENS.value, sampling, _SEED.value,
                              max_len=_MAX_LEN.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for row in gen.tokens:
        print(f"[step {step}] {_PROMPT.value}{tokenizer.decode(row)}")
    b, n = gen.tokens.shape
    print(f"decode: {b} x {n} tokens, max_len {_MAX_LEN.value or len(ids) + n}, {gen.decode_s:.3f}s = "
          f"{gen.tokens_per_s:.1f} tokens/s (compile {gen.compile_s:.1f}s, not counted)")


if __name__ == "__main__":
    app.run(main)
