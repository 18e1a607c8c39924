"""The fits of one grid config (experiments/grid.py, experiments/ddpm_report.py): a
dipjax.pipeline.FitRun built as restore() builds it (``setup``), compiled chunks kept per
signature across configs (``Compiler``), the fits scored at every criterion's stop
(``score_fits``); ``fit_row`` does all of it for a grid row.
"""

from __future__ import annotations

import collections
import functools
import math
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import common
import grid_spec
from dipjax import fit
from dipjax import noise
from dipjax import pipeline
from dipjax import problems
from dipjax import stopping

CHUNK_ITERS = 100  # iterations per compiled call: gcd(iters, CHUNK_ITERS); calibration: one
CURVES = ("psnr_clean_ema", "psnr_clean", "psnr_obs_ema", "psnr_target_ema", "stage", "wmv",
          "emv", "noise_fit_ema", "mse_est_ema")


def restore_config(config: dict) -> pipeline.RestoreConfig:
  """The library's config of a grid config's fits (the axes that do not apply keep their
  defaults, which those methods ignore)."""
  staged = config["method"] in grid_spec.STAGED
  stage_axes = {k: config[k] for k in ("schedule", "stages", "t_max", "fresh_eps", "probe",
                                       "final_share") if staged}
  return pipeline.RestoreConfig(
      sigma=config["sigma"], sigma_known=not config.get("sigma_estimated", False),
      method="staged" if staged else "dip",
      input="ddpm" if config["method"] in grid_spec.DDPM_INPUT else "noise", **stage_axes,
      iters=config["iters"], seeds=config["seeds"], net=config["net"], width=config["width"],
      scales=config["scales"], reg_noise_std=config["reg_noise_std"], lr=config["lr"],
      exp_weight=config["exp_weight"], loss=config.get("loss", "mse"),
      stop=tuple(config["criteria"]), halt=False, window=config.get("window", 100))


def setup(config: dict, clean: np.ndarray, noisy: np.ndarray,
          mesh: jax.sharding.Mesh | None = None,
          chunk: int | None = None) -> tuple[pipeline.FitRun, dict]:
  """The fits of a grid config on `noisy` as dipjax.pipeline.restore builds them (its seeding
  convention, the key PRNGKey(seed_base)), `chunk` iterations per compiled call (default
  gcd(iters, CHUNK_ITERS)), and the row fields they add (the estimated sigma, the input's
  timestep, the stage ends)."""
  rc = restore_config(config)
  frame = pipeline.make_frame(rc, noisy, clean)
  sigma = pipeline.noise_sigma(rc, frame)
  info = {} if rc.sigma_known else dict(sigma_used=round(sigma * 255, 4))
  if rc.input == "ddpm":
    info["input_t"] = pipeline.input_timestep(rc, sigma)
  run = pipeline.FitRun(rc, frame, sigma, jax.random.PRNGKey(config["seed_base"]),
                        chunk=chunk or math.gcd(config["iters"], CHUNK_ITERS), mesh=mesh,
                        stop_diverged=False)  # a diverged config is a row (its roll-backs)
  if not run.shared:
    info["stage_ends"] = list(run.stage_ends)
  return run, info


class Compiler:
  """:func:`fit.compile_many` with its compiled chunks kept per static signature, built once
  (``FitRun.compile(compiler)``).

  Keeps the `keep` most recently used: XLA:CPU maps each executable's code into memory until
  JAX's caches are cleared, and a long grid with many shapes would pass the kernel's limit on
  memory mappings (vm.max_map_count) otherwise. `mesh` (``fit.fits_mesh()``): the mesh the
  grid's fits are set up with (:func:`setup`), sharding each config's seeds over its devices,
  those of every process in a multi-process run.
  """

  def __init__(self, keep: int = 8, mesh: jax.sharding.Mesh | None = None):
    self._compiled = collections.OrderedDict()
    self._keep = keep
    self.mesh = mesh

  def __call__(self, states: fit.TrainState, problem: problems.Problem, iters: int, *,
               net: Any, config: fit.FitConfig, shared: bool,
               mesh: jax.sharding.Mesh | None = None) -> Callable:
    leaves, tree = jax.tree.flatten((states, problem))
    signature = (net, config, iters, shared, mesh, tree,
                 tuple((x.shape, str(x.dtype)) for x in leaves))
    if signature in self._compiled:
      self._compiled.move_to_end(signature)
      return self._compiled[signature]
    if len(self._compiled) >= self._keep:
      self._compiled.popitem(last=False)
      jax.clear_caches()
    self._compiled[signature] = fit.compile_many(states, problem, iters, net=net, config=config,
                                                 shared=shared, mesh=mesh)
    return self._compiled[signature]


