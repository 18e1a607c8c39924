"""Shared test set-up, before JAX is imported.

The suite runs as two pytest-xdist workers (setup.cfg), so on a GPU neither may take most of
its memory up front. Its nets are tiny, so compiling dominates its time: XLA's backend (LLVM)
optimisation is off (-O0; the same programs, rounding aside: fit and CLI test files ran 13-17%
faster on the 2-core CPU). Subprocesses inherit both.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()
