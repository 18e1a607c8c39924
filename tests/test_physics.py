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


def test_deblurring_through_the_pipeline(tmp_path):
  """task 'deblur': the kernel from the config (Gaussian, seeded motion, or a file), the
  blurred observation, and a fit through the blur operator."""
  import jax
  clean = _image(32)
  motion = pipeline.RestoreConfig(task="deblur", blur="motion", blur_size=7, blur_seed=2,
                                  sigma=2.55, method="dip", width=4, scales=1, iters=20,
                                  stop=("oracle",))
  op = pipeline.make_physics(motion).operator
  assert isinstance(op, operators.Blur) and op.kernel.shape == (7, 7)
  np.testing.assert_allclose(op.kernel, operators.motion_kernel(2, 7), rtol=1e-6)
  np.save(tmp_path / "k.npy", 3 * operators.motion_kernel(2, 7))
  from_file = pipeline.RestoreConfig(task="deblur", blur="file", blur_file=str(tmp_path / "k.npy"))
  np.testing.assert_allclose(pipeline.make_physics(from_file).operator.kernel, op.kernel,
                             rtol=1e-6)
  y = pipeline.degrade(motion, clean, seed=0)
  assert y.shape == clean.shape and np.abs(y - clean).mean() > 0.01
  result = pipeline.restore(motion, y, key=jax.random.PRNGKey(0), clean=clean)
  assert result.image.shape == clean.shape and np.isfinite(result.image).all()
  assert result.summary()["stops"]["oracle"]["iteration"][0] >= 1
  with pytest.raises(ValueError, match="blur kernel is larger than the"):
    pipeline.make_frame(pipeline.RestoreConfig(task="deblur", blur="motion", blur_size=63,
                                               scales=1), y[:16, :16])
  with pytest.raises(ValueError, match="blur 'file' needs blur_file"):
    pipeline.RestoreConfig(task="deblur", blur="file")


def test_poisson_noise_statistics_and_level():
  x = np.full((128, 128, 1), 0.4, np.float32)
  model = noise.PoissonNoise(peak=20.0)
  y = model.sample(np.random.default_rng(0), x)
  assert y.dtype == np.float32 and 0 <= y.min() and y.max() <= 1
  assert np.mean(y) == pytest.approx(0.4, abs=0.01)
  assert np.var(y) == pytest.approx(0.4 / 20, rel=0.05)  # Var Poisson(peak a) / peak = a / peak
  assert np.allclose(y * 20, np.round(y * 20), atol=1e-5)  # counts / peak
  assert model.level(y) == pytest.approx(np.sqrt(0.4 / 20), rel=0.02)
  mixed = noise.PoissonNoise(peak=20.0, sigma=0.05)
  assert np.var(mixed.sample(np.random.default_rng(0), x)) == pytest.approx(0.02 + 0.0025,
                                                                             rel=0.05)
  for bad in (dict(peak=0.0), dict(peak=float("nan")), dict(peak=10.0, sigma=2.0)):
    with pytest.raises(ValueError):
      noise.PoissonNoise(**bad)


def test_poisson_denoising_through_the_pipeline():
  import jax
  clean = _image(32)
  config = pipeline.RestoreConfig(noise="poisson", peak=10, width=4, scales=1, iters=20)
  assert config.sigma == 0 and config.stop == ("staged",)  # the probe scaled to the Poisson std
  y = pipeline.degrade(config, clean, seed=1)
  np.testing.assert_array_equal(
      y, noise.PoissonNoise(10.0).sample(np.random.default_rng(1), clean))
  result = pipeline.restore(config, y, key=jax.random.PRNGKey(0), clean=clean)
  assert result.sigma == pytest.approx(np.sqrt(np.mean(y) / 10), rel=1e-5)
  assert np.isfinite(result.image).all()
  with pytest.raises(ValueError, match="takes Gaussian noise only"):
    pipeline.RestoreConfig(noise="poisson", method="ddpm", ddpm_weights="x.npz")


def _ramp(size: int = 96) -> np.ndarray:
  """A smooth colour ramp over [0.05, 0.95]: every level present, no texture."""
  t = np.linspace(0.05, 0.95, size, dtype=np.float32)
  return np.stack([np.add.outer(t, t) / 2, np.add.outer(t, 1 - t) / 2,
                   np.broadcast_to(t[:, None], (size, size))], -1)


@pytest.mark.parametrize("peak,read", [(10.0, 0.0), (60.0, 8 / 255), (200.0, 10 / 255)])
def test_poisson_gaussian_noise_is_estimated_from_the_image(peak, read):
  """The noise's variance against the level recovers the photon count (also at peak 10, whose
  steps of 1 / peak defeat a median) and the read noise; white Gaussian noise reads as a peak
  too high to matter and its sigma."""
  clean = _ramp()
  y = noise.PoissonNoise(peak, read).sample(np.random.default_rng(0), clean)
  got_peak, got_read = noise.estimate_poisson_gaussian(y)
  assert got_peak == pytest.approx(peak, rel=0.1)
  assert got_read == pytest.approx(read, abs=2 / 255)
  white = noise.add_noise(1, clean, 0.1)
  got_peak, got_read = noise.estimate_poisson_gaussian(white)
  assert 0.5 / got_peak < 0.01 * 0.1**2 and got_read == pytest.approx(0.1, rel=0.05)


