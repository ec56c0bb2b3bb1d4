"""The expert GEMMs alone, at E=8 (1024 rows per expert) and E=64 (128 rows), T = 8192 rows in all, D=512,
F=1024, float32: what a product costs at 128 rows against 1024, before any routing (the floor of the layer's
cost against E, docs/perf.md "The floor").

For each E, a `lax.scan` over the experts (as the layer's loop runs them; each expert's weight is a slice of
the stacked [E, D, F] array) of one of:
  fwd    x_e · w_e           [R, D] · [D, F]
  dx     g_e · w_e^T         [R, F] · [F, D]   (the input gradient)
  dw     x_e^T · g_e         [D, R] · [R, F]   (the weight gradient, stacked into [E, D, F] as the layer does)
  dw_sum the same products summed into one [D, F] (no stack: what the stack's fill and copies cost)
and, as the yardstick, `one`: the same FLOPs as one [8192, D] · [D, F] product. Median of 7 interleaved
rounds, one process per XLA_FLAGS setting (XLA:CPU's default GEMM path, YNNPACK off, XNNPACK dots, oneDNN):

    for f in "" "--xla_cpu_experimental_ynn_fusion_type=" "--xla_cpu_experimental_xnn_fusion_type=dot" \
             "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot"; do
      XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1 $f" \
        taskset -c 0 python experiments/probes/expert_gemms_by_row_count.py; done
"""
import os
import time

from moe_jax import hostmem

hostmem.keep_freed_memory("keep")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

T, D, F = 8192, 512, 1024
bar = jax.lax.optimization_barrier
scan = lambda f: jax.jit(lambda a, b: jax.lax.scan(lambda c, ab: (c, f(*ab)), 0.0, (a, b))[1])
fns = {}
for e in (8, 64):
    r = T // e
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x, g = jax.random.normal(k[0], (e, r, D)), jax.random.normal(k[1], (e, r, F))
    w = jax.random.normal(k[2], (e, D, F)) * 0.03
    fns[(e, "fwd")] = (scan(lambda a, b: a @ b), (x, w))
    fns[(e, "dx")] = (scan(lambda a, b: a @ b.T), (g, w))
    fns[(e, "dw")] = (scan(lambda a, b: bar(a.T) @ b), (x, g))
    fns[(e, "dw_sum")] = (jax.jit(lambda a, b: jax.lax.scan(lambda c, ab: (c + bar(ab[0].T) @ ab[1], None),
                                                            jnp.zeros((D, F)), (a, b))[0]), (x, g))
fns[(None, "one")] = (jax.jit(lambda a, b: a @ b), (jax.random.normal(k[0], (T, D)), w[0]))
times = {key: [] for key in fns}
for f, a in fns.values():
    jax.block_until_ready(f(*a))
for _ in range(7):
    for key, (f, a) in fns.items():
        jax.block_until_ready(f(*a))
        t0 = time.perf_counter()
        jax.block_until_ready(f(*a))
        times[key].append(time.perf_counter() - t0)
print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; jax {jax.__version__}")
one = np.median(times[(None, "one")]) * 1e3
print(f"one [8192,{D}]·[{D},{F}]: {one:.1f} ms")
print("| product | E=8 (1024 rows) ms | E=64 (128 rows) ms | E=64 / E=8 |\n|---|---:|---:|---:|")
for name in ("fwd", "dx", "dw", "dw_sum"):
    a, b = (np.median(times[(e, name)]) * 1e3 for e in (8, 64))
    print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.3f} |")
