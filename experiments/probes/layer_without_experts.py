"""Where the MoE layer's time goes as E grows: the whole layer (forward + backward, y returned) at E=8 and
E=64, and the same layer with the experts replaced by the identity ("no experts": router, aux losses, slot
plan, dispatch and combine gathers, and their gradients), with the dense FFN as the yardstick, all in one
process, interleaved rounds. K and the dispatcher from the environment (K=1, DISP=scatter by default).

    REPS=7 taskset -c 0 python experiments/probes/layer_without_experts.py
"""
import os, sys, time
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
import jax, jax.numpy as jnp, numpy as np
from moe_jax import hostmem; hostmem.keep_freed_memory()
from moe_jax.moe import MoEConfig, MoELayer
from moe_jax import experts as ex
from moe_jax.experts import DenseFFN
T, L, D, F = 8192, 1024, 512, 1024
K = int(os.environ.get("K", 1)); DISP = os.environ.get("DISP", "scatter")
kx, kr, kp = jax.random.split(jax.random.PRNGKey(0), 3)
x = jax.random.normal(kx, (T // L, L, D)); r = jax.random.normal(kr, (T // L, L, D))
orig = ex.BatchedExperts.__call__
def ident(self, xe, rows_used=None):
    self.params(xe.shape[-1]); return xe
fns = {}
ffn = DenseFFN(K * F)
pd = ffn.init(kp, x)["params"]
def dloss(p, x):
    y = ffn.apply({"params": p}, x); return jnp.sum(y * r), y
fns["dense"] = (jax.jit(jax.grad(dloss, argnums=(0, 1), has_aux=True)), (pd, x))
for e in [8, 64]:
    cfg = MoEConfig(num_experts=e, k=K, expert_hidden=F, dispatcher=DISP, capacity_factor=1.25)
    layer = MoELayer(cfg)
    params = layer.init({"params": kp, "router": kp}, x, train=True)["params"]
    def loss(params, x, layer=layer):
        y, st = layer.apply({"params": params}, x, train=True, rngs={"router": kp}); return jnp.sum(y * r) + st.aux_loss, y
    fns[f"layer E{e}"] = (jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True)), (params, x))
    rp = {"router": params["router"]}
    ep = params["experts"]
    def rloss(rp, x, ep=ep, layer=layer):
        ex.BatchedExperts.__call__ = ident
        try:
            y, st = layer.apply({"params": {**rp, "experts": ep}}, x, train=True, rngs={"router": kp})
        finally:
            ex.BatchedExperts.__call__ = orig
        return jnp.sum(y * r) + st.aux_loss, y
    g = jax.jit(jax.grad(rloss, argnums=(0, 1), has_aux=True))
    g.lower(rp, x).compile()
    fns[f"noexp E{e}"] = (g, (rp, x))
comp = {k: (f.lower(*a).compile(), a) for k, (f, a) in fns.items()}
times = {k: [] for k in comp}
for rnd in range(int(os.environ.get("REPS", 5))):
    for k, (c, a) in comp.items():
        jax.block_until_ready(c(*a))
        t0 = time.perf_counter(); jax.block_until_ready(c(*a)); times[k].append(time.perf_counter() - t0)
d = np.median(times["dense"])
for k, ts in times.items():
    print(f"{k:12s} {np.median(ts)*1e3:8.1f} ms  x{np.median(ts)/d:.3f}")
