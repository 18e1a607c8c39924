"""Diffusion posterior solvers on dipjax's DDPM for any operator of :mod:`dipjax.operators`:
samples of p(x | y) for y = A x + noise, each a ``lax.scan`` over the timesteps.

  ddnm     DDNM / DDNM+ (Wang et al., ICLR 2023): every x0 prediction replaced by its
           range-null-space correction x0 - lambda_t A^+ (A x0 - y), then a DDIM step.
  diffpir  DiffPIR (Zhu et al., CVPRW 2023): every x0 prediction replaced by the proximal point
           argmin ||A x - y||^2 + rho_t ||x - x0||^2, then a step that re-noises with a share
           zeta of fresh noise.
  dps      DPS (Chung et al., ICLR 2023): an ancestral step, then a gradient step on
           ||y - A x0_hat(x_t)|| taken through the network.

The data steps are exact (:func:`dipjax.operators.data_step`: masks, downsamplers, circular
blurs in closed form); DPS needs only A's gradient, so it takes any operator. Each solver starts
either from pure noise at T or from an image (a DIP estimate) forward-noised to t_start, as
SDEdit does (:func:`dipjax.ddpm.solvers.sdedit`); t_start may be traced; given the start's
estimated MSE (guide_mse), the start also guides every x0 prediction by the inverse-variance
blend of :func:`dipjax.ddpm.solvers.dip_guided`. NFE is the number of timesteps (one network
evaluation each; :func:`dipjax.ddpm.solvers.timesteps`), `samples` draws along the batch axis
and the result is their mean.

Images are (H, W, C) in [0, 1] as everywhere in dipjax, y the operator's measurement of one,
sigma_y its Gaussian noise std in [0, 1] units. The model works in [-1, 1]; the data steps are
taken in [0, 1] (where A is linear, not affine). Given the U-Net's `config`, the image is padded
to config.multiple and a grey image runs through a colour model
(:func:`dipjax.ddpm.solvers._frame`): the data step then corrects the channel mean, and the
correction is replicated to the three channels (for the proximal step that is the proximal point
of the mean with 3 rho: ||A mean(x') - y||^2 + rho ||x' - x||^2 over colour x').

Deviations from the papers' code, by name: DDNM's simplified DDNM+ scales its noise by
sqrt(1 - abar^2) sqrt(1 - abar) (a slip); here the total noise is gamma_t = sqrt(sigma_t^2 -
(a_t lambda_t sigma_y)^2) with sigma_t = sqrt(1 - abar_s), its SVD path's noise-free form. DPS
takes every timestep of 1000 with the learned variance; here the posterior variance of the
strided step (beta-tilde), at any NFE. DiffPIR skips the data step at its last timestep; here
every step takes it (so the output is consistent with y).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dipjax import operators
from dipjax.ddpm import diffusion
from dipjax.ddpm import solvers
from dipjax.ddpm.diffusion import EpsFn
from dipjax.ddpm.unet import UNetConfig
from dipjax.schedules import Schedule

Array = jax.Array
Operator = operators.Operator

# The papers' defaults: DDNM eta (its README, main.py); DiffPIR lambda and zeta (the deblurring
# script's; its SR config sweeps lambda 2..12 at zeta 0.25, its inpainting config uses zeta 1);
# DPS's step scale (its SR / deblur configs; 0.5 for inpainting), at 1000 steps.
SOLVERS = ("ddnm", "diffpir", "dps")
DDNM_ETA = 0.85
DIFFPIR_LAMBDA = 7.0
DIFFPIR_ZETA = 0.3
DPS_SCALE = 0.3
SIGMA_FLOOR = 1e-3  # DiffPIR's max(0.001, sigma) in rho_t: a noise-free y still weighs x0


def _check(op: Operator, y: Array, image_shape: tuple[int, ...], nfe: int, samples: int) -> None:
  if nfe < 1:
    raise ValueError(f"nfe must be >= 1, got {nfe}")
  if samples < 1:
    raise ValueError(f"samples must be >= 1, got {samples}")
  want = op.measurement_shape(image_shape)
  if tuple(y.shape) != tuple(want):
    raise ValueError(f"the measurement y has shape {tuple(y.shape)}; the operator maps the "
                     f"image {image_shape} to {tuple(want)}")


def _interior_add(x: Array, delta: Array) -> Array:
  """x (S, H', W', C') plus delta (S, H, W, C) on its centre crop (as _frame pads), delta's
  channel replicated where C = 1 < C'."""
  dh, dw = x.shape[-3] - delta.shape[-3], x.shape[-2] - delta.shape[-2]
  delta = jnp.broadcast_to(delta, delta.shape[:-1] + (x.shape[-1],))
  return x + jnp.pad(delta, ((0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0)))


def _data_correction(op: Operator, y: Array, unframe: Callable[[Array], Array]
                     ) -> Callable[..., Array]:
  """correct(x0, lam, weight=None) -> the data step's change to x0 (S, H', W', C', model
  units; :func:`dipjax.operators.data_step` in [0, 1]), 0 outside the image's crop."""

  def correct(x0: Array, lam: Array | float, weight: operators.Weight | None = None) -> Array:
    image = diffusion.from_model(unframe(x0))  # (S, H, W, C) in [0, 1]
    grey_in_colour = image.shape[-1] != x0.shape[-1]
    lam = lam * (x0.shape[-1] if grey_in_colour else 1)
    stepped = operators.data_step(op, image, y, lam, weight)
    return _interior_add(jnp.zeros_like(x0), 2.0 * (stepped - image))

  return correct


def _start(schedule: Schedule, framed: Array, start: Array | None, t_start: Array | int | None,
           samples: int, key: Array) -> tuple[Array, Array]:
  """(x_{t_start} (S, H', W', C'), t_start): pure noise at T, or the framed start image
  forward-noised to t_start."""
  shape = (samples,) + framed.shape
  z = jax.random.normal(key, shape, jnp.float32)
  if start is None:
    return z, jnp.asarray(schedule.num_steps, jnp.int32)
  t = jnp.asarray(t_start, jnp.int32)
  abar = schedule.alphas_cumprod[t]
  return jnp.sqrt(abar) * diffusion.to_model(framed) + jnp.sqrt(1.0 - abar) * z, t


def _setup(schedule: Schedule, op: Operator, y: Array, start: Array | None,
           t_start: Array | int | None, guide_mse: Array | float | None, nfe: int, samples: int,
           key: Array, config: UNetConfig | None
           ) -> tuple[Array, Array, Callable[[Array], Array], Callable[..., Array],
                      Callable[[Array, Array], Array], Array]:
  """Checks, frames (the start image, or a zero image of y's pre-image shape) and draws the
  start: (x_start (samples, H', W', C'), timesteps (nfe,), unframe, correct, guide, the key
  left); guide(x0, t) blends the start image into an x0 prediction (:func:`_guide`)."""
  if (start is None) != (t_start is None):
    raise ValueError("give both start (an image) and t_start, or neither (pure noise at T)")
  if guide_mse is not None and start is None:
    raise ValueError("guide_mse guides by the start image: give start and t_start with it")
  if isinstance(guide_mse, (int, float)) and not guide_mse >= 0:
    raise ValueError(f"guide_mse must be >= 0, got {guide_mse}")
  y = jnp.asarray(y, jnp.float32)
  shape = op.image_shape(y.shape) if start is None else jnp.shape(start)
  _check(op, y, tuple(shape), nfe, samples)
  template = jnp.zeros(shape, jnp.float32) if start is None else jnp.asarray(start, jnp.float32)
  framed, unframe = solvers._frame(template, config)  # pylint: disable=protected-access
  k_start, key = jax.random.split(key)
  x_start, t = _start(schedule, framed, start, t_start, samples, k_start)
  correct = _data_correction(op, y, unframe)
  guide = _guide(schedule, framed, guide_mse)
  return x_start, solvers.timesteps(t, nfe), unframe, correct, guide, key


def _guide(schedule: Schedule, framed: Array, guide_mse: Array | float | None
           ) -> Callable[[Array, Array], Array]:
  """guide(x0, t): x0 (model units) blended with the framed start image, (1 - w_t) x0 + w_t
  start, w_t = :func:`dipjax.ddpm.solvers.guide_weight` (t, guide_mse) (the inverse-variance
  weight of an estimate of MSE guide_mse against the model's x0 at t); None: x0 unchanged."""
  if guide_mse is None:
    return lambda x0, t: x0
  image = diffusion.to_model(framed)

  def guide(x0: Array, t: Array) -> Array:
    w = solvers.guide_weight(schedule, t, guide_mse)
    return (1.0 - w) * x0 + w * image

  return guide


def _output(x0: Array, unframe: Callable[[Array], Array]) -> Array:
  return jnp.mean(jnp.clip(unframe(diffusion.from_model(x0)), 0.0, 1.0), axis=0)


def _abar(schedule: Schedule, t: Array) -> Array:
  return schedule.alphas_cumprod[t]


def ddnm(eps_fn: EpsFn, schedule: Schedule, op: Operator, y: Array, sigma_y: Array | float,
         nfe: int, key: Array, *, start: Array | None = None, t_start: Array | int | None = None,
         guide_mse: Array | float | None = None, samples: int = 1, eta: float = DDNM_ETA,
         config: UNetConfig | None = None) -> Array:
  """DDNM (sigma_y = 0) / DDNM+ (sigma_y > 0): each step t -> s predicts x0 and eps, corrects
  x0 <- x0 - A^T Lambda (A A^T)^+ (A x0 - y), and steps x_s = a x0 + gamma (eta z +
  sqrt(1 - eta^2) eps), a = sqrt(abar_s), sigma_s = sqrt(1 - abar_s), s_y = 2 sigma_y (model
  units). Lambda is per eigen-direction of A A^T (singular value s_i, along which A^+ y carries
  noise of std s_y / s_i), as DDNM's SVD code: lambda_i = min(1, sigma_s s_i / (a s_y)), so the
  correction never injects more noise than the step's own level (a blur's small s_i would
  otherwise amplify it many times); gamma = sqrt(max(sigma_s^2 - (a s_y)^2, 0)), the paper's
  eq. 19 (exact for unit singular values: denoising, masks). x0 is not clipped (as the paper's
  code).

  Args:
    eps_fn: the eps predictor (model units); schedule: its schedule.
    op: the operator (with a closed-form data step: :func:`dipjax.operators.data_step`).
    y: its measurement (h, w, C), [0, 1] units; sigma_y: y's noise std, [0, 1] units (>= 0).
    nfe: timesteps (network evaluations), >= 1.
    key: the start's and the steps' noise.
    start, t_start: an image (H, W, C) in [0, 1] forward-noised to t_start in [1, T] (may be
      traced) as the start; None, None: pure noise at T.
    guide_mse: with a start, the start image's estimated MSE ([0, 1] units): every x0
      prediction is first blended with the start image by the inverse-variance weight
      (:func:`dipjax.ddpm.solvers.guide_weight`), before the data step; None: no guide.
    samples: draws along the batch axis; eta: DDNM's stochasticity in [0, 1].
    config: the U-Net's config (padding, grey through colour); None: as it is.

  Returns:
    (H, W, C) float32 in [0, 1], the mean of the samples (each clipped).
  """
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"eta must lie in [0, 1], got {eta}")
  x_start, steps, unframe, correct, guide, key = _setup(
      schedule, op, y, start, t_start, guide_mse, nfe, samples, key, config)
  s_y = 2.0 * jnp.asarray(sigma_y, jnp.float32)

  def step(x, t, s, k):
    eps = eps_fn(x, jnp.full((x.shape[0],), t, jnp.int32))
    x0 = guide(diffusion.predict_x0(schedule, x, t, eps), t)
    a, sigma_s = jnp.sqrt(_abar(schedule, s)), jnp.sqrt(1.0 - _abar(schedule, s))

    def weight(e):  # lambda_i of eigenvalue e = s_i^2
      carried = a * s_y / jnp.sqrt(jnp.maximum(e, 1e-30))
      return jnp.where(sigma_s >= carried, 1.0, sigma_s / jnp.maximum(carried, 1e-30))

    gamma = jnp.sqrt(jnp.maximum(sigma_s**2 - (a * s_y) ** 2, 0.0))
    x0 = x0 + correct(x0, 0.0, weight)
    z = jax.random.normal(k, x.shape, jnp.float32)
    return a * x0 + gamma * (eta * z + jnp.sqrt(1.0 - eta**2) * eps)

  x0 = diffusion._scan_steps(step, x_start, steps, key)  # pylint: disable=protected-access
  return _output(x0, unframe)


