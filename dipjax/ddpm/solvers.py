"""Restoration with dipjax's own DDPM: denoising by reverse diffusion from the timestep that
matches the noise, and Deep Image Prior estimates refined by it.

Images are float32 in [0, 1], (H, W, C), as everywhere in dipjax; the DDPM works in [-1, 1]
(:func:`diffusion.to_model`), where Gaussian noise of std sigma in [0, 1] units has std
2 sigma. Since x_t / sqrt(abar_t) = x0 + noise_level(t) eps in the model's units, a noisy
observation y = x0 + sigma n scaled by sqrt(abar_t) is distributed as the DDPM's x_t for the t
with noise_level(t) = 2 sigma: :func:`matched_timestep`, where the reverse process starts.

  ddpm_denoise  DDIM from sqrt(abar_{t*}) y at t* = matched_timestep(sigma) down to 0.
  dip_ddpm      SDEdit of a DIP estimate x_hat: forward-noised to the t' matched to x_hat's
                estimated error (:func:`dip_timestep`, :func:`estimate_dip_error`), then DDIM.
  dip_guided    ddpm_denoise with data consistency: every x0 prediction is blended with x_hat.

An eps predictor is any ``eps_fn(x (N, H, W, C), t (N,)) -> eps`` in the model's units
(``unet.eps_fn(config, params)``, or an oracle in tests). Given the U-Net's ``config``, the
functions pad the image (reflect) to ``config.multiple`` and crop back, and run a grey image
through a colour model (the channel replicated in, its noise made white, the channel mean
out: :func:`_frame`, :func:`_observed_start`). Every function is jittable with nfe, samples,
eta, weight and config static; the noise level, the error estimate and so t* may be traced, so
one compiled function serves every image of a size and every noise level (:func:`timesteps` is
``diffusion.timestep_sequence`` for a traced t*).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dipjax import noise
from dipjax import schedules
from dipjax.ddpm import diffusion
from dipjax.ddpm.diffusion import EpsFn
from dipjax.ddpm.unet import UNetConfig
from dipjax.schedules import Schedule

Array = jax.Array


def matched_timestep(schedule: Schedule, sigma: Array | float) -> Array:
  """t*, the timestep whose noise level matches Gaussian noise of std sigma.

  Args:
    schedule: the DDPM's schedule.
    sigma: noise std(s) >= 0 in dipjax's [0, 1] units (25 / 255 for sigma = 25), any shape.

  Returns:
    int32 of sigma's shape in [1, T]: ``t_for_sigma(schedule, 2 sigma)`` (the noise is 2 sigma
    in the model's [-1, 1]), at least 1 so that the sampler takes a step (sigma = 0 gives 1).
  """
  t = schedules.t_for_sigma(schedule, 2.0 * jnp.asarray(sigma, jnp.float32))
  return jnp.maximum(t, 1)


def dip_timestep(schedule: Schedule, est_mse: Array | float) -> Array:
  """t' for an estimate whose mean squared error against the clean image is est_mse ([0, 1]
  units squared): its error taken as Gaussian noise of that variance,
  ``matched_timestep(schedule, sqrt(est_mse))``, in [1, T]."""
  return matched_timestep(schedule, jnp.sqrt(jnp.maximum(jnp.asarray(est_mse, jnp.float32),
                                                         0.0)))


def estimate_dip_error(x_hat: Array, y: Array, sigma: Array | float,
                       floor: float = 1e-6) -> Array:
  """The discrepancy estimate of x_hat's MSE against the clean image: () float32,
  max(mean((x_hat - y)^2) - mean(e^2), floor), e = y - x the observation's noise.

  For y = x + e, E mean (x_hat - y)^2 = mean (x_hat - x)^2 + E mean e^2 - 2 mean (x_hat - x) e:
  unbiased while x_hat has fitted none of the noise, too low once it has fitted some. E mean e^2
  is ``noise.noise_std(y, sigma, proxy=x_hat)^2``: sigma^2, or for y inside [0, 1]
  (taken as clipped) the clipped noise's energy, 10-25% less at sigma = 50. A staged fit's
  SURE estimate, which also accounts for the fitted noise (``noise.sure_mse``: its trace
  ``mse_est_ema`` at the stop), can be passed to :func:`dip_ddpm` / :func:`dip_guided` as
  est_mse instead when available.

  Args:
    x_hat, y: (H, W, C) in [0, 1]: the estimate and the noisy observation.
    sigma: the observation's noise std, [0, 1] units.
    floor: the smallest estimate returned (> 0).
  """
  x_hat = jnp.asarray(x_hat, jnp.float32)
  energy = jnp.square(noise.noise_std(y, sigma, proxy=x_hat))
  return jnp.maximum(jnp.mean(jnp.square(x_hat - jnp.asarray(y, jnp.float32))) - energy, floor)


def timesteps(t_start: Array | int, nfe: int) -> Array:
  """``diffusion.timestep_sequence(t_start, nfe)`` for a traced t_start >= 1: (nfe,) int32
  ceil(t_start (nfe - i) / nfe), i = 0..nfe-1. Where nfe > t_start some timesteps repeat; the
  sampler skips a step between equal timesteps, so it then takes (and evaluates the network
  for) t_start steps."""
  if nfe < 1:
    raise ValueError(f"nfe must be >= 1, got {nfe}")
  i = jnp.arange(nfe, dtype=jnp.int32)
  return -((-jnp.asarray(t_start, jnp.int32) * (nfe - i)) // nfe)


def check_channels(config: UNetConfig, channels: int) -> None:
  """ValueError unless a model of `config` can restore an image of `channels` channels: the
  same count, or a grey image (1) through a colour model (3)."""
  if channels != config.image_channels and (channels, config.image_channels) != (1, 3):
    raise ValueError(f"a {config.image_channels}-channel DDPM cannot restore a {channels}-channel "
                     "image (a colour model takes grey images too, a grey model only grey ones)")


def _frame(x: Array, config: UNetConfig | None) -> tuple[Array, Callable[[Array], Array]]:
  """An image (H, W, C) as the model takes it, and the map back.

  Returns (framed (H', W', C'): H, W padded (reflect, split as ``io.pad_to_multiple``) to
  config.multiple, a grey image's channel replicated to a colour model's 3; unframe:
  (..., H', W', C') -> (..., H, W, C), the crop and, for a grey image, the channel mean).
  config None: the image as it is.
  """
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 3:
    raise ValueError(f"expected an image (H, W, C), got shape {x.shape}")
  if config is None:
    return x, lambda out: out
  check_channels(config, x.shape[-1])
  (h, w, c), m = x.shape, config.multiple
  dh, dw = -h % m, -w % m
  top, left = dh // 2, dw // 2
  framed = jnp.pad(x, ((top, dh - top), (left, dw - left), (0, 0)), mode="reflect")
  framed = jnp.broadcast_to(framed, framed.shape[:2] + (config.image_channels,))

  def unframe(out: Array) -> Array:
    out = out[..., top:top + h, left:left + w, :]
    return jnp.mean(out, axis=-1, keepdims=True) if out.shape[-1] != c else out

  return framed, unframe


def _check(nfe: int, samples: int, eta: float) -> None:
  if nfe < 1:
    raise ValueError(f"nfe must be >= 1, got {nfe}")
  if samples < 1:
    raise ValueError(f"samples must be >= 1, got {samples}")
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"eta must lie in [0, 1], got {eta}")


def _reverse(eps_fn: EpsFn, schedule: Schedule, x_start: Array, t_start: Array, nfe: int,
             key: Array, eta: float, unframe: Callable[[Array], Array],
             x0_fn: diffusion.X0Fn | None = None) -> Array:
  """DDIM from x_start (S, H', W', C') at t_start to 0; the mean of the S outputs, (H, W, C)
  in [0, 1]."""
  x0 = diffusion.ddim_sample(eps_fn, schedule, x_start, timesteps(t_start, nfe), key, eta=eta,
                             x0_fn=x0_fn)
  return jnp.mean(jnp.clip(unframe(diffusion.from_model(x0)), 0.0, 1.0), axis=0)


def observed_sigma(sigma: Array | float, channels: int, config: UNetConfig | None) -> Array:
  """The noise std the model is given for an observation of `channels` channels with noise std
  sigma: sqrt(3) sigma for a grey image through a colour model (:func:`_observed_start`), else
  sigma. ``matched_timestep`` of it is where :func:`ddpm_denoise` starts."""
  grey_in_colour = config is not None and (channels, config.image_channels) == (1, 3)
  return jnp.asarray(sigma, jnp.float32) * (jnp.sqrt(3.0) if grey_in_colour else 1.0)


def _observed_start(schedule: Schedule, y: Array, sigma: Array | float, key: Array,
                    samples: int, config: UNetConfig | None
                    ) -> tuple[Array, Array, Callable[[Array], Array]]:
  """The observation y (H, W, C), noise std sigma, as the model's x_t: (x_t (samples, H', W',
  C') = sqrt(abar_t) to_model(framed y), t = :func:`matched_timestep`, unframe).

  A grey y through a colour model (:func:`_frame`) needs more: replicated, its noise is the same
  in the three channels, a noise the model never saw (it denoises little of it, and less with
  more steps: docs/RESULTS.md). Along the grey direction (1, 1, 1) / sqrt(3) that noise has std
  sqrt(3) sigma; noise of the same std orthogonal to it (zero channel mean, drawn from `key`)
  makes it white with std sqrt(3) sigma in every channel, and t is matched to that level.
  """
  framed, unframe = _frame(y, config)
  x = jnp.broadcast_to(framed, (samples,) + framed.shape)
  sigma = observed_sigma(sigma, jnp.shape(y)[-1], config)
  if framed.shape[-1] != jnp.shape(y)[-1]:
    g = jax.random.normal(key, x.shape, jnp.float32)
    x = x + sigma * (g - jnp.mean(g, axis=-1, keepdims=True))
  t = matched_timestep(schedule, sigma)
  return jnp.sqrt(schedule.alphas_cumprod[t]) * diffusion.to_model(x), t, unframe


def ddpm_denoise(eps_fn: EpsFn, schedule: Schedule, y: Array, sigma: Array | float, nfe: int,
                 key: Array, *, samples: int = 1, eta: float = 0.0,
                 config: UNetConfig | None = None) -> Array:
  """Denoises y with the DDPM alone: sqrt(abar_{t*}) y taken as x_{t*}, t* =
  :func:`matched_timestep` (sigma), and DDIM from there to 0 in nfe steps.

  Args:
    eps_fn: the eps predictor; schedule: its schedule.
    y: (H, W, C) the noisy observation in [0, 1], any H, W (padded to config.multiple).
    sigma: y's noise std, [0, 1] units (> 0).
    nfe: DDIM steps, >= 1; where nfe > t* the sampler takes t* steps (:func:`timesteps`).
    key: the sampler's noise (eta > 0).
    samples: outputs averaged (batched along N); they differ only for eta > 0.
    eta: 0 (DDIM, deterministic) .. 1 (ancestral).
    config: the U-Net's config (padding, grey through colour); None: eps_fn takes y as it is.

  Returns:
    (H, W, C) float32 in [0, 1]: the mean of the clipped samples.
  """
  _check(nfe, samples, eta)
  key, k_start = jax.random.split(key)
  x_start, t, unframe = _observed_start(schedule, y, sigma, k_start, samples, config)
  return _reverse(eps_fn, schedule, x_start, t, nfe, key, eta, unframe)


def sdedit(eps_fn: EpsFn, schedule: Schedule, x_hat: Array, t_start: Array | int, nfe: int,
           key: Array, *, samples: int = 1, eta: float = 0.0, fresh_noise: bool = True,
           config: UNetConfig | None = None) -> Array:
  """SDEdit (Meng et al. 2022): x_hat forward-noised to t_start, then DDIM to 0.

  Args:
    x_hat: (H, W, C) the image to start from, in [0, 1].
    t_start: int in [1, T] (may be traced); T with any x_hat samples (almost) from pure noise.
    fresh_noise: x_t = sqrt(abar_t) x_hat + sqrt(1 - abar_t) eps with eps ~ N(0, I) drawn per
      sample (stochastic; the default). False: x_t = sqrt(abar_t) x_hat, x_hat's own error
      taken as the noise (as :func:`ddpm_denoise` takes y's; deterministic for eta = 0).
    eps_fn, schedule, nfe, key, samples, eta, config: as :func:`ddpm_denoise`.

  Returns:
    (H, W, C) float32 in [0, 1], the mean of the clipped samples.
  """
  _check(nfe, samples, eta)
  framed, unframe = _frame(x_hat, config)
  k_noise, k_sample = jax.random.split(key)
  x_start = jnp.broadcast_to(jnp.sqrt(schedule.alphas_cumprod[t_start])
                             * diffusion.to_model(framed), (samples,) + framed.shape)
  if fresh_noise:
    eps = jax.random.normal(k_noise, x_start.shape, jnp.float32)
    x_start = x_start + jnp.sqrt(1.0 - schedule.alphas_cumprod[t_start]) * eps
  return _reverse(eps_fn, schedule, x_start, t_start, nfe, k_sample, eta, unframe)


def dip_ddpm(eps_fn: EpsFn, schedule: Schedule, x_hat: Array, est_mse: Array | float,
             nfe: int, key: Array, *, samples: int = 1, eta: float = 0.0,
             fresh_noise: bool = True, config: UNetConfig | None = None) -> Array:
  """Refines a DIP estimate with the DDPM: :func:`sdedit` from t' = :func:`dip_timestep`
  (est_mse), the timestep matched to x_hat's own estimated error, not set by hand.

  Args:
    x_hat: (H, W, C) the DIP output (EMA, mean over seeds) in [0, 1].
    est_mse: x_hat's estimated MSE against the clean image, [0, 1] units squared:
      :func:`estimate_dip_error` (the discrepancy), or a staged fit's SURE estimate.
    The rest as :func:`sdedit` (fresh_noise=True by default: SDEdit's stochastic noising).

  Returns:
    (H, W, C) float32 in [0, 1].
  """
  return sdedit(eps_fn, schedule, x_hat, dip_timestep(schedule, est_mse), nfe, key,
                samples=samples, eta=eta, fresh_noise=fresh_noise, config=config)


def guide_weight(schedule: Schedule, t: Array | int, est_mse: Array | float) -> Array:
  """The default blending weight of :func:`dip_guided` at timestep t: w_t = s_t^2 / (s_t^2 +
  4 est_mse), s_t = noise_level(t), in (0, 1], decreasing to ~0 as t -> 0.

  The inverse-variance combination of two estimates of x0 (model units): the model's, whose
  error is taken as at most the noise of x_t / sqrt(abar_t) (variance s_t^2, exact for the
  identity denoiser, an upper bound for a good one), and the DIP's (variance 4 est_mse).
  """
  s2 = jnp.square(schedules.noise_level(schedule, t))
  return s2 / (s2 + 4.0 * jnp.asarray(est_mse, jnp.float32))


def dip_guided(eps_fn: EpsFn, schedule: Schedule, x_hat: Array, y: Array,
               sigma: Array | float, nfe: int, key: Array, *, weight: float | None = None,
               est_mse: Array | float | None = None, samples: int = 1, eta: float = 0.0,
               config: UNetConfig | None = None) -> Array:
  """DDPM denoising of y guided by a DIP estimate: :func:`ddpm_denoise` (DDIM from
  sqrt(abar_{t*}) y at t* = :func:`matched_timestep` (sigma)), where every step blends the
  model's x0 prediction with x_hat, x0 <- (1 - w_t) x0 + w_t x_hat, and recomputes eps from the
  blend before the DDIM update (``diffusion.ddim_sample``'s x0_fn), in one ``lax.scan``.

  Args:
    x_hat: (H, W, C) the DIP estimate in [0, 1]; y: (H, W, C) the noisy observation.
    sigma: y's noise std, [0, 1] units.
    weight: None (default): w_t = :func:`guide_weight` (t, est_mse), the inverse-variance
      weight, high at t* where the model's x0 is blurry, ~0 near t = 0 where it is sharp. A
      float in [0, 1]: that constant weight at every step (1: returns x_hat; 0: plain
      :func:`ddpm_denoise`).
    est_mse: x_hat's estimated MSE for the default weights; None: :func:`estimate_dip_error`.
    eps_fn, schedule, nfe, key, samples, eta, config: as :func:`ddpm_denoise`.

  Returns:
    (H, W, C) float32 in [0, 1].
  """
  _check(nfe, samples, eta)
  if weight is not None and not 0.0 <= weight <= 1.0:
    raise ValueError(f"weight must lie in [0, 1] (or be None), got {weight}")
  key, k_start = jax.random.split(key)
  x_start, t, unframe = _observed_start(schedule, y, sigma, k_start, samples, config)
  guide = diffusion.to_model(_frame(x_hat, config)[0])
  if weight is None:
    est = estimate_dip_error(x_hat, y, sigma) if est_mse is None else est_mse
    weight_at = lambda t: guide_weight(schedule, t, est)
  else:
    weight_at = lambda t: weight

  def blend(x0: Array, t: Array) -> Array:
    w = weight_at(t)
    return (1.0 - w) * x0 + w * guide

  return _reverse(eps_fn, schedule, x_start, t, nfe, key, eta, unframe, blend)