def test_poisson_gaussian_estimate_survives_a_sensor_s_clipping_and_flat_areas():
  """A white level under 1, a constant patch and a black band (no noise there) leave the
  estimate near the truth; too small an image, too narrow a range of levels (photon and read
  noise cannot be told apart) and NaN give one clear error each."""
  y = noise.PoissonNoise(60.0, 8 / 255).sample(np.random.default_rng(0), _ramp())
  for name, edit in (("white at 0.9", lambda z: np.minimum(z, 0.9)),
                     ("constant patch", lambda z: np.where(np.arange(96)[:, None, None] < 24,
                                                           np.float32(0.5), z)),
                     ("black band", lambda z: np.where(np.arange(96)[:, None, None] < 16, 0, z))):
    peak, read = noise.estimate_poisson_gaussian(edit(y))
    assert peak == pytest.approx(60.0, rel=0.15) and read == pytest.approx(8 / 255, abs=3 / 255)
  with pytest.raises(ValueError, match="needs 1024 2 x 2 blocks"):
    noise.estimate_poisson_gaussian(y[:40, :40, :1])
  with pytest.raises(ValueError, match="too narrow to tell photon from read noise"):
    noise.estimate_poisson_gaussian(noise.add_noise(0, np.full((96, 96, 1), 0.5), 0.1))
  with pytest.raises(ValueError, match="finite"):
    noise.estimate_poisson_gaussian(np.where(np.eye(96)[..., None] > 0, np.nan, y))


def test_a_raw_photo_s_poisson_gaussian_noise_is_estimated_once_and_reported():
  import jax
  clean = _ramp(48)
  y = pipeline.degrade(pipeline.RestoreConfig(noise="poisson", peak=60.0, sigma=8.0), clean,
                       seed=0)
  config = pipeline.RestoreConfig(noise="poisson", sigma_known=False, width=4, scales=1,
                                  iters=10)
  resolved = pipeline.resolve_noise(config, y)
  peak, read = noise.estimate_poisson_gaussian(y)
  assert resolved.sigma_known and resolved.peak == round(peak, 3)
  assert resolved.sigma == round(255 * read, 4)
  result = pipeline.restore(config, y, key=jax.random.PRNGKey(0))
  assert result.noise_used == noise.PoissonNoise(resolved.peak, resolved.sigma / 255)
  summary = result.summary()
  assert summary["peak_used"] == resolved.peak and summary["read_sigma_used"] == resolved.sigma
  with pytest.raises(ValueError, match="no noise found"):
    pipeline.resolve_noise(config, clean)


def test_poisson_std_map_is_unbiased_in_variance():
  """PURE's variance estimate: E[y / peak] = A x / peak, entry by entry (below white, where
  clipping at 1 is rare); the Gaussian model's map is its one sigma everywhere."""
  x = np.linspace(0.05, 0.5, 64, dtype=np.float32).reshape(8, 8, 1)
  model = noise.PoissonNoise(peak=10.0)
  rng = np.random.default_rng(5)
  var = np.mean([model.std_map(model.sample(rng, x)) ** 2 for _ in range(4000)], axis=0)
  np.testing.assert_allclose(var, x / 10, rtol=0.06)
  assert model.std_map(np.zeros((4, 4, 1), np.float32)).min() > 0  # black: still defined
  np.testing.assert_array_equal(noise.GaussianNoise(0.1).std_map(x), np.full(x.shape, 0.1,
                                                                             np.float32))


def test_fit_error_estimate_undoes_the_blur_on_a_white_error():
  """A fit's output x + e, e white of variance v, seen through a blur with noise sigma: its
  residual's mean square less sigma^2 is gain * v; white_gain=True gives v back."""
  rng = np.random.default_rng(3)
  clean = rng.uniform(0.2, 0.8, (128, 128, 3)).astype(np.float32)
  config = pipeline.RestoreConfig(task="deblur", blur="gaussian", sigma=2.55)
  op, sigma, v = pipeline.make_physics(config).operator, 2.55 / 255, 0.02 ** 2
  y = pipeline.degrade(config, clean, seed=0)
  x_hat = clean + np.sqrt(v) * rng.standard_normal(clean.shape).astype(np.float32)
  held_out = float(np.mean(np.square(np.asarray(op(x_hat)) - y)))
  raw = pipeline.fit_error_estimate(config, held_out, y, x_hat, sigma, white_gain=False)
  assert raw == pytest.approx(op.white_noise_gain() * v, rel=0.1)
  assert pipeline.fit_error_estimate(config, held_out, y, x_hat, sigma) == pytest.approx(
      v, rel=0.1)


