"""experiments/baselines.py: the TV deconvolution baseline deblurs and picks its lambda by the
discrepancy principle (no ground truth); bicubic SR has the output's shape."""

import os
import sys

import numpy as np
import pytest

from dipjax import io
from dipjax import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import baselines  # pylint: disable=g-import-not-at-top,wrong-import-position

restoration = pytest.importorskip("skimage.restoration",
                                  reason="needs scikit-image (pip install -e '.[test]')")


def _clean():
  return io.center_crop(io.load_image(os.path.join(ROOT, "assets", "house.png")), 48, 48)


def test_tv_deconvolution_deblurs_within_the_noise():
  config = pipeline.RestoreConfig(task="deblur", sigma=7.65, blur_size=9, method="dip")
  clean = _clean()
  y = pipeline.degrade(config, clean, seed=0)
  x = baselines.tv_deconvolution(config, y, restoration.denoise_tv_chambolle, iters=20)
  psnr = lambda a: pipeline.score(a, clean)["psnr"]
  assert psnr(x) > psnr(y) + 1.0
  op = pipeline.make_physics(config).operator
  residual = float(np.sum((np.asarray(op.apply(x)) - y) ** 2))
  target = baselines.discrepancy_target(config, y, x)
  assert 0.8 * target < residual <= target  # lambda at the discrepancy principle's bound


def test_bicubic_has_the_outputs_shape():
  config = pipeline.RestoreConfig(task="sr", factor=2, method="dip")
  clean = _clean()
  y = pipeline.degrade(config, clean, seed=0)
  found = baselines.baselines(config, y, None, clean.shape)
  assert found["bicubic"].shape == clean.shape and found["bicubic"].dtype == np.float32


def test_bm3d_told_the_noise_spectrum_removes_correlated_noise():
  pytest.importorskip("bm3d", reason="needs bm3d (pip install -e '.[baselines]')")
  config = pipeline.RestoreConfig(sigma=25.0, noise_corr=0.7)
  clean = _clean()
  y = pipeline.degrade(config, clean, seed=0)
  found = baselines.baselines(config, y, None, clean.shape)
  psnr = {k: pipeline.score(v, clean)["psnr"] for k, v in found.items()}
  assert psnr["cbm3d_psd"] > psnr["cbm3d"] + 1.0 > pipeline.score(y, clean)["psnr"] + 1.0


def test_generalised_anscombe_bm3d_takes_the_read_noise():
  """Poisson-Gaussian noise through the generalised Anscombe transform: told the read noise it
  denoises; the plain Anscombe transform, blind to it, leaves most of the noise."""
  pytest.importorskip("bm3d", reason="needs bm3d (pip install -e '.[baselines]')")
  clean = _clean()
  y = pipeline.noise.PoissonNoise(peak=60.0, sigma=20 / 255).sample(np.random.default_rng(0),
                                                                     clean)
  psnr = lambda a: pipeline.score(np.asarray(a, np.float32), clean)["psnr"]
  told = psnr(baselines.anscombe_bm3d(y, 60.0, 20 / 255))
  assert told > psnr(baselines.anscombe_bm3d(y, 60.0)) + 2.0 > psnr(y) + 2.0
