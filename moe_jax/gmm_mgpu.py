"""A warp-specialized ragged GEMM for Hopper GPUs (Pallas Mosaic GPU): the forward and input-gradient kernel of
``moe_jax.gmm`` with ``gmm.Tiling(kernel='ws')`` (the default, ``gmm.WS_TILING``).

``ragged_matmul(x [M, K], w [G, K, N] (or [G, N, K] with transpose_rhs), group_sizes [G]) -> [M, N]``: rows
``[o_g, o_g + n_g)`` of ``x`` times ``w[g]``; rows past ``sum(group_sizes)`` are left unwritten (the same
contract as JAX's ``ragged_dot_mgpu``, see ``moe_jax.gmm``).

How it differs from ``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`` (one warpgroup per CTA that both
loads and multiplies, a ``block_m x block_n`` tile): each CTA runs three warpgroups, one that only issues the
TMA loads and two that only multiply (``emit_pipeline_warp_specialized``), on a ``tile_m x 2*tile_n`` tile
whose two column halves share the row block of ``x``. That is the structure of JAX's dense Hopper matmul
(``hopper_matmul_mgpu``), which keeps the tensor cores busier than a single warpgroup can. What is ragged:

* the row tiles are enumerated as in ``ragged_dot_mgpu``: a tile that straddles a group boundary is computed
  once for each group it touches, and the epilogue stores only that group's rows, with a ladder of
  power-of-two TMA stores (a TMA store has a static row count). Which group and rows each tile id covers is
  a table (``tile_table``) that XLA computes before the kernel, read with four loads per tile;
* tiles that hold no row of any group (the enumeration's tail, empty groups) skip the pipeline entirely.

Pallas is imported only when the kernel is traced: on a Hopper GPU, or on CPU in JAX's Pallas Mosaic GPU
interpreter (``interpret=``, how ``tests/test_gmm.py`` checks it). Measured on an H200 in docs/perf.md,
"GPU: what is known", in the version before ``tile_table`` (each tile scanned the group sizes); the table is not
measured on a GPU yet.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax


def tile_table(group_sizes, num_rows: int, tile_m: int):
    """The ragged row tiles: ``group_sizes [G]`` -> int32 ``[4, cdiv(num_rows, tile_m) + G - 1]``, per tile id
    its group, its first row ``block_start`` (a multiple of ``tile_m``), the group's first row in it relative
    to ``block_start``, and the group's row count in it (0: the kernel skips the tile).

    Tile ids run over the groups in order, each group taking one id per row tile it overlaps, so a tile that
    straddles a group boundary gets one id per group; an empty group takes an id (of size 0) only when its
    start falls inside a tile, and ids no group takes have size 0. This is the enumeration of
    ``ragged_dot_mgpu.GroupInfo``, except for an empty group at row 0, which takes no id here. Computed once
    by XLA before the kernel, so each tile reads four numbers instead of scanning all G group sizes, which
    costs G loads on every tile (64 at E = 64)."""
    g = group_sizes.shape[0]
    grid_m = -(-num_rows // tile_m) + g - 1
    sizes = group_sizes.astype(jnp.int32)
    end = jnp.cumsum(sizes)
    start = end - sizes
    first = start // tile_m
    stop = jnp.maximum((end + tile_m - 1) // tile_m, first)  # one past the group's last tile
    tid_begin = first + jnp.arange(g, dtype=jnp.int32)
    tid_end = stop + jnp.arange(g, dtype=jnp.int32)  # increasing: the groups' id ranges are disjoint, in order
    t = jnp.arange(grid_m, dtype=jnp.int32)
    grp = jnp.searchsorted(tid_end, t, side="right")  # the first group whose ids end after t
    gi = jnp.minimum(grp, g - 1)
    inside = (grp < g) & (tid_begin[gi] <= t)
    block_start = (t - tid_begin[gi] + first[gi]) * tile_m
    lo = jnp.maximum(start[gi], block_start)
    hi = jnp.minimum(end[gi], block_start + tile_m)
    zero = jnp.zeros_like(t)
    return jnp.stack([jnp.where(inside, gi, zero), jnp.where(inside, block_start, zero),
                      jnp.where(inside, lo - block_start, zero),
                      jnp.where(inside, jnp.maximum(hi - lo, 0), zero)]).astype(jnp.int32)


def ragged_matmul(x, w, group_sizes, *, tile_m: int = 128, tile_n: int = 128, tile_k: int = 64,
                  max_concurrent_steps: int = 3, grid_tile_width: int = 4, transpose_rhs: bool = False,
                  num_sms: int | None = None, interpret=False):
    """``x [M, K]``, ``w [G, K, N]`` (``[G, N, K]`` if ``transpose_rhs``), ``group_sizes [G]`` int32 ->
    ``[M, N]``. Each CTA computes ``tile_m x (2 * tile_n)`` output tiles (two compute warpgroups of
    ``tile_m x tile_n``), ``grid_tile_width`` column tiles per band of the tile order, with a
    ``max_concurrent_steps``-deep TMA pipeline over ``K``. Needs ``K % tile_k == 0`` and
    ``N % (2 * tile_n) == 0``. ``num_sms``: persistent CTAs (default: the device's SM count; 4 when
    interpreted); ``interpret``: JAX's GPU interpreter parameters, to run on CPU."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if x.dtype != w.dtype:
        raise ValueError(f"ragged_matmul: x and w must share a dtype, got {x.dtype} and {w.dtype}.")
    m, k = x.shape
    g = w.shape[0]
    n, k2 = (w.shape[1], w.shape[2]) if transpose_rhs else (w.shape[2], w.shape[1])
    if k != k2 or group_sizes.shape != (g,):
        raise ValueError(f"ragged_matmul: shapes x {x.shape}, w {w.shape} (transpose_rhs={transpose_rhs}), "
                         f"group_sizes {group_sizes.shape} do not match.")
    cta_n = 2 * tile_n
    if k % tile_k or n % cta_n:
        raise ValueError(f"ragged_matmul: K={k} must be a multiple of tile_k={tile_k} and N={n} a multiple of "
                         f"2*tile_n={cta_n}.")
    dtype = x.dtype
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(tile_k * itemsize * 8)
    swizzle_elems = swizzle // itemsize
    transforms = (plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(swizzle))
    table = tile_table(group_sizes, m, tile_m)
    grid_m = table.shape[1]  # ragged row tile ids: cdiv(M, tile_m) + G - 1
    grid_n = n // cta_n
    k_iters = k // tile_k
    if num_sms is None:
        num_sms = 4 if interpret else jax.devices()[0].core_count

    def body(table_gmem, x_gmem, w_gmem, o_gmem):
        def pipeline(mma_body, compute_context, tile):
            if transpose_rhs:
                w_spec = plgpu.BlockSpec((cta_n, tile_k), lambda kk: (0, kk), transforms=transforms)
            else:
                w_spec = plgpu.BlockSpec((tile_k, cta_n), lambda kk: (kk, 0), transforms=transforms)
            return plgpu.emit_pipeline_warp_specialized(
                mma_body,
                grid=(k_iters,),
                memory_registers=40,
                in_specs=[
                    plgpu.BlockSpec((tile_m, tile_k), lambda kk: (tile, kk), transforms=transforms),
                    w_spec,
                ],
                wg_axis="wg",
                num_compute_wgs=2,
                max_concurrent_steps=max_concurrent_steps,
                compute_context=compute_context,
            )

        ignore = lambda *_, **__: None  # noqa: E731  (allocations do not depend on the bodies)

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(ignore, ignore, 0).get_allocations(x_gmem, w_gmem.at[0]),
            o_smem=plgpu.SMEM((2, tile_m, tile_n), o_gmem.dtype),
            collective_axes="wg",
        )
        def _scope(allocs, o_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
            def _tiles(loop_info):
                mi, ni = plgpu.planar_snake(loop_info.index[0], (grid_m, grid_n), 1, grid_tile_width)
                group, block_start = table_gmem[0, mi], table_gmem[1, mi]
                start_within, size = table_gmem[2, mi], table_gmem[3, mi]
                col0 = ni * cta_n

                def compute_context(eval_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.float32))
                    def _acc(acc_ref):
                        eval_pipeline(acc_ref)
                        acc = acc_ref[...].astype(o_gmem.dtype)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_smem[wg] free again
                        o_smem[wg] = acc
                        plgpu.commit_smem()
                        # store rows [start, start + size) of the tile: a ladder of power-of-two row counts
                        start = start_within
                        rows = min(tile_m, m)
                        while rows > 0:
                            length = 1 << int(math.log2(rows))
                            rows //= 2

                            @pl.when((size & length) != 0)
                            def _store(start=start, length=length):
                                plgpu.copy_smem_to_gmem(
                                    o_smem.at[wg, pl.ds(start, length)],
                                    o_gmem.at[pl.ds(block_start + start, length),
                                              pl.ds(col0 + wg * tile_n, tile_n)])

                            start = start + (size & length)

                def mma_body(_, x_smem, w_smem, acc_ref):
                    if transpose_rhs:
                        rhs = plgpu.transpose_ref(w_smem.at[pl.ds(wg * tile_n, tile_n), :], (1, 0))
                    else:
                        rhs = w_smem.at[:, pl.ds(wg * tile_n, tile_n)]
                    plgpu.wgmma(acc_ref, x_smem, rhs)
                    plgpu.wgmma_wait(0)
                    return acc_ref

                w_tile = (w_gmem.at[group, pl.ds(col0, cta_n), :] if transpose_rhs
                          else w_gmem.at[group, :, pl.ds(col0, cta_n)])

                @pl.when(size > 0)
                def _run():
                    pipeline(mma_body, compute_context, block_start // tile_m)(x_gmem, w_tile, allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), dtype),
        grid=(num_sms,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return kernel(table, x, w)
