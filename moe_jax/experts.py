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


def ffn_apply(params: Dict[str, Array], x: Array, activation: str, eq_in: str, eq_out: str, dtype) -> Array:
    """The FFN on any layout, given einsum strings for the two projections."""
    act = get_activation(activation)
    x = x.astype(dtype)
    h = jnp.einsum(eq_in, x, params["wi"].astype(dtype))
    if "wg" in params:
        h = act(jnp.einsum(eq_in, x, params["wg"].astype(dtype))) * h
    else:
        h = act(h)
    return jnp.einsum(eq_out, h, params["wo"].astype(dtype))


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
        return ffn_apply(params, x, self.activation, "...d,df->...f", "...f,fd->...d", self.dtype)


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

    def __call__(self, x: Array) -> Array:
        params = self.params(x.shape[-1])
        return ffn_apply(params, x, self.activation, "end,edf->enf", "enf,efd->end", self.dtype)

    def blocks(self, x: Array, block_expert: Array) -> Array:
        params = self.params(x.shape[-1])
        gathered = {k: jnp.take(v, block_expert, axis=0) for k, v in params.items()}  # [NB, ...]
        return ffn_apply(gathered, x, self.activation, "nbd,ndf->nbf", "nbf,nfd->nbd", self.dtype)

    def one(self, e: int, x: Array) -> Array:
        params = self.params(x.shape[-1])
        single = {k: v[e] for k, v in params.items()}
        return ffn_apply(single, x, self.activation, "d,df->f", "f,fd->d", self.dtype)
