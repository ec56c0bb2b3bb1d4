"""capacity.assign_slots' two ways of counting an assignment's rank within its expert, alone, per E: the
one-hot cumsum ('cumsum') against a stable sort of the expert ids with the rank scattered back
('sort+scatter', what method='sort' does) or un-permuted by a second argsort ('sort+argsort'). Random ids with
about 1/(E+1) of them invalid; both methods checked equal first. G groups of M = K*S assignments.

    taskset -c 0 python experiments/probes/assign_slots_cumsum_vs_sort.py
"""
import os, time
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
import jax, jax.numpy as jnp, numpy as np
from moe_jax import hostmem; hostmem.keep_freed_memory()
def cum(key, e):
    oh = jax.nn.one_hot(key, e, dtype=jnp.int32)  # key==e -> zero row
    return jnp.sum((jnp.cumsum(oh, 1) - 1) * oh, -1)
def srt(key, e, inv="scatter"):
    g, m = key.shape
    order = jnp.argsort(key, axis=1, stable=True)
    sk = jnp.take_along_axis(key, order, 1)
    idx = jnp.arange(m, dtype=jnp.int32)
    new = jnp.concatenate([jnp.ones((g, 1), bool), sk[:, 1:] != sk[:, :-1]], 1)
    start = jax.lax.cummax(jnp.where(new, idx, 0), axis=1)
    r = idx - start
    if inv == "scatter":
        return jnp.zeros((g, m), jnp.int32).at[jnp.arange(g)[:, None], order].set(r, unique_indices=True)
    return jnp.take_along_axis(r, jnp.argsort(order, axis=1), 1)
fns = {}
for (g, m) in [(8, 1024), (8, 2048), (64, 128)]:
  for e in [8, 16, 32, 64, 256]:
    key = jax.random.randint(jax.random.PRNGKey(e), (g, m), 0, e + 1)  # includes invalid (= e)
    a = cum(key, e); b = srt(key, e); c = srt(key, e, "argsort")
    ok = (key == e) | ((a == b) & (a == c))
    assert bool(ok.all())
    fns[(g, m, e, "cumsum")] = (jax.jit(lambda k, e=e: cum(k, e)), (key,))
    fns[(g, m, e, "sort+scatter")] = (jax.jit(lambda k, e=e: srt(k, e)), (key,))
    fns[(g, m, e, "sort+argsort")] = (jax.jit(lambda k, e=e: srt(k, e, "argsort")), (key,))
comp = {k: (f.lower(*a).compile(), a) for k, (f, a) in fns.items()}
times = {k: [] for k in comp}
for rnd in range(9):
    for k, (c, a) in comp.items():
        jax.block_until_ready(c(*a))
        t0 = time.perf_counter(); jax.block_until_ready(c(*a)); times[k].append(time.perf_counter() - t0)
for k in [k for k in times if k[3] == "cumsum"]:
    row = " ".join(f"{v}={np.median(times[k[:3]+(v,)])*1e3:6.2f}" for v in ["cumsum", "sort+scatter", "sort+argsort"])
    print(f"G={k[0]:3d} M={k[1]:5d} E={k[2]:4d} {row}")
