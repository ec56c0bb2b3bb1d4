"""Data, expert and model parallelism: meshes, logical axis rules, expert-parallel all-to-all, pmap, multi-host.

Axes (see ``moe_jax.moe``): ``B`` batch, ``L`` length, ``G`` groups, ``S`` tokens per group, ``D`` width,
``F`` expert hidden width, ``E`` experts, ``K`` choices, ``C`` capacity. Mesh axes: ``data``, ``expert``,
``model``; ``n = |expert|`` devices share the experts, each holds ``E_l = E / n`` of them; the batch is split
over ``data x expert`` (every device of a ``model`` group holds different sequences), ``G_l`` groups per device.

One mesh, three axes (``make_mesh``; sizes from ``config.mesh.data/expert/model``, ``-1`` = the rest)::

    data    pure data parallelism: params replicated, batch split, gradients summed by jit
    expert  expert parallelism: expert params split on E, the batch split too (an EP group is also a DP
            group for every non-expert param); tokens travel to their experts with all_to_all
    model   tensor parallelism: F (and attention heads) split; tokens replicated

The expert-parallel degree is ``mesh.shape['expert']``: read from the mesh, never from a second config field.

Where each tensor lives is decided by one table, ``LOGICAL_AXIS_RULES`` (logical axis name -> mesh axes), and
params are given logical names by ``PARAM_LOGICAL_AXES`` (path pattern -> names), in this file only. The same
rules give the ``NamedSharding`` of params, of optimizer state (an optimizer leaf shaped like a param and
whose path ends with the param's path shares its sharding; everything else is replicated), of batches, and
the ``shard_map`` specs of the expert-parallel MoE layer.

How the MoE layer learns about the mesh: JAX's own mesh context, read at trace time::

    with jax.set_mesh(mesh):                          # parallel.use_mesh(mesh) is the same thing
        y, stats = jax.jit(layer.apply)(variables, x)

``jax.sharding.get_abstract_mesh()`` is part of ``jax.jit``'s cache key, so a function traced under one mesh
is traced again under another (or none): nothing stale leaks between meshes. Without a mesh in the context,
with one whose three axes all have size 1, or inside ``pmap``, the layer runs the single-device dispatchers.
``jit_train_step`` enters the context for you.

The expert-parallel MoE layer (``run_expert_parallel``, called by ``MoELayer``):

1. the router, the aux losses and the metrics run under ``jax.jit``'s automatic partitioning on the global
   batch, so they are exactly the single-device numbers (global means, global expert loads);
2. ``jax.shard_map`` over the mesh: groups ``[G, S, ...]`` split over ``('data', 'expert')``, expert params
   ``[E, D, F]`` over ``'expert'`` (E) and ``'model'`` (F). Each device plans its ``G_l`` local groups with
   the configured dispatcher. Groups never straddle devices, so capacity (per group) and priority are the
   single-device ones: *capacity is accounted per device group*, and equals the one-device run with the same
   groups (``moe.group_size``; default one sequence);
3. capacity dispatchers (``einsum``, ``scatter``, any registered one with the ``[E, G*C, D]`` buffer): the
   local buffer ``[E, G_l*C, D]`` goes through ``all_to_all`` (split E in n slices, slice j to device j,
   received rows concatenated in source order) -> ``[E_l, n*G_l*C, D]``; the local experts run; the inverse
   ``all_to_all`` brings ``[E, G_l*C, D]`` home; the local combine finishes. Traffic per device and
   direction: ``E * G_l * C * D`` values, the capacity buffer itself;
4. ``dropless`` (``_dropless_ep``): static bound = the worst case "every local assignment goes to one device".
   Each device sends n slices of ``N_l = G_l*S*K`` rows and receives ``n*N_l`` rows. Exact (nothing is ever
   dropped), but the buffers, the all_to_all traffic and, with ``dropless_impl='blocks'``, the expert FLOPs
   are n times the balanced load. Prefer a capacity dispatcher with a generous factor for large n, or
   ``dropless_impl='ragged_dot'`` on GPU (it skips most of the empty rows);
5. ``model`` axis: ``wi/wg`` split by columns (F), ``wo`` by rows, one ``psum`` over ``'model'`` after ``wo``.

Gradients: ``shard_map`` (``check_vma=True``) knows that expert params are replicated over ``data`` (and the
tokens over ``model``), so its transpose sums their gradients over those axes; sharded gradients equal
``jax.grad`` on one device (tests/test_parallel.py).

Checkpoints: a ``jax.Array`` sharded on E is saved by orbax as the global ``[E, D, F]`` array, so it restores
on any mesh (``restore_target`` gives orbax the target shardings) or on one device.

``pmap`` (the older API): ``pmap_train_step`` maps the same step function over local devices; only data
parallelism (``pmean`` of gradients over the pmap axis), no expert sharding.

Multi-host: ``initialize_distributed`` calls ``jax.distributed.initialize()`` (coordinator, process count and
id from the environment or the cluster's own variables, see docs/parallel.md) when ``config.mesh.distributed``
is set; every process then builds the same global mesh, reads the same global batch and places the rows
its devices own (``shard_batch``; or only its own rows with ``process_local=True``).
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax import dispatch as dispatch_lib
from moe_jax.experts import ffn_apply
from moe_jax.routing import RoutingDecision

Array = jax.Array

DATA, EXPERT, MODEL = "data", "expert", "model"
MESH_AXES = (DATA, EXPERT, MODEL)

# ------------------------------------------------------------------------------------------- logical rules

#: Logical axis name -> mesh axis (or axes, or None = replicated). The one place that says where things live.
LOGICAL_AXIS_RULES: Tuple[Tuple[str, Union[None, str, Tuple[str, ...]]], ...] = (
    ("batch", (DATA, EXPERT)),  # B (and G): every device of a model group holds different sequences
    ("expert", EXPERT),  # E of expert params: expert parallelism
    ("mlp", MODEL),  # F of dense and expert FFNs: tensor parallelism
    ("heads", MODEL),  # H of attention projections
    ("embed", None),  # D
    ("vocab", None),  # V
    ("length", None),  # L
    ("head_dim", None),  # D / H
)

#: Param path (``'/'``-joined, e.g. ``'block_1/moe/experts/wi'``) pattern -> logical names of its axes.
#: First match wins; no match (norm scales, router gates, counters, ...) = replicated.
PARAM_LOGICAL_AXES: Tuple[Tuple[str, Tuple[Optional[str], ...]], ...] = (
    (r"(^|/)experts/(wi|wg)$", ("expert", "embed", "mlp")),  # [E, D, F]
    (r"(^|/)experts/wo$", ("expert", "mlp", "embed")),  # [E, F, D]
    (r"(^|/)(ffn|shared)/(wi|wg)$", ("embed", "mlp")),  # [D, F]
    (r"(^|/)(ffn|shared)/wo$", ("mlp", "embed")),  # [F, D]
    (r"(^|/)attn/(query|key|value)/kernel$", ("embed", "heads", "head_dim")),  # [D, H, Dh]
    (r"(^|/)attn/out/kernel$", ("heads", "head_dim", "embed")),  # [H, Dh, D]
    (r"(^|/)embed/embedding$", ("vocab", "embed")),  # [V, D]
    (r"(^|/)unembed/kernel$", ("embed", "vocab")),  # [D, V]
)

_RULES = dict(LOGICAL_AXIS_RULES)


def mesh_axes_of(name: Optional[str]) -> Tuple[str, ...]:
    """Mesh axes a logical axis name maps to (empty tuple: replicated)."""
    if name is None:
        return ()
    if name not in _RULES:
        raise ValueError(f"unknown logical axis name {name!r}; known: {sorted(_RULES)} (parallel.LOGICAL_AXIS_RULES).")
    axes = _RULES[name]
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[Optional[str]], mesh=None, shape: Optional[Sequence[int]] = None) -> P:
    """``PartitionSpec`` for logical axis names via ``LOGICAL_AXIS_RULES``.

    With ``mesh`` and ``shape``: an axis whose size the mapped mesh axes do not divide stays replicated (e.g.
    4 heads on ``model=8``), and mesh axes missing from ``mesh`` are ignored.
    """
    parts = []
    used = set()
    for i, name in enumerate(names):
        axes = tuple(a for a in mesh_axes_of(name) if mesh is None or a in mesh.shape)
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None and shape is not None and axes:
            if shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*parts)


def path_str(path) -> str:
    """``'/'``-joined key path of a pytree leaf (dict keys, attribute names, sequence indices)."""
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            out.append(str(k.key))
        else:
            out.append(str(k))
    return "/".join(out)


def param_logical_axes(path: str, ndim: int) -> Tuple[Optional[str], ...]:
    """Logical axis names of a param (or of an optimizer leaf at a path ending like a param's)."""
    for pattern, names in PARAM_LOGICAL_AXES:
        if re.search(pattern, path) and len(names) == ndim:
            return names
    return (None,) * ndim


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` for every array leaf of ``tree`` (params, optimizer state, a whole train state).

    Leaves may be arrays or ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``); Python scalars replicate.
    """

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        names = param_logical_axes(path_str(path), len(shape))
        return NamedSharding(mesh, logical_to_spec(names, mesh, shape))

    return jax.tree_util.tree_map_with_path(one, tree)


def tree_specs(tree: Any, mesh: Mesh) -> Any:
    """Like ``tree_shardings`` but ``PartitionSpec`` leaves."""
    return jax.tree.map(lambda s: s.spec, tree_shardings(tree, mesh))


def batch_spec() -> P:
    """Spec of a batch leaf ``[B, ...]``: B split over the ``'batch'`` rule (``data x expert``)."""
    return logical_to_spec(("batch",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_spec())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def num_batch_shards(mesh) -> int:
    """How many different slices of the batch the mesh holds (``data * expert``)."""
    return math.prod(mesh.shape[a] for a in mesh_axes_of("batch") if a in mesh.shape)


# ---------------------------------------------------------------------------------------------------- mesh


def _get(cfg, name, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default) if hasattr(cfg, name) else default


def resolve_mesh_shape(mesh_cfg: Any, num_devices: int) -> Dict[str, int]:
    """``{'data': d, 'expert': e, 'model': m}`` from ``config.mesh`` (``-1``: the remaining devices).

    ``mesh_cfg`` is a ConfigDict/dict/object with ``data``, ``expert``, ``model`` (missing = 1; ``None`` or an
    empty config = all devices on ``data``). Raises ``ValueError`` naming the field and the fix.
    """
    sizes = {a: _get(mesh_cfg, a, None) for a in MESH_AXES}
    if all(v is None for v in sizes.values()):
        sizes = {DATA: -1, EXPERT: 1, MODEL: 1}
    sizes = {a: (1 if v is None else v) for a, v in sizes.items()}
    for a, v in sizes.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or (v < 1 and v != -1):
            raise ValueError(f"config.mesh.{a}={v!r} must be a positive integer, or -1 for 'the remaining devices'.")
    free = [a for a, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: only one axis may be -1, got {free}; give explicit sizes for the others.")
    fixed = math.prod(int(v) for v in sizes.values() if v != -1)
    desc = "*".join(f"{a}={v}" for a, v in sizes.items())
    if free:
        if num_devices % fixed:
            raise ValueError(f"config.mesh ({desc}): the fixed axes ({fixed} devices) do not divide the "
                             f"{num_devices} devices (jax.device_count()); choose sizes whose product divides "
                             f"{num_devices}.")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"config.mesh ({desc}) has {fixed} devices but jax.device_count() is {num_devices}; make "
                         f"data*expert*model = {num_devices}, or set one axis to -1 (e.g. config.mesh.data=-1).")
    return {a: int(v) for a, v in sizes.items()}


def make_mesh(mesh_cfg: Any = None, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ``Mesh`` with axes ``('data', 'expert', 'model')`` over ``devices`` (default: all, every process).

    Axis types are ``Auto`` (jit's automatic partitioning; the model code needs no sharding annotations).
    The device order comes from ``jax.make_mesh`` (topology-aware on TPU/GPU): ``model`` varies fastest, so
    tensor-parallel partners are nearest, then ``expert`` (all_to_all), then ``data`` (once per step).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    sizes = tuple(shape[a] for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * 3
    try:
        return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)
    except Exception:  # pragma: no cover - unusual device sets: plain order
        return Mesh(np.asarray(devices, dtype=object).reshape(sizes), MESH_AXES, axis_types=auto)


def use_mesh(mesh: Mesh):
    """Context manager: ``with use_mesh(mesh):`` = ``with jax.set_mesh(mesh):`` (MoE layers read it)."""
    return jax.set_mesh(mesh)


def single_device_mesh(device=None) -> Mesh:
    """A 1x1x1 mesh: the same code path as a big mesh, on one device."""
    return make_mesh({DATA: 1, EXPERT: 1, MODEL: 1}, [device or jax.devices()[0]])


def validate_mesh(mesh: Mesh, *, num_experts: Optional[int] = None, batch_size: Optional[int] = None,
                  batch_field: str = "config.batch_size") -> None:
    """Raise ``ValueError`` naming the config field and the fix if ``mesh`` cannot split the model or batch.

    ``num_experts``: E of the MoE layers (None for a dense model). ``batch_size``: the global batch ``B``.
    """
    n_ep = mesh.shape[EXPERT]
    if num_experts is not None and num_experts % n_ep:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(
            f"config.model.moe.num_experts={num_experts} is not divisible by config.mesh.expert={n_ep}: every "
            f"device of an expert-parallel group must hold the same number of experts. Choose mesh.expert in "
            f"{divisors}, or change num_experts.")
    nb = num_batch_shards(mesh)
    if batch_size is not None and batch_size % nb:
        raise ValueError(
            f"{batch_field}={batch_size} (global batch) is not divisible by config.mesh.data*config.mesh.expert="
            f"{mesh.shape[DATA]}*{n_ep}={nb}, the number of devices that hold different sequences. Make the "
            f"batch size a multiple of {nb}, or change the mesh.")


def validate_mesh_config(mesh_cfg: Any, *, batch_size: Optional[int] = None, num_experts: Optional[int] = None,
                         batch_field: str = "config.data.batch_size") -> Dict[str, int]:
    """Check ``config.mesh`` against the devices, the experts and the batch before anything is built.

    Returns the resolved ``{'data', 'expert', 'model'}`` sizes (pmap: ``data`` = local devices). Raises
    ``ValueError`` naming the field and the fix.
    """
    if bool(_get(mesh_cfg, "pmap", False)):
        sizes = {a: _get(mesh_cfg, a, None) for a in MESH_AXES}
        if sizes[EXPERT] not in (None, 1) or sizes[MODEL] not in (None, 1):
            raise ValueError(f"config.mesh.pmap=True is data parallelism only, but config.mesh.expert="
                             f"{sizes[EXPERT]} and config.mesh.model={sizes[MODEL]}; set both to 1, or use the mesh "
                             "path (config.mesh.pmap=False) for expert/model parallelism.")
        if jax.process_count() > 1:
            raise ValueError("config.mesh.pmap=True runs on one process only here; use the mesh path "
                             "(config.mesh.pmap=False) for several hosts.")
        n = jax.local_device_count()
        if sizes[DATA] not in (None, -1, n):
            raise ValueError(f"config.mesh.pmap=True maps over all {n} local devices, but config.mesh.data="
                             f"{sizes[DATA]}; set config.mesh.data=-1 (or {n}).")
        if batch_size is not None and batch_size % n:
            raise ValueError(f"{batch_field}={batch_size} is not divisible by the {n} pmap devices; make it a "
                             f"multiple of {n}.")
        return {DATA: n, EXPERT: 1, MODEL: 1}
    shape = resolve_mesh_shape(mesh_cfg, jax.device_count())
    validate_mesh(_Shape(shape), num_experts=num_experts, batch_size=batch_size, batch_field=batch_field)
    return shape


class _Shape:
    """Stands in for a mesh where only ``.shape`` is read."""

    def __init__(self, shape: Dict[str, int]):
        self.shape = shape


# ---------------------------------------------------------------------------------------------- multi-host


def initialize_distributed(enabled: bool = True, **kwargs) -> bool:
    """``jax.distributed.initialize()`` once, before any other JAX call; returns whether it ran.

    The coordinator address comes from ``JAX_COORDINATOR_ADDRESS`` (read by JAX itself); the process count and
    id from ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` when set, else JAX's cluster auto-detection (SLURM,
    Open MPI, TPU pods, GKE, ...). ``kwargs`` override both (e.g. ``local_device_ids``).
    """
    if not enabled:
        return False
    if jax.distributed.is_initialized():
        return False
    env = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
    for arg, var in env.items():
        if arg not in kwargs and os.environ.get(var):
            kwargs[arg] = int(os.environ[var])
    if "coordinator_address" not in kwargs and os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
    jax.distributed.initialize(**kwargs)
    return True


# ------------------------------------------------------------------------------------- sharding of trees


def shard_tree(tree: Any, shardings: Any) -> Any:
    """Place a (host or single-device) pytree on the mesh. Multi-process: every process must pass the same
    global values (e.g. params initialised from the same seed)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


