"""Dense -> MoE conversions (moe_jax/upcycle.py): exact function preservation where the math says so, balanced
and deterministic partitions, the Taylor importance against an identity, errors, and the study end to end
(configs/compare_upcycle.py, in a subprocess on one CPU device) plus the experiments/upcycle.py path."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax import upcycle as U
from moe_jax.experts import ffn_apply
from moe_jax.model import ModelConfig, Transformer, init_variables
from moe_jax.moe import MoEConfig, MoELayer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DENSE = "...d,df->...f", "...f,fd->...d"
EXPERTS = "nd,edf->enf", "enf,efd->end"


def _int_ffn(rng, d, f, glu=False):
    """Small integer weights: with relu every product and sum is exact in float32."""
    p = {"wi": rng.integers(-3, 4, (d, f)), "wo": rng.integers(-3, 4, (f, d))}
    if glu:
        p["wg"] = rng.integers(-3, 4, (d, f))
    return {k: v.astype(np.float32) for k, v in p.items()}


def _split_sum(ffn, partition, shared, x, act):
    experts, shared_p = U.split_ffn(ffn, partition, shared)
    y = np.asarray(ffn_apply(experts, x, act, *EXPERTS, jnp.float32)).sum(0)  # sum_e expert_e(x), [N, D]
    if shared_p is not None:
        y = y + np.asarray(ffn_apply(shared_p, x, act, *DENSE, jnp.float32))
    return y


# ------------------------------------------------------------------------------------------ one FFN


def test_split_experts_sum_to_the_dense_ffn_exactly():
    """All experts active with unit weights: sum_e expert_e(x) (+ shared(x)) == dense(x), bit for bit with
    integer weights and relu, for random, k-means and importance partitions, with and without shared neurons."""
    rng = np.random.default_rng(0)
    d, f, e = 6, 24, 4
    ffn = _int_ffn(rng, d, f)
    x = rng.integers(-2, 3, (10, d)).astype(np.float32)
    dense = np.asarray(ffn_apply(ffn, x, "relu", *DENSE, jnp.float32))
    imp = rng.random(f)
    shared, rest = U.top_importance(imp, 8)
    partitions = {
        "random": (U.random_partition(f, e, seed=1), None),
        "kmeans": (U.kmeans_partition(ffn["wi"].T, e, seed=1), None),
        "importance": (U.importance_balanced_partition(imp, e), None),
        "shared+importance": (U.importance_balanced_partition(imp, e, neurons=rest), shared),
        "shared+random": (U.random_partition(rest, e, seed=2), shared),
    }
    for name, (partition, sh) in partitions.items():
        assert partition.shape == (e, (f - (0 if sh is None else len(sh))) // e), name
        np.testing.assert_array_equal(_split_sum(ffn, partition, sh, x, "relu"), dense, err_msg=name)
    # A GLU (SwiGLU) with float weights: equal up to the order of the float sums.
    ffn = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in _int_ffn(rng, d, f, glu=True).items()}
    dense = np.asarray(ffn_apply(ffn, x, "silu", *DENSE, jnp.float32))
    np.testing.assert_allclose(_split_sum(ffn, U.kmeans_partition(ffn["wg"].T, e), None, x, "silu"), dense,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exactly once"):
        U.split_ffn(ffn, U.random_partition(f, e)[:, :-1])


def test_upcycle_ffn_copies_and_noise():
    rng = np.random.default_rng(0)
    ffn = {"wi": rng.standard_normal((4, 8)), "wg": rng.standard_normal((4, 8)), "wo": rng.standard_normal((8, 4))}
    ex = U.upcycle_ffn(ffn, 3)
    for k in ffn:
        assert ex[k].shape == (3,) + ffn[k].shape
        for e in range(3):
            np.testing.assert_array_equal(ex[k][e], ffn[k].astype(np.float32))
    noisy = U.upcycle_ffn(ffn, 3, noise_std=0.1, seed=0)
    delta = noisy["wi"] - ex["wi"]
    assert not np.allclose(delta[0], delta[1])  # independent noise per expert
    assert 0.05 < np.std(delta) / np.std(ffn["wi"]) < 0.2
    np.testing.assert_array_equal(noisy["wi"], U.upcycle_ffn(ffn, 3, noise_std=0.1, seed=0)["wi"])


def test_balanced_kmeans_recovers_planted_clusters_and_is_deterministic():
    rng = np.random.default_rng(0)
    e, per, x = 4, 6, 10
    directions = np.linalg.qr(rng.standard_normal((x, e)))[0].T  # E orthonormal directions
    truth = np.repeat(np.arange(e), per)
    vectors = directions[truth] * rng.uniform(0.5, 2.0, (e * per, 1)) + 0.05 * rng.standard_normal((e * per, x))
    perm = rng.permutation(e * per)
    vectors, truth = vectors[perm], truth[perm]
    part = U.kmeans_partition(vectors, e, seed=3)
    assert part.shape == (e, per)
    found = sorted(tuple(sorted(set(truth[idx]))) for idx in part)
    assert found == [(c,) for c in range(e)]  # each expert is exactly one planted cluster
    # Balanced on random data, objective never increases, same seed -> same partition.
    v = rng.standard_normal((48, 5))
    assign, centroids, history = U.balanced_kmeans(v, 4, seed=7)
    assert np.bincount(assign, minlength=4).tolist() == [12] * 4 and centroids.shape == (4, 5)
    assert all(b <= a + 1e-9 for a, b in zip(history, history[1:]))
    np.testing.assert_array_equal(U.kmeans_partition(v, 4, seed=7), U.kmeans_partition(v, 4, seed=7))
    # The greedy assignment used above 4096 neurons is balanced too.
    U_MAX, U._SCIPY_MAX_NEURONS = U._SCIPY_MAX_NEURONS, 0
    try:
        greedy = U.balanced_kmeans(v, 4, seed=7)[0]
    finally:
        U._SCIPY_MAX_NEURONS = U_MAX
    assert np.bincount(greedy, minlength=4).tolist() == [12] * 4
    with pytest.raises(ValueError, match="multiple of num_experts"):
        U.balanced_kmeans(v[:47], 4)


def test_importance_balanced_partition_by_hand_and_bound():
    # importance 8..1 on ids 0..7, E=2: rounds (8,7)->e0,e1; (6,5)->e1,e0; (4,3)->e0,e1 (tie: index order);
    # (2,1)->e1,e0: totals 18 and 18.
    part = U.importance_balanced_partition(np.arange(8, 0, -1.0), 2)
    assert part.tolist() == [[0, 3, 4, 7], [1, 2, 5, 6]]
    rng = np.random.default_rng(0)
    imp = rng.exponential(size=64) ** 2
    part = U.importance_balanced_partition(imp, 8)
    totals = imp[part].sum(1)
    order = np.sort(imp)[::-1].reshape(8, 8)  # the rounds
    assert sorted(part.reshape(-1).tolist()) == list(range(64))
    assert totals.max() - totals.min() <= np.max(order[:, 0] - order[:, -1]) + 1e-12
    random_totals = imp[U.random_partition(64, 8, seed=0)].sum(1)
    assert totals.max() - totals.min() < random_totals.max() - random_totals.min()
    shared, rest = U.top_importance(imp, 8)
    assert set(shared) == set(np.argsort(-imp)[:8]) and len(rest) == 56


# ---------------------------------------------------------------------------------------- whole model

DENSE_CFG = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, d_ff=32, activation="silu", glu=True)
TOKENS = (jnp.arange(40).reshape(4, 10) * 7) % 32
MOE = dict(activation="silu", glu=True, dispatcher="dropless")


@pytest.fixture(scope="module")
def dense():
    model = Transformer(DENSE_CFG)
    variables = init_variables(model, jax.random.key(0), 10)
    logits = jax.jit(model.apply)(variables, TOKENS)[0]
    return variables["params"], logits


def _fresh(model, seed=1):
    """A stand-in for a fresh init without compiling one: N(0, 0.02) params of the right shapes, zero state."""
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), 10))
    rng = np.random.default_rng(seed)
    fill = lambda coll: jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape) if coll == "params"
                                                else np.zeros(s.shape)).astype(np.float32), shapes[coll])
    return {coll: fill(coll) for coll in shapes}


def _convert(dense_params, moe, opts, moe_every=1, importance=None):
    target = dataclasses.replace(DENSE_CFG, moe_every=moe_every, moe=moe)
    model = Transformer(target)
    variables, report = U.convert_variables(dense_params, DENSE_CFG, target, _fresh(model), opts, importance)
    return model, variables, report


@pytest.fixture(scope="module")
def importance(dense):
    """Taylor importances of the dense model's neurons over two identical one-token batches."""
    return U.taylor_importance(Transformer(DENSE_CFG), dense[0], [np.array([[3, 5]], np.int32)] * 2)


