"""A/B of the combine's routing-weight gradient in the MoE layer: forward + backward (y returned, as in
bench_layer.py) with the combine through `dispatch.weighted_sum_k` ("new": the weights' gradient as one
batched dot) and as the plain weighted sum under autodiff ("old"), both compiled in one process and timed in
interleaved rounds, with the dense FFN of the same active FLOPs as the yardstick. Prints the paired median
of new/old per row. Arguments: E list, K list, dispatchers; REPS rounds (default 5).

    REPS=7 taskset -c 0 python experiments/probes/ab_combine_weight_grad.py 8,64 1,2 scatter,dropless
"""
import os, sys, time
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
import jax, jax.numpy as jnp, numpy as np
from moe_jax import hostmem; hostmem.keep_freed_memory()
from moe_jax import dispatch
from moe_jax.experts import DenseFFN
from moe_jax.moe import MoEConfig, MoELayer

T, L, D, F = 8192, 1024, 512, 1024
es = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "8,64").split(",")]
ks = [int(v) for v in (sys.argv[2] if len(sys.argv) > 2 else "1").split(",")]
disps = (sys.argv[3] if len(sys.argv) > 3 else "scatter").split(",")
kx, kr, kp = jax.random.split(jax.random.PRNGKey(0), 3)
x = jax.random.normal(kx, (T // L, L, D)); r = jax.random.normal(kr, (T // L, L, D))


def grad(loss, *args):
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True)).lower(*args).compile()


fns = {}
for k in ks:
    ffn = DenseFFN(k * F)
    pd = ffn.init(kp, x)["params"]
    fns[f"K{k} dense"] = (grad(lambda p, x, ffn=ffn: (jnp.sum(ffn.apply({"params": p}, x) * r),
                                                      ffn.apply({"params": p}, x)), pd, x), (pd, x))
    for e in es:
        for disp in disps:
            layer = MoELayer(MoEConfig(num_experts=e, k=k, expert_hidden=F, dispatcher=disp, capacity_factor=1.25))
            params = layer.init({"params": kp, "router": kp}, x, train=True)["params"]

            def loss(params, x, layer=layer):
                y, st = layer.apply({"params": params}, x, train=True, rngs={"router": kp})
                return jnp.sum(y * r) + st.aux_loss, y

            new = grad(loss, params, x)
            dispatch.weighted_sum_k, saved = (lambda y, w: jnp.sum(y * w[..., None], axis=-2)), dispatch.weighted_sum_k
            try:
                old = grad(loss, params, x)
            finally:
                dispatch.weighted_sum_k = saved
            fns[f"K{k} E{e} {disp} new"] = (new, (params, x))
            fns[f"K{k} E{e} {disp} old"] = (old, (params, x))
times = {name: [] for name in fns}
for _ in range(int(os.environ.get("REPS", 5))):
    for name, (c, a) in fns.items():
        jax.block_until_ready(c(*a))
        t0 = time.perf_counter(); jax.block_until_ready(c(*a)); times[name].append(time.perf_counter() - t0)
print(f"# {jax.__version__}; XLA_FLAGS={os.environ['XLA_FLAGS']!r}; affinity={sorted(os.sched_getaffinity(0))}")
print("| row | median ms | x dense | new/old (paired median) |\n|---|---:|---:|---:|")
for name, ts in times.items():
    dense = np.median(times[name.split()[0] + " dense"])
    pair = ""
    if name.endswith(" new"):
        pair = f"{np.median(np.array(ts) / np.array(times[name[:-4] + ' old'])):.3f}"
    print(f"| {name} | {np.median(ts) * 1e3:.1f} | {np.median(ts) / dense:.3f} | {pair} |")
