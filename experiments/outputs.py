"""The files of one restoration (experiments/restore.py): restored / degraded images (PNG and
exact .npy), metrics.json, the per-iteration trace.csv and psnr.png, written all or nothing.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile

import jax
import numpy as np

from dipjax import io
from dipjax import pipeline
from dipjax import plots

RESULT_FILES = ("restored.png", "restored.npy", "degraded.png", "degraded.npy", "trace.csv",
                "psnr.png", "metrics.json")


def metrics_json(image_path: str, config: pipeline.RestoreConfig,
                 r: pipeline.Restoration) -> dict:
  """metrics.json: the image, the settings, and the restoration's summary."""
  result = dict(image=os.path.abspath(image_path), task=config.task, method=config.method,
                sigma=config.sigma, device=jax.default_backend(),
                config=json.loads(json.dumps(vars(config))))
  if config.fits:
    result.update(net=config.net, width=config.width, scales=config.scales,
                  iterations=config.iters, seeds=config.seeds, loss=config.loss)
  return result | r.summary()


def write_trace_csv(path: str, r: pipeline.Restoration) -> None:
  """One row per seed and iteration: every trace record, SSIM where it was computed."""
  names = [k for k in r.trace if not k.startswith("ssim")]
  seeds, n = r.trace["loss"].shape
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["seed", "iteration"] + names + ["ssim_clean", "ssim_clean_ema"])
    for m in range(seeds):
      for i in range(n):
        at = (i + 1) % r.trace_every == 0 or i + 1 == n
        ssim = [f"{r.trace[k][m, i // r.trace_every]:.5f}" if at else "" for k in
                ("ssim_clean", "ssim_clean_ema")]
        w.writerow([m, i + 1] + [f"{r.trace[k][m, i]:.5g}" for k in names] + ssim)


def write(out_dir: str, config: pipeline.RestoreConfig, r: pipeline.Restoration,
          image_path: str) -> dict:
  """Writes the files into a staging directory and moves them into `out_dir` (metrics.json
  last) once all are written, so a failure leaves no partial result; removes result files of
  an earlier run that this one does not write. Returns metrics.json's content; a ValueError
  when the files cannot be written."""
  result = metrics_json(image_path, config, r)
  try:
    _write(out_dir, config, r, result, os.path.basename(image_path))
  except OSError as e:
    raise ValueError(f"cannot write the outputs into {out_dir}: {e}") from e
  return result


def _write(out_dir: str, config: pipeline.RestoreConfig, r: pipeline.Restoration, result: dict,
           name: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out_dir, prefix=".writing-") as staging:
    at = lambda file: os.path.join(staging, file)
    io.save_image(at("restored.png"), r.image)
    np.save(at("restored.npy"), r.image)  # exact float32
    io.save_image(at("degraded.png"), r.observation)
    np.save(at("degraded.npy"), r.observation)  # exact, for baselines
    if r.trace is not None:  # a fit, untiled
      write_trace_csv(at("trace.csv"), r)
      ends = r.stage_ends if len(r.stage_ends) > 1 else None
      plots.psnr_curves(at("psnr.png"), plots.fit_curves(r.trace), ends,
                        title=f"{config.task}, {config.method}, {name}")
    with open(at("metrics.json"), "w") as f:
      json.dump(result, f, indent=2)
    written = sorted(os.listdir(staging), key=lambda file: file == "metrics.json")
    blocked = [file for file in written if os.path.isdir(os.path.join(out_dir, file))]
    if blocked:
      raise ValueError(f"cannot write {', '.join(blocked)} into {out_dir}: a directory is there")
    for file in written:
      os.replace(at(file), os.path.join(out_dir, file))
  for stale in set(RESULT_FILES) - set(written):  # of an earlier run (e.g. a fit's trace)
    if os.path.isfile(os.path.join(out_dir, stale)):
      os.remove(os.path.join(out_dir, stale))
