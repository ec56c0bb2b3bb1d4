"""Benchmark one MoE layer against the dense FFN of the same active FLOPs (forward + backward).

    taskset -c 0 python experiments/bench_layer.py                       # the full CPU table (docs/perf.md)
    taskset -c 0 python experiments/bench_layer.py --quick               # smoke run, small T
    taskset -c 0 python experiments/bench_layer.py --experts 8,64 --k 2 --dispatchers scatter
    python experiments/bench_layer.py --dtype bfloat16 --dispatchers scatter,dropless,ragged_dot  # on a GPU

What is timed: ``jax.jit(jax.grad(loss, has_aux=True))`` w.r.t. the layer's parameters and its input, where
``loss = sum(y * R) + aux_loss`` for a fixed random ``R`` and ``y, stats = MoELayer(x, train=True)`` on
``x [T/L, L, D]`` (router ``top_k``, no jitter, GELU experts, capacity factor ``--capacity-factor``); the
function returns the gradients and ``y`` (``grad_of_loss``). The baseline is ``DenseFFN`` of width ``K * F`` on
the same ``x`` with ``loss = sum(y * R)``: the same useful (active) FLOPs, ``3 * 2 * 2 * T * D * K * F`` for
forward + backward. Returning ``y`` matters: without it (``--dead-output``, the definition of the oldest tables
in git history) XLA drops the dense FFN's forward output product, which nothing reads when the loss is linear in
y, and the baseline runs 5 of its 6 GEMMs.

Rows (``--dispatchers``):

* ``einsum``: one-hot einsum dispatch with ``MoEConfig.group_size='auto'`` (the einsum picks its own group
  size, see ``dispatch.einsum_group_size``) and ``capacity_compute='auto'`` (on CPU 'filled': the experts run
  as a per-expert loop on all ``G*C`` buffer rows);
* ``einsum_full``: the same with ``capacity_compute='full'`` (one batched matmul over the buffer, the
  other layout of the experts, for an A/B on CPU);
* ``einsum_seq``: one-hot einsum with one group per sequence (``group_size=None``, S = L);
* ``einsum_autodiff``: ``einsum`` without its custom backward, for an A/B in one process: plain autodiff of the
  combine einsum, whose backward spends a fifth ``[G,S,E,C]`` einsum on the routing weights' gradient
  (``dispatch.einsum_combine_weighted`` gathers it instead), and the products as ``jnp.einsum`` (XLA:CPU then
  transposes D into the minor position of the ``[E, G*C, D]`` buffers; ``dispatch.einsum_dispatch`` avoids it);
* ``scatter``: the capacity buffer (gathers), groups of one sequence, ``capacity_compute='auto'`` (on CPU
  'filled': each expert runs on its filled rows only, ``BatchedExperts(x, rows_used)``);
* ``scatter_full``: the same with ``capacity_compute='full'`` (one batched matmul over all ``G*C`` rows);
* ``dropless``: dropless with ``dropless_impl='auto'`` (the backend's default: ``grouped`` on CPU,
  ``blocks`` on GPU);
* ``grouped``: dropless on rows sorted by expert, a loop over experts of one FFN per chunk of rows
  (``experts.sorted_rows_ffn``);
* ``ragged_dot``: dropless with ``jax.lax.ragged_dot`` (on CPU it costs E times the useful work);
* ``blocks``: dropless, block-padded rows with per-block gathered weights (``dropless_impl='blocks'``);
* ``gmm``: dropless on rows sorted by expert through ragged GEMM kernels forward and backward
  (``dropless_impl='gmm'``, ``moe_jax.gmm``: Pallas Mosaic GPU kernels; Hopper GPUs, bfloat16).
  ``--gmm-tiling FILE`` sets their tiles from the JSON that ``experiments/bench_gmm.py --json`` writes.
  ``gmm_jax`` / ``gmm_ws``: the same with the forward and input-gradient GEMMs forced to JAX's
  ``ragged_dot_mgpu`` / to the warp-specialized ``moe_jax.gmm_mgpu`` (tiles: the JSON's ``fwd_jax`` /
  ``fwd_ws`` if given, else ``gmm.JAX_FWD_TILING`` / ``gmm.WS_TILING``).

Default rows: ``einsum, scatter, scatter_full, dropless`` on CPU; ``einsum, einsum_seq, scatter, grouped,
ragged_dot, blocks, gmm`` on a GPU/TPU. With ``--matmul`` the table also gives each row's speed as a fraction
of one dense matmul of the same FLOPs ("vs one matmul").

Measurement: every function is compiled first; then ``--repeats`` rounds, each round calling the dense
baseline and every MoE variant of the same K once, in turn, in this one process (so slow drifts of a shared
machine hit all of them alike). Reported per row: the median time, the ratio to the dense baseline (the
median over rounds of ``t_moe / t_dense`` of the same round), the achieved GFLOP/s of useful work (active
FLOPs / median time), and XLA's compiled memory footprint (arguments + outputs + temporaries, from
``compiled.memory_analysis()``; this is the peak the buffer assignment plans for, not an RSS measurement).
The ``drop`` column is the fraction of token-expert assignments dropped by the capacity limit for this input.
With two or more E per row label, a second table gives the cost against E at fixed active FLOPs (``flatness``):
``t(E_max) / t(E_min)`` of each round, its median, min and max over rounds (issue 7's bar: E=64 over E=8 at
most 1.15); ``--json`` writes it too.

CPU pinning: unless ``XLA_FLAGS`` is already set, the script runs XLA on one CPU thread
(``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``); start it under ``taskset -c 0``.
Host memory: ``--host-malloc keep`` (the default) applies ``moe_jax.hostmem.keep_freed_memory`` first, so
that glibc reuses freed memory instead of page-faulting every large buffer afresh on each call; the header
line says which policy ran.
"""
import argparse
import contextlib
import json
import os
import platform
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)

