"""Switch top-1 with data x expert parallelism: 8 experts split over ``mesh.expert=4`` devices, the batch
over all devices (``mesh.data=-1``: the rest). Needs a device count divisible by 4; on a CPU-only machine,
fake 8 devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python experiments/train.py --config configs/switch_ep.py:tiny --workdir /tmp/switch_ep_tiny

Same with other degrees: ``--config.mesh.expert=8`` (8 devices hold one expert each), ``--config.mesh.expert=2``.
See docs/parallel.md for GPU/TPU slices and several hosts.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402


def get_config(size=None):
    c = base.make_config(size, model=dict(moe_every=2), moe=dict(
        num_experts=8, k=1, router="switch", capacity_factor=1.25, eval_capacity_factor=2.0,
        lb_loss_coef=1e-2, z_loss_coef=1e-3))
    c.mesh.data = -1
    c.mesh.expert = 4
    return c