def shard_batch(batch: Any, mesh: Mesh, process_local: bool = False) -> Any:
    """Split a batch (pytree of ``[B, ...]`` leaves) over ``data x expert`` (``batch_sharding``).

    One process: ``batch`` is the global batch. Several processes: with ``process_local=False`` every
    process passes the same global batch (e.g. from the same deterministic iterator) and keeps the rows its
    devices own; with ``process_local=True`` each passes only its own rows (``B / process_count``, in process
    order), assembled with ``jax.make_array_from_process_local_data``.
    """
    sharding = batch_sharding(mesh)
    nb = num_batch_shards(mesh)
    for leaf in jax.tree.leaves(batch):
        b = leaf.shape[0] * (jax.process_count() if process_local else 1)
        if b % nb:
            raise ValueError(f"a batch of {b} sequences cannot be split over config.mesh.data*config.mesh.expert="
                             f"{nb} devices; make the global batch size a multiple of {nb}.")
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    if process_local:
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(one, batch)


def restore_target(abstract_tree: Any, mesh: Optional[Mesh] = None) -> Any:
    """``ShapeDtypeStruct`` tree with target shardings, for ``orbax`` restore onto ``mesh`` (None: one device).

    Checkpoints hold global arrays (experts stacked on the full E axis), so any mesh shape can restore them.
    """
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_tree)
    else:
        shardings = tree_shardings(abstract_tree, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


# -------------------------------------------------------------------------------- jit train step (GSPMD)


def jit_train_step(step_fn: Callable, mesh: Mesh, state_shardings: Any, *, donate: bool = True,
                   static_argnames: Sequence[str] = (), **jit_kwargs) -> Callable:
    """``jax.jit`` of ``step_fn(state, batch, rng) -> (state, metrics)`` with the mesh's shardings.

    State in and out: ``state_shardings`` (``tree_shardings(state, mesh)``); batch: split over
    ``data x expert``; rng and metrics: replicated. The call runs inside ``use_mesh(mesh)`` so that MoE
    layers take the expert-parallel path. The state must already be placed (``shard_tree``). ``jit_kwargs``
    go to ``jax.jit`` (e.g. ``compiler_options``).
    """
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding(mesh), replicated(mesh)),
                     out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,) if donate else (),
                     static_argnames=tuple(static_argnames), **jit_kwargs)

    def step(state, batch, rng, **kwargs):
        with use_mesh(mesh):
            return jitted(state, batch, rng, **kwargs)

    step.jitted = jitted
    step.mesh = mesh
    return step


