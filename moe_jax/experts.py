"""Feed-forward networks: a dense FFN and E experts batched on a leading ``E`` axis.

Axes (see ``moe_jax.moe``): ``E`` experts, ``N`` rows per expert, ``D`` model width, ``F`` hidden width,
``NB`` blocks of ``b`` rows (dropless layout).

Parameters (no biases, as in T5/Switch/Mixtral, so a zero row maps to a zero row)::

    dense FFN:  wi [D, F], (wg [D, F] if GLU), wo [F, D]
    experts:    wi [E, D, F], (wg [E, D, F]), wo [E, F, D]

Every expert is initialised independently: the initializer's fan-in is ``D`` (resp. ``F``), never ``E * D``,
and each expert draws its own values. ``y = (act(x wg) * (x wi)) wo`` with a GLU (SwiGLU when act is silu),
else ``y = act(x wi) wo``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

ACTIVATIONS: Dict[str, Callable[[Array], Array]] = {
    "gelu": nn.gelu,
    "relu": nn.relu,
    "silu": nn.silu,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: unknown {name!r}; choose one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def on_rows(f: Callable[[Array], Array], x: Array, feature_dims: int = 1) -> Array:
    """``f`` applied to ``x[..., *features]`` with the leading (token) axes flattened into one row axis.

    Why: the weight gradient of a projection applied to ``[B, L, D]`` contracts over two token axes, and
    XLA:CPU runs that dot far slower than the same product over one flattened axis (jax 0.10.2, one thread,
    ``[8, 1024, 512] @ [512, 1024]`` forward + backward: 385 ms against 268 ms; docs/perf.md). The reshape
    is free (row-major), so every token-wise projection in the package goes through here.
    """
    lead = x.shape[:x.ndim - feature_dims]
    y = f(x.reshape((-1,) + x.shape[x.ndim - feature_dims:]))
    return y.reshape(lead + y.shape[1:])


@jax.custom_vjp
def narrow_matmul(x: Array, w: Array) -> Array:
    """``x[N, D] @ w[D, E]`` for a narrow output (``E < D``: a router's gate), same value and gradients as
    the plain product; only the weight gradient is computed another way: ``(g.T @ x).T`` instead of
    ``x.T @ g``.

    Why: XLA:CPU runs the weight gradient of a narrow projection, a dot that contracts the row axis of both
    operands into a ``[D, E]`` result, much slower than the same sums into ``[E, D]`` (jax 0.10.2, one
    thread, N = 8192, D = 512: E=8 11.98 against 1.86 ms, E=64 15.84 against 5.52 ms; the gain shrinks as E
    nears D, and E = 2D loses: experiments/probes/narrow_weight_grad.py). The barrier keeps XLA from folding
    the small ``[E, D]`` transpose back into the dot.
    """
    return x @ w


def _narrow_fwd(x, w):
    return x @ w, (x, w)


def _narrow_bwd(res, g):
    x, w = res
    dw = jax.lax.optimization_barrier(g.T @ x).T
    return (g @ w.T).astype(x.dtype), dw.astype(w.dtype)


narrow_matmul.defvjp(_narrow_fwd, _narrow_bwd)


def narrow_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general`` for ``nn.Dense(dot_general=...)``: a plain ``[N, D] @ [D, E]`` with ``E < D`` runs
    as ``narrow_matmul``; anything else (other shapes or dimension numbers, a precision) falls through."""
    plain = (((lhs.ndim - 1,), (0,)), ((), ()))
    if (lhs.ndim == 2 and rhs.ndim == 2 and rhs.shape[1] < rhs.shape[0] and precision is None
            and preferred_element_type is None and lhs.dtype == rhs.dtype
            and tuple(tuple(tuple(axes) for axes in pair) for pair in dimension_numbers) == plain):
        return narrow_matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


def _glu_or_act(activation: str, glu: bool):
    """``mix(h, hg)``: ``act(hg) * h`` with a gate (``h = x wi``, ``hg = x wg``), else ``act(h)``."""
    act = get_activation(activation)
    return (lambda h, hg: act(hg) * h) if glu else (lambda h, hg: act(h))


def ffn_apply(params: Dict[str, Array], x: Array, activation: str, eq_in: str, eq_out: str, dtype) -> Array:
    """The FFN on any layout, given einsum strings for the two projections."""
    glu = "wg" in params
    x = x.astype(dtype)
    h = jnp.einsum(eq_in, x, params["wi"].astype(dtype))
    hg = jnp.einsum(eq_in, x, params["wg"].astype(dtype)) if glu else h
    return jnp.einsum(eq_out, _glu_or_act(activation, glu)(h, hg), params["wo"].astype(dtype))


def _row_counts(rows: int, quantum: int):
    """The static row counts ``quantum, 2*quantum, ..., rows`` of a remainder switch."""
    return list(range(quantum, rows, quantum)) + [rows]


def _rows_switch(rows_wanted, quantum: int, counts, branch, *operands):
    """``branch(r)(*operands)`` for the smallest static ``r`` in ``counts`` that holds ``rows_wanted`` rows
    (a traced count, rounded up to the quantum; at least one quantum, at most ``counts[-1]``)."""
    index = jnp.clip(-(-rows_wanted // quantum) - 1, 0, len(counts) - 1)
    return jax.lax.switch(index, [branch(r) for r in counts], *operands)


def _kernel_init(batch_axes=()):
    # LeCun-normal-like, truncated, fan-in over the input axis only (in_axis=-2), never over E.
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                            batch_axis=batch_axes)


class DenseFFN(nn.Module):
    """``[..., D] -> [..., D]`` FFN of hidden width ``hidden``."""

    hidden: int
    activation: str = "gelu"
    glu: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        params = {"wi": self.param("wi", _kernel_init(), (d, self.hidden), self.param_dtype)}
        if self.glu:
            params["wg"] = self.param("wg", _kernel_init(), (d, self.hidden), self.param_dtype)
        params["wo"] = self.param("wo", _kernel_init(), (self.hidden, d), self.param_dtype)
        return on_rows(lambda rows: ffn_apply(params, rows, self.activation, "nd,df->nf", "nf,fd->nd", self.dtype), x)


class BatchedExperts(nn.Module):
    """E expert FFNs with params stacked on a leading ``E`` axis (expert parallelism shards that axis).

    ``__call__(x[E, N, D]) -> [E, N, D]``: expert e applied to row block e (capacity layouts).
    ``blocks(x[NB, b, D], block_expert[NB]) -> [NB, b, D]``: block j goes to expert ``block_expert[j]``
    (dropless layout; the weights are gathered per block).
    ``one(e, x[D]) -> [D]``: a single token through expert e (the loop reference).
    """

    num_experts: int
    d_model: int
    hidden: int
    activation: str = "gelu"
    glu: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        e, d, f = self.num_experts, self.d_model, self.hidden
        init = _kernel_init(batch_axes=(0,))
        self.wi = self.param("wi", init, (e, d, f), self.param_dtype)
        self.wg = self.param("wg", init, (e, d, f), self.param_dtype) if self.glu else None
        self.wo = self.param("wo", init, (e, f, d), self.param_dtype)

    def params(self, d: Optional[int] = None) -> Dict[str, Array]:
        """The stacked weights ``{'wi', ('wg',) 'wo'}`` (for layouts implemented outside this module:
        sorted dropless, expert parallelism). ``d``: the input width, checked against ``d_model``."""
        if d is not None and d != self.d_model:
            raise ValueError(f"BatchedExperts: input width {d} != d_model {self.d_model}.")
        params = {"wi": self.wi, "wo": self.wo}
        if self.glu:
            params["wg"] = self.wg
        return params

    def __call__(self, x: Array, rows_used: Optional[Array] = None) -> Array:
        """``x[E, N, D] -> [E, N, D]``. With ``rows_used [E]`` (int): only the first ``rows_used[e]`` rows of
        expert e hold tokens; the others must be zero rows (the dispatchers' empty slots are) and get output 0
        and gradient 0: ``sorted_rows_ffn`` with ``stride = N``, one FFN per expert on its filled rows rounded
        up to ``N / 16`` (a row in that rounding is computed, hence the zero rows). A capacity buffer has
        ``cf * K * T`` rows of which about ``K * T`` hold tokens; on CPU the batched matmul pays for all of
        them (docs/perf.md)."""
        params = self.params(x.shape[-1])
        if rows_used is not None:
            cast = {k: v.astype(self.dtype) for k, v in params.items()}
            e, m, d = x.shape
            y = sorted_rows_ffn(x.astype(self.dtype).reshape(e * m, d), rows_used.astype(jnp.int32), cast,
                                self.activation, m, m)
            return y.reshape(e, m, d)
        return ffn_apply(params, x, self.activation, "end,edf->enf", "enf,efd->end", self.dtype)

    def blocks(self, x: Array, block_expert: Array) -> Array:
        params = self.params(x.shape[-1])
        gathered = {k: jnp.take(v, block_expert, axis=0) for k, v in params.items()}  # [NB, ...]
        return ffn_apply(gathered, x, self.activation, "nbd,ndf->nbf", "nbf,nfd->nbd", self.dtype)

    def one(self, e: int, x: Array) -> Array:
        params = self.params(x.shape[-1])
        single = {k: v[e] for k, v in params.items()}
        return ffn_apply(single, x, self.activation, "d,df->f", "f,fd->d", self.dtype)


# ------------------------------------------------------------------------------ dropless: rows sorted by expert


def sorted_rows_chunk(num_rows: int, num_experts: int) -> int:
    """Chunk size Q of ``sorted_rows_ffn`` (dropless): 1.25 times the mean rows per expert, rounded up to a
    multiple of 16, at least 16. Most experts then fit one chunk, and the remainder's quantum (Q / 16) and
    padded tiles stay small: the dropless layer took 0.95-0.98 of its time with twice the mean (the earlier
    choice) at every E in {8, 16, 32, 64} and K in {1, 2} (XLA:CPU, T=8192, one process, 7 paired
    rounds; 1.5 times the mean: 0.96-1.00; experiments/probes/ab_dropless_chunk.py)."""
    return max(16, -(-5 * num_rows // (num_experts * 4 * 16)) * 16)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def sorted_rows_ffn(x: Array, group_sizes: Array, params: Dict[str, Array], activation: str, chunk: int,
                    stride: int = 0) -> Array:
    """Expert FFNs on rows sorted by expert: ``x[N, D]``, ``group_sizes[E]`` -> ``[N, D]`` (the dropless layout).

    Expert e owns rows ``[start_e, start_e + n_e)`` (``start = cumsum(n) - n``). It runs in chunks of ``chunk``
    rows and a remainder rounded up to ``max(1, chunk // 16)`` rows (a ``lax.switch`` over at most 31 row
    counts), each chunk one FFN (all of its products on the same rows), experts in order. A remainder may
    compute a few rows of the next expert with this expert's weights; the next expert overwrites them (experts
    run in order), and rows past ``sum(n)`` must be masked by the caller (``ragged_dot_experts`` does).
    Backward: the same loop (custom VJP) with the cotangent of rows outside the expert masked, the
    pre-activations kept from the forward pass, and one weight gradient per expert accumulated over its chunks.

    ``stride > 0``: expert e's rows start at ``e * stride`` instead (a capacity buffer ``[E, stride, D]``
    flattened, its filled rows first; ``BatchedExperts(x, rows_used)``). With ``chunk = stride`` no expert reads
    or writes past its own rows, and rows past ``group_sizes[e]`` get gradient 0, and output 0 if they are zero
    rows (the remainder's rounding computes some of them; a capacity buffer's empty slots are zero).
    """
    return _sorted_fwd(x, group_sizes, params, activation, chunk, stride)[0]


def _sorted_setup(x, group_sizes, params, activation, chunk, stride):
    n, d = x.shape
    glu = "wg" in params
    quantum = max(1, chunk // 16)
    counts = _row_counts(chunk, quantum)
    if stride:
        starts = jnp.arange(group_sizes.shape[0], dtype=jnp.int32) * stride
    else:
        starts = (jnp.cumsum(group_sizes) - group_sizes).astype(jnp.int32)
    # Rows past the end that a padded tile may touch: none when every expert's span is whole chunks of its
    # own stride (the capacity buffer: chunk == stride), else up to one chunk (the arrays get that many
    # zero rows, and the results are sliced back).
    overrun = 0 if stride and stride % chunk == 0 else chunk
    return n, d, glu, _glu_or_act(activation, glu), quantum, counts, starts, overrun


def _pad_rows(a, rows):
    return jnp.concatenate([a, jnp.zeros((rows,) + a.shape[1:], a.dtype)], axis=0) if rows else a


def _rows_t_matmul(u, v):
    """``u.T @ v`` contracting the rows (a weight gradient), with ``u.T`` materialized first.

    XLA:CPU runs a dot that contracts the row axis of both operands as a plain dot, and the same product
    with the transpose copied out (``[F, r]``, small next to the product; the barrier keeps XLA from folding
    the transpose back into the dot) as a YNNPACK fusion: the E=64, K=1 `scatter` layer measured 745 -> 707 ms
    in an in-process A/B (jax 0.10.2), with bit-identical gradients.

    XLA:CPU's transpose is 2-7x slower per byte when the transposed rows are a multiple of 128 values long
    (``r % 128 == 0``; jax 0.10.2: ``[1024, 1024]`` 7.6 ms against 1.4 ms for ``[1040, 1024]``), which is
    some pieces of the dropless loop (T*K = 8192, E=8: chunk 1280, quantum 80, so r = 640 and 1280) and a full
    capacity buffer at some E. Such products run as ``r - 16`` rows through the transpose plus the last 16 as
    a plain dot (r=1024, F=1024, D=512: 11.9 ms against 17.3; experiments/probes/transpose_rows_multiple_of_128.py);
    their sum is rounded in another order.
    """
    r = u.shape[0]
    if r > 128 and r % 128 == 0:
        q = r - 16
        return jax.lax.optimization_barrier(u[:q].T) @ v[:q] + u[q:].T @ v[q:]
    return jax.lax.optimization_barrier(u.T) @ v


def _sorted_fwd(x, group_sizes, params, activation, chunk, stride=0):
    n, d, glu, mix, quantum, counts, starts, overrun = _sorted_setup(x, group_sizes, params, activation, chunk,
                                                                     stride)
    f = params["wi"].shape[-1]
    xp = _pad_rows(x, overrun)  # [N + overrun, D]

    def rows(r, r0, p):
        """The FFN on rows [r0, r0 + r), padded to ``chunk`` rows: (y, h, hg)."""
        xr = jax.lax.dynamic_slice_in_dim(xp, r0, r)
        hr = xr @ p["wi"]
        hgr = xr @ p["wg"] if glu else hr[:, :1]
        out = (mix(hr, hgr if glu else hr) @ p["wo"], hr, hgr)
        return tuple(jnp.pad(a, ((0, chunk - r), (0, 0))) for a in out)

    def write(bufs, tiles, r0):
        return tuple(jax.lax.dynamic_update_slice_in_dim(b, t, r0, 0) for b, t in zip(bufs, tiles))

    def expert(e, bufs):
        p = {k: jax.lax.dynamic_index_in_dim(v, e, 0, keepdims=False) for k, v in params.items()}
        start, size = starts[e], group_sizes[e]
        n_full = size // chunk
        bufs = jax.lax.fori_loop(0, n_full, lambda j, b: write(b, rows(chunk, start + j * chunk, p),
                                                               start + j * chunk), bufs)
        r0, rem = start + n_full * chunk, size - n_full * chunk

        # The switch returns the padded tiles and the write happens outside it: a switch that carried the
        # buffers would copy them whole. Padding rows land on later experts' rows, which they overwrite.
        def remainder(bufs):
            tiles = _rows_switch(rem, quantum, counts, lambda r: functools.partial(rows, r, r0), p)
            return write(bufs, tiles, r0)

        return jax.lax.cond(rem > 0, remainder, lambda b: b, bufs)

    zeros = lambda w: jnp.zeros((n + overrun, w), x.dtype)
    y, h, hg = jax.lax.fori_loop(0, group_sizes.shape[0], expert, (zeros(d), zeros(f), zeros(f if glu else 1)))
    return (y[:n] if overrun else y), (x, group_sizes, params, h, hg)


def _sorted_bwd(activation, chunk, stride, res, dy):
    x, group_sizes, params, h, hg = res
    n, d, glu, mix, quantum, counts, starts, overrun = _sorted_setup(x, group_sizes, params, activation, chunk,
                                                                     stride)
    xp, dyp = _pad_rows(x, overrun), _pad_rows(dy.astype(x.dtype), overrun)

    def rows(r, r0, end, p):
        """Rows [r0, r0 + r) of one expert (those >= end are another's: cotangent 0): (dx tile, grads)."""
        xr = jax.lax.dynamic_slice_in_dim(xp, r0, r)
        keep = (r0 + jnp.arange(r) < end)[:, None]
        dyr = jnp.where(keep, jax.lax.dynamic_slice_in_dim(dyp, r0, r), 0)
        hr = jax.lax.dynamic_slice_in_dim(h, r0, r)
        hgr = jax.lax.dynamic_slice_in_dim(hg, r0, r) if glu else hr
        a, mix_vjp = jax.vjp(mix, hr, hgr)
        dh, dhg = mix_vjp(dyr @ p["wo"].T)
        grads = {"wo": _rows_t_matmul(a, dyr), "wi": _rows_t_matmul(xr, dh)}
        dxr = dh @ p["wi"].T
        if glu:
            grads["wg"] = _rows_t_matmul(xr, dhg)
            dxr = dxr + dhg @ p["wg"].T
        return jnp.pad(dxr, ((0, chunk - r), (0, 0))), grads

    def piece(rows_wanted, r0, end, p):
        return _rows_switch(rows_wanted, quantum, counts, lambda r: functools.partial(rows, r, r0, end), p)

    def add(carry, out, r0):
        dx, grads = carry
        tile, inc = out
        return (jax.lax.dynamic_update_slice_in_dim(dx, tile, r0, 0),
                jax.tree.map(jnp.add, grads, inc))

    def expert(dx, e_params):
        e, p = e_params
        start, size = starts[e], group_sizes[e]
        end = start + size
        # The first min(size, chunk) rows give the weight gradients directly (no zero init, no add): with
        # the capacity buffer (chunk == stride) and in most dropless experts (chunk = 1.25x the mean) that is
        # all of them. An expert with no rows computes one quantum of masked rows: gradients exactly 0.
        tile, grads = piece(jnp.minimum(size, chunk), start, end, p)
        dx = jax.lax.dynamic_update_slice_in_dim(dx, tile, start, 0)

        def more(carry):  # size > chunk: the other full chunks, then the remainder, accumulated
            n_full = size // chunk
            carry = jax.lax.fori_loop(1, n_full, lambda j, c: add(c, rows(chunk, start + j * chunk, end, p),
                                                                  start + j * chunk), carry)
            r0, rem = start + n_full * chunk, size - n_full * chunk
            return jax.lax.cond(rem > 0, lambda c: add(c, piece(rem, r0, end, p), r0), lambda c: c, carry)

        return jax.lax.cond(size > chunk, more, lambda c: c, (dx, grads))

    num = group_sizes.shape[0]
    dx, dparams = jax.lax.scan(expert, jnp.zeros((n + overrun, d), x.dtype), (jnp.arange(num), params))
    return (dx[:n] if overrun else dx), None, dparams


sorted_rows_ffn.defvjp(_sorted_fwd, _sorted_bwd)
