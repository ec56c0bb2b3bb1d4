"""Dense -> MoE conversions: sparse upcycling and splitting FFN neurons into experts.

Axes (see ``moe_jax.moe``): ``D`` model width, ``F`` dense FFN width, ``E`` routed experts, ``N`` neurons per
routed expert, ``Fs`` shared neurons (``F = E * N + Fs`` when splitting), ``X`` width of the vectors that are
clustered (``D``), ``B``/``L`` batch and length.

Two families of conversion of a dense FFN ``y = act(x wi) wo`` (or ``(act(x wg) * (x wi)) wo`` with a GLU):

* **Sparse upcycling** (Komatsuzaki et al. 2022, sec. 3): every expert is a copy of the dense FFN
  (``upcycle_ffn``; optionally plus Gaussian noise ``noise_std * std(w)``), the router is new. The MoE output
  is ``sum_k w_k(x) FFN(x) = (sum_k w_k(x)) FFN(x)``: the dense function is preserved exactly iff the combine
  weights of a token sum to one. That holds for renormalized top-k routing with K >= 2 (``router='mixtral'``
  or ``'gshard'``) and no drops (dropless, or a capacity large enough). With K = 1 the softmax weight
  ``p_top1`` lies in ``[1/E, 1]`` and scales the FFN (Switch): not function preserving. A K = 1 upcycle that
  is exact at the start: ``router='deepseek'`` with ``score_func='softmax'``, ``renormalize_top_k=False``,
  ``routed_scaling=E`` and ``init.router='zeros'`` (uniform probabilities ``1/E``, times ``E``: weight 1).
* **Splitting** (MoEfication, Zhang et al. 2022; LLaMA-MoE, Zhu et al. 2024): the F hidden neurons are
  partitioned into E experts of N = F/E neurons (``split_ffn``); expert e keeps columns ``idx_e`` of
  ``wi``/``wg`` and rows ``idx_e`` of ``wo``. Because a neuron's contribution ``act(x wi[:, n]) wo[n, :]``
  does not depend on the other neurons, ``sum_e expert_e(x) + shared(x) == dense(x)`` exactly (up to the
  order of a float sum) for every partition. Partitions:

  - ``random_partition``: a seeded random permutation cut into E equal parts;
  - ``balanced_kmeans``: k-means over the neurons' (unit-normalised) input vectors ``wi[:, n]`` (``wg[:, n]``
    with a GLU, whose activation decides whether the neuron fires) where every cluster holds exactly F/E
    neurons; the assignment step is an optimal balanced assignment (``scipy.optimize.linear_sum_assignment``
    on each centroid repeated F/E times), so the k-means objective never increases; deterministic for a seed;
  - ``importance_balanced_partition`` (LLaMA-MoE): neurons sorted by importance, dealt out in rounds of E so
    that every expert gets one neuron per round and the lightest expert the heaviest neuron: each expert
    gets F/E neurons and the spread of the experts' total importance is at most the largest within-round
    gap (<= the largest importance);
  - **inner sharing** (LLaMA-MoE): the ``Fs`` most important neurons form an always-on shared expert
    (``MoEConfig.num_shared_experts``), the others are split by one of the partitions above.

  Importance (``taylor_importance``) is the first-order Taylor estimate of the loss change when a neuron is
  removed, summed over tokens: ``I_n = sum_t |h_n(t) * dL/dh_n(t)|`` with ``h`` the hidden activation (the
  input of ``wo``), over a few batches of the training corpus (Molchanov et al. 2017, per token).

  Router: ``'centroids'`` sets the router's column e to the mean input vector (``wi``, or ``wg`` with a
  GLU) of expert e's neurons, so that the logit ``x . c_e`` is the mean pre-activation of the expert's
  neurons; ``'fresh'`` keeps the new model's random router; ``'zeros'`` gives uniform probabilities.

**Combine weights of a split model.** The experts of a split FFN add up to the dense FFN with *unit* weights,
but a softmax router's weights are not 1. The honest in-model equivalence: ``router='deepseek'`` with
``score_func='softmax'``, ``renormalize_top_k=True`` and ``routed_scaling=K`` (each chosen expert's weight
averages 1); with K = E and a zero router every weight is exactly ``(1/E) / 1 * E = 1`` and the split model
equals the dense model (``tests/test_upcycle.py``). With K < E the model computes ``sum_{e in top-K} w_e(x)
expert_e(x)``: the dense FFN restricted to the chosen neurons, each expert scaled by its weight.

Checkpoints: ``initial_from_source(init_cfg, ...)`` reads a run directory written by ``experiments/train.py``
(orbax, ``<dir>/checkpoints/<step>``) and returns the converted variables, step, data-iterator state and
clock of the source; ``moe_jax.train.train`` calls it when ``config.init.from_dir`` is set and the workdir has
no checkpoint yet (``experiments/upcycle.py`` writes the converted checkpoint without training). The
optimizer state is always reset (Adam moments of copied experts would be wrong for the split ones, and
there are none for the new router).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.experts import DenseFFN, get_activation
from moe_jax.model import MOE_STATE, ModelConfig, Transformer

Array = jax.Array
Params = Dict[str, Any]

METHODS = ("copy", "upcycle", "split_random", "split_kmeans", "split_importance")
ROUTER_INITS = ("auto", "fresh", "zeros", "centroids")
_SCIPY_MAX_NEURONS = 4096  # balanced k-means: optimal assignment (O(F^3)) up to here, greedy above


# ------------------------------------------------------------------------------------------ one FFN


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x), tree)


def upcycle_ffn(ffn: Params, num_experts: int, noise_std: float = 0.0, seed: int = 0) -> Params:
    """E copies of a dense FFN: ``{wi [D,F], (wg), wo [F,D]} -> {wi [E,D,F], (wg), wo [E,F,D]}``.

    ``noise_std > 0`` adds ``N(0, (noise_std * std(w))^2)`` to every expert's copy of each matrix
    (independent draws per expert, seeded), which breaks the experts' symmetry; 0 gives exact copies.
    """
    if num_experts < 1:
        raise ValueError(f"upcycle_ffn: num_experts must be >= 1, got {num_experts}.")
    if noise_std < 0:
        raise ValueError(f"init.noise_std must be >= 0, got {noise_std}.")
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(ffn):
        w = np.asarray(ffn[name], np.float32)
        stacked = np.repeat(w[None], num_experts, axis=0)  # [E, ...]
        if noise_std > 0:
            scale = noise_std * float(np.std(w))
            stacked = stacked + (scale * rng.standard_normal(stacked.shape)).astype(np.float32)
        out[name] = stacked
    return out


def split_ffn(ffn: Params, partition: np.ndarray, shared: Optional[np.ndarray] = None
              ) -> Tuple[Params, Optional[Params]]:
    """Experts (and a shared FFN) made of the dense FFN's neurons.

    Args:
      ffn: ``{wi [D,F], (wg [D,F]), wo [F,D]}``.
      partition: ``[E, N]`` int neuron ids of each routed expert.
      shared: ``[Fs]`` int neuron ids of the always-on shared expert, or None.
    Returns:
      ``experts {wi [E,D,N], (wg), wo [E,N,D]}`` and ``shared {wi [D,Fs], (wg), wo [Fs,D]}`` (or None).
      ``sum_e expert_e(x) + shared(x) == dense(x)`` when ``partition`` and ``shared`` together hold every
      neuron once (checked).
    """
    ffn = _np(ffn)
    f = ffn["wi"].shape[1]
    partition = np.asarray(partition)
    used = [partition.reshape(-1)] + ([np.asarray(shared).reshape(-1)] if shared is not None else [])
    ids = np.sort(np.concatenate(used))
    if partition.ndim != 2 or not np.array_equal(ids, np.arange(f)):
        raise ValueError(f"split_ffn: the partition [E, N] (and shared ids) must hold each of the F={f} neurons "
                         f"exactly once; got partition shape {partition.shape} covering {len(np.unique(ids))} "
                         "distinct neurons.")
    experts = {"wi": ffn["wi"][:, partition].transpose(1, 0, 2),  # [D, E, N] -> [E, D, N]
               "wo": ffn["wo"][partition]}  # [E, N, D]
    if "wg" in ffn:
        experts["wg"] = ffn["wg"][:, partition].transpose(1, 0, 2)
    shared_params = None
    if shared is not None and len(shared):
        shared = np.asarray(shared)
        shared_params = {"wi": ffn["wi"][:, shared], "wo": ffn["wo"][shared]}
        if "wg" in ffn:
            shared_params["wg"] = ffn["wg"][:, shared]
    return experts, shared_params


def _check_split(f: int, num_experts: int, num_shared: int = 0) -> int:
    if num_experts < 1 or num_shared < 0 or (f - num_shared) % num_experts or num_shared >= f:
        raise ValueError(f"cannot split F={f} neurons into {num_experts} experts of equal width after "
                         f"{num_shared} shared neurons: F - shared must be a positive multiple of num_experts. "
                         "Choose model.moe.num_experts (and the shared width) so that "
                         "num_experts * expert_hidden + shared_width == model.d_ff.")
    return (f - num_shared) // num_experts


def random_partition(neurons: Sequence[int] | int, num_experts: int, seed: int = 0) -> np.ndarray:
    """``[E, N]`` neuron ids: a seeded random permutation of ``neurons`` (ids, or ``range(F)``) cut into E
    equal parts; ids sorted within each expert."""
    ids = np.arange(neurons) if isinstance(neurons, (int, np.integer)) else np.asarray(neurons)
    n = _check_split(len(ids), num_experts)
    perm = np.random.default_rng(seed).permutation(ids)
    return np.sort(perm.reshape(num_experts, n), axis=1)


def _balanced_assign(cost: np.ndarray, cap: int) -> np.ndarray:
    """``[F, E]`` cost -> ``[F]`` cluster of each row, every cluster exactly ``cap`` rows, total cost minimal
    (Hungarian algorithm on the clusters repeated ``cap`` times) for F <= 4096; greedy (cheapest pairs first)
    above that. Deterministic."""
    f, e = cost.shape
    if f <= _SCIPY_MAX_NEURONS:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(np.repeat(cost, cap, axis=1))  # [F, E*cap]
        out = np.empty(f, np.int64)
        out[rows] = cols // cap
        return out
    order = np.argsort(cost, axis=None, kind="stable")
    out = np.full(f, -1, np.int64)
    room = np.full(e, cap)
    for flat in order:
        i, j = divmod(int(flat), e)
        if out[i] < 0 and room[j] > 0:
            out[i] = j
            room[j] -= 1
    return out


def balanced_kmeans(vectors: np.ndarray, num_clusters: int, seed: int = 0, iters: int = 30,
                    normalize: bool = True) -> Tuple[np.ndarray, np.ndarray, List[float]]:
    """Balanced k-means: ``vectors [F, X]`` -> ``(assign [F], centroids [E, X], objective per iteration)``.

    Every cluster gets exactly ``F / E`` vectors. Init: k-means++ (seeded). Each iteration assigns optimally
    under the size constraint (``_balanced_assign`` on squared distances), then moves each centroid to the
    mean of its members; stops when the assignment no longer changes or after ``iters`` rounds. With the
    optimal assignment the objective (sum of squared distances) never increases. ``normalize``: cluster the
    unit-normalised vectors (direction, not size; as MoEfication). Float64 throughout; deterministic.
    """
    v = np.asarray(vectors, np.float64)
    f = v.shape[0]
    cap = _check_split(f, num_clusters)
    if normalize:
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    centers = [v[rng.integers(f)]]
    for _ in range(1, num_clusters):  # k-means++
        d2 = np.min(((v[:, None, :] - np.asarray(centers)[None]) ** 2).sum(-1), axis=1)
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(f, 1.0 / f)
        centers.append(v[rng.choice(f, p=p)])
    centroids = np.asarray(centers)
    assign = None
    history: List[float] = []
    for _ in range(max(int(iters), 1)):
        cost = ((v[:, None, :] - centroids[None]) ** 2).sum(-1)  # [F, E]
        new = _balanced_assign(cost, cap)
        history.append(float(cost[np.arange(f), new].sum()))
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        centroids = np.stack([v[assign == e].mean(0) for e in range(num_clusters)])
    cost = ((v[:, None, :] - centroids[None]) ** 2).sum(-1)
    history.append(float(cost[np.arange(f), assign].sum()))
    return assign, centroids, history


def kmeans_partition(vectors: np.ndarray, num_experts: int, seed: int = 0, iters: int = 30,
                     neurons: Optional[Sequence[int]] = None) -> np.ndarray:
    """``[E, N]`` neuron ids from ``balanced_kmeans`` of ``vectors [F', X]`` (the rows of ``neurons``, or all)."""
    ids = np.arange(len(vectors)) if neurons is None else np.asarray(neurons)
    assign, _, _ = balanced_kmeans(np.asarray(vectors)[ids] if neurons is not None else vectors,
                                   num_experts, seed=seed, iters=iters)
    return np.stack([np.sort(ids[assign == e]) for e in range(num_experts)])


def importance_balanced_partition(importance: np.ndarray, num_experts: int,
                                  neurons: Optional[Sequence[int]] = None) -> np.ndarray:
    """``[E, N]`` neuron ids with equal counts and (nearly) equal total importance per expert.

    Neurons sorted by importance (descending; ties by id) are dealt in rounds of E: in each round the experts,
    sorted by their running total (ascending; ties by index), take the round's neurons in order, so the
    lightest expert gets the heaviest neuron. Afterwards ``max_e total_e - min_e total_e <= max over rounds of
    (first - last importance of the round)`` (by induction over rounds), hence <= the largest importance.
    """
    imp = np.asarray(importance, np.float64)
    ids = np.arange(len(imp)) if neurons is None else np.asarray(neurons)
    n = _check_split(len(ids), num_experts)
    vals = imp[ids]
    order = ids[np.lexsort((ids, -vals))]  # descending importance, ties by id
    totals = np.zeros(num_experts)
    members: List[List[int]] = [[] for _ in range(num_experts)]
    for r in range(n):
        chunk = order[r * num_experts:(r + 1) * num_experts]
        experts = np.lexsort((np.arange(num_experts), totals))  # lightest first
        for e, nid in zip(experts, chunk):
            members[e].append(int(nid))
            totals[e] += imp[nid]
    return np.stack([np.sort(m) for m in members])


def top_importance(importance: np.ndarray, count: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(shared ids [count], rest ids [F - count])``: the ``count`` most important neurons (ties by id)."""
    imp = np.asarray(importance, np.float64)
    order = np.lexsort((np.arange(len(imp)), -imp))
    return np.sort(order[:count]), np.sort(order[count:])


def router_from_partition(ffn: Params, partition: np.ndarray) -> np.ndarray:
    """``[D, E]`` router kernel: column e is the mean input vector (``wg`` with a GLU, else ``wi``) of expert
    e's neurons, so the logit ``x . c_e`` is the mean pre-activation of those neurons."""
    w = np.asarray(ffn["wg"] if "wg" in ffn else ffn["wi"], np.float32)  # [D, F]
    return np.stack([w[:, idx].mean(axis=1) for idx in np.asarray(partition)], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------------------- importance


def _taylor_interceptor(next_fun, args, kwargs, context):
    """Re-implements ``DenseFFN.__call__`` (``experts.ffn_apply``) with a perturbation on the hidden activation
    ``h`` (so ``dL/dh`` is a gradient) and ``h`` sown into ``'intermediates'``."""
    module = context.module
    if not (isinstance(module, DenseFFN) and module.name == "ffn" and context.method_name == "__call__"):
        return next_fun(*args, **kwargs)  # only the dense blocks' FFNs (not an MoE layer's shared experts)
    x = args[0].astype(module.dtype)
    p = lambda name: module.get_variable("params", name).astype(module.dtype)
    h = jnp.einsum("...d,df->...f", x, p("wi"))
    if module.glu:
        h = get_activation(module.activation)(jnp.einsum("...d,df->...f", x, p("wg"))) * h
    else:
        h = get_activation(module.activation)(h)
    h = module.perturb("h", h)
    module.sow("intermediates", "h", h)
    return jnp.einsum("...f,fd->...d", h, p("wo"))


def taylor_importance(model: Transformer, params: Params, batches: Iterable[np.ndarray]) -> Dict[int, np.ndarray]:
    """First-order Taylor importance of every dense-FFN neuron: ``{block index: I [F]}``.

    ``I_n = sum over batches and tokens of |h_n * dL/dh_n|`` with ``L`` the mean next-token cross-entropy of
    the batch (``batches``: int arrays ``[B, L+1]``) and ``h`` the FFN's hidden activation. Only the dense
    FFN blocks (``block_i/ffn``) are scored. Gradients with ``flax.linen.Module.perturb`` via a method
    interceptor, so the model code is unchanged.
    """
    import optax

    cfg = model.config
    dense_blocks = [i for i in range(cfg.num_layers) if not cfg.is_moe_block(i)]

    @jax.jit
    def scores(params, batch):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        b, l = inputs.shape
        zeros = {f"block_{i}": {"ffn": {"h": jnp.zeros((b, l, cfg.d_ff), jnp.float32)}} for i in dense_blocks}

        def loss(pert):
            with nn.intercept_methods(_taylor_interceptor):
                (logits, aux), inter = model.apply({"params": params, "perturbations": pert}, inputs,
                                                   train=False, mutable=["intermediates"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
            return ce + aux["aux_loss"], inter["intermediates"]

        grads, inter = jax.grad(loss, has_aux=True)(zeros)
        return {i: jnp.sum(jnp.abs(inter[f"block_{i}"]["ffn"]["h"][0] * grads[f"block_{i}"]["ffn"]["h"]
                                   .astype(jnp.float32)), axis=(0, 1)) for i in dense_blocks}

    total = {i: np.zeros(cfg.d_ff, np.float64) for i in dense_blocks}
    count = 0
    for batch in batches:
        out = jax.device_get(scores(params, jnp.asarray(batch, jnp.int32)))
        for i in dense_blocks:
            total[i] += np.asarray(out[i], np.float64)
        count += 1
    if count == 0:
        raise ValueError("taylor_importance: no batches; give at least one (init.importance_batches >= 1).")
    return total


# ------------------------------------------------------------------------------------------ whole model


@dataclasses.dataclass
class ConvertOptions:
    """How to convert (``config.init`` in a training config; see ``configs/base.py``).

    method: 'upcycle', 'split_random', 'split_kmeans', 'split_importance' or 'copy' (same architecture; no
      conversion, e.g. continuing a dense run with a fresh optimizer). Blocks that are MoE in both models are
      copied whatever the method.
    router: 'auto' ('centroids' for split_kmeans, else 'fresh'), 'fresh', 'zeros' or 'centroids'.
    noise_std: upcycle only: relative noise added to each expert's copy.
    seed: partition / k-means / noise seed. kmeans_iters: k-means rounds.
    Shared experts of the target (``moe.num_shared_experts > 0``) take the most important neurons (inner
    sharing; needs importances), whatever the routed partition.
    """

    method: str = "upcycle"
    router: str = "auto"
    noise_std: float = 0.0
    seed: int = 0
    kmeans_iters: int = 30

    @classmethod
    def from_config(cls, init_cfg) -> "ConvertOptions":
        d = dict(init_cfg.to_dict() if hasattr(init_cfg, "to_dict") else (init_cfg or {}))
        names = {f.name for f in dataclasses.fields(cls)}
        opts = cls(**{k: v for k, v in d.items() if k in names})
        if opts.method not in METHODS:
            raise ValueError(f"init.method: unknown {opts.method!r}; choose one of {list(METHODS)}.")
        if opts.router not in ROUTER_INITS:
            raise ValueError(f"init.router: unknown {opts.router!r}; choose one of {list(ROUTER_INITS)}.")
        if not opts.noise_std >= 0:
            raise ValueError(f"init.noise_std must be >= 0 (relative std of the noise), got {opts.noise_std!r}.")
        if opts.noise_std and opts.method != "upcycle":
            raise ValueError(f"init.noise_std={opts.noise_std} only applies to init.method='upcycle'; set it to 0.")
        return opts

    def needs_importance(self, target: ModelConfig) -> bool:
        shared = target.moe is not None and target.moe.num_shared_experts > 0
        return self.method == "split_importance" or (self.method.startswith("split") and shared)


def _same(source: ModelConfig, target: ModelConfig, names: Sequence[str]) -> None:
    for name in names:
        a, b = getattr(source, name), getattr(target, name)
        if a != b:
            raise ValueError(f"model.{name}={b!r} differs from the source model's {a!r}: a conversion keeps "
                             f"attention, embeddings and norms, so set model.{name}={a!r}.")


def _convert_ffn(i: int, ffn: Params, source: ModelConfig, target: ModelConfig, opts: ConvertOptions,
                 fresh_moe: Params, importance: Optional[Dict[int, np.ndarray]]) -> Tuple[Params, Dict[str, Any]]:
    """One dense block's FFN -> its MoE subtree ``{router, experts, (shared)}`` (shapes of ``fresh_moe``)."""
    m = target.moe
    e = m.num_experts
    f = source.d_ff
    if m.glu != source.glu or m.activation != source.activation:
        raise ValueError(f"model.moe.glu={m.glu} / activation={m.activation!r} differ from the dense FFN's "
                         f"glu={source.glu} / activation={source.activation!r}; the experts must compute the same "
                         "function: set model.moe.glu and model.moe.activation to the dense model's.")
    out = jax.tree.map(np.asarray, dict(fresh_moe))
    info: Dict[str, Any] = {"block": i, "method": opts.method}
    router = opts.router
    if opts.method == "upcycle":
        if m.expert_hidden != f:
            raise ValueError(f"init.method='upcycle' copies the dense FFN into every expert: model.moe.expert_hidden="
                             f"{m.expert_hidden} must equal the dense model.d_ff={f}.")
        if m.num_shared_experts:
            raise ValueError("init.method='upcycle' with model.moe.num_shared_experts > 0: a shared copy of the FFN "
                             "would count the dense FFN twice. Set num_shared_experts=0, or split instead.")
        out["experts"] = upcycle_ffn(ffn, e, opts.noise_std, seed=opts.seed * 1000 + i)
        partition = None
        if router == "auto":
            router = "fresh"
    else:
        shared_width = m.num_shared_experts * (m.shared_expert_hidden or m.expert_hidden)
        if e * m.expert_hidden + shared_width != f:
            raise ValueError(f"init.method={opts.method!r} splits the dense FFN's d_ff={f} neurons: "
                             f"model.moe.num_experts * expert_hidden + shared width = {e} * {m.expert_hidden} + "
                             f"{shared_width} must equal {f}. Set model.moe.expert_hidden={(f - shared_width) // e}"
                             " (or change num_experts / the shared width).")
        shared, rest = None, np.arange(f)
        if shared_width:
            if importance is None:
                raise ValueError("shared experts take the most important neurons: importances are needed "
                                 "(init.importance_batches >= 1 and a corpus).")
            shared, rest = top_importance(importance[i], shared_width)
        if opts.method == "split_random":
            partition = random_partition(rest, e, seed=opts.seed * 1000 + i)
        elif opts.method == "split_kmeans":
            vectors = np.asarray(ffn["wg"] if "wg" in ffn else ffn["wi"]).T  # [F, D]
            partition = kmeans_partition(vectors, e, seed=opts.seed * 1000 + i, iters=opts.kmeans_iters,
                                         neurons=rest)
        elif opts.method == "split_importance":
            if importance is None:
                raise ValueError("init.method='split_importance' needs neuron importances "
                                 "(init.importance_batches >= 1).")
            partition = importance_balanced_partition(importance[i], e, neurons=rest)
        else:
            raise ValueError(f"init.method={opts.method!r} cannot convert a dense block into an MoE block; use "
                             "'upcycle' or a 'split_*' method.")
        experts, shared_params = split_ffn(ffn, partition, shared)
        out["experts"] = experts
        if shared_params is not None:
            out["shared"] = shared_params
        info["partition"] = partition.tolist()
        info["shared"] = None if shared is None else shared.tolist()
        if importance is not None:
            imp = importance[i]
            info["importance"] = [float(v) for v in imp]
            info["expert_importance"] = [float(imp[idx].sum()) for idx in partition]
            info["shared_importance"] = None if shared is None else float(imp[shared].sum())
        if router == "auto":
            router = "centroids" if opts.method == "split_kmeans" else "fresh"
    gate = out.get("router", {}).get("gate", {})
    if router != "fresh":
        if "kernel" not in gate:
            raise ValueError(f"init.router={router!r}: router {m.router!r} has no 'router/gate/kernel' to set; "
                             "use init.router='fresh'.")
        if router == "zeros":
            kernel = np.zeros_like(gate["kernel"])
        else:
            if partition is None:
                raise ValueError("init.router='centroids' needs a split method (the experts of an upcycled "
                                 "FFN are identical); use 'fresh' or 'zeros'.")
            kernel = router_from_partition(ffn, partition)
        out["router"] = dict(out["router"], gate=dict(gate, kernel=kernel))
    info["router"] = router
    return out, info


def convert_variables(source_params: Params, source: ModelConfig, target: ModelConfig, target_variables: Params,
                      opts: ConvertOptions, importance: Optional[Dict[int, np.ndarray]] = None,
                      source_moe_state: Optional[Params] = None) -> Tuple[Params, List[Dict[str, Any]]]:
    """Variables of ``target`` made from a ``source`` model's params; ``(variables, per-block report)``.

    ``target_variables`` (``model.init_variables`` of the target) give the fresh parts: the routers (unless
    ``opts.router`` says otherwise) and the ``'moe_state'`` collection. Attention, norms and embeddings are
    copied; each block's FFN is copied (same kind in both) or converted (dense -> MoE by ``opts.method``).
    Raises ``ValueError`` naming the field when the shapes do not fit.
    """
    _same(source, target, ("vocab_size", "d_model", "num_layers", "num_heads", "tie_embeddings"))
    src = _np(source_params)
    tgt = jax.tree.map(np.asarray, dict(target_variables["params"]))
    out = {k: v for k, v in src.items() if not k.startswith("block_")}
    report = []
    for i in range(target.num_layers):
        name = f"block_{i}"
        block = {k: v for k, v in src[name].items() if k not in ("ffn", "moe")}
        src_moe, tgt_moe = source.is_moe_block(i), target.is_moe_block(i)
        if src_moe and not tgt_moe:
            raise ValueError(f"block {i} is an MoE block in the source model but dense in the target: MoE -> dense "
                             "is not supported; match model.moe_every / model.first_dense of the source.")
        if src_moe == tgt_moe:
            key = "moe" if src_moe else "ffn"
            if not src_moe and source.d_ff != target.d_ff:
                raise ValueError(f"model.d_ff={target.d_ff} differs from the source's {source.d_ff} in the dense "
                                 f"block {i}; set model.d_ff={source.d_ff}.")
            block[key] = src[name][key]
            report.append({"block": i, "method": "copy"})
        else:
            if opts.method == "copy":
                raise ValueError(f"init.method='copy' but block {i} is dense in the source and MoE in the target; "
                                 "choose 'upcycle' or a 'split_*' method.")
            block["moe"], info = _convert_ffn(i, src[name]["ffn"], source, target, opts, tgt[name]["moe"],
                                              importance)
            report.append(info)
        out[name] = block
    shapes = lambda t: jax.tree.map(lambda x: tuple(np.shape(x)), t)
    if shapes(out) != shapes(tgt):
        a, b = jax.tree_util.tree_flatten_with_path(shapes(out))[0], jax.tree_util.tree_flatten_with_path(shapes(tgt))[0]
        diff = sorted(set(map(str, a)) ^ set(map(str, b)))[:6]
        raise ValueError(f"the converted parameters do not match the target model's: {diff}. Check model.* of the "
                         "target config against the source run's config.")
    variables = {"params": jax.tree.map(lambda x: np.asarray(x, np.float32), out)}
    if MOE_STATE in target_variables:
        state = jax.tree.map(np.asarray, dict(target_variables[MOE_STATE]))
        if source_moe_state:  # blocks that were MoE in the source keep their router state
            for name, value in dict(source_moe_state).items():
                if name in state and shapes(value) == shapes(state[name]):
                    state[name] = _np(value)
        variables[MOE_STATE] = state
    return variables, report


# ---------------------------------------------------------------------------------------- checkpoints


@dataclasses.dataclass
class SourceRun:
    """A run directory's checkpoint, read without building its optimizer (``read_run``)."""

    run_dir: str
    step: int
    params: Params
    moe_state: Params
    data_state: Dict[str, Any]
    meta: Dict[str, Any]
    config: Dict[str, Any]  # the run's resolved config: {'config': {...}, 'vocab_size': V}

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_config(self.config["config"]["model"], int(self.config["vocab_size"])).validate()


def read_run(run_dir: str, step: int = -1) -> SourceRun:
    """The checkpoint at ``step`` (-1: the latest) of a run directory written by ``moe_jax.train.train``."""
    import orbax.checkpoint as ocp

    run_dir = os.path.abspath(os.path.expanduser(run_dir))
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ValueError(f"init.from_dir={run_dir!r} holds no checkpoints/ folder: point it at the --workdir of a "
                         "finished experiments/train.py run.")
    mngr = ocp.CheckpointManager(ckpt_dir)
    steps = sorted(mngr.all_steps())
    if not steps:
        raise ValueError(f"init.from_dir={run_dir!r}: no complete checkpoint in {ckpt_dir}; train the source first.")
    step = steps[-1] if step is None or int(step) < 0 else int(step)
    if step not in steps:
        raise ValueError(f"init.step={step}: no checkpoint at that step in {ckpt_dir} (available: {steps}). Choose "
                         "one of those, or -1 for the latest; to keep a step, set the source run's train.ckpt_every "
                         "to divide it and train.keep_ckpts high enough.")
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore(),
                                                     config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    state = out["state"]
    return SourceRun(run_dir=run_dir, step=int(np.asarray(state["step"])), params=_np(state["params"]),
                     moe_state=_np(state.get("moe_state") or {}), data_state=dict(out["data"] or {}),
                     meta=dict(out["meta"] or {}), config=dict(out["config"]))


@dataclasses.dataclass
class Initial:
    """What a run starts from (``initial_from_source``): variables, step, data-iterator state (None: start
    the data order at 0), the source's clock (``elapsed_s``, ``flops``) and the conversion report."""

    variables: Params
    step: int
    data_state: Optional[Dict[str, Any]]
    meta: Dict[str, Any]
    report: Dict[str, Any]


def initial_from_source(init_cfg, target: ModelConfig, target_variables: Params,
                        batches: Optional[Callable[[int], List[np.ndarray]]] = None) -> Initial:
    """Convert the checkpoint named by ``init_cfg`` (``config.init``) into variables of ``target``.

    ``init_cfg`` fields: ``from_dir`` (run directory), ``step`` (-1 = latest), ``restart_step`` (True: the new
    run starts at step 0 and at the start of the data order; False: it continues the source's step count,
    learning-rate schedule and data order), ``importance_batches`` and the ``ConvertOptions`` fields.
    ``batches(n)``: n training batches ``[B, L+1]`` for the neuron importances (only asked for when needed).
    """
    t0 = time.time()
    get = (lambda k, d=None: init_cfg.get(k, d)) if hasattr(init_cfg, "get") else (lambda k, d=None: d)
    opts = ConvertOptions.from_config(init_cfg)
    src = read_run(str(get("from_dir")), int(get("step", -1)))
    source = src.model_config()
    importance = None
    if opts.needs_importance(target):
        n = int(get("importance_batches", 4))
        if n < 1 or batches is None:
            raise ValueError(f"init.method={opts.method!r} (or shared experts) needs neuron importances: set "
                             f"init.importance_batches >= 1 (got {n}).")
        importance = taylor_importance(Transformer(source), src.params, batches(n))
    variables, report = convert_variables(src.params, source, target, target_variables, opts, importance,
                                          src.moe_state)
    restart = bool(get("restart_step", False))
    meta = {"elapsed_s": 0.0, "flops": 0.0} if restart else {
        "elapsed_s": float(src.meta.get("elapsed_s", 0.0)), "flops": float(src.meta.get("flops", 0.0))}
    summary = {"from_dir": src.run_dir, "source_step": src.step, "method": opts.method, "blocks": report,
               "convert_s": time.time() - t0}
    return Initial(variables=variables, step=0 if restart else src.step,
                   data_state=None if restart else src.data_state, meta=meta, report=summary)


def write_report(workdir: str, initial: Initial) -> str:
    """``workdir/init_report.json``: where the run started from and each block's partition and importances."""
    path = os.path.join(workdir, "init_report.json")
    with open(path, "w") as f:
        json.dump(initial.report, f, indent=1)
    return path
