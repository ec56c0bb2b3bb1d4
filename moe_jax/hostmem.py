"""Host memory policy for XLA:CPU runs: keep freed memory instead of returning it to the kernel each step.

Why: glibc's ``malloc`` serves every block above 32 MiB (its largest mmap threshold) with a fresh ``mmap``
and gives it back with ``munmap`` on ``free``. XLA:CPU allocates each large temporary and output of a
compiled step separately, so every step of a model with large activations or weight gradients touches
hundreds of MiB of new pages, and the kernel zeroes each 4 KiB page on its first write (a page fault).
Measured with ``taskset -c 0 python experiments/bench_layer.py --probes`` on the 2-core AMD EPYC VM of
docs/perf.md, forward+backward of 64 experts of ``512 x 1024`` on 8192 tokens: 90 115 page faults and 148 ms
of kernel time per call, 807 ms in all; with :func:`keep_freed_memory` applied 0, 0 and 653 ms. The
FLOP-matched dense FFN: 32 769 faults, 60 ms, 618 ms; then 0, 0, 556 ms. The cost grows with the number of
experts (the weight gradients are ``E`` times the dense layer's), so it is part of what made large-``E``
layers look slow on CPU.

What :func:`keep_freed_memory` does (``mallopt``, glibc only): one malloc arena for all threads
(``M_ARENA_MAX=1``; a per-thread arena cannot grow beyond 64 MiB without mmap), no mmap for large blocks
(``M_MMAP_MAX=0``), and no trimming of the heap top (``M_TRIM_THRESHOLD``). The process then keeps its
peak heap until it exits (that is the point: the next step reuses the pages) instead of unmapping it between
steps; a process that should give memory back after a large phase should not use it. The first few calls
of a step still grow the heap (JAX frees the previous call's buffers asynchronously); after that they fault
nothing in.

It must run before JAX's first computation: a thread that has already allocated keeps its own arena, and the
setting then has no effect on it. The experiment scripts call it first thing; call it at the top of your
own scripts the same way. It is a process-wide policy, so importing ``moe_jax`` never applies it.

Opt out with ``MOE_JAX_HOST_MALLOC=default`` in the environment (or ``--host-malloc default`` in the
benchmark scripts). It is skipped on non-glibc systems and when an accelerator plugin is installed and
``JAX_PLATFORMS`` does not ask for the CPU (host allocations are small there).
"""
import ctypes
import ctypes.util
import importlib.util
import os
import platform

ENV_VAR = "MOE_JAX_HOST_MALLOC"

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# mallopt takes an int and glibc stores it as a size_t: -1 is SIZE_MAX, never trim. The largest positive
# int (2 GiB) is not enough: a process that has held a few GiB (several E=64 layers compiled side by side)
# frees a top chunk larger than that, glibc trims it, and the next call faults it all in again.
_TRIM_THRESHOLD = -1

_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                        "libtpu")

_applied = None


def _accelerator_expected() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] != "cpu"
    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def keep_freed_memory(mode: str | None = None) -> str:
    """Apply the host-memory policy above; returns what happened, for logs ('kept', or why not).

    ``mode``: 'keep' (apply), 'default' (leave glibc's policy), or None: the ``MOE_JAX_HOST_MALLOC``
    environment variable, else 'keep'. Calling it again is harmless (it reports the first result).
    """
    global _applied
    mode = (mode or os.environ.get(ENV_VAR) or "keep").strip().lower()
    if mode not in ("keep", "default"):
        raise ValueError(f"{ENV_VAR} / host_malloc must be 'keep' or 'default', got {mode!r}")
    if _applied is not None:
        return _applied
    if mode == "default":
        _applied = f"glibc default ({ENV_VAR}=default)"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _applied = "glibc default (not a glibc system)"
    elif _accelerator_expected():
        _applied = "glibc default (accelerator backend expected)"
    else:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(libc.mallopt(param, value) == 1 for param, value in (
            (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)))
        _applied = "kept (one arena, no mmap, no trim)" if ok else "glibc default (mallopt refused)"
    return _applied