def test_upcycled_model_equals_dense(dense):
    """Identical experts and combine weights summing to one (Mixtral's renormalized top-2 with a random router):
    the upcycled model's logits are the dense model's."""
    params, ref = dense
    moe = MoEConfig(num_experts=4, k=2, router="mixtral", expert_hidden=32, **MOE)
    model, variables, report = _convert(params, moe, U.ConvertOptions("upcycle"), moe_every=2)
    assert [r["method"] for r in report] == ["copy", "upcycle"]
    kernel = variables["params"]["block_1"]["moe"]["router"]["gate"]["kernel"]
    assert np.std(kernel) > 0.01  # the fresh (random) router of the target is kept
    np.testing.assert_array_equal(variables["params"]["block_0"]["attn"]["query"]["kernel"],
                                  params["block_0"]["attn"]["query"]["kernel"])
    np.testing.assert_allclose(jax.jit(model.apply)(variables, TOKENS)[0], ref, rtol=1e-5, atol=1e-5)


def test_upcycled_layers_top1_scales_and_deepseek_unit_weight():
    """K=1 with softmax weights (Switch) is not function preserving: the layer computes p_top1(x) * FFN(x).
    DeepSeek's softmax scores with routed_scaling=E and a zero router give weight (1/E) * E = 1: exact."""
    rng = np.random.default_rng(0)
    ffn = {"wi": rng.standard_normal((8, 16)).astype(np.float32), "wo": rng.standard_normal((16, 8)).astype(np.float32)}
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    dense = ffn_apply(ffn, x, "gelu", *DENSE, jnp.float32)
    kernel = rng.standard_normal((8, 4)).astype(np.float32)
    cfg = MoEConfig(num_experts=4, k=1, router="switch", jitter_eps=0.0, expert_hidden=16, dispatcher="dropless")
    variables = {"params": {"router": {"gate": {"kernel": kernel}}, "experts": U.upcycle_ffn(ffn, 4)}}
    y, _ = jax.jit(MoELayer(cfg).apply)(variables, x)
    p_top1 = np.max(jax.nn.softmax(x @ kernel), axis=-1, keepdims=True)
    np.testing.assert_allclose(y, p_top1 * dense, rtol=1e-5, atol=1e-6)
    cfg = dataclasses.replace(cfg, router="deepseek", score_func="softmax", renormalize_top_k=False,
                              routed_scaling=4.0, bias_update_rate=0.0)
    variables["params"]["router"]["gate"]["kernel"] = np.zeros_like(kernel)
    y, _ = jax.jit(MoELayer(cfg).apply)({**variables, "moe_state": {"router": {"expert_bias": np.zeros(4, np.float32)}}}, x)
    np.testing.assert_allclose(y, dense, rtol=1e-6, atol=1e-6)


