"""experiments/restore.py's DDPM and posterior-solver methods, experiments/ddpm_report.py and
experiments/posterior_report.py end to end with one tiny random U-Net saved for the module."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import tiny_ddpm
from dipjax import io
from dipjax.ddpm import train
from dipjax.ddpm.unet import UNetConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESTORE = os.path.join(ROOT, "experiments", "restore.py")
REPORT = os.path.join(ROOT, "experiments", "ddpm_report.py")
CONFIG = tiny_ddpm.CONFIG
_image = tiny_ddpm.image


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  return tiny_ddpm.tiny_weights(tmp_path_factory.mktemp("ddpm") / "tiny.npz")


def _run(cache_dir, script, *args, check=True):
  proc = subprocess.run([sys.executable, script, f"--cache_dir={cache_dir}", *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_restore_cli_ddpm_end_to_end(weights, tmp_path, cli_cache):
  out = tmp_path / "out"
  _run(cli_cache, RESTORE, "--method=ddpm", "--crop=32", "--nfe=2", f"--ddpm_weights={weights[0]}",
       f"--out_dir={out}")
  result = json.loads((out / "metrics.json").read_text())
  ddpm = result["ddpm"]
  assert ddpm["t_start"] == 57 and ddpm["nfe"] == 2 and ddpm["seconds"] > 0
  assert ddpm["model"]["channels"] == CONFIG.channels
  assert result["restored"]["psnr"] == ddpm["psnr"] > 0 and 0 < ddpm["ssim"] <= 1
  assert io.load_image(out / "restored.png").shape == (32, 32, 3)
  assert not (out / "trace.csv").exists()  # no fit


def test_restore_cli_dip_ddpm_after_a_short_fit(weights, tmp_path, cli_cache):
  out = tmp_path / "out"
  _run(cli_cache, RESTORE, "--method=dip_ddpm", "--crop=32", "--width=4", "--scales=1", "--nfe=1",
       "--stop=oracle", f"--ddpm_weights={weights[0]}", f"--out_dir={out}")
  result = json.loads((out / "metrics.json").read_text())
  assert result["iterations"] == 300  # the hybrids' default budget
  ddpm = result["ddpm"]
  assert ddpm["est_mse"] > 0 and 1 <= ddpm["t_start"] <= 1000 and ddpm["steps"] == 1
  assert result["restored"]["psnr"] == ddpm["psnr"] and "psnr" in result["dip"]
  assert (out / "trace.csv").exists()


def test_restore_cli_posterior_solvers(weights, tmp_path, cli_cache):
  """DDNM from noise on inpainting satisfies the data (noise-free: A x = y on the known
  pixels); DPS from a short DIP fit on SR takes t* from its held-out error (the default 0.05)."""
  out = tmp_path / "ddnm"
  _run(cli_cache, RESTORE, "--method=ddnm", "--task=inpaint", "--mask_kind=random", "--crop=32",
       "--nfe=2", f"--ddpm_weights={weights[0]}", f"--out_dir={out}")
  ddpm = json.loads((out / "metrics.json").read_text())["ddpm"]
  assert ddpm["t_start"] == 1000 and ddpm["steps"] == 2 and ddpm["est_mse"] is None
  assert not ddpm["guided_by_fit"]
  restored, degraded = (np.load(out / f"{n}.npy") for n in ("restored", "degraded"))
  known = np.any(degraded > 0, axis=-1)  # the generated mask's known pixels (non-black here)
  np.testing.assert_allclose(restored[known], degraded[known], atol=1e-4)
  out = tmp_path / "dip_dps"
  _run(cli_cache, RESTORE, "--method=dip_dps", "--task=sr", "--factor=2", "--crop=32", "--width=4",
       "--scales=1", "--iters=50", "--nfe=1", f"--ddpm_weights={weights[0]}", f"--out_dir={out}")
  result = json.loads((out / "metrics.json").read_text())
  assert result["config"]["holdout"] == 0.05 and result["config"]["stop"] == ["holdout"]
  ddpm = result["ddpm"]
  assert ddpm["est_mse"] > 0 and 1 <= ddpm["t_start"] <= 1000 and ddpm["steps"] == 1
  assert ddpm["guided_by_fit"]
  assert np.load(out / "restored.npy").shape == (32, 32, 3)


def test_restore_cli_ddpm_errors(weights, tmp_path, cli_cache):
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
    proc = _run(cli_cache, RESTORE, *args, f"--out_dir={tmp_path / 'out'}", check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("restore.py: error: ")
    assert re.search(message, line), line
  assert not (tmp_path / "out").exists()


def test_report_quick_resumes_and_summarises(weights, tmp_path, cli_cache):
  folder = tmp_path / "Grey"  # a grey set through the colour model
  folder.mkdir()
  io.save_image(folder / "a.png", _image((40, 36, 1)))
  io.save_image(folder / "b.png", _image((40, 36, 1), seed=5))
  out = tmp_path / "report"
  args = [f"--weights={weights[0]}", f"--sets={folder}", "--quick", "--size=32",
          "--noise_levels=25", "--nfes=1", "--dip_iters=10,20", "--dip_nfes=1",
          "--hybrids=dip_ddpm", "--dip_width=4", "--dip_scales=1", "--gen_t=10",
          "--gen_nfes=1", "--gen_ref_nfe=2", f"--out_dir={out}"]
  first = _run(cli_cache, REPORT, *args)
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
  again = _run(cli_cache, REPORT, *args)  # resumed: nothing left to run
  assert "0 rows added" in again.stderr
  assert (out / "rows.jsonl").read_text().count("\n") == len(rows)
  summary = (out / "summary.md").read_text()
  assert "DDPM alone" in summary and "Generation" in summary and "Grey" in summary
  for name in (f"psnr_vs_nfe_{folder.name}_s25.png", f"psnr_vs_time_{folder.name}_s25.png",
               "generation_grid.png"):
    assert (out / "figures" / name).exists(), name
  # A grey model beside the colour one on the same set, without DIP (--dip_iters=): its DDPM
  # rows only (the BM3D rows are shared), its own rows in the tables.
  grey = tmp_path / "grey.npz"
  train.save_weights(grey, *train.adapt_channels(weights[1], CONFIG, 1))
  args = [a for a in args if not a.startswith(("--weights", "--hybrids", "--gen_t"))]
  args = [a for a in args if not a.startswith("--dip_iters")]
  _run(cli_cache, REPORT, *args, f"--weights={grey}", "--hybrids=", "--gen_images=0",
       "--dip_iters=")
  added = (out / "rows.jsonl").read_text().count("\n") - len(rows)
  assert added == 1  # the grey model's one DDPM row
  summary = (out / "summary.md").read_text()
  assert "| 3-channel model" in summary and "| 1-channel model" in summary


def test_posterior_report_resumes_and_summarises(weights, tmp_path, cli_cache):
  """One image, inpainting: the DIP row and DDNM from noise and from the guiding DIP start, and
  both at the fit's checkpoint (iteration 100); a rerun adds no row; the summary writes the
  table and the PSNR-vs-time figure."""
  data = tmp_path / "data"
  (data / "CSet9").mkdir(parents=True)
  io.save_image(data / "CSet9" / "image_House256rgb.png", _image((40, 36, 3)))
  out = tmp_path / "rows.jsonl"
  script = os.path.join(ROOT, "experiments", "posterior_report.py")
  args = [f"--weights={weights[0]}", f"--data={data}", "--limit=1", "--crop=32", "--iters=200",
          "--width=4", "--scales=1", "--tasks=inpaint_random50", "--solvers=ddnm", "--nfe_noise=1",
          "--starts=noise,dip_guide", "--nfe_dip=5", "--dip_checkpoints=100", f"--out={out}"]
  _run(cli_cache, script, *args)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert sorted((r["method"], r.get("start"), r.get("dip_iters", 0)) for r in rows) == [
      ("ddnm", "dip_guide", 0), ("ddnm", "dip_guide", 100), ("ddnm", "noise", 0),
      ("dip", None, 0), ("dip", None, 100)]
  pick = lambda method, k: next(r for r in rows if r["method"] == method and
                                r.get("start", "dip_guide") == "dip_guide" and
                                r.get("dip_iters", 0) == k)
  for k in (0, 100):  # the whole fit, its output at iteration 100
    dip, start = pick("dip", k), pick("ddnm", k)
    assert dip["est_mse"] > 0 and 1 <= start["t_start"] <= 1000
    assert start["wall_seconds"] >= dip["seconds"]
  assert pick("dip", 100)["seconds"] < pick("dip", 0)["seconds"]
  _run(cli_cache, script, *args)
  assert out.read_text().count("\n") == len(rows)
  _run(cli_cache, script, "--summary", f"--out={out}")
  summary = (tmp_path / "rows.md").read_text()
  assert "ddnm from DIP, guided" in summary and "ddnm from DIP, guided at 100 it" in summary
  assert (tmp_path / "rows_inpaint_random50.png").exists()