def diffpir(eps_fn: EpsFn, schedule: Schedule, op: Operator, y: Array, sigma_y: Array | float,
            nfe: int, key: Array, *, start: Array | None = None,
            t_start: Array | int | None = None, guide_mse: Array | float | None = None,
            samples: int = 1, lam: float = DIFFPIR_LAMBDA, zeta: float = DIFFPIR_ZETA,
            config: UNetConfig | None = None) -> Array:
  """DiffPIR: each step t -> s predicts x0 (clipped to [-1, 1]), replaces it by the proximal
  point argmin_x ||A x - y||^2 + rho_t ||x - x0||^2 in [0, 1] units, rho_t = lam
  max(sigma_y, 1e-3)^2 abar_t / (1 - abar_t), recomputes eps_hat = (x_t - sqrt(abar_t) x0) /
  sqrt(1 - abar_t) and steps x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) (sqrt(1 - zeta) eps_hat +
  sqrt(zeta) z).

  Args:
    lam: DiffPIR's lambda (> 0), the prior's weight against the data; zeta: in [0, 1], the
      share of fresh noise in each step (0: DDIM-like, 1: fully re-noised).
    eps_fn, schedule, op, y, sigma_y, nfe, key, start, t_start, guide_mse, samples, config:
      as :func:`ddnm`.

  Returns:
    (H, W, C) float32 in [0, 1], the mean of the samples.
  """
  if not lam > 0:
    raise ValueError(f"DiffPIR's lambda must be positive, got {lam}")
  if not 0.0 <= zeta <= 1.0:
    raise ValueError(f"zeta must lie in [0, 1], got {zeta}")
  x_start, steps, unframe, correct, guide, key = _setup(
      schedule, op, y, start, t_start, guide_mse, nfe, samples, key, config)
  weight = lam * jnp.maximum(jnp.asarray(sigma_y, jnp.float32), SIGMA_FLOOR) ** 2

  def step(x, t, s, k):
    eps = eps_fn(x, jnp.full((x.shape[0],), t, jnp.int32))
    abar_t, abar_s = _abar(schedule, t), _abar(schedule, s)
    x0 = guide(jnp.clip(diffusion.predict_x0(schedule, x, t, eps), -1.0, 1.0), t)
    x0 = x0 + correct(x0, weight * abar_t / (1.0 - abar_t))
    eps_hat = (x - jnp.sqrt(abar_t) * x0) / jnp.sqrt(1.0 - abar_t)
    z = jax.random.normal(k, x.shape, jnp.float32)
    return jnp.sqrt(abar_s) * x0 + jnp.sqrt(1.0 - abar_s) * (
        jnp.sqrt(1.0 - zeta) * eps_hat + jnp.sqrt(zeta) * z)

  x0 = diffusion._scan_steps(step, x_start, steps, key)  # pylint: disable=protected-access
  return _output(x0, unframe)


