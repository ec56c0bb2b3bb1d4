"""The notebooks in ``notebooks/``: each is a jupytext percent-format ``.py`` paired with an output-free ``.ipynb``.

Checks: every pair is in sync (same cells, same sources, same ``parameters`` tag), the committed ``.ipynb`` files
hold no outputs, every notebook has the Colab badge, the same setup (install) cell and a ``parameters`` cell, and
every notebook runs top to bottom in a fresh ``python3`` kernel (nbclient) with its parameters shrunk by a cell
injected right after the ``parameters`` cell (papermill-style). The four run in order in one test and share one
work directory, so notebooks 03 and 04 reuse the runs notebook 02 trains instead of training their own. While they
run, ``plt.show`` refuses a figure without a title or axis labels.

To update a notebook, edit its ``.py`` and run ``jupytext --sync notebooks/<name>.py`` (or edit the ``.ipynb`` in
Jupyter with jupytext installed, which saves both), then clear outputs before committing.
"""
import ast
import glob
import os
import re
import time

import jupytext
import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
EXPECTED = ["01_routing_tour", "02_dense_vs_sparse", "03_expert_specialization", "04_upcycling"]
PAIRING = "ipynb,py:percent"


def _overrides(workdir):
    """Per notebook: parameter values for the test run (tiny and short; the runs live in one shared workdir)."""
    return {
        "01_routing_tour": {},  # already small: one group of 32 tokens, every router
        "02_dense_vs_sparse": {"WORKDIR": workdir, "STEPS": 20, "EVAL_EVERY": 10, "SAMPLE_TOKENS": 8},
        "03_expert_specialization": {"WORKDIR": workdir, "TRAIN_STEPS": 20, "NUM_BATCHES": 2, "HEATMAP_TOKENS": 20},
        "04_upcycling": {"WORKDIR": workdir, "DENSE_STEPS": 20, "CONTINUE_STEPS": 6, "EVAL_EVERY": 3,
                         "METHODS": ("upcycle", "split_kmeans")},
    }


# Injected before the parameter overrides: plt.show() refuses figures without a title or axis labels.
FIGURE_CHECK = '''
import matplotlib.pyplot as _plt

def _check_figures_then_show(*args, _show=_plt.show, **kwargs):
    for num in _plt.get_fignums():
        fig = _plt.figure(num)
        suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
        for ax in fig.axes:
            if getattr(ax, "_colorbar", None) is not None or not ax.axison:
                continue  # colorbars are labelled through fig.colorbar(label=...); axes turned off hold nothing
            where = f"figure {suptitle or num!r}, axes {ax.get_title()!r}"
            twins = [o for o in ax.get_shared_x_axes().get_siblings(ax) if o is not ax]  # twinx() axes
            assert ax.get_title() or suptitle or any(o.get_title() for o in twins), f"{where}: no title"
            assert ax.get_ylabel(), f"{where}: no y-axis label"
            assert ax.get_xlabel() or any(o.get_xlabel() for o in twins), f"{where}: no x-axis label"
    return _show(*args, **kwargs)

_plt.show = _check_figures_then_show
'''


def _paths(name):
    return os.path.join(NB_DIR, name + ".py"), os.path.join(NB_DIR, name + ".ipynb")


def _param_index(nb):
    found = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(found) == 1, f"expected exactly one cell tagged 'parameters', found {len(found)}"
    return found[0]


def _assigned_names(source):
    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def test_the_notebooks_are_there():
    found = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(NB_DIR, "[0-9][0-9]_*.py")))
    assert found == EXPECTED
    for name in EXPECTED:
        assert os.path.exists(_paths(name)[1]), f"{name}.ipynb is missing: run jupytext --sync notebooks/{name}.py"


