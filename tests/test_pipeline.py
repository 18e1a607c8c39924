"""dipjax.pipeline: the config's defaults and validation, degradation, and restore() against the
CLI that wraps it."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dipjax import io
from dipjax import noise
from dipjax import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "assets", "house.png")
TINY = dict(width=4, scales=1, iters=60, stop=("staged", "oracle"))


@pytest.fixture(scope="module")
def clean():
  return io.center_crop(io.load_image(IMAGE), 32, 32)


def test_defaults_are_the_validated_settings():
  c = pipeline.RestoreConfig()
  assert (c.task, c.method, c.sigma, c.stages, c.t_max, c.final_share, c.probe) == (
      "denoise", "staged", 25.0, 2, 30, 0.9, 0.3)
  assert (c.stop, c.halt, c.width, c.iters) == (("staged",), True, 16, 1500)
  dip = pipeline.RestoreConfig(method="dip")
  assert (dip.stop, dip.halt, dip.width, dip.iters) == ((), False, 32, 1800)
  sr = pipeline.RestoreConfig(task="sr")
  assert (sr.method, sr.sigma, sr.stop, sr.iters) == ("dip", 0.0, (), 2000)
  assert pipeline.RestoreConfig(method="dip_ddpm", ddpm_weights="w.npz").iters == 300
  # A staged fit with no noise to measure has no probe, so no default stop.
  assert pipeline.RestoreConfig(sigma=0).stop == ()
  assert pipeline.RestoreConfig(sigma_known=False).stop == ("staged",)
  # The posterior solvers: from noise no fit; from DIP a 1000-iteration fit halted by a 5%
  # hold-out; DDNM's eta.
  ddnm = pipeline.RestoreConfig(task="inpaint", method="ddnm", ddpm_weights="w.npz")
  assert (ddnm.fits, ddnm.holdout, ddnm.stop, ddnm.nfe, ddnm.ddpm_eta) == (
      False, 0.0, (), 20, 0.85)
  dip_dps = pipeline.RestoreConfig(task="sr", method="dip_dps", ddpm_weights="w.npz")
  assert (dip_dps.iters, dip_dps.holdout, dip_dps.stop, dip_dps.halt, dip_dps.nfe,
          dip_dps.ddpm_eta) == (1000, 0.05, ("holdout",), True, 5, 0.0)


@pytest.mark.parametrize("fields,message", [
    (dict(task="deblurring"), "task must be one of"),
    (dict(sigma=-1), r"sigma must lie in \[0, 255\]"),
    (dict(iters=0), "iters must be positive"),
    (dict(method="dip", stop=("staged",)), "stop 'staged' needs method 'staged'"),
    (dict(stop=("oracle", "oracle")), "twice"),
    (dict(stop=("early",)), "Unknown criterion"),
    (dict(halt=True, stop=()), "halt needs a stop"),
    (dict(final_share=1.0), "final_share must lie in (0, 1)"),
    (dict(method="ddpm"), "needs ddpm_weights"),
    (dict(method="dip_guided", task="sr", ddpm_weights="w.npz"), "denoises only"),
    (dict(width=0), "width and scales must be positive"),
    (dict(task="inpaint", sigma_known=False), "give sigma for inpainting"),
    (dict(method="ddnm", task="sr", noise="poisson", ddpm_weights="w.npz"), "Gaussian noise only"),
    (dict(method="ddnm", task="sr", holdout=0.1, ddpm_weights="w.npz"), "holdout does not apply"),
    (dict(method="dps", task="sr", ddpm_eta=0.5, ddpm_weights="w.npz"), "takes no ddpm_eta"),
    (dict(method="dip_ddnm", guide_weight=0.5, ddpm_weights="w.npz"), "applies to method"),
])
def test_bad_fields_raise_one_clear_error(fields, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    pipeline.RestoreConfig(**fields)


def test_degrade_seeding_and_shapes(clean):
  y = pipeline.degrade(pipeline.RestoreConfig(), clean, seed=3)
  np.testing.assert_array_equal(y, noise.add_noise(3, clean, 25 / 255))
  sr = pipeline.degrade(pipeline.RestoreConfig(task="sr", factor=2), clean, seed=0)
  assert sr.shape == (16, 16, 3)
  mask = np.zeros((32, 32), np.float32)
  mask[:, :16] = 1
  y = pipeline.degrade(pipeline.RestoreConfig(task="inpaint"), clean, seed=0, mask=mask)
  assert np.all(y[:, 16:] == 0) and np.array_equal(y[:, :16], clean[:, :16])
  with pytest.raises(ValueError, match="needs a mask"):
    pipeline.degrade(pipeline.RestoreConfig(task="inpaint"), clean, seed=0)
  with pytest.raises(ValueError, match="sigma_known"):
    pipeline.degrade(pipeline.RestoreConfig(sigma_known=False), clean, seed=0)


def test_restore_equals_the_cli(clean, tmp_path, cli_cache):
  """The library call and experiments/restore.py with the same settings: the same restored
  image and the same stops; 60 iterations in calls of 25 (the last one bounded)."""
  config = pipeline.RestoreConfig(**TINY)
  y = pipeline.degrade(config, clean, seed=0)
  seen = []
  result = pipeline.restore(config, y, key=jax.random.PRNGKey(0), clean=clean, chunk=25,
                            progress=lambda done, total, latest: seen.append((done, total)))
  assert seen == [(25, 60), (50, 60), (60, 60)]
  assert result.iterations == 60 and result.trace["loss"].shape == (1, 60)
  assert np.isfinite(result.trace["loss"]).all()
  assert result.image.shape == (32, 32, 3) and result.restored_at == "staged"
  assert result.scores["restored"] == result.scores["stops"]["staged"]["mean_of_seeds"]
  oracle_step, _ = result.stops["oracle"]
  assert 1 <= int(oracle_step[0]) <= 60

  out = tmp_path / "cli"
  image = tmp_path / "clean.png"
  io.save_image(image, clean)
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "restore.py"),
       f"--cache_dir={cli_cache}",
       f"--image={image}", "--width=4", "--scales=1", "--iters=60", "--log_every=25",
       "--stop=staged,oracle", "--seed=0", f"--out_dir={out}"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  np.testing.assert_allclose(np.load(out / "restored.npy"), result.image, atol=1e-6, rtol=0)
  metrics = __import__("json").loads((out / "metrics.json").read_text())
  for name, (steps, _) in result.stops.items():
    assert metrics["stops"][name]["iteration"] == [int(s) for s in steps]


def test_ground_truth_and_observation_must_agree(clean):
  config = pipeline.RestoreConfig(task="sr", factor=2, **TINY | dict(stop=()))
  y = pipeline.degrade(config, clean, seed=0)
  with pytest.raises(ValueError, match="ground truth"):
    pipeline.restore(config, y, key=jax.random.PRNGKey(0), clean=clean[:16])
  with pytest.raises(ValueError, match="resume and checkpoint_every need a checkpoint_dir"):
    pipeline.restore(config, y, key=jax.random.PRNGKey(0), resume=True)
  with pytest.raises(ValueError, match="need a checkpoint_dir"):
    pipeline.restore(config, y, key=jax.random.PRNGKey(0), checkpoint_every=20)
  with pytest.raises(ValueError, match="'ddpm' has no fit to checkpoint"):
    pipeline.restore(pipeline.RestoreConfig(method="ddpm", ddpm_weights="unused.npz"), clean,
                     key=jax.random.PRNGKey(0),
                     checkpoint_dir="unused", checkpoint_every=20)


def test_halting_ends_the_fit_at_the_chunk_where_the_stop_fires(clean, tmp_path):
  """The fit ends with the chunk in which its stop fires; checkpointed every chunk, the halting
  chunk included, a resume from there runs nothing more and gives the same run."""
  config = pipeline.RestoreConfig(method="dip", width=4, scales=1, iters=1000,
                                  stop=("discrepancy",), halt=True)
  y = pipeline.degrade(config, clean, seed=0)
  run = lambda **kw: pipeline.restore(config, y, key=jax.random.PRNGKey(0), clean=clean,
                                      chunk=50, checkpoint_dir=str(tmp_path), **kw)
  result = run(checkpoint_every=50)
  stop = int(result.stops["discrepancy"][0][0])
  assert stop < result.iterations < 1000 and result.iterations % 50 == 0
  assert np.isfinite(result.trace["loss"][0]).sum() == stop  # the rest was skipped
  np.testing.assert_array_equal(result.image, result.stops["discrepancy"][1].mean(0))
  assert result.summary()["iterations_run"] == result.iterations
  again = run(resume=True)
  assert again.iterations == result.iterations
  np.testing.assert_array_equal(again.image, result.image)
  np.testing.assert_array_equal(again.ema, result.ema)
