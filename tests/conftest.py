"""Shared test set-up: the suite runs as two pytest-xdist workers (setup.cfg), so on a GPU
neither may take most of its memory up front."""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
