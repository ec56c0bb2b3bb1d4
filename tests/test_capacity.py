"""compute_capacity (the formula, with K) and assign_slots (who gets a slot when an expert overflows)."""
import numpy as np
import pytest

import jax.numpy as jnp

from moe_jax.capacity import assign_slots, compute_capacity


# ------------------------------------------------------------------------------------------ compute_capacity


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        # C = ceil(cf * K * S / E): 1.0 * 1 * 8 / 4 = 2
        (dict(group_size=8, num_experts=4, k=1, capacity_factor=1.0), 2),
        # the K is in the formula: 1.0 * 2 * 8 / 4 = 4 (not 2)
        (dict(group_size=8, num_experts=4, k=2, capacity_factor=1.0), 4),
        # ceil(1.25 * 1 * 8 / 4) = ceil(2.5) = 3
        (dict(group_size=8, num_experts=4, k=1, capacity_factor=1.25), 3),
        # 1.25 * 2 * 8 / 4 = 5 exactly; float noise must not round it up to 6
        (dict(group_size=8, num_experts=4, k=2, capacity_factor=1.25), 5),
        # 0.1 * 3 * 20 / 2 = 3.0000000000000004 in floats; must be 3, not 4
        (dict(group_size=20, num_experts=2, k=3, capacity_factor=0.1), 3),
        # 3 rounded up to a multiple of 4 -> 4
        (dict(group_size=8, num_experts=4, k=1, capacity_factor=1.25, capacity_multiple=4), 4),
        # 2 rounded up to a multiple of 2 stays 2
        (dict(group_size=8, num_experts=4, k=1, capacity_factor=1.0, capacity_multiple=2), 2),
        # ceil(0.1 * 1 * 8 / 4) = ceil(0.2) = 1; min_capacity=3 lifts it to 3
        (dict(group_size=8, num_experts=4, k=1, capacity_factor=0.1, min_capacity=3), 3),
        # at most S: 2.0 * 2 * 4 / 2 = 8 slots, but a group has only 4 tokens -> 4
        (dict(group_size=4, num_experts=2, k=2, capacity_factor=2.0), 4),
        # the cap at S also wins over min_capacity (documented order: round, min, cap)
        (dict(group_size=4, num_experts=8, k=1, capacity_factor=1.0, min_capacity=6), 4),
        # tiny factor: ceil(0.01 * 1 * 8 / 4) = 1 (default min_capacity 1)
        (dict(group_size=8, num_experts=4, k=1, capacity_factor=0.01), 1),
    ],
)
def test_compute_capacity_examples(kwargs, expected):
    assert compute_capacity(**kwargs) == expected
    assert isinstance(compute_capacity(**kwargs), int)


@pytest.mark.parametrize("cf", [0.0, -1.0, None])
def test_compute_capacity_rejects_nonpositive_factor(cf):
    with pytest.raises(ValueError, match="capacity_factor"):
        compute_capacity(8, 4, 1, cf)


def test_compute_capacity_rejects_bad_rounding():
    with pytest.raises(ValueError, match="capacity_multiple"):
        compute_capacity(8, 4, 1, 1.0, capacity_multiple=0)
    with pytest.raises(ValueError, match="min_capacity"):
        compute_capacity(8, 4, 1, 1.0, min_capacity=0)


# ---------------------------------------------------------------------------------------------- assign_slots

# One group, S = 4 tokens, K = 2 choices, E = 2 experts:
#   t0 -> (e0, e1), t1 -> (e0, e1), t2 -> (e1, e0), t3 -> (e0, e1)
_EXPERTS = np.array([[[0, 1], [0, 1], [1, 0], [0, 1]]], np.int32)  # [G=1, S=4, K=2]
_ALL_VALID = np.ones((1, 4, 2), bool)


