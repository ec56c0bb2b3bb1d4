"""The weight gradient of a narrow projection x[N, D] @ w[D, E] on XLA:CPU: the plain autodiff product
x.T @ g (a dot into [D, E]) against experts.narrow_matmul's barrier(g.T @ x).T (a dot into [E, D], then a
small transpose), per N, D, E.

    taskset -c 0 python experiments/probes/narrow_weight_grad.py
"""
import os, time
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
import jax, jax.numpy as jnp, numpy as np
from moe_jax import hostmem; hostmem.keep_freed_memory()
bar = jax.lax.optimization_barrier
fns = {}
for n in [2048, 8192]:
  for d in [128, 256, 512, 1024]:
    for f in [8, 64, 256]:
      x = jax.random.normal(jax.random.PRNGKey(0), (n, d)); g = jax.random.normal(jax.random.PRNGKey(1), (n, f))
      fns[(n, d, f, "plain")] = (jax.jit(lambda x, g: x.T @ g), (x, g))
      fns[(n, d, f, "swapped")] = (jax.jit(lambda x, g: bar(g.T @ x).T), (x, g))
comp = {k: (f.lower(*a).compile(), a) for k, (f, a) in fns.items()}
times = {k: [] for k in comp}
for rnd in range(7):
    for k, (c, a) in comp.items():
        jax.block_until_ready(c(*a))
        t0 = time.perf_counter(); jax.block_until_ready(c(*a)); times[k].append(time.perf_counter() - t0)
for k in [k for k in times if k[3] == "plain"]:
    p = np.median(times[k]) * 1e3; s = np.median(times[k[:3] + ("swapped",)]) * 1e3
    print(f"N={k[0]:5d} D={k[1]:5d} E={k[2]:4d}  plain {p:7.2f}  swapped {s:7.2f}  ratio {s/p:.2f}")
