"""moe_jax.hostmem: with the policy applied, a jitted step that writes a large fresh output reuses the pages
freed by the previous call (no page faults after the first calls); with glibc's default it faults on every
call. Run in subprocesses: the policy must be set before JAX's first computation, and it is process-wide."""
import os
import platform
import subprocess
import sys

import pytest

from moe_jax import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each call returns a fresh 64 MiB float32 buffer (above glibc's largest mmap threshold, 32 MiB) and drops
# the previous one: 64 MiB / 4 KiB = 16384 first-touch page faults per call under glibc's default policy.
_SCRIPT = r"""
import resource, sys
from moe_jax import hostmem
print("policy:", hostmem.keep_freed_memory(sys.argv[1]))
import jax, jax.numpy as jnp
n_out, mib, calls = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
f = jax.jit(lambda a: tuple(a * (2.0 + i) for i in range(n_out)))
a = jnp.ones((mib // 4, 1024, 1024), jnp.float32)
faults = []
for _ in range(calls):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = jax.block_until_ready(f(a))
    del out
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print("faults:", " ".join(map(str, faults)))
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the policy is a glibc mallopt")


def _run(mode, n_out=1, mib=64, calls=16):
    env = {k: v for k, v in os.environ.items() if k != hostmem.ENV_VAR}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode, str(n_out), str(mib), str(calls)], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    policy = next(line for line in out.splitlines() if line.startswith("policy:"))
    faults = [int(v) for v in next(line for line in out.splitlines() if line.startswith("faults:")).split()[1:]]
    return policy, faults


@glibc_only
def test_keep_reuses_freed_pages_and_default_does_not():
    policy, faults = _run("keep")
    assert "kept" in policy, policy
    # The heap grows for the first few calls (JAX frees the previous output asynchronously, so how many
    # varies: 3 to 9 seen), then each call reuses it: most calls touch no new page (< 1000 faults, against
    # 16384 for 64 MiB of new pages).
    assert sum(v < 1000 for v in faults) >= 6, faults
    policy, faults = _run("default")
    assert "default" in policy, policy
    assert min(faults) > 8000, faults  # ~16384: every call maps and touches 64 MiB afresh


def test_bad_mode_names_the_variable():
    with pytest.raises(ValueError, match="MOE_JAX_HOST_MALLOC"):
        hostmem.keep_freed_memory("always")
