"""What experiments/grid.py says before and while it runs: the grid's size and an estimated
time from the speed of rows already done on this device (per speed group), else a short
calibration (``estimate``, ``calibrate``, ``announce``), and one line per config.
"""

from __future__ import annotations

import collections
import math
import platform
import time
from typing import Callable

import jax
import numpy as np

import common
import fits
import grid_spec


def device(method: str) -> dict[str, str]:
  """What a row of `method` runs on here (BM3D: this CPU; fits: JAX's first device)."""
  if method == "bm3d":
    return dict(backend="numpy", kind=platform.processor() or platform.machine())
  return dict(backend=jax.default_backend(), kind=jax.devices()[0].device_kind)


def speed_group(config: dict, pixels: int, channels: int) -> tuple:
  """Configs that run at one speed: (pixels, channels, net, width, staged) or BM3D's."""
  if config["method"] == "bm3d":
    return (pixels, channels, "bm3d")
  return (pixels, channels, config["net"], config["width"], config["method"] in grid_spec.STAGED)


def _compile_group(config: dict, pixels: int, channels: int) -> tuple:
  """Configs that share one compiled fit (approximately: what changes array shapes)."""
  return speed_group(config, pixels, channels) + (
      config.get("seeds"), config.get("stages"), config["method"] in grid_spec.DDPM_INPUT,
      math.gcd(config.get("iters", 0), fits.CHUNK_ITERS))


def _group_name(group: tuple) -> str:
  pixels, channels = group[:2]
  side = math.isqrt(pixels)
  size = f"{side}²" if side * side == pixels else f"{pixels} px"
  if group[2] == "bm3d":
    return f"BM3D {size}x{channels}"
  return f"{group[2]} w{group[3]} {size}x{channels} {'staged' if group[4] else 'plain'}"


def calibrate(job: grid_spec.Job, clean: np.ndarray,
              compiler: fits.Compiler) -> tuple[float, float]:
  """Measures one config's speed: (ms per iteration per fit, compile s) for fits (compile and
  one chunk of at most 100 iterations of its fits, kept compiled), (s, 0) for BM3D."""
  config = job.config
  noisy = common.noisy_image(clean, config["image"], config["sigma"], config["noise_seed"])
  if config["method"] == "bm3d":
    t0 = time.perf_counter()
    common.bm3d_denoise(noisy, config["sigma"] / 255)
    return time.perf_counter() - t0, 0.0
  run, _ = fits.setup(config, clean, noisy, compiler.mesh)
  chunk_fn = run.compile(compiler)
  t0 = time.perf_counter()
  jax.block_until_ready(chunk_fn(run.states, run.problem))
  return 1000 * (time.perf_counter() - t0) / (run.chunk * config["seeds"]), run.compile_seconds


def estimate(pending: list[grid_spec.Job], sizes: dict[str, tuple[int, int]], rows: list[dict],
             measure: Callable[[grid_spec.Job], tuple[float, float]]
             ) -> tuple[list[float], list[str]]:
  """Seconds for each pending job and one line per speed group saying where its speed is from.

  A group's speed (ms/it per fit; s per BM3D run) is the median over the rows of `rows` in it
  run on this device, else `measure(first job of the group)` (a calibration, whose compile is
  then already done).
  Each compiled shape not yet built adds the group's compile time (from its rows or the
  calibration).
  """
  measured, compiles = collections.defaultdict(list), collections.defaultdict(list)
  for row in rows:
    if row.get("device") != device(row["config"]["method"]):
      continue
    group = speed_group(row["config"], row["pixels"], row["channels"])
    measured[group].append(row["wall_s"] if row["config"]["method"] == "bm3d"
                           else row["ms_per_it"])
    if row.get("compile_s"):
      compiles[group].append(row["compile_s"])
  speed, notes, built = {}, [], set()
  for job in pending:
    group = speed_group(job.config, *sizes[job.path])
    if group in speed:
      continue
    unit = "s per run" if group[2] == "bm3d" else "ms/it per fit"
    if measured[group]:
      compile_s = float(np.mean(compiles[group])) if compiles[group] else 0.0
      speed[group] = (float(np.median(measured[group])), compile_s)
      notes.append(f"{_group_name(group)}: {speed[group][0]:.1f} {unit}, median of "
                   f"{len(measured[group])} done row(s)")
    else:
      value, compile_s = measure(job)
      speed[group] = (value, compile_s)
      built.add(_compile_group(job.config, *sizes[job.path]))
      chunk = math.gcd(job.config.get("iters", 0), fits.CHUNK_ITERS)
      what = ("one BM3D run" if group[2] == "bm3d" else
              f"compile {compile_s:.1f} s + one {chunk}-iteration chunk")
      notes.append(f"{_group_name(group)}: {value:.1f} {unit}, calibrated now ({what})")
  seconds = []
  for job in pending:
    group = speed_group(job.config, *sizes[job.path])
    value, compile_s = speed[group]
    if group[2] == "bm3d":
      seconds.append(value)
      continue
    compiled = _compile_group(job.config, *sizes[job.path])
    seconds.append(value / 1000 * job.config["iters"] * job.config["seeds"]
                   + (0.0 if compiled in built else compile_s))
    built.add(compiled)
  return seconds, notes


def duration(seconds: float) -> str:
  """Seconds as '1 h 02 min', '3 min 04 s' or '5 s'."""
  seconds = round(seconds)
  if seconds >= 3600:
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
  if seconds >= 60:
    return f"{seconds // 60} min {seconds % 60:02d} s"
  return f"{seconds} s"


def announce(all_jobs: list[grid_spec.Job], pending: list[grid_spec.Job], seconds: list[float],
             notes: list[str], out: str) -> None:
  """Prints the grid's size, what is done and the estimated time of the rest."""
  fit_jobs = [j for j in all_jobs if j.config["method"] != "bm3d"]
  n_fits = sum(j.config["seeds"] for j in fit_jobs)
  iters = sorted({j.config["iters"] for j in fit_jobs})
  print(f"grid: {len(all_jobs)} configs ({len(fit_jobs)} fit configs = {n_fits} fits of "
        f"{'/'.join(map(str, iters)) or 0} iterations, {len(all_jobs) - len(fit_jobs)} BM3D); "
        f"{len(all_jobs) - len(pending)} already in {out}, {len(pending)} to run", flush=True)
  print(f"estimated time for the {len(pending)} to run: {duration(sum(seconds))}", flush=True)
  for note in notes:
    print(f"  {note}", flush=True)


def summary_line(row: dict) -> str:
  """A finished row's PSNR at each stop (BM3D: its output's)."""
  if "output" in row:
    return f"BM3D {row['output']['psnr']:.2f} dB"
  parts = [f"{name} {np.mean(c['psnr']):.2f}" + (f" (ens {c['ensemble']['psnr']:.2f})"
                                                  if len(c["psnr"]) > 1 else "")
           for name, c in row["criteria"].items()]
  return "PSNR at stop: " + ", ".join(parts) + " dB"


def describe(config: dict) -> str:
  """A config's method and the settings that apply to it, for the log."""
  shown = ("net", "width", "loss", "seeds", "iters", "schedule", "stages", "t_max", "fresh_eps",
           "probe", "final_share", "sigma_estimated")
  return config["method"] + "(" + ", ".join(f"{k}={config[k]}" for k in shown
                                            if k in config) + ")"

