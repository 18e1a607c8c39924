"""The compiled fits of one grid config (experiments/grid.py, experiments/ddpm_report.py): the
network, fit settings, problem and seed keys built by dipjax.pipeline (``setup``), compiled
chunks kept per signature (``Compiler``), the fits run in chunks (``run_fits``) and scored at
every criterion's stop (``score_fits``); ``fit_row`` does all of it for a grid row.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from typing import Any, Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
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


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything one config's fits need: the network, the fit settings, the problem (one for
  all seeds if `shared`, else stacked per seed), the seeds' keys."""
  net: Any
  config: fit.FitConfig
  problem: problems.Problem
  keys: jax.Array
  frame: pipeline.Frame
  chunk: int
  info: dict
  shared: bool = True


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


def setup(config: dict, clean: np.ndarray, noisy: np.ndarray) -> Setup:
  """The network, fit settings, problem (y and clean padded to 2^scales) and seed keys of a fit
  config, built by dipjax.pipeline as restore() builds them (its seeding convention)."""
  rc = restore_config(config)
  frame = pipeline.make_frame(rc, noisy, clean)
  sigma = pipeline.noise_sigma(rc, noisy)
  info = {} if rc.sigma_known else dict(sigma_used=round(sigma * 255, 4))
  if rc.input == "ddpm":
    info["input_t"] = pipeline.input_timestep(rc, sigma)
  key = jax.random.PRNGKey(config["seed_base"])
  problem = pipeline.build_problem(jax.random.fold_in(key, pipeline.PROBLEM_STREAM), rc, frame,
                                   sigma)
  shared = rc.method != "staged"
  if not shared:
    info["stage_ends"] = [int(e) for e in problem.ends[0]]
  chunk = math.gcd(config["iters"], CHUNK_ITERS)
  return Setup(pipeline.network(rc, noisy.shape[-1]), pipeline.fit_config(rc, chunk), problem,
               jax.random.split(key, config["seeds"]), frame, chunk, info, shared)


class Compiler:
  """The compiled chunk of fits (``fit.compile_many``) per static signature, built once.

  Keeps the `keep` most recently used: XLA:CPU maps each executable's code into memory until
  JAX's caches are cleared, and a long grid with many shapes would pass the kernel's limit on
  memory mappings (vm.max_map_count) otherwise. With a `mesh` (``fit.fits_mesh()``) each
  config's seeds are sharded over its devices, those of every process in a multi-process run.
  """

  def __init__(self, keep: int = 8, mesh: jax.sharding.Mesh | None = None):
    self._compiled = collections.OrderedDict()
    self._keep = keep
    self.mesh = mesh

  def get(self, s: Setup, states: fit.TrainState) -> tuple[Callable, bool]:
    """(run(states, problem) -> (states, trace) for s.chunk iterations, whether it was compiled
    now)."""
    leaves, tree = jax.tree.flatten((states, s.problem))
    signature = (s.net, s.config, s.chunk, s.shared, tree,
                 tuple((x.shape, str(x.dtype)) for x in leaves))
    if signature in self._compiled:
      self._compiled.move_to_end(signature)
      return self._compiled[signature], False
    if len(self._compiled) >= self._keep:
      self._compiled.popitem(last=False)
      jax.clear_caches()
    self._compiled[signature] = fit.compile_many(states, s.problem, s.chunk, net=s.net,
                                                 config=s.config, shared=s.shared,
                                                 mesh=self.mesh)
    return self._compiled[signature], True


def init_states(s: Setup) -> fit.TrainState:
  """Fresh states for the config's seeds. They depend on the problem only through the input and
  image shapes, so they are drawn for the plain problem of those shapes: one compiled init
  (slow to compile: net.init) serves plain and staged configs alike."""
  p = s.problem if s.shared else jax.tree.map(lambda x: x[0], s.problem)
  plain = problems.plain_problem(p.inputs, p.observation, p.operator, 1, p.clean, p.sigma)
  return fit.init_many(s.keys, s.net, plain, s.config)


