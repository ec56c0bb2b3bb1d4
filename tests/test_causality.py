"""Causality of the MoE layer in a decoder: the output at position t must not depend on tokens after t.

For every router in the registry that declares ``causal = True``, with ``slot_order='token_major'`` and a
capacity small enough that half of the assignments are dropped, we replace the tokens after position t by
unrelated ones (for every t) and check that the outputs at positions <= t do not move, in evaluation and in
training (same 'router' rng). The same harness must *detect* the leak of expert choice (non-causal) and of
choice-major slot order with K=2 -- otherwise it would prove nothing.
"""
import importlib
import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import routing
from moe_jax.moe import MoEConfig, MoELayer

if importlib.util.find_spec("moe_jax.routers") is not None:  # routers added by other modules register too
    importlib.import_module("moe_jax.routers")

B, L, D, E = 2, 8, 8, 4

# Per-router config tweaks for routers that need more than num_experts/k (none so far).
CONFIG_OVERRIDES = {}


def _config(name, **kw):
    """A valid causal config for router ``name`` with heavy capacity drops (cf 0.5: C = ceil(0.5*K*8/4) = K)."""
    base = dict(num_experts=E, router=name, expert_hidden=8, dispatcher="scatter", slot_order="token_major",
                capacity_factor=0.5, eval_capacity_factor=0.5, router_init_std=1.0)
    base.update(CONFIG_OVERRIDES.get(name, {}))
    base.update(kw)
    errors = []
    for k in ([base.pop("k")] if "k" in base else [2, 1]):
        cfg = MoEConfig(k=k, **base)
        try:
            return cfg.validate(causal=True)
        except ValueError as err:
            errors.append(str(err))
    pytest.fail(f"no causal test config for router {name!r}; add one to CONFIG_OVERRIDES: {errors}")


def _init(layer, x, ids):
    """Variables for ``layer``. Compiling ``layer.init`` costs more than the apply (initializers plus a full
    forward pass), so float params are drawn here with numpy (std 1/sqrt(fan-in): router logits ~ N(0, 1),
    diverse routing) into the structure from ``jax.eval_shape``. A router with non-float or non-param state
    gets its real init."""
    def init(k):
        return layer.init({"params": k, "router": k}, x, token_ids=ids)

    shapes = jax.eval_shape(init, jax.random.key(1))
    leaves = jax.tree_util.tree_leaves(shapes)
    if set(shapes) != {"params"} or not all(jnp.issubdtype(a.dtype, jnp.floating) for a in leaves):
        return jax.jit(init)(jax.random.key(1))
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(rng.normal(size=a.shape) / math.sqrt(a.shape[-2] if len(a.shape) >= 2 else 1),
                              a.dtype), shapes)


def _leak(cfg, modes=(False,)):
    """Max |change| of the outputs at positions <= t (``before``) and > t (``after``) over all t, for each
    ``train`` value in ``modes``, plus the smallest drop fraction seen. One compile."""
    layer = MoELayer(cfg, causal=True)
    kx, ka, ki, kj = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (B, L, D))
    x_alt = 3.0 * jax.random.normal(ka, (B, L, D))
    ids = jax.random.randint(ki, (B, L), 0, 50)
    ids_alt = jax.random.randint(kj, (B, L), 0, 50)
    variables = _init(layer, x, ids)
    extra = [c for c in variables if c != "params"]

    def apply(x, ids, train):
        out = layer.apply(variables, x, train=train, token_ids=ids, rngs={"router": jax.random.key(2)},
                          mutable=extra or False)
        return out[0] if extra else out

    # Row t of `after_t` marks the positions after t; the last row (t = L-1) changes nothing: the original.
    after_t = jnp.arange(L)[None, :] > jnp.arange(L)[:, None]  # [L, L]

    @jax.jit
    def run():
        result = {}
        for train in modes:
            xs = jnp.where(after_t[:, None, :, None], x_alt[None], x[None])  # [L, B, L, D]
            idss = jnp.where(after_t[:, None, :], ids_alt[None], ids[None])
            ys, stats = jax.vmap(lambda a, b: apply(a, b, train))(xs, idss)  # [L, B, L, D]
            diff = jnp.max(jnp.abs(ys - ys[-1:]), axis=(1, 3))  # [L, L]: change at each position
            result[train] = (jnp.max(jnp.where(after_t, 0.0, diff)), jnp.max(jnp.where(after_t, diff, 0.0)),
                             jnp.min(stats.metrics["drop_fraction"]))
        return result

    return {train: tuple(float(v) for v in vals) for train, vals in run().items()}


CAUSAL_ROUTERS = [n for n in routing.router_names() if routing.get_router_class(n).causal]


def test_registry_has_causal_and_non_causal_routers():
    assert {"top_k", "switch", "gshard", "mixtral", "noisy_top_k"} <= set(CAUSAL_ROUTERS)
    assert "expert_choice" not in CAUSAL_ROUTERS


# Routers with randomness in training (jitter, noise, GShard's random 2nd expert) are checked in training
# mode, whose path contains the evaluation one plus the random draws (same 'router' rng for both inputs);
# top_k and mixtral have no randomness and are checked in evaluation. Routers added later: both modes.
TRAIN_ONLY = {"switch", "noisy_top_k", "gshard"}
EVAL_ONLY = {"top_k", "mixtral"}


