"""Staged DDPM-style targets for DIP.

A staged fit trains the network on K targets in turn, from a heavily corrupted copy of the
observation y (stage 0, timestep t_max) down to y itself (stage K - 1, timestep 0). Stage k
runs for ``lengths[k]`` iterations; :func:`stage_index` maps a global step to its stage inside
a jitted loop.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dipjax import schedules

Array = jax.Array

_SPACINGS = ("linear", "quadratic")


def stage_timesteps(num_stages: int, t_max: int, spacing: str = "linear") -> np.ndarray:
  """Timesteps of the K stages, strictly decreasing from t_max to 0.

  Args:
    num_stages: K >= 1; K = 1 gives [0] (plain DIP on y).
    t_max: timestep of the first stage, >= K - 1.
    spacing: 'linear' (evenly spaced) or 'quadratic' (t_max * u^2 for u evenly spaced in
      [1, 0], denser near 0).

  Returns:
    (K,) int32, timesteps[0] = t_max (for K > 1), timesteps[-1] = 0.
  """
  if num_stages < 1:
    raise ValueError(f"num_stages must be at least 1, got {num_stages}.")
  if t_max < num_stages - 1:
    raise ValueError(f"t_max must be at least num_stages - 1 = {num_stages - 1}, got {t_max}.")
  if spacing not in _SPACINGS:
    raise ValueError(f"Unknown spacing {spacing!r}; valid spacings are {list(_SPACINGS)}.")
  if num_stages == 1:
    return np.zeros((1,), np.int32)
  u = np.linspace(1.0, 0.0, num_stages)
  raw = np.floor(t_max * (u if spacing == "linear" else u**2) + 0.5).astype(np.int64)
  # Rounding can merge neighbours where steps are < 1; push them apart from the end:
  # t_k = max(raw_k, t_{k+1} + 1). This never lifts t_0 above t_max since t_max >= K - 1.
  k = np.arange(num_stages)
  return (np.maximum.accumulate((raw + k)[::-1])[::-1] - k).astype(np.int32)


def stage_lengths(total_iters: int, num_stages: int,
                  weights: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
  """Splits total_iters iterations over K stages.

  Every stage gets one iteration, and the remaining total_iters - K are shared in proportion
  to weights with largest-remainder rounding (ties go to later stages). With weights=None the
  split is equal and the remainder goes to the last stages.

  Args:
    total_iters: total number of iterations, >= num_stages.
    num_stages: K >= 1.
    weights: optional (K,) positive relative stage lengths.

  Returns:
    (K,) int32, each >= 1, summing to total_iters.
  """
  if num_stages < 1:
    raise ValueError(f"num_stages must be at least 1, got {num_stages}.")
  if num_stages > total_iters:
    raise ValueError(
        f"num_stages ({num_stages}) must not exceed total_iters ({total_iters}).")
  w = np.ones(num_stages) if weights is None else np.asarray(weights, np.float64)
  if w.shape != (num_stages,):
    raise ValueError(f"weights must have shape ({num_stages},), got {w.shape}.")
  if not np.all(np.isfinite(w) & (w > 0)):
    raise ValueError(f"weights must all be finite and positive, got {w.tolist()}.")
  spare = total_iters - num_stages
  share = spare * w / w.sum()
  extra = np.floor(share).astype(np.int64)
  frac = share - extra
  # Largest fractional parts first; among equal ones, later stages first.
  order = np.lexsort((-np.arange(num_stages), -frac))
  extra[order[:spare - extra.sum()]] += 1
  return (1 + extra).astype(np.int32)


def stage_ends(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
  """(K,) int32 cumulative ends: stage k covers global steps [ends[k-1], ends[k])."""
  return np.cumsum(np.asarray(lengths, np.int64)).astype(np.int32)


def stage_index(ends: Array | np.ndarray, step: Array | int) -> Array:
  """The stage that 0-based global step belongs to; jittable, step may be traced.

  Args:
    ends: (K,) int32 from :func:`stage_ends`.
    step: int global step(s), any shape; steps past the last end map to K - 1.

  Returns:
    int32 in [0, K - 1], step's shape.
  """
  ends = jnp.asarray(ends)
  idx = jnp.searchsorted(ends, step, side="right")
  return jnp.minimum(idx, ends.shape[0] - 1).astype(jnp.int32)


def staged_targets(key: Array, y: Array, schedule: schedules.Schedule, timesteps: Array,
                   *, fresh_noise: bool = False, scaled: bool = True) -> Array:
  """The K stage targets for observation y.

  scaled=True: x_k = sqrt(abar_t) y + sqrt(1 - abar_t) eps_k (DDPM forward process).
  scaled=False: x_k = y + sigma_t eps_k with sigma_t = noise_level(t) (same SNR, variance
  exploding; keeps the [0, 1] range of y on average). A stage with t = 0 equals y exactly.

  Args:
    key: PRNG key for eps.
    y: observation, e.g. (H, W, C) in [0, 1].
    schedule: the noise schedule.
    timesteps: (K,) int timesteps in [0, T], e.g. from :func:`stage_timesteps`; may be traced.
    fresh_noise: False uses one eps for all stages; True draws an independent eps per stage.
    scaled: DDPM (True) or variance-exploding (False) form.

  Returns:
    (K,) + y.shape float32.
  """
  y = jnp.asarray(y, jnp.float32)
  timesteps = jnp.asarray(timesteps)
  k = timesteps.shape[0]
  eps = jax.random.normal(key, ((k,) if fresh_noise else ()) + y.shape, jnp.float32)
  eps = jnp.broadcast_to(eps, (k,) + y.shape)
  if scaled:
    return schedules.q_sample(schedule, jnp.broadcast_to(y, eps.shape), timesteps, eps)
  sigma = schedules.noise_level(schedule, timesteps).reshape((k,) + (1,) * y.ndim)
  return y + sigma * eps


def stage_scales(schedule: schedules.Schedule, timesteps: Array, *, scaled: bool = True
                 ) -> Array:
  """(K,) float32 a_k, the factor of y in each stage target: sqrt(abar_t) (scaled) or 1.

  ``staged_targets(...) - a_k y`` is the known noise each stage adds
  (``problems.Problem.stage_noise``).
  """
  timesteps = jnp.asarray(timesteps)
  if not scaled:
    return jnp.ones(timesteps.shape, jnp.float32)
  return jnp.sqrt(schedule.alphas_cumprod[timesteps]).astype(jnp.float32)
