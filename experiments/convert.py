"""Convert whole causal LMs between HuggingFace transformers and moe_jax run directories (``moe_jax/hf.py``).

    # a transformers model directory (save_pretrained layout) -> a moe_jax run directory (checkpoint at step 0)
    python experiments/convert.py --from_hf path/to/hf_model --workdir runs/from_hf
    # a moe_jax run directory (its latest checkpoint) -> a directory AutoModelForCausalLM.from_pretrained loads
    python experiments/convert.py --workdir runs/from_hf --to_hf /tmp/hf_export [--family qwen2_moe] [--step N]

Families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE. Anything moe_jax cannot compute exactly (sliding windows,
other activations or RoPE types, a tensor the mapping does not expect) is refused with the field's name. The
imported run's ``config.model.moe`` reproduces transformers' training loss (``lb_scope='layers'``,
``lb_loss_coef = K * router_aux_loss_coef``, no z-loss). To train on from it, use its vocabulary's data and
``--config.init.from_dir=runs/from_hf --config.init.method=copy``.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags():
    """Flags are defined only when run as a script, so that tests can import the two functions."""
    flags.DEFINE_string("from_hf", None, "A transformers model directory to import.")
    flags.DEFINE_string("workdir", None, "The moe_jax run directory (written by an import, read by an export).")
    flags.DEFINE_string("to_hf", None, "Export the run directory's checkpoint into this new directory.")
    flags.DEFINE_string("family", None, "Export as this transformers model_type (default: from the config).")
    flags.DEFINE_integer("step", -1, "Checkpoint step to export (-1: the latest).")
    flags.mark_flag_as_required("workdir")


def hf_to_workdir(hf_dir: str, workdir: str) -> str:
    """Import ``hf_dir`` into the new run directory ``workdir``; returns the checkpoint's path."""
    from configs import base
    from moe_jax import hf

    cfg, variables = hf.from_hf_dir(hf_dir)
    return hf.save_workdir(workdir, cfg, variables, base.base_config())


def workdir_to_hf(workdir: str, out_dir: str, family=None, step: int = -1):
    """Export ``workdir``'s checkpoint into ``out_dir``; returns ``(model_type, notes)``."""
    from moe_jax import hf

    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ValueError(f"--to_hf {out_dir} exists and is not empty; choose a new directory.")
    cfg, variables = hf.load_workdir(workdir, step)
    model = hf.save_hf(cfg, variables, out_dir, family)
    return model.config.model_type, hf.export_notes(cfg)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    if bool(FLAGS.from_hf) == bool(FLAGS.to_hf):
        raise app.UsageError("give exactly one of --from_hf (import into --workdir) or --to_hf (export --workdir).")
    try:
        if FLAGS.from_hf:
            path = hf_to_workdir(FLAGS.from_hf, FLAGS.workdir)
            print(f"wrote {path} from {FLAGS.from_hf}")
        else:
            model_type, notes = workdir_to_hf(FLAGS.workdir, FLAGS.to_hf, FLAGS.family, FLAGS.step)
            print(f"wrote {FLAGS.to_hf} ({model_type}) from {FLAGS.workdir}")
            for note in notes:
                print(f"note: {note}")
    except (ValueError, PermissionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