def jit_under_mesh(fn: Callable, mesh: Mesh, **jit_kwargs) -> Callable:
    """``jax.jit(fn, **jit_kwargs)`` called inside ``use_mesh(mesh)`` (eval steps, forward passes)."""
    jitted = jax.jit(fn, **jit_kwargs)

    def call(*args, **kwargs):
        with use_mesh(mesh):
            return jitted(*args, **kwargs)

    call.jitted = jitted
    return call


# -------------------------------------------------------------------------------------------------- pmap

PMAP_AXIS = "batch"


def replicate(tree: Any, devices: Optional[Sequence[Any]] = None) -> Any:
    """Copy a pytree to every local device with a leading device axis (pmap layout)."""
    devices = list(devices or jax.local_devices())
    sharding = NamedSharding(Mesh(np.asarray(devices, dtype=object), (PMAP_AXIS,)), P(PMAP_AXIS))
    return jax.tree.map(lambda x: jax.device_put(jnp.broadcast_to(x[None], (len(devices),) + jnp.shape(x)), sharding),
                        tree)


def unreplicate(tree: Any) -> Any:
    """First replica of a pmapped pytree."""
    return jax.tree.map(lambda x: x[0], tree)


def split_for_pmap(batch: Any, num_devices: Optional[int] = None) -> Any:
    """``[B, ...] -> [n, B/n, ...]`` for ``n`` local devices; ``ValueError`` if n does not divide B."""
    n = num_devices or jax.local_device_count()

    def one(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} sequences cannot be split over {n} pmap devices; make the "
                             f"per-process batch size a multiple of {n}.")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return jax.tree.map(one, batch)


