"""Why `experts._rows_t_matmul` splits weight-gradient tiles whose rows are a multiple of 128. Two probes, run
one after the other:

1. XLA:CPU's transpose of r x F rows (with the fused GELU scale and dynamic slice of the backward loop, as in its
   HLO), ms per MiB, for row counts r around multiples of 128;
2. the weight-gradient product u.T @ v of the backward loop three ways (materialized transpose + YNNPACK dot;
   plain dot; the first r-16 rows transposed and the last 16 as a plain dot), for row counts r that are and are
   not multiples of 128.

    taskset -c 0 python experiments/probes/transpose_rows_multiple_of_128.py
"""
import os, time
os.environ["XLA_FLAGS"]="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
from moe_jax import hostmem; hostmem.keep_freed_memory("keep")
import jax, jax.numpy as jnp, numpy as np
def bench(f,*a,n=10):
    jax.block_until_ready(f(*a)); ts=[]
    for _ in range(5):
        t=time.perf_counter()
        for _ in range(n): y=f(*a)
        jax.block_until_ready(y); ts.append((time.perf_counter()-t)/n)
    return np.median(ts)*1e3
for F in (1024,512):
  h=jax.random.normal(jax.random.key(0),(10240,F))
  out=[]
  for r in (128,144,256,272,384,512,528,640,768,784,1024,1040,1280,1536,1552,2048,2064):
    p0=jax.random.normal(jax.random.key(1),(r,F))
    def f(p0,h,i):
        hs=jax.lax.dynamic_slice_in_dim(h,i,r)
        return jax.lax.optimization_barrier((hs*((p0+1)*0.5)).T)
    t=bench(jax.jit(f),p0,h,1333)
    out.append(f"{r}:{t/(r*F*4/2**20):.2f}")
  print("F",F,"ms per MiB:"," ".join(out))
for F,D in ((1024,512),(512,1024)):
  h=jax.random.normal(jax.random.key(0),(10240,F)); vv=jax.random.normal(jax.random.key(2),(10240,D))
  for r in (256,512,1024,2048,1040):
    p0=jax.random.normal(jax.random.key(1),(r,F))
    def u_v(p0,h,vv,i):
        return jax.lax.dynamic_slice_in_dim(h,i,r)*((p0+1)*0.5), jax.lax.dynamic_slice_in_dim(vv,i,r)
    def a(p0,h,vv,i):
        u,v=u_v(p0,h,vv,i); return jax.lax.optimization_barrier(u.T)@v
    def b(p0,h,vv,i):
        u,v=u_v(p0,h,vv,i); return u.T@v
    def c(p0,h,vv,i):
        u,v=u_v(p0,h,vv,i); q=r-16
        return jax.lax.optimization_barrier(u[:q].T)@v[:q] + u[q:].T@v[q:]
    res=[jax.jit(f)(p0,h,vv,1333) for f in (a,b,c)]
    np.testing.assert_allclose(res[0],res[1],rtol=1e-4,atol=1e-3); np.testing.assert_allclose(res[0],res[2],rtol=1e-4,atol=1e-3)
    print(f"F={F} D={D} r={r}: transpose+ynn {bench(jax.jit(a),p0,h,vv,1333):.2f}  plain {bench(jax.jit(b),p0,h,vv,1333):.2f}  split {bench(jax.jit(c),p0,h,vv,1333):.2f}")