@pytest.mark.parametrize("name", CAUSAL_ROUTERS)
def test_causal_router_token_major_is_causal(name):
    cfg = _config(name, **({"second_policy": "random"} if name == "gshard" else {}))
    modes = (True,) if name in TRAIN_ONLY else (False,) if name in EVAL_ONLY else (False, True)
    for train, (before, after, drops) in _leak(cfg, modes).items():
        assert drops > 0.05, f"{name}: the test needs capacity drops (train={train})"
        assert after > 1e-3, f"{name}: changing later tokens changed nothing; the check would be vacuous"
        assert before < 1e-6, f"{name} leaks the future (train={train}): max change {before} at positions <= t"


def test_groups_inside_a_sequence_are_causal():
    # group_size=4 divides L=8: each sequence is two groups; a token competes only with earlier tokens of its
    # own group, so the layer stays causal.
    before, after, drops = _leak(_config("top_k", k=2, group_size=4))[False]
    assert drops > 0.2 and after > 1e-3
    assert before < 1e-6


def test_groups_spanning_sequences_leak_across_the_batch():
    # group_size=16 = B*L: one group holds both sequences, and sequence 0's later tokens take expert slots
    # before sequence 1's earlier tokens, so sequence 1's output at position t depends on sequence 0's
    # tokens after t. A causal MoELayer therefore refuses a group size that does not divide L; with the explicit
    # opt-in the leak is real.
    x = jnp.zeros((B, L, D))
    with pytest.raises(ValueError, match="group_size"):
        MoELayer(_config("top_k", k=2, group_size=B * L), causal=True).init(jax.random.key(0), x)
    before, after, drops = _leak(_config("top_k", k=2, group_size=B * L, allow_non_causal=True))[False]
    assert drops > 0.2
    assert before > 1e-3


def test_expert_choice_is_detected_as_non_causal():
    with pytest.raises(ValueError, match="non-causal"):
        MoEConfig(router="expert_choice", k=1).validate(causal=True)
    cfg = _config("expert_choice", k=1, allow_non_causal=True)
    before, after, drops = _leak(cfg)[False]
    assert before > 1e-3, "expert choice should leak the future, but the check saw no leak"


def test_choice_major_k2_with_drops_is_detected_as_non_causal():
    with pytest.raises(ValueError, match="token_major"):
        MoEConfig(router="top_k", k=2, slot_order="choice_major", dispatcher="scatter").validate(causal=True)
    cfg = _config("top_k", k=2, slot_order="choice_major", allow_non_causal=True)
    before, after, drops = _leak(cfg)[False]
    assert drops > 0.2
    assert before > 1e-3, "choice-major K=2 with drops should leak the future, but the check saw no leak"


def test_choice_major_k2_leak_hand_example():
    """Why MoEConfig.validate(causal=True) refuses choice_major with K=2 and a capacity.

    E=2, K=2, S=2, C = ceil(0.5 * 2 * 2 / 2) = 1; gate kernel = I, so logits = x.
    t0 = [1, 0] picks (e0, e1). Two futures for t1:
      A: t1 = [0, 1] picks (e1, e0). choice_major: k=0: t0->e0 #0, t1->e1 #0; k=1: t0->e1 #1 DROPPED.
         y[t0] = w0 * E0(t0)
      B: t1 = [1, 0] picks (e0, e1). choice_major: k=0: t0->e0 #0, t1->e0 #1 dropped; k=1: t0->e1 #0 kept.
         y[t0] = w0 * E0(t0) + w1 * E1(t0)
    So token 0's output depends on token 1. token_major serves t0 fully first: y[t0] is the same in A and B.
    """
    x = jnp.asarray([[[1.0, 0.0], [0.0, 1.0]],   # future A (batch row 0)
                     [[1.0, 0.0], [1.0, 0.0]]])  # future B (batch row 1); each row is its own group
    layers = {}
    for order in ["choice_major", "token_major"]:
        cfg = MoEConfig(num_experts=2, k=2, router="top_k", expert_hidden=4, dispatcher="einsum",
                        eval_capacity_factor=0.5, slot_order=order, allow_non_causal=True)
        layers[order] = MoELayer(cfg, causal=True)
    variables = _init(layers["token_major"], x, None)  # same param structure for both orders
    variables["params"]["router"]["gate"]["kernel"] = jnp.eye(2)
    outs = jax.jit(lambda v, x: {o: layer.apply(v, x) for o, layer in layers.items()})(variables, x)
    for order, (y, stats) in outs.items():
        np.testing.assert_allclose(stats.metrics["drop_fraction"], 0.5)  # 4 of 8 assignments dropped
    cm, tm = outs["choice_major"][0], outs["token_major"][0]
    assert float(jnp.max(jnp.abs(cm[0, 0] - cm[1, 0]))) > 1e-4, "choice_major: token 0 should see token 1"
    np.testing.assert_array_equal(tm[0, 0], tm[1, 0])
    np.testing.assert_allclose(tm[0, 0], cm[1, 0], atol=1e-6)  # future B leaves t0 fully served
    assert float(jnp.max(jnp.abs(tm[0, 0]))) > 1e-4
