"""Image quality metrics for images in [0, 1], shape (H, W, C) or batches (..., H, W, C).

Both functions are thin wrappers of dm_pix that accept any number of leading batch axes and
raise ValueError on mismatched shapes; they are jittable and vmappable.
"""

from __future__ import annotations

from typing import Callable

import dm_pix as pix
import jax
import jax.numpy as jnp

Array = jax.Array

SSIM_WINDOW = 11  # dm_pix's default Gaussian window (sigma 1.5), as in skimage's gaussian SSIM.


def _check_pair(a: Array, b: Array, name: str) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{name} needs images of equal shape, got {a.shape} and {b.shape}")
  if a.ndim < 3:
    raise ValueError(f"{name} needs images (H, W, C) or batches (..., H, W, C), got {a.shape}")


def _per_image(fn: Callable[[Array, Array], Array], a: Array, b: Array) -> Array:
  """Applies `fn` ((N, H, W, C) pairs -> (N,)) to (..., H, W, C) pairs; returns shape (...)."""
  batch = a.shape[:-3]
  flat = lambda x: jnp.asarray(x, jnp.float32).reshape((-1,) + x.shape[-3:])
  return fn(flat(a), flat(b)).reshape(batch)


def psnr(a: Array, b: Array, data_range: float = 1.0) -> Array:
  """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE) over the last three axes.

  Args:
    a, b: images (..., H, W, C).
    data_range: max - min of the allowed values (1 for images in [0, 1]).

  Returns:
    PSNR of each image pair, shape (...); inf for identical images.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  _check_pair(a, b, "psnr")
  return _per_image(lambda x, y: pix.psnr(x / data_range, y / data_range), a, b)


def ssim(a: Array, b: Array) -> Array:
  """Mean structural similarity over the last three axes, for images in [0, 1].

  dm_pix's defaults (11x11 Gaussian window, sigma 1.5, k1 0.01, k2 0.03, max_val 1, valid
  windows only); equals ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1)``. Colour images give
  the mean of the per-channel SSIMs.

  Args:
    a, b: images (..., H, W, C) with H, W >= 11.

  Returns:
    SSIM of each image pair, shape (...), in [-1, 1].
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  _check_pair(a, b, "ssim")
  if min(a.shape[-3:-1]) < SSIM_WINDOW:
    raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, "
                     f"got {a.shape[-3]}x{a.shape[-2]}")
  return _per_image(pix.ssim, a, b)
