"""Test setup, before JAX is imported anywhere: 8 fake CPU devices for the multi-device tests, and XLA's CPU
backend optimizations off (compiles ~3x faster; the tests' shapes are tiny, so run time does not suffer).
The longest tests are collected first, so that ``pytest -n 2`` does not end with one worker still running
one of them."""
import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Files (or file::test prefixes) of the longest tests, longest first: they start first under pytest-xdist.
SLOW_FIRST = ("test_readme_commands.py::test_readme_commands_run_in_order", "test_notebooks.py", "test_upcycle.py",
              "test_resume_safety.py", "test_train.py", "test_compare.py", "test_decode_cli.py", "test_parallel.py",
              "test_routers.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        node = item.nodeid.split("/")[-1]
        return next((i for i, prefix in enumerate(SLOW_FIRST) if node.startswith(prefix)), len(SLOW_FIRST))

    items.sort(key=rank)  # stable: within a rank, the collection order
