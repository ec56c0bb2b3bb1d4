"""Data x expert (x model) parallelism on 8 fake CPU devices: every sharded number equals the one-device one.

* model level: forward logits, loss, metrics, gradients (every param) and one AdamW step of the real train step
  (``train.make_train_step`` under ``parallel.jit_train_step``) on meshes with expert-parallel degree 2, 4, 8
  (x data parallel, and x model parallel 2), for the einsum, scatter and dropless dispatchers, against the
  same step jitted on one device;
* layer level: more dispatcher/router variants (expert choice, dropless ``ragged_dot``, GLU + shared experts,
  several groups per sequence), output, stats and gradients;
* checkpoints: saved on one mesh, restored on another mesh shape and on one device, equal outputs;
* pmap: the same train step under ``jax.pmap`` equals the mean of per-device gradients on one device;
* errors: a mesh that does not divide the experts or the batch, bad ``config.mesh`` sizes;
* multi-host: 2 processes x 4 CPU devices on 127.0.0.1 train ``experiments/train.py`` a few steps and log the
  same losses as a one-device run.

Gradients are compared with a tolerance relative to each leaf's largest entry, so a wrong scaling of any
param's gradient (e.g. expert params summed over data replicas twice, or not at all) fails.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax import parallel
from moe_jax.model import ModelConfig, Transformer
from moe_jax.moe import MoEConfig, MoELayer
from moe_jax.train import create_state, cross_entropy, make_eval_step, make_optimizer, make_train_step

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices; see tests/conftest.py")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, L, V, D = 8, 8, 32, 16  # batch, length, vocab, width: one shape for every model-level test
# Compile-time saver for these tiny programs (about half the CPU time of XLA's default optimisation level);
# every comparison is between programs compiled the same way.
FAST = dict(compiler_options={"xla_backend_optimization_level": 0})
TRAIN_CFG = ml_collections.ConfigDict(dict(learning_rate=1e-2, steps=10, warmup_steps=0, end_lr_ratio=0.1,
                                           weight_decay=0.1, grad_clip=1.0, adam_b1=0.9, adam_b2=0.95))


def mesh_of(data, expert, model=1):
    return parallel.make_mesh(dict(data=data, expert=expert, model=model))


def assert_tree_close(actual, expected, rtol=1e-4, rel_atol=1e-5, what=""):
    """Leafwise allclose with an absolute tolerance relative to the leaf's largest entry."""
    paths = jax.tree_util.tree_leaves_with_path(expected)
    got = jax.tree.leaves(actual)
    assert len(got) == len(paths), what
    for (path, e), a in zip(paths, got):
        e, a = np.asarray(e, np.float64), np.asarray(a, np.float64)
        assert a.shape == e.shape, (what, parallel.path_str(path))
        atol = rel_atol * (float(np.max(np.abs(e))) if e.size else 0.0) + 1e-7
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"{what} {parallel.path_str(path)}")


# ------------------------------------------------------------------------------------------ model level


def tiny_model(dispatcher):
    moe = MoEConfig(num_experts=8, k=2, router="top_k", expert_hidden=16, dispatcher=dispatcher,
                    capacity_factor=1.0, eval_capacity_factor=1.0, slot_order="token_major")
    return Transformer(ModelConfig(vocab_size=V, d_model=D, num_layers=1, num_heads=2, d_ff=32, moe_every=1,
                                   moe=moe))


def record_grads() -> optax.GradientTransformation:
    """An identity optimizer stage whose state is the last gradient: chained before the real optimizer, it
    puts the train step's raw gradients into ``new_state.opt_state[0]`` (sharded like the params)."""
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda updates, state, params=None: (updates, updates))


def make_tx():
    tx, schedule = make_optimizer(TRAIN_CFG)  # AdamW, clipping, schedule: what train() uses
    return optax.chain(record_grads(), tx), schedule


_REFERENCE = {}


def reference(dispatcher):
    """One-device run (no mesh in the context): state, batch, rng, outputs. Cached per dispatcher."""
    if dispatcher not in _REFERENCE:
        model = tiny_model(dispatcher)
        tx, schedule = make_tx()
        fn = make_train_step(model, tx, schedule)
        state = jax.jit(lambda key: create_state(model, tx, key, L), **FAST)(jax.random.key(0))
        batch = np.asarray(jax.random.randint(jax.random.key(1), (B, L + 1), 0, V), np.int32)
        rng = jax.random.key(2)
        new_state, out = jax.jit(fn, **FAST)(state, batch, rng)
        _REFERENCE[dispatcher] = (model, tx, fn, state, batch, rng, jax.device_get((new_state, out)))
    return _REFERENCE[dispatcher]


