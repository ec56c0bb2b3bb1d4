"""Dense -> MoE conversions: continue a dense model as a dense, upcycled or split MoE model, against scratch.

    python experiments/compare.py --config configs/compare_upcycle.py --workdir runs/upcycle
    python experiments/compare.py --config configs/compare_upcycle.py:tiny --workdir /tmp/upcycle_tiny

A dense model trains for N + M steps (``dense``; its checkpoint at step N is kept; 'small': N = M = 1000,
'tiny': N = M = 100). At step N, the ``upcycle`` and ``split_*`` models start from that checkpoint
(``config.init.from_dir='@dense'``, converted by ``moe_jax/upcycle.py``, fresh optimizer state) and train the
remaining M steps on the same data order and learning-rate schedule; the ``*_scratch`` models train the same
MoE architectures from a random init for all N + M steps. Models (E = 8 experts, K = 2 per token, dropless):

* ``dense``: the baseline (continues without any change, optimizer included).
* ``upcycle``: Komatsuzaki et al. 2022: every other block's FFN copied into 8 experts of the dense FFN's width,
  Mixtral router (renormalized top-2, so the model computes exactly the dense function at step N);
  2x the dense FFN's active FLOPs in those blocks.
* ``split_random`` / ``split_kmeans`` / ``split_importance``: MoEfication / LLaMA-MoE: every block's F neurons
  partitioned into 8 experts of F/8 (random; balanced k-means with the router set to the cluster centroids;
  importance-balanced by the first-order Taylor importance); softmax router with renormalized top-2 weights
  scaled by K=2 (``router='deepseek'``, ``score_func='softmax'``, ``routed_scaling=2``): 1/4 of the dense
  FFN's active FLOPs.
* ``split_shared``: LLaMA-MoE inner sharing: the F/4 most important neurons become an always-on shared expert,
  the other 3F/4 are split into 8 importance-balanced experts of 3F/32.
* ``upcycle_scratch`` / ``split_scratch``: the upcycled / split architectures trained from scratch.

The first validation point of a converted run (step N) is the converted model before any update: equal to
the dense model's for ``upcycle``, higher for the split models (K < E drops most neurons of each token).
FLOPs and wall time of a converted run include those of the dense steps it started from.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base, compare_base  # noqa: E402

E, K = 8, 2
UPCYCLE_MOE = dict(num_experts=E, k=K, router="mixtral", renormalize_top_k=True, dispatcher="dropless",
                   lb_loss_coef=1e-2, z_loss_coef=1e-3)
SPLIT_MOE = dict(num_experts=E, k=K, router="deepseek", score_func="softmax", renormalize_top_k=True,
                 routed_scaling=float(K), bias_update_rate=0.0, dispatcher="dropless", lb_loss_coef=1e-2,
                 z_loss_coef=1e-3, seq_aux_coef=0.0)


def get_config(spec=None):
    """``spec``: '' (the 'small' study, N = M = 1000) or 'tiny' (N = M = 100); 'SIZE,N,M' sets the steps."""
    size, *steps = (spec or "").split(",")
    if steps and (len(steps) != 2 or not all(s.isdigit() and int(s) > 0 for s in steps)):
        raise ValueError(f"configs/compare_upcycle.py:{spec}: write SIZE,N,M with positive step counts, e.g. tiny,4,4.")
    if size == "tiny":  # about 3 minutes on 2 CPU cores
        n, m = map(int, steps) if steps else (100, 100)
        cfg = base.make_config("tiny", train=dict(warmup_steps=min(20, n), eval_every=max(n // 2, 1),
                                                  log_every=min(25, n), sample_tokens=0))
        return build(cfg, n, m)
    n, m = map(int, steps) if steps else (1000, 1000)  # 2000 steps in all, as the other studies
    cfg = base.make_config(size or None, train=dict(warmup_steps=min(100, n), eval_every=max(n // 5, 1),
                                                    log_every=min(25, n), sample_tokens=100))
    return build(cfg, n, m, results_dir="" if steps else "docs/results/upcycle")


def build(cfg, n: int, m: int, results_dir: str = ""):
    """The study on the training config ``cfg``: dense for ``n`` steps, then ``m`` more (widths from
    ``cfg.model.d_ff``, which must be a multiple of 4 * E)."""
    f = cfg.model.d_ff
    if f % (4 * E):
        raise ValueError(f"compare_upcycle: model.d_ff={f} must be a multiple of {4 * E} (E={E} experts, a shared "
                         "expert of d_ff/4).")
    cfg.train.steps = n + m
    cfg.train.ckpt_every = n  # the dense run's checkpoint at step n is where the conversions start
    cfg.train.keep_ckpts = max(int(cfg.train.keep_ckpts), (n + m) // n + 1)
    shared = f // 4
    upcycle = compare_base.moe_model(dict(UPCYCLE_MOE, expert_hidden=f), moe_every=2)
    split = compare_base.moe_model(dict(SPLIT_MOE, expert_hidden=f // E), moe_every=1)
    split_shared = compare_base.moe_model(dict(SPLIT_MOE, expert_hidden=(f - shared) // E, num_shared_experts=1,
                                               shared_expert_hidden=shared), moe_every=1)

    def from_dense(model, method):
        return dict(model, init=dict(from_dir="@dense", step=n, method=method))

    models = {
        "dense": {},
        "upcycle": from_dense(upcycle, "upcycle"),
        "split_random": from_dense(split, "split_random"),
        "split_kmeans": from_dense(split, "split_kmeans"),
        "split_importance": from_dense(split, "split_importance"),
        "split_shared": from_dense(split_shared, "split_importance"),
        "upcycle_scratch": upcycle,
        "split_scratch": split,
    }
    title = (f"Dense -> MoE: dense {n} steps, then {m} more as dense / upcycled / split MoE (E={E}, K={K}), "
             f"vs MoE from scratch ({n + m} steps)")
    return compare_base.make(cfg, models, seeds=(0,), title=title, results_dir=results_dir)
