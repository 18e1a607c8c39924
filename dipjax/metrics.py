"""Image quality metrics for images in [0, 1], shape (H, W, C) or batches (..., H, W, C).

psnr and ssim are thin wrappers of dm_pix; psnr_y is the super-resolution literature's luma PSNR.
All accept any number of leading batch axes, raise ValueError on mismatched shapes, and are
jittable and vmappable.
"""

from __future__ import annotations

from typing import Callable

import dm_pix as pix
import jax
import jax.numpy as jnp

Array = jax.Array

SSIM_WINDOW = 11  # dm_pix's default Gaussian window (sigma 1.5), as in skimage's gaussian SSIM.
# The per-batch kernels, each one compiled program per shape (not a few dozen eager ops).
_PSNR = jax.jit(lambda a, b, data_range: pix.psnr(a / data_range, b / data_range))
_SSIM = jax.jit(pix.ssim)


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
  return _per_image(lambda x, y: _PSNR(x, y, data_range), a, b)


# ITU-R BT.601 luma on the studio range [16, 235] / 255 (MATLAB's rgb2ycbcr, OpenCV's YCrCb
# rescaled as in the DIP repository's super-resolution_eval_script.py).
_LUMA = (65.481 / 255, 128.553 / 255, 24.966 / 255)


def psnr_y(a: Array, b: Array, border: int = 0) -> Array:
  """PSNR (dB) of the BT.601 luma, Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255, with
  `border` pixels trimmed from every side: the protocol of super-resolution tables (the DIP
  paper's Set5 / Set14 figures; border = the scale factor by convention).

  Args:
    a, b: RGB images (..., H, W, 3) in [0, 1] (grey (..., H, W, 1): Y = (16 + 219 g) / 255).
    border: pixels dropped at each edge before the error, 0 <= border < min(H, W) / 2.

  Returns:
    PSNR of each image pair's luma, shape (...).
  """
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  _check_pair(a, b, "psnr_y")
  if a.shape[-1] not in (1, 3):
    raise ValueError(f"psnr_y needs RGB or grey images, got {a.shape[-1]} channels")
  if not 0 <= border < min(a.shape[-3:-1]) / 2:
    raise ValueError(f"psnr_y: border {border} must be in [0, {min(a.shape[-3:-1]) / 2})")
  weights = jnp.asarray(_LUMA) if a.shape[-1] == 3 else jnp.asarray([219 / 255])
  luma = lambda x: (x[..., border:x.shape[-3] - border, border:x.shape[-2] - border, :]
                    @ weights)[..., None]  # the offset 16 / 255 cancels in the difference
  return psnr(luma(a), luma(b))


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
  return _per_image(_SSIM, a, b)
