r"""DIP denoising against (C)BM3D on the same noisy inputs: a markdown table of PSNR/SSIM.

Each image runs through experiments/restore.py (the same CLI users run), then BM3D (colour:
CBM3D) denoises the exact float observation restore.py wrote. Needs the optional `bm3d` package
(pip install -e '.[baselines]'). Results already in --out_dir are reused, so a cut-off run
resumes.

  python experiments/denoise_vs_bm3d.py   # the core protocol: House, F16, Peppers, 256 crops
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

import common
from dipjax import io
from dipjax import metrics

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                    "data", "CSet9")

_IMAGES = flags.DEFINE_list(
    "images", [os.path.join(DATA, f) for f in ("image_House256rgb.png", "image_F16_512rgb.png",
                                               "image_Peppers512rgb.png")], "Clean images.")
_CROP = flags.DEFINE_integer("crop", 256, "Centre crop size.")
_SIGMA = flags.DEFINE_float("sigma", 25, "Noise std, 0-255 units.")
_ITERS = flags.DEFINE_integer("iters", 1800, "DIP iterations.")
_WIDTH = flags.DEFINE_integer("width", 32, "Skip-net width.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise and fit seed.")
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/denoise_vs_bm3d", "Output directory.")
_TABLE = flags.DEFINE_string("table", None, "Also write the markdown table to this file.")


def _bm3d(noisy: np.ndarray, sigma: float) -> tuple[np.ndarray, float]:
  """(C)BM3D's output and its seconds."""
  t0 = time.perf_counter()
  out = common.bm3d_denoise(noisy, sigma)
  return out, time.perf_counter() - t0


def main(argv):
  del argv
  here = os.path.dirname(os.path.abspath(__file__))
  rows = []
  for path in _IMAGES.value:
    name = os.path.splitext(os.path.basename(path))[0]
    run_dir = os.path.join(_OUT_DIR.value, name)
    if not os.path.exists(os.path.join(run_dir, "metrics.json")):
      cmd = [sys.executable, os.path.join(here, "restore.py"), f"--image={path}",
             f"--crop={_CROP.value}", f"--sigma={_SIGMA.value}", f"--iters={_ITERS.value}",
             f"--width={_WIDTH.value}", f"--seed={_SEED.value}", f"--out_dir={run_dir}",
             f"--checkpoint_every={_ITERS.value // 4 // 100 * 100 or 100}"]
      if os.path.isdir(os.path.join(run_dir, "checkpoints")):
        cmd.append("--resume")
      subprocess.run(cmd, check=True)
    with open(os.path.join(run_dir, "metrics.json")) as f:
      dip = json.load(f)
    clean = io.center_crop(io.load_image(path), _CROP.value, _CROP.value)
    noisy = np.load(os.path.join(run_dir, "degraded.npy"))
    bm3d_path = os.path.join(run_dir, "bm3d.json")
    if not os.path.exists(bm3d_path):
      out, seconds = _bm3d(noisy, _SIGMA.value / 255)
      io.save_image(os.path.join(run_dir, "bm3d.png"), out)
      with open(bm3d_path, "w") as f:
        json.dump(dict(psnr=float(metrics.psnr(out, clean)), ssim=float(metrics.ssim(out, clean)),
                       seconds=seconds), f)
    with open(bm3d_path) as f:
      bm = json.load(f)
    rows.append((name, dip["degraded"]["psnr"], dip["restored"]["psnr"], dip["restored"]["ssim"],
                 dip["fit_seconds"], bm["psnr"], bm["ssim"], bm["seconds"]))
  lines = ["| image | noisy PSNR | DIP+EMA PSNR / SSIM | DIP time (s) | "
           "(C)BM3D PSNR / SSIM | BM3D time (s) |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} / {r[3]:.4f} | {r[4]:.0f} | "
                 f"{r[5]:.2f} / {r[6]:.4f} | {r[7]:.1f} |")
  mean = np.mean([r[1:] for r in rows], axis=0)
  lines.append(f"| **mean** | {mean[0]:.2f} | {mean[1]:.2f} / {mean[2]:.4f} | {mean[3]:.0f} | "
               f"{mean[4]:.2f} / {mean[5]:.4f} | {mean[6]:.1f} |")
  table = "\n".join(lines)
  header = (f"{len(rows)} images, {_CROP.value}x{_CROP.value} centre crops, "
            f"sigma={_SIGMA.value:g}, "
            f"seed {_SEED.value}; DIP: skip net width {_WIDTH.value}, {_ITERS.value} iterations, "
            f"EMA output; device: {jax.default_backend()}")
  print(header + "\n\n" + table)
  if _TABLE.value:
    with open(_TABLE.value, "w") as f:
      f.write(header + "\n\n" + table + "\n")


if __name__ == "__main__":
  app.run(main)
