"""dipjax.ddpm.solvers: exact with an oracle eps predictor (any NFE), padding and grey images
through a colour model, the DIP error estimate; experiments/restore.py's DDPM methods and
experiments/ddpm_report.py end to end with one tiny random U-Net saved for the module."""

import json
import re
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dipjax import io
from dipjax import noise
from dipjax import schedules
from dipjax.ddpm import diffusion
from dipjax.ddpm import solvers
from dipjax.ddpm import train
from dipjax.ddpm.unet import EpsUNet, UNetConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESTORE = os.path.join(ROOT, "experiments", "restore.py")
REPORT = os.path.join(ROOT, "experiments", "ddpm_report.py")
CONFIG = UNetConfig(channels=8, channel_mults=(1, 2), num_res_blocks=1, norm_groups=4)
SCHEDULE = schedules.linear()
SIGMA = 25 / 255


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """A tiny random U-Net as a weights file: (path, params). Drawn on the host (nothing to
  compile): kernels N(0, 1 / fan_in), zero-initialised ones included (so that eps != 0),
  biases N(0, 0.01^2), GroupNorm scales 1."""
  shapes = jax.eval_shape(lambda: EpsUNet(CONFIG).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)))["params"]
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      return jnp.ones(leaf.shape)
    std = 0.01 if name == "bias" else 1 / np.sqrt(np.prod(leaf.shape[:-1]))
    return jnp.asarray(std * rng.standard_normal(leaf.shape), jnp.float32)

  params = jax.tree_util.tree_map_with_path(draw, shapes)
  path = tmp_path_factory.mktemp("ddpm") / "tiny.npz"
  train.save_weights(path, params, CONFIG)
  return str(path), params


def _oracle(x0):
  """The exact eps predictor for the image x0 ((H, W, C) in [0, 1]), in the model's units."""
  m = diffusion.to_model(jnp.asarray(x0))

  def eps(x, t):
    abar = SCHEDULE.alphas_cumprod[t][:, None, None, None]
    return (x - jnp.sqrt(abar) * m) / jnp.sqrt(1.0 - abar)

  return eps


def _image(shape, seed=0, lo=0.05, hi=0.95):
  return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)


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