@pytest.mark.parametrize("dispatcher,shape", [
    ("einsum", (4, 2, 1)),  # expert-parallel 2 x data 4
    ("scatter", (2, 4, 1)),  # expert-parallel 4 x data 2
    ("dropless", (1, 8, 1)),  # expert-parallel 8 (the batch is split over the expert axis too)
])  # the model axis (F and heads split): test_moe_layer_variants_* and the checkpoint test
def test_sharded_train_step_equals_one_device(dispatcher, shape, monkeypatch):
    model, tx, fn, state, batch, rng, (ref_state, ref) = reference(dispatcher)
    calls = []
    real = parallel.run_expert_parallel
    monkeypatch.setattr(parallel, "run_expert_parallel", lambda *a, **k: calls.append(k["mesh"]) or real(*a, **k))

    mesh = mesh_of(*shape)
    shardings = parallel.tree_shardings(state, mesh)
    step = parallel.jit_train_step(fn, mesh, shardings, donate=False, **FAST)
    new_state, out = step(parallel.shard_tree(state, shardings), batch, rng)

    assert calls and calls[0].shape[parallel.EXPERT] == shape[1], "the MoE layer did not take the sharded path"
    wi = new_state.params["block_0"]["moe"]["experts"]["wi"]
    assert wi.shape == (8, D, 16) and wi.sharding.spec == P("expert", None, "model")
    assert len({s.device for s in wi.addressable_shards}) == 8
    assert wi.addressable_shards[0].data.shape == (8 // shape[1], D, 16 // shape[2])
    assert new_state.opt_state[0]["block_0"]["moe"]["experts"]["wi"].sharding.spec == P("expert", None, "model")
    m, new_state = jax.device_get((out, new_state))
    rm = ref
    if dispatcher != "dropless":
        assert float(np.max(rm["moe"]["metrics"]["drop_fraction"])) > 0, "capacity should overflow in this test"
    np.testing.assert_allclose(m["loss"], rm["loss"], rtol=1e-5)
    np.testing.assert_allclose(m["ce"], rm["ce"], rtol=1e-5)
    np.testing.assert_allclose(m["aux_loss"], rm["aux_loss"], rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], rm["grad_norm"], rtol=1e-5)
    assert_tree_close(m["moe"], rm["moe"], what="moe metrics")
    assert_tree_close(new_state.opt_state[0], ref_state.opt_state[0], what="grads")
    assert_tree_close(new_state.params, ref_state.params, rtol=1e-4, rel_atol=1e-5, what="params after one step")
    assert_tree_close(new_state.opt_state, ref_state.opt_state, what="optimizer state")


# ------------------------------------------------------------------------------------------ layer level

LAYER_CASES = {
    # expert choice (non-causal layer), capacity buffer, EP 4 x DP 2
    "expert_choice_scatter": (dict(router="expert_choice", k=2, dispatcher="scatter"), (2, 4, 1)),
    # dropless with ragged_dot, GLU experts, a shared expert, EP 2 x DP 2 x TP 2
    "dropless_ragged_glu_shared": (dict(router="mixtral", k=2, dispatcher="dropless", dropless_impl="ragged_dot",
                                        glu=True, activation="silu", num_shared_experts=1), (2, 2, 2)),
    # dropless with the block-padded layout (the train-step case above runs the default, 'grouped' on CPU), EP 4
    "dropless_blocks": (dict(router="top_k", k=1, dispatcher="dropless", dropless_impl="blocks"), (2, 4, 1)),
    # einsum, two groups per sequence (group_size=4), choice-major priority, EP 8
    "einsum_groups_of_4": (dict(router="top_k", k=2, dispatcher="einsum", group_size=4), (1, 8, 1)),
}


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_moe_layer_variants_equal_one_device(name):
    overrides, shape = LAYER_CASES[name]
    cfg = MoEConfig(num_experts=8, expert_hidden=16, capacity_factor=1.0, **overrides)
    layer = MoELayer(cfg, causal=False)
    x = jax.random.normal(jax.random.key(3), (B, L, D))
    mask = jnp.ones((B, L), bool).at[1, 5:].set(False)  # some padding
    variables = layer.init(jax.random.key(4), x, mask)
    r = jax.random.normal(jax.random.key(5), (B, L, D))

    def run(variables, x):
        def loss(variables, x):
            y, stats = layer.apply(variables, x, mask, train=True)
            return jnp.sum(y * r) + stats.aux_loss, (y, stats)

        (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables, x)
        return y, stats, grads

    f = jax.jit(run, **FAST)
    ref = jax.device_get(f(variables, x))
    with parallel.use_mesh(mesh_of(*shape)):
        got = jax.device_get(f(variables, x))
    assert_tree_close(got[0], ref[0], what="y")
    assert_tree_close(got[1], ref[1], what="stats")
    assert_tree_close(got[2], ref[2], what="grads")
    if cfg.dispatcher != "dropless":
        assert float(ref[1].metrics["drop_fraction"]) > 0


