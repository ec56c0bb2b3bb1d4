"""moe_jax.gmm: grouped matmul on rows sorted by group, its own VJP, and its errors.

The Mosaic GPU kernels need a Hopper GPU (experiments/bench_gmm.py checks them there against the 'xla'
kernels); on CPU the same custom VJP runs with the 'xla' kernels, checked here against numbers derived by
hand and against autodiff of ``jax.lax.ragged_dot``. Our own forward kernel (``moe_jax.gmm_mgpu``) also runs
here, in JAX's Pallas Mosaic GPU interpreter.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import gmm


def test_hand_derived_values_and_gradients():
    # x [M=4, D=2], groups of sizes [1, 3]: row 0 -> w[0], rows 1..3 -> w[1]
    x = jnp.array([[1., 0.], [0., 1.], [1., 1.], [2., -1.]])
    w = jnp.array([[[1., 2., 0.], [0., 1., 1.]],  # w[0] [D=2, F=3]
                   [[0., 1., 1.], [1., 0., 2.]]])  # w[1]
    gs = jnp.array([1, 3])
    y = gmm.grouped_matmul(x, w, gs, backend="xla")
    # y0 = [1,0]·w0 = [1,2,0]; y1 = [0,1]·w1 = [1,0,2]; y2 = [1,1]·w1 = [1,1,3]; y3 = [2,-1]·w1 = [-1,2,0]
    np.testing.assert_array_equal(y, [[1, 2, 0], [1, 0, 2], [1, 1, 3], [-1, 2, 0]])
    # loss = sum(y) -> dy = ones. dx_i = ones · w[g(i)]ᵀ = row sums of w[g]: w0 -> [3, 2], w1 -> [2, 3]
    # dw[0] = x0ᵀ · ones = [[1,1,1],[0,0,0]]; dw[1] = (x1+x2+x3)ᵀ · ones = [3, 1] per column
    dx, dw = jax.grad(lambda x, w: jnp.sum(gmm.grouped_matmul(x, w, gs, backend="xla")), argnums=(0, 1))(x, w)
    np.testing.assert_array_equal(dx, [[3, 2], [2, 3], [2, 3], [2, 3]])
    np.testing.assert_array_equal(dw, [[[1, 1, 1], [0, 0, 0]], [[3, 3, 3], [1, 1, 1]]])


def test_custom_vjp_matches_autodiff_of_ragged_dot():
    # 5 groups, one of them empty, sizes summing to M; a random cotangent
    m, d, f = 13, 8, 6
    kx, kw, kr = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (m, d))
    w = jax.random.normal(kw, (5, d, f))
    r = jax.random.normal(kr, (m, f))
    gs = jnp.array([4, 0, 2, 6, 1])

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(fn(x, w) * r), argnums=(0, 1)))(x, w)

    got = loss(lambda x, w: gmm.grouped_matmul(x, w, gs, backend="xla"))
    ref = loss(lambda x, w: jax.lax.ragged_dot(x, w, gs))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(got[1][1][1]))) == 0.0  # the empty group gets no weight gradient
    assert float(jnp.min(jnp.abs(got[1][1][3]))) > 0.0


def test_cover_all_rows_gives_the_rest_to_the_last_group():
    # sizes [1, 2, 0] of M = 5 rows: the last group takes rows 3 and 4
    np.testing.assert_array_equal(gmm.cover_all_rows(jnp.array([1, 2, 0]), 5), [1, 2, 2])
    np.testing.assert_array_equal(gmm.cover_all_rows(jnp.array([3, 2]), 5), [3, 2])


def test_tiling_fits_each_block_to_its_dimension():
    t = gmm.Tiling(block_m=128, block_n=256, block_k=64)
    # 192 % 128 != 0 -> 64; 1024 % 256 == 0 -> 256; 512 % 64 == 0 -> 64
    assert t.fit(block_m=192, block_n=1024, block_k=512) == gmm.Tiling(block_m=64, block_n=256, block_k=64)
    with pytest.raises(ValueError, match="multiples of 64"):
        t.fit(block_m=96)


def test_tiling_kernel_field_is_checked():
    assert gmm.DEFAULT_TILING["fwd"] == gmm.WS_TILING and gmm.WS_TILING.kernel == "ws"
    assert gmm.JAX_FWD_TILING.kernel == "jax"
    with pytest.raises(ValueError, match="Tiling.kernel must be one of"):
        gmm.Tiling(kernel="cutlass")
    with pytest.raises(ValueError, match="weight-gradient kernel.*kernel='jax'"):
        gmm.set_tiling(dw=gmm.WS_TILING)
    assert gmm._TILING == gmm.DEFAULT_TILING


def test_forward_kernel_choice_and_its_fallback(monkeypatch):
    """With the 'ws' tiling the forward GEMM runs moe_jax.gmm_mgpu on 128 x (2 * block_n) tiles, block_n fitted
    to N / 2; an output width N that is not a multiple of 128 falls back to JAX's ragged_dot_mgpu with the same
    blocks (its own tiles are block_m x block_n). Both kernels replaced by recorders (no GPU here)."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    from moe_jax import gmm_mgpu

    calls = []
    monkeypatch.setattr(gmm_mgpu, "ragged_matmul", lambda x, w, gs, **kw: calls.append(("ws", kw)) or x)
    fake = functools.wraps(ragged_dot_mgpu.ragged_dot)(lambda x, w, **kw: calls.append(("jax", kw)) or x)
    monkeypatch.setattr(ragged_dot_mgpu, "ragged_dot", fake)  # keeps the signature that gmm reads
    x, gs = jnp.zeros((8, 128)), jnp.array([8])
    gmm._fwd_kernel("mosaic", x, jnp.zeros((1, 128, 256)), gs, transpose_rhs=False)  # N = 256
    gmm._fwd_kernel("mosaic", x, jnp.zeros((1, 128, 192)), gs, transpose_rhs=False)  # N = 192
    gmm._fwd_kernel("mosaic", x, jnp.zeros((1, 384, 128)), gs, transpose_rhs=True)  # N = 384 (w is [G, N, K])
    (k1, kw1), (k2, kw2), (k3, kw3) = calls
    assert k1 == "ws" and kw1["tile_n"] == 128 and kw1["max_concurrent_steps"] == 3 and not kw1["transpose_rhs"]
    assert k2 == "jax" and kw2["block_n"] == 64 and kw2["max_concurrent_steps"] == 3 and "kernel" not in kw2
    assert k3 == "ws" and kw3["tile_n"] == 64 and kw3["transpose_rhs"]  # 384 / 2 = 192: 128 does not divide it