def pmap_train_step(step_fn: Callable, *, axis_name: str = PMAP_AXIS, donate: bool = True) -> Callable:
    """``jax.pmap`` of ``step_fn(state, batch, rng, axis_name=...)``: state replicated, batch ``[n, B/n, ...]``,
    the same rng on every device. The step must average its gradients (and metrics) with
    ``jax.lax.pmean(..., axis_name)`` when given an axis name; MoE layers inside use their single-device path
    (per-device groups, per-device capacity, expert params replicated)."""
    return jax.pmap(lambda state, batch, rng: step_fn(state, batch, rng, axis_name=axis_name),
                    axis_name=axis_name, in_axes=(0, 0, None), donate_argnums=(0,) if donate else ())


# -------------------------------------------------------------------------------- runner for train()


class Runner:
    """How ``train()`` places its state and batches and runs its steps: on a mesh (``jax.jit`` with
    ``NamedSharding``; one device is a 1x1x1 mesh) or with ``jax.pmap``. Built by ``make_runner``.

    ``init(rng) -> state`` (placed); ``abstract_state(rng)``: ``ShapeDtypeStruct`` tree with the target
    shardings (orbax restore target); ``place(state)``: a restored state ready for ``train_step``;
    ``train_step(state, batch, rng) -> (state, metrics)`` and ``eval_step(state, batch) -> metrics`` take the
    host's global ``[B, ...]`` numpy batch and return replicated (single-copy) metrics; ``host_state(state)``:
    what to checkpoint or sample from (global arrays; pmap: the first replica).
    """

    def __init__(self, kind: str, mesh: Optional[Mesh], init, abstract_state, place, train_step, eval_step,
                 host_state):
        self.kind, self.mesh = kind, mesh
        self.init, self.abstract_state, self.place = init, abstract_state, place
        self.train_step, self.eval_step, self.host_state = train_step, eval_step, host_state

    def describe(self) -> str:
        if self.kind == "pmap":
            return f"pmap data parallelism over {jax.local_device_count()} local devices"
        shape = ", ".join(f"{a}={self.mesh.shape[a]}" for a in MESH_AXES)
        return f"mesh ({shape}) over {self.mesh.size} devices, {jax.process_count()} process(es)"


