"""What every experiments/ script shares: its start-up and how it reports bad input.

``start(argv, script)`` keeps the script's and dipjax.pipeline's INFO lines in the log and
turns on JAX's persistent compilation cache (--cache_dir: a second run of the same command
reads its long compiles from disk; JAX's threshold, 1 s unless the environment variable
JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise, decides which are kept);
``join(coordinator, ...)`` makes the process one of a multi-process JAX job;
``errors(name)`` turns a ValueError or FileNotFoundError (bad flags, unreadable images) or a
diverged fit into one line on stderr and exit status 1; ``writable_dir(path)`` checks an
output directory before any work; ``run_main(script, run)`` is a script's whole main, both
together; ``cache_events()`` counts the cache's hits and misses.
"""

from __future__ import annotations

import collections
import contextlib
import logging as std_logging
import os
import sys
from typing import Callable, Iterator

from absl import app
from absl import flags
from absl import logging
import jax

from dipjax import pipeline

_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", os.path.expanduser("~/.cache/dipjax/jax"),
    "Persistent compilation cache ('' disables it).")


def start(argv: list[str], script: str) -> None:
  """Start-up of an absl main: log filter and compilation cache.

  Args:
    argv: the arguments absl left over (an error if there are any).
    script: the calling script's __file__, whose INFO lines are kept.
  """
  paths = (os.path.abspath(script), os.path.abspath(pipeline.__file__))
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or record.pathname in paths)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CACHE_DIR.value:
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR.value)


def join(coordinator: str, num_processes: int, process_id: int) -> None:
  """Joins a multi-process JAX job (jax.distributed.initialize): afterwards jax.devices() lists
  every process's devices. On CPU the processes exchange data through gloo.

  Args:
    coordinator: host:port of process 0.
    num_processes: how many processes run the same command.
    process_id: this one, in [0, num_processes).
  """
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id must lie in [0, --num_processes = {num_processes}), got "
                     f"{process_id}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


@contextlib.contextmanager
def errors(name: str) -> Iterator[None]:
  """Bad input (ValueError, FileNotFoundError; io.ImageError is a ValueError) and a diverged fit
  become one line 'name: error: ...' on stderr and exit status 1, not a traceback."""
  try:
    yield
  except (ValueError, FileNotFoundError, pipeline.DivergedError) as e:
    print(f"{name}: error: {e}", file=sys.stderr)
    sys.exit(1)


def writable_dir(path: str, flag: str = "--out_dir") -> None:
  """A ValueError naming `flag` unless directory `path` exists and is writable, or can be
  created (its nearest existing ancestor is a writable directory); checked before any work,
  and nothing is created."""
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"{flag} {path}: cannot write there ({existing} is a file)")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f"{flag} {path}: cannot write there ({existing} is not writable)")


def cache_events() -> collections.Counter:
  """Counts JAX's persistent compilation-cache 'hits' and 'misses' from now on."""
  counts = collections.Counter()

  def listener(event: str, **kwargs) -> None:
    del kwargs
    if event in ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"):
      counts[event.rsplit("_", 1)[-1]] += 1

  jax.monitoring.register_event_listener(listener)
  return counts


def run_main(script: str, run: Callable[[], None]) -> None:
  """Runs a script under absl: flags parsed, :func:`start`, then `run()` with bad input turned
  into one error line (:func:`errors`). script: the caller's __file__."""

  def main(argv: list[str]) -> None:
    start(argv, script)
    with errors(os.path.basename(script)):
      run()

  app.run(main)