def test_tile_table_enumerates_the_ragged_row_tiles():
    """gmm_mgpu.tile_table, derived by hand: groups of 70, 0, 100, 1, 64 rows (ends 70, 70, 170, 171, 235) in
    M = 300 rows, 64-row tiles, so cdiv(300, 64) + 5 - 1 = 9 tile ids:
    group 0 -> tiles 0 (rows 0-63) and 1 (64-69); the empty group 1 starts inside tile 1 -> one id of size 0;
    group 2 -> tile 1 (rows 70-127: offset 6, 58 rows) and tile 2 (128-169); group 3 -> tile 2 (row 170:
    offset 42); group 4 -> tile 2 (171-191: offset 43, 21 rows) and tile 3 (192-234); id 8 is nobody's."""
    from moe_jax.gmm_mgpu import tile_table

    table = np.asarray(tile_table(jnp.array([70, 0, 100, 1, 64]), 300, 64))
    np.testing.assert_array_equal(table, [[0, 0, 1, 2, 2, 3, 4, 4, 0],            # group
                                          [0, 64, 64, 64, 128, 128, 128, 192, 0],  # first row of the tile
                                          [0, 0, 6, 6, 0, 42, 43, 0, 0],           # group's offset in it
                                          [64, 6, 0, 58, 42, 1, 21, 43, 0]])       # group's rows in it
    # random sizes (empty groups, groups on tile boundaries, an empty first group): every row of every group
    # is covered exactly once, by a tile of its own group
    rng = np.random.default_rng(0)
    for sizes in ([0, 64, 0, 128, 3], list(rng.integers(0, 90, 12)), [0, 0, 0, 50]):
        sizes = np.asarray(sizes)
        m = int(sizes.sum()) + 7
        group, start, offset, size = np.asarray(tile_table(jnp.asarray(sizes), m, 64))
        assert len(group) == -(-m // 64) + len(sizes) - 1
        owner = np.full(m, -1)
        for g, b, o, n in zip(group, start, offset, size):
            assert b % 64 == 0 and 0 <= o and o + n <= 64
            assert (owner[b + o:b + o + n] == -1).all()
            owner[b + o:b + o + n] = g
        np.testing.assert_array_equal(owner[:sizes.sum()], np.repeat(np.arange(len(sizes)), sizes))
        assert (owner[sizes.sum():] == -1).all()


def _gpu_interpreter(**kw):
    try:  # a private module of jax (0.10): Mosaic GPU kernels run on CPU, shared memory and threads simulated
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:
        pytest.skip("this jax has no Pallas Mosaic GPU interpret mode")
    return InterpretGPUParams(**kw)


def test_warp_specialized_kernel_in_the_gpu_interpreter():
    """moe_jax.gmm_mgpu.ragged_matmul (the 'ws' forward kernel) run by JAX's GPU interpreter on CPU: TMA
    loads, the producer and the two MMA warpgroups, the ragged tiles and the ladder of masked stores. Groups:
    70 rows, an empty group, 100 rows, 1 row, 64 rows = 235 of M = 300 rows; with 64-row tiles the 1-row
    group and the empty one sit inside tiles that other groups share. Each group's rows must equal x · w[g];
    the 65 rows past the groups must stay unwritten (the interpreter's fresh memory is NaN). TMA reads past
    row 300 return the interpreter's NaN fill too; they only reach rows that are never stored."""
    from moe_jax import gmm_mgpu

    interp = _gpu_interpreter(out_of_bounds_reads="uninitialized")
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (300, 128), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (5, 128, 256), jnp.float32).astype(jnp.bfloat16)
    sizes = np.array([70, 0, 100, 1, 64], np.int32)
    y = gmm_mgpu.ragged_matmul(x, w, jnp.asarray(sizes), tile_m=64, tile_n=64, max_concurrent_steps=2,
                               grid_tile_width=2, interpret=interp, num_sms=3)
    y = np.asarray(y, np.float32)
    xf, wf = np.asarray(x, np.float32), np.asarray(w, np.float32)
    ends = np.cumsum(sizes)
    for g, (lo, hi) in enumerate(zip(ends - sizes, ends)):
        np.testing.assert_allclose(y[lo:hi], xf[lo:hi] @ wf[g], rtol=2e-2, atol=0.3)
    assert np.isnan(y[235:]).all()
    with pytest.raises(ValueError, match=r"N=192 a multiple of 2\*tile_n=128"):
        gmm_mgpu.ragged_matmul(x, w[:, :, :192], jnp.asarray(sizes), tile_n=64, interpret=interp)