def make_runner(mesh_cfg: Any, init_fn: Callable, train_step: Callable, eval_step: Callable, *,
                batch_size: int, num_experts: Optional[int] = None,
                batch_field: str = "config.data.batch_size") -> Runner:
    """A ``Runner`` for ``config.mesh`` (``data/expert/model`` sizes, ``pmap`` flag).

    ``init_fn(rng) -> state``, ``train_step(state, batch, rng, axis_name=None) -> (state, metrics)``,
    ``eval_step(state, batch) -> metrics`` are the pure step functions (jitted or pmapped only here).
    Raises ``ValueError`` naming the field when the mesh does not divide the experts or the batch.
    """
    validate_mesh_config(mesh_cfg, batch_size=batch_size, num_experts=num_experts, batch_field=batch_field)
    if bool(_get(mesh_cfg, "pmap", False)):
        return _pmap_runner(init_fn, train_step, eval_step)
    mesh = make_mesh(mesh_cfg)
    abstract = lambda rng: jax.eval_shape(init_fn, rng)
    shardings = lambda rng: tree_shardings(abstract(rng), mesh)
    cache: Dict[str, Any] = {}

    def state_shardings(rng):
        if "s" not in cache:
            cache["s"] = shardings(rng)
        return cache["s"]

    def init(rng):
        return jax.jit(init_fn, out_shardings=state_shardings(rng))(rng)

    def abstract_state(rng):
        return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract(rng),
                            state_shardings(rng))

    steps: Dict[str, Callable] = {}

    def put(batch):
        return shard_batch(batch, mesh, process_local=False)

    def train(state, batch, rng):
        if "train" not in steps:
            steps["train"] = jit_train_step(train_step, mesh, jax.tree.map(lambda x: x.sharding, state))
        return steps["train"](state, put(batch), rng)

    def evaluate(state, batch):
        if "eval" not in steps:
            state_sh = jax.tree.map(lambda x: x.sharding, state)
            steps["eval"] = jit_under_mesh(eval_step, mesh, in_shardings=(state_sh, batch_sharding(mesh)),
                                           out_shardings=replicated(mesh))
        return steps["eval"](state, put(batch))

    return Runner("mesh", mesh, init, abstract_state, lambda state: state, train, evaluate, lambda state: state)


