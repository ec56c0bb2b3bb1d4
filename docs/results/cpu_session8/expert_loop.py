"""The capacity path's expert loop alone (experts.sorted_rows_ffn, stride = chunk = C = 160, E = 64, 128 rows
per expert) against the dense FFN of the same FLOPs, forward + backward with y returned: with the row counts
traced (as in the layer) and with them as constants (XLA then resolves every switch and cond).

    taskset -c 0 python docs/results/cpu_session8/expert_loop.py
"""
import os, sys, time
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
import jax, jax.numpy as jnp, numpy as np
from moe_jax import hostmem; hostmem.keep_freed_memory()
from moe_jax.experts import sorted_rows_ffn
E = 64; T, D, F = 8192, 512, 1024; C = 160
key = jax.random.PRNGKey(0)
wi = jax.random.normal(key, (E, D, F)) * 0.04
wo = jax.random.normal(key, (E, F, D)) * 0.03
dwi = jax.random.normal(key, (D, F)) * 0.04
dwo = jax.random.normal(key, (F, D)) * 0.03
gelu = jax.nn.gelu
xs = jax.random.normal(key, (E * C, D)); rs = jax.random.normal(jax.random.PRNGKey(1), (E * C, D))
def dense(p, x, n):
    y = gelu(x[:T] @ p["wi"]) @ p["wo"]; return jnp.sum(y * rs[:T]), y
def loop(n_fixed=None):
    def f(p, x, n):
        if n_fixed is not None:
            n = jnp.full(E, n_fixed, jnp.int32)
        y = sorted_rows_ffn(x, n, p, "gelu", C, C); return jnp.sum(y * rs), y
    return f
cases = {
    "dense": (dense, {"wi": dwi, "wo": dwo}),
    "traced_n128": (loop(), {"wi": wi, "wo": wo}),
    "const_n128": (loop(128), {"wi": wi, "wo": wo}),
}
n = jnp.full(E, 128, jnp.int32)
fns = {}
for name, (f, p) in cases.items():
    fns[name] = (jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True)).lower(p, xs, n).compile(), p)
times = {k: [] for k in fns}
for rnd in range(5):
    for k, (c, p) in fns.items():
        jax.block_until_ready(c(p, xs, n))
        t0 = time.perf_counter(); jax.block_until_ready(c(p, xs, n)); times[k].append(time.perf_counter() - t0)
d = np.median(times["dense"])
for k, ts in times.items():
    print(f"{k:14s} {np.median(ts)*1e3:8.1f} ms  x{np.median(ts)/d:.3f}")
