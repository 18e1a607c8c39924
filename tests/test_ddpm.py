"""The DDPM: samplers recover x0 with an oracle, the posterior matches its closed form, a tiny
U-Net trains and resumes exactly, weights round-trip, the script refuses bad input. One tiny
model, data set and compiled training function for the whole module."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dipjax import checkpoint
from dipjax import schedules
from dipjax.ddpm import diffusion
from dipjax.ddpm import train
from dipjax.ddpm.unet import EpsUNet, UNetConfig, eps_fn

CONFIG = UNetConfig(channels=8, channel_mults=(1, 2), num_res_blocks=1, attention=True,
                    norm_groups=4)
TRAIN = train.TrainConfig(batch_size=4, patch_size=16, learning_rate=2e-3, warmup_steps=0)
CHUNK = 20
SCHEDULE = schedules.linear()
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "experiments", "train_ddpm.py")


def _write_images(folder, sizes=((20, 24), (24, 20), (16, 30), (20, 20))):
  """Smooth colour images of the given (height, width) as PNGs; returns them in [0, 1]."""
  os.makedirs(folder, exist_ok=True)
  images = []
  for k, (h, w) in enumerate(sizes):
    yy, xx = np.mgrid[0:h, 0:w]
    x = np.stack([np.sin(0.3 * xx + k), np.cos(0.4 * yy - k), np.sin(0.2 * (xx + yy))], -1)
    x = np.round((x + 1) * 127.5).astype(np.uint8)
    Image.fromarray(x).save(os.path.join(folder, f"{k}.png"))
    images.append(x.astype(np.float32) / 255)
  return images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  folder = tmp_path_factory.mktemp("train")
  return str(folder), _write_images(folder)


@pytest.fixture(scope="module")
def data(images):
  return train.load_dataset(images[0], 3, TRAIN.patch_size)


@pytest.fixture(scope="module")
def train_fn():
  return train.make_train_fn(CONFIG, TRAIN, CHUNK)


@pytest.fixture(scope="module")
def initial():
  # Committed to the device, as restored checkpoints are: both then hit one compiled train_fn.
  return jax.device_put(train.init_train_state(jax.random.PRNGKey(0), CONFIG, TRAIN), jax.devices()[0])


@pytest.fixture(scope="module")
def trained(initial, data, train_fn):
  """(state after 2 x CHUNK steps, the state after the first CHUNK, all 2 x CHUNK losses)."""
  half, first = train_fn(initial, data)
  state, second = train_fn(half, data)
  return state, half, np.concatenate([first, second])


def _oracle(x0):
  """The exact eps predictor for data x0: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""

  def eps(x, t):
    abar = SCHEDULE.alphas_cumprod[t][:, None, None, None]
    return (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)

  return eps


@jax.jit
def _ddim_from(x0, x_start, timesteps):
  return diffusion.ddim_sample(_oracle(x0), SCHEDULE, x_start, timesteps, jax.random.PRNGKey(0))


@jax.jit
def _ddpm_from(x0, x_start, timesteps):
  return diffusion.ddpm_sample(_oracle(x0), SCHEDULE, x_start, timesteps, jax.random.PRNGKey(1))


@pytest.mark.parametrize("nfe", [1, 2, 5])
@pytest.mark.parametrize("t_start", [5, 100, 600, 1000])
def test_samplers_with_an_oracle_recover_x0(t_start, nfe):
  rng = np.random.default_rng(t_start + nfe)
  x0 = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  x_start = schedules.q_sample(SCHEDULE, x0, t_start, rng.standard_normal(x0.shape, np.float32))
  ts = diffusion.timestep_sequence(t_start, nfe)
  np.testing.assert_allclose(_ddim_from(x0, x_start, ts), x0, atol=2e-4)
  if nfe == 5:  # one compile of the ancestral sampler
    np.testing.assert_allclose(_ddpm_from(x0, x_start, ts), x0, atol=2e-4)


