"""Sample text from the latest checkpoint of a run directory.

    python experiments/sample.py --workdir /tmp/switch_tiny --prompt "ROMEO:" --num_tokens 200
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)

from absl import app, flags, logging  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by experiments/train.py.")
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue (empty: start from a newline).")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 200, "Tokens to sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 40, "Sample among the k most likely tokens; 0 = all.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    from moe_jax.train import load_checkpoint, sample_text

    config, model, variables, tokenizer, step = load_checkpoint(_WORKDIR.value, _STEP.value)
    text = sample_text(model, variables, tokenizer, config, _PROMPT.value, _NUM_TOKENS.value, seed=_SEED.value,
                       temperature=_TEMPERATURE.value, top_k=_TOP_K.value or None)
    print(f"[step {step}] {_PROMPT.value}{text}")


if __name__ == "__main__":
    app.run(main)
