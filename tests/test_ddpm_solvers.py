"""dipjax.ddpm.solvers: exact with an oracle eps predictor (any NFE), padding and grey images
through a colour model, the DIP error estimate, a tiny random U-Net on an odd grey image (the
scripts' tests: test_ddpm_scripts.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_ddpm
from dipjax import io
from dipjax import noise
from dipjax import schedules
from dipjax.ddpm import diffusion
from dipjax.ddpm import solvers
from dipjax.ddpm.unet import EpsUNet, UNetConfig

CONFIG = tiny_ddpm.CONFIG
SCHEDULE = schedules.linear()
SIGMA = 25 / 255


def _oracle(x0):
  """The exact eps predictor for the image x0 ((H, W, C) in [0, 1]), in the model's units."""
  m = diffusion.to_model(jnp.asarray(x0))

  def eps(x, t):
    abar = SCHEDULE.alphas_cumprod[t][:, None, None, None]
    return (x - jnp.sqrt(abar) * m) / jnp.sqrt(1.0 - abar)

  return eps


_image = tiny_ddpm.image


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  return tiny_ddpm.tiny_weights(tmp_path_factory.mktemp("ddpm") / "tiny.npz")


def _noisy(x, sigma=SIGMA, seed=1):
  return noise.add_noise(seed, x, sigma)


def test_matched_timestep():
  sigmas = np.array([0.0, 0.2, 1, 5, 15, 25, 50, 100]) / 255
  t = np.asarray(solvers.matched_timestep(SCHEDULE, sigmas))
  levels = np.asarray(schedules.noise_level(SCHEDULE, np.arange(SCHEDULE.num_steps + 1)))
  for sigma, t_star in zip(sigmas, t):
    # In the model's [-1, 1] the noise std is 2 sigma: the closest level over t in [1, T].
    assert t_star == 1 + np.argmin(np.abs(levels[1:] - 2 * sigma))
  assert t[0] == t[1] == 1 and np.all(np.diff(t) >= 0)
  assert t[5] == 57 and t[6] == 115  # sigma = 25 and 50, linear schedule
  assert solvers.matched_timestep(SCHEDULE, 100.0) == SCHEDULE.num_steps  # beyond sigma_T
  np.testing.assert_array_equal(solvers.dip_timestep(SCHEDULE, np.square(sigmas)), t)


@pytest.mark.parametrize("t_start,nfe", [(57, 1), (57, 5), (115, 50), (1000, 7), (3, 3)])
def test_timesteps_is_timestep_sequence(t_start, nfe):
  np.testing.assert_array_equal(jax.jit(solvers.timesteps, static_argnums=1)(t_start, nfe),
                                diffusion.timestep_sequence(t_start, nfe))


def test_timesteps_repeat_beyond_t_start():
  ts = np.asarray(solvers.timesteps(3, 5))
  assert ts[0] == 3 and ts.min() == 1 and np.all(np.diff(ts) <= 0)
  with pytest.raises(ValueError, match="nfe"):
    solvers.timesteps(10, 0)