def test_ddim_eta_one_is_the_ancestral_sampler():
  eps_fn_ = lambda x, t: 0.3 * x + 1e-3 * t[:, None, None, None].astype(jnp.float32)
  x_start = np.random.default_rng(3).standard_normal((2, 4, 4, 1), np.float32)
  ts = diffusion.timestep_sequence(1000, 10)
  key = jax.random.PRNGKey(4)
  ddim = jax.jit(lambda x: diffusion.ddim_sample(eps_fn_, SCHEDULE, x, ts, key, eta=1.0))
  ddpm = jax.jit(lambda x: diffusion.ddpm_sample(eps_fn_, SCHEDULE, x, ts, key))
  np.testing.assert_allclose(ddim(x_start), ddpm(x_start), atol=1e-4)
  assert float(jnp.max(jnp.abs(ddim(x_start)))) <= 1.0  # clip_x0: the last step returns x0


def test_posterior_mean_variance_matches_gaussian_conditioning():
  abar = np.asarray(SCHEDULE.alphas_cumprod, np.float64)  # the float32 schedule, in float64
  rng = np.random.default_rng(0)
  t = np.array([1, 2, 50, 999, 1000])
  x0, x_t = rng.uniform(-1, 1, (2, 5, 3, 3, 1))
  cases = [(None, t - 1), (np.array([0, 1, 10, 500, 7]), np.array([0, 1, 10, 500, 7]))]
  for s_arg, s in cases:
    b = lambda v: v[:, None, None, None]
    # q(x_s, x_t | x0) is jointly Gaussian: condition x_s on x_t.
    cov = np.sqrt(abar[t] / abar[s]) * (1 - abar[s])
    mean = b(np.sqrt(abar[s])) * x0 + b(cov / (1 - abar[t])) * (x_t - b(np.sqrt(abar[t])) * x0)
    var = (1 - abar[s]) - cov ** 2 / (1 - abar[t])
    got_mean, got_var = diffusion.posterior_mean_variance(
        SCHEDULE, jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32), t, s_arg)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_var).reshape(-1), var, rtol=1e-5, atol=1e-9)


def test_predict_x0_inverts_q_sample():
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (3, 4, 4, 3)).astype(np.float32)
  eps = rng.standard_normal(x0.shape, np.float32)
  t = jnp.array([1, 300, 900])
  round_trip = jax.jit(lambda x0: diffusion.predict_x0(
      SCHEDULE, schedules.q_sample(SCHEDULE, x0, t, eps), t, eps))
  np.testing.assert_allclose(round_trip(x0), x0, atol=1e-4)


def test_x0_loss_is_the_one_step_estimate_error():
  """With the exact epsilon the loss is 0; an epsilon off by c everywhere moves x0_hat by
  c sqrt(1 - abar) / sqrt(abar) in [-1, 1], half that in [0, 1] (t fixed by t_lo = t_hi)."""
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.uniform(-1, 1, (2, 12, 12, 3)), jnp.float32)
  key, t, c = jax.random.PRNGKey(3), 57, 0.3
  loss = jax.jit(lambda eps_fn: diffusion.x0_loss(eps_fn, SCHEDULE, x0, key, t_hi=t, frac_hi=1.0,
                                                  t_lo=t), static_argnums=0)
  assert float(loss(_oracle(x0))) < 1e-10
  abar = float(SCHEDULE.alphas_cumprod[t])
  np.testing.assert_allclose(float(loss(lambda x, s: _oracle(x0)(x, s) + c)),
                             c**2 * (1 - abar) / (4 * abar), rtol=1e-4)
  with_ssim = diffusion.x0_loss(lambda x, s: _oracle(x0)(x, s) + c, SCHEDULE, x0, key, t_hi=t,
                                frac_hi=1.0, t_lo=t, ssim_weight=1.0)
  assert float(with_ssim) > float(loss(lambda x, s: _oracle(x0)(x, s) + c))


@pytest.mark.parametrize("t_start,nfe", [(1, 1), (7, 7), (10, 3), (1000, 1), (1000, 25),
                                         (137, 10), (250, 249)])