DISPATCHERS = ("einsum", "einsum_full", "einsum_seq", "einsum_autodiff", "scatter", "scatter_full", "dropless",
               "grouped", "ragged_dot", "blocks", "gmm", "gmm_jax", "gmm_ws")
CPU_DEFAULT = ("einsum", "scatter", "scatter_full", "dropless")
ACCEL_DEFAULT = ("einsum", "einsum_seq", "scatter", "grouped", "ragged_dot", "blocks", "gmm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="T, tokens per step (default 8192)")
    p.add_argument("--seq-len", type=int, default=1024, help="L: x is [T/L, L, D]; capacity groups are one "
                   "sequence unless the dispatcher picks its own (default 1024)")
    p.add_argument("--d-model", type=int, default=512, help="D (default 512)")
    p.add_argument("--hidden", type=int, default=1024, help="F, the expert width (default 1024)")
    p.add_argument("--experts", default="8,16,32,64", help="comma-separated E values")
    p.add_argument("--k", default="1,2", help="comma-separated K values")
    p.add_argument("--dispatchers", default=None,
                   help=f"comma-separated subset of {','.join(DISPATCHERS)} (default: all but ragged_dot on "
                        "CPU, all on GPU/TPU)")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the FFN and expert weights (the router's stay float32). float32 (the default) "
                        "is mixed precision with --dtype bfloat16: every step casts the weights to bfloat16 "
                        "and their gradients back, a cost that grows with E*D*F; bfloat16 leaves the casts out")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (medians are reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per function after compiling")
    p.add_argument("--calls", type=int, default=1,
                   help="calls per timed sample, back to back with one sync at the end (time / calls). 1 (the "
                        "default) syncs after every call; on a GPU, >1 lets the host enqueue the next call while "
                        "the device runs, as a training loop does")
    p.add_argument("--quick", action="store_true", help="smoke run: T=1024, L=256, D=128, F=256, 2 repeats")
    p.add_argument("--matmul", action="store_true",
                   help="also time one dense matmul of the same FLOPs as each K's dense FFN (GPU roofline)")
    p.add_argument("--gemm-calls", action="store_true",
                   help="instead: time one expert's GEMMs ([t, D] x [D, F] forward, [D, t] x [t, F] weight "
                        "gradient) for t = 32..1024 rows, per call (the per-expert fixed cost)")
    p.add_argument("--floor", action="store_true",
                   help="also time the experts alone (BatchedExperts forward+backward, no router, no dispatch) "
                        "on [E, C_total, D] (the capacity buffer's rows) and on [E, T*K/E, D] (perfect balance, "
                        "no slack) as one batched matmul, and on [E, T*K/E, D] as the per-expert loop of the "
                        "capacity path ('floor_loop': BatchedExperts(x, rows_used) with every row used): what "
                        "the expert GEMMs cost by themselves at this E")
    p.add_argument("--probes", action="store_true",
                   help="instead: CPU probes behind docs/perf.md: one projection [T/L, L, D] x [D, F] forward + "
                        "backward with the token axes kept (3-D) against flattened (2-D, experts.on_rows); "
                        "writing a fresh float32 [64, D, F] buffer (an E=64 weight gradient) against adding two "
                        "existing ones; the dense FFN and 64 experts on T/64 rows each; with page faults and "
                        "kernel time per call (compare --host-malloc keep and default)")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    p.add_argument("--gmm-tiling", default=None,
                   help="JSON file of the 'gmm' kernels' tiles, {'fwd': {...}, 'dw': {...}} (bench_gmm.py --json)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, trace 3 calls of every row with jax.profiler into DIR/<row>/ and print the "
                        "device time per call by kernel (GPU) or by XLA op (CPU: exclusive time, the ops inside a "
                        "loop not counted again in it; the script adds --xla_cpu_enable_xprof_traceme=true to the "
                        "XLA_FLAGS it sets, add it yourself if you set XLA_FLAGS), "
                        "grouped: ragged GEMM kernels, other GEMMs, sorts, buffer writes, slices, fills, "
                        "transposes, gathers, the rest; and the idle time between kernels. PROFILE_TOP=n in the "
                        "environment lists the n largest kernels (default 12)")
    p.add_argument("--dead-output", action="store_true",
                   help="time the gradients only, not the layer's output y (the definition of the oldest tables): the "
                        "loss is linear in y, so XLA drops the dense FFN's forward output product and the dense "
                        "baseline runs 5 of its 6 GEMMs; an MoE layer still computes its experts' outputs, which "
                        "the routing weights' gradient reads. Default: y is an output of the timed function, as "
                        "in a model whose next layer reads it")
    p.add_argument("--no-pin", action="store_true", help="do not set single-thread XLA CPU flags")
    p.add_argument("--host-malloc", default=None, choices=["keep", "default"],
                   help="'keep' (default): glibc keeps freed memory for the next call (moe_jax.hostmem); "
                        "'default': glibc's own policy (every block over 32 MiB is a fresh mmap)")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.seq_len, args.d_model, args.hidden = 1024, 256, 128, 256
        args.repeats = min(args.repeats, 2)
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.no_pin and "XLA_FLAGS" not in os.environ:
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        if args.profile:  # XLA:CPU names its ops in a trace only with this flag (no effect on GPU kernels)
            os.environ["XLA_FLAGS"] += " --xla_cpu_enable_xprof_traceme=true"
    from moe_jax import hostmem
    host_malloc = hostmem.keep_freed_memory(args.host_malloc)  # before JAX's first computation

    import jax
    import jax.numpy as jnp
    import numpy as np

    from moe_jax import dispatch
    from moe_jax.capacity import compute_capacity
    from moe_jax.experts import BatchedExperts, DenseFFN
    from moe_jax.moe import MoEConfig, MoELayer

    backend = jax.default_backend()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    from moe_jax import gmm
    fwd_tiling = {"gmm_jax": gmm.JAX_FWD_TILING, "gmm_ws": gmm.WS_TILING}  # rows gmm_jax, gmm_ws
    if args.gmm_tiling:
        tiles = gmm.read_tilings(args.gmm_tiling)
        gmm.set_tiling(fwd=tiles.get("fwd"), dw=tiles.get("dw"))
        for name in fwd_tiling:  # gmm_jax <- fwd_jax, gmm_ws <- fwd_ws
            fwd_tiling[name] = tiles.get("fwd_" + name[4:], fwd_tiling[name])
        print(f"# gmm tiling from {args.gmm_tiling}: {gmm._TILING}; rows gmm_jax/gmm_ws: {fwd_tiling}", flush=True)
    if args.gemm_calls:
        return gemm_calls(args, dtype)
    if args.probes:
        return probes(args, dtype)
    experts_list = [int(v) for v in args.experts.split(",")]
    k_list = [int(v) for v in args.k.split(",")]
    if args.dispatchers:
        names = args.dispatchers.split(",")
    else:
        names = list(CPU_DEFAULT if backend == "cpu" else ACCEL_DEFAULT)
    for n in names:
        if n not in DISPATCHERS:
            raise SystemExit(f"--dispatchers: unknown {n!r}; choose from {','.join(DISPATCHERS)}")
    t, l, d, f = args.tokens, args.seq_len, args.d_model, args.hidden
    if t % l:
        raise SystemExit(f"--tokens {t} must be a multiple of --seq-len {l}")
    b = t // l

    kx, kr, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (b, l, d), jnp.float32).astype(dtype)
    r = jax.random.normal(kr, (b, l, d), jnp.float32).astype(dtype)

    def moe_config(name, e, k):
        kw = dict(num_experts=e, k=k, router="top_k", expert_hidden=f, activation="gelu",
                  capacity_factor=args.capacity_factor, jitter_eps=0.0)
        if name in ("einsum", "einsum_autodiff"):
            kw.update(dispatcher="einsum", group_size="auto")
        elif name == "einsum_full":
            kw.update(dispatcher="einsum", group_size="auto", capacity_compute="full")
        elif name == "einsum_seq":
            kw.update(dispatcher="einsum")
        elif name == "scatter":
            kw.update(dispatcher="scatter")  # capacity_compute='auto': 'filled' on CPU, 'full' elsewhere
        elif name == "scatter_full":
            kw.update(dispatcher="scatter", capacity_compute="full")
        elif name == "dropless":
            kw.update(dispatcher="dropless", dropless_impl="auto")
        else:
            kw.update(dispatcher="dropless", dropless_impl="gmm" if name.startswith("gmm") else name)
        return MoEConfig(**kw)

    def run_einsum_autodiff(x, decision, experts, capacity, slot_order="choice_major", **_):
        # the einsum dispatcher without its custom backward (row einsum_autodiff): autodiff through both masks,
        # and the einsums written as jnp.einsum (XLA:CPU put D before E*C in their outputs)
        plan = dispatch.make_capacity_plan(decision, capacity, slot_order)
        dispatch_mask, combine_mask = dispatch.einsum_masks(plan, x.shape[1], x.dtype)
        g, _, e, c = dispatch_mask.shape
        ye = experts(jnp.einsum("gsec,gsd->egcd", dispatch_mask, x).reshape(e, g * c, x.shape[-1]))
        y = jnp.einsum("gsec,egcd->gsd", combine_mask, ye.reshape(e, g, c, ye.shape[-1]))
        return dispatch.DispatchResult(y, plan.kept, capacity)

    @contextlib.contextmanager
    def traced_as(name):
        # what a row changes while it is traced: einsum_autodiff swaps the registered einsum dispatcher,
        # gmm_jax / gmm_ws set the forward kernel's tiling (both are read at trace time)
        if name == "einsum_autodiff":
            saved = dispatch.DISPATCHERS["einsum"]
            dispatch.DISPATCHERS["einsum"] = run_einsum_autodiff
            try:
                yield
            finally:
                dispatch.DISPATCHERS["einsum"] = saved
        else:
            old = gmm.set_tiling(fwd=fwd_tiling[name])
            try:
                yield
            finally:
                gmm.set_tiling(**old)

    param_dtype = jnp.bfloat16 if args.param_dtype == "bfloat16" else jnp.float32

    def cast_params(params):
        # --param-dtype: every weight but the router's (which computes in float32 whatever the model's dtype)
        flat = jax.tree_util.tree_flatten_with_path(params)
        leaves = [v if any(getattr(k, "key", None) == "router" for k in path) else v.astype(param_dtype)
                  for path, v in flat[0]]
        return jax.tree_util.tree_unflatten(flat[1], leaves)

    def timed_grad(loss):
        return grad_of_loss(jax, loss, args.dead_output)

    def build_moe(cfg):
        layer = MoELayer(cfg, dtype=dtype)
        params = jax.jit(lambda x: layer.init({"params": kp, "router": kp}, x, train=True)["params"])(x)
        params = cast_params(params)

        def loss(params, x):
            y, stats = layer.apply({"params": params}, x, train=True, rngs={"router": kp})
            return jnp.sum((y * r).astype(jnp.float32)) + stats.aux_loss, y

        def drop(params, x):
            return layer.apply({"params": params}, x, train=True, rngs={"router": kp})[1].metrics["drop_fraction"]

        return timed_grad(loss), params, jax.jit(drop)

    def build_floor(e, k, rows, loop=False):
        # the expert FFNs alone, forward + backward, on `rows` rows per expert: one batched matmul, or
        # (loop=True) the capacity path's per-expert loop with every row used
        xe = jax.random.normal(kx, (e, rows, d), jnp.float32).astype(dtype)
        re = jax.random.normal(kr, (e, rows, d), jnp.float32).astype(dtype)
        experts = BatchedExperts(e, d, f, activation="gelu", dtype=dtype)
        params = cast_params(experts.init(kp, xe)["params"])

        def loss(params, xe):
            # rows_used is computed from the input so that XLA cannot constant-fold the loop's row-count
            # switches (the layer's counts are data): rows + 0 * (a count no compiler can know)
            used = jnp.full((e,), rows, jnp.int32) + (jnp.isnan(xe[0, 0, 0])).astype(jnp.int32) if loop else None
            ye = experts.apply({"params": params}, xe, used)
            return jnp.sum((ye * re).astype(jnp.float32)), ye

        return timed_grad(loss), (params, xe)

    def build_dense(k):
        ffn = DenseFFN(k * f, activation="gelu", dtype=dtype)
        params = cast_params(ffn.init(kp, x)["params"])

        def loss(params, x):
            y = ffn.apply({"params": params}, x)
            return jnp.sum((y * r).astype(jnp.float32)), y

        return timed_grad(loss), params

    def build_matmul(k):
        # one [T, D] x [D, 3*2*K*F] matmul = the dense FFN's forward+backward FLOPs in a single dot
        a = jax.random.normal(kx, (t, d), jnp.float32).astype(dtype)
        w = jax.random.normal(kr, (d, 6 * k * f), jnp.float32).astype(dtype)
        return jax.jit(lambda a, w: a @ w), (a, w)

    def memory_mib(compiled):
        try:
            m = compiled.memory_analysis()
            total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            total -= getattr(m, "alias_size_in_bytes", 0)
            return total / 2 ** 20
        except Exception:  # noqa: BLE001  (not every backend reports it)
            return float("nan")

    def block(out):
        jax.tree.map(lambda a: a.block_until_ready(), out)

    dev = jax.devices()[0]
    machine = f"{backend}: {getattr(dev, 'device_kind', '')}, {platform.processor() or platform.machine()}"
    print(f"# bench_layer: T={t} L={l} D={d} F={f} dtype={args.dtype} param_dtype={args.param_dtype} "
          f"cf={args.capacity_factor} timed={'gradients only (--dead-output)' if args.dead_output else 'gradients and y'} "
          f"repeats={args.repeats} calls={args.calls}; jax {jax.__version__}; {machine}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"affinity={sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}; "
          f"dispatch.default_dispatcher()={dispatch.default_dispatcher()!r}; host malloc: {host_malloc}", flush=True)
    rows = []
    for k in k_list:
        useful = 3 * 2 * 2 * t * d * k * f  # forward + backward FLOPs of the active FFN work
        fns = []  # (label, e, fn, args, drop)
        dense_fn, dense_params = build_dense(k)
        fns.append(("dense", None, dense_fn, (dense_params, x), None))
        if args.matmul:
            mm_fn, mm_args = build_matmul(k)
            fns.append(("matmul", None, mm_fn, mm_args, None))
        for e in experts_list:
            if k > e:
                continue
            if args.floor:
                cap = b * compute_capacity(l, e, k, args.capacity_factor)  # G * C, the scatter buffer's rows
                for label, nrows, loop in (("floor_C", cap, False), ("floor_TK/E", -(-t * k // e), False),
                                           ("floor_loop", -(-t * k // e), True)):
                    fn, fargs = build_floor(e, k, nrows, loop)
                    fns.append((label, e, fn, fargs, None))
            for name in names:
                cfg = moe_config(name, e, k)
                try:
                    fn, params, drop_fn = build_moe(cfg)
                    drop = float(drop_fn(params, x))
                    if name == "einsum_autodiff" or name in fwd_tiling:  # read when tracing: compile now
                        with traced_as(name):
                            t0 = time.perf_counter()
                            fn = fn.lower(params, x).compile()
                        what = fwd_tiling.get(name, "the einsum without its custom backward")
                        print(f"  compiled {name:10s} E={e} K={k} ({what}): {time.perf_counter() - t0:.1f}s",
                              flush=True)
                except Exception as err:  # noqa: BLE001  (report and go on)
                    print(f"skip {name} E={e} K={k}: {type(err).__name__}: {err}", flush=True)
                    continue
                fns.append((name, e, fn, (params, x), drop))
        times = {i: [] for i in range(len(fns))}
        cpu_times = {i: [] for i in range(len(fns))}
        info = {}
        for i, (label, e, fn, fargs, drop) in enumerate(fns):
            t0 = time.perf_counter()
            if hasattr(fn, "lower"):  # a jitted function; gmm_jax/gmm_ws rows come compiled
                fn = fn.lower(*fargs).compile()  # compiled once: timed below and asked for its memory
            fns[i] = (label, e, fn, fargs, drop)
            block(fn(*fargs))
            compile_s = time.perf_counter() - t0
            for _ in range(args.warmup):
                block(fn(*fargs))
            info[i] = (compile_s, memory_mib(fn))
            print(f"  compiled {label:10s} E={e} K={k}: {compile_s:.1f}s (+warmup), {info[i][1]:.0f} MiB",
                  flush=True)
        for rep in range(args.repeats):
            for i, (label, e, fn, fargs, _) in enumerate(fns):
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(args.calls):
                    out = fn(*fargs)
                block(out)
                del out
                times[i].append((time.perf_counter() - t0) / args.calls)
                cpu_times[i].append((time.process_time() - c0) / args.calls)
        if args.profile:
            for label, e, fn, fargs, _ in fns:
                profile_row(jax, os.path.join(args.profile, f"K{k}_E{e}_{label}"), fn, fargs, block)
        dense_t, dense_c = np.asarray(times[0]), np.asarray(cpu_times[0])
        for i, (label, e, fn, fargs, drop) in enumerate(fns):
            ts, cs = np.asarray(times[i]), np.asarray(cpu_times[i])
            row = dict(k=k, e=e, dispatcher=label, median_ms=float(np.median(ts) * 1e3),
                       ratio=float(np.median(ts / dense_t)), gflops=useful / float(np.median(ts)) / 1e9,
                       cpu_ms=float(np.median(cs) * 1e3), cpu_ratio=float(np.median(cs / dense_c)),
                       mem_mib=info[i][1], drop=drop, times_ms=[float(v * 1e3) for v in ts],
                       cpu_times_ms=[float(v * 1e3) for v in cs])
            rows.append(row)
            print(f"  {label:10s} E={str(e):>3s} K={k}: {row['median_ms']:9.1f} ms  x{row['ratio']:.2f}  "
                  f"(CPU {row['cpu_ms']:9.1f} ms x{row['cpu_ratio']:.2f})  {row['gflops']:7.1f} GFLOP/s  "
                  f"{row['mem_mib']:7.0f} MiB  drop={drop}", flush=True)
        del fns

    print()
    print(markdown(rows, args, cpu=backend == "cpu"))
    flat = flatness(rows)
    if flat:
        print()
        print(flatness_markdown(flat))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(args=vars(args), machine=machine, jax=jax.__version__, rows=rows, flatness=flat), fh,
                      indent=1)
    return rows


def flatness(rows):
    """Cost against the number of experts at fixed active FLOPs (issue 7's bar: t(E=64) / t(E=8) <= 1.15):
    for each K and row label timed at two or more E, the ratio ``t(E_max) / t(E_min)`` of each round (both
    timed in that round, so a slow drift of the machine cancels), and its median, min and max over rounds.
    Rows without per-round times, or with rounds of different counts, are skipped."""
    import numpy as np

    by = {}
    for r in rows:
        if r["e"] is not None and r.get("times_ms"):
            by.setdefault((r["k"], r["dispatcher"]), {})[r["e"]] = r["times_ms"]
    out = []
    for (k, label), ts in by.items():
        if len(ts) < 2:
            continue
        lo, hi = min(ts), max(ts)
        if len(ts[lo]) != len(ts[hi]):
            continue
        ratios = [b / a for a, b in zip(ts[lo], ts[hi])]
        out.append(dict(k=k, dispatcher=label, e_lo=lo, e_hi=hi, median=float(np.median(ratios)),
                        min=min(ratios), max=max(ratios), rounds=len(ratios)))
    return out


def flatness_markdown(flat) -> str:
    lines = ["| K | dispatcher | E | t(E_hi) / t(E_lo), median over rounds | min | max | rounds |",
             "|---|---|---|---:|---:|---:|---:|"]
    for f in flat:
        lines.append(f"| {f['k']} | {f['dispatcher']} | {f['e_hi']} / {f['e_lo']} | {f['median']:.3f} | "
                     f"{f['min']:.3f} | {f['max']:.3f} | {f['rounds']} |")
    return "\n".join(lines)


def grad_of_loss(jax, loss, dead_output=False):
    """The timed function of a row: ``jit`` of the gradients of ``loss(params, x) -> (scalar, y)`` w.r.t. params
    and x, returning ``(grads, y)``, as in a model, whose next layer reads the FFN's output y.

    ``dead_output=True`` (``--dead-output``, the definition of the oldest tables): the gradients only. The loss
    is linear in y, so nothing needs y itself and XLA drops the dense FFN's forward output product: the dense
    baseline then runs 5 of the 6 GEMMs its FLOP count assumes, while an MoE layer still computes its experts' outputs
    (the routing weights' gradient reads them). Every ratio to dense came out too large (on CPU the dense step
    runs one GEMM more with y returned, about 1/6 of it; docs/perf.md, "What is measured")."""
    if dead_output:
        return jax.jit(jax.grad(lambda params, x: loss(params, x)[0], argnums=(0, 1)))
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


def kernel_group(name: str) -> str:
    """The group of a device kernel (or XLA op) name in a profile."""
    low = name.lower()
    if "mosaic" in low or "ragged" in low or "pallas" in low:
        return "ragged GEMM kernels (Mosaic)"
    if any(s in low for s in ("gemm", "xmma", "cutlass", "nvjet", "cublas", "dot", "matmul", "sm90_", "ynn")):
        return "other GEMMs (cuBLAS / XLA dots)"
    if "sort" in low or "cub::" in low or "radix" in low:
        return "sorts"
    # XLA fusions are named after their ops (CPU: `bitcast_dynamic-update-slice_fusion`, `wrapped_broadcast`)
    if "dynamic-update-slice" in low:
        return "writes into buffers (dynamic-update-slice)"
    if "dynamic-slice" in low:
        return "slices copied out (dynamic-slice)"
    if "broadcast" in low:
        return "fills (broadcast)"
    if "transpose" in low:
        return "transposes"
    if "gather" in low:
        return "gathers"
    return "the rest (fusions, copies, reductions, loops)"


def exclusive_times(events, top_level=None):
    """``{name: exclusive ns}`` of the ``(start_ns, end_ns, name)`` events of one trace line: an event nested
    inside another (on CPU, the ops inside a ``while`` or ``cond``) is subtracted from its parent, so that a
    loop's time is not counted twice. ``top_level``: a list that gets the ``(start, end)`` of the events nested
    in no other (for the idle gaps between them)."""
    from collections import defaultdict

    out = defaultdict(int)
    stack = []
    for start, end, name in sorted(events, key=lambda v: (v[0], -v[1])):
        while stack and stack[-1][1] <= start:
            stack.pop()
        if stack:
            out[stack[-1][2]] -= end - start
        elif top_level is not None:
            top_level.append((start, end))
        out[name] += end - start
        stack.append((start, end, name))
    return dict(out)


def hlo_op_names(hlo_text: str) -> dict:
    """``{kernel name: JAX op name}`` from a compiled module's HLO text: each instruction's ``op_name``
    metadata (for a fusion, that of its root: the JAX operation and its name stack, e.g.
    ``jit(loss)/transpose(jvp(MoELayer))/router/.../scatter-add``). Keys are normalized the way GPU kernel names
    are (``input_scatter_fusion.1`` -> ``input_scatter_fusion_1``), so a profile's kernel can be looked up with
    ``normalize_kernel_name``."""
    import re

    out = {}
    for m in re.finditer(r'^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*?metadata=\{[^}\n]*?op_name="([^"]*)"', hlo_text, re.M):
        out.setdefault(normalize_kernel_name(m.group(1)), m.group(2))
    return out


def normalize_kernel_name(name: str) -> str:
    return name.replace(".", "_").replace("-", "_")


def profile_row(jax, path, fn, fargs, block, calls=3):
    """Trace ``calls`` calls of ``fn`` into ``path`` and print the device time per call: the largest kernels (12,
    or ``PROFILE_TOP`` from the environment) and the totals per ``kernel_group``. GPU: the kernels on the device
    plane's stream lines. CPU: the XLA ops on the host plane's XLA threads, each op's exclusive time (the ops
    inside a ``while`` or ``cond`` are not counted again in it); they appear with
    ``--xla_cpu_enable_xprof_traceme=true`` in ``XLA_FLAGS``, which ``main`` adds to the flags it sets."""
    import glob
    from collections import defaultdict

    from jax.profiler import ProfileData

    block(fn(*fargs))
    with jax.profiler.trace(path):
        for _ in range(calls):
            block(fn(*fargs))
    files = sorted(glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True))
    if not files:
        print(f"## profile {path}: no trace written", flush=True)
        return None
    data = ProfileData.from_file(files[-1])
    per_name = defaultdict(float)
    counts = defaultdict(int)
    spans = []  # (start, end) of every kernel, for the idle gaps between them
    device_planes = [p for p in data.planes if p.name.startswith("/device:GPU")]
    for plane in device_planes or [p for p in data.planes if p.name.startswith("/host:CPU")]:
        for line in plane.lines:
            if device_planes and "stream" not in line.name.lower():
                continue
            if not device_planes and "xla" not in line.name.lower():
                continue
            events = [(ev.start_ns, ev.start_ns + ev.duration_ns, ev.name) for ev in line.events
                      if ev.duration_ns > 0
                      and not ev.name.startswith(("ThreadpoolListener", "end: ", "ThunkExecutor"))]
            for name, ns in exclusive_times(events, spans).items():
                per_name[name] += ns / 1e6 / calls
            for _, _, name in events:
                counts[name] += 1
    total = sum(per_name.values())
    groups = defaultdict(float)
    for name, ms in per_name.items():
        groups[kernel_group(name)] += ms
    # idle time between consecutive kernels, the gaps between the traced calls (over 1 ms: the host's sync
    # and dispatch of the next call) left out
    spans.sort()
    gaps, reach = [], None
    for start, end in spans:
        if reach is not None and start > reach:
            gaps.append((start - reach) / 1e6)
        reach = end if reach is None else max(reach, end)
    idle = sum(g for g in gaps if g < 1.0) / calls
    print(f"\n## profile {os.path.basename(path)}: device time {total:.3f} ms per call "
          f"({'GPU streams' if device_planes else 'CPU XLA ops'}; trace: {files[-1]}); idle between kernels "
          f"{idle:.3f} ms per call ({sum(1 for g in gaps if g < 1.0) / calls:.0f} gaps), "
          f"{sum(1 for g in gaps if g >= 1.0)} gaps over 1 ms (between calls)", flush=True)
    print("| group | ms per call | share |\n|---|---:|---:|")
    for name, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {ms:.3f} | {100 * ms / max(total, 1e-12):.0f}% |")
    try:  # which JAX operation each kernel comes from (the compiled HLO's op_name metadata), and the HLO itself
        hlo = fn.as_text()
        with open(os.path.join(path, "hlo.txt"), "w") as fh:
            fh.write(hlo)
        op_names = hlo_op_names(hlo)
    except Exception:  # noqa: BLE001  (not every backend or object has the text)
        op_names = {}
    print("| kernel | calls per call | ms per call | share | JAX op (HLO op_name) |\n|---|---:|---:|---:|---|")
    for name, ms in sorted(per_name.items(), key=lambda kv: -kv[1])[:int(os.environ.get("PROFILE_TOP", 12))]:
        op = op_names.get(normalize_kernel_name(name), "")
        print(f"| `{name[:90]}` | {counts[name] / calls:.0f} | {ms:.3f} | {100 * ms / max(total, 1e-12):.0f}% | "
              f"{'`' + op[-120:] + '`' if op else ''} |", flush=True)
    return dict(total_ms=total, groups=dict(groups), idle_ms=idle)


def gemm_calls(args, dtype):
    """Per-call time of the GEMMs of one expert, ``n`` experts in a ``lax.map`` (one plain 2-D dot each)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    d, f, n = args.d_model, args.hidden, 32
    w = jax.random.normal(jax.random.key(1), (n, d, f), jnp.float32).astype(dtype)
    fns = []
    for t in (32, 64, 128, 256, 512, 1024):
        x = jax.random.normal(jax.random.key(0), (n, t, d), jnp.float32).astype(dtype)
        h = jax.random.normal(jax.random.key(2), (n, t, f), jnp.float32).astype(dtype)
        fns.append((t, f"x @ w, [{t},{d}]·[{d},{f}]", jax.jit(lambda x, w: jax.lax.map(lambda a: a[0] @ a[1], (x, w))), (x, w)))
        fns.append((t, f"x^T @ dh, [{d},{t}]·[{t},{f}]", jax.jit(lambda x, h: jax.lax.map(lambda a: a[0].T @ a[1], (x, h))), (x, h)))
    for *_, fn, a in fns:
        jax.block_until_ready(fn(*a))
    cpu = {i: [] for i in range(len(fns))}
    for _ in range(args.repeats):
        for i, (*_, fn, a) in enumerate(fns):
            c0 = time.process_time()
            jax.block_until_ready(fn(*a))
            cpu[i].append(time.process_time() - c0)
    print(f"| rows t | GEMM | CPU ms per call | µs per row | GFLOP/s |\n|---:|---|---:|---:|---:|")
    for i, (t, name, _, _) in enumerate(fns):
        per_call = float(np.median(cpu[i])) / n
        print(f"| {t} | {name} | {per_call * 1e3:.3f} | "
              f"{per_call / t * 1e6:.1f} | {2 * t * d * f / per_call / 1e9:.0f} |")


def probes(args, dtype):
    """CPU probes: (1) a [B, L, D] projection with two token axes vs flattened; (2) fresh [64, D, F] buffers;
    (3) the dense FFN and 64 experts on T/64 rows each, forward+backward. Per call: median ms, and the
    minor page faults and kernel CPU ms (``getrusage``) that fresh host memory costs (``--host-malloc``)."""
    import resource

    import jax
    import jax.numpy as jnp
    import numpy as np

    t, l, d, f = args.tokens, args.seq_len, args.d_model, args.hidden
    x = jax.random.normal(jax.random.key(0), (t // l, l, d), jnp.float32).astype(dtype)
    w = jax.random.normal(jax.random.key(1), (d, f), jnp.float32).astype(dtype)
    w2 = jax.random.normal(jax.random.key(3), (f, d), jnp.float32).astype(dtype)
    grad = lambda loss: jax.jit(jax.grad(loss, argnums=(0, 1)))
    fns = {
        f"projection [{t // l},{l},{d}]·[{d},{f}], fwd+bwd, token axes kept (3-D einsum)":
            (grad(lambda w, x: jnp.sum(jnp.einsum("bld,df->blf", x, w) ** 2)), (w, x)),
        f"the same on flattened rows [{t},{d}] (experts.on_rows)":
            (grad(lambda w, x: jnp.sum((x.reshape(-1, d) @ w) ** 2)), (w, x)),
    }
    big = jax.random.normal(jax.random.key(2), (64, d, f), jnp.float32)
    fns[f"write a fresh [64,{d},{f}] float32 buffer (broadcast of a scalar)"] = (
        jax.jit(lambda a: jnp.broadcast_to(a, (64, d, f))), (jnp.float32(1.0),))
    fns[f"add two existing [64,{d},{f}] buffers into a fresh one"] = (jax.jit(lambda a, b: a + b), (big, big))
    ffn = lambda p, x: jnp.sum(jnp.einsum("...f,fd->...d", jax.nn.gelu(jnp.einsum("...d,df->...f", x, p[0])),
                                          p[1]) ** 2)
    fns[f"dense FFN [{t},{d}]·[{d},{f}]·[{f},{d}], fwd+bwd"] = (grad(ffn), ((w, w2), x.reshape(t, d)))
    xe = x.reshape(64, t // 64, d)
    moe = lambda p, x: jnp.sum(jnp.einsum("emf,efd->emd", jax.nn.gelu(jnp.einsum("emd,edf->emf", x, p[0])),
                                          p[1]) ** 2)
    fns[f"64 experts on [64,{t // 64},{d}], fwd+bwd (batched)"] = (
        grad(moe), ((big.astype(dtype), jnp.swapaxes(big, 1, 2).astype(dtype)), xe))
    for fn, a in fns.values():
        jax.block_until_ready(fn(*a))
    times, faults, kernel = ({name: [] for name in fns} for _ in range(3))
    for _ in range(max(args.repeats, 3)):
        for name, (fn, a) in fns.items():
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            out = fn(*a)
            jax.block_until_ready(out)
            times[name].append(time.perf_counter() - t0)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            faults[name].append(r1.ru_minflt - r0.ru_minflt)
            kernel[name].append(r1.ru_stime - r0.ru_stime)
            del out
    print("| probe | median ms | page faults | kernel ms |\n|---|---:|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {np.median(ts) * 1e3:.1f} | {np.median(faults[name]):.0f} | "
              f"{np.median(kernel[name]) * 1e3:.0f} |")


def markdown(rows, args, cpu=True) -> str:
    flops_unit = "TFLOP/s" if any(r["gflops"] > 2000 for r in rows) else "GFLOP/s"
    scale = 1e-3 if flops_unit == "TFLOP/s" else 1.0
    cpu_head, cpu_rule = (" CPU ms | × dense (CPU) |", "---:|---:|") if cpu else ("", "")
    matmul = {r["k"]: r["median_ms"] for r in rows if r["dispatcher"] == "matmul"}
    mm_head, mm_rule = (" vs one matmul |", "---:|") if matmul else ("", "")
    lines = [f"| K | E | dispatcher | median ms | × dense |{cpu_head} useful {flops_unit} |{mm_head} memory MiB | "
             "dropped |", f"|---|---|---|---:|---:|{cpu_rule}---:|{mm_rule}---:|---:|"]
    for r in rows:
        e = "" if r["e"] is None else str(r["e"])
        drop = "" if r["drop"] is None else f"{100 * r['drop']:.1f}%"
        label = {"dense": f"dense FFN (F={r['k']}·{args.hidden})", "matmul": "one matmul, same FLOPs",
                 "floor_C": "experts alone, C rows", "floor_TK/E": "experts alone, T·K/E rows",
                 "floor_loop": "experts alone, T·K/E rows, loop"}.get(
            r["dispatcher"], r["dispatcher"])
        cpu_cells = f" {r['cpu_ms']:.1f} | {r['cpu_ratio']:.2f} |" if cpu else ""
        mm_cell = (f" {100 * matmul[r['k']] / r['median_ms']:.0f}% |" if r["k"] in matmul
                   else (" |" if matmul else ""))
        digits = 3 if r["median_ms"] < 10 else 1
        lines.append(f"| {r['k']} | {e} | {label} | {r['median_ms']:.{digits}f} | {r['ratio']:.2f} |{cpu_cells} "
                     f"{r['gflops'] * scale:.1f} |{mm_cell} {r['mem_mib']:.0f} | {drop} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
