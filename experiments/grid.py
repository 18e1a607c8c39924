r"""Ablation grid: images x sigma x method x staging x net x width x loss, K seeds per config.

  python experiments/grid.py --images=../shared/data/CSet9 --sigmas=25 \
      --methods=dip,staged,bm3d --seeds=3 --out=runs/grid/results.jsonl
  python experiments/summary.py --results=runs/grid/results.jsonl --out_md=runs/grid/summary.md

A config is one image, one sigma, one method and the settings that apply to it (schedule,
stages, t_max, fresh_eps, probe and final_share only to the staged methods; nothing of the fit
to bm3d); its K seeds
are fitted together by ``fit.fit_many``. Each finished config is appended to --out as one JSON
line keyed by the sha1 of its canonical config, with its curves and images in
``arrays_dir(out)/<key>.npz`` (under runs/arrays/, git-ignored, for rows in the repository); a
killed grid resumes where it stopped and never repeats a row. The noise of an image depends
only on (--noise_seed, its file name, sigma), so every method, BM3D included, sees the same
noisy input. Before it starts the grid prints its size and an estimated time (from the speed
of rows already in --out, else a short calibration).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import os
import platform
import shlex
import sys
import time
import zlib
from typing import Any, Callable, Iterable

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

import cli
from dipjax import fit
from dipjax import io
from dipjax import losses
from dipjax import metrics
from dipjax import nets
from dipjax import noise
from dipjax import pipeline
from dipjax import problems
from dipjax import schedules
from dipjax import stopping

METHODS = ("dip", "staged", "ddpm_input", "ddpm_input_staged", "bm3d")
STAGED = ("staged", "ddpm_input_staged")
DDPM_INPUT = ("ddpm_input", "ddpm_input_staged")
LOSSES = tuple(name for name in losses.LOSSES if not losses.needs_params(name))  # no weights
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
CURVES = ("psnr_clean_ema", "psnr_clean", "psnr_obs_ema", "psnr_target_ema", "stage", "wmv",
          "emv", "noise_fit_ema", "mse_est_ema")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK_ITERS = 100  # iterations per compiled call: gcd(iters, CHUNK_ITERS); calibration: one

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


@dataclasses.dataclass(frozen=True)
class GridSpec:
  """The grid's axes and fixed settings (the flags, parsed); validated on construction."""
  images: tuple[str, ...]
  crop: int = 128
  sigmas: tuple[float, ...] = (25.0,)
  methods: tuple[str, ...] = ("dip", "staged")
  schedules: tuple[str, ...] = ("linear",)
  stages: tuple[int, ...] = (4,)
  t_max: tuple[int, ...] = (100,)
  fresh_eps: tuple[bool, ...] = (False,)
  probes: tuple[float, ...] = (0.3,)
  final_shares: tuple[float | None, ...] = (None,)
  sigma_estimated: tuple[bool, ...] = (False,)
  losses: tuple[str, ...] = ("mse",)
  nets: tuple[str, ...] = ("skip",)
  widths: tuple[int, ...] = (32,)
  scales: int = 5
  seeds: int = 3
  seed_base: int = 0
  iters: int = 3000
  lr: float = 0.01
  reg_noise_std: float = 1 / 30
  exp_weight: float = 0.99
  criteria: tuple[str, ...] = stopping.KINDS
  window: int = 100
  noise_seed: int = 0

  def __post_init__(self):
    axes = dict(images=self.images, sigmas=self.sigmas, methods=self.methods,
                schedules=self.schedules, stages=self.stages, t_max=self.t_max,
                fresh_eps=self.fresh_eps, probes=self.probes, final_shares=self.final_shares,
                sigma_estimated=self.sigma_estimated, losses=self.losses, nets=self.nets,
                widths=self.widths)
    for name, values in axes.items():
      if not values:
        raise ValueError(f"--{name} is empty")
    checks = [
        (_unknown(self.methods, METHODS), f"--methods: unknown {_unknown(self.methods, METHODS)}"
         f"; valid methods are {', '.join(METHODS)}"),
        (_unknown(self.losses, LOSSES), f"--losses: unknown {_unknown(self.losses, LOSSES)}; "
         f"valid losses are {', '.join(LOSSES)}"),
        (_unknown(self.nets, nets.NETS), f"--nets: unknown {_unknown(self.nets, nets.NETS)}; "
         f"valid networks are {', '.join(nets.NETS)}"),
        (self.crop < 0, f"--crop must be >= 0, got {self.crop}"),
        (min(self.sigmas) <= 0, f"--sigmas must be positive, got {self.sigmas}"),
        (min(self.widths) < 1, f"--widths must be positive, got {self.widths}"),
        (self.scales < 1, f"--scales must be positive, got {self.scales}"),
        (self.seeds < 1, f"--seeds must be positive, got {self.seeds}"),
        (self.iters < 1, f"--iters must be positive, got {self.iters}"),
        (self.lr <= 0, f"--lr must be positive, got {self.lr}"),
        (self.reg_noise_std < 0, f"--reg_noise_std must be >= 0, got {self.reg_noise_std}"),
        (not 0 <= self.exp_weight < 1, f"--exp_weight must lie in [0, 1), got {self.exp_weight}"),
        (not self.criteria, "--criteria is empty"),
        (len(set(self.criteria)) != len(self.criteria), f"--criteria repeats a kind: "
         f"{list(self.criteria)}"),
        (self.window < 1, f"--window must be positive, got {self.window}"),
    ]
    if set(self.methods) & set(STAGED):
      checks += [
          (max(self.stages) > self.iters, f"--stages ({max(self.stages)}) cannot exceed "
           f"--iters ({self.iters})"),
          (min(self.stages) < 1, f"--stages must be positive, got {self.stages}"),
          (min(self.probes) < 0, f"--probes must be >= 0, got {self.probes}"),
          (any(f is not None and not 0 < f < 1 for f in self.final_shares),
           f"--final_shares must lie in (0, 1) or be 'equal', got {self.final_shares}"),
          (min(self.t_max) < max(self.stages) - 1, f"--t_max ({min(self.t_max)}) must be at "
           f"least --stages - 1 ({max(self.stages) - 1})"),
      ]
    for failed, message in checks:
      if failed:
        raise ValueError(message)
    for name in self.criteria:
      stopping.get(name)  # ValueError naming the valid kinds
    for name in self.schedules:
      steps = schedules.get(name).num_steps  # ValueError naming the valid schedules
      if max(self.t_max) > steps:
        raise ValueError(f"--t_max ({max(self.t_max)}) exceeds the {name} schedule's {steps} "
                         "steps")
    if "bm3d" in self.methods and importlib.util.find_spec("bm3d") is None:
      raise ValueError("--methods bm3d needs the optional bm3d package "
                       "(pip install -e '.[baselines]')")