def test_timestep_sequence(t_start, nfe):
  ts = diffusion.timestep_sequence(t_start, nfe)
  assert ts.shape == (nfe,) and ts.dtype == np.int32
  assert ts[0] == t_start and ts[-1] >= 1
  gaps = -np.diff(np.append(ts, 0))                 # the steps taken, the last one to 0
  assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1
  assert gaps.sum() == t_start


def test_timestep_sequence_errors():
  for t_start, nfe in [(10, 0), (10, 11), (0, 1)]:
    with pytest.raises(ValueError, match="nfe"):
      diffusion.timestep_sequence(t_start, nfe)


def test_sample_timesteps_concentrates_below_t_hi():
  key = jax.random.PRNGKey(0)
  uniform = np.asarray(diffusion.sample_timesteps(key, 20000, 1000))
  assert uniform.min() >= 1 and uniform.max() <= 1000 and abs(uniform.mean() - 500.5) < 10
  mixed = np.asarray(diffusion.sample_timesteps(key, 20000, 1000, t_hi=100, frac_hi=0.5))
  assert mixed.min() >= 1 and mixed.max() <= 1000
  assert abs(np.mean(mixed <= 100) - (0.5 + 0.5 * 0.1)) < 0.015
  with pytest.raises(ValueError, match="t_hi"):
    diffusion.sample_timesteps(key, 4, 1000, t_hi=1001)
  ranged = np.asarray(diffusion.sample_timesteps(key, 2000, 1000, t_hi=167, frac_hi=1.0, t_lo=9))
  assert ranged.min() == 9 and ranged.max() == 167
  with pytest.raises(ValueError, match="t_lo"):
    diffusion.sample_timesteps(key, 4, 1000, t_hi=100, t_lo=101)


def test_to_and_from_model():
  x = jnp.array([0.0, 0.25, 1.0])
  np.testing.assert_allclose(diffusion.to_model(x), [-1.0, -0.5, 1.0])
  np.testing.assert_allclose(diffusion.from_model(diffusion.to_model(x)), x)


def test_sample_batch_takes_flipped_crops_of_the_images(images, data):
  _, originals = images
  assert data.images.dtype == jnp.uint8 and data.images.shape == (4, 20, 30, 3)
  np.testing.assert_array_equal(data.transposed, [False, True, False, False])
  batch = np.asarray(jax.jit(lambda k: train.sample_batch(k, data, 32, 16))(
      jax.random.PRNGKey(0)))
  assert batch.shape == (32, 16, 16, 3) and batch.dtype == np.float32

  def windows(x):
    h, w = x.shape[:2]
    return [v[i:i + 16, j:j + 16] for v in (x, x[:, ::-1])
            for i in range(h - 15) for j in range(w - 15)]

  candidates = np.stack([c for x in originals for c in windows(x)])
  for patch in batch:
    assert np.abs(candidates - patch).max(axis=(1, 2, 3)).min() < 1e-6
  grey = train.load_dataset(images[0], 1, 16)
  assert grey.images.shape == (4, 20, 30, 1)


def test_load_dataset_errors(tmp_path, images):
  with pytest.raises(ValueError, match="no such folder"):
    train.load_dataset(tmp_path / "missing", 3, 16)
  with pytest.raises(ValueError, match="no images"):
    train.load_dataset(tmp_path, 3, 16)
  with pytest.raises(ValueError, match="smaller than a 24x24 patch"):
    train.load_dataset(images[0], 3, 24)
  (tmp_path / "bad.png").write_bytes(b"not an image")
  with pytest.raises(ValueError, match="cannot read"):
    train.load_dataset(tmp_path, 3, 16)


def test_unet_is_fully_convolutional(trained):
  """Trained on 16x16 patches, it runs at 8x24 (one compile: each size is one)."""
  state = trained[0]
  out = jax.jit(lambda x: EpsUNet(CONFIG).apply({"params": state.params}, x, jnp.array([10, 500])))(
      jnp.ones((2, 8, 24, 3)))
  assert out.shape == (2, 8, 24, 3) and bool(jnp.all(jnp.isfinite(out)))
  assert float(jnp.std(out)) > 0
  with pytest.raises(ValueError, match="multiples of 2"):
    EpsUNet(CONFIG).apply({"params": state.params}, jnp.ones((1, 15, 16, 3)), jnp.zeros(1))


