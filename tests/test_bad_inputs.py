"""docs/errors.md is what experiments/bad_inputs.py generates now: every in-process case gives its one line."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import bad_inputs  # noqa: E402


def test_errors_doc_is_current_and_covers_30_cases():
    text = bad_inputs.generate()
    with open(bad_inputs.DOC) as f:
        assert f.read() == text, "docs/errors.md is out of date: run python experiments/bad_inputs.py"
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith(("| #", "| where"))]
    assert len(rows) >= 30
    assert "(no error)" not in text  # every case is refused
    assert "Lower k" not in text.split("moe.k=0")[1].split("\n")[0]
