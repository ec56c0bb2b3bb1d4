"""A/B of the dropless 'grouped' chunk (experts.sorted_rows_chunk) in the MoE layer: each variant sets the
chunk to FACTOR times the mean rows per expert (a multiple of 16) while the layer is traced, all variants and
the dense FFN compiled in one process and timed in interleaved rounds; "paired" is the median over rounds of
t(variant) / t(first variant). Arguments: E list, K list, factors; REPS rounds (default 5).

    REPS=7 taskset -c 0 python experiments/probes/ab_dropless_chunk.py 8,16,32,64 1,2 2.0,1.25,1.5
"""
import os, sys, time
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
import jax, jax.numpy as jnp, numpy as np
from moe_jax import hostmem; hostmem.keep_freed_memory()
from moe_jax import experts as ex
from moe_jax.experts import DenseFFN
from moe_jax.moe import MoEConfig, MoELayer
T, L, D, F = 8192, 1024, 512, 1024
es = [int(v) for v in sys.argv[1].split(",")]; ks = [int(v) for v in sys.argv[2].split(",")]
variants = sys.argv[3].split(",")  # e.g. 2.0,1.25,1.5  (chunk = factor * mean rows, multiple of 16)
kx, kr, kp = jax.random.split(jax.random.PRNGKey(0), 3)
x = jax.random.normal(kx, (T // L, L, D)); r = jax.random.normal(kr, (T // L, L, D))
orig = ex.sorted_rows_chunk
def chunk_fn(factor):
    return lambda n, e: max(16, -(-int(factor * n) // (e * 16)) * 16)
def grad(loss, *a):
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True)).lower(*a).compile()
fns = {}
for k in ks:
    ffn = DenseFFN(k * F); pd = ffn.init(kp, x)["params"]
    fns[f"K{k} dense"] = (grad(lambda p, x, ffn=ffn: (jnp.sum(ffn.apply({"params": p}, x) * r), ffn.apply({"params": p}, x)), pd, x), (pd, x))
    for e in es:
        layer = MoELayer(MoEConfig(num_experts=e, k=k, expert_hidden=F, dispatcher="dropless"))
        params = layer.init({"params": kp, "router": kp}, x, train=True)["params"]
        def loss(params, x, layer=layer):
            y, st = layer.apply({"params": params}, x, train=True, rngs={"router": kp}); return jnp.sum(y * r) + st.aux_loss, y
        for v in variants:
            ex.sorted_rows_chunk = chunk_fn(float(v))
            try:
                fns[f"K{k} E{e} c{v}"] = (grad(loss, params, x), (params, x))
            finally:
                ex.sorted_rows_chunk = orig
            print(f"K{k} E{e} factor {v}: chunk {chunk_fn(float(v))(T * k, e)}", flush=True)
times = {n: [] for n in fns}
for _ in range(int(os.environ.get("REPS", 5))):
    for n, (c, a) in fns.items():
        jax.block_until_ready(c(*a))
        t0 = time.perf_counter(); jax.block_until_ready(c(*a)); times[n].append(time.perf_counter() - t0)
for n, ts in times.items():
    base = times[n.rsplit(" ", 1)[0] + f" c{variants[0]}"] if " c" in n else ts
    print(f"{n:18s} {np.median(ts)*1e3:8.1f} ms  x dense {np.median(ts)/np.median(times[n.split()[0] + ' dense']):.3f}  paired vs c{variants[0]} {np.median(np.array(ts)/np.array(base)):.3f}")