def test_training_loss_decreases(trained):
  state, _, losses = trained
  assert losses.shape == (2 * CHUNK,) and np.all(np.isfinite(losses))
  assert losses[-8:].mean() < 0.8 * losses[:8].mean()
  assert int(state.step) == 2 * CHUNK
  ema, params = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)])
                 for p in (state.ema_params, state.params))
  assert not np.array_equal(ema, params)  # the EMA lags the parameters


def test_resume_from_checkpoint_equals_uninterrupted(initial, trained, data, train_fn,
                                                     tmp_path):
  uninterrupted, half, losses = trained
  checkpoint.save(tmp_path, CHUNK, {"state": half})
  restored = checkpoint.load(tmp_path, {"state": initial})["state"]
  resumed, second = train_fn(restored, data)
  np.testing.assert_array_equal(second, losses[CHUNK:])
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_denoiser_fine_tune_lowers_its_loss_and_resumes(trained, data, tmp_path):
  """The x0 loss at the timesteps of a noise range (with SSIM) from the trained model: the loss
  falls, and a checkpointed half resumes to the uninterrupted state."""
  tune = train.TrainConfig(batch_size=4, patch_size=16, learning_rate=2e-3, warmup_steps=0,
                           loss="x0", ssim_weight=0.2, t_lo=9, t_hi=167, frac_hi=1.0)
  tune_fn = train.make_train_fn(CONFIG, tune, CHUNK)
  start = jax.device_put(train.init_train_state(jax.random.PRNGKey(1), CONFIG, tune,
                                                trained[0].ema_params), jax.devices()[0])
  half, first = tune_fn(start, data)
  state, second = tune_fn(half, data)
  assert np.all(np.isfinite(np.concatenate([first, second])))
  key = jax.random.PRNGKey(7)  # one fixed batch, timesteps and noise: before and after
  x0 = diffusion.to_model(train.sample_batch(key, data, 16, tune.patch_size))
  loss = jax.jit(lambda params: diffusion.x0_loss(eps_fn(CONFIG, params), SCHEDULE, x0, key,
                                                  t_hi=167, frac_hi=1.0, t_lo=9))
  assert float(loss(state.params)) < 0.9 * float(loss(start.params))
  checkpoint.save(tmp_path, CHUNK, {"state": half})
  resumed, again = tune_fn(checkpoint.load(tmp_path, {"state": start})["state"], data)
  np.testing.assert_array_equal(again, second)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_grey_model_from_colour_predicts_the_channel_mean(trained):
  """adapt_channels: the grey model's eps is the colour model's eps on the replicated grey image,
  averaged over channels; a fine-tuning state starts from those parameters."""
  params = trained[0].params
  grey_params, grey = train.adapt_channels(params, CONFIG, 1)
  assert grey.image_channels == 1 and train.adapt_channels(params, CONFIG, 3)[1] == CONFIG
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 1))
  t = jnp.array([30, 700])
  colour = EpsUNet(CONFIG).apply({"params": params}, jnp.broadcast_to(x, (2, 8, 8, 3)), t)
  eps = EpsUNet(grey).apply({"params": grey_params}, x, t)
  assert float(jnp.std(colour)) > 0.01
  np.testing.assert_allclose(eps, jnp.mean(colour, -1, keepdims=True), atol=2e-5)
  state = train.init_train_state(jax.random.PRNGKey(1), grey, TRAIN, grey_params)
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(grey_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="only a colour"):
    train.adapt_channels(grey_params, grey, 3)
  with pytest.raises(ValueError, match="initial parameters"):
    train.init_train_state(jax.random.PRNGKey(1), CONFIG, TRAIN, grey_params)