def test_split_model_with_unit_weights_equals_dense(dense, importance):
    """K = E experts and a zero softmax router: every weight is (1/E) / 1 * routed_scaling(E) = 1, so the split
    model computes the dense model, for random, k-means and importance partitions."""
    params, ref = dense
    moe = MoEConfig(num_experts=4, k=4, router="deepseek", score_func="softmax", routed_scaling=4.0,
                    bias_update_rate=0.0, expert_hidden=8, **MOE)
    apply = None
    for method in ("split_random", "split_kmeans", "split_importance"):
        model, variables, report = _convert(params, moe, U.ConvertOptions(method, router="zeros"),
                                            importance=importance)
        apply = apply or jax.jit(model.apply)  # one compile for the three (same shapes)
        assert all(sorted(sum(r["partition"], [])) == list(range(32)) for r in report)
        np.testing.assert_allclose(apply(variables, TOKENS)[0], ref, rtol=1e-5, atol=1e-5, err_msg=method)
    # k-means with the centroid router: column e = mean input (gate) vector of expert e's neurons.
    _, variables, report = _convert(params, dataclasses.replace(moe, k=2, routed_scaling=2.0),
                                    U.ConvertOptions("split_kmeans"))
    kernel = variables["params"]["block_0"]["moe"]["router"]["gate"]["kernel"]
    wg = np.asarray(params["block_0"]["ffn"]["wg"])
    np.testing.assert_allclose(kernel, np.stack([wg[:, p].mean(1) for p in report[0]["partition"]], 1), rtol=1e-6)
    assert report[0]["router"] == "centroids"