def _run(script, *args, check=True):
  proc = subprocess.run([sys.executable, script, "--cache_dir=", *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=300)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_restore_cli_ddpm_end_to_end(weights, tmp_path):
  out = tmp_path / "out"
  _run(RESTORE, "--method=ddpm", "--crop=32", "--nfe=2", f"--ddpm_weights={weights[0]}",
       f"--out_dir={out}")
  result = json.loads((out / "metrics.json").read_text())
  ddpm = result["ddpm"]
  assert ddpm["t_start"] == 57 and ddpm["nfe"] == 2 and ddpm["seconds"] > 0
  assert ddpm["model"]["channels"] == CONFIG.channels
  assert result["restored"]["psnr"] == ddpm["psnr"] > 0 and 0 < ddpm["ssim"] <= 1
  assert io.load_image(out / "restored.png").shape == (32, 32, 3)
  assert not (out / "trace.csv").exists()  # no fit


def test_restore_cli_dip_ddpm_after_a_short_fit(weights, tmp_path):
  out = tmp_path / "out"
  _run(RESTORE, "--method=dip_ddpm", "--crop=32", "--width=4", "--scales=1", "--nfe=1",
       "--stop=oracle", f"--ddpm_weights={weights[0]}", f"--out_dir={out}")
  result = json.loads((out / "metrics.json").read_text())
  assert result["iterations"] == 300  # the hybrids' default budget
  ddpm = result["ddpm"]
  assert ddpm["est_mse"] > 0 and 1 <= ddpm["t_start"] <= 1000 and ddpm["steps"] == 1
  assert result["restored"]["psnr"] == ddpm["psnr"] and "psnr" in result["dip"]
  assert (out / "trace.csv").exists()


def test_restore_cli_posterior_solvers(weights, tmp_path):
  """DDNM from noise on inpainting satisfies the data (noise-free: A x = y on the known
  pixels); DPS from a short DIP fit on SR takes t* from its held-out error (the default 0.05)."""
  out = tmp_path / "ddnm"
  _run(RESTORE, "--method=ddnm", "--task=inpaint", "--mask_kind=random", "--crop=32", "--nfe=2",
       f"--ddpm_weights={weights[0]}", f"--out_dir={out}")
  ddpm = json.loads((out / "metrics.json").read_text())["ddpm"]
  assert ddpm["t_start"] == 1000 and ddpm["steps"] == 2 and ddpm["est_mse"] is None
  restored, degraded = (np.load(out / f"{n}.npy") for n in ("restored", "degraded"))
  known = np.any(degraded > 0, axis=-1)  # the generated mask's known pixels (non-black here)
  np.testing.assert_allclose(restored[known], degraded[known], atol=1e-4)
  out = tmp_path / "dip_dps"
  _run(RESTORE, "--method=dip_dps", "--task=sr", "--factor=2", "--crop=32", "--width=4",
       "--scales=1", "--iters=50", "--nfe=1", f"--ddpm_weights={weights[0]}", f"--out_dir={out}")
  result = json.loads((out / "metrics.json").read_text())
  assert result["config"]["holdout"] == 0.05 and result["config"]["stop"] == ["holdout"]
  ddpm = result["ddpm"]
  assert ddpm["est_mse"] > 0 and 1 <= ddpm["t_start"] <= 1000 and ddpm["steps"] == 1
  assert np.load(out / "restored.npy").shape == (32, 32, 3)


def test_restore_cli_ddpm_errors(weights, tmp_path):
  cases = [
      (["--method=ddpm", f"--ddpm_weights={tmp_path / 'missing.npz'}"],
       "no DDPM weights file .*missing.npz: run experiments/train_ddpm.py"),
      (["--method=dip_ddpm", "--task=sr", f"--ddpm_weights={weights[0]}"],
       "method 'dip_ddpm' denoises only"),
      (["--method=ddnm", "--task=deblur", "--boundary=reflect", f"--ddpm_weights={weights[0]}"],
       "method 'ddnm' solves its data step in closed form: it needs boundary 'circular'"),
      (["--method=dip_diffpir", "--task=inpaint", "--mask_kind=random", "--holdout=0",
        f"--ddpm_weights={weights[0]}"], "needs holdout > 0"),
  ]
  with np.load(weights[0]) as z:  # parameters of the tiny model, a config of another
    arrays = dict(z)
  arrays["config"] = np.array(UNetConfig(channels=16, channel_mults=(1, 2), num_res_blocks=1,
                                         norm_groups=4).to_json())
  np.savez(tmp_path / "wrong.npz", **arrays)
  cases.append(([f"--ddpm_weights={tmp_path / 'wrong.npz'}", "--method=ddpm"],
                "wrong.npz does not match"))
  for args, message in cases:
    proc = _run(RESTORE, *args, f"--out_dir={tmp_path / 'out'}", check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("restore.py: error: ")
    assert re.search(message, line), line
  assert not (tmp_path / "out").exists()


def test_report_quick_resumes_and_summarises(weights, tmp_path):
  folder = tmp_path / "Grey"  # a grey set through the colour model
  folder.mkdir()
  io.save_image(folder / "a.png", _image((40, 36, 1)))
  io.save_image(folder / "b.png", _image((40, 36, 1), seed=5))
  out = tmp_path / "report"
  args = [f"--weights={weights[0]}", f"--sets={folder}", "--quick", "--size=32",
          "--noise_levels=25", "--nfes=1", "--dip_iters=10,20", "--dip_nfes=1",
          "--hybrids=dip_ddpm", "--dip_width=4", "--dip_scales=1", "--gen_t=10",
          "--gen_nfes=1", "--gen_ref_nfe=2", f"--out_dir={out}"]
  first = _run(REPORT, *args)
  rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
  kinds = sorted(r["kind"] for r in rows)
  bm3d = 1 if any(r["kind"] == "bm3d" for r in rows) else 0
  # --quick: the first image of the set; 1 NFE; 1 fit with 2 checkpoints x 1 NFE; generation:
  # noise and one DIP start, each a reference and 1 NFE.
  assert len(rows) == 1 + 1 + 2 + bm3d + 4, kinds
  assert len({r["key"] for r in rows}) == len(rows)
  dip = next(r for r in rows if r["kind"] == "dip")
  assert sorted(dip["checkpoints"]) == ["10", "20"] and set(dip["stops"]) == {
      "oracle", "discrepancy", "es_wmv"}
  assert dip["stops"]["es_wmv"]["no_stop"]  # 20 iterations: no ES-WMV window yet
  hybrid = next(r for r in rows if r["kind"] == "dip_ddpm")
  assert hybrid["t_start"] >= 1 and hybrid["est_mse"] > 0 and "psnr" in hybrid
  assert "summary.md" in first.stdout
  again = _run(REPORT, *args)  # resumed: nothing left to run
  assert "0 rows added" in again.stderr
  assert (out / "rows.jsonl").read_text().count("\n") == len(rows)
  summary = (out / "summary.md").read_text()
  assert "DDPM alone" in summary and "Generation" in summary and "Grey" in summary
  for name in (f"psnr_vs_nfe_{folder.name}_s25.png", f"psnr_vs_time_{folder.name}_s25.png",
               "generation_grid.png"):
    assert (out / "figures" / name).exists(), name
  # A grey model beside the colour one on the same set: its DDPM rows only (the DIP and BM3D
  # rows are shared), its own rows in the tables.
  grey = tmp_path / "grey.npz"
  train.save_weights(grey, *train.adapt_channels(weights[1], CONFIG, 1))
  args = [a for a in args if not a.startswith(("--weights", "--hybrids", "--gen_t"))]
  _run(REPORT, *args, f"--weights={grey}", "--hybrids=", "--gen_images=0")
  added = (out / "rows.jsonl").read_text().count("\n") - len(rows)
  assert added == 1  # the grey model's one DDPM row
  summary = (out / "summary.md").read_text()
  assert "| 3-channel model" in summary and "| 1-channel model" in summary
  proc = _run(REPORT, "--summary", "--iters=5", f"--out_dir={out}", check=False)
  # grid.py's flags are not the report's: it imports no other script.
  assert proc.returncode == 1 and "Unknown command line flag 'iters'" in proc.stderr


def test_posterior_report_resumes_and_summarises(weights, tmp_path):
  """One image, inpainting: the DIP row and DDNM from noise and from the DIP start; a rerun
  adds no row; the summary writes the table and the PSNR-vs-time figure."""
  data = tmp_path / "data"
  (data / "CSet9").mkdir(parents=True)
  io.save_image(data / "CSet9" / "image_House256rgb.png", _image((40, 36, 3)))
  out = tmp_path / "rows.jsonl"
  script = os.path.join(ROOT, "experiments", "posterior_report.py")
  args = [f"--weights={weights[0]}", f"--data={data}", "--limit=1", "--crop=32", "--iters=20",
          "--width=4", "--tasks=inpaint_random50", "--solvers=ddnm", "--nfe_noise=1",
          "--nfe_dip=1", f"--out={out}"]
  _run(script, *args)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert sorted((r["method"], r.get("start")) for r in rows) == [
      ("ddnm", "dip"), ("ddnm", "noise"), ("dip", None)]
  dip = next(r for r in rows if r["method"] == "dip")
  start = next(r for r in rows if r.get("start") == "dip")
  assert dip["est_mse"] > 0 and 1 <= start["t_start"] <= 1000
  assert start["wall_seconds"] >= dip["seconds"]
  _run(script, *args)
  assert out.read_text().count("\n") == len(rows)
  _run(script, "--summary", f"--out={out}")
  assert "ddnm from dip" in (tmp_path / "rows.md").read_text()
  assert (tmp_path / "rows_inpaint_random50.png").exists()
