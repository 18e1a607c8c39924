"""Hostile input: every bad input or failing run gives one clear error before any fitting, or
behaves correctly, and never leaves an output that looks like a result (issue 29's table)."""

import dataclasses
import gc
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dipjax import checkpoint
from dipjax import io
from dipjax import noise
from dipjax import operators
from dipjax import pipeline
from dipjax import problems
from dipjax import schedules
from dipjax.ddpm import train as ddpm_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "restore.py")
IMAGE = os.path.join(ROOT, "assets", "house.png")
TINY_FLAGS = ["--crop=32", "--width=4", "--scales=1", "--iters=20", "--log_every=10",
              "--method=dip", "--stop="]
TINY = dict(method="dip", width=4, scales=1, iters=20, stop=("oracle",))
RESULTS = ("restored.png", "restored.npy", "metrics.json", "trace.csv")


@pytest.fixture(scope="module")
def clean():
  return io.center_crop(io.load_image(IMAGE), 32, 32)


def _cli(args, cache_dir):
  """restore.py's exit status and last stderr line."""
  proc = subprocess.run([sys.executable, SCRIPT, f"--cache_dir={cache_dir}", *args],
                        capture_output=True, text=True, cwd=ROOT)
  lines = proc.stderr.strip().splitlines()
  return proc.returncode, lines[-1] if lines else "", proc.stderr


def _refused(args, message, cache_dir, out_dir=None):
  code, last, stderr = _cli(args, cache_dir)
  assert code != 0 and "Traceback" not in stderr, stderr[-3000:]
  assert last.startswith("restore.py: error:") and message in last, stderr[-3000:]
  assert "compiled in" not in stderr  # refused before any fitting
  if out_dir is not None:
    assert not any(os.path.exists(os.path.join(out_dir, n)) for n in RESULTS)


@pytest.fixture(scope="module")
def grey_mask(tmp_path_factory):
  d = tmp_path_factory.mktemp("masks")
  full = io.load_image(IMAGE)
  io.save_image(d / "grey.png", np.full(full.shape[:2], 0.5, np.float32))
  io.save_image(d / "small.png", np.ones((64, 64), np.float32))
  io.save_image(d / "tiny.png", np.full((7, 13, 3), 0.5, np.float32))
  return d


@pytest.mark.parametrize("args,message", [
    (["--sigma=nan"], "sigma must be a finite number"),
    (["--method=staged", "--stop=staged", "--t_max=5000"], "t_max must lie in [1, 1000]"),
    (["--task=inpaint", "--mask={d}/small.png"], "must match before --crop"),
    (["--task=inpaint", "--mask={d}/grey.png"], "the mask must be binary"),
    (["--image={d}/tiny.png", "--crop=0"], "at least 11x11"),
    (["--out_dir={d}/grey.png"], "cannot write there"),
])
def test_bad_flags_are_refused_before_fitting(args, message, grey_mask, cli_cache, tmp_path):
  args = [a.replace("{d}", str(grey_mask)) for a in args]
  out = [] if any(a.startswith("--out_dir") for a in args) else [f"--out_dir={tmp_path}"]
  _refused([*TINY_FLAGS, *args, *out], message, cli_cache, tmp_path)


def test_checkpoints_are_bound_to_their_run(clean, tmp_path):
  """A resume with any changed setting, image, seed or budget is refused naming what changed,
  and touches nothing; a new run into a directory with checkpoints is refused."""
  config = pipeline.RestoreConfig(**TINY)
  y = pipeline.degrade(config, clean, seed=0)
  ckpt = str(tmp_path / "ckpt")
  run = lambda c=config, obs=y, key=0, **kw: pipeline.restore(
      c, obs, key=jax.random.PRNGKey(key), clean=clean, chunk=10, checkpoint_dir=ckpt, **kw)
  first = run(checkpoint_every=10)
  before = sorted(os.listdir(ckpt))
  changed = [
      (dict(c=dataclasses.replace(config, sigma=50.0)), "sigma 25.0 -> 50.0"),
      (dict(c=dataclasses.replace(config, lr=0.05)), "lr 0.01 -> 0.05"),
      (dict(c=dataclasses.replace(config, iters=40)), "iters 20 -> 40"),
      (dict(key=7), "key"),
      (dict(obs=pipeline.degrade(config, clean, seed=7)), "observation"),
  ]
  for kwargs, message in changed:
    with pytest.raises(ValueError, match="are of another run; changed: .*" + message):
      run(resume=True, checkpoint_every=10, **kwargs)
  assert sorted(os.listdir(ckpt)) == before
  with pytest.raises(ValueError, match="already holds checkpoints .iteration 20.: resume"):
    run(checkpoint_every=10)
  again = run(resume=True)  # unchanged: resumes at the end, the same result
  np.testing.assert_array_equal(again.image, first.image)