def _pmap_runner(init_fn, train_step, eval_step) -> Runner:
    n = jax.local_device_count()
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    p_train = pmap_train_step(train_step)
    p_eval = jax.pmap(lambda state, batch: jax.lax.pmean(eval_step(state, batch), PMAP_AXIS), axis_name=PMAP_AXIS)

    def abstract_state(rng):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            jax.eval_shape(init_fn, rng))

    def train(state, batch, rng):
        state, metrics = p_train(state, split_for_pmap(batch, n), rng)
        return state, unreplicate(metrics)

    def evaluate(state, batch):
        return unreplicate(p_eval(state, split_for_pmap(batch, n)))

    return Runner("pmap", None, lambda rng: replicate(jax.jit(init_fn)(rng)), abstract_state, replicate, train,
                  evaluate, unreplicate)


# ------------------------------------------------------------------------------- expert-parallel MoE layer


def context_mesh() -> Optional[Any]:
    """The mesh the MoE layer should split its work over, or None for the single-device path.

    ``jax.sharding.get_abstract_mesh()`` if it has the axes ``data``, ``expert`` and ``model`` (as
    ``make_mesh`` builds it), one of them of size > 1, and none of them already manual (i.e. we are not inside
    someone else's ``shard_map`` over them).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    if not set(MESH_AXES) <= set(mesh.axis_names):
        return None
    if set(MESH_AXES) & set(mesh.manual_axes):
        return None
    if all(mesh.shape[a] == 1 for a in MESH_AXES):
        return None
    return mesh


def check_layer_divisibility(mesh, num_experts: int, num_groups: int, batch_shape: Tuple[int, int],
                             group_size: int) -> None:
    """``ValueError`` naming the config field when the mesh does not divide the experts or the groups."""
    validate_mesh(mesh, num_experts=num_experts)
    nb = num_batch_shards(mesh)
    if num_groups % nb:
        b, l = batch_shape
        raise ValueError(
            f"the batch has G={num_groups} routing groups (B*L/S = {b}*{l}/{group_size}), which cannot be split "
            f"over config.mesh.data*config.mesh.expert={mesh.shape[DATA]}*{mesh.shape[EXPERT]}={nb} devices. "
            f"Make the global batch size (B={b}) a multiple of {nb} (with moe.group_size set: make B*L/group_size "
            "one), or change the mesh.")


class _ShardedExperts:
    """Stands in for ``BatchedExperts`` inside ``shard_map``: ``[E, R, D] -> [E, R, D]`` (capacity layout).

    ``R = G_l*C`` local rows per expert. The rows of expert e are processed on the device that owns e:
    all_to_all there, the ``E_l`` local experts, all_to_all back.
    """

    def __init__(self, params: Dict[str, Array], activation: str, dtype, n_ep: int, ep_axis: str,
                 f_axes: Tuple[str, ...]):
        self.params, self.activation, self.dtype = params, activation, dtype
        self.n_ep, self.ep_axis, self.f_axes = n_ep, ep_axis, f_axes

    def local(self, x: Array) -> Array:
        """``[E_l, R', D] -> [E_l, R', D]`` with this device's experts (one psum over the F shards)."""
        y = ffn_apply(self.params, x, self.activation, "end,edf->enf", "enf,efd->end", self.dtype)
        return jax.lax.psum(y, self.f_axes) if self.f_axes else y

    def __call__(self, xe: Array) -> Array:
        if self.n_ep == 1:
            return self.local(xe)
        # [E, R, D] -> [E_l, n*R, D]: expert slice j goes to device j; received rows in source order.
        xr = jax.lax.all_to_all(xe, self.ep_axis, split_axis=0, concat_axis=1, tiled=True)
        yr = self.local(xr)
        # [E_l, n*R, D] -> [E, R, D]: row block i goes back to source i and lands in expert slice j.
        return jax.lax.all_to_all(yr, self.ep_axis, split_axis=1, concat_axis=0, tiled=True)


