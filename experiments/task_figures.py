r"""The task report's figures on images without a ground truth (docs/RESULTS.md, "Tasks"):

  python experiments/task_figures.py --figures=real,vase

  real     a photo with camera noise (the no-flash shot of the DIP repository's flash / no-flash
           pair, dip/flash_no_flash/cave01_01_noflash.png, its centre 256²): input | dipjax's
           staged method with the noise's level and correlation estimated from the photo |
           CBM3D at that sigma as if white | CBM3D told the estimated noise spectrum. (The DIP
           paper's snail is JPEG-compressed: no noise the estimator can see, sigma 0.)
  vase, kate, library
           the DIP repository's masked images (dip/inpainting/<name>.png and its mask):
           masked input | DIP (width 32, 2000 iterations) at the last iteration and at the
           hold-out stop.

Each figure is one PNG in docs/results/tasks/ with its command, device and date in the caption;
a figure already there is not redone (delete it to redo).
"""

from __future__ import annotations

import datetime
import os

from absl import flags
from absl import logging
import jax
import numpy as np

import baselines
import cli
import common
from dipjax import io
from dipjax import pipeline
from dipjax import plots

FIGURES = ("real", "vase", "kate", "library")
_FIGURES = flags.DEFINE_list("figures", ["real", "vase"], f"Figures, of {', '.join(FIGURES)}.")
_DATA = flags.DEFINE_string("data", "../shared/data", "Folder of the image sets.")
_OUT_DIR = flags.DEFINE_string("out_dir", os.path.join(common.REPO, "docs", "results", "tasks"),
                               "Where the PNGs go.")


def _caption(what: str, name: str) -> str:
  return (f"{what} · python experiments/task_figures.py --figures={name} · {common.host()} · "
          f"{datetime.date.today()}")


def real_noise(path: str) -> list[tuple[str, np.ndarray]]:
  """A real noisy photo: dipjax (staged, the noise's level and correlation estimated, its own
  stop) against CBM3D at the estimated sigma as if white, and told the estimated spectrum."""
  y = io.center_crop(io.load_image(path), 256, 256)
  config = pipeline.RestoreConfig(sigma_known=False, noise_corr=None)
  result = pipeline.restore(config, y, key=jax.random.PRNGKey(0))
  sigma, width = result.sigma, result.noise_used.correlation
  level = f"σ̂ = {255 * sigma:.1f}, width {width:.2f}"
  row = [("input (real noise)", y),
         (f"dipjax staged, {level}, stop {result.stops['staged'][0][0]}", result.image)]
  try:
    row.append(("CBM3D, σ̂ as if white", common.bm3d_denoise(y, sigma)))
    row.append(("CBM3D told the estimated spectrum",
                baselines.correlated_bm3d(y, sigma, width)))
  except ImportError:
    logging.warning("bm3d is not installed (pip install -e '.[baselines]'): no CBM3D panels")
  return row


def masked(path: str, mask_path: str) -> list[tuple[str, np.ndarray]]:
  """A DIP repository inpainting image with its own mask: DIP at its last iteration and at the
  hold-out stop."""
  clean = io.load_image(path)
  mask = io.load_image(mask_path, channels=1)
  config = pipeline.RestoreConfig(task="inpaint", stop=("holdout",), holdout=0.05, halt=False)
  y = pipeline.degrade(config, clean, seed=0, mask=mask)
  result = pipeline.restore(config, y, key=jax.random.PRNGKey(0), clean=clean, mask=mask)
  step, kept = result.stops["holdout"]
  last = pipeline.score(result.ema.mean(0), clean)["psnr"]
  held = pipeline.score(kept.mean(0), clean)["psnr"]
  return [("masked input", y), (f"DIP, last iteration: {last:.2f} dB", result.ema.mean(0)),
          (f"DIP, hold-out stop ({int(step[0])}): {held:.2f} dB", kept.mean(0))]


def run() -> None:
  unknown = set(_FIGURES.value) - set(FIGURES)
  if unknown:
    raise ValueError(f"--figures: unknown {sorted(unknown)}; valid figures are {FIGURES}")
  cli.writable_dir(_OUT_DIR.value, "--out_dir")
  for name in _FIGURES.value:
    path = os.path.join(_OUT_DIR.value, f"figure_{name}.png")
    if os.path.exists(path):
      logging.info("%s exists: skipped", path)
      continue
    if name == "real":
      photo = os.path.join(_DATA.value, "dip", "flash_no_flash", "cave01_01_noflash.png")
      row, title = real_noise(photo), "camera noise"
    else:
      stem = os.path.join(_DATA.value, "dip", "inpainting", name)
      row, title = masked(stem + ".png", stem + "_mask.png"), f"inpainting, {name}"
    plots.image_row(path + ".tmp.png", row, title=_caption(title, name))
    os.replace(path + ".tmp.png", path)
    logging.info("wrote %s", path)


if __name__ == "__main__":
  cli.run_main(__file__, run)
