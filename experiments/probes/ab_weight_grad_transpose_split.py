"""A/B of `experts._rows_t_matmul` in the MoE layer: each layer compiled twice in one process, with the
weight-gradient product as an always-materialized transpose ("old": ``barrier(u.T) @ v``) and as
`_rows_t_matmul` is now (tiles whose rows are a multiple of 128 split off their last 16 rows), gradients
checked equal, timed in interleaved rounds against the dense FFN. Arguments K:E:dispatcher; REPS rounds
(default 5).

    REPS=7 taskset -c 0 python experiments/probes/ab_weight_grad_transpose_split.py 1:8:dropless 1:64:dropless 1:64:scatter 2:8:dropless 2:64:dropless
"""
import os, sys, time
os.environ["XLA_FLAGS"]="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
from moe_jax import hostmem; hostmem.keep_freed_memory("keep")
import jax, jax.numpy as jnp, numpy as np
from moe_jax import experts
from moe_jax.moe import MoEConfig, MoELayer
from moe_jax.experts import DenseFFN
new = experts._rows_t_matmul
old = lambda u, v: jax.lax.optimization_barrier(u.T) @ v
kx, kr, kp = jax.random.split(jax.random.key(0), 3)
x = jax.random.normal(kx, (8, 1024, 512)); r = jax.random.normal(kr, (8, 1024, 512))
cases = [(int(a.split(":")[0]), int(a.split(":")[1]), a.split(":")[2]) for a in sys.argv[1:]]
fns = {}
for k in sorted({c[0] for c in cases}):
    ffn = DenseFFN(k * 1024); p = ffn.init(kp, x)["params"]
    fns[("dense", k)] = (jax.jit(jax.grad(lambda p, x: jnp.sum(ffn.apply({"params": p}, x) * r), argnums=(0, 1))).lower(p, x).compile(), p)
for k, e, disp in cases:
    cfg = MoEConfig(num_experts=e, k=k, router="top_k", expert_hidden=1024, capacity_factor=1.25, jitter_eps=0.0, dispatcher=disp)
    layer = MoELayer(cfg)
    p = jax.jit(lambda x: layer.init({"params": kp, "router": kp}, x, train=True)["params"])(x)
    def loss(p, x, layer=layer):
        y, st = layer.apply({"params": p}, x, train=True, rngs={"router": kp}); return jnp.sum(y * r) + st.aux_loss
    for tag, impl in (("old", old), ("new", new)):
        experts._rows_t_matmul = impl
        fns[(f"{disp} E{e} {tag}", k)] = (jax.jit(jax.grad(loss, argnums=(0, 1))).lower(p, x).compile(), p)
    experts._rows_t_matmul = new
    a = fns[(f"{disp} E{e} old", k)]; b = fns[(f"{disp} E{e} new", k)]
    ga, gb = a[0](a[1], x), b[0](b[1], x)
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(u, v, rtol=1e-3, atol=1e-3)
times = {key: [] for key in fns}
for rep in range(int(os.environ.get("REPS", "5"))):
    for key, (f, p) in fns.items():
        t = time.perf_counter(); jax.block_until_ready(f(p, x)); times[key].append(time.perf_counter() - t)
for key in fns:
    dense = np.asarray(times[("dense", key[1])])
    print(f"K={key[1]} {key[0]:24s} {np.median(times[key])*1e3:8.1f} ms  x{np.median(np.asarray(times[key])/dense):.3f}")
