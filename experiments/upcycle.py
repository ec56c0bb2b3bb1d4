"""Turn a dense run's checkpoint into an MoE checkpoint (sparse upcycling or splitting), ready to train on.

    python experiments/train.py --config configs/dense.py:tiny --workdir /tmp/dense
    python experiments/upcycle.py --from /tmp/dense --config configs/mixtral_top2.py:tiny \\
        --config.model.moe.expert_hidden=256 --config.model.moe.dispatcher=dropless --workdir /tmp/upcycled
    python experiments/train.py --config configs/mixtral_top2.py:tiny --config.model.moe.expert_hidden=256 \\
        --config.model.moe.dispatcher=dropless --config.train.steps=400 --workdir /tmp/upcycled

``--method`` ('upcycle', 'split_random', 'split_kmeans', 'split_importance', 'copy') and the other
``config.init`` fields (``--config.init.noise_std=0.01``, ``--config.init.router=zeros``, ...) choose the
conversion (``moe_jax/upcycle.py``). The new workdir gets ``config.json``, ``init_report.json`` and a checkpoint
at the source's step (``--config.init.restart_step=True``: at step 0) with a fresh optimizer state; training with
the same config in that workdir resumes from it. The same conversion happens inside ``train()`` when
``config.init.from_dir`` is set and the workdir has no checkpoint (what ``configs/compare_upcycle.py`` uses).
"""
import json
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags():
    """Flags are defined only when run as a script, so that tests can import ``upcycle_checkpoint``."""
    config_flags.DEFINE_config_file("config", None, "Target (MoE) training config (configs/*.py[:tiny]).",
                                    lock_config=False)
    flags.DEFINE_string("from", None, "The dense run's --workdir (its checkpoints/ are read).")
    flags.DEFINE_string("workdir", None, "New run directory for the converted checkpoint.")
    flags.DEFINE_string("method", None, "Overrides config.init.method.")
    flags.DEFINE_integer("step", None, "Overrides config.init.step (-1: the latest checkpoint).")
    flags.mark_flags_as_required(["config", "from", "workdir"])


def upcycle_checkpoint(config, from_dir: str, workdir: str, method=None, step=None):
    """Write the converted checkpoint of ``from_dir`` into ``workdir`` as ``config`` (+ init overrides) says.

    Returns ``(checkpoint step, report)``. Refuses a workdir that already holds checkpoints.
    """
    import jax

    from moe_jax import data as data_lib
    from moe_jax import train as train_lib
    from moe_jax import upcycle
    from moe_jax.model import Transformer

    config = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") else config
    config.init.from_dir = os.path.abspath(from_dir)
    if method is not None:
        config.init.method = method
    if step is not None:
        config.init.step = int(step)
    workdir = train_lib.check_workdir(workdir)
    mngr = train_lib._checkpoint_manager(workdir, int(config.train.keep_ckpts))
    if mngr.all_steps():
        raise ValueError(f"--workdir {workdir} already holds checkpoints {list(mngr.all_steps())}; choose a new one.")
    train_lib.validate_config(config)
    token_data = data_lib.prepare_data(config.data, cache_dir=config.data.get("cache_dir") or None)
    model_cfg = train_lib.validate_config(config, token_data.tokenizer.vocab_size)
    model = Transformer(model_cfg)
    tx, _ = train_lib.make_optimizer(config.train)
    b, l, seed = int(config.data.batch_size), int(config.data.seq_len), int(config.get("seed", 0))
    batches = lambda n: [data_lib.BatchIterator(token_data.train, b, l, seed + 1).batch_at(i) for i in range(n)]
    rng = jax.random.split(jax.random.key(seed))[0]  # train()'s init_rng: the same fresh router as train() gives
    fresh = jax.jit(lambda key: train_lib.create_state(model, tx, key, l))(rng)
    state, initial = train_lib.initial_state(config, model, tx, fresh, batches)
    data_state = initial.data_state or data_lib.BatchIterator(token_data.train, b, l, seed).state()
    resolved = train_lib.resolved_config(config, token_data.tokenizer.vocab_size)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(resolved, f, indent=2)
    upcycle.write_report(workdir, initial)
    saved = train_lib._save(mngr, state, data_state, resolved, initial.meta)
    return saved, initial.report


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    step, report = upcycle_checkpoint(FLAGS.config, FLAGS["from"].value, FLAGS.workdir, FLAGS.method, FLAGS.step)
    blocks = ", ".join(f"block {r['block']}: {r['method']}" for r in report["blocks"])
    print(f"wrote {os.path.join(os.path.abspath(FLAGS.workdir), 'checkpoints', str(step))} from "
          f"{report['from_dir']} step {report['source_step']} ({blocks}); train with the same --config and "
          f"--workdir to continue.")


if __name__ == "__main__":
    _define_flags()
    from moe_jax import cli
    cli.run(main)  # every error one line on stderr (MOE_JAX_VERBOSE=1: the traceback)
