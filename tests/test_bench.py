"""Pure helpers of the benchmark scripts (no timing here: benchmarks write tables, tests check logic)."""
import os
import runpy

import numpy as np
import pytest

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


def test_profile_kernels_map_to_jax_ops():
    """GPU kernels are named after their HLO fusion with '.' -> '_' (``input_scatter_fusion.1`` runs as
    ``input_scatter_fusion_1``); the map reads each instruction's op_name metadata, and an instruction
    without metadata (``%p``) is left out."""
    bench = runpy.run_path(os.path.join(ROOT, "experiments", "bench_layer.py"))
    hlo = "\n".join([
        "ENTRY %main.3 (p: s32[8]) -> s32[8] {",
        "  %p = s32[8]{0} parameter(0)",
        '  %input_scatter_fusion.1 = s32[8]{0} fusion(%p), kind=kInput, calls=%f, '
        'metadata={op_name="jit(loss)/jvp(MoELayer)/scatter" stack_frame_id=3}',
        '  ROOT %loop_gather-select_fusion = s32[8]{0} fusion(%input_scatter_fusion.1), kind=kLoop, '
        'metadata={op_name="jit(loss)/router/gather"}',
        "}",
    ])
    names = bench["hlo_op_names"](hlo)
    assert names == {"input_scatter_fusion_1": "jit(loss)/jvp(MoELayer)/scatter",
                     "loop_gather_select_fusion": "jit(loss)/router/gather"}
    assert names[bench["normalize_kernel_name"]("input_scatter_fusion.1")] == "jit(loss)/jvp(MoELayer)/scatter"


def test_timed_function_keeps_the_dense_output_product():
    """The layer benchmark times the gradients *and* y. A dense FFN y = gelu(x wi) wo with loss sum(y * r) needs
    3 products per weight matrix, 6 in all: forward x wi and a wo; backward dy wo^T, a^T dy (d wo), dh wi^T,
    x^T dh (d wi). But the loss is linear in y: the gradients never read y itself, so without y as an output
    XLA drops the forward product a wo and runs 5 (``dead_output=True``, the oldest tables' definition), while an
    MoE layer must compute its experts' outputs (the routing weights' gradient reads them)."""
    import re

    import jax
    import jax.numpy as jnp

    from moe_jax.experts import DenseFFN

    if jax.default_backend() != "cpu":
        pytest.skip("counts XLA:CPU dot instructions; other backends lower dots to library calls")
    bench = runpy.run_path(os.path.join(ROOT, "experiments", "bench_layer.py"))
    ffn = DenseFFN(32)
    x = jax.random.normal(jax.random.key(0), (16, 8))
    r = jax.random.normal(jax.random.key(1), (16, 8))
    params = ffn.init(jax.random.key(2), x)["params"]

    def loss(p, x):
        y = ffn.apply({"params": p}, x)
        return jnp.sum(y * r), y

    def dots(fn):
        return len(re.findall(r" dot\(", fn.lower(params, x).compile().as_text()))

    timed, dead = bench["grad_of_loss"](jax, loss), bench["grad_of_loss"](jax, loss, dead_output=True)
    assert (dots(timed), dots(dead)) == (6, 5)
    (grads, _), y = timed(params, x)
    np.testing.assert_allclose(y, ffn.apply({"params": params}, x), rtol=1e-6)
    # d loss / d wo = a^T r with a = gelu(x wi): the same gradients either way
    np.testing.assert_allclose(grads["wo"], jax.nn.gelu(x @ params["wi"]).T @ r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dead(params, x)[0]["wo"], grads["wo"], rtol=1e-6)


def test_flatness_pairs_rounds():
    """t(E_hi) / t(E_lo) per round, then the median: rounds (100, 200, 100) ms at E=8 and (110, 210, 130) at
    E=64 give 1.1, 1.05, 1.3, median 1.1 (min 1.05, max 1.3). The ratio of the medians would be 130 / 100 =
    1.3: the pairing is what cancels the slow second round. A label at one E only, a row without per-round times
    and the dense row (E None) give nothing."""
    bench = runpy.run_path(os.path.join(ROOT, "experiments", "bench_layer.py"))
    rows = [dict(k=1, e=None, dispatcher="dense", times_ms=[90.0, 180.0, 90.0]),
            dict(k=1, e=8, dispatcher="scatter", times_ms=[100.0, 200.0, 100.0]),
            dict(k=1, e=64, dispatcher="scatter", times_ms=[110.0, 210.0, 130.0]),
            dict(k=1, e=16, dispatcher="dropless", times_ms=[1.0, 1.0, 1.0]),
            dict(k=2, e=8, dispatcher="scatter", times_ms=[1.0]), dict(k=2, e=64, dispatcher="scatter")]
    flat = bench["flatness"](rows)
    assert len(flat) == 1
    f = flat[0]
    assert (f["k"], f["dispatcher"], f["e_lo"], f["e_hi"], f["rounds"]) == (1, "scatter", 8, 64, 3)
    np.testing.assert_allclose([f["median"], f["min"], f["max"]], [1.1, 1.05, 1.3])
    assert "| 1 | scatter | 64 / 8 | 1.100 | 1.050 | 1.300 | 3 |" in bench["flatness_markdown"](flat)
