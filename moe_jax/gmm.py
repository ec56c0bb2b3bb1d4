"""Grouped matrix multiplies on rows sorted by group (expert), with their own VJP: the GPU dropless path.

``grouped_matmul(x [M, D], w [G, D, F], group_sizes [G]) -> y [M, F]``: rows ``[o_g, o_g + n_g)`` of ``x``
times ``w[g]``, where ``n_g = group_sizes[g]`` and ``o_g = n_0 + ... + n_{g-1}``. It is
``jax.lax.ragged_dot(x, w, group_sizes)``; what differs is how it runs, forward and backward:

* forward ``y = x · w[g]`` and input gradient ``dx = dy · w[g]ᵀ``: one ragged GEMM each (grouped rows,
  one weight matrix per group);
* weight gradient ``dw[g] = x[rows of g]ᵀ · dy[rows of g]``: a "transposed" ragged GEMM whose contraction
  runs over each group's rows.

Backends (``backend=``):

* ``'mosaic'``: Pallas Mosaic GPU kernels for Hopper (sm_90: H100, H200). Forward and ``dx``: by default
  our warp-specialized ``moe_jax.gmm_mgpu.ragged_matmul`` (``Tiling.kernel='ws'``: one TMA warpgroup
  feeding two MMA warpgroups), or JAX's ``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu.ragged_dot``
  (``kernel='jax'``, ``JAX_FWD_TILING``; also used where the output width is not a multiple of 128). In
  both, tiles that straddle a group boundary are computed once per group and stored masked. ``dw``: JAX's
  ``transposed_ragged_dot_mgpu.transposed_ragged_dot``. Every GEMM does only the useful work (plus at most
  one partial tile per group). bfloat16/float16 only; ``D`` and ``F`` multiples of 64.
* ``'xla'``: ``jax.lax.ragged_dot`` / ``ragged_dot_general``. Correct on every backend, and the reference
  the tests compare against; but with jax 0.10/0.11 both CPU and GPU lower it to a dense masked product (G
  times the work and memory; docs/perf.md, "GPU: what is known"), so it is not a fast path anywhere. It keeps the
  Mosaic kernels' hazards, so that CPU tests catch a caller who trips them: its forward output is NaN in
  the rows past the groups (the Mosaic kernel writes nothing there), and a non-finite value in those rows
  makes the weight gradient NaN (the Mosaic kernel masks them by multiplying by 0).

Contract on the rows: the Mosaic forward kernel writes only the rows inside the groups; rows past
``sum(group_sizes)`` are left unwritten (not zero). Callers make the groups cover all ``M`` rows: the
dispatcher (``dispatch.ragged_dot_experts`` with ``dropless_impl='gmm'``) adds the rows of dropped
assignments, which hold zeros, to the last group (``cover_all_rows``).

Tiling: ``set_tiling(fwd=..., dw=...)`` (``Tiling``: ``block_m, block_n, block_k``, the kernels' pipeline
depth and tile order, and which forward kernel); read at trace time. ``experiments/bench_gmm.py`` checks
both forward kernels and times a sweep of tilings on the GPU.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

BACKENDS = ("mosaic", "xla")
KERNELS = ("jax", "ws")  # Tiling.kernel


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile sizes of one Mosaic GPU kernel. ``block_m``: output rows per tile (forward: token rows;
    ``dw``: rows of ``w``, i.e. ``D``); ``block_n``: output columns per tile (``kernel='ws'``: per compute
    warpgroup, a CTA computes ``2 * block_n`` columns); ``block_k``: the contraction's step (``dw``: token rows
    per step); ``max_concurrent_steps``: TMA pipeline depth; ``grid_block_n``: output tiles per column band
    of the tile order (L2 reuse); ``kernel``: ``'jax'`` (JAX's ``ragged_dot_mgpu`` /
    ``transposed_ragged_dot_mgpu``) or, for the forward kernel only, ``'ws'`` (``moe_jax.gmm_mgpu``: one
    TMA warpgroup feeding two MMA warpgroups)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4
    grid_block_n: int = 1
    kernel: str = "jax"

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"gmm.Tiling.kernel must be one of {KERNELS}, got {self.kernel!r}.")

    def fit(self, **dims: int) -> "Tiling":
        """This tiling with each named block (``block_m=D`` etc.) lowered, if it does not divide its
        dimension, to the largest of 256, 192, 128, 64 below it that does (64: the warpgroup MMA's row
        granularity)."""
        out = {}
        for name, dim in dims.items():
            b = getattr(self, name)
            for c in [b] + [c for c in (256, 192, 128, 64) if c < b]:
                if dim % c == 0:
                    b = c
                    break
            if dim % b:
                raise ValueError(f"gmm: dimension {dim} is not a multiple of {b} ({name}); the Mosaic GPU "
                                 "kernels need the model width D and the expert width F to be multiples of "
                                 "64. Use dropless_impl='blocks' for other widths.")
            out[name] = b
        return dataclasses.replace(self, **out)


# JAX's ragged_dot_mgpu forward kernel: the best of experiments/bench_gmm.py's sweeps on an H200 (jax 0.11.2) at
# T*K = 16384 rows, D=512, F=1024 and at T*K = 131072, D=1024, F=4096, E=8 and 64 alike: 128x128 tiles in
# bands of 4 column tiles.
JAX_FWD_TILING = Tiling(128, 128, 64, 4, 4, "jax")
# The warp-specialized forward kernel (moe_jax.gmm_mgpu): 128 x (2 x 128) CTA tiles; 3 pipeline steps is the
# most that fits in shared memory with the epilogue's buffer at block_k = 64. At the layer bar's shape
# (131072 rows, D=1024, F=4096) it ran the forward / input-gradient GEMMs at 87% / 97% of a dense matmul at E=8
# (JAX's kernel: 76% / 90%) and 69% / 86% at E=64 (64% / 78%); docs/perf.md, "GPU: what is known".
WS_TILING = Tiling(128, 128, 64, 3, 4, "ws")
# Defaults: the 'ws' forward kernel (it falls back to JAX's where the output width is not a multiple of 128);
# weight gradient: JAX's transposed_ragged_dot_mgpu with 64x256 tiles (best at E=64 in both sweeps; at E=8,
# 131072 rows, 128x128 was 5% faster).
DEFAULT_TILING = {"fwd": WS_TILING, "dw": Tiling(64, 256, 64, 4, 1)}
_TILING: Dict[str, Tiling] = dict(DEFAULT_TILING)


def read_tilings(path: str) -> Dict[str, Tiling]:
    """The tilings of a JSON file that ``experiments/bench_gmm.py --json`` wrote: ``{'fwd': Tiling, 'dw': Tiling,
    'fwd_jax': ..., 'fwd_ws': ...}`` (the keys present). ``set_tiling(fwd=t['fwd'], dw=t['dw'])`` applies
    the best ones."""
    import json

    with open(path) as fh:
        return {kind: Tiling(**fields) for kind, fields in json.load(fh).items()}


def set_tiling(fwd: Optional[Tiling] = None, dw: Optional[Tiling] = None) -> Dict[str, Tiling]:
    """Set the Mosaic kernels' tiling (``fwd``: forward and ``dx``; ``dw``: weight gradient). Returns the
    previous setting. Read when a function is traced: re-jit after changing it."""
    if dw is not None and dw.kernel != "jax":
        raise ValueError(f"gmm.set_tiling: the weight-gradient kernel is JAX's transposed_ragged_dot_mgpu only; "
                         f"got dw=Tiling(kernel={dw.kernel!r}). Use kernel='jax' for dw.")
    old = dict(_TILING)
    if fwd is not None:
        _TILING["fwd"] = fwd
    if dw is not None:
        _TILING["dw"] = dw
    return old


@functools.lru_cache(maxsize=None)
def mosaic_unavailable_reason() -> Optional[str]:
    """None if the Mosaic GPU kernels can run on the default device; else why not (for error messages)."""
    if jax.default_backend() != "gpu":
        return f"the default backend is {jax.default_backend()!r}, not 'gpu'"
    dev = jax.devices()[0]
    cc = str(getattr(dev, "compute_capability", ""))
    if cc and not cc.startswith("9."):
        return f"{dev.device_kind} has compute capability {cc}; the kernels are written for Hopper (9.0)"
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu  # noqa: F401
    except Exception as err:  # noqa: BLE001  (any import failure means: not here)
        return f"jax {jax.__version__} has no usable Pallas Mosaic GPU ragged-dot kernels ({err})"
    return None


def resolve_backend(backend: str = "auto") -> str:
    """``'auto'`` -> ``'mosaic'`` where it can run, else a ValueError that says why and what to use."""
    if backend == "auto":
        reason = mosaic_unavailable_reason()
        if reason is not None:
            raise ValueError(f"MoEConfig.dropless_impl='gmm' runs Pallas Mosaic GPU kernels on a Hopper "
                             f"GPU, but {reason}. Use dropless_impl='auto' (the backend's fastest: 'grouped' "
                             "on CPU, 'blocks' on other GPUs).")
        return "mosaic"
    if backend not in BACKENDS:
        raise ValueError(f"gmm backend must be 'auto' or one of {BACKENDS}, got {backend!r}.")
    return backend


def cover_all_rows(group_sizes: Array, num_rows: int) -> Array:
    """``[G]`` -> ``[G]``: the last group also takes the rows past ``sum(group_sizes)``, so that every one of
    the ``num_rows`` rows belongs to a group (see the module docstring)."""
    return group_sizes.at[-1].add(num_rows - jnp.sum(group_sizes))


def _kwargs(fn, tiling: Tiling) -> dict:
    accepted = inspect.signature(fn).parameters
    return {k: v for k, v in dataclasses.asdict(tiling).items() if k in accepted and k != "kernel"}


def _fwd_kernel(backend: str, x: Array, w: Array, gs: Array, transpose_rhs: bool) -> Array:
    """``x [M, K]`` times ``w[g]`` (``w [G, K, N]``, or ``[G, N, K]`` used transposed) -> ``[M, N]``."""
    if backend == "xla":
        y = jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2) if transpose_rhs else w, gs)
        # the Mosaic kernel leaves rows past the groups unwritten; here they are NaN, so that a caller who
        # reads them fails its tests on CPU too (see the module docstring)
        outside = jnp.arange(x.shape[0]) >= jnp.sum(gs)
        return jnp.where(outside[:, None], jnp.asarray(jnp.nan, y.dtype), y)
    k = x.shape[1]
    n = w.shape[1] if transpose_rhs else w.shape[2]
    tiling = _TILING["fwd"]
    if tiling.kernel == "ws" and n % 128 == 0:  # a CTA covers 2 * block_n columns
        from moe_jax import gmm_mgpu

        tiling = tiling.fit(block_k=k, block_n=n // 2)
        return gmm_mgpu.ragged_matmul(x, w, gs, tile_m=tiling.block_m, tile_n=tiling.block_n,
                                      tile_k=tiling.block_k, max_concurrent_steps=tiling.max_concurrent_steps,
                                      grid_tile_width=tiling.grid_block_n, transpose_rhs=transpose_rhs)
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    tiling = dataclasses.replace(tiling, kernel="jax").fit(block_k=k, block_n=n)
    return ragged_dot_mgpu.ragged_dot(x, w, group_sizes=gs, transpose_rhs=transpose_rhs,
                                      **_kwargs(ragged_dot_mgpu.ragged_dot, tiling))


def _dw_kernel(backend: str, x: Array, dy: Array, gs: Array) -> Array:
    """``x [M, D]``, ``dy [M, F]`` -> ``[G, D, F]``: per group, ``x[rows]ᵀ · dy[rows]``."""
    if backend == "xla":
        dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                                 lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
        dw = jax.lax.ragged_dot_general(x, dy, gs, dims)
        # The Mosaic kernel masks a block's rows past its group by multiplying them by 0, so a NaN or inf
        # there (e.g. an unwritten forward row) spoils the gradient. Reproduce that (for the whole last
        # group; one scalar, not a GEMM): 0 * (sum of x past the groups) * (sum of dy past the groups).
        outside = (jnp.arange(x.shape[0]) >= jnp.sum(gs))[:, None]
        spoil = jnp.sum(jnp.where(outside, x, 0)) * jnp.sum(jnp.where(outside, dy, 0))
        return dw.at[-1].add(0 * spoil)
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    tiling = _TILING["dw"].fit(block_m=x.shape[1], block_n=dy.shape[1])
    fn = transposed_ragged_dot_mgpu.transposed_ragged_dot
    return fn(x, dy, group_sizes=gs, **_kwargs(fn, tiling))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul(x: Array, w: Array, group_sizes: Array, backend: str) -> Array:
    return _fwd_kernel(backend, x, w, group_sizes, transpose_rhs=False)


def _gmm_fwd(x, w, group_sizes, backend):
    return _fwd_kernel(backend, x, w, group_sizes, transpose_rhs=False), (x, w, group_sizes)


def _gmm_bwd(backend, res, dy):
    x, w, gs = res
    dy = dy.astype(x.dtype)
    dx = _fwd_kernel(backend, dy, w, gs, transpose_rhs=True)  # [M, D] = dy · w[g]ᵀ
    dw = _dw_kernel(backend, x, dy, gs)  # [G, D, F]
    return dx.astype(x.dtype), dw.astype(w.dtype), np.zeros(gs.shape, dtype=jax.dtypes.float0)


_grouped_matmul.defvjp(_gmm_fwd, _gmm_bwd)


def grouped_matmul(x: Array, w: Array, group_sizes: Array, backend: str = "auto") -> Array:
    """``x [M, D]``, ``w [G, D, F]``, ``group_sizes [G]`` (int, summing to at most M) -> ``[M, F]`` (see the
    module docstring). ``x`` and ``w`` must share a dtype; ``backend`` is ``'auto'`` (Mosaic where it runs,
    else a ValueError), ``'mosaic'`` or ``'xla'``. Differentiable in ``x`` and ``w``."""
    backend = resolve_backend(backend)
    if x.ndim != 2 or w.ndim != 3 or group_sizes.shape != (w.shape[0],) or x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_matmul: expected x [M, D], w [G, D, F], group_sizes [G]; got x {x.shape}, "
                         f"w {w.shape}, group_sizes {group_sizes.shape}.")
    if x.dtype != w.dtype:
        raise ValueError(f"grouped_matmul: x and w must share a dtype, got {x.dtype} and {w.dtype}.")
    if backend == "mosaic" and x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"dropless_impl='gmm' (Mosaic GPU kernels) needs bfloat16 or float16 experts, got "
                         f"{x.dtype}: set the model's dtype to bfloat16, or use dropless_impl='blocks'.")
    return _grouped_matmul(x, w, group_sizes.astype(jnp.int32), backend)