def _unknown(values: Iterable[str], valid: Iterable[str]) -> str:
  return ", ".join(repr(v) for v in values if v not in valid)


def _parse_list(flag: str, values: list[str], kind: Callable[[str], Any]) -> tuple:
  """A list flag's strings as `kind`, with a one-line error naming the flag."""
  try:
    return tuple(kind(v) for v in values)
  except ValueError:
    raise ValueError(f"--{flag}: cannot read {values} as {kind.__name__}s") from None


def _bool(text: str) -> bool:
  lowered = text.strip().lower()
  if lowered not in ("true", "false", "1", "0"):
    raise ValueError(text)
  return lowered in ("true", "1")


def _share(text: str) -> float | None:
  return None if text.strip().lower() == "equal" else float(text)


def expand_images(paths: Iterable[str]) -> tuple[str, ...]:
  """Files as given, folders as their sorted image files; ValueError for a missing path or a
  folder without images."""
  out = []
  for path in paths:
    if os.path.isdir(path):
      found = sorted(os.path.join(path, f) for f in os.listdir(path)
                     if f.lower().endswith(IMAGE_EXTENSIONS))
      if not found:
        raise ValueError(f"--images: no {'/'.join(IMAGE_EXTENSIONS)} images in folder {path}")
      out += found
    elif os.path.isfile(path):
      out.append(path)
    else:
      raise ValueError(f"--images: no such file or folder: {path}")
  return tuple(dict.fromkeys(out))


