"""The classical baselines of the task report (experiments/task_report.py), flag-free: bicubic
(SR), biharmonic inpainting, Wiener / Richardson-Lucy / TV deconvolution, Anscombe + (C)BM3D
(Poisson), (C)BM3D as if white and told the noise's spectrum (correlated Gaussian noise).
scikit-image and bm3d are optional extras: a missing one is named, not raised.
"""

from __future__ import annotations

import jax
import numpy as np
from PIL import Image

import common
from dipjax import noise
from dipjax import operators
from dipjax import pipeline

TV_ITERS = 60  # proximal-gradient iterations per TV solve
TV_BISECTIONS = 8  # solves of the TV deconvolution's lambda search


def baselines(config: pipeline.RestoreConfig, y: np.ndarray, mask: np.ndarray | None,
              out_shape: tuple[int, ...]) -> dict[str, np.ndarray | str]:
  """The task's classical baselines on y: an image each, or why it is missing."""
  found = {}
  if config.task == "sr":
    size = (out_shape[1], out_shape[0])
    up = lambda c: np.asarray(Image.fromarray(common.uint8(c)).resize(size, Image.BICUBIC))
    found["bicubic"] = np.stack([up(y[..., c]) for c in range(y.shape[-1])], -1) / 255
    return {"bicubic": found["bicubic"].astype(np.float32)}
  if config.task == "denoise" and config.noise == "gaussian" and config.sigma:
    try:
      found["cbm3d"] = common.bm3d_denoise(y, config.sigma / 255)  # as if the noise were white
      if config.noise_corr:
        found["cbm3d_psd"] = correlated_bm3d(y, config.sigma / 255, config.noise_corr)
    except ImportError:
      found["cbm3d"] = "bm3d not installed (pip install -e '.[baselines]')"
    return _clipped(found)
  try:
    from skimage import restoration  # optional: pip install scikit-image
  except ImportError:
    return {"scikit-image": "not installed"}
  if config.task == "inpaint":
    found["biharmonic"] = restoration.inpaint_biharmonic(y, mask[..., 0] < 0.5, channel_axis=-1)
  elif config.task == "deblur":
    psf = pipeline.blur_kernel(config)
    psf = psf / psf.sum()
    per_channel = lambda f: np.stack([f(y[..., c]) for c in range(y.shape[-1])], -1)
    found["wiener"] = per_channel(
        lambda c: restoration.unsupervised_wiener(c, psf, rng=0)[0])  # a seeded Gibbs sampler
    r = psf.shape[0] // 2  # the observation's blur is circular: so is the deconvolution's

    def lucy(c):
      return restoration.richardson_lucy(np.pad(c, r, mode="wrap"), psf, 30)[r:-r, r:-r]

    found["richardson_lucy"] = per_channel(lucy)
    found["tv"] = tv_deconvolution(config, y, restoration.denoise_tv_chambolle)
  elif config.noise == "poisson":  # the generalised Anscombe where there is read noise
    try:
      found["bm3d_anscombe"] = anscombe_bm3d(y, config.peak, config.sigma / 255)
    except ImportError:
      found["bm3d_anscombe"] = "bm3d not installed (pip install -e '.[baselines]')"
  return _clipped(found)


def _clipped(found: dict) -> dict:
  return {k: np.clip(v, 0, 1).astype(np.float32) if isinstance(v, np.ndarray) else v
          for k, v in found.items()}