def test_inner_sharing_layer_equals_dense_ffn(dense, importance):
    """LLaMA-MoE inner sharing: the 8 most important neurons form the shared expert, the other 24 are split
    into 4 importance-balanced experts; with K = E and unit weights the MoE layer is the block's dense FFN."""
    params, _ = dense
    moe = MoEConfig(num_experts=4, k=4, router="deepseek", score_func="softmax", routed_scaling=4.0,
                    bias_update_rate=0.0, expert_hidden=6, num_shared_experts=1, shared_expert_hidden=8, **MOE)
    _, variables, report = _convert(params, moe, U.ConvertOptions("split_importance", router="zeros"),
                                    importance=importance)
    for r in report:
        imp = importance[r["block"]]
        assert set(r["shared"]) == set(np.argsort(-imp)[:8].tolist())
        totals = np.array(r["expert_importance"])
        assert totals.max() - totals.min() <= imp.max()
    x = np.random.default_rng(0).standard_normal((2, 10, 16)).astype(np.float32)
    layer = {"params": variables["params"]["block_0"]["moe"], "moe_state": variables["moe_state"]["block_0"]["moe"]}
    y, _ = jax.jit(MoELayer(moe).apply)(layer, x)
    expected = ffn_apply(params["block_0"]["ffn"], x, "silu", *DENSE, jnp.float32)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_taylor_importance_equals_the_weight_gradient_identity(dense, importance):
    """One token per sequence: I_n = |h_n dL/dh_n| = |sum_d wo[n, d] dL/dwo[n, d]| (dL/dwo = h^T dL/dy)."""
    params, _ = dense
    model = Transformer(DENSE_CFG)
    batch = np.array([[3, 5]], np.int32)  # B = 1, L = 1

    def loss(p):
        logits = model.apply({"params": p}, batch[:, :1])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    grads = jax.jit(jax.grad(loss))(params)
    for i in range(DENSE_CFG.num_layers):
        wo, g = params[f"block_{i}"]["ffn"]["wo"], grads[f"block_{i}"]["ffn"]["wo"]
        expected = 2 * np.abs(np.sum(np.asarray(wo) * np.asarray(g), axis=1))  # two identical batches
        np.testing.assert_allclose(importance[i], expected, rtol=2e-4, atol=1e-12)
        assert importance[i].shape == (32,) and np.all(importance[i] > 0)