def spec_from_flags() -> GridSpec:
  if not _IMAGES.value:
    raise ValueError("--images is required (image files or folders)")
  return GridSpec(
      images=expand_images(_IMAGES.value), crop=_CROP.value,
      sigmas=_parse_list("sigmas", _SIGMAS.value, float), methods=tuple(_METHODS.value),
      schedules=tuple(_SCHEDULES.value), stages=_parse_list("stages", _STAGES.value, int),
      t_max=_parse_list("t_max", _T_MAX.value, int),
      fresh_eps=_parse_list("fresh_eps", _FRESH_EPS.value, _bool),
      probes=_parse_list("probes", _PROBES.value, float),
      final_shares=_parse_list("final_shares", _FINAL_SHARES.value, _share),
      sigma_estimated=_parse_list("sigma_estimated", _SIGMA_ESTIMATED.value, _bool),
      losses=tuple(_LOSSES.value), nets=tuple(_NETS.value),
      widths=_parse_list("widths", _WIDTHS.value, int), scales=_SCALES.value,
      seeds=_SEEDS.value, seed_base=_SEED_BASE.value, iters=_ITERS.value, lr=_LR.value,
      reg_noise_std=_REG_NOISE.value, exp_weight=_EXP_WEIGHT.value,
      criteria=tuple(_CRITERIA.value), window=_WINDOW.value, noise_seed=_NOISE_SEED.value)


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class Job:
  """One config of the grid: the image file, the canonical config (a JSON-able dict) and its
  row key."""
  path: str
  config: dict
  key: str


def row_key(config: dict) -> str:
  """sha1 of the config's canonical JSON (sorted keys, no spaces)."""
  return hashlib.sha1(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
                      ).hexdigest()


def _method_configs(spec: GridSpec, path: str, sigma: float, method: str) -> list[dict]:
  """The configs of one image, sigma and method: only the axes that apply to the method."""
  base = dict(image=os.path.basename(path),
              set=os.path.basename(os.path.dirname(os.path.abspath(path))), crop=spec.crop,
              sigma=float(sigma), method=method, noise_seed=spec.noise_seed)
  if method == "bm3d":
    return [base]
  fits = dict(scales=spec.scales, seeds=spec.seeds, seed_base=spec.seed_base, iters=spec.iters,
              lr=float(spec.lr), reg_noise_std=float(spec.reg_noise_std),
              exp_weight=float(spec.exp_weight))
  if "es_wmv" in spec.criteria:
    fits["window"] = spec.window
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
    configs.append(dict(base, **fits, criteria=criteria, net=n, width=w, **s,
                        **({} if loss == "mse" else dict(loss=loss)),
                        **(dict(sigma_estimated=True) if estimated else {})))
  return configs


def jobs(spec: GridSpec) -> list[Job]:
  """Every config of the grid, image-major, deduplicated by key (axes that do not apply to a
  method collapse)."""
  out = {}
  for path, sigma, method in itertools.product(spec.images, spec.sigmas, spec.methods):
    for config in _method_configs(spec, path, sigma, method):
      key = row_key(config)
      out.setdefault(key, Job(path, config, key))
  return list(out.values())


# ----------------------------------------------------------------------------- images


def load_clean(path: str, crop: int) -> np.ndarray:
  """The clean image, centre-cropped to crop x crop (0: whole), float32 (H, W, C) in [0, 1]."""
  image = io.load_image(path)
  if crop:
    if min(image.shape[:2]) < crop:
      raise ValueError(f"--crop {crop} is larger than {path} ({image.shape[1]}x"
                       f"{image.shape[0]})")
    image = io.center_crop(image, crop, crop)
  return image


def noisy_image(clean: np.ndarray, image_name: str, sigma: float, noise_seed: int) -> np.ndarray:
  """clean + N(0, (sigma / 255)^2), clipped; the same for every method (seeded by the file
  name, sigma and noise_seed)."""
  rng = np.random.default_rng([noise_seed, zlib.crc32(image_name.encode()), round(sigma * 100)])
  return noise.add_noise(rng, clean, sigma / 255)