def _lag_correlation(n: np.ndarray) -> tuple[float, float]:
  """Correlation of a noise field (H, W, C) with itself one pixel across and one channel over."""
  n = n - n.mean()
  return (float(np.mean(n * np.roll(n, 1, axis=1)) / n.var()),
          float(np.mean(n * np.roll(n, 1, axis=2)) / n.var()))


def test_correlated_noise_keeps_its_variance_and_the_kernel_s_correlation():
  kernel = noise.correlation_kernel(0.7).astype(np.float64)
  assert np.sum(kernel**2) == pytest.approx(1.0, rel=1e-5)
  expected = np.sum(kernel[:, 1:] * kernel[:, :-1])  # the kernel's autocorrelation at lag 1
  white = np.random.default_rng(0).standard_normal((96, 96, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(noise.correlate(white, 0.0)), white)
  shaped = np.asarray(noise.correlate(white, 0.7))
  assert shaped.std() == pytest.approx(white.std(), rel=0.05)
  across, between = _lag_correlation(shaped)
  assert across == pytest.approx(expected, abs=0.03) and abs(between) < 0.03
  model = noise.GaussianNoise(20 / 255, correlation=0.7)
  y = model.sample(np.random.default_rng(1), np.full((128, 128, 3), 0.5, np.float32))
  assert np.std(y) == pytest.approx(20 / 255, rel=0.05)
  assert _lag_correlation(y)[0] == pytest.approx(expected, abs=0.03)
  # the wavelet estimate reads correlated noise low unless told its correlation
  assert noise.estimate_sigma(y) < 0.5 * 20 / 255
  assert noise.GaussianNoise(None, 0.7).level(y) == pytest.approx(20 / 255, rel=0.05)
  for bad in (-1.0, float("nan"), noise.MAX_CORRELATION + 1):
    with pytest.raises(ValueError, match="correlation is a kernel's std"):
      noise.GaussianNoise(0.1, correlation=bad)
  with pytest.raises(ValueError, match="noise_corr correlates Gaussian noise"):
    pipeline.RestoreConfig(noise="poisson", noise_corr=0.7)


def test_the_staged_probe_takes_the_noise_s_correlation():
  import jax
  from dipjax import inputs, problems, schedules
  net_input = inputs.dip_noise(jax.random.PRNGKey(0), 48, 48, channels=2)
  y = np.full((48, 48, 3), 0.5, np.float32)
  probes = [np.asarray(problems.staged_problem(
      jax.random.PRNGKey(1), net_input, y, operators.identity(), 10,
      schedule=schedules.get("linear"), num_stages=2, t_max=30, sigma=0.1, probe_ratio=0.5,
      correlation=width).probe) for width in (0.0, 1.0)]
  kernel = noise.correlation_kernel(1.0).astype(np.float64)
  assert abs(_lag_correlation(probes[0])[0]) < 0.05
  assert _lag_correlation(probes[1])[0] == pytest.approx(
      np.sum(kernel[:, 1:] * kernel[:, :-1]), abs=0.05)
  assert probes[1].std() == pytest.approx(0.05, rel=0.1)


def test_noise_level_and_correlation_estimated_together():
  rng = np.random.default_rng(0)
  flat = np.full((128, 128, 3), 0.5, np.float32)
  for width in (0.0, 0.5, 0.7):
    y = noise.GaussianNoise(20 / 255, width).sample(rng, flat)
    sigma, found = noise.estimate_noise(y)
    assert sigma == pytest.approx(20 / 255, rel=0.06)
    assert found == pytest.approx(width, abs=0.1 if width else 0.3)
    unknown = noise.GaussianNoise(None, None)
    assert unknown.width(y) == found and unknown.level(y) == sigma
  assert noise.estimate_noise(flat) == (0.0, 0.0)
  with pytest.raises(ValueError, match="unknown sigma or correlation"):
    noise.GaussianNoise(0.1, None).sample(rng, flat)
  with pytest.raises(ValueError, match="give noise_corr for inpainting"):
    pipeline.RestoreConfig(task="inpaint", noise_corr=None)
  with pytest.raises(ValueError, match="known sigma and correlation"):
    pipeline.degrade(pipeline.RestoreConfig(noise_corr=None), flat, seed=0)


def test_a_real_photo_s_noise_correlation_is_estimated_once_and_reported():
  import jax
  clean = np.broadcast_to(np.linspace(0.3, 0.7, 32, dtype=np.float32)[:, None, None],
                          (32, 32, 3))
  y = pipeline.degrade(pipeline.RestoreConfig(sigma=25.0, noise_corr=0.7), clean, seed=0)
  config = pipeline.RestoreConfig(sigma_known=False, noise_corr=None, width=4, scales=1,
                                  iters=10)
  result = pipeline.restore(config, y, key=jax.random.PRNGKey(0))
  sigma, width = noise.estimate_noise(y)
  assert result.noise_used.correlation == round(width, 3) > noise.WHITE_BELOW
  assert result.sigma == pytest.approx(noise.estimate_sigma(y, round(width, 3)))
  assert result.noise_used.sigma == result.sigma
  assert result.summary()["noise_corr_used"] == result.noise_used.correlation
