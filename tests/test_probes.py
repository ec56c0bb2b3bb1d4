"""The probe scripts of experiments/probes/ (the measurements behind docs/perf.md) stay runnable as documented.

They take minutes at their real shapes, so they are not run here. What is checked, cheaply: each script's
docstring gives the command that runs it under its own path, docs/perf.md cites only scripts that exist, and
every ``moe_jax`` name a script reads or patches (``dispatch.weighted_sum_k``, ``experts._rows_t_matmul``, ...)
still exists, so a rename in the library breaks this test instead of the probe.
"""
import ast
import glob
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBES = sorted(glob.glob(os.path.join(ROOT, "experiments", "probes", "*.py")))


def test_there_are_probes():
    assert len(PROBES) >= 5


@pytest.mark.parametrize("path", PROBES, ids=os.path.basename)
def test_probe_docstring_gives_its_own_command(path):
    rel = os.path.relpath(path, ROOT)
    doc = ast.get_docstring(ast.parse(open(path).read()))
    assert doc, f"{rel} has no docstring"
    assert f"python {rel}" in doc, f"{rel}: its docstring must give the command `python {rel} ...`"


@pytest.mark.parametrize("path", PROBES, ids=os.path.basename)
def test_probe_uses_only_existing_library_names(path):
    tree = ast.parse(open(path).read())
    aliases = {}  # local name -> module path, for `from moe_jax import x [as y]` and `import moe_jax.x as y`
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moe_jax"):
            mod = importlib.import_module(node.module)
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                try:  # a submodule: its attributes are checked below
                    importlib.import_module(sub)
                    aliases[a.asname or a.name] = sub
                except ImportError:
                    assert hasattr(mod, a.name), f"{os.path.basename(path)}: {sub} does not exist"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            mod = importlib.import_module(aliases[node.value.id])
            assert hasattr(mod, node.attr), f"{os.path.basename(path)}: {aliases[node.value.id]}.{node.attr} is gone"


def test_perf_doc_cites_only_existing_scripts():
    text = open(os.path.join(ROOT, "docs", "perf.md")).read()
    cited = set(re.findall(r"experiments/[\w/]+\.(?:py|sh)", text))
    assert any(c.startswith("experiments/probes/") for c in cited)
    missing = sorted(c for c in cited if not os.path.exists(os.path.join(ROOT, c)))
    assert not missing, f"docs/perf.md cites scripts that do not exist: {missing}"


def test_perf_doc_is_a_current_state_page():
    lines = open(os.path.join(ROOT, "docs", "perf.md")).read().splitlines()
    assert len(lines) < 400, f"docs/perf.md has {len(lines)} lines: keep it a current-state page (history is in git)"