# Orbax leaves the reads of a failed restore as coroutines never awaited: collected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoints_and_weights_give_one_line(clean, tmp_path):
  config = pipeline.RestoreConfig(**TINY)
  y = pipeline.degrade(config, clean, seed=0)
  ckpt = tmp_path / "ckpt"
  pipeline.restore(config, y, key=jax.random.PRNGKey(0), chunk=10, checkpoint_dir=str(ckpt),
                   checkpoint_every=10)
  for path in (ckpt / "20").rglob("*"):
    if path.is_file() and path.stat().st_size > 1000:
      path.write_bytes(path.read_bytes()[:100])  # truncated data files
  with pytest.raises(ValueError, match=r"cannot read checkpoint 20 in .*ckpt .*damaged"):
    pipeline.restore(config, y, key=jax.random.PRNGKey(0), chunk=10, checkpoint_dir=str(ckpt),
                     resume=True)
  gc.collect()
  weights = tmp_path / "cut.npz"
  weights.write_bytes(open(os.path.join(ROOT, "assets", "ddpm_colour.npz"), "rb").read()[:1000])
  with pytest.raises(ValueError, match="cut.npz is not a dipjax DDPM weights file, or it is "
                     "truncated"):
    ddpm_train.load_weights(weights)
  (ckpt / checkpoint.FINGERPRINT).write_text("{not json")
  with pytest.raises(ValueError, match="fingerprint.json is missing or unreadable"):
    checkpoint.bind(str(ckpt), {}, resume=True)


def test_a_diverging_fit_ends_with_an_error_not_a_result(clean):
  """Every step rolled back (here: a roll-back threshold no step can meet) is a divergence."""
  config = pipeline.RestoreConfig(**dict(TINY, iters=40))
  frame = pipeline.make_frame(config, pipeline.degrade(config, clean, seed=0), clean)
  run = pipeline.FitRun(config, frame, 25 / 255, jax.random.PRNGKey(0), chunk=20)
  run.fit_config = dataclasses.replace(run.fit_config, rollback_db=-100.0)
  with pytest.raises(pipeline.DivergedError, match="the fit diverged: .* rolled back"):
    run.fit()


@pytest.mark.parametrize("bad,message", [
    (lambda x: (x * 255).astype(np.uint8), "is uint8: dipjax takes float images"),
    (lambda x: x * 255, r"must lie in \[0, 1\].*divide by 255"),
    (lambda x: np.where(x > 0.5, np.nan, x), "NaN or infinite"),
    (lambda x: x[:7, :13], "at least 11x11"),
    (lambda x: x[..., 0], r"shape \(H, W, 1\) or \(H, W, 3\)"),
])
def test_the_library_checks_its_images(bad, message, clean):
  config = pipeline.RestoreConfig(**TINY)
  with pytest.raises(ValueError, match=message):
    pipeline.restore(config, bad(clean), key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=message):
    pipeline.restore(config, clean, key=jax.random.PRNGKey(0), clean=bad(clean))
  if "11x11" not in message:
    with pytest.raises(ValueError, match=message):
      pipeline.degrade(config, bad(clean), seed=0)