def _dropless_ep(x: Array, decision: RoutingDecision, params: Dict[str, Array], activation: str, dtype,
                 n_ep: int, ep_axis: str, f_axes: Tuple[str, ...], block_size: Optional[int],
                 impl: str) -> Array:
    """Dropless across devices, inside ``shard_map``: ``x[G_l, S, D] -> [G_l, S, D]``.

    1. Local assignment a (``N_l = G_l*S*K`` of them) goes to device ``e // E_l`` as local expert ``e % E_l``;
       its row in the send buffer ``[n, N_l, D]`` is (destination, rank of a among the assignments to that
       destination): the static bound ``N_l`` per destination can never overflow.
    2. ``all_to_all`` -> ``[n, N_l, D]`` rows from every source, tagged with their local expert (``E_l`` marks
       an empty row).
    3. The receiver runs the single-device dropless layout (``dispatch.make_dropless_plan``: sorted,
       block-padded) or ``ragged_dot`` over its ``n*N_l`` rows and ``E_l`` experts.
    4. ``all_to_all`` back; each source gathers its assignments' rows and combines them with its weights.
    """
    g, s, k = decision.expert_index.shape
    d = x.shape[-1]
    e_l = decision.num_experts // n_ep
    n = g * s * k
    r = n_ep * n
    expert = decision.expert_index.reshape(n)  # [N_l]
    valid = decision.valid.reshape(n)
    dest = jnp.where(valid, expert // e_l, n_ep)  # [N_l]; invalid -> n (nowhere)
    onehot = jax.nn.one_hot(dest, n_ep, dtype=jnp.int32)  # [N_l, n]; invalid rows all zero
    rank = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)  # [N_l] rank within destination
    send_row = jnp.where(valid, dest * n + rank, r).astype(jnp.int32)  # [N_l]; r = one past the end
    token = jnp.arange(n) // k  # flat local token id g*S + s
    row_token = jnp.full((r,), g * s, jnp.int32).at[send_row].set(token, mode="drop")  # [n*N_l]
    row_expert = jnp.full((r,), e_l, jnp.int32).at[send_row].set(expert % e_l, mode="drop")  # [n*N_l]
    x_pad = jnp.concatenate([x.reshape(g * s, d), jnp.zeros((1, d), x.dtype)], axis=0)  # [T_l + 1, D]
    x_send = x_pad[row_token].reshape(n_ep, n, d)  # [n, N_l, D]
    e_send = row_expert.reshape(n_ep, n)  # [n, N_l]
    if n_ep > 1:  # block i of the result came from source i
        x_recv = jax.lax.all_to_all(x_send, ep_axis, 0, 0, tiled=True)
        e_recv = jax.lax.all_to_all(e_send, ep_axis, 0, 0, tiled=True)
    else:
        x_recv, e_recv = x_send, e_send
    e_recv = e_recv.reshape(1, r, 1)  # one "group" of r rows, K = 1
    local = RoutingDecision(
        combine_weights=jnp.ones((1, r, 1), jnp.float32),
        valid=e_recv < e_l,
        router_logits=jnp.zeros((1, r, e_l), jnp.float32),  # only its shape (E_l) is read; dead code for XLA
        router_probs=jnp.zeros((1, r, e_l), jnp.float32),
        expert_index=jnp.minimum(e_recv, e_l - 1),
    )
    x_recv = x_recv.reshape(1, r, d)  # [1, n*N_l, D]
    if impl == "ragged_dot":
        y_recv = dispatch_lib.ragged_dot_experts(x_recv, local, params, activation, dtype)
    elif impl == "blocks":
        plan = dispatch_lib.make_dropless_plan(local, block_size)
        xb = dispatch_lib.dropless_dispatch(x_recv, plan)  # [NB, b, D]
        gathered = {name: jnp.take(w, plan.block_expert, axis=0) for name, w in params.items()}  # [NB, ...]
        yb = ffn_apply(gathered, xb, activation, "nbd,ndf->nbf", "nbf,nfd->nbd", dtype)
        y_recv = dispatch_lib.dropless_combine(yb, plan)  # [1, n*N_l, D]
    else:
        # 'grouped' loops with carries that shard_map's varying-axis types reject; not supported here yet.
        raise ValueError(f"moe.dropless_impl={impl!r} under a device mesh: the expert-parallel dropless path runs "
                         "'blocks' or 'ragged_dot' (or 'auto', which picks 'blocks' there).")
    if f_axes:
        y_recv = jax.lax.psum(y_recv, f_axes)
    y_recv = y_recv.reshape(n_ep, n, d)
    y_back = jax.lax.all_to_all(y_recv, ep_axis, 0, 0, tiled=True) if n_ep > 1 else y_recv  # [n, N_l, D]
    y_pad = jnp.concatenate([y_back.reshape(r, d), jnp.zeros((1, d), y_back.dtype)], axis=0)
    gathered = y_pad[send_row].reshape(g, s, k, d)  # [G_l, S, K, D]
    weight = jnp.where(decision.valid, decision.combine_weights, 0.0).astype(gathered.dtype)
    return dispatch_lib.weighted_sum_k(gathered, weight)  # [G_l, S, D]