def test_weights_round_trip(trained, tmp_path):
  params = trained[0].ema_params
  path = tmp_path / "sub" / "w.npz"
  train.save_weights(path, params, CONFIG)
  loaded, config = train.load_weights(path)
  assert config == CONFIG
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert train.load_weights(path, CONFIG)[1] == CONFIG


def test_weights_errors(trained, tmp_path):
  params = trained[0].ema_params
  with pytest.raises(FileNotFoundError, match="no DDPM weights file"):
    train.load_weights(tmp_path / "missing.npz")
  (tmp_path / "junk.npz").write_bytes(b"junk")
  with pytest.raises(ValueError, match="not a dipjax DDPM weights file"):
    train.load_weights(tmp_path / "junk.npz")
  with pytest.raises(ValueError, match="end in .npz"):
    train.save_weights(tmp_path / "w.npy", params, CONFIG)
  with pytest.raises(ValueError, match="missing parameters"):
    train.save_weights(tmp_path / "w.npz", params, UNetConfig(channels=8, norm_groups=4))
  path = tmp_path / "w.npz"
  train.save_weights(path, params, CONFIG)
  with pytest.raises(ValueError, match="different model.*channels"):
    train.load_weights(path, UNetConfig(channels=16, channel_mults=(1, 2), num_res_blocks=1,
                                        attention=True, norm_groups=4))
  with np.load(path) as z:
    arrays = dict(z)
  arrays["params/Conv_0/kernel"] = np.zeros((3, 3, 3, 5), np.float32)
  np.savez(tmp_path / "bad.npz", **arrays)
  with pytest.raises(ValueError, match="Conv_0/kernel has shape"):
    train.load_weights(tmp_path / "bad.npz")


def test_config_validation_and_json():
  config = UNetConfig(channels=16, channel_mults=[1, 2, 4], attention=True, image_channels=1)
  assert config.channel_mults == (1, 2, 4) and config.multiple == 4
  assert UNetConfig.from_json(config.to_json()) == config
  with pytest.raises(ValueError, match="norm_groups"):
    UNetConfig(channels=12, norm_groups=8)
  with pytest.raises(ValueError, match="image_channels"):
    UNetConfig(image_channels=2)
  with pytest.raises(ValueError, match="not a UNetConfig"):
    UNetConfig.from_json('{"channels": 8}')
  with pytest.raises(ValueError, match="ema_decay"):
    train.TrainConfig(ema_decay=1.0)
  with pytest.raises(ValueError, match="loss must be one of eps, x0"):
    train.TrainConfig(loss="l1")
  with pytest.raises(ValueError, match="ssim_weight applies to loss 'x0' only"):
    train.TrainConfig(ssim_weight=0.1, t_hi=100, frac_hi=1.0)
  with pytest.raises(ValueError, match="t_lo"):
    train.TrainConfig(t_lo=5)
  with pytest.raises(ValueError, match="loss 'x0' needs its timesteps in a range"):
    train.TrainConfig(loss="x0")


def _script(*args):
  return subprocess.run([sys.executable, SCRIPT, "--cache_dir=", *args], capture_output=True,
                        text=True, timeout=120)


def test_script_refuses_test_sets_and_bad_data(tmp_path):
  _write_images(tmp_path / "CSet9" / "x", sizes=((32, 32),))
  result = _script(f"--data={tmp_path / 'CSet9' / 'x'}", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 1
  assert "refusing to train on" in result.stderr and "CSet9 is a test set" in result.stderr
  _write_images(tmp_path / "small", sizes=((32, 40),))
  result = _script(f"--data={tmp_path / 'small'}", "--patch=64", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 1 and "smaller than a 64x64 patch" in result.stderr
  result = _script(f"--data={tmp_path / 'small'}", f"--init_weights={tmp_path / 'none.npz'}",
                   f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 1 and "no DDPM weights file" in result.stderr
  result = _script(f"--data={tmp_path / 'small'}", "--sigma_range=5,75", "--t_hi=100",
                   f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 1 and "give it or --t_hi / --frac_hi" in result.stderr
  assert not (tmp_path / "run").exists()
