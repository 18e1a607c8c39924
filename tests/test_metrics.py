"""Tests for dipjax.metrics against scikit-image."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from skimage import metrics as skm

from dipjax import metrics


def _pair(shape, seed=0, smooth=False):
  rng = np.random.default_rng(seed)
  a = rng.uniform(size=shape).astype(np.float32)
  if smooth:
    yy, xx = np.meshgrid(*[np.linspace(0, 1, n) for n in shape[:2]], indexing="ij")
    a = (0.5 + 0.4 * np.sin(6 * yy + 3 * xx))[..., None].repeat(shape[2], -1).astype(np.float32)
  b = np.clip(a + 0.1 * rng.standard_normal(shape), 0, 1).astype(np.float32)
  return a, b


def _sk_ssim(a, b):
  return skm.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False, data_range=1, channel_axis=-1)


@pytest.mark.parametrize("channels", [1, 3])
def test_psnr_matches_skimage(channels):
  a, b = _pair((32, 40, channels))
  want = skm.peak_signal_noise_ratio(a, b, data_range=1)
  np.testing.assert_allclose(metrics.psnr(a, b), want, rtol=1e-4)
  np.testing.assert_allclose(metrics.psnr(2 * a, 2 * b, data_range=2.0), want, rtol=1e-4)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("smooth", [False, True])
def test_ssim_matches_skimage(channels, smooth):
  a, b = _pair((48, 44, channels), seed=channels, smooth=smooth)
  np.testing.assert_allclose(metrics.ssim(a, b), _sk_ssim(a, b), atol=1e-4)


def test_identical_images():
  a, _ = _pair((24, 24, 3))
  np.testing.assert_allclose(metrics.ssim(a, a), 1.0, atol=1e-5)
  assert np.isinf(metrics.psnr(a, a))


def test_batched_jit_vmap():
  a, b = _pair((2, 3, 16, 16, 3))
  p, s = metrics.psnr(a, b), metrics.ssim(a, b)
  assert p.shape == s.shape == (2, 3)
  np.testing.assert_allclose(s[1, 2], _sk_ssim(a[1, 2], b[1, 2]), atol=1e-4)
  np.testing.assert_allclose(jax.jit(metrics.psnr)(a, b), p, rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(metrics.ssim)(a, b), s, atol=1e-6)


def test_bad_shapes():
  with pytest.raises(ValueError, match="equal shape"):
    metrics.psnr(np.zeros((8, 8, 3)), np.zeros((8, 8, 1)))
  with pytest.raises(ValueError, match="at least 11x11"):
    metrics.ssim(np.zeros((8, 8, 1)), np.zeros((8, 8, 1)))


def test_psnr_y_matches_skimage_luma():
  """The SR tables' figure: BT.601 luma (skimage's rgb2ycbcr, Y in [16, 235]), border trimmed."""
  from skimage import color
  a, b = _pair((32, 40, 3))
  y = lambda x: color.rgb2ycbcr(x)[4:-4, 4:-4, 0]
  want = skm.peak_signal_noise_ratio(y(a), y(b), data_range=255)
  np.testing.assert_allclose(metrics.psnr_y(a, b, border=4), want, atol=1e-4)
  grey = metrics.psnr_y(a[..., :1], b[..., :1])
  plain = metrics.psnr(a[..., :1], b[..., :1])
  np.testing.assert_allclose(grey, plain + 20 * np.log10(255 / 219), atol=1e-4)
  with pytest.raises(ValueError, match="border"):
    metrics.psnr_y(a, b, border=16)
