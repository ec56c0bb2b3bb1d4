"""moe_jax.hostmem: with the policy applied, freed large blocks are reused (no page faults after the first
calls); with glibc's default every block over 32 MiB is a fresh mmap and faults on every call. Run in
subprocesses: the policy must be set before JAX's first computation, and it is process-wide."""
import os
import platform
import subprocess
import sys

import pytest

from moe_jax import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 64 MiB blocks (above glibc's largest mmap threshold, 32 MiB): 64 MiB / 4 KiB = 16384 first-touch page
# faults per fresh block. Part 1, numpy: allocate, fill, free, in this thread, synchronously. Part 2, a jitted
# step that returns a fresh 64 MiB output from XLA's own threads, the previous output dropped each time.
_SCRIPT = r"""
import resource, sys
from moe_jax import hostmem
print("policy:", hostmem.keep_freed_memory(sys.argv[1]))
import numpy as np
import jax, jax.numpy as jnp

def faults_of(step, calls):
    out = []
    for _ in range(calls):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    return " ".join(map(str, out))

def numpy_step():
    block = np.ones((16, 1024, 1024), np.float32)
    del block

f = jax.jit(lambda a: a * 2.0)
a = jnp.ones((16, 1024, 1024), jnp.float32)

def jax_step():
    out = jax.block_until_ready(f(a))
    del out

print("numpy:", faults_of(numpy_step, 8))
print("jax:", faults_of(jax_step, 24))
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the policy is a glibc mallopt")


def _run(mode):
    env = {k: v for k, v in os.environ.items() if k != hostmem.ENV_VAR}
    env.update(JAX_PLATFORMS="cpu", NUMPY_MADVISE_HUGEPAGE="0")  # 4 KiB pages: one fault per page
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    lines = {line.split(":")[0]: line.split(":", 1)[1] for line in out.splitlines() if ":" in line}
    return lines["policy"], [int(v) for v in lines["numpy"].split()], [int(v) for v in lines["jax"].split()]


@glibc_only
def test_keep_reuses_freed_pages_and_default_does_not():
    policy, numpy_faults, jax_faults = _run("keep")
    assert "kept" in policy, policy
    # The first block grows the heap; every later one reuses it.
    assert max(numpy_faults[1:]) < 1000, numpy_faults
    # XLA's outputs: the heap grows for the first calls (JAX frees the previous output asynchronously; 1 to
    # 11 growing calls seen, more on a loaded machine), then calls touch no new page.
    assert sum(v < 1000 for v in jax_faults) >= 4, jax_faults
    policy, numpy_faults, jax_faults = _run("default")
    assert "default" in policy, policy
    assert min(numpy_faults) > 8000, numpy_faults  # ~16384: every block is mapped and touched afresh
    assert min(jax_faults) > 8000, jax_faults


def test_bad_mode_names_the_variable():
    with pytest.raises(ValueError, match="MOE_JAX_HOST_MALLOC"):
        hostmem.keep_freed_memory("always")
