"""Train-step throughput of a small MoE language model against the dense LM of the same active FLOPs per token.

    taskset -c 0 python experiments/bench_model.py                      # 'small' size, switch-style top-1
    taskset -c 0 python experiments/bench_model.py --k 2 --moe-every 1  # top-2 in every block
    taskset -c 0 python experiments/bench_model.py --quick              # smoke run

What is timed: one jitted ``moe_jax.train.make_train_step`` call (forward, backward, AdamW update) of
``moe_jax.model.Transformer`` on random token batches ``[B, L+1]``. The dense model has ``d_ff = K * F``
in every block; the MoE model replaces the FFN of the MoE blocks (``--moe-every``) by ``E`` experts of width
``F`` with top-``K`` routing: both have the same active matmul FLOPs per token (``moe_jax.flops.count_model``
prints them; the MoE model adds its routers and, for 'einsum', the dispatch einsums).

Measurement: compile both, then ``--repeats`` rounds; each round runs ``--steps`` train steps of the dense
model, then of each MoE variant, in this one process. Reported: tokens/s (``B * L`` / median step time),
the ratio to the dense model (median over rounds of the per-round ratio), for wall-clock and for process
CPU time (on a shared CPU the CPU time is the steadier one). CPU pinning: unless ``XLA_FLAGS`` is set, XLA
runs on one CPU thread; start the script under ``taskset -c 0``. Host memory: ``--host-malloc keep`` (the
default, as in ``experiments/train.py``) applies ``moe_jax.hostmem.keep_freed_memory`` first.
"""
import argparse
import os
import platform
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=4096, help="V (the 'small' size's BPE vocabulary)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024, help="F, the expert width (dense d_ff = K * F)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--moe-every", type=int, default=2, help="MoE in blocks 1, 3, ... (2, Switch) or all (1)")
    p.add_argument("--dispatchers", default="auto",
                   help="comma-separated MoEConfig.dispatcher values to time, each optionally with its "
                        "dropless_impl: 'dropless:gmm' (default: auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="train steps per timed call")
    p.add_argument("--quick", action="store_true", help="smoke run: V=256, D=64, 2 blocks, L=64, B=8")
    p.add_argument("--gmm-tiling", default=None,
                   help="JSON of the 'gmm' kernels' tiles ({'fwd': ..., 'dw': ...}, bench_gmm.py --json)")
    p.add_argument("--no-pin", action="store_true", help="do not set single-thread XLA CPU flags")
    p.add_argument("--host-malloc", default=None, choices=["keep", "default"],
                   help="'keep' (default): glibc keeps freed memory for the next call (moe_jax.hostmem); "
                        "'default': glibc's own policy (every block over 32 MiB is a fresh mmap)")
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.d_model, args.layers, args.hidden, args.seq_len, args.batch = 256, 64, 2, 128, 64, 8
        args.repeats, args.steps = min(args.repeats, 2), 1
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.no_pin and "XLA_FLAGS" not in os.environ:
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    from moe_jax import hostmem
    host_malloc = hostmem.keep_freed_memory(args.host_malloc)  # before JAX's first computation

    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from moe_jax import dispatch, train
    from moe_jax.flops import count_model
    from moe_jax.model import ModelConfig, Transformer
    from moe_jax.moe import MoEConfig

    backend = jax.default_backend()
    if args.gmm_tiling:
        from moe_jax import gmm
        tiles = gmm.read_tilings(args.gmm_tiling)
        gmm.set_tiling(fwd=tiles.get("fwd"), dw=tiles.get("dw"))
        print(f"# gmm tiling from {args.gmm_tiling}: {gmm._TILING}", flush=True)
    train_cfg = ml_collections.ConfigDict(dict(learning_rate=1e-3, steps=1000, warmup_steps=10, end_lr_ratio=0.1,
                                               grad_clip=1.0, weight_decay=0.1))
    common = dict(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
                  dtype=args.dtype)
    variants = [("dense", ModelConfig(d_ff=args.k * args.hidden, **common).validate())]
    for name in args.dispatchers.split(","):
        name, _, impl = name.partition(":")  # 'dropless:gmm' = dispatcher 'dropless', dropless_impl 'gmm'
        moe = MoEConfig(num_experts=args.experts, k=args.k, router="top_k", expert_hidden=args.hidden,
                        dispatcher=name, dropless_impl=impl or "auto", capacity_factor=1.25,
                        slot_order="token_major" if args.k > 1 else "choice_major", renormalize_top_k=args.k > 1)
        label = f"moe {name}" + (f" (= {moe.resolved_dispatcher()})" if name == "auto" else "") + (
            f" ({impl})" if impl else "")
        variants.append((label, ModelConfig(d_ff=args.k * args.hidden, moe_every=args.moe_every, moe=moe,
                                            **common).validate()))

    rng = jax.random.key(0)
    batch = jax.random.randint(rng, (args.batch, args.seq_len + 1), 0, args.vocab, jnp.int32)
    runs = []
    for label, cfg in variants:
        model = Transformer(cfg)
        tx, schedule = train.make_optimizer(train_cfg)
        # one compiled init (op-by-op init of a whole model is slow on a GPU)
        state = jax.jit(lambda r, model=model, tx=tx: train.create_state(model, tx, r, args.seq_len))(rng)
        step = jax.jit(train.make_train_step(model, tx, schedule), donate_argnums=0)
        counts = count_model(cfg, args.seq_len)
        runs.append(dict(label=label, step=step, state=state, counts=counts, wall=[], cpu=[]))

    dev = jax.devices()[0]
    machine = f"{backend}: {getattr(dev, 'device_kind', '')}, {platform.processor() or platform.machine()}"
    print(f"# bench_model: V={args.vocab} D={args.d_model} layers={args.layers} F={args.hidden} E={args.experts} "
          f"K={args.k} moe_every={args.moe_every} L={args.seq_len} B={args.batch} dtype={args.dtype} "
          f"repeats={args.repeats}x{args.steps} steps; jax {jax.__version__}; {machine}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; dispatch.default_dispatcher()="
          f"{dispatch.default_dispatcher()!r}, default_dropless_impl(dtype={args.dtype})="
          f"{dispatch.default_dropless_impl(dtype=args.dtype)!r}; "
          f"host malloc: {host_malloc}", flush=True)
    for r in runs:
        print(f"  {r['label']:24s} {r['counts'].summary()}", flush=True)

    def run_steps(r, n):
        state = r["state"]
        for _ in range(n):
            state, metrics = r["step"](state, batch, rng)
        jax.block_until_ready((state, metrics))
        r["state"] = state

    for r in runs:
        t0 = time.perf_counter()
        run_steps(r, 2)  # compile + one more
        print(f"  compiled {r['label']}: {time.perf_counter() - t0:.1f}s", flush=True)
    for _ in range(args.repeats):
        for r in runs:
            t0, c0 = time.perf_counter(), time.process_time()
            run_steps(r, args.steps)
            r["wall"].append((time.perf_counter() - t0) / args.steps)
            r["cpu"].append((time.process_time() - c0) / args.steps)

    tokens = args.batch * args.seq_len
    dense_w, dense_c = np.asarray(runs[0]["wall"]), np.asarray(runs[0]["cpu"])
    lines = ["| model | train MFLOP/token | step ms | tokens/s | × dense | CPU ms | tokens/CPU-s | × dense (CPU) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        w, c = np.asarray(r["wall"]), np.asarray(r["cpu"])
        flops = r["counts"].train_flops_per_token + r["counts"].dispatch_flops_per_token
        lines.append(f"| {r['label']} | {flops / 1e6:.1f} | {np.median(w) * 1e3:.1f} | {tokens / np.median(w):.0f} | "
                     f"{np.median(dense_w / w):.2f} | {np.median(c) * 1e3:.1f} | {tokens / np.median(c):.0f} | "
                     f"{np.median(dense_c / c):.2f} |")
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
