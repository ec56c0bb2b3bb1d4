"""Cached decoding (moe_jax/decode.py) against the uncached full forward: same greedy tokens, same logits."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import decode
from moe_jax.model import ModelConfig, Transformer, init_variables
from moe_jax.moe import MoEConfig

V = 64


def _model(kind: str, **kw):
    moe = {
        "dense": None,
        # capacity dispatchers in training; decoding must route dropless anyway
        "top1": MoEConfig(num_experts=4, k=1, router="switch", expert_hidden=32, dispatcher="scatter",
                          capacity_factor=0.5, eval_capacity_factor=0.5),
        "top2": MoEConfig(num_experts=4, k=2, router="mixtral", expert_hidden=32, dispatcher="einsum",
                          slot_order="token_major", eval_capacity_factor=0.5),
    }[kind]
    cfg = ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, d_ff=64,
                      moe_every=0 if moe is None else 2, moe=moe, **kw)
    model = Transformer(cfg)
    return model, init_variables(model, jax.random.key(1), 8)


PROMPTS = [[5, 9, 1, 33, 2], [7], [40, 41, 42]]  # ragged: right-padded rows of lengths 5, 1, 3


@pytest.mark.parametrize("kind", ["dense", "top2"])  # top-1 MoE: test_greedy_cached_equals_uncached
def test_cached_logits_equal_full_forward(kind):
    """Prefill logits and every decode step's logits equal the full forward over the final sequences."""
    model, variables = _model(kind)
    dec = decode.decode_model(model)
    n = 6
    tokens, lengths, m = decode.pad_prompts(PROMPTS, n, None, V)
    assert m == 5 + n
    prefill = jax.jit(lambda v, t, c: decode.prefill(dec, v, t, c))
    step = jax.jit(lambda v, t, p, c: decode.decode_step(dec, v, t, p, c))
    logits, cache = prefill(variables, jnp.asarray(tokens), decode.init_cache(dec, 3, m))
    seqs = tokens.copy()
    step_logits = []
    last = np.asarray(logits)[np.arange(3), lengths - 1]
    for i in range(n):
        tok = np.argmax(last, axis=-1).astype(np.int32)
        seqs[np.arange(3), lengths + i] = tok
        out, cache = step(variables, jnp.asarray(tok), jnp.asarray(lengths + i), cache)
        last = np.asarray(out)
        step_logits.append(last)
    full, _ = jax.jit(dec.apply)(variables, jnp.asarray(seqs))  # [B, M, V]: the uncached forward of what was decoded
    full = np.asarray(full)
    for b, length in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(logits)[b, :length], full[b, :length], atol=1e-5, rtol=0)
        for i in range(n):
            np.testing.assert_allclose(step_logits[i][b], full[b, length + i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["dense", "top1", "top2"])
def test_greedy_cached_equals_uncached(kind):
    model, variables = _model(kind)
    for n in (1, 4, 9):  # one compiled shape (max_len=14) for all lengths: the step count is traced
        cached = decode.generate(model, variables, PROMPTS, n, max_len=14).tokens
        ref = decode.generate_uncached(model, variables, PROMPTS, n, max_len=14).tokens
        assert cached.shape == (3, n)
        np.testing.assert_array_equal(cached, ref)
    # each row decodes as it would alone (padding never seen)
    alone = decode.generate(model, variables, [PROMPTS[1]], 9, max_len=14).tokens
    np.testing.assert_array_equal(alone[0], cached[1])


def test_sampled_cached_equals_uncached_and_gqa():
    """Same draws (fold_in(seed, step)) in both loops; grouped-query attention (2 kv heads for 4 heads)."""
    model, variables = _model("top2", num_kv_heads=2)
    s = decode.Sampling(temperature=0.9, top_k=20, top_p=0.9)
    a = decode.generate(model, variables, PROMPTS, 7, s, seed=3).tokens
    b = decode.generate_uncached(model, variables, PROMPTS, 7, s, seed=3).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, decode.generate(model, variables, PROMPTS, 7, s, seed=4).tokens)


def test_decode_model_keeps_the_param_tree():
    model, variables = _model("top1")
    dec = decode.decode_model(model)
    assert dec.config.moe.dispatcher == "dropless" and dec.config.moe.group_size is None
    tree = jax.eval_shape(lambda: init_variables(dec, jax.random.key(1), 8))
    assert jax.tree.structure(tree) == jax.tree.structure(variables)
    assert jax.tree.map(lambda x: x.shape, tree) == jax.tree.map(lambda x: x.shape, variables)


def test_sample_logits_by_hand():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 200)
    draw = lambda s: np.asarray(jax.jit(jax.vmap(lambda k: decode.sample_logits(logits, k, s)[0]))(keys))
    assert int(decode.sample_logits(logits, keys[0], decode.Sampling(temperature=0.0))[0]) == 0
    assert set(draw(decode.Sampling(top_k=2))) == {0, 1}  # the two most likely
    # top_p=0.7: 0.5 alone < 0.7, 0.5 + 0.3 reaches it -> tokens {0, 1}; top_p=0.45 -> token 0 alone
    assert set(draw(decode.Sampling(top_p=0.7))) == {0, 1}
    assert set(draw(decode.Sampling(top_p=0.45))) == {0}
    assert len(set(draw(decode.Sampling()))) >= 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[[1, 2], []]), r"prompt: prompt 1 is empty"),
    (dict(prompts=[[1] * 9], max_len=8), r"max_len=8: a prompt holds 9 tokens"),
    (dict(prompts=[[1] * 4], max_len=8, num_new=5), r"max_len=8 is too short"),
    (dict(prompts=[[1, V]]), r"prompt 0: token ids must lie in \[0, 64\)"),
])
def test_bad_prompts(kwargs, match):
    kwargs = {"num_new": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        decode.pad_prompts(kwargs["prompts"], kwargs["num_new"], kwargs.get("max_len"), V)


@pytest.mark.parametrize("spec, match", [
    ("temprature=0.5", r"sampling: unknown option 'temprature=0.5'"),
    ("top_k=-1", r"sampling\.top_k"), ("top_p=0", r"sampling\.top_p"), ("temperature=x", r"sampling\.temperature"),
])
def test_bad_sampling(spec, match):
    with pytest.raises(ValueError, match=match):
        decode.Sampling.parse(spec)
    assert decode.Sampling.parse("greedy").greedy
    assert decode.Sampling.parse("temperature=0.5,top_k=3") == decode.Sampling(0.5, 3, 1.0)


def test_non_token_choice_router_refused():
    cfg = ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, d_ff=64, moe_every=2,
                      moe=MoEConfig(num_experts=4, k=1, router="expert_choice", expert_hidden=32,
                                    allow_non_causal=True))
    with pytest.raises(ValueError, match=r"model\.moe\.router='expert_choice'"):
        decode.decode_model(Transformer(cfg))


def test_non_token_choice_router_decodes_uncached():
    """Expert choice cannot cache; sample_text (the trainer's end-of-run sample) falls back to the uncached loop."""
    from moe_jax.data import ByteTokenizer
    cfg = ModelConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=4, d_ff=64, moe_every=2,
                      moe=MoEConfig(num_experts=4, k=1, router="expert_choice", expert_hidden=32,
                                    allow_non_causal=True))
    model = Transformer(cfg)
    assert not decode.can_cache(model)
    variables = init_variables(model, jax.random.key(1), 8)
    text, gen = decode.sample_text(model, variables, ByteTokenizer(), "ab", 3, sampling=decode.Sampling(0.0))
    assert gen.tokens.shape == (1, 3)