def test_the_library_checks_its_numbers(clean):
  with pytest.raises(ValueError, match=r"sigma is a std in \[0, 1\] units"):
    noise.add_noise(0, clean, 25)
  with pytest.raises(ValueError, match=r"t_max must lie in \[0, 1000\]"):
    problems.staged_problem(jax.random.PRNGKey(0), None, clean, operators.identity(), 100,
                            schedule=schedules.linear(), num_stages=2, t_max=5000,
                            sigma=0.1)
  for field, value in (("sigma", float("inf")), ("lr", float("nan")), ("probe", 2.0),
                       ("input_t", 5000)):
    with pytest.raises(ValueError, match=field):
      pipeline.RestoreConfig(**{field: value})
  grey = np.full(clean.shape[:2], 0.5)
  with pytest.raises(ValueError, match="the mask must be binary"):
    pipeline.make_physics(pipeline.RestoreConfig(task="inpaint"), grey)
  nearly = np.where(np.arange(32) % 2, 0.97, 0.02)[None].repeat(32, 0)  # JPEG-like values
  mask = pipeline.make_physics(pipeline.RestoreConfig(task="inpaint"), nearly).operator.mask
  assert set(np.unique(mask)) == {0.0, 1.0}


def test_outputs_appear_only_when_the_run_succeeds(cli_cache, tmp_path):
  """A run that fails while writing (here: a directory where metrics.json must go) leaves no
  restored image, and no staging directory."""
  out = tmp_path / "out"
  os.makedirs(out / "metrics.json")
  code, last, stderr = _cli([*TINY_FLAGS, f"--out_dir={out}"], cli_cache)
  assert code != 0 and "Traceback" not in stderr
  assert "cannot write metrics.json into" in last, stderr[-2000:]
  assert sorted(os.listdir(out)) == ["metrics.json"]


def test_a_run_beyond_the_available_memory_is_refused_up_front(clean, monkeypatch):
  config = pipeline.RestoreConfig(**TINY)
  need = pipeline.memory_estimate(config, clean.shape)
  big = dict(TINY, width=128, seeds=4)
  assert pipeline.memory_estimate(pipeline.RestoreConfig(**big), (3000, 4000, 3)) > 24 * 2**30
  assert pipeline.memory_estimate(pipeline.RestoreConfig(**big), clean.shape) > need
  monkeypatch.setattr(pipeline, "available_memory", lambda: need - 1)
  with pytest.raises(ValueError, match=r"a 32x32 image at width 4 with 1 seed\(s\) needs about "
                     r"[\d.]+ GiB \(estimate\) but [\d.]+ GiB is available: crop the image"):
    pipeline.restore(config, clean, key=jax.random.PRNGKey(0))


def test_an_unwritable_output_directory_is_refused(tmp_path, monkeypatch):
  """(As root every directory is writable: the permission is mocked.)"""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import cli  # pylint: disable=import-outside-toplevel
  cli.writable_dir(str(tmp_path / "new" / "dir"))  # creatable: fine, and nothing created
  assert not (tmp_path / "new").exists()
  monkeypatch.setattr(os, "access", lambda path, mode: False)
  with pytest.raises(ValueError, match=r"--out_dir .*: cannot write there \(.* is not writable"):
    cli.writable_dir(str(tmp_path / "out"))


def test_a_stop_that_never_fires_gives_the_last_iteration_not_a_blank(clean):
  """The discrepancy level not reached within the budget: the criterion never had a defined
  score, so the restored image is the last EMA output (before: the zeros it was kept in)."""
  config = pipeline.RestoreConfig(**dict(TINY, stop=("discrepancy",), halt=False), sigma=2.0)
  y = pipeline.degrade(config, clean, seed=0)
  result = pipeline.restore(config, y, key=jax.random.PRNGKey(0), clean=clean)
  assert result.restored_at == "last iteration (discrepancy: no stop)"
  np.testing.assert_array_equal(result.image, result.ema.mean(0))
  steps, kept = result.stops["discrepancy"]
  assert (steps == 0).all()
  np.testing.assert_array_equal(kept, result.ema)  # its scores are of the last output too


def test_a_noise_level_estimated_as_zero_is_refused(clean):
  """A clean or JPEG-compressed photo: no noise in its finest wavelet band, so a stop or method
  that needs sigma cannot have it."""
  smooth = np.broadcast_to(np.linspace(0.2, 0.8, 32, dtype=np.float32)[None, :, None],
                           (32, 32, 3)).copy()
  for config in (pipeline.RestoreConfig(sigma_known=False, width=4, scales=1, iters=20),
                 pipeline.RestoreConfig(**dict(TINY, stop=("discrepancy",)), sigma_known=False)):
    with pytest.raises(ValueError, match="estimate from the observation is 0"):
      pipeline.restore(config, smooth, key=jax.random.PRNGKey(0))
