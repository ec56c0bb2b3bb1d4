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
  once for each group it touches (``_GroupTile``), and the epilogue stores only that group's rows, with a
  ladder of power-of-two TMA stores (a TMA store has a static row count);
* tiles that hold no row of any group (the enumeration's tail, empty groups) skip the pipeline entirely.

Pallas is imported only when the kernel is traced: on a Hopper GPU, or on CPU in JAX's Pallas Mosaic GPU
interpreter (``interpret=``, how ``tests/test_gmm.py`` checks it). Measured on an H200: docs/perf.md, session 6.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class _GroupTile:
    """Which group and which rows the ``tid``-th ragged row tile covers. Tile ids run over the groups in order,
    each group taking the row tiles it overlaps, one id per (group, tile) pair: at most ``cdiv(M, tile_m) + G
    - 1`` ids. As ``ragged_dot_mgpu.GroupInfo``, except that an empty group takes no id when its start is a
    multiple of ``tile_m`` (an id no group takes has ``size`` 0 and is skipped)."""

    group: jax.Array
    block_start: jax.Array  # first row of the tile (a multiple of tile_m)
    start_within_block: jax.Array  # first row of the group in the tile, relative to block_start
    size: jax.Array  # rows of the group in the tile (0: nothing to do)

    @classmethod
    def create(cls, group_sizes_ref, num_groups: int, tile_m: int, tid):
        tile = jnp.int32(tile_m)
        zero = jnp.int32(0)
        end = block = group = g_start = g_end = zero
        # Unrolled over the groups (E is small); selects instead of an early exit.
        for i in range(num_groups):
            start = end
            end = start + group_sizes_ref[i]
            first_block = lax.div(start, tile)
            # the tile after the group's last row; an empty group aligned to a tile covers no tile
            stop_block = lax.div(end + tile - 1, tile)
            stop_block = jnp.maximum(stop_block, first_block)
            tid_begin = first_block + i
            tid_end = stop_block + i
            here = (tid_begin <= tid) & (tid < tid_end)
            block = lax.select(here, tid - tid_begin + first_block, block)
            group = lax.select(here, jnp.int32(i), group)
            g_start = lax.select(here, start, g_start)
            g_end = lax.select(here, end, g_end)
        block_start = block * tile
        lo = jnp.maximum(g_start, block_start)
        hi = jnp.minimum(g_end, block_start + tile)
        return cls(group=group, block_start=block_start, start_within_block=lo - block_start,
                   size=jnp.maximum(hi - lo, 0))


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
    grid_m = pl.cdiv(m, tile_m) + g - 1  # ragged row tiles: at most one extra per group boundary
    grid_n = n // cta_n
    k_iters = k // tile_k
    if num_sms is None:
        num_sms = 4 if interpret else jax.devices()[0].core_count

    def body(gs_gmem, x_gmem, w_gmem, o_gmem):
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
                info = _GroupTile.create(gs_gmem, g, tile_m, mi)
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
                        start = info.start_within_block
                        rows = min(tile_m, m)
                        while rows > 0:
                            length = 1 << int(math.log2(rows))
                            rows //= 2

                            @pl.when((info.size & length) != 0)
                            def _store(start=start, length=length):
                                plgpu.copy_smem_to_gmem(
                                    o_smem.at[wg, pl.ds(start, length)],
                                    o_gmem.at[pl.ds(info.block_start + start, length),
                                              pl.ds(col0 + wg * tile_n, tile_n)])

                            start = start + (info.size & length)

                def mma_body(_, x_smem, w_smem, acc_ref):
                    if transpose_rhs:
                        rhs = plgpu.transpose_ref(w_smem.at[pl.ds(wg * tile_n, tile_n), :], (1, 0))
                    else:
                        rhs = w_smem.at[:, pl.ds(wg * tile_n, tile_n)]
                    plgpu.wgmma(acc_ref, x_smem, rhs)
                    plgpu.wgmma_wait(0)
                    return acc_ref

                w_tile = (w_gmem.at[info.group, pl.ds(col0, cta_n), :] if transpose_rhs
                          else w_gmem.at[info.group, :, pl.ds(col0, cta_n)])

                @pl.when(info.size > 0)
                def _run():
                    pipeline(mma_body, compute_context, info.block_start // tile_m)(
                        x_gmem, w_tile, allocations=allocs)

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
    return kernel(group_sizes.astype(jnp.int32), x, w)