def correlated_bm3d(y: np.ndarray, sigma: float, width: float) -> np.ndarray:
  """(C)BM3D of y (H, W, C) told the noise's power spectrum: Gaussian of std `sigma` per entry,
  correlated by dipjax.noise.correlate(., width). bm3d's convention (its examples): the PSD of
  noise = kernel * white is |FFT(kernel)|^2 * H * W, the kernel of energy sigma^2."""
  import bm3d  # optional extra: pip install -e '.[baselines]'
  if not hasattr(np, "trapz"):  # bm4d 4.2's PSD path calls np.trapz, gone in NumPy 2.4: the
    np.trapz = np.trapezoid      # alias is set on numpy itself, for this process
  h, w = y.shape[:2]
  impulse = np.zeros((h, w, 1), np.float32)
  impulse[0, 0] = 1.0
  kernel = np.asarray(noise.correlate(impulse, width))[..., 0]  # unit energy, wrapped
  psd = sigma**2 * np.abs(np.fft.fft2(kernel)) ** 2 * h * w
  if y.shape[-1] == 3:
    out = bm3d.bm3d_rgb(y, np.repeat(psd[..., None], 3, -1))
  else:
    out = bm3d.bm3d(y[..., 0], psd)[..., None]
  return np.clip(out, 0, 1).astype(np.float32)


def discrepancy_target(config: pipeline.RestoreConfig, y: np.ndarray, x: np.ndarray) -> float:
  """The noise's expected energy in y: n sigma^2, less where y's noise was clipped to [0, 1]
  (at the clean measurement taken as A x; :func:`dipjax.pipeline.noise_energy`)."""
  return y.size * pipeline.noise_energy(config, y, x, config.sigma / 255)


def tv_deconvolution(config: pipeline.RestoreConfig, y: np.ndarray, tv_prox,
                     iters: int = TV_ITERS) -> np.ndarray:
  """argmin_x 1/2 ||A x - y||^2 + lam TV(x) for the config's blur A, by proximal gradient (unit
  step: the kernel sums to 1, so ||A|| <= 1; the prox of TV by Chambolle's algorithm, `tv_prox` =
  scikit-image's denoise_tv_chambolle, per channel), lam chosen without the ground truth by the
  discrepancy principle: the largest with ||A x - y||^2 within :func:`discrepancy_target`
  (bisection in log lam over [1e-5, 1], each solve warm-started from the last)."""
  op = pipeline.make_physics(config).operator
  forward = jax.jit(op.apply)
  back = jax.jit(lambda r: operators.adjoint(op, r, y.shape))
  x = y.copy()

  def solve(lam: float, x: np.ndarray) -> tuple[np.ndarray, float]:
    for _ in range(iters):
      x = tv_prox(x - np.asarray(back(forward(x) - y)), weight=lam, channel_axis=-1)
    return x, float(np.sum((np.asarray(forward(x)) - y) ** 2))

  lo, hi, best = np.log(1e-5), 0.0, None
  for _ in range(TV_BISECTIONS):
    mid = (lo + hi) / 2
    x, residual = solve(float(np.exp(mid)), x)
    if residual <= discrepancy_target(config, y, x):
      lo, best = mid, x
    else:
      hi = mid
  return best if best is not None else solve(1e-5, x)[0]


def anscombe_bm3d(y: np.ndarray, peak: float, read_sigma: float = 0.0) -> np.ndarray:
  """(C)BM3D of a Poisson observation of `peak` photons at white, with Gaussian read noise of
  std `read_sigma` ([0, 1] units), through the generalised Anscombe transform (unit variance;
  the plain one at read_sigma 0) and the closed-form approximation of its exact unbiased
  inverse (Makitalo & Foi, 2011 and 2013)."""
  counts = y * peak  # the read noise in photon units: read_sigma * peak
  s2 = (read_sigma * peak) ** 2
  a = 2 * np.sqrt(np.maximum(counts + 3 / 8 + s2, 0))
  lo, hi = a.min(), a.max()
  d = common.bm3d_denoise((a - lo) / (hi - lo), 1 / (hi - lo)) * (hi - lo) + lo
  d = np.maximum(d, 1e-3)
  inverse = (d / 2) ** 2 + np.sqrt(1.5) / 4 / d - 11 / 8 / d**2 + 5 * np.sqrt(1.5) / 8 / d**3
  return np.maximum(inverse - 1 / 8 - s2, 0) / peak
