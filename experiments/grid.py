r"""Ablation grid: images x sigma x method x staging x net x width x loss, K seeds per config.

  python experiments/grid.py --images=../shared/data/CSet9 --sigmas=25 \
      --methods=dip,staged,bm3d --seeds=3 --out=runs/grid/results.jsonl
  python experiments/summary.py --results=runs/grid/results.jsonl --out_md=runs/grid/summary.md

A config is one image, one sigma, one method and the settings that apply to it (schedule,
stages, t_max, fresh_eps, probe and final_share only to the staged methods; nothing of the fit
to bm3d); its K seeds are fitted together (fits.py). Each finished config is appended to --out
as one JSON line keyed by the sha1 of its canonical config, with its curves and images in
``common.arrays_dir(out)/<key>.npz`` (under runs/arrays/, git-ignored, for rows in the
repository); a killed grid resumes where it stopped and never repeats a row. The noise of an
image depends only on (--noise_seed, its file name, sigma), so every method, BM3D included,
sees the same noisy input. Before it starts the grid prints its size and an estimated time
(estimates.py: from the speed of rows already in --out, else a short calibration). The axes
and their checks are grid_spec.GridSpec.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import shlex
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

import cli
import common
import estimates
import fits
from dipjax import fit
from dipjax import nets
from dipjax import stopping
from grid_spec import GridSpec, Job, METHODS, STAGED, boolean, share

_IMAGES = flags.DEFINE_list("images", None, "Image files or folders (their sorted "
                            ".png/.jpg/.tif files).")
_CROP = flags.DEFINE_integer("crop", 128, "Centre crop size (0: the whole image).")
_SIGMAS = flags.DEFINE_list("sigmas", ["25"], "Noise std, 0-255 units.")
_METHODS = flags.DEFINE_list("methods", ["dip", "staged"], f"Methods, of {', '.join(METHODS)}.")
_SCHEDULES = flags.DEFINE_list("schedules", ["linear"], "Noise schedules (staged methods).")
_STAGES = flags.DEFINE_list("stages", ["4"], "Stage counts (staged methods).")
_T_MAX = flags.DEFINE_list("t_max", ["100"], "Noisiest stage timesteps (staged methods).")
_FRESH_EPS = flags.DEFINE_list("fresh_eps", ["false"], "A new noise image per stage (staged "
                               "methods): true, false or both.")
_PROBES = flags.DEFINE_list("probes", ["0.3"], "Probe noise ratios (staged methods): targets "
                            "are staged from y + probe * sigma * eps; 0 disables the 'staged' "
                            "criterion.")
_SIGMA_ESTIMATED = flags.DEFINE_list(
    "sigma_estimated", ["false"], "Whether a fit is given the sigma added (false) or its estimate "
    "from the noisy image (true: noise.estimate_sigma), for the probe, the staged and the "
    "discrepancy criteria; 'false,true' makes it an axis.")
_FINAL_SHARES = flags.DEFINE_list("final_shares", ["equal"], "Fraction of --iters for the last "
                                  "stage (staged methods); 'equal': all stages equally long.")
_LOSSES = flags.DEFINE_list("losses", ["mse"], "Training losses (mse, l1, mse_ssim).")
_NETS = flags.DEFINE_list("nets", ["skip"], f"Networks, of {', '.join(nets.NETS)}.")
_WIDTHS = flags.DEFINE_list("widths", ["32"], "Channels per scale.")
_SCALES = flags.DEFINE_integer("scales", 5, "Network scales (images padded to 2^scales).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Fits per config (seeds), fitted together and "
                              "averaged into the ensemble.")
_SEED_BASE = flags.DEFINE_integer("seed_base", 0, "Fit keys: split(PRNGKey(seed_base), seeds).")
_ITERS = flags.DEFINE_integer("iters", 3000, "Iterations per fit.")
_LR = flags.DEFINE_float("lr", 0.01, "Adam learning rate.")
_REG_NOISE = flags.DEFINE_float("reg_noise_std", 1 / 30, "Input jitter std.")
_EXP_WEIGHT = flags.DEFINE_float("exp_weight", 0.99, "Output EMA weight.")
_CRITERIA = flags.DEFINE_list("criteria", list(stopping.KINDS), "Stopping criteria scored "
                              "(published settings).")
_WINDOW = flags.DEFINE_integer("window", 100, "ES-WMV window (with criterion es_wmv).")
_NOISE_SEED = flags.DEFINE_integer("noise_seed", 0, "Seed of the noise added to every image.")
_OUT = flags.DEFINE_string("out", "runs/grid/results.jsonl", "Results (JSON lines, appended).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the grid's size and estimate, then exit.")
_SHARD = flags.DEFINE_bool("shard", False, "Shard each config's seeds over all devices (of all "
                           "processes with --coordinator); --seeds a multiple of their count.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "Multi-process grid: host:port of process 0. Every process runs the "
    "same command with its own --process_id (implies --shard); process 0 writes --out.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Multi-process grid: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Multi-process grid: this process, from 0.")


def spec_from_flags() -> GridSpec:
  if not _IMAGES.value:
    raise ValueError("--images is required (image files or folders)")
  return GridSpec(
      images=common.expand_images(_IMAGES.value), crop=_CROP.value,
      sigmas=common.parse_list("sigmas", _SIGMAS.value, float), methods=tuple(_METHODS.value),
      schedules=tuple(_SCHEDULES.value), stages=common.parse_list("stages", _STAGES.value, int),
      t_max=common.parse_list("t_max", _T_MAX.value, int),
      fresh_eps=common.parse_list("fresh_eps", _FRESH_EPS.value, boolean),
      probes=common.parse_list("probes", _PROBES.value, float),
      final_shares=common.parse_list("final_shares", _FINAL_SHARES.value, share),
      sigma_estimated=common.parse_list("sigma_estimated", _SIGMA_ESTIMATED.value, boolean),
      losses=tuple(_LOSSES.value), nets=tuple(_NETS.value),
      widths=common.parse_list("widths", _WIDTHS.value, int), scales=_SCALES.value,
      seeds=_SEEDS.value, seed_base=_SEED_BASE.value, iters=_ITERS.value, lr=_LR.value,
      reg_noise_std=_REG_NOISE.value, exp_weight=_EXP_WEIGHT.value,
      criteria=tuple(_CRITERIA.value), window=_WINDOW.value, noise_seed=_NOISE_SEED.value)


def _method_configs(spec: GridSpec, path: str, sigma: float, method: str) -> list[dict]:
  """The configs of one image, sigma and method: only the axes that apply to the method."""
  base = dict(image=os.path.basename(path),
              set=os.path.basename(os.path.dirname(os.path.abspath(path))), crop=spec.crop,
              sigma=float(sigma), method=method, noise_seed=spec.noise_seed)
  if method == "bm3d":
    return [base]
  fit_axes = dict(scales=spec.scales, seeds=spec.seeds, seed_base=spec.seed_base,
                  iters=spec.iters, lr=float(spec.lr), reg_noise_std=float(spec.reg_noise_std),
                  exp_weight=float(spec.exp_weight))
  if "es_wmv" in spec.criteria:
    fit_axes["window"] = spec.window
  staged = [{}]
  if method in STAGED:
    staged = [dict(schedule=s, stages=k, t_max=t, fresh_eps=f, probe=float(p), final_share=q)
              for s, k, t, f, p, q in itertools.product(
                  spec.schedules, spec.stages, spec.t_max, spec.fresh_eps, spec.probes,
                  spec.final_shares)]
  configs = []
  for n, w, loss, s, estimated in itertools.product(spec.nets, spec.widths, spec.losses, staged,
                                                    spec.sigma_estimated):
    # 'staged' needs a probe; the default loss and the known sigma are left out of the key (rows
    # from before those were axes keep their keys).
    criteria = [c for c in spec.criteria if c != "staged" or s.get("probe")]
    configs.append(dict(base, **fit_axes, criteria=criteria, net=n, width=w, **s,
                        **({} if loss == "mse" else dict(loss=loss)),
                        **(dict(sigma_estimated=True) if estimated else {})))
  return configs


def jobs(spec: GridSpec) -> list[Job]:
  """Every config of the grid, image-major, deduplicated by key (axes that do not apply to a
  method collapse)."""
  out = {}
  for path, sigma, method in itertools.product(spec.images, spec.sigmas, spec.methods):
    for config in _method_configs(spec, path, sigma, method):
      key = common.row_key(config)
      out.setdefault(key, Job(path, config, key))
  return list(out.values())


def run_config(job: Job, clean: np.ndarray, compiler: fits.Compiler) -> tuple[dict, dict]:
  """Runs one config: its K fits (or BM3D) on the image's noisy input. Returns (row, arrays)."""
  config = job.config
  noisy = common.noisy_image(clean, config["image"], config["sigma"], config["noise_seed"])
  t0 = time.perf_counter()
  row = dict(key=job.key, config=config, path=os.path.abspath(job.path),
             device=estimates.device(config["method"]), pixels=clean.shape[0] * clean.shape[1],
             channels=clean.shape[2], noisy=common.quality(noisy, clean))
  arrays = dict(clean=common.uint8(clean), noisy=common.uint8(noisy))
  if config["method"] == "bm3d":
    out = common.bm3d_denoise(noisy, config["sigma"] / 255)
    row["output"] = common.quality(out, clean)
    arrays["output"] = common.uint8(out)
  else:
    fields, more = fits.fit_row(config, clean, noisy, compiler)
    row.update(fields)
    arrays.update(more)
  row["wall_s"] = round(time.perf_counter() - t0, 2)
  row["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  return row, arrays


# ----------------------------------------------------------------------------- the grid


def run_grid(spec: GridSpec, out: str, *, argv: str = "", dry_run: bool = False,
             limit: int | None = None, compiler: fits.Compiler | None = None) -> list[dict]:
  """Runs the grid's configs not yet in `out`, appending a row as each finishes.

  Args:
    argv: the command line, stored in every row.
    dry_run: print the size and the estimate only (a calibration may still compile and run).
    limit: run at most this many configs, then return (the grid stays resumable).
    compiler: compiled fits to reuse across calls.

  Returns:
    the rows appended by this call.
  """
  all_jobs = jobs(spec)
  cleans = {path: common.load_clean(path, spec.crop) for path in spec.images}
  sizes = {path: (x.shape[0] * x.shape[1], x.shape[2]) for path, x in cleans.items()}
  compiler = fits.Compiler() if compiler is None else compiler

  def announce(rows: list[dict]) -> tuple[list[Job], list[float]]:
    """The jobs not in `rows` and their estimated seconds, printed with the grid's size."""
    done = {row["key"] for row in rows}
    pending = [j for j in all_jobs if j.key not in done]
    seconds, notes = estimates.estimate(
        pending, sizes, rows, lambda job: estimates.calibrate(job, cleans[job.path], compiler))
    estimates.announce(all_jobs, pending, seconds, notes, out)
    return pending, seconds

  if dry_run:
    announce(common.read_rows(out))
    return []
  if compiler.mesh is not None and spec.seeds % compiler.mesh.size:
    raise ValueError(f"--shard: --seeds ({spec.seeds}) must be a multiple of the "
                     f"{compiler.mesh.size} devices")
  # In a multi-process run every process fits its share of each config; process 0 writes.
  writer = jax.process_index() == 0
  new = []
  with common.Results(out) if writer else contextlib.nullcontext() as results:
    pending, seconds = announce(results.rows if writer else common.read_rows(out))
    base = os.path.dirname(os.path.abspath(out))
    t_start = time.perf_counter()
    for i, job in enumerate(pending[:limit]):
      c = job.config
      if not writer and c["method"] == "bm3d":
        continue
      logging.info("config %d/%d: %s/%s sigma=%g %s", i + 1, len(pending), c["set"], c["image"],
                   c["sigma"], estimates.describe(c))
      row, arrays = run_config(job, cleans[job.path], compiler)
      npz = os.path.join(common.arrays_dir(out), job.key + ".npz")
      row.update(arrays=os.path.relpath(npz, base), argv=argv)
      if writer:
        common.save_arrays(npz, arrays)
        results.append(row)
      new.append(row)
      logging.info("config %d/%d done in %.0f s: noisy %.2f dB, %s; %s elapsed, ETA %s",
                   i + 1, len(pending), row["wall_s"], row["noisy"]["psnr"],
                   estimates.summary_line(row), estimates.duration(time.perf_counter() - t_start),
                   estimates.duration(sum(seconds[i + 1:])))
  return new


def main(argv):
  cli.start(argv, __file__)
  with cli.errors("grid.py"):
    if _COORDINATOR.value:
      cli.join(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _NUM_PROCESSES.value != 1:
      raise ValueError("--num_processes > 1 needs --coordinator")
    mesh = fit.fits_mesh() if _SHARD.value or _COORDINATOR.value else None
    run_grid(spec_from_flags(), _OUT.value, argv="python " + shlex.join(sys.argv),
             dry_run=_DRY_RUN.value, compiler=fits.Compiler(mesh=mesh))


if __name__ == "__main__":
  app.run(main)
