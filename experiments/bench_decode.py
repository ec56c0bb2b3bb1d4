"""Decode speed with the key/value cache against without, for a dense and an MoE model of the same active size.

    python experiments/bench_decode.py                      # 'mini' size, 256 new tokens, writes the table
    python experiments/bench_decode.py --size tiny --num_new 32 --out /tmp/bench_decode.md   # smoke run

Models: ``configs/dense.py`` and ``configs/switch_top1.py`` at ``--size`` (``mini``: D=128, 4 blocks, F=512,
V=4096; the MoE blocks 1 and 3 hold 8 experts of width F with top-1 routing, so both models have the same
active parameters per token), randomly initialised (speed does not depend on the weights). What is timed:
``moe_jax.decode.generate`` with greedy decoding of ``--num_new`` tokens after a random prompt of
``--prompt_len`` tokens, ``--batch`` rows, ``max_len = prompt_len + num_new``: ``cached`` = prefill + one
decode step per token on the cache; ``uncached`` = the full forward over the whole ``[B, max_len]`` window
per token (``generate_uncached``). Both loops are one compiled ``lax.fori_loop``; compile time is excluded;
each cell is the best of ``--repeats`` runs, all in this one process, so the ratios compare like with like
on a shared CPU. The table (Markdown) and the numbers (JSON) go to ``--out`` and ``--out`` with ``.json``.
"""
import argparse
import importlib
import json
import os
import platform
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)

MODELS = ("dense", "switch_top1")


def bench(size: str, num_new: int, prompt_len: int, batch: int, repeats: int, models=MODELS):
    """One row per (model, cached/uncached): tokens/s; and the cached/uncached ratio per model."""
    import jax
    import numpy as np

    from moe_jax import decode
    from moe_jax.flops import count_model
    from moe_jax.model import Transformer, init_variables
    from moe_jax.train import config_vocab_size, validate_config

    rows = []
    for cfg_name in models:
        label = cfg_name
        config = importlib.import_module(f"configs.{cfg_name}").get_config(size)
        mcfg = validate_config(config, config_vocab_size(config))
        model = Transformer(mcfg)
        variables = init_variables(model, jax.random.key(0), 8)
        counts = count_model(mcfg, prompt_len + num_new)
        prompts = np.random.default_rng(0).integers(0, mcfg.vocab_size, (batch, prompt_len)).tolist()
        speed = {}
        for cached in (True, False):
            runs = [decode.generate(model, variables, prompts, num_new, cached=cached) for _ in range(repeats + 1)]
            speed[cached] = max(r.tokens_per_s for r in runs[1:] or runs)
            speed[f"tokens_{cached}"] = runs[-1].tokens
        assert np.array_equal(speed["tokens_True"], speed["tokens_False"]), f"{label}: cached != uncached tokens"
        rows.append({"model": label, "config": f"configs/{cfg_name}.py:{size}", "total_params": counts.total_params,
                     "active_params": counts.active_params, "cached_tokens_per_s": speed[True],
                     "uncached_tokens_per_s": speed[False], "speedup": speed[True] / speed[False]})
    return rows


def format_table(rows, args) -> str:
    head = (f"Command: `{args['command']}`\n\nGreedy decode, {args['num_new']} new tokens after a "
            f"{args['prompt_len']}-token prompt, batch {args['batch']}, size {args['size']}, best of "
            f"{args['repeats']} (compile excluded); {args['platform']}.\n\n")
    lines = ["| model | total params | active params | cached tokens/s | uncached tokens/s "
             "| cached / uncached |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} (`{r['config']}`) | {r['total_params'] / 1e6:.2f}M | "
                     f"{r['active_params'] / 1e6:.2f}M | {r['cached_tokens_per_s']:.1f} | "
                     f"{r['uncached_tokens_per_s']:.1f} | {r['speedup']:.1f}x |")
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="mini", help="config size: mini, tiny or small")
    p.add_argument("--num_new", type=int, default=256)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--models", default=",".join(MODELS), help="config names (configs/<name>.py), comma-separated")
    p.add_argument("--out", default=os.path.join(_ROOT, "docs", "results", "bench_decode.md"))
    a = p.parse_args(argv)
    for name in ("num_new", "prompt_len", "batch", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    import jax
    rows = bench(a.size, a.num_new, a.prompt_len, a.batch, a.repeats, tuple(a.models.split(",")))
    command = "python experiments/bench_decode.py " + " ".join(sys.argv[1:] if argv is None else argv)
    where = f"{jax.default_backend()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    info = {**vars(a), "command": command.strip(), "platform": where}
    table = format_table(rows, info)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(table)
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump({"args": info, "rows": rows}, f, indent=1)
    print(table)
    print(f"written: {a.out}")
    return rows


if __name__ == "__main__":
    from moe_jax.hostmem import keep_freed_memory
    keep_freed_memory()  # as the other experiment scripts on CPU (README)
    main()