def _quality(x: np.ndarray, clean: np.ndarray) -> dict[str, Any]:
  """PSNR (dB) and SSIM of images (..., H, W, C) against clean; lists for a leading axis."""
  clean = np.broadcast_to(clean, np.shape(x))
  p, s = np.asarray(metrics.psnr(x, clean)), np.asarray(metrics.ssim(x, clean))
  return dict(psnr=np.round(p, 4).tolist(), ssim=np.round(s, 5).tolist())


def _uint8(x: np.ndarray) -> np.ndarray:
  return np.round(np.clip(np.asarray(x), 0, 1) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- fits


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything one config's fits need: the network, the fit settings, the problem (one for
  all seeds if `shared`, else stacked per seed), the seeds' keys."""
  net: Any
  config: fit.FitConfig
  problem: problems.Problem
  keys: jax.Array
  padding: io.Padding
  chunk: int
  info: dict
  shared: bool = True


def restore_config(config: dict) -> pipeline.RestoreConfig:
  """The library's config of a grid config's fits (the axes that do not apply keep their
  defaults, which those methods ignore)."""
  staged = config["method"] in STAGED
  stage_axes = {k: config[k] for k in ("schedule", "stages", "t_max", "fresh_eps", "probe",
                                       "final_share") if staged}
  return pipeline.RestoreConfig(
      sigma=config["sigma"], sigma_known=not config.get("sigma_estimated", False),
      method="staged" if staged else "dip",
      input="ddpm" if config["method"] in DDPM_INPUT else "noise", **stage_axes,
      iters=config["iters"], seeds=config["seeds"], net=config["net"], width=config["width"],
      scales=config["scales"], reg_noise_std=config["reg_noise_std"], lr=config["lr"],
      exp_weight=config["exp_weight"], loss=config.get("loss", "mse"),
      stop=tuple(config["criteria"]), halt=False, window=config.get("window", 100))


def setup(config: dict, clean: np.ndarray, noisy: np.ndarray) -> Setup:
  """The network, fit settings, problem (y and clean padded to 2^scales) and seed keys of a fit
  config, built by dipjax.pipeline as restore() builds them (its seeding convention)."""
  rc = restore_config(config)
  frame = pipeline.frame(rc, noisy, clean)
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
               jax.random.split(key, config["seeds"]), frame.padding, chunk, info, shared)


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


def _ready(s: Setup, compiler: Compiler) -> tuple[fit.TrainState, problems.Problem, Callable, float]:
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
  states, problem, run, compile_s = _ready(s, compiler)
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


def _unpad(x: np.ndarray, p: io.Padding) -> np.ndarray:
  """io.unpad for images (..., H, W, C)."""
  h, w = x.shape[-3:-1]
  return x[..., p.top:h - p.bottom, p.left:w - p.right, :]


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
  final = _unpad(np.asarray(states.ema), s.padding)
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
    stop, kept = np.asarray(stop), _unpad(np.asarray(kept), s.padding)
    missing = stop < 0
    stop = np.where(missing, iters - 1, stop)
    kept = np.where(missing[:, None, None, None], final, kept)
    fired_at = np.asarray(_fired_at(criterion, records, noise_std))
    quality, ensemble = _quality(kept, clean), kept.mean(axis=0)
    results["criteria"][name] = dict(
        stop=stop.tolist(), fired_at=fired_at.tolist(), **quality,
        ensemble=_quality(ensemble, clean),
        gap_db=round(float(np.mean(peak_psnr - np.asarray(quality["psnr"]))), 4),
        iter_error=float(np.mean(np.abs(stop - peak_step))),
        iters_saved=float(np.mean(np.where(fired_at >= 0, iters - (fired_at + 1), 0))),
        no_stop=int(missing.sum()))
    arrays.update({f"stop_{name}": stop, f"fired_{name}": fired_at,
                   f"kept0_{name}": _uint8(kept[0]), f"ensemble_{name}": _uint8(ensemble)})
  return results, arrays


