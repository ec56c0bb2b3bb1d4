"""Pure helpers of the benchmark scripts (no timing here: benchmarks write tables, tests check logic)."""
import os
import runpy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_profile_exclusive_times_subtract_nested_ops():
    """A CPU trace nests the ops of a loop inside the loop's event; each op must count once.

    while [0, 100) holds op a [10, 30) and cond [40, 70), which holds op b [45, 50); op a runs again at
    [120, 125) after the loop. Exclusive: while 100 - 20 - 30 = 50, cond 30 - 5 = 25, b 5, a 20 + 5 = 25;
    the sum (105) is the top-level busy time (100 + 5), and the top-level spans are the loop and the last a.
    """
    bench = runpy.run_path(os.path.join(ROOT, "experiments", "bench_layer.py"))
    events = [(45, 50, "b"), (0, 100, "while"), (10, 30, "a"), (40, 70, "cond"), (120, 125, "a")]
    top = []
    got = bench["exclusive_times"](events, top)
    assert got == {"while": 50, "a": 25, "cond": 25, "b": 5}
    assert sum(got.values()) == 105
    assert top == [(0, 100), (120, 125)]
    # an event that starts exactly where the previous one ends is not nested in it
    assert bench["exclusive_times"]([(0, 10, "x"), (10, 20, "y")]) == {"x": 10, "y": 10}