def test_sampler_skips_repeated_timesteps():
  """timesteps(3, 5) = 3, 3, 2, 2, 1: three network evaluations, the same x_0 as 3, 2, 1."""
  calls = []

  def eps_fn(x, t):
    jax.debug.callback(lambda t: calls.append(int(t[0])), t)
    return 0.1 * x

  x = jnp.linspace(-1.0, 1.0, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
  key = jax.random.PRNGKey(0)
  run = jax.jit(lambda ts: diffusion.ddim_sample(eps_fn, SCHEDULE, x, ts, key))
  repeated = jax.block_until_ready(run(solvers.timesteps(3, 5)))
  assert sorted(calls) == [1, 2, 3]
  np.testing.assert_allclose(repeated, run(jnp.array([3, 2, 1])), atol=1e-6)


@jax.jit
def _denoise_fns(x0, y, sigma, est):
  """ddpm_denoise and dip_ddpm (fresh noise, 2 samples; and noise-free) with an oracle, for
  several NFE."""
  key = jax.random.PRNGKey(0)
  eps = _oracle(x0)
  out = {}
  for nfe in (1, 3, 20):
    out[f"ddpm{nfe}"] = solvers.ddpm_denoise(eps, SCHEDULE, y, sigma, nfe, key)
    out[f"sdedit{nfe}"] = solvers.dip_ddpm(eps, SCHEDULE, y, est, nfe, key, samples=2)
  out["deterministic"] = solvers.dip_ddpm(eps, SCHEDULE, y, est, 4, key, fresh_noise=False,
                                          eta=0.5)
  return out


def test_with_an_oracle_every_method_returns_the_clean_image():
  x0 = _image((6, 10, 3))
  y = _noisy(x0)
  for name, out in _denoise_fns(x0, y, SIGMA, 0.003).items():
    assert out.shape == x0.shape, name
    np.testing.assert_allclose(out, x0, atol=1e-5, err_msg=name)


def test_dip_guided_weight_one_is_the_dip_estimate_and_zero_plain_ddim():
  x0, x_hat = _image((6, 10, 3)), _image((6, 10, 3), seed=2)
  y = _noisy(x0)
  eps = _oracle(_image((6, 10, 3), seed=3))  # a wrong model: the outputs differ
  key = jax.random.PRNGKey(0)
  run = jax.jit(lambda w: solvers.dip_guided(eps, SCHEDULE, x_hat, y, SIGMA, 4, key, weight=w),
                static_argnums=0)
  np.testing.assert_allclose(run(1.0), x_hat, atol=1e-6)
  plain = solvers.ddpm_denoise(eps, SCHEDULE, y, SIGMA, 4, key)
  np.testing.assert_allclose(run(0.0), plain, atol=1e-6)
  guided = run(None)  # inverse-variance weights from the discrepancy estimate
  assert np.abs(guided - plain).max() > 1e-3 and np.abs(guided - x_hat).max() > 1e-3
  w = np.asarray(solvers.guide_weight(SCHEDULE, np.arange(1, 101), 1e-3))
  assert np.all(np.diff(w) > 0) and w[0] < 0.05 and 0.5 < w[-1] < 1
  with pytest.raises(ValueError, match="weight"):
    solvers.dip_guided(eps, SCHEDULE, x_hat, y, SIGMA, 4, key, weight=1.5)


def test_padding_to_the_multiple_and_grey_through_colour():
  """An oracle of the padded colour image: the output is exact only if y is padded as the
  oracle's x0 (reflect, split as io.pad_to_multiple) and cropped back."""
  config = UNetConfig(channels=8, channel_mults=(1, 2, 2), norm_groups=4)  # multiple 4
  colour = _image((9, 14, 3))
  framed, padding = io.pad_to_multiple(colour, 4)
  assert framed.shape == (12, 16, 3) and padding.top == 1 and padding.left == 1
  key = jax.random.PRNGKey(0)
  out = solvers.ddpm_denoise(_oracle(framed), SCHEDULE, _noisy(colour), SIGMA, 2, key,
                             config=config)
  np.testing.assert_allclose(out, colour, atol=1e-5)
  # A grey image through a colour model: its channel replicated in, the channel mean out.
  grey = colour.mean(-1, keepdims=True)
  out = solvers.dip_ddpm(_oracle(framed), SCHEDULE, grey, 1e-3, 2, key, config=config)
  assert out.shape == (9, 14, 1)
  np.testing.assert_allclose(out, grey, atol=1e-5)
  out = solvers.ddpm_denoise(_oracle(np.repeat(io.pad_to_multiple(grey, 4)[0], 3, -1)),
                             SCHEDULE, _noisy(grey), SIGMA, 2, key, config=config)
  np.testing.assert_allclose(out, grey, atol=1e-5)
  # Its noise, the same in every channel, made white: std sqrt(3) sigma in each channel.
  flat = np.full((64, 64, 1), 0.5, np.float32)
  noisy = flat + SIGMA * np.random.default_rng(0).standard_normal(flat.shape).astype(np.float32)
  x, t, _ = solvers._observed_start(SCHEDULE, noisy, SIGMA, key, 1, config)
  e = np.asarray(x[0]).reshape(-1, 3) / np.sqrt(SCHEDULE.alphas_cumprod[t]) / 2  # [0, 1] units
  np.testing.assert_allclose(np.cov(e.T), 3 * SIGMA**2 * np.eye(3), atol=0.1 * SIGMA**2)
  assert t == solvers.matched_timestep(SCHEDULE, np.sqrt(3) * SIGMA) == solvers.matched_timestep(
      SCHEDULE, solvers.observed_sigma(SIGMA, 1, config))
  with pytest.raises(ValueError, match="3-channel"):
    solvers.ddpm_denoise(_oracle(framed), SCHEDULE, _noisy(colour), SIGMA, 2, key,
                         config=UNetConfig(channels=8, norm_groups=4, image_channels=1))
  with pytest.raises(ValueError, match="nfe"):
    solvers.ddpm_denoise(_oracle(framed), SCHEDULE, _noisy(colour), SIGMA, 0, key)


def test_tiny_unet_on_an_odd_grey_image(weights):
  _, params = weights
  grey = _image((13, 10, 1))
  y = _noisy(grey)
  x_hat = np.clip(grey + 0.02, 0, 1)
  eps = lambda p: (lambda x, t: EpsUNet(CONFIG).apply({"params": p}, x, t))
  run = jax.jit(lambda p, key: solvers.dip_guided(eps(p), SCHEDULE, x_hat, y, SIGMA, 3, key,
                                                  samples=2, eta=1.0, config=CONFIG))
  a, b = run(params, jax.random.PRNGKey(0)), run(params, jax.random.PRNGKey(1))
  assert a.shape == (13, 10, 1) and np.all(np.isfinite(a))
  assert 0 <= a.min() and a.max() <= 1
  assert np.abs(a - b).max() > 0  # eta = 1: the key matters


def test_estimate_dip_error():
  rng = np.random.default_rng(0)
  clean = rng.uniform(0.3, 0.7, (64, 64, 3)).astype(np.float32)
  sigma = 0.05
  y = clean + sigma * rng.standard_normal(clean.shape).astype(np.float32)  # unclipped
  x_hat = clean + 0.03 * rng.standard_normal(clean.shape).astype(np.float32)
  est = float(solvers.estimate_dip_error(x_hat, y, sigma))
  true = float(np.mean((x_hat - clean) ** 2))
  assert abs(est - true) < 0.05 * true
  assert float(solvers.estimate_dip_error(y, y, sigma, floor=1e-5)) == pytest.approx(1e-5)


def test_estimate_dip_error_of_clipped_noise():
  """sigma = 50/255 on a dark-and-bright image: clipping removes much of the noise, and the
  estimate subtracts the clipped noise's energy, not sigma^2."""
  rng = np.random.default_rng(1)
  clean = np.where(rng.uniform(size=(64, 64, 3)) < 0.5, 0.1, 0.9).astype(np.float32)
  sigma = 50 / 255
  y = np.clip(clean + sigma * rng.standard_normal(clean.shape), 0, 1).astype(np.float32)
  x_hat = np.clip(clean + 0.05 * rng.standard_normal(clean.shape), 0, 1).astype(np.float32)
  true = float(np.mean((x_hat - clean) ** 2))
  assert np.mean((x_hat - y) ** 2) < sigma**2  # so sigma^2 would give the floor
  assert abs(float(solvers.estimate_dip_error(x_hat, y, sigma)) - true) < 0.03 * sigma**2