def test_conversion_errors_name_the_field(dense):
    params, _ = dense
    moe = MoEConfig(num_experts=4, k=2, router="mixtral", expert_hidden=16, **MOE)
    with pytest.raises(ValueError, match=r"model\.moe\.expert_hidden=16 must equal the dense model\.d_ff=32"):
        _convert(params, moe, U.ConvertOptions("upcycle"))
    with pytest.raises(ValueError, match=r"4 \* 16 \+ 0 must equal 32. Set model\.moe\.expert_hidden=8"):
        _convert(params, moe, U.ConvertOptions("split_random"))
    with pytest.raises(ValueError, match=r"model\.moe\.glu=False"):
        _convert(params, dataclasses.replace(moe, glu=False, expert_hidden=32), U.ConvertOptions("upcycle"))
    with pytest.raises(ValueError, match="needs neuron importances"):
        _convert(params, dataclasses.replace(moe, expert_hidden=8), U.ConvertOptions("split_importance"))
    with pytest.raises(ValueError, match=r"init\.method: unknown 'upcyle'"):
        U.ConvertOptions.from_config({"method": "upcyle"})
    with pytest.raises(ValueError, match=r"init\.router: unknown"):
        U.ConvertOptions.from_config({"router": "kmeans"})
    other = dataclasses.replace(DENSE_CFG, d_model=32, moe_every=1, moe=dataclasses.replace(moe, expert_hidden=32))
    with pytest.raises(ValueError, match=r"model\.d_model=32 differs from the source model's 16"):
        U.convert_variables(params, DENSE_CFG, other, {"params": {}}, U.ConvertOptions("upcycle"))
    with pytest.raises(ValueError, match=r"init\.from_dir=.*holds no checkpoints/ folder"):
        U.read_run("/nonexistent/run")


def test_study_configs_validate_and_init_refs():
    from configs import compare_upcycle
    from moe_jax import train as train_lib
    from moe_jax.compare import model_configs, resolve_init_ref

    for spec in ("", "tiny", "tiny,3,5"):
        cmp_cfg = compare_upcycle.get_config(spec)
        configs = model_configs(cmp_cfg)
        for name, cfg in configs.items():
            train_lib.validate_config(cfg)
            assert (cfg.init.from_dir == "@dense") == (name in (
                "upcycle", "split_random", "split_kmeans", "split_importance", "split_shared"))
        assert cmp_cfg.base.train.ckpt_every == configs["upcycle"].init.step  # the dense checkpoint at N is kept
    assert compare_upcycle.get_config("tiny,3,5").base.train.steps == 8
    with pytest.raises(ValueError, match="write SIZE,N,M"):
        compare_upcycle.get_config("tiny,3")
    names = list(configs)
    cfg = configs["upcycle"]
    resolve_init_ref(cfg, "upcycle", names, "/runs", 0)
    assert cfg.init.from_dir == "/runs/dense/seed0"
    configs["dense"].init.from_dir = "@upcycle"
    with pytest.raises(ValueError, match=r"models\.dense\.init\.from_dir='@upcycle' must name a model listed before"):
        resolve_init_ref(configs["dense"], "dense", names, "/runs", 0)
    bad = configs["split_random"]
    bad.init.method = "splt"
    with pytest.raises(ValueError, match=r"init\.method: unknown 'splt'"):
        train_lib.validate_config(bad)


# ------------------------------------------------------------------------------------ the study, end to end


def _corpus(tmp_path) -> str:
    rng = np.random.default_rng(0)
    words = "to be or not to be that is the question whether tis nobler in the mind".split()
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(300)))
    return str(path)


N = 4
OVERRIDES = {"data.seq_len": 32, "model.d_model": 32, "train.eval_batches": 1, "train.log_every": 2}


def _val(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r["split"] == "val"}


