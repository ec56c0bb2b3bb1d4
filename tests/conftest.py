"""Test setup, before JAX is imported anywhere: 8 fake CPU devices for the multi-device tests, and XLA's CPU
backend optimizations off (compiles ~3x faster; the tests' shapes are tiny, so run time does not suffer)."""
import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