def dps(eps_fn: EpsFn, schedule: Schedule, op: Operator, y: Array, nfe: int, key: Array, *,
        start: Array | None = None, t_start: Array | int | None = None,
        guide_mse: Array | float | None = None, samples: int = 1, scale: float = DPS_SCALE,
        config: UNetConfig | None = None) -> Array:
  """DPS: each step t -> s predicts x0_hat(x_t) (clipped to [-1, 1]), draws x'_s from the
  posterior q(x_s | x_t, x0_hat) and steps x_s = x'_s - scale grad_{x_t} ||y - A x0_hat||
  (model units; the norm, not its square, as the paper's code), the gradient taken through the
  network. Any operator (A's gradient only); the noise level is not used.

  Args:
    scale: the step size (> 0; the paper's 0.3 for SR and deblurring, 0.5 for inpainting, at
      1000 steps).
    eps_fn, schedule, op, y, nfe, key, start, t_start, guide_mse, samples, config: as
      :func:`ddnm` (the guide blends x0_hat before the residual, so the gradient flows through
      the blend).

  Returns:
    (H, W, C) float32 in [0, 1], the mean of the samples.
  """
  if not scale > 0:
    raise ValueError(f"the DPS step scale must be positive, got {scale}")
  x_start, steps, unframe, _, guide, key = _setup(schedule, op, y, start, t_start, guide_mse,
                                                  nfe, samples, key, config)
  y = jnp.asarray(y, jnp.float32)

  def residual_norm(x, t):
    eps = eps_fn(x, jnp.full((x.shape[0],), t, jnp.int32))
    x0 = guide(jnp.clip(diffusion.predict_x0(schedule, x, t, eps), -1.0, 1.0), t)
    r = 2.0 * (y - op(diffusion.from_model(unframe(x0))))  # model units
    norms = jnp.sqrt(jnp.sum(r**2, axis=tuple(range(1, r.ndim))) + 1e-20)  # smooth at r = 0
    return jnp.sum(norms), x0

  def step(x, t, s, k):
    grad, x0 = jax.grad(residual_norm, has_aux=True)(x, t)
    mean, var = diffusion.posterior_mean_variance(schedule, x0, x, t, s)
    return mean + jnp.sqrt(var) * jax.random.normal(k, x.shape, jnp.float32) - scale * grad

  x0 = diffusion._scan_steps(step, x_start, steps, key)  # pylint: disable=protected-access
  return _output(x0, unframe)

