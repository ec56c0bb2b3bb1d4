"""Train (or resume) a language model from a config file.

    python experiments/train.py --config configs/switch_top1.py:tiny --workdir /tmp/switch_tiny
    python experiments/train.py --config configs/dense.py --workdir runs/dense --config.train.steps=3000

Rerunning the same command resumes from the latest checkpoint in ``--workdir``; changed steps, cadences and
learning-rate schedule are applied (and logged). A changed model, tokenizer, corpus or sequence shape is
refused with one line naming the fields: use a new ``--workdir``, or add ``--restart``, which moves the old
run to ``<workdir>.old-<n>`` (never deletes it) and starts over. Overrides use the config's field names
(``--config.model.moe.num_experts=16``); unknown fields are an error. Mistakes print one ``error:`` line
(exit 2 for the command line, 1 for the rest); ``MOE_JAX_VERBOSE=1`` shows the traceback (docs/errors.md).
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:tiny]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard events.")
_RESTART = flags.DEFINE_bool("restart", False, "Move the run in --workdir aside (to <workdir>.old-<n>, kept) and "
                             "train from step 0.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    from moe_jax import hostmem, parallel
    from moe_jax.train import train, validate_config

    hostmem.keep_freed_memory()  # before JAX's first computation (opt out: MOE_JAX_HOST_MALLOC=default)

    # Multi-host (config.mesh.distributed): before anything touches the JAX backend, validation included.
    parallel.initialize_distributed(bool((_CONFIG.value.get("mesh") or {}).get("distributed", False)))
    # expected failures get a one-line message naming the field (moe_jax.cli); anything else keeps its traceback
    validate_config(_CONFIG.value)
    train(_CONFIG.value, _WORKDIR.value, restart=_RESTART.value)


if __name__ == "__main__":
    from moe_jax import cli
    cli.run(main)
