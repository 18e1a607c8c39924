"""DDPM maths as pure functions of a :class:`dipjax.schedules.Schedule`: the epsilon loss, the
forward posterior, and DDIM / ancestral samplers as ``lax.scan`` over a timestep sequence.

Conventions. dipjax images are float32 in [0, 1], (H, W, C); the DDPM works in [-1, 1]:
:func:`to_model` and :func:`from_model` convert, here and nowhere else. Timesteps follow
``schedules``: t = 0 is clean (alphas_cumprod[0] = 1), t = 1..T are the DDPM's steps. An
epsilon predictor is any callable ``eps_fn(x, t) -> eps`` with x (N, H, W, C) and t (N,) int32,
e.g. ``lambda x, t: EpsUNet(config).apply(params, x, t)``, or an oracle in tests.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dipjax import metrics
from dipjax import schedules
from dipjax.schedules import Schedule

Array = jax.Array
EpsFn = Callable[[Array, Array], Array]
X0Fn = Callable[[Array, Array], Array]


def to_model(x: Array) -> Array:
  """dipjax's [0, 1] images -> the DDPM's [-1, 1]: 2x - 1."""
  return 2.0 * x - 1.0


def from_model(x: Array) -> Array:
  """The DDPM's [-1, 1] -> dipjax's [0, 1]: (x + 1) / 2 (not clipped)."""
  return (x + 1.0) / 2.0


def _per_image(values: Array, ndim: int) -> Array:
  """(N,) or () per-image values -> broadcastable against (N, ...) of `ndim` axes."""
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def sample_timesteps(key: Array, n: int, num_steps: int, t_hi: int = 0,
                     frac_hi: float = 0.5, t_lo: int = 1) -> Array:
  """Training timesteps (n,) int32 in [1, T].

  t_hi = 0: uniform on [1, T] (the DDPM 'simple' loss). Otherwise a mixture concentrated on the
  range a restoration uses: with probability frac_hi uniform on [t_lo, t_hi], else uniform on
  [1, T] (frac_hi = 1: only [t_lo, t_hi], e.g. the timesteps matched to a range of noise
  levels). For t_lo = 1, p(t) = frac_hi / t_hi + (1 - frac_hi) / T for t <= t_hi and
  (1 - frac_hi) / T above: sampling t from p weights the per-t loss by p(t) T relative to the
  simple loss.
  """
  if not 0 <= t_hi <= num_steps:
    raise ValueError(f"t_hi must lie in [0, T={num_steps}], got {t_hi}")
  if not 0.0 <= frac_hi <= 1.0:
    raise ValueError(f"frac_hi must lie in [0, 1], got {frac_hi}")
  if t_lo != 1 and not 1 <= t_lo <= t_hi:
    raise ValueError(f"t_lo must lie in [1, t_hi={t_hi}], got {t_lo}")
  k_mix, k_lo, k_all = jax.random.split(key, 3)
  t = jax.random.randint(k_all, (n,), 1, num_steps + 1)
  if t_hi == 0:
    return t
  low = jax.random.randint(k_lo, (n,), t_lo, t_hi + 1)
  return jnp.where(jax.random.uniform(k_mix, (n,)) < frac_hi, low, t)


def _noised(schedule: Schedule, x0: Array, key: Array, t_hi: int, frac_hi: float,
            t_lo: int) -> tuple[Array, Array, Array]:
  """(x_t, t, eps): x0 forward-noised at timesteps from :func:`sample_timesteps`."""
  k_t, k_eps = jax.random.split(key)
  t = sample_timesteps(k_t, x0.shape[0], schedule.num_steps, t_hi, frac_hi, t_lo)
  eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
  return schedules.q_sample(schedule, x0, t, eps), t, eps


def eps_loss(eps_fn: EpsFn, schedule: Schedule, x0: Array, key: Array, t_hi: int = 0,
             frac_hi: float = 0.5, t_lo: int = 1) -> Array:
  """The simple DDPM loss: mean over pixels and images of |eps_fn(x_t, t) - eps|^2.

  Args:
    eps_fn: the epsilon predictor.
    schedule: the noise schedule.
    x0: (N, H, W, C) clean images in [-1, 1].
    key: draws t (:func:`sample_timesteps` with t_hi, frac_hi, t_lo) and eps ~ N(0, I).

  Returns:
    () float32 loss (1 for eps_fn = 0).
  """
  x_t, t, eps = _noised(schedule, x0, key, t_hi, frac_hi, t_lo)
  return jnp.mean(jnp.square(eps_fn(x_t, t) - eps))


def x0_loss(eps_fn: EpsFn, schedule: Schedule, x0: Array, key: Array, t_hi: int = 0,
            frac_hi: float = 0.5, t_lo: int = 1, ssim_weight: float = 0.0) -> Array:
  """The denoiser's loss: the error of the one-step estimate x0_hat = :func:`predict_x0` of
  x_t, in dipjax's [0, 1] units, mean |x0_hat - x0|^2 + ssim_weight (1 - SSIM(x0_hat, x0)).

  The loss of the image a one-step (NFE 1) denoiser returns, so fine-tuning with it at the
  timesteps matched to a range of noise levels trains the model for exactly that use. Per
  timestep it is the epsilon MSE weighted by (1 - abar_t) / (4 abar_t): the large-noise end of
  the range dominates, as it does the restorations' error.

  Args: as :func:`eps_loss`; ssim_weight >= 0 (SSIM of x0_hat clipped to [0, 1], dm-pix's).

  Returns:
    () float32 loss.
  """
  x_t, t, _ = _noised(schedule, x0, key, t_hi, frac_hi, t_lo)
  estimate = from_model(predict_x0(schedule, x_t, t, eps_fn(x_t, t)))
  truth = from_model(x0)
  loss = jnp.mean(jnp.square(estimate - truth))
  if ssim_weight:
    loss += ssim_weight * (1.0 - jnp.mean(metrics.ssim(jnp.clip(estimate, 0.0, 1.0), truth)))
  return loss


def predict_x0(schedule: Schedule, x_t: Array, t: Array | int, eps: Array) -> Array:
  """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), the inverse of ``schedules.q_sample``.

  x_t, eps: (N, ...) or any shape for a scalar t; t: () or (N,) int in [0, T]."""
  abar = _per_image(schedule.alphas_cumprod[jnp.asarray(t)], x_t.ndim)
  return (x_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)


def posterior_mean_variance(schedule: Schedule, x0: Array, x_t: Array, t: Array | int,
                            s: Array | int | None = None) -> tuple[Array, Array]:
  """The Gaussian q(x_s | x_t, x0) of the forward process, s < t (default s = t - 1).

  With abar_{t|s} = abar_t / abar_s and beta_{t|s} = 1 - abar_{t|s} (beta_t for s = t - 1):
    mean = sqrt(abar_s) beta_{t|s} / (1 - abar_t) x0
           + sqrt(abar_{t|s}) (1 - abar_s) / (1 - abar_t) x_t,
    variance = beta_{t|s} (1 - abar_s) / (1 - abar_t)
  (Ho et al. 2020 eq. 7 for s = t - 1). s = 0 gives mean x0, variance 0.

  Args:
    x0, x_t: (N, ...) arrays in [-1, 1] units; t, s: () or (N,) int, 0 <= s < t <= T.

  Returns:
    (mean of x_t's shape, variance of t's shape followed by singleton axes).
  """
  t = jnp.asarray(t)
  s = t - 1 if s is None else jnp.asarray(s)
  abar_t = _per_image(schedule.alphas_cumprod[t], x_t.ndim)
  abar_s = _per_image(schedule.alphas_cumprod[s], x_t.ndim)
  beta = (abar_s - abar_t) / abar_s  # not 1 - abar_t / abar_s: no cancellation at small t
  mean = (jnp.sqrt(abar_s) * beta * x0 + jnp.sqrt(abar_t / abar_s) * (1.0 - abar_s) * x_t) / (
      1.0 - abar_t)
  return mean, beta * (1.0 - abar_s) / (1.0 - abar_t)


def timestep_sequence(t_start: int, nfe: int) -> np.ndarray:
  """The sampler's timesteps: (nfe,) int32, strictly decreasing, evenly spaced
  ceil(t_start (nfe - i) / nfe) for i = 0..nfe-1, so it starts at t_start, ends at
  ceil(t_start / nfe) >= 1, and the last sampler step goes from there to 0. 1 <= nfe <= t_start.
  """
  if not 1 <= nfe <= t_start:
    raise ValueError(f"need 1 <= nfe <= t_start, got nfe={nfe}, t_start={t_start}")
  i = np.arange(nfe)
  return (-(-t_start * (nfe - i) // nfe)).astype(np.int32)


def _x0_eps(eps_fn: EpsFn, schedule: Schedule, x: Array, t: Array, clip_x0: bool,
            x0_fn: X0Fn | None = None) -> tuple[Array, Array]:
  """The prediction at (x_t, t) as (x0, eps); with clip_x0, x0 is clipped to [-1, 1], then
  x0_fn (if any) is applied, and eps is recomputed from the result (so the two stay consistent
  with x_t, as in guided-diffusion's DDIM)."""
  ts = jnp.full((x.shape[0],), t, jnp.int32)
  eps = eps_fn(x, ts)
  x0 = predict_x0(schedule, x, t, eps)
  if clip_x0 or x0_fn is not None:
    if clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
    if x0_fn is not None:
      x0 = x0_fn(x0, t)
    abar = schedule.alphas_cumprod[t]
    eps = (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)
  return x0, eps


def _scan_steps(step, x_start: Array, timesteps: Array, key: Array) -> Array:
  """Runs step(x, t, s, key) -> x over t = timesteps[i], s = timesteps[i + 1] (0 after the
  last), one key each. A step between equal timesteps (a traced sequence longer than t*,
  :func:`dipjax.ddpm.solvers.timesteps`) is the identity and is skipped, network included."""
  timesteps = jnp.asarray(timesteps, jnp.int32)
  nexts = jnp.concatenate([timesteps[1:], jnp.zeros((1,), jnp.int32)])
  keys = jax.random.split(key, timesteps.shape[0])

  def body(x, a):
    t, s, k = a
    return lax.cond(t == s, lambda x: x, lambda x: step(x, t, s, k), x), None

  x, _ = lax.scan(body, x_start, (timesteps, nexts, keys))
  return x


def ddim_sample(eps_fn: EpsFn, schedule: Schedule, x_start: Array, timesteps: Array,
                key: Array, eta: float = 0.0, clip_x0: bool = True,
                x0_fn: X0Fn | None = None) -> Array:
  """DDIM (Song et al. 2021) from x_{t*} to x_0, one eps_fn evaluation per timestep.

  Each step t -> s (the next timestep, 0 after the last) predicts x0 and eps, then
    x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z,
    sigma^2 = eta^2 * posterior variance of q(x_s | x_t, x0);
  eta = 0 is deterministic (key unused), eta = 1 is the ancestral sampler (:func:`ddpm_sample`).

  Args:
    eps_fn: the epsilon predictor.
    schedule: the noise schedule.
    x_start: (N, H, W, C) x_{t*} in [-1, 1] units (for sampling from noise, t* = T and
      x_start ~ N(0, I)).
    timesteps: (nfe,) int non-increasing in [1, T], timesteps[0] = t*
      (:func:`timestep_sequence`); static length; a repeated timestep's step is skipped.
    key: noise for eta > 0.
    eta: 0 (DDIM) .. 1 (DDPM), a Python float (eta = 0 draws no noise).
    clip_x0: clip each predicted x0 to [-1, 1] (and recompute eps from it): right when sampling
      from noise, where early predictions overshoot; a no-op for predictions inside the range.
    x0_fn: an optional ``x0_fn(x0 (N, H, W, C), t () int32) -> x0`` applied to every predicted
      x0 (after clipping), eps being recomputed from its result: a hook for data consistency
      (:func:`dipjax.ddpm.solvers.dip_guided`). None: the plain sampler.

  Returns:
    x_0, (N, H, W, C) in [-1, 1] units (the last step returns its predicted x0).
  """

  def step(x, t, s, k):
    x0, eps = _x0_eps(eps_fn, schedule, x, t, clip_x0, x0_fn)
    abar_s = schedule.alphas_cumprod[s]
    var = eta ** 2 * posterior_mean_variance(schedule, x0, x, t, s)[1]
    x_s = jnp.sqrt(abar_s) * x0 + jnp.sqrt(jnp.maximum(1.0 - abar_s - var, 0.0)) * eps
    if eta == 0:
      return x_s
    return x_s + jnp.sqrt(var) * jax.random.normal(k, x.shape, x.dtype)

  return _scan_steps(step, x_start, timesteps, key)


def ddpm_sample(eps_fn: EpsFn, schedule: Schedule, x_start: Array, timesteps: Array,
                key: Array, clip_x0: bool = True) -> Array:
  """Ancestral sampling from x_{t*} to x_0: each step t -> s draws x_s from the posterior
  q(x_s | x_t, x0_hat) (:func:`posterior_mean_variance`) at the predicted x0_hat. Over every
  timestep (timesteps = T, T-1, ..., 1) this is Ho et al.'s sampler with variance beta-tilde;
  over a subsequence, its strided version. Arguments as :func:`ddim_sample`."""

  def step(x, t, s, k):
    x0, _ = _x0_eps(eps_fn, schedule, x, t, clip_x0)
    mean, var = posterior_mean_variance(schedule, x0, x, t, s)
    return mean + jnp.sqrt(var) * jax.random.normal(k, x.shape, x.dtype)

  return _scan_steps(step, x_start, timesteps, key)
