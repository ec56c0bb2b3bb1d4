"""The weight-gradient stack at E=64 (session 9): 64 experts of 128 rows, [128, 512]^T [128, 1024] per expert,
as a scan whose outputs are stacked into [64, 512, 1024] (dw_scan, what experts.sorted_rows_ffn's backward
does), as the same loop without the stack (dw_sum: one value of each product kept, the floor of the loop), and
as one batched dot (dw_batched, which writes the stack directly but needs the same row count for every
expert); and the forward products as a loop with the weights sliced per expert against one batched dot.

    taskset -c 0 python docs/results/cpu_session9/stack.py
"""
import os
os.environ["XLA_FLAGS"]="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
import time, jax, jax.numpy as jnp, numpy as np
from moe_jax import hostmem
hostmem.keep_freed_memory()
E=64
w = jax.random.normal(jax.random.PRNGKey(0),(E,512,1024), jnp.float32)
x = jax.random.normal(jax.random.PRNGKey(1),(E*128,512), jnp.float32)
dy = jax.random.normal(jax.random.PRNGKey(2),(E*128,1024), jnp.float32)
def fwd_loop(w, x):
    def body(e, y):
        xe = jax.lax.dynamic_slice_in_dim(x, e*128, 128)
        return jax.lax.dynamic_update_slice_in_dim(y, xe @ w[e], e*128, 0)
    return jax.lax.fori_loop(0, E, body, jnp.zeros((E*128,1024)))
def fwd_batched(w, x):
    return jnp.einsum("end,edf->enf", x.reshape(E,128,512), w).reshape(E*128,1024)
def dw_scan(x, dy):
    def body(c, e):
        xe = jax.lax.dynamic_slice_in_dim(x, e*128, 128)
        de = jax.lax.dynamic_slice_in_dim(dy, e*128, 128)
        return c, jax.lax.optimization_barrier(xe.T) @ de
    return jax.lax.scan(body, 0., jnp.arange(E))[1]
def dw_sum(x, dy):
    def body(c, e):
        xe = jax.lax.dynamic_slice_in_dim(x, e*128, 128)
        de = jax.lax.dynamic_slice_in_dim(dy, e*128, 128)
        return c + (jax.lax.optimization_barrier(xe.T) @ de)[0,0], None
    return jax.lax.scan(body, 0., jnp.arange(E))[0]
def dw_batched(x, dy):
    return jnp.einsum("end,enf->edf", x.reshape(E,128,512), dy.reshape(E,128,1024))
def t(f, *a):
    f = jax.jit(f)
    jax.block_until_ready(f(*a))
    ts=[]
    for _ in range(7):
        s=time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter()-s)
    return np.median(ts)*1e3
for _ in range(2):
  for name, f, a in [("fwd_loop", fwd_loop, (w,x)), ("fwd_batched", fwd_batched,(w,x)), ("dw_scan", dw_scan,(x,dy)), ("dw_sum", dw_sum,(x,dy)), ("dw_batched", dw_batched,(x,dy))]:
    print(name, round(t(f,*a),1))
