"""Saving and restoring a training state pytree with Orbax.

One checkpoint per step under ``directory/<step>``, written by
``orbax.checkpoint.CheckpointManager`` with ``StandardSave`` / ``StandardRestore``. The
state is any pytree of arrays (e.g. a ``flax.struct.dataclass`` holding params, an optax
state, a raw uint32 PRNG key and an int32 step). :func:`bind` ties a directory to one run by a
fingerprint of what defines it, so that a resume never continues another run's checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

State = TypeVar("State")
FINGERPRINT = "fingerprint.json"


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
    step = mngr.latest_step() if step is None else step
    try:
      return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # TensorStore, JSON and shape errors alike: one line naming the file
      first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
      raise ValueError(f"cannot read checkpoint {step} in {directory} ({first}): it is damaged "
                       "or of another run; delete the directory to start anew") from e


def bind(directory: str | os.PathLike, fingerprint: dict[str, str], *, resume: bool) -> bool:
  """Ties `directory` to the run `fingerprint` describes (setting name -> value as text), before
  any work, and says whether there is a checkpoint to resume from.

  A new run (or a resume with no checkpoint yet: a run killed before its first) writes the
  fingerprint; it is refused if the directory already holds checkpoints and `resume` is False.
  A resume must match the stored fingerprint, else a ValueError names each setting that
  differs.
  """
  directory = os.path.abspath(directory)
  path = os.path.join(directory, FINGERPRINT)
  step = latest_step(directory)
  if step is None or not resume:
    if step is not None:
      raise ValueError(f"{directory} already holds checkpoints (iteration {step}): resume to "
                       "continue that run, or choose another directory")
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
      try:
        json.dump(fingerprint, f, indent=1, sort_keys=True)
      except BaseException:
        os.unlink(f.name)
        raise
    os.replace(f.name, path)
    return False
  try:
    with open(path) as f:
      stored = json.load(f)
    if not isinstance(stored, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    raise ValueError(f"resume: {path} is missing or unreadable ({type(e).__name__}: {e}), so "
                     "the checkpoints cannot be matched to this run; start anew") from e
  differ = [f"{k} {stored.get(k, '(none)')} -> {fingerprint.get(k, '(none)')}"
            for k in sorted(set(stored) | set(fingerprint)) if stored.get(k) != fingerprint.get(k)]
  if differ:
    raise ValueError(f"resume: the checkpoints in {directory} are of another run; changed: "
                     + "; ".join(differ))
  return True