def _to_host(tree: Any) -> Any:
  """A pytree of arrays as numpy: gathered from every process in a multi-process run (where
  arrays span processes), so each process holds the whole result."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def ready(s: Setup, compiler: Compiler) -> tuple[fit.TrainState, problems.Problem, Callable, float]:
  """Fresh states and the problem as the compiled chunk takes them, the chunk, and the seconds
  spent compiling (0 when reused). In a multi-process run both are host arrays, equal in every
  process, which the chunk shards over the global mesh."""
  t0 = time.perf_counter()
  states, problem = init_states(s), s.problem
  if jax.process_count() > 1:
    states, problem = jax.device_get((states, problem))
  run, fresh = compiler.get(s, states)
  return states, problem, run, time.perf_counter() - t0 if fresh else 0.0


def run_fits(s: Setup, compiler: Compiler, iters: int, progress: Callable[[int, dict], None]
             = lambda done, trace: None) -> tuple[fit.TrainState, dict, float, float]:
  """Fits the config's seeds for `iters` iterations in compiled chunks.

  Returns (states, trace arrays (M, n) by field (SSIM per chunk), seconds compiling (0 when
  reused), fit s).
  """
  states, problem, run, compile_s = ready(s, compiler)
  chunks = collections.defaultdict(list)
  t0 = time.perf_counter()
  for done in range(s.chunk, iters + 1, s.chunk):
    states, trace = run(states, problem)
    for name, value in vars(_to_host(trace)).items():
      chunks[name].append(value)
    progress(done, chunks)
  states = _to_host(states)
  fit_s = time.perf_counter() - t0
  return states, {k: np.concatenate(v, axis=1) for k, v in chunks.items()}, compile_s, fit_s


@functools.partial(jax.jit, static_argnames="criterion")
def _fired_at(criterion: stopping.Criterion, records: dict, noise_std: jax.Array) -> jax.Array:
  """(M,) iteration at which `criterion` fired over each fit's trace (-1: never)."""
  return jax.vmap(lambda r: stopping.detect(criterion, r, noise_std).fired_at)(records)


def score_fits(config: dict, s: Setup, states: fit.TrainState, trace: dict,
               clean: np.ndarray) -> tuple[dict, dict]:
  """Per criterion: the stops, PSNR/SSIM of the kept EMA outputs and their ensemble, and the
  scores against the oracle peak. Returns (row fields, arrays for the .npz).

  A criterion without any stop (its score was never defined, e.g. ES-WMV in a run shorter
  than its window) falls back to the last iteration (counted in `no_stop`).
  """
  iters = config["iters"]
  peak_psnr = np.nanmax(trace["psnr_clean_ema"], axis=1)
  peak_step = np.nanargmax(trace["psnr_clean_ema"], axis=1)
  final = s.frame.unpad(np.asarray(states.ema))
  records = fit.trace_records(fit.Trace(**{k: jnp.asarray(v) for k, v in trace.items()}))
  observation = s.problem.observation if s.shared else s.problem.observation[0]
  sigma = s.problem.sigma if s.shared else s.problem.sigma[0]  # the fit's (known or estimated)
  noise_std = noise.noise_std(observation, sigma)  # as the fit's monitors
  results = dict(oracle_peak=dict(step=peak_step.tolist(), psnr=np.round(peak_psnr, 4).tolist()),
                 rolled_back=np.sum(trace["rolled_back"], axis=1).tolist(), criteria={})
  arrays = {f"curve_{name}": trace[name] for name in CURVES}
  arrays.update(oracle_step=peak_step, oracle_psnr=peak_psnr)
  for criterion, (stop, kept) in zip(s.config.criteria, fit.stops(states, s.config).values()):
    name = criterion.name
    stop, kept = np.asarray(stop), s.frame.unpad(np.asarray(kept))
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
  arrays for the .npz)."""
  s = setup(config, clean, noisy)
  last_log = [time.perf_counter()]

  def progress(done: int, chunks: dict) -> None:
    if time.perf_counter() - last_log[0] >= 60 and done < config["iters"]:
      last_log[0] = time.perf_counter()
      logging.info("  %s %s: iteration %d/%d, EMA PSNR %.2f dB (mean of %d fits)",
                   config["image"], config["method"], done, config["iters"],
                   np.mean(chunks["psnr_clean_ema"][-1][:, -1]), config["seeds"])

  states, trace, compile_s, fit_s = run_fits(s, compiler, config["iters"], progress)
  results, arrays = score_fits(config, s, states, trace, clean)
  return dict(compile_s=round(compile_s, 2), fit_s=round(fit_s, 2),
              ms_per_it=round(1000 * fit_s / (config["iters"] * config["seeds"]), 3),
              **s.info, **results), arrays