def run_expert_parallel(x: Array, decision: RoutingDecision, experts, capacity: Optional[int], *,
                        dispatcher: str, mesh, slot_order: str = "choice_major",
                        block_size: Optional[int] = None, impl: str = "blocks") -> dispatch_lib.DispatchResult:
    """Expert-parallel counterpart of ``dispatch.get_dispatcher(dispatcher)(x, decision, experts, capacity)``.

    Args:
      x: ``[G, S, D]`` global groups (traced under ``jit``; split over the ``'batch'`` rule's mesh axes).
      decision: the global ``RoutingDecision`` (every array field has the leading ``G`` axis).
      experts: the layer's ``BatchedExperts``; only its params ``wi/wg [E, D, F]``, ``wo [E, F, D]``,
        ``activation``, ``glu`` and ``dtype`` are used.
      capacity: ``C`` per group, or None (dropless). dispatcher: resolved dispatcher name.
      mesh: the (abstract) mesh from ``context_mesh()``.
    Returns:
      ``DispatchResult(y[G, S, D], kept, capacity)``, equal to the single-device dispatcher's.
    """
    g, s, _ = x.shape
    e = decision.num_experts
    ep_axes = mesh_axes_of("expert")
    if len(ep_axes) != 1 or ep_axes[0] not in mesh_axes_of("batch"):
        raise ValueError("parallel.LOGICAL_AXIS_RULES: 'expert' must map to one mesh axis that is also part of "
                         "the 'batch' rule (tokens must differ across the devices that share the experts).")
    ep_axis = ep_axes[0]
    n_ep = mesh.shape[ep_axis]
    if e % n_ep or g % num_batch_shards(mesh):
        check_layer_divisibility(mesh, e, g, (g, s), s)
    params = experts.params(x.shape[-1])
    in_spec = logical_to_spec(("expert", "embed", "mlp"))  # wi, wg: [E, D, F]
    out_spec = logical_to_spec(("expert", "mlp", "embed"))  # wo: [E, F, D]
    param_specs = {name: (out_spec if name == "wo" else in_spec) for name in params}
    f_axes = tuple(a for a in mesh_axes_of("mlp") if a in mesh.shape)  # psum over F shards (size 1: no-op)
    tokens = logical_to_spec(("batch",))
    local_decision = decision.replace(aux_losses={})  # every remaining array leaf is [G, ...]
    decision_specs = jax.tree.map(lambda _: tokens, local_decision)
    activation, dtype = experts.activation, experts.dtype

    def body(x_l, dec_l, params_l):
        if dispatcher == "dropless":
            y = _dropless_ep(x_l, dec_l, params_l, activation, dtype, n_ep, ep_axis, f_axes, block_size, impl)
            return y, dec_l.valid
        local_experts = _ShardedExperts(params_l, activation, dtype, n_ep, ep_axis, f_axes)
        res = dispatch_lib.get_dispatcher(dispatcher)(x_l, dec_l, local_experts, capacity, slot_order=slot_order,
                                                      block_size=block_size, impl=impl)
        return res.y, res.kept

    y, kept = jax.shard_map(body, mesh=mesh, in_specs=(tokens, decision_specs, param_specs),
                            out_specs=(tokens, tokens))(x, local_decision, params)
    return dispatch_lib.DispatchResult(y, kept, capacity)
