"""Saving and restoring a training state pytree with Orbax.

One checkpoint per step under ``directory/<step>``, written by
``orbax.checkpoint.CheckpointManager`` with ``StandardSave`` / ``StandardRestore``. The
state is any pytree of arrays (e.g. a ``flax.struct.dataclass`` holding params, an optax
state, a raw uint32 PRNG key and an int32 step).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

State = TypeVar("State")


def _manager(directory: str | os.PathLike,
             **options: Any) -> contextlib.closing[ocp.CheckpointManager]:
  """A CheckpointManager on the absolute `directory`, closed when the `with` block exits."""
  return contextlib.closing(ocp.CheckpointManager(
      os.path.abspath(directory), options=ocp.CheckpointManagerOptions(**options)))


def save(directory: str | os.PathLike, step: int, state: Any, *, keep: int = 2) -> None:
  """Writes `state` as checkpoint `step` and keeps only the newest `keep` checkpoints.

  Blocks until the checkpoint is complete on disk. Orbax finalises a step by an atomic
  rename, so a run killed mid-save never leaves a partial step that :func:`latest_step`
  reports.

  Raises:
    ValueError: `directory` already holds a checkpoint at `step` or a later one (Orbax
      would otherwise skip the save silently).
  """
  with _manager(directory, max_to_keep=keep, create=True) as mngr:
    if not mngr.save(step, args=ocp.args.StandardSave(state)):
      raise ValueError(
          f"checkpoint step {step} not saved: {mngr.directory} already has step "
          f"{mngr.latest_step()}")
    mngr.wait_until_finished()


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest complete checkpoint step in `directory`, or None if there is none."""
  if not os.path.isdir(directory):
    return None
  with _manager(directory, create=False) as mngr:
    return mngr.latest_step()


def load(directory: str | os.PathLike, like: State, step: int | None = None) -> State:
  """Restores checkpoint `step` (default: the latest) into the structure of `like`.

  Args:
    directory: where :func:`save` wrote.
    like: a state of the same pytree structure, shapes and dtypes (e.g. freshly
      initialised); only its structure, shapes and dtypes are used.
    step: which checkpoint; None for the latest.

  Returns:
    The restored state, a pytree like `like`.

  Raises:
    FileNotFoundError: no checkpoint (at `step`) in `directory`.
    ValueError: the checkpoint's structure or shapes do not match `like`.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint directory {directory}")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  with _manager(directory, create=False) as mngr:
    steps = mngr.all_steps()
    if step is None and not steps:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    if step is not None and step not in steps:
      raise FileNotFoundError(
          f"no checkpoint at step {step} in {directory} (steps: {sorted(steps)})")
    try:
      return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    except ValueError as e:
      raise ValueError(
          f"checkpoint at {directory} does not match this network/configuration: {e}") from e