def bm3d_denoise(noisy: np.ndarray, sigma: float) -> np.ndarray:
  """(C)BM3D of (H, W, 1 or 3) at noise std `sigma` ([0, 1] units), clipped to [0, 1]."""
  import bm3d  # optional extra: pip install -e '.[baselines]'
  if noisy.shape[-1] == 3:
    out = bm3d.bm3d_rgb(noisy, sigma)
  else:
    out = bm3d.bm3d(noisy[..., 0], sigma)[..., None]
  return np.clip(out, 0, 1).astype(np.float32)


def _device(method: str) -> dict[str, str]:
  if method == "bm3d":
    return dict(backend="numpy", kind=platform.processor() or platform.machine())
  return dict(backend=jax.default_backend(), kind=jax.devices()[0].device_kind)


def run_config(job: Job, clean: np.ndarray, compiler: Compiler) -> tuple[dict, dict]:
  """Runs one config: its K fits (or BM3D) on the image's noisy input. Returns (row, arrays)."""
  config = job.config
  noisy = noisy_image(clean, config["image"], config["sigma"], config["noise_seed"])
  t0 = time.perf_counter()
  row = dict(key=job.key, config=config, path=os.path.abspath(job.path),
             device=_device(config["method"]), pixels=clean.shape[0] * clean.shape[1],
             channels=clean.shape[2], noisy=_quality(noisy, clean))
  arrays = dict(clean=_uint8(clean), noisy=_uint8(noisy))
  if config["method"] == "bm3d":
    out = bm3d_denoise(noisy, config["sigma"] / 255)
    row["output"] = _quality(out, clean)
    arrays["output"] = _uint8(out)
  else:
    s = setup(config, clean, noisy)
    last_log = [time.perf_counter()]

    def progress(done: int, chunks: dict) -> None:
      if time.perf_counter() - last_log[0] >= 60 and done < config["iters"]:
        last_log[0] = time.perf_counter()
        logging.info("  %s %s: iteration %d/%d, EMA PSNR %.2f dB (mean of %d fits)",
                     config["image"], config["method"], done, config["iters"],
                     np.mean(chunks["psnr_clean_ema"][-1][:, -1]), config["seeds"])

    states, trace, compile_s, fit_s = run_fits(s, compiler, config["iters"], progress)
    results, more = score_fits(config, s, states, trace, clean)
    row.update(compile_s=round(compile_s, 2), fit_s=round(fit_s, 2),
               ms_per_it=round(1000 * fit_s / (config["iters"] * config["seeds"]), 3),
               **s.info, **results)
    arrays.update(more)
  row["wall_s"] = round(time.perf_counter() - t0, 2)
  row["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  return row, arrays


# ----------------------------------------------------------------------------- results file


def arrays_dir(out: str) -> str:
  """Where the .npz files of the rows in `out` go, never into tracked files: for a rows file in
  the repository outside runs/, runs/arrays/<its path from the root, docs/results/ and .jsonl
  left off>/ (docs/results/stopping/rows/x.jsonl: runs/arrays/stopping/rows/x/); else beside
  it, <out without .jsonl>_arrays/."""
  stem = os.path.abspath(out).removesuffix(".jsonl")
  rel = os.path.relpath(stem, REPO)
  if rel.split(os.sep)[0] in (os.pardir, "runs"):
    return stem + "_arrays"
  docs = os.path.join("docs", "results", "")
  return os.path.join(REPO, "runs", "arrays", rel.removeprefix(docs))


def _parse_rows(data: bytes, path: str) -> list[dict]:
  rows = []
  for number, line in enumerate(data.decode().splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number} is not a JSON row ({e})") from None
  return rows


def read_rows(path: str) -> list[dict]:
  """The complete rows of a results file ([] if there is none; a partial last line left out)."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  return _parse_rows(data[:data.rfind(b"\n") + 1], path)


class Results:
  """A results file open for appending under an exclusive lock (one grid per file).

  On opening, a partial last line (a grid killed mid-write) is truncated away; `rows` holds the
  complete rows. Each appended row is one write, flushed and fsynced.
  """

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path = path
    self._file = open(path, "a+b")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.close()
      raise ValueError(f"{path} is being written by another grid.py") from None
    self._file.seek(0)
    data = self._file.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
      logging.warning("%s ended in a partial line (%d bytes, a killed write): truncated",
                      path, len(data) - end)
      self._file.truncate(end)
    self.rows = _parse_rows(data[:end], path)

  def append(self, row: dict) -> None:
    self._file.write((json.dumps(_finite(row), allow_nan=False) + "\n").encode())
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> Results:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _finite(x: Any) -> Any:
  """x with every non-finite float replaced by None (strict JSON)."""
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def _save_arrays(path: str, arrays: dict) -> None:
  """np.savez_compressed, atomically (a killed write leaves no .npz behind)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    np.savez_compressed(f, **arrays)
  os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- estimate


def speed_group(config: dict, pixels: int, channels: int) -> tuple:
  """Configs that run at one speed: (pixels, channels, net, width, staged) or BM3D's."""
  if config["method"] == "bm3d":
    return (pixels, channels, "bm3d")
  return (pixels, channels, config["net"], config["width"], config["method"] in STAGED)


def _compile_group(config: dict, pixels: int, channels: int) -> tuple:
  """Configs that share one compiled fit (approximately: what changes array shapes)."""
  return speed_group(config, pixels, channels) + (
      config.get("seeds"), config.get("stages"), config["method"] in DDPM_INPUT,
      math.gcd(config.get("iters", 0), CHUNK_ITERS))


def _group_name(group: tuple) -> str:
  pixels, channels = group[:2]
  side = math.isqrt(pixels)
  size = f"{side}²" if side * side == pixels else f"{pixels} px"
  if group[2] == "bm3d":
    return f"BM3D {size}x{channels}"
  return f"{group[2]} w{group[3]} {size}x{channels} {'staged' if group[4] else 'plain'}"


def calibrate(job: Job, clean: np.ndarray, compiler: Compiler) -> tuple[float, float]:
  """Measures one config's speed: (ms per iteration per fit, compile s) for fits (compile and
  one chunk of at most 100 iterations of its fits, kept compiled), (s, 0) for BM3D."""
  config = job.config
  noisy = noisy_image(clean, config["image"], config["sigma"], config["noise_seed"])
  if config["method"] == "bm3d":
    t0 = time.perf_counter()
    bm3d_denoise(noisy, config["sigma"] / 255)
    return time.perf_counter() - t0, 0.0
  s = setup(config, clean, noisy)
  states, problem, run, compile_s = _ready(s, compiler)
  t0 = time.perf_counter()
  jax.block_until_ready(run(states, problem))
  return 1000 * (time.perf_counter() - t0) / (s.chunk * config["seeds"]), compile_s


def estimate(pending: list[Job], sizes: dict[str, tuple[int, int]], rows: list[dict],
             measure: Callable[[Job], tuple[float, float]]) -> tuple[list[float], list[str]]:
  """Seconds for each pending job and one line per speed group saying where its speed is from.

  A group's speed (ms/it per fit; s per BM3D run) is the median over the rows of `rows` in it
  run on this device, else `measure(first job of the group)` (a calibration, whose compile is
  then already done).
  Each compiled shape not yet built adds the group's compile time (from its rows or the
  calibration).
  """
  measured, compiles = collections.defaultdict(list), collections.defaultdict(list)
  for row in rows:
    if row.get("device") != _device(row["config"]["method"]):
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
      chunk = math.gcd(job.config.get("iters", 0), CHUNK_ITERS)
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


def _duration(seconds: float) -> str:
  seconds = round(seconds)
  if seconds >= 3600:
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
  if seconds >= 60:
    return f"{seconds // 60} min {seconds % 60:02d} s"
  return f"{seconds} s"


def _announce(all_jobs: list[Job], pending: list[Job], seconds: list[float], notes: list[str],
              out: str) -> None:
  fit_jobs = [j for j in all_jobs if j.config["method"] != "bm3d"]
  fits = sum(j.config["seeds"] for j in fit_jobs)
  iters = sorted({j.config["iters"] for j in fit_jobs})
  print(f"grid: {len(all_jobs)} configs ({len(fit_jobs)} fit configs = {fits} fits of "
        f"{'/'.join(map(str, iters)) or 0} iterations, {len(all_jobs) - len(fit_jobs)} BM3D); "
        f"{len(all_jobs) - len(pending)} already in {out}, {len(pending)} to run", flush=True)
  print(f"estimated time for the {len(pending)} to run: {_duration(sum(seconds))}", flush=True)
  for note in notes:
    print(f"  {note}", flush=True)


# ----------------------------------------------------------------------------- the grid


def _summary_line(row: dict) -> str:
  if "output" in row:
    return f"BM3D {row['output']['psnr']:.2f} dB"
  parts = [f"{name} {np.mean(c['psnr']):.2f}" + (f" (ens {c['ensemble']['psnr']:.2f})"
                                                  if len(c["psnr"]) > 1 else "")
           for name, c in row["criteria"].items()]
  return "PSNR at stop: " + ", ".join(parts) + " dB"


def run_grid(spec: GridSpec, out: str, *, argv: str = "", dry_run: bool = False,
             limit: int | None = None, compiler: Compiler | None = None) -> list[dict]:
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
  cleans = {path: load_clean(path, spec.crop) for path in spec.images}
  sizes = {path: (x.shape[0] * x.shape[1], x.shape[2]) for path, x in cleans.items()}
  compiler = Compiler() if compiler is None else compiler
  measure = lambda job: calibrate(job, cleans[job.path], compiler)
  if dry_run:
    rows = read_rows(out)
    done = {row["key"] for row in rows}
    pending = [j for j in all_jobs if j.key not in done]
    _announce(all_jobs, pending, *estimate(pending, sizes, rows, measure), out)
    return []
  if compiler.mesh is not None and spec.seeds % compiler.mesh.size:
    raise ValueError(f"--shard: --seeds ({spec.seeds}) must be a multiple of the "
                     f"{compiler.mesh.size} devices")
  # In a multi-process run every process fits its share of each config; process 0 writes.
  writer = jax.process_index() == 0
  new = []
  with Results(out) if writer else contextlib.nullcontext() as results:
    rows = results.rows if writer else read_rows(out)
    done = {row["key"] for row in rows}
    pending = [j for j in all_jobs if j.key not in done]
    seconds, notes = estimate(pending, sizes, rows, measure)
    _announce(all_jobs, pending, seconds, notes, out)
    base = os.path.dirname(os.path.abspath(out))
    t_start = time.perf_counter()
    for i, job in enumerate(pending[:limit]):
      c = job.config
      if not writer and c["method"] == "bm3d":
        continue
      logging.info("config %d/%d: %s/%s sigma=%g %s", i + 1, len(pending), c["set"], c["image"],
                   c["sigma"], _describe(c))
      row, arrays = run_config(job, cleans[job.path], compiler)
      npz = os.path.join(arrays_dir(out), job.key + ".npz")
      row.update(arrays=os.path.relpath(npz, base), argv=argv)
      if writer:
        _save_arrays(npz, arrays)
        results.append(row)
      new.append(row)
      logging.info("config %d/%d done in %.0f s: noisy %.2f dB, %s; %s elapsed, ETA %s",
                   i + 1, len(pending), row["wall_s"], row["noisy"]["psnr"], _summary_line(row),
                   _duration(time.perf_counter() - t_start), _duration(sum(seconds[i + 1:])))
  return new


def _describe(config: dict) -> str:
  shown = ("net", "width", "loss", "seeds", "iters", "schedule", "stages", "t_max", "fresh_eps",
           "probe", "final_share", "sigma_estimated")
  return config["method"] + "(" + ", ".join(f"{k}={config[k]}" for k in shown
                                            if k in config) + ")"


def main(argv):
  cli.start(argv, __file__)
  with cli.errors("grid.py"):
    if _COORDINATOR.value:
      cli.join(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _NUM_PROCESSES.value != 1:
      raise ValueError("--num_processes > 1 needs --coordinator")
    mesh = fit.fits_mesh() if _SHARD.value or _COORDINATOR.value else None
    run_grid(spec_from_flags(), _OUT.value, argv="python " + shlex.join(sys.argv),
             dry_run=_DRY_RUN.value, compiler=Compiler(mesh=mesh))


if __name__ == "__main__":
  app.run(main)
