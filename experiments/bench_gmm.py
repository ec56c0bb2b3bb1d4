"""Check and time the grouped-matmul kernels of ``moe_jax.gmm`` on a Hopper GPU (the dropless 'gmm' path).

    python experiments/bench_gmm.py                              # check, then sweep tilings at T*K = 16384 rows
    python experiments/bench_gmm.py --tokens 65536 --d-model 1024 --hidden 4096   # the layer bar's shape
    python experiments/bench_gmm.py --experts 8,64 --json /tmp/gmm_tiling.json   # also write the best tilings
    python experiments/bench_layer.py --dtype bfloat16 --dispatchers gmm --gmm-tiling /tmp/gmm_tiling.json

1. **Check** (``--check-only`` stops after it): on ``M = 1000`` rows (not a multiple of any tile), ``D = 128``,
   ``F = 256``, 8 groups of random sizes with one empty group, bfloat16: the forward and both gradients of
   ``grouped_matmul(..., backend='mosaic')`` against the ``'xla'`` kernels on the same bfloat16 inputs (the
   largest error relative to the largest magnitude of each output). Exits 1 if any exceeds 2e-2.
2. **Sweep**: for each E, ``M = T*K`` rows split among E groups by uniform random routing (what a fresh
   router gives), bfloat16, the three GEMMs of one expert projection ``[M, D] · [E, D, F]``:
   forward ``x · w[g]``, input gradient ``dy · w[g]ᵀ`` (the same kernel, transposed weights) and weight
   gradient ``x[rows]ᵀ · dy[rows]``, each for a few tilings, against one dense ``[M, D] · [D, F]`` matmul of
   the same FLOPs (cuBLAS through XLA). Time per call: the median over 5 rounds of 20 back-to-back calls
   (wall clock, one sync per round). The best tiling (forward + input gradient together, weight gradient
   alone) of the largest E goes to ``--json`` as ``fwd`` and ``dw``, with the best of each forward kernel as
   ``fwd_jax`` and ``fwd_ws`` (for ``bench_layer.py``'s rows ``gmm_jax`` and ``gmm_ws``).

The forward and input-gradient GEMMs have two kernels (``gmm.Tiling.kernel``): ``'jax'``, JAX's
``ragged_dot_mgpu``, and ``'ws'``, ``moe_jax.gmm_mgpu`` (warp-specialized). The check runs both.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# (block_m, block_n, block_k, max_concurrent_steps, grid_block_n, kernel): 'jax' = JAX's ragged_dot_mgpu, 'ws' =
# moe_jax.gmm_mgpu (warp-specialized, a CTA computes block_m x 2*block_n)
FWD_SWEEP = [(128, 128, 64, 4, 4, "jax"), (128, 64, 64, 4, 4, "jax"), (64, 128, 64, 4, 1, "jax"),
             (128, 128, 64, 3, 4, "ws"), (128, 128, 64, 2, 4, "ws"), (128, 128, 64, 3, 1, "ws"),
             (128, 128, 64, 3, 8, "ws"), (128, 64, 64, 4, 4, "ws"), (64, 128, 64, 4, 4, "ws")]
DW_SWEEP = [(64, 256, 64, 4, 1), (128, 128, 64, 4, 1), (64, 128, 64, 4, 1), (128, 128, 64, 4, 4)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="T")
    p.add_argument("--k", type=int, default=2, help="K: the GEMMs have M = T*K rows")
    p.add_argument("--d-model", type=int, default=512, help="D")
    p.add_argument("--hidden", type=int, default=1024, help="F")
    p.add_argument("--experts", default="8,64", help="comma-separated E values")
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--kernels", default="jax,ws",
                   help="forward kernels to check and sweep: 'jax' (ragged_dot_mgpu), 'ws' (moe_jax.gmm_mgpu)")
    p.add_argument("--json", default=None, help="write the best tilings here (for bench_layer --gmm-tiling)")
    p.add_argument("--backend", default="mosaic", choices=["mosaic", "xla"],
                   help="'xla': dry-run this script off a GPU (the check then compares xla with itself)")
    return p.parse_args(argv)


def timeit(fn, *args, calls=20, rounds=5):
    import jax
    import numpy as np

    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return float(np.median(times))


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (NaN if either holds a NaN)."""
    import numpy as np

    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check(jax, jnp, np, gmm, backend, kernels=("jax", "ws")):
    m, d, f, g = 1000, 128, 256, 8
    kx, kw, kr, ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (m, d), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (g, d, f), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16)
    r = jax.random.normal(kr, (m, f), jnp.float32).astype(jnp.bfloat16)
    cuts = np.sort(np.asarray(jax.random.randint(ks, (g - 1,), 0, m)))
    sizes = np.diff(np.concatenate([[0], cuts, [m]]))
    sizes[3] += sizes[2]
    sizes[2] = 0  # one empty group
    gs = jnp.asarray(sizes, jnp.int32)

    def run(backend):
        def loss(x, w):
            y = gmm.grouped_matmul(x, w, gs, backend=backend)
            return jnp.sum((y * r).astype(jnp.float32)), y
        (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
        return [np.asarray(a, np.float32) for a in (y, dx, dw)]

    ok = True
    reference = run("xla")
    fwds = [t for t in (gmm.JAX_FWD_TILING, gmm.WS_TILING) if t.kernel in kernels]
    for fwd in fwds:  # both forward kernels ('jax' and 'ws')
        gmm.set_tiling(fwd=fwd)
        try:
            outs = run(backend)
        except Exception as err:  # noqa: BLE001  (report which kernel failed, then fail the check)
            print(f"check fwd kernel {fwd.kernel!r}: {type(err).__name__}: {str(err)[:300]}", flush=True)
            ok = False
            continue
        finally:
            gmm.set_tiling(**gmm.DEFAULT_TILING)
        for name, a, b in zip(("y", "dx", "dw"), outs, reference):
            err = rel_err(a, b)
            ok &= bool(err <= 2e-2)  # False for NaN too
            print(f"check fwd kernel {fwd.kernel!r} {name:2s} {a.shape}: max |{backend} - xla| / max |xla| = "
                  f"{err:.2e}", flush=True)
    print(f"check group sizes {sizes.tolist()}: {'PASS' if ok else 'FAIL'}", flush=True)

    # the whole layer: MoELayer dropless 'gmm' against dropless 'blocks' (same params), output and gradients
    from moe_jax.moe import MoEConfig, MoELayer

    xl = jax.random.normal(kx, (4, 256, 128), jnp.float32).astype(jnp.bfloat16)
    def run_layer(impl):
        cfg = MoEConfig(num_experts=8, k=2, router="top_k", expert_hidden=256, dispatcher="dropless",
                        dropless_impl=impl, jitter_eps=0.0)
        layer = MoELayer(cfg, dtype=jnp.bfloat16)
        params = layer.init({"params": kw, "router": kw}, xl, train=True)["params"]

        def loss(p, x):
            y, stats = layer.apply({"params": p}, x, train=True, rngs={"router": kw})
            return jnp.sum(y.astype(jnp.float32) * y.astype(jnp.float32)) + stats.aux_loss, y
        (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, xl)
        return [np.asarray(a, np.float32) for a in [y] + jax.tree.leaves(grads)]

    resolve = gmm.resolve_backend
    if backend == "xla":  # dry run off a GPU: the layer's 'gmm' runs the 'xla' kernels
        gmm.resolve_backend = lambda backend="auto": "xla"
    layer_ok = True
    try:
        ref = run_layer("blocks")
        for fwd in fwds:
            gmm.set_tiling(fwd=fwd)
            errs = [rel_err(a, b) for a, b in zip(run_layer("gmm"), ref)]
            gmm.set_tiling(**gmm.DEFAULT_TILING)
            this_ok = all(err <= 3e-2 for err in errs)  # False for NaN too
            layer_ok &= this_ok
            print(f"check MoELayer dropless gmm (fwd kernel {fwd.kernel!r}) vs blocks, rel. errors of y and "
                  f"{len(errs) - 1} gradients: {', '.join(f'{err:.1e}' for err in errs)}: "
                  f"{'PASS' if this_ok else 'FAIL'}", flush=True)
    finally:
        gmm.resolve_backend = resolve
        gmm.set_tiling(**gmm.DEFAULT_TILING)
    return ok and layer_ok


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moe_jax import gmm

    dev = jax.devices()[0]
    print(f"# bench_gmm: jax {jax.__version__}; {dev.device_kind}; "
          f"compute capability {getattr(dev, 'compute_capability', '?')}", flush=True)
    backend = args.backend
    reason = gmm.mosaic_unavailable_reason()
    if reason and backend == "mosaic":
        raise SystemExit(f"bench_gmm needs the Mosaic GPU kernels: {reason} (--backend xla dry-runs it)")
    kernels = tuple(args.kernels.split(","))
    if not set(kernels) <= set(gmm.KERNELS):
        raise SystemExit(f"--kernels: choose from {','.join(gmm.KERNELS)}, got {args.kernels!r}")
    if not check(jax, jnp, np, gmm, backend, kernels):
        raise SystemExit(1)
    if args.check_only:
        return
    t, k, d, f = args.tokens, args.k, args.d_model, args.hidden
    m = t * k
    flops = 2 * m * d * f
    best = {}
    print("\n| E | GEMM | tiling (bm, bn, bk, steps, gbn, kernel) | ms | TFLOP/s | vs dense matmul |\n"
          "|---:|---|---|---:|---:|---:|")
    for e in [int(v) for v in args.experts.split(",")]:
        kx, kw, kr, ks = jax.random.split(jax.random.key(e), 4)
        x = jax.random.normal(kx, (m, d), jnp.float32).astype(jnp.bfloat16)
        dy = jax.random.normal(kr, (m, f), jnp.float32).astype(jnp.bfloat16)
        w = jax.random.normal(kw, (e, d, f), jnp.float32).astype(jnp.bfloat16)
        gs = jnp.bincount(jax.random.randint(ks, (m,), 0, e), length=e).astype(jnp.int32)
        dense = timeit(jax.jit(lambda a, b: a @ b), x, w[0])
        print(f"| {e} | dense [{m},{d}]·[{d},{f}] | | {dense * 1e3:.3f} | {flops / dense / 1e12:.0f} | 100% |",
              flush=True)
        results = {"fwd": [], "dw": []}
        fwd_sweep = [tup for tup in FWD_SWEEP if tup[5] in kernels]
        for kind, sweep in (("fwd", fwd_sweep), ("dw", DW_SWEEP)):
            for tup in sweep:
                tiling = gmm.Tiling(*tup)
                gmm.set_tiling(**{kind: tiling})
                ops = ([("x·w[g]", lambda x, w: gmm._fwd_kernel(backend, x, w, gs, False), (x, w)),
                        ("dy·w[g]ᵀ", lambda dy, w: gmm._fwd_kernel(backend, dy, w, gs, True), (dy, w))]
                       if kind == "fwd" else
                       [("x[g]ᵀ·dy[g]", lambda x, dy: gmm._dw_kernel(backend, x, dy, gs), (x, dy))])
                total = 0.0
                for name, fn, fargs in ops:
                    try:
                        s = timeit(jax.jit(fn), *fargs)
                    except Exception as err:  # noqa: BLE001  (a tiling the kernel refuses: report, go on)
                        print(f"| {e} | {name} | {tup} | failed: {type(err).__name__}: "
                              f"{str(err).splitlines()[0][:120]} | | |", flush=True)
                        total = float("inf")
                        break
                    total += s
                    print(f"| {e} | {name} | {tup} | {s * 1e3:.3f} | {flops / s / 1e12:.0f} | "
                          f"{100 * dense / s:.0f}% |", flush=True)
                results[kind].append((total, tiling))
        gmm.set_tiling(**gmm.DEFAULT_TILING)
        results["fwd_jax"] = [r for r in results["fwd"] if r[1].kernel == "jax"]
        results["fwd_ws"] = [r for r in results["fwd"] if r[1].kernel == "ws"]
        for kind in results:  # 'fwd': the best of both kernels; 'fwd_jax', 'fwd_ws': the best of each
            ok = [r for r in results[kind] if np.isfinite(r[0])]
            if ok:
                best[kind] = dataclasses.asdict(min(ok, key=lambda r: r[0])[1])
        print(f"best at E={e}: {best}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(best, fh, indent=1)


if __name__ == "__main__":
    main()
