"""The token-choice combine alone: forward + backward of ``sum(combine(y, w) * r)`` at
``y [8, 1024, K, 512]``, ``w [8, 1024, K]``, as the plain weighted sum under autodiff ("plain"), as an einsum
under autodiff ("einsum"), and as ``dispatch.weighted_sum_k`` (the custom backward: the weights' gradient as
one batched dot). Median of 9 interleaved calls; gradients checked against "plain" first.

    for k in 1 2; do K=$k taskset -c 0 python experiments/probes/combine_weight_grad_alone.py; done
"""
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
from moe_jax import hostmem  # noqa: E402

hostmem.keep_freed_memory("keep")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moe_jax import dispatch  # noqa: E402

G, S, K, D = 8, 1024, int(os.environ.get("K", 1)), 512
k = jax.random.split(jax.random.PRNGKey(0), 3)
y = jax.random.normal(k[0], (G, S, K, D))
w = jax.random.uniform(k[1], (G, S, K))
r = jax.random.normal(k[2], (G, S, D))
variants = dict(plain=lambda y, w: jnp.sum(y * w[..., None], axis=2),
                einsum=lambda y, w: jnp.einsum("gskd,gsk->gsd", y, w),
                weighted_sum_k=dispatch.weighted_sum_k)
fns = {n: jax.jit(jax.value_and_grad(lambda y, w, r, c=c: jnp.sum(c(y, w) * r), argnums=(0, 1)))
       for n, c in variants.items()}
ref = fns["plain"](y, w, r)
for n, f in fns.items():
    out = f(y, w, r)
    np.testing.assert_allclose(out[1][0], ref[1][0], rtol=1e-5)
    np.testing.assert_allclose(out[1][1], ref[1][1], rtol=1e-4, atol=1e-3)
ts = {n: [] for n in fns}
for _ in range(9):
    for n, f in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(y, w, r))
        ts[n].append(time.perf_counter() - t0)
print(f"K={K}:", ", ".join(f"{n} {1e3 * np.median(v):.2f} ms" for n, v in ts.items()))