def test_errors_name_the_field_and_the_fix():
    x = jnp.zeros((4, 8))
    w = jnp.zeros((2, 8, 16))
    gs = jnp.array([2, 2])
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="dropless_impl='gmm'.*Hopper.*dropless_impl='auto'"):
            gmm.grouped_matmul(x, w, gs)
    with pytest.raises(ValueError, match="share a dtype"):
        gmm.grouped_matmul(x, w.astype(jnp.bfloat16), gs, backend="xla")
    with pytest.raises(ValueError, match=r"x \[M, D\], w \[G, D, F\]"):
        gmm.grouped_matmul(x, w, jnp.array([4]), backend="xla")
    with pytest.raises(ValueError, match="bfloat16"):
        gmm.grouped_matmul(x, w, gs, backend="mosaic")
    with pytest.raises(ValueError, match="backend"):
        gmm.grouped_matmul(x, w, gs, backend="cuda")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error off a GPU")
def test_moe_layer_with_gmm_off_a_hopper_gpu_says_what_to_use():
    from moe_jax.moe import MoEConfig, MoELayer

    cfg = MoEConfig(num_experts=4, k=2, expert_hidden=64, dispatcher="dropless", dropless_impl="gmm")
    layer = MoELayer(cfg, dtype=jnp.bfloat16)
    x = jnp.zeros((1, 8, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="dropless_impl='gmm'.*Hopper"):
        layer.init({"params": jax.random.key(0), "router": jax.random.key(1)}, x, train=True)


def test_default_dropless_impl_picks_gmm_only_on_hopper_with_half_precision(monkeypatch):
    from moe_jax import dispatch

    assert dispatch.default_dropless_impl("cpu", dtype=jnp.bfloat16) == "grouped"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(gmm, "mosaic_unavailable_reason", lambda: None)  # as on an H100/H200
    assert dispatch.default_dropless_impl(dtype=jnp.bfloat16) == "gmm"
    assert dispatch.default_dropless_impl(dtype="float16") == "gmm"
    assert dispatch.default_dropless_impl(dtype=jnp.float32) == "blocks"  # the kernels are half precision
    assert dispatch.default_dropless_impl(dtype=None) == "blocks"
    assert dispatch.default_dropless_impl(sharded=True, dtype=jnp.bfloat16) == "blocks"
    monkeypatch.setattr(gmm, "mosaic_unavailable_reason", lambda: "an A100")
    assert dispatch.default_dropless_impl(dtype=jnp.bfloat16) == "blocks"


def test_bench_gmm_dry_run_off_a_gpu(tmp_path, capsys):
    """experiments/bench_gmm.py end to end with the 'xla' kernels (what it runs on a Hopper GPU with
    'mosaic'): the check passes, every tiling of the sweep runs, the best tilings land in the JSON."""
    import json
    import os
    import runpy
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    try:
        bench = runpy.run_path(f"{root}/experiments/bench_gmm.py")
    finally:
        sys.path.remove(root)
    out = tmp_path / "tiling.json"
    bench["main"](["--backend", "xla", "--tokens", "64", "--k", "1", "--d-model", "64", "--hidden", "128",
                   "--experts", "4", "--json", str(out)])
    text = capsys.readouterr().out
    assert text.count("PASS") == 3 and "FAIL" not in text and "failed" not in text  # kernels, 2 layer checks
    assert text.count("check fwd kernel 'ws' ") == 3 and text.count("check fwd kernel 'jax' ") == 3
    assert text.count("| 4 | x·w[g] |") == len(bench["FWD_SWEEP"])
    assert text.count("| 4 | x[g]ᵀ·dy[g] |") == len(bench["DW_SWEEP"])
    best = json.loads(out.read_text())
    assert set(best) == {"fwd", "dw", "fwd_jax", "fwd_ws"}
    assert gmm.Tiling(**best["fwd_ws"]).kernel == "ws" and gmm.Tiling(**best["fwd_jax"]).kernel == "jax"
    assert gmm.Tiling(**best["fwd"]) and gmm.Tiling(**best["dw"]).kernel == "jax"
    assert gmm.read_tilings(str(out)) == {kind: gmm.Tiling(**fields) for kind, fields in best.items()}
    assert gmm._TILING == gmm.DEFAULT_TILING  # the sweep put the defaults back


def test_rows_past_the_groups_are_poisoned_and_cover_all_rows_fixes_it():
    # the Mosaic forward kernel leaves rows past sum(group_sizes) unwritten; the 'xla' kernels make them NaN
    x = jnp.ones((5, 4))
    w = jnp.ones((2, 4, 3))
    gs = jnp.array([1, 2])  # rows 3 and 4 belong to no group
    y = np.asarray(gmm.grouped_matmul(x, w, gs, backend="xla"))
    assert np.all(y[:3] == 4.0) and np.all(np.isnan(y[3:]))
    y = gmm.grouped_matmul(x, w, gmm.cover_all_rows(gs, 5), backend="xla")
    np.testing.assert_array_equal(y, np.full((5, 3), 4.0))


def test_a_nan_past_the_groups_spoils_the_weight_gradient_as_on_the_gpu():
    # the Mosaic weight-gradient kernel masks rows past the groups by multiplying by 0: NaN * 0 = NaN
    x = jnp.ones((5, 4)).at[4, 0].set(jnp.nan)  # groups [1, 2] cover rows 0..2; rows 3 and 4 are past them
    dy = jnp.ones((5, 3))
    gs = jnp.array([1, 2])
    dw = np.asarray(gmm._dw_kernel("xla", x, dy, gs))
    assert np.all(np.isfinite(dw[0])) and np.isnan(dw[1]).any()
    dw = np.asarray(gmm._dw_kernel("xla", x.at[4, 0].set(7.0), dy, gs))
    np.testing.assert_array_equal(dw[1], np.full((4, 3), 2.0))  # rows 1, 2 of ones: 1 + 1