@pytest.mark.parametrize("name", EXPECTED)
def test_pair_in_sync(name):
    py_path, ipynb_path = _paths(name)
    py_nb = jupytext.read(py_path)
    ipynb = nbformat.read(ipynb_path, as_version=4)
    nbformat.validate(ipynb)
    assert ipynb.metadata.get("jupytext", {}).get("formats") == PAIRING, \
        f"{name}.ipynb is not paired with its .py: jupytext --set-formats {PAIRING} notebooks/{name}.ipynb"
    assert py_nb.metadata.get("jupytext", {}).get("formats") == PAIRING
    assert ipynb.metadata.get("kernelspec", {}).get("name") == "python3"
    a = [(c.cell_type, c.source, c.get("metadata", {}).get("tags", [])) for c in py_nb.cells]
    b = [(c.cell_type, c.source, c.get("metadata", {}).get("tags", [])) for c in ipynb.cells]
    assert len(a) == len(b), (f"{name}: {len(a)} cells in the .py, {len(b)} in the .ipynb; "
                              f"run jupytext --sync notebooks/{name}.py")
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"{name}: cell {i} differs between .py and .ipynb; run jupytext --sync notebooks/{name}.py"


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_notebook_has_no_outputs(name):
    nb = nbformat.read(_paths(name)[1], as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{name}.ipynb cell {i} holds outputs; clear them (jupyter nbconvert --clear-output --inplace, "
                "or jupytext --sync from the .py)")


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_structure(name):
    nb = jupytext.read(_paths(name)[0])
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "colab-badge.svg" in first.source
    assert f"notebooks/{name}.ipynb" in first.source, "the Colab badge must link to this notebook"
    setup = [c.source for c in nb.cells if c.cell_type == "code" and "def _find_checkout" in c.source]
    assert len(setup) == 1, "one setup (install) cell"
    reference = [c.source for c in jupytext.read(_paths(EXPECTED[0])[0]).cells
                 if c.cell_type == "code" and "def _find_checkout" in c.source]
    assert setup == reference, f"{name}: the setup cell differs from {EXPECTED[0]}'s; keep them identical"
    i = _param_index(nb)
    assert i > nb.cells.index(next(c for c in nb.cells if "def _find_checkout" in c.source))
    names = _assigned_names(nb.cells[i].source)
    unknown = set(_overrides("w")[name]) - names
    assert not unknown, f"{name}: the test overrides {sorted(unknown)}, which its parameters cell does not define"


def _kernel_manager():
    """The ipykernel of this interpreter under the name 'python3', whatever kernelspecs the machine has
    (``kernel_dirs=[]``: only the native kernel that ipykernel provides, i.e. ``sys.executable``)."""
    ksm = KernelSpecManager(kernel_dirs=[])
    spec = ksm.get_kernel_spec("python3")  # raises NoSuchKernel if ipykernel is not installed
    assert spec.language == "python"
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def _run(name, workdir):
    nb = jupytext.read(_paths(name)[0])
    i = _param_index(nb)
    values = "\n".join(f"{k} = {v!r}" for k, v in _overrides(workdir)[name].items())
    injected = nbformat.v4.new_code_cell(FIGURE_CHECK + "\n# test overrides\n" + values,
                                         metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(i + 1, injected)
    env = dict(os.environ)
    # Not tests/conftest.py's 8 fake devices: the notebooks run on one. The runs are tiny and compiling dominates
    # their time: XLA's backend optimizations off makes the notebooks about a third faster (same numbers here).
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    env["MOE_JAX_CACHE"] = os.path.join(workdir, "cache")  # tokens and tokenizers, kept out of ~/.cache
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    client = nbclient.NotebookClient(nb, km=_kernel_manager(), timeout=600,
                                     resources={"metadata": {"path": NB_DIR}})
    client.execute(env=env)
    return nb


def test_notebooks_run(tmp_path):
    """All four, in order, in one work directory; a failing notebook does not stop the others."""
    workdir = str(tmp_path / "runs")
    failures, timings = [], []
    for name in EXPECTED:
        t0 = time.time()
        try:
            nb = _run(name, workdir)
        except nbclient.exceptions.CellExecutionError as e:
            failures.append(f"{name}: {re.sub(chr(27) + r'[[][0-9;]*m', '', str(e))[-3000:]}")  # no colour codes
            continue
        except Exception as e:  # noqa: BLE001 - kernel death, timeout: report and go on with the next one
            failures.append(f"{name}: {type(e).__name__}: {e}")
            continue
        finally:
            timings.append(f"{name} {time.time() - t0:.0f}s")
        images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     if "image/png" in o.get("data", {}))
        if images == 0:
            failures.append(f"{name}: ran, but showed no figure")
    print("notebook run times:", ", ".join(timings))
    assert not failures, "\n\n".join(failures)
