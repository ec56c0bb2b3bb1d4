"""Compare dense and sparse language models: train each (model, seed), then write a table and plots.

    python experiments/compare.py --config configs/compare_quick.py --workdir runs/quick
    python experiments/compare.py --config configs/compare_headline.py --workdir runs/headline
    python experiments/compare.py --config configs/compare_headline.py:mini --workdir runs/h --jobs 2  # 2 cores

Every model of a comparison sees the same data order (same seeds). Rerunning the same command skips the runs
that finished and resumes the one that was interrupted. Writes ``results.md``, ``results.csv`` and PNG plots
into ``--workdir`` only; ``--publish`` also copies them into the config's ``results_dir`` (a folder of the
checkout, e.g. ``docs/results/headline``), with every run's record (config, summary, gzipped metrics) in its
``runs/``; ``--reuse docs/results/headline`` then copies those runs into a new study instead of training them
again. Override fields with ``--config.base.train.steps=100``,
``--config.seeds=0,1,2`` (or ``--config.seeds='[0,1,2]'``) and ``--config.lr_grid=1e-3,2e-3,4e-3``.
Prints the table, the paired gap against the first model (95% t-interval over seeds) and what the run can
be trusted for.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Comparison config (configs/compare_*.py).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for the runs, the table and the plots.")
_ONLY = flags.DEFINE_list("only", None, "Train only these runs ('model:seed,...'; with lr_search also "
                          "'model:seed:lr', one rate of the grid) and write no table: to run the runs of one "
                          "comparison side by side in separate processes.")
_TABLE_ONLY = flags.DEFINE_bool("table_only", False, "Train nothing; tabulate and plot the runs that exist.")
_REUSE = flags.DEFINE_list("reuse", None, "Workdirs of other comparisons, or published studies "
                           "(docs/results/<study>, whose runs/ holds their run records): a run of this one whose "
                           "exact config finished there is copied instead of trained (studies share models).")
_PUBLISH = flags.DEFINE_bool("publish", False, "Also copy the table and plots into the config's results_dir "
                             "(a checkout folder such as docs/results/headline), with the record of every run "
                             "in its runs/ (config, summary, gzipped metrics); off: only --workdir is written.")
_JOBS = flags.DEFINE_integer("jobs", 1, "Train this many runs at once, each in its own process pinned to one "
                             "CPU core (where the OS allows), logging to <workdir>/logs/; then write the table. "
                             "With lr_search, a seed at the chosen rate starts once its model's grid is done.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from moe_jax import hostmem
    from moe_jax.compare import run_comparison

    hostmem.keep_freed_memory()  # before JAX's first computation (opt out: MOE_JAX_HOST_MALLOC=default)

    if _JOBS.value < 1:
        raise app.UsageError(f"--jobs={_JOBS.value}: give 1 or more processes.")
    if _JOBS.value > 1 and not _ONLY.value and not _TABLE_ONLY.value:
        from moe_jax.compare import child_command, run_parallel

        script = os.path.abspath(__file__)
        run_parallel(_CONFIG.value, _WORKDIR.value, _JOBS.value,
                     command=lambda item: child_command(sys.executable, script, sys.argv[1:], item))
    # expected failures get a one-line message naming the field (moe_jax.cli); anything else keeps its traceback
    out = run_comparison(_CONFIG.value, _WORKDIR.value, only=_ONLY.value, train_missing=not _TABLE_ONLY.value,
                         reuse=_REUSE.value, publish=_PUBLISH.value)
    if _ONLY.value:
        return
    print()
    print(out["table"])  # ends with the trust line: how far these numbers can be trusted
    for path in out["plots"]:
        print(f"plot: {path}")


if __name__ == "__main__":
    from moe_jax import cli
    cli.run(main)