@pytest.mark.parametrize("method", ["cumsum", "sort"])
def test_assign_slots_choice_major(method):
    slot = np.asarray(assign_slots(jnp.asarray(_EXPERTS), jnp.asarray(_ALL_VALID), 2, slot_order="choice_major",
                                   method=method))
    # All first choices first, earlier tokens first:
    #   k=0: t0->e0 #0, t1->e0 #1, t2->e1 #0, t3->e0 #2
    #   k=1: t0->e1 #1, t1->e1 #2, t2->e0 #3, t3->e1 #3
    expected = np.array([[[0, 1], [1, 2], [0, 3], [2, 3]]])
    np.testing.assert_array_equal(slot, expected)
    # With C = 2, kept = slot < 2: t0 keeps both, t1 and t2 only their first choice, t3 nothing (its first
    # choice came third to e0).
    kept = slot < 2
    np.testing.assert_array_equal(kept, [[[True, True], [True, False], [True, False], [False, False]]])


@pytest.mark.parametrize("method", ["cumsum", "sort"])
def test_assign_slots_token_major(method):
    slot = np.asarray(assign_slots(jnp.asarray(_EXPERTS), jnp.asarray(_ALL_VALID), 2, slot_order="token_major",
                                   method=method))
    # Token by token, each token's choices in rank order:
    #   t0: e0 #0, e1 #0;  t1: e0 #1, e1 #1;  t2: e1 #2, e0 #2;  t3: e0 #3, e1 #3
    expected = np.array([[[0, 0], [1, 1], [2, 2], [3, 3]]])
    np.testing.assert_array_equal(slot, expected)


@pytest.mark.parametrize("method", ["cumsum", "sort"])
def test_assign_slots_first_choices_before_second_choices(method):
    # E=2, K=2, C=1. t0 -> (e0, e1), t1 -> (e1, e0).
    # choice_major: k=0: t0->e0 #0, t1->e1 #0; k=1: t0->e1 #1 (dropped), t1->e0 #1 (dropped).
    #   The later token's first choice beats the earlier token's second choice.
    # token_major: t0->e0 #0, t0->e1 #0, t1->e1 #1 (dropped), t1->e0 #1 (dropped).
    idx = jnp.asarray([[[0, 1], [1, 0]]], jnp.int32)
    valid = jnp.ones((1, 2, 2), bool)
    cm = np.asarray(assign_slots(idx, valid, 2, slot_order="choice_major", method=method))
    tm = np.asarray(assign_slots(idx, valid, 2, slot_order="token_major", method=method))
    np.testing.assert_array_equal(cm, [[[0, 1], [0, 1]]])
    np.testing.assert_array_equal(tm, [[[0, 0], [1, 1]]])


@pytest.mark.parametrize("method", ["cumsum", "sort"])
def test_assign_slots_invalid_take_no_slot(method):
    valid = _ALL_VALID.copy()
    valid[0, 1, :] = False  # t1 is padding
    valid[0, 2, 1] = False  # t2's second choice does not exist (dynamic k)
    slot = np.asarray(assign_slots(jnp.asarray(_EXPERTS), jnp.asarray(valid), 2, slot_order="choice_major",
                                   method=method))
    # k=0: t0->e0 #0, t2->e1 #0, t3->e0 #1;  k=1: t0->e1 #1, t3->e1 #2
    assert slot[0, 0, 0] == 0 and slot[0, 2, 0] == 0 and slot[0, 3, 0] == 1
    assert slot[0, 0, 1] == 1 and slot[0, 3, 1] == 2
    # invalid assignments get a position that is never < any capacity <= S
    assert (slot[0, 1] > 4).all() and slot[0, 2, 1] > 4


