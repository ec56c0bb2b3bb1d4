"""The experts alone on a full capacity buffer: BatchedExperts as one batched matmul against the per-expert
loop (experts.sorted_rows_ffn via rows_used = every row), forward + backward with y returned, at E=8 (1280
rows each) and E=64 (160 rows each); the max abs difference of all outputs first.

    taskset -c 0 python experiments/probes/experts_loop_vs_batched_matmul.py
"""
import os, time
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
import jax, jax.numpy as jnp, numpy as np
from moe_jax import hostmem; hostmem.keep_freed_memory()
from moe_jax.experts import BatchedExperts
D, F = 512, 1024
fns = {}
for E, M in [(8, 1280), (64, 160)]:
    be = BatchedExperts(E, D, F)
    xe = jax.random.normal(jax.random.PRNGKey(0), (E, M, D)); re = jax.random.normal(jax.random.PRNGKey(1), (E, M, D))
    p = be.init(jax.random.PRNGKey(2), xe)["params"]
    full = jnp.full((E,), M, jnp.int32)
    def batched(p, x, be=be, re=re):
        y = be.apply({"params": p}, x); return jnp.sum(y * re), y
    def loop(p, x, be=be, re=re, full=full):
        y = be.apply({"params": p}, x, rows_used=full); return jnp.sum(y * re), y
    for name, f in [("batched", batched), ("loop", loop)]:
        fns[f"E{E} {name}"] = (jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True)).lower(p, xe).compile(), (p, xe))
    a = fns[f"E{E} batched"][0](p, xe); b = fns[f"E{E} loop"][0](p, xe)
    print(E, max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
times = {k: [] for k in fns}
for _ in range(5):
    for k, (c, a) in fns.items():
        jax.block_until_ready(c(*a)); t0 = time.perf_counter(); jax.block_until_ready(c(*a)); times[k].append(time.perf_counter() - t0)
for k, ts in times.items():
    print(f"{k:12s} {np.median(ts)*1e3:8.1f} ms")