# ------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_restores_on_another_mesh_and_on_one_device(tmp_path):
    import orbax.checkpoint as ocp

    model, _, _, state, batch, _, _ = reference("scatter")
    forward = lambda params: model.apply({"params": params}, batch[:, :-1], train=False)[0]
    mesh_a = mesh_of(2, 4)
    state_a = parallel.shard_tree(state, parallel.tree_shardings(state, mesh_a))
    logits_a = parallel.jit_under_mesh(forward, mesh_a, **FAST)(state_a.params)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(tmp_path, "ckpt"), state_a)
    ckpt.wait_until_finished()

    abstract = jax.eval_shape(lambda: state)
    for mesh in (mesh_of(2, 2, 2), None):  # experts, F and attention heads split differently; one device
        restored = ckpt.restore(os.path.join(tmp_path, "ckpt"), parallel.restore_target(abstract, mesh))
        wi = restored.params["block_0"]["moe"]["experts"]["wi"]
        assert wi.shape == (8, D, 16)  # stored stacked on the global E axis
        if mesh is None:
            assert len(wi.sharding.device_set) == 1
            logits = jax.jit(forward, **FAST)(restored.params)
        else:
            assert wi.sharding.spec == P("expert", None, "model") and wi.sharding.mesh.shape == mesh.shape
            logits = parallel.jit_under_mesh(forward, mesh, **FAST)(restored.params)
        assert_tree_close(jax.device_get(restored), jax.device_get(state), rtol=0, rel_atol=0, what="restored")
        np.testing.assert_allclose(np.asarray(logits), np.asarray(logits_a), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------------- pmap


def test_pmap_runner_equals_mean_of_per_device_gradients():
    model, tx, train_step, state, batch, rng, _ = reference("scatter")
    runner = parallel.make_runner({"pmap": True, "data": -1}, lambda key: create_state(model, tx, key, L),
                                  train_step, make_eval_step(model), batch_size=B, num_experts=8)
    assert runner.kind == "pmap"
    new_state, metrics = runner.train_step(runner.place(state), batch, rng)
    new_state = runner.host_state(new_state)
    ce = runner.eval_step(runner.place(state), batch)["ce"]

    # Reference: each device's gradient on its own sequence (own groups, own capacity), averaged, one update.
    def loss_fn(params, seq):
        logits, aux = model.apply({"params": params}, seq[:, :-1], train=True,
                                  rngs={"router": jax.random.fold_in(rng, state.step)})
        return cross_entropy(logits, seq[:, 1:]) + aux["aux_loss"], cross_entropy(logits, seq[:, 1:])

    vg = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), **FAST)
    per_device = [vg(state.params, batch[i:i + 1]) for i in range(B)]
    grads = jax.tree.map(lambda *g: sum(g) / B, *[g for _, g in per_device])
    updates, _ = tx.update(grads, state.opt_state, state.params)
    expected = jax.tree.map(lambda p, u: p + u, state.params, updates)
    np.testing.assert_allclose(metrics["loss"], np.mean([l for (l, _), _ in per_device]), rtol=1e-5)
    np.testing.assert_allclose(ce, np.mean([c for (_, c), _ in per_device]), rtol=1e-5)
    assert int(new_state.step) == 1
    assert_tree_close(new_state.opt_state[0], grads, what="pmap grads")
    assert_tree_close(new_state.params, expected, what="pmap params after one step")


# ------------------------------------------------------------------------------------------------ errors


