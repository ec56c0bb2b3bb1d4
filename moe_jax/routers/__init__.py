"""Routers beyond ``routing.py``, one module per family: ``balanced`` (BASE, S-BASE), ``hash``, ``soft_moe``,
``deepseek``, ``batch_prioritized``, ``dynamic_k`` (top-p, confidence).

Axes (see ``moe_jax.moe``): ``G`` groups, ``S`` tokens per group, ``D`` model width, ``E`` experts,
``K`` experts per token (``K_max`` for the dynamic-k routers), ``C`` capacity (Soft MoE: slots per expert).

Every router here registers itself in ``routing``'s registry (``MoEConfig.router = name``); ``moe.py``
imports this package once so that the names exist. Shapes and conventions are those of ``routing.py``:
token-choice decisions are ``[G, S, K]``, ranks a router does not use are ``valid=False``, and capacity
drops are decided later by ``capacity.assign_slots`` (so the capacity dispatchers and dropless all work).

==================  =======  ======================================  =========================================
name                causal   aux losses (besides Switch LB, z-loss)  reference
==================  =======  ======================================  =========================================
base                no       -                                       Lewis et al. 2021 (BASE layers)
sinkhorn            no       -                                       Clark et al. 2022 (S-BASE)
hash                yes      -                                       Roller et al. 2021 (Hash layers)
soft_moe            no       -                                       Puigcerver et al. 2023 (Soft MoE)
deepseek            yes      ``seq_balance``                         Dai et al. 2024; DeepSeek-AI 2024 (V3)
batch_prioritized   no       -                                       Riquelme et al. 2021 (V-MoE, BPR)
top_p               yes      ``dynamic`` (router entropy)            Huang et al. 2024
confidence          yes      -                                       top-1 / top-2 by a confidence threshold
==================  =======  ======================================  =========================================

"Causal" means: in a causal layer with ``slot_order='token_major'`` (or dropless), the output at position t
does not depend on tokens after t. BASE and S-BASE are causal at evaluation (greedy) but not in training;
the registry flag describes training, the stricter case.
"""
from moe_jax.routers import balanced, batch_prioritized, deepseek, dynamic_k, hash, soft_moe  # noqa: F401
from moe_jax.routers.balanced import BaseRouter, SinkhornRouter, balanced_assignment, sinkhorn_log
from moe_jax.routers.batch_prioritized import BatchPrioritizedRouter
from moe_jax.routers.deepseek import DeepSeekRouter, fine_grained, group_limited_top_k, sequence_balance_loss
from moe_jax.routers.dynamic_k import ConfidenceRouter, TopPRouter, router_entropy
from moe_jax.routers.hash import HashRouter, hash_expert
from moe_jax.routers.soft_moe import SoftMoERouter