@pytest.mark.parametrize("method", ["cumsum", "sort"])
def test_assign_slots_groups_are_independent(method):
    # Two groups; group 1 is group 0 with tokens reversed. Slots count per group.
    idx = np.concatenate([_EXPERTS, _EXPERTS[:, ::-1]], axis=0)  # [2, 4, 2]
    slot = np.asarray(assign_slots(jnp.asarray(idx), jnp.ones((2, 4, 2), bool), 2, slot_order="choice_major",
                                   method=method))
    np.testing.assert_array_equal(slot[0], [[0, 1], [1, 2], [0, 3], [2, 3]])
    # group 1 tokens: u0=(e0,e1) u1=(e1,e0) u2=(e0,e1) u3=(e0,e1)
    #   k=0: u0->e0 #0, u1->e1 #0, u2->e0 #1, u3->e0 #2; k=1: u0->e1 #1, u1->e0 #3, u2->e1 #2, u3->e1 #3
    np.testing.assert_array_equal(slot[1], [[0, 1], [0, 3], [1, 2], [2, 3]])


@pytest.mark.parametrize("method", ["cumsum", "sort"])
def test_assign_slots_batch_priority(method):
    # K=1, all four tokens want e0. priority [0.1, 0.9, 0.5, 0.3] -> order t1, t2, t3, t0.
    idx = jnp.zeros((1, 4, 1), jnp.int32)
    prio = jnp.asarray([[0.1, 0.9, 0.5, 0.3]])
    slot = np.asarray(assign_slots(idx, jnp.ones((1, 4, 1), bool), 2, priority=prio, method=method))
    np.testing.assert_array_equal(slot[0, :, 0], [3, 0, 1, 2])
    # K=2 with priority is still choice-major among the re-ordered tokens:
    #   order t1, t2, t3, t0. k=0: t1->e0 #0, t2->e1 #0, t3->e0 #1, t0->e0 #2
    #                        k=1: t1->e1 #1, t2->e0 #3, t3->e1 #2, t0->e1 #3
    slot2 = np.asarray(assign_slots(jnp.asarray(_EXPERTS), jnp.asarray(_ALL_VALID), 2, priority=prio,
                                    method=method))
    np.testing.assert_array_equal(slot2[0], [[2, 3], [0, 1], [0, 3], [1, 2]])


def test_assign_slots_rejects_unknown_order():
    with pytest.raises(ValueError, match="slot_order"):
        assign_slots(jnp.asarray(_EXPERTS), jnp.asarray(_ALL_VALID), 2, slot_order="random")
    with pytest.raises(ValueError, match="method"):
        assign_slots(jnp.asarray(_EXPERTS), jnp.asarray(_ALL_VALID), 2, method="scan")


@pytest.mark.parametrize("slot_order", ["choice_major", "token_major"])
@pytest.mark.parametrize("num_experts", [5, 40])  # 40 >= SORT_FROM_EXPERTS: 'auto' sorts
def test_assign_slots_sort_equals_cumsum(slot_order, num_experts):
    # The two ways of counting an assignment's rank within its expert agree on random routings with padding,
    # missing ranks, ties in the priority, and experts that get nothing; 'auto' agrees with both.
    rng = np.random.default_rng(num_experts)
    g, s, k = 3, 24, 2
    idx = jnp.asarray(rng.integers(0, num_experts, (g, s, k)), jnp.int32)
    valid = jnp.asarray(rng.random((g, s, k)) < 0.8)
    prio = jnp.asarray(rng.integers(0, 4, (g, s)).astype(np.float32))  # many ties: stable order decides
    for priority in (None, prio):
        got = {m: np.asarray(assign_slots(idx, valid, num_experts, priority, slot_order, method=m))
               for m in ("cumsum", "sort", "auto")}
        np.testing.assert_array_equal(got["sort"], got["cumsum"])
        np.testing.assert_array_equal(got["auto"], got["cumsum"])
        # and each expert's valid slots are exactly 0..n_e-1 within a group
        for gi in range(g):
            for e in range(num_experts):
                mine = got["sort"][gi][np.asarray(valid[gi]) & (np.asarray(idx[gi]) == e)]
                np.testing.assert_array_equal(np.sort(mine), np.arange(mine.size))