def test_mesh_config_errors_name_the_field():
    assert parallel.resolve_mesh_shape(dict(data=-1, expert=4, model=1), 8) == dict(data=2, expert=4, model=1)
    assert parallel.resolve_mesh_shape(dict(data=2, expert=-1), 8) == dict(data=2, expert=4, model=1)
    assert parallel.resolve_mesh_shape(None, 8) == dict(data=8, expert=1, model=1)
    for cfg, words in [(dict(data=-1, expert=-1), "only one axis"),
                       (dict(data=2, expert=2, model=1), "config.mesh"),
                       (dict(data=-1, expert=3), "config.mesh"),
                       (dict(data=0, expert=8), "config.mesh.data")]:
        with pytest.raises(ValueError, match=words):
            parallel.resolve_mesh_shape(cfg, 8)

    dummy = lambda *a, **k: None
    with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by config.mesh.expert=4"):
        parallel.make_runner(dict(data=-1, expert=4), dummy, dummy, dummy, batch_size=8, num_experts=6)
    with pytest.raises(ValueError, match=r"config.data.batch_size=4 .* not divisible by .*data\*config.mesh.expert"):
        parallel.make_runner(dict(data=2, expert=4), dummy, dummy, dummy, batch_size=4, num_experts=8)
    with pytest.raises(ValueError, match=r"config.mesh.pmap=True is data parallelism only"):
        parallel.make_runner(dict(pmap=True, expert=2), dummy, dummy, dummy, batch_size=8, num_experts=8)

    # The layer itself refuses, at trace time, a batch whose groups the mesh cannot split.
    layer = MoELayer(MoEConfig(num_experts=8, expert_hidden=16, dispatcher="scatter"))
    x = jnp.zeros((4, L, D))
    variables = jax.eval_shape(layer.init, jax.random.key(0), x)
    with parallel.use_mesh(mesh_of(2, 4)):
        with pytest.raises(ValueError, match=r"G=4 routing groups .* config.mesh.data\*config.mesh.expert=2\*4=8"):
            jax.eval_shape(layer.apply, variables, x)
    layer6 = MoELayer(MoEConfig(num_experts=6, expert_hidden=16, dispatcher="scatter"))
    with parallel.use_mesh(mesh_of(2, 4)):
        with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by config.mesh.expert=4"):
            jax.eval_shape(layer6.init, jax.random.key(0), jnp.zeros((B, L, D)))


def test_param_rules_cover_params_and_optimizer_state():
    _, _, _, state, _, _, _ = reference("scatter")
    specs = parallel.tree_specs(state, mesh_of(2, 2, 2))
    flat = {parallel.path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(specs)}
    wi = [p for p in flat if p.endswith("experts/wi")]
    assert len(wi) == 4  # params, recorded grads, adam mu, adam nu
    assert all(flat[p] == P("expert", None, "model") for p in wi)
    assert all(flat[p] == P("expert", "model", None) for p in flat if p.endswith("experts/wo"))
    replicated = lambda spec: all(a is None for a in spec)
    assert all(replicated(flat[p]) for p in flat if p.endswith("router/gate/kernel"))
    assert all(flat[p] == P(None, "model", None) for p in flat if p.endswith("attn/query/kernel"))
    assert replicated(flat["step"])


# ------------------------------------------------------------------------------------------- multi-host


FAST_FLAG = "--xla_backend_optimization_level=0"  # as FAST, for the subprocesses


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cmd(workdir, *extra):
    return [sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--config",
            os.path.join(ROOT, "configs", "switch_ep.py:tiny"), "--workdir", str(workdir),
            "--config.train.steps=3", "--config.train.warmup_steps=1", "--config.train.log_every=1",
            "--config.train.eval_every=0", "--config.train.eval_batches=1", "--config.train.ckpt_every=0",
            "--config.train.sample_tokens=0", "--config.data.seq_len=32", "--config.model.num_layers=1",
            "--config.model.moe_every=1", *extra]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    val = [r["loss"] for r in records if r["split"] == "val"]
    return train, val


def test_two_processes_train_like_one_device(tmp_path):
    """2 processes x 4 CPU devices (gloo collectives), mesh data=1 x expert=8: the all_to_all and the gradient
    reductions cross the process boundary. Same losses as a one-device run of the same config."""
    port = _free_port()
    base_env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    base_env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    procs = []
    for pid in range(2):
        env = dict(base_env, XLA_FLAGS="--xla_force_host_platform_device_count=4 " + FAST_FLAG,
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(_train_cmd(tmp_path / "multi", "--config.mesh.distributed=True",
                                                 "--config.mesh.data=1", "--config.mesh.expert=8"),
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    env = dict(base_env, XLA_FLAGS="--xla_force_host_platform_device_count=1 " + FAST_FLAG)
    procs.append(subprocess.Popen(_train_cmd(tmp_path / "one", "--config.mesh.data=1", "--config.mesh.expert=1"),
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-process training timed out")
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "mesh (data=1, expert=8, model=1) over 8 devices, 2 process(es)" in outs[0]
    multi, one = _losses(tmp_path / "multi"), _losses(tmp_path / "one")
    assert sorted(multi[0]) == [1, 2, 3], multi  # process 0 alone writes the metrics
    for step in (1, 2, 3):
        np.testing.assert_allclose(multi[0][step], one[0][step], rtol=2e-5)
    np.testing.assert_allclose(multi[1], one[1], rtol=2e-5)
    assert os.path.isdir(tmp_path / "multi" / "checkpoints" / "3")