def test_upcycle_study_tiny_end_to_end(tmp_path):
    """experiments/compare.py --config configs/compare_upcycle.py:tiny,4,4 (one CPU device, compile cache on):
    every model trains, converted runs start at the dense run's step N from its checkpoint, the upcycled model's
    first validation loss equals the dense model's at N, the clocks carry over, and the table and plots exist.
    Then experiments/upcycle.py's conversion writes a checkpoint that train() can restore."""
    corpus, workdir = _corpus(tmp_path), tmp_path / "study"
    flags = [f"--config.base.{k}={v}" for k, v in {**OVERRIDES, "data.corpus": corpus,
                                                     "data.cache_dir": tmp_path / "cache"}.items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               # one device, and a cheaper XLA compile (these runs are a few steps long)
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "compare.py"),
           "--config", os.path.join(ROOT, f"configs/compare_upcycle.py:tiny,{N},{N}"), "--workdir", str(workdir)]
    proc = subprocess.run(cmd + flags, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = ["dense", "upcycle", "split_random", "split_kmeans", "split_importance", "split_shared",
             "upcycle_scratch", "split_scratch"]
    table = (workdir / "results.md").read_text()
    for name in names:
        assert f"| {name} |" in table
    for png in ("val_loss_vs_steps.png", "val_loss_vs_flops.png", "val_loss_vs_time.png", "expert_load.png"):
        assert (workdir / png).stat().st_size > 0
    run = lambda name: str(workdir / name / "seed0")
    dense_val = _val(run("dense"))
    for name in names[1:6]:
        val = _val(run(name))
        assert min(val) == N and max(val) == 2 * N, name  # starts at the dense checkpoint's step
        assert val[N]["flops"] == pytest.approx(dense_val[N]["flops"], rel=1e-9)  # the dense steps' FLOPs
        assert val[N]["elapsed_s"] >= dense_val[N]["elapsed_s"]
        report = json.loads((workdir / name / "seed0" / "init_report.json").read_text())
        assert report["source_step"] == N and report["from_dir"] == run("dense")
    assert min(_val(run("upcycle_scratch"))) < N  # scratch runs start at 0
    # Upcycling preserves the function: the converted model's loss at N is the dense model's.
    assert _val(run("upcycle"))[N]["loss"] == pytest.approx(dense_val[N]["loss"], abs=1e-5)
    # Inner sharing: the shared neurons are the most important; importance-balanced experts are balanced.
    report = json.loads((workdir / "split_shared" / "seed0" / "init_report.json").read_text())
    for block in report["blocks"]:
        imp = np.array(block["importance"])
        assert set(block["shared"]) == set(np.argsort(-imp)[: len(block["shared"])].tolist())
        totals = np.array(block["expert_importance"])
        assert totals.max() - totals.min() <= imp.max() + 1e-9
        assert block["shared_importance"] / len(block["shared"]) >= totals.max() / len(block["partition"][0])

    # experiments/upcycle.py: the same conversion written as a checkpoint that train() restores.
    from configs import compare_upcycle
    from experiments.upcycle import upcycle_checkpoint
    from moe_jax import train as train_lib
    from moe_jax.compare import model_configs

    cfg = model_configs(compare_upcycle.get_config(f"tiny,{N},{N}"))["upcycle"]
    for key, value in {**OVERRIDES, "data.corpus": corpus, "data.cache_dir": str(tmp_path / "cache")}.items():
        section, field = key.split(".")
        cfg[section][field] = value
    step, _ = upcycle_checkpoint(cfg, run("dense"), str(tmp_path / "cli"), method="upcycle", step=N)
    assert step == N
    source, converted = U.read_run(run("dense"), N), U.read_run(str(tmp_path / "cli"))
    assert converted.step == N and converted.data_state == source.data_state
    assert converted.meta["flops"] == source.meta["flops"]
    experts = converted.params["block_1"]["moe"]["experts"]["wi"]
    np.testing.assert_array_equal(experts, np.repeat(source.params["block_1"]["ffn"]["wi"][None], 8, 0))
    # train()'s own restore path accepts it (same abstract state as a fresh run of this config).
    model_cfg = train_lib.validate_config(cfg, 256)
    model, (tx, _) = Transformer(model_cfg), train_lib.make_optimizer(cfg.train)
    abstract = jax.eval_shape(lambda: train_lib.create_state(model, tx, jax.random.key(0), 32))
    mngr = train_lib._checkpoint_manager(str(tmp_path / "cli"), 3)
    state = train_lib.restore_latest(mngr, abstract)[0]
    assert int(state.step) == N
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(state.opt_state))  # reset: zeros, count 0
    with pytest.raises(ValueError, match="already holds checkpoints"):
        upcycle_checkpoint(cfg, run("dense"), str(tmp_path / "cli"))
    # init.method='copy' with restart_step: the dense params themselves, at step 0, data order from the start.
    dense_cfg = source.model_config()
    initial = U.initial_from_source({"from_dir": run("dense"), "step": N, "method": "copy", "restart_step": True},
                                    dense_cfg, {"params": source.params})
    assert (initial.step, initial.data_state, initial.meta) == (0, None, {"elapsed_s": 0.0, "flops": 0.0})
    jax.tree.map(np.testing.assert_array_equal, initial.variables["params"], source.params)
