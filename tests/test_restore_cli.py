"""experiments/restore.py end to end: outputs, exact resume, the tasks, and clear errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dipjax import io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "restore.py")
IMAGE = os.path.join(ROOT, "assets", "house.png")
TINY = ["--crop=32", "--width=4", "--scales=1", "--iters=100", "--log_every=50", "--method=dip",
        "--stop="]


def _restore(args, cache_dir, check=True):
  proc = subprocess.run([sys.executable, SCRIPT, f"--cache_dir={cache_dir}", *args],
                        capture_output=True, text=True, cwd=ROOT)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_outputs_any_budget_and_exact_resume(tmp_path, cli_cache):
  """--iters 60 with progress every 50 and checkpoints every 20: one compiled call of 20
  iterations, every iteration traced (SSIM at the last one too), the outputs at the first
  criterion's stop; a run killed after checkpoint 40 and resumed equals the uninterrupted one;
  a new run into its checkpoints is refused."""
  full, cut = tmp_path / "full", tmp_path / "cut"
  args = [*TINY, "--iters=60", "--checkpoint_every=20", "--method=staged",
          "--stop=oracle,staged,discrepancy"]
  _restore([*args, f"--out_dir={full}"], cli_cache)
  for name in ("restored.png", "degraded.png", "metrics.json", "trace.csv", "psnr.png"):
    assert (full / name).exists(), name
  result = json.loads((full / "metrics.json").read_text())
  assert result["iterations_run"] == 60 and result["compile_seconds"] > 0
  assert result["stage_ends"] == [7, 60]  # each stage 1, then 10% / 90% of the other 58
  assert result["restored"]["psnr"] > 0 and 0 < result["restored"]["ssim"] <= 1
  # restored.png is the EMA output at the oracle's stop: the best PSNR of the run.
  assert result["restored_at"] == "oracle"
  assert result["restored"] == result["stops"]["oracle"]["mean_of_seeds"]
  assert result["restored"]["psnr"] >= max(e["ema"]["psnr"] for e in result["per_seed"])
  assert 1 <= result["stops"]["oracle"]["iteration"][0] <= 60
  rows = (full / "trace.csv").read_text().splitlines()
  assert len(rows) == 1 + 60 and rows[0].startswith("seed,iteration,loss")
  last = dict(zip(rows[0].split(","), rows[-1].split(",")))
  assert last["ssim_clean_ema"] != ""  # SSIM at the last iteration
  assert all(last[k] not in ("", "nan") for k in ("loss", "psnr_clean_ema", "psnr_obs"))

  # A run killed after checkpoint 40: only that checkpoint exists and no outputs.
  os.makedirs(cut / "checkpoints")
  shutil.copytree(full / "checkpoints" / "40", cut / "checkpoints" / "40")
  shutil.copy(full / "checkpoints" / "fingerprint.json", cut / "checkpoints")
  proc = _restore([*args, f"--out_dir={cut}", "--resume"], cli_cache)
  assert "resumed from iteration 40" in proc.stderr
  np.testing.assert_array_equal(np.load(cut / "restored.npy"), np.load(full / "restored.npy"))
  np.testing.assert_array_equal(io.load_image(cut / "restored.png"),
                                io.load_image(full / "restored.png"))
  resumed = json.loads((cut / "metrics.json").read_text())
  assert resumed["restored"] == result["restored"] and resumed["stops"] == result["stops"]
  # The checkpoints are bound to their run (each setting: test_hostile_inputs): a new run into
  # their directory is refused before any work, in one line.
  proc = _restore([*args, f"--out_dir={cut}"], cli_cache, check=False)
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode == 1 and "compiled in" not in proc.stderr
  assert last.startswith("restore.py: error: ") and (
      "already holds checkpoints (iteration 60): resume" in last), last


def test_inpainting_staged_with_ddpm_input(tmp_path, cli_cache):
  mask = np.ones((32, 32), np.float32)
  mask[8:20, 10:22] = 0
  io.save_image(tmp_path / "mask.png", mask)
  image = tmp_path / "image.png"
  io.save_image(image, io.center_crop(io.load_image(IMAGE), 32, 32))
  out = tmp_path / "out"
  _restore([*TINY, f"--image={image}", "--task=inpaint", f"--mask={tmp_path / 'mask.png'}",
            "--method=staged", "--stages=2", "--final_share=0", "--input=ddpm", "--input_t=50",
            f"--out_dir={out}"], cli_cache)
  result = json.loads((out / "metrics.json").read_text())
  assert result["stage_ends"] == [50, 100]
  assert io.load_image(out / "restored.png").shape == (32, 32, 3)


def test_super_resolution_with_two_seeds(tmp_path, cli_cache):
  out = tmp_path / "out"
  _restore([*TINY, "--task=sr", "--factor=2", "--seeds=2", "--input=meshgrid", "--crop=33",
            f"--out_dir={out}"], cli_cache)  # 33 x 33: centre-cropped to a multiple of 2
  result = json.loads((out / "metrics.json").read_text())
  assert len(result["per_seed"]) == 2
  assert io.load_image(out / "degraded.png").shape == (16, 16, 3)
  assert io.load_image(out / "restored.png").shape == (32, 32, 3)


def test_deblurring_with_poisson_noise(tmp_path, cli_cache):
  out = tmp_path / "out"
  _restore([*TINY, "--task=deblur", "--blur=motion", "--blur_size=7", "--noise=poisson",
            "--peak=30", f"--out_dir={out}"], cli_cache)
  result = json.loads((out / "metrics.json").read_text())
  assert result["config"]["noise"] == "poisson" and result["config"]["task"] == "deblur"
  assert result["sigma_used"] > 0 and result["restored"]["psnr"] > 0
  assert io.load_image(out / "degraded.png").shape == (32, 32, 3)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("bad")
  (d / "notes.png").write_text("this is not an image")
  io.save_image(d / "mask.png", np.ones((20, 20), np.float32))
  return d


@pytest.mark.parametrize("args,message", [
    (["--image=/nonexistent/x.png"], "no such image file"),
    (["--image={d}/notes.png"], "cannot read"),
    (["--task=inpaint", "--mask={d}/mask.png"], "mask"),
    (["--sigma=-5"], "sigma must lie in [0, 255]"),
    (["--task=sr", "--factor=3"], "factor must be 2, 4 or 8"),
    (["--method=staged", "--stages=300", "--iters=200"], "cannot exceed iters"),
    (["--iters=0"], "iters must be positive"),
    (["--log_every=0"], "chunk must be positive"),
    (["--stop=early"], "Unknown criterion"),
    (["--halt", "--stop="], "halt needs a stop"),
    (["--method=dip", "--stop=staged"], "stop 'staged' needs method 'staged'"),
    (["--loss=perceptual"], "needs vgg19"),
    (["--noisy", "--sigma=10"], "leave --sigma out"),
    (["--noisy", "--noise=poisson", "--sigma=5"], "--peak and --sigma give its known noise"),
])
def test_bad_input_gives_one_clear_line(args, message, bad_files, tmp_path, cli_cache):
  out = tmp_path / "out"
  args = [a.replace("{d}", str(bad_files)) for a in args]
  proc = _restore([*args, f"--out_dir={out}"], cli_cache, check=False)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("restore.py: error:") and message in last, proc.stderr[-2000:]
  assert not (out / "metrics.json").exists()
