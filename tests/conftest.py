"""Shared test set-up, before JAX is imported.

The suite runs as two pytest-xdist workers (setup.cfg), so on a GPU neither may take most of
its memory up front. Its nets are tiny, so compiling dominates its time: XLA's backend (LLVM)
optimisation is off (-O0; the same programs, rounding aside: fit and CLI test files ran 13-17%
faster on the 2-core CPU). Subprocesses inherit both, and keep every program that took over
JAX's 1 s threshold to compile in the worker's compilation cache (`cli_cache`; a tiny CLI run:
10 s alone, 7 s when its fit's program is there). The heaviest files run first (`HEAVY_FIRST`),
so that the two workers end together.
"""

import os

import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()


@pytest.fixture(scope="session")
def cli_cache(tmp_path_factory) -> str:
  """--cache_dir for the scripts a test runs: one per worker, shared by all its tests."""
  return str(tmp_path_factory.mktemp("xla_cache"))


# Test files by their time in one run on the 2-core CPU, heaviest first: xdist hands each worker
# the next file when it is free (--dist loadfile --no-loadscope-reorder), so the last files to
# start are short ones (longest-processing-time first). The rest follow in name order.
HEAVY_FIRST = ("test_ddpm_scripts.py", "test_restore_cli.py", "test_fit.py", "test_grid.py",
               "test_tiles.py", "test_ddpm.py", "test_hostile_inputs.py", "test_layers.py",
               "test_pipeline.py", "test_operators.py", "test_ddpm_posterior.py",
               "test_ddpm_solvers.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))
