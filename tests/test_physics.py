"""Physics: an operator and its noise model as one forward model."""

import numpy as np
import pytest

from dipjax import noise
from dipjax import operators
from dipjax import physics
from dipjax import pipeline


def _image(size=16, channels=3):
  return np.random.default_rng(0).uniform(0.1, 0.9, (size, size, channels)).astype(np.float32)


def test_measure_applies_the_operator_then_the_noise():
  x = _image()
  model = physics.Physics(operators.downsampler(2), noise.GaussianNoise(10 / 255))
  y = model.measure(x, np.random.default_rng(4))
  ax = np.asarray(operators.downsampler(2)(x))
  assert y.shape == (8, 8, 3) and y.dtype == np.float32
  np.testing.assert_array_equal(y, noise.add_noise(4, ax, 10 / 255))
  noiseless = physics.Physics(operators.identity(), noise.GaussianNoise(0.0))
  np.testing.assert_array_equal(noiseless.measure(x, np.random.default_rng(0)), x)


def test_noise_level_known_or_estimated():
  y = noise.add_noise(0, np.full((64, 64, 1), 0.5, np.float32), 20 / 255)
  assert physics.Physics(operators.identity(), noise.GaussianNoise(0.1)).noise_level(y) == 0.1
  estimated = physics.Physics(operators.identity(), noise.GaussianNoise()).noise_level(y)
  assert estimated == pytest.approx(20 / 255, rel=0.1)
  with pytest.raises(ValueError, match="unknown sigma"):
    noise.GaussianNoise().sample(np.random.default_rng(0), y)
  for bad in (-0.1, 25.0, float("nan"), float("inf")):  # 25: 0-255 units
    with pytest.raises(ValueError, match="sigma must be a finite number"):
      noise.GaussianNoise(bad)


def test_the_pipeline_degrades_through_its_physics():
  clean = _image()
  mask = np.zeros((16, 16))
  mask[::2] = 1
  config = pipeline.RestoreConfig(task="inpaint", sigma=15)
  model = pipeline.make_physics(config, mask)
  assert isinstance(model.operator, operators.Mask) and model.noise.sigma == 15 / 255
  np.testing.assert_array_equal(pipeline.degrade(config, clean, seed=2, mask=mask),
                                model.measure(clean, np.random.default_rng(2)))
  frame = pipeline.make_frame(config, pipeline.degrade(config, clean, seed=2, mask=mask),
                              mask=mask)
  assert frame.physics.operator.mask.shape == (32, 32, 1)  # padded to the network's multiple
  assert pipeline.make_physics(pipeline.RestoreConfig(sigma_known=False)).noise.sigma is None


def test_super_resolution_of_saturated_edges_stays_in_range():
  """Lanczos taps are negative: A x overshoots [0, 1] at a black-white edge; the observation is
  clipped as the noise model says, with or without noise, and restore takes it."""
  edge = np.zeros((64, 64, 3), np.float32)
  edge[:, 32:] = 1.0
  assert np.asarray(operators.downsampler(4)(edge)).min() < 0
  for sigma in (0.0, 10.0):
    config = pipeline.RestoreConfig(task="sr", factor=4, sigma=sigma)
    y = pipeline.degrade(config, edge, seed=0)
    assert y.shape == (16, 16, 3) and 0 <= y.min() and y.max() <= 1
    assert pipeline.make_frame(config, y, edge).y.shape == (16, 16, 3)