@functools.partial(jax.jit, static_argnames="criterion")
def _fired_at(criterion: stopping.Criterion, records: dict, noise_std: jax.Array) -> jax.Array:
  """(M,) iteration at which `criterion` fired over each fit's trace (-1: never)."""
  return jax.vmap(lambda r: stopping.detect(criterion, r, noise_std).fired_at)(records)


def score_fits(config: dict, run: pipeline.FitRun, clean: np.ndarray) -> tuple[dict, dict]:
  """Per criterion: the stops, PSNR/SSIM of the kept EMA outputs and their ensemble, and the
  scores against the oracle peak. Returns (row fields, arrays for the .npz).

  A criterion without any stop (its score was never defined, e.g. ES-WMV in a run shorter
  than its window) falls back to the last iteration (counted in `no_stop`).
  """
  iters, states, trace, problem = config["iters"], run.states, run.trace, run.problem
  peak_psnr = np.nanmax(trace["psnr_clean_ema"], axis=1)
  peak_step = np.nanargmax(trace["psnr_clean_ema"], axis=1)
  final = run.frame.unpad(np.asarray(states.ema))
  records = fit.trace_records(fit.Trace(**{k: jnp.asarray(v) for k, v in trace.items()}))
  observation = problem.observation if run.shared else problem.observation[0]
  sigma = problem.sigma if run.shared else problem.sigma[0]  # the fit's (known or estimated)
  # as the fit's monitors
  noise_std = noise.noise_std(observation, sigma, lower=not problem.poisson)
  results = dict(oracle_peak=dict(step=peak_step.tolist(), psnr=np.round(peak_psnr, 4).tolist()),
                 rolled_back=np.sum(trace["rolled_back"], axis=1).tolist(), criteria={})
  arrays = {f"curve_{name}": trace[name] for name in CURVES}
  arrays.update(oracle_step=peak_step, oracle_psnr=peak_psnr)
  for criterion, (stop, kept) in zip(run.fit_config.criteria,
                                     fit.stops(states, run.fit_config).values()):
    name = criterion.name
    stop, kept = np.asarray(stop), run.frame.unpad(np.asarray(kept))
    missing = stop < 0
    stop = np.where(missing, iters - 1, stop)
    kept = np.where(missing[:, None, None, None], final, kept)
    fired_at = np.asarray(_fired_at(criterion, records, noise_std))
    quality, ensemble = common.quality(kept, clean), kept.mean(axis=0)
    results["criteria"][name] = dict(
        stop=stop.tolist(), fired_at=fired_at.tolist(), **quality,
        ensemble=common.quality(ensemble, clean),
        gap_db=round(float(np.mean(peak_psnr - np.asarray(quality["psnr"]))), 4),
        iter_error=float(np.mean(np.abs(stop - peak_step))),
        iters_saved=float(np.mean(np.where(fired_at >= 0, iters - (fired_at + 1), 0))),
        no_stop=int(missing.sum()))
    arrays.update({f"stop_{name}": stop, f"fired_{name}": fired_at,
                   f"kept0_{name}": common.uint8(kept[0]),
                   f"ensemble_{name}": common.uint8(ensemble)})
  return results, arrays


def fit_row(config: dict, clean: np.ndarray, noisy: np.ndarray,
            compiler: Compiler) -> tuple[dict, dict]:
  """Fits a config's seeds on `noisy` and scores them (a progress line a minute): (row fields,
  arrays for the .npz). compile_s and fit_s time the compile and the chunks' compute alone
  (rows before 2026-12-07 also counted initialisation and host transfers)."""
  run, info = setup(config, clean, noisy, compiler.mesh)
  run.compile(compiler)
  last_log = [time.perf_counter()]

  def progress(done: int, iters: int, latest: dict) -> None:
    if time.perf_counter() - last_log[0] >= 60 and done < iters:
      last_log[0] = time.perf_counter()
      logging.info("  %s %s: iteration %d/%d, EMA PSNR %.2f dB (mean of %d fits)",
                   config["image"], config["method"], done, iters, latest["psnr_clean_ema"],
                   config["seeds"])

  run.fit(progress=progress)
  results, arrays = score_fits(config, run, clean)
  return dict(compile_s=round(run.compile_seconds, 2), fit_s=round(run.fit_seconds, 2),
              ms_per_it=round(1000 * run.fit_seconds / (config["iters"] * config["seeds"]), 3),
              **info, **results), arrays
