"""DDPM noise schedules as pytrees.

Index convention: t = 0 is the clean image and t = 1..T are the DDPM timesteps, so
``alphas_cumprod[t]`` is the DDPM paper's alpha-bar_t for t = 1..T and ``alphas_cumprod[0] = 1``.
Every field is an array of static shape (T + 1,), so schedules with the same T can be stacked
(``jax.tree.map(lambda *a: jnp.stack(a), s1, s2)``) and vmapped over.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array


@struct.dataclass
class Schedule:
  """A DDPM variance schedule.

  Attributes:
    betas: (T + 1,) float32, betas[0] = 0, betas[t] in (0, 1) for t = 1..T.
    alphas_cumprod: (T + 1,) float32, cumprod(1 - betas); alphas_cumprod[0] = 1, decreasing.
  """
  betas: Array
  alphas_cumprod: Array

  @property
  def num_steps(self) -> int:
    """T, the number of DDPM timesteps (from the static shape)."""
    return self.betas.shape[-1] - 1


def _from_betas(betas: np.ndarray) -> Schedule:
  """Builds a schedule from float64 betas for t = 1..T (computed in float64, stored float32)."""
  betas = np.concatenate([[0.0], betas])
  return Schedule(betas=jnp.asarray(betas, jnp.float32),
                  alphas_cumprod=jnp.asarray(np.cumprod(1.0 - betas), jnp.float32))


def _check_num_steps(num_steps: int) -> None:
  if num_steps < 1:
    raise ValueError(f"num_steps must be at least 1, got {num_steps}.")


def linear(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
  """Linear betas from beta_start (t = 1) to beta_end (t = T), Ho et al. 2020."""
  _check_num_steps(num_steps)
  if not 0.0 < beta_start <= beta_end < 1.0:
    raise ValueError(
        f"Need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}.")
  return _from_betas(np.linspace(beta_start, beta_end, num_steps, dtype=np.float64))


def cosine(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
  """Cosine schedule, Nichol & Dhariwal 2021.

  alpha-bar(t) = f(t) / f(0) with f(t) = cos^2((t / T + s) / (1 + s) * pi / 2); betas are
  min(1 - alpha-bar_t / alpha-bar_{t-1}, max_beta) and alphas_cumprod is recomputed from the
  clipped betas (so it matches the formula except where clipping bites, near t = T).
  """
  _check_num_steps(num_steps)
  if s < 0.0:
    raise ValueError(f"s must be non-negative, got {s}.")
  if not 0.0 < max_beta < 1.0:
    raise ValueError(f"max_beta must lie in (0, 1), got {max_beta}.")
  t = np.arange(num_steps + 1, dtype=np.float64)
  f = np.cos((t / num_steps + s) / (1.0 + s) * np.pi / 2) ** 2
  abar = f / f[0]
  return _from_betas(np.minimum(1.0 - abar[1:] / abar[:-1], max_beta))


_CONSTRUCTORS: dict[str, Callable[[int], Schedule]] = {"linear": linear, "cosine": cosine}


def get(name: str, num_steps: int = 1000) -> Schedule:
  """The named schedule ('linear' or 'cosine') with its default hyper-parameters."""
  if name not in _CONSTRUCTORS:
    raise ValueError(f"Unknown schedule {name!r}; valid names are {sorted(_CONSTRUCTORS)}.")
  return _CONSTRUCTORS[name](num_steps)


def noise_level(schedule: Schedule, t: Array | int) -> Array:
  """sigma_t = sqrt((1 - abar_t) / abar_t), the noise std of x_t / sqrt(abar_t).

  Args:
    schedule: the schedule.
    t: int timestep(s) in [0, T], any shape.

  Returns:
    float32 array of t's shape, >= 0 (0 at t = 0), in the pixel units of x0.
  """
  abar = schedule.alphas_cumprod[t]
  return jnp.sqrt((1.0 - abar) / abar)


def q_sample(schedule: Schedule, x0: Array, t: Array | int, eps: Array) -> Array:
  """DDPM forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.

  Args:
    schedule: the schedule.
    x0: clean data, e.g. (H, W, C) or (B, H, W, C).
    t: int timestep in [0, T]: a scalar, or shape (B,) for a leading batch axis of x0.
    eps: standard normal noise, x0's shape.

  Returns:
    x_t, x0's shape.
  """
  abar = schedule.alphas_cumprod[jnp.asarray(t)]
  abar = abar.reshape(abar.shape + (1,) * (x0.ndim - abar.ndim))
  return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * eps


def t_for_sigma(schedule: Schedule, sigma: Array | float) -> Array:
  """The timestep whose noise_level is closest to sigma, by plain distance |sigma_t - sigma|.

  Args:
    schedule: the schedule.
    sigma: noise std(s) >= 0 in [0, 1] pixel units (e.g. 25 / 255), any shape; jittable.

  Returns:
    int32 array of sigma's shape, in [0, T]; sigma = 0 gives 0.
  """
  sigmas = noise_level(schedule, jnp.arange(schedule.num_steps + 1))
  sigma = jnp.asarray(sigma, jnp.float32)
  return jnp.argmin(jnp.abs(sigmas - sigma[..., None]), axis=-1).astype(jnp.int32)
