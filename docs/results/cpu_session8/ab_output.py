"""In one process: an MoE layer's timed step with y returned (bench_layer's default) and without it
(--dead-output), K=1, top-k router, T=8192, D=512, F=1024, capacity factor 1.25, REPS interleaved rounds.

    REPS=7 taskset -c 0 python docs/results/cpu_session8/ab_output.py 8,64 scatter,dropless

Prints (E, dispatcher, dead_output), the median ms and every round's ms."""
import os, sys, time
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
from moe_jax import hostmem; hostmem.keep_freed_memory()
import jax, jax.numpy as jnp, numpy as np
from moe_jax.moe import MoEConfig, MoELayer
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "experiments"))
import bench_layer
kx, kr, kp = jax.random.split(jax.random.key(0), 3)
x = jax.random.normal(kx, (8, 1024, 512)); r = jax.random.normal(kr, (8, 1024, 512))
fns = {}
for e in [int(v) for v in sys.argv[1].split(",")]:
    for disp in sys.argv[2].split(","):
        cfg = MoEConfig(num_experts=e, k=1, router="top_k", expert_hidden=1024, activation="gelu", capacity_factor=1.25,
                        jitter_eps=0.0, dispatcher=disp)
        layer = MoELayer(cfg)
        params = jax.jit(lambda x: layer.init({"params": kp, "router": kp}, x, train=True)["params"])(x)
        def loss(p, x, layer=layer):
            y, st = layer.apply({"params": p}, x, train=True, rngs={"router": kp})
            return jnp.sum(y * r) + st.aux_loss, y
        for dead in (False, True):
            fns[(e, disp, dead)] = (bench_layer.grad_of_loss(jax, loss, dead).lower(params, x).compile(), params)
times = {k: [] for k in fns}
for rnd in range(int(os.environ.get("REPS", 5))):
    for k, (c, p) in fns.items():
        jax.block_until_ready(c(p, x))
        t0 = time.perf_counter(); jax.block_until_ready(c(p, x)); times[k].append(time.perf_counter() - t0)
for k, ts in times.items():
    print(k, f"{np.median(ts)*1e3:.1f} ms", [round(v*1e3) for v in ts])
