"""One restoration as one call: build the problem, compile, fit in chunks, stop, unpad, score.

  config = pipeline.RestoreConfig()                  # staged DIP with its own stop (validated)
  y = pipeline.degrade(config, clean, seed=0)         # synthetic observation: clean + N(0, σ²)
  result = pipeline.restore(config, y, key=jax.random.PRNGKey(0), clean=clean)
  result.image, result.stops["staged"], result.scores["restored"]

:class:`RestoreConfig` holds every setting of a run (task, method, network, input, schedule and
stages, budget, criteria, DDPM) and is validated once, with a ``ValueError`` naming the field.
:func:`restore` owns the program around :mod:`dipjax.fit`: problem assembly, the compile (with
JAX's persistent cache where the caller turned it on), a chunk loop that runs any iteration
count with one compiled function, progress callbacks, Orbax checkpoint / resume, halting, the
criteria's stops, the DDPM methods, unpadding and scores against a ground truth.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import time
import types
from typing import Callable

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from dipjax import checkpoint
from dipjax import fit
from dipjax import inputs
from dipjax import io
from dipjax import losses
from dipjax import masks
from dipjax import metrics
from dipjax import nets
from dipjax import noise
from dipjax import operators
from dipjax import physics as physics_lib
from dipjax import problems
from dipjax import schedules
from dipjax import stopping
from dipjax import tiles as tiles_lib
from dipjax.ddpm import posterior
from dipjax.ddpm import solvers as ddpm_solvers
from dipjax.ddpm import train as ddpm_train
from dipjax.ddpm import unet as ddpm_unet

TASKS = ("denoise", "inpaint", "sr", "deblur")
BLURS = ("gaussian", "motion", "file")
NOISES = ("gaussian", "poisson")
MASK_KINDS = ("file",) + masks.KINDS
POSTERIOR = posterior.SOLVERS  # diffusion posterior solvers for any task: DDPM alone from noise
# The same from a DIP fit: started at t* from its output, which also guides every x0 prediction.
DIP_POSTERIOR = tuple(f"dip_{s}" for s in POSTERIOR)
METHODS = ("dip", "staged", "ddpm", "dip_ddpm", "dip_guided") + POSTERIOR + DIP_POSTERIOR
DDPM_METHODS = ("ddpm", "dip_ddpm", "dip_guided") + POSTERIOR + DIP_POSTERIOR
HYBRIDS = ("dip_ddpm", "dip_guided") + DIP_POSTERIOR  # a DIP fit, then the DDPM
INPUTS = ("noise", "meshgrid", "ddpm")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("linear", "cosine")
# Budgets and widths when `iters` / `width` are None. staged: width 16 (RESULTS, "Ablations of
# the staged method": the peak of width 32 at 1.5x less cost) and 1500 iterations, so that the
# no-flag run (256^2, compile included) takes under 3 minutes on a 2-core CPU (1800: 177 s); its
# stop halts a longer fit. dip: RESULTS' DIP vs CBM3D table (width 32, 1800 it) for denoising
# and the DIP paper's super-resolution budget (2000 it) otherwise; the hybrids: the DDPM
# report's 300-iteration fit, which the DDPM finishes.
DEFAULT_ITERS = dict(staged=1500, dip=1800, dip_ddpm=300, dip_guided=300, ddpm=0,
                     **dict.fromkeys(POSTERIOR, 0), **dict.fromkeys(DIP_POSTERIOR, 1000))
DEFAULT_ITERS_NOISE_FREE = 2000  # dip for sr / inpaint
DEFAULT_WIDTH = dict(staged=16)  # else 32
# RESULTS, "dipjax's own DDPM": NFE 5 is the DDPM alone's best or within 0.2 dB of it at
# sigma 25 and 50 on CSet9 and Set12; the report ran dip_ddpm at NFE 5, dip_guided at NFE 20.
# The posterior solvers: 20 steps from noise (DiffPIR's inpainting setting; the papers' 100-1000
# are a CPU's hours), 5 from a DIP start.
DEFAULT_NFE = dict(ddpm=5, dip_ddpm=5, dip_guided=20, **dict.fromkeys(POSTERIOR, 20),
                   **dict.fromkeys(DIP_POSTERIOR, 5))
DIP_POSTERIOR_HOLDOUT = 0.05  # the dip_* solvers' default hold-out: t* from its error
ERROR_FLOOR = 1e-6  # the smallest error estimate a dip_* solver's t* is matched to
# One seeding convention (experiments/grid.py's, so the reports' rows are reproduced): from the
# run's key, the problem (input, probe, stage noise) from fold_in(key, PROBLEM_STREAM), the fits
# from split(key, seeds), the DDPM stage from fold_in(key, DDPM_STREAM).
PROBLEM_STREAM = 1
DDPM_STREAM = 10
HOLDOUT_STREAM = 2  # the held-out entries: fold_in(problem key, HOLDOUT_STREAM)
SSIM_EVERY = 100  # SSIM is traced once per this many iterations (or per chunk if shorter)

Progress = Callable[[int, int, dict[str, float]], None]
# Peak host memory of a fit on a CPU, bytes: base + pixels * (per_pixel + width *
# (per_pixel_channel + (seeds - 1) * per_extra_seed_pixel_channel)), pixels at the network's
# padded resolution; non-negative least squares over measured peak RSS, compile included
# (experiments/memory.py --fit; docs/PERFORMANCE.md, "Memory"), 2-core AMD EPYC (AVX2).
MEMORY_MODEL = types.MappingProxyType(dict(
    base_bytes=1.658e9, per_pixel_bytes=851.0, per_pixel_channel_bytes=76.83,
    per_extra_seed_pixel_channel_bytes=76.6))
DIVERGED_SHARE = 0.4  # a fit rolled back in this share of its recent iterations has diverged
MIN_SIDE = 11  # the smallest image side restore takes: SSIM's 11 x 11 window
TILE_OVERLAP = 32  # output pixels shared by neighbouring tiles, blended
MASK_SLACK = 0.1  # mask values within this of 0 or 1 (compression noise) count as 0 or 1
_NUMBER_FIELDS = {
    **dict.fromkeys(("sigma", "probe", "final_share", "reg_noise_std", "lr", "exp_weight",
                     "ddpm_eta", "guide_weight", "blur_sigma", "peak", "mask_ratio",
                     "holdout", "noise_corr"),
                    numbers.Real),
    **dict.fromkeys(("factor", "blur_size", "blur_seed", "stages", "t_max", "iters", "seeds",
                     "width", "scales", "input_t", "input_extra", "window", "nfe",
                     "ddpm_samples"), numbers.Integral)}
# Settings of the DDPM stage after a fit: a checkpoint of the fit does not depend on them.
_AFTER_FIT_FIELDS = ("ddpm_weights", "nfe", "ddpm_samples", "ddpm_eta", "guide_weight")
# Fields added to RestoreConfig after checkpoints and report rows were written, with their
# defaults: in a config's identity (:func:`identity_fields`) only where set, so that those
# checkpoints still resume and those rows keep their keys.
LATER_FIELDS = types.MappingProxyType({"noise_corr": 0.0})


class DivergedError(RuntimeError):
  """A fit whose steps keep failing (non-finite or collapsing outputs): no result to return."""


@dataclasses.dataclass(frozen=True)
class RestoreConfig:
  """Every setting of one restoration; None fields resolve to the method's validated default.

  Attributes:
    task: 'denoise' | 'inpaint' (needs a mask) | 'sr' (super-resolution by `factor`) |
      'deblur' (the `blur` kernel).
    sigma: Gaussian noise std in 0-255 units: what :func:`degrade` adds and what :func:`restore`
      takes as the observation's known level (with noise 'poisson': the read noise). None: 25
      for Gaussian denoising, 0 otherwise.
    noise, peak: the noise model: 'gaussian' (sigma) or 'poisson' (photon noise of `peak`
      photons at white, plus Gaussian read noise sigma; :class:`noise.PoissonNoise`). For
      Poisson noise the probe and the stops take its std per pixel, estimated from y
      (:meth:`noise.PoissonNoise.std_map`).
    noise_corr: Gaussian noise correlated between neighbouring pixels (a camera's demosaicing
      and processing): the std in pixels of the kernel that correlates it
      (:func:`noise.correlate`; sigma stays the std of each entry); 0: white; None: estimated
      from the observation (:func:`noise.estimate_noise`; a real photo's). The staged
      method's probe takes the same correlation, and an estimated sigma is corrected for it.
    sigma_known: False: :func:`restore` estimates the noise from the observation (a real
      photo): sigma for Gaussian noise (:func:`noise.estimate_sigma`); for noise 'poisson'
      both peak and the read noise (:func:`noise.estimate_poisson_gaussian`: a raw camera
      image's signal-dependent noise).
    mask_kind, mask_ratio: the inpainting mask: 'file' (given to :func:`degrade` and
      :func:`restore`) or generated by :func:`make_mask`: 'random' (mask_ratio of the pixels
      missing), 'text', 'strokes' (:mod:`dipjax.masks`).
    factor, kernel: super-resolution factor (2, 4, 8) and down-sampler ('lanczos' | 'box').
    blur, blur_sigma, blur_size, blur_seed, blur_file, boundary: the deblurring kernel:
      'gaussian' of std blur_sigma pixels, 'motion' (:func:`operators.motion_kernel` of
      blur_seed, blur_size pixels wide) or 'file' (blur_file: a grey image or a 2-D .npy,
      normalised); boundary 'circular' (FFT) or 'reflect'.
    method: 'staged' (DDPM-staged targets with a probe), 'dip' (fit y), 'ddpm' (dipjax's DDPM
      alone), 'dip_ddpm' / 'dip_guided' (a DIP fit refined by the DDPM; denoising only);
      'ddnm' / 'diffpir' / 'dps' (a diffusion posterior solver of :mod:`dipjax.ddpm.posterior`
      from pure noise, any task with Gaussian noise) and 'dip_ddnm' / 'dip_diffpir' / 'dip_dps'
      (the same started from a DIP fit forward-noised to t*, t* matched to the fit's held-out
      error at its stop less the noise variance: the error in the measurement space, the one
      the data can tell; for SR it misses what the down-sampler removes). None: 'staged' for
      denoising, 'dip' for the noise-free tasks.
    schedule, stages, t_max, fresh_eps, scaled_targets, probe, final_share: the staged
      targets (:func:`problems.staged_problem`).
    iters: total fit iterations (any count); None: :data:`DEFAULT_ITERS` of the method.
    seeds: independent fits, averaged into the restored image.
    net, width, scales, dtype: the network (:func:`nets.make`); the image is padded to 2^scales.
      width None: :data:`DEFAULT_WIDTH` of the method.
    input, input_t, input_fresh, input_extra, reg_noise_std: the network input (DIP noise,
      meshgrid, or the DDPM-noised observation at timestep input_t; None: matched to sigma).
    lr, exp_weight, loss, vgg19: Adam step, output EMA weight, training loss, VGG19 weights
      (.npz) for the perceptual loss.
    stop: criteria to monitor (:data:`stopping.KINDS`); the restored image is the EMA output at
      the first one's stop. None: ('staged',) for the staged method with a probe, ('holdout',)
      for the dip_* solvers, else none (the last iteration).
    holdout: share of the measurement entries held out of the loss, whose error the 'holdout'
      stop watches (:func:`problems.with_holdout`); 0: none. None: 0.05 for the dip_* solvers
      (their t*), else 0.
    halt: end the fit when the first criterion fires. None: True when `stop` was defaulted.
    window: ES-WMV window (with 'es_wmv').
    ddpm_weights, nfe, ddpm_samples, ddpm_eta, guide_weight: the DDPM methods' U-Net weights
      (.npz of ``ddpm.train.save_weights``), network evaluations, samples averaged, DDIM eta
      (None: DDNM's 0.85 for ddnm / dip_ddnm, else 0; diffpir and dps take none),
      dip_guided's constant blending weight (None: inverse-variance weights). nfe None:
      :data:`DEFAULT_NFE` of the method.
  """
  task: str = "denoise"
  sigma: float | None = None
  sigma_known: bool = True
  noise: str = "gaussian"
  noise_corr: float | None = 0.0
  peak: float = 30.0
  mask_kind: str = "file"
  mask_ratio: float = 0.5
  factor: int = 4
  kernel: str = "lanczos"
  blur: str = "gaussian"
  blur_sigma: float = 1.6
  blur_size: int = 31
  blur_seed: int = 0
  blur_file: str | None = None
  boundary: str = "circular"
  method: str | None = None
  schedule: str = "linear"
  stages: int = 2
  t_max: int = 30
  fresh_eps: bool = False
  scaled_targets: bool = True
  probe: float = 0.3
  final_share: float | None = 0.9
  iters: int | None = None
  seeds: int = 1
  net: str = "skip"
  width: int | None = None
  scales: int = 5
  dtype: str = "float32"
  input: str = "noise"
  input_t: int | None = None
  input_fresh: bool = True
  input_extra: int = 0
  reg_noise_std: float = 1 / 30
  lr: float = 0.01
  exp_weight: float = 0.99
  loss: str = "mse"
  vgg19: str | None = None
  stop: tuple[str, ...] | None = None
  halt: bool | None = None
  holdout: float | None = None
  window: int = 100
  ddpm_weights: str | None = None
  nfe: int | None = None
  ddpm_samples: int = 1
  ddpm_eta: float | None = None
  guide_weight: float | None = None

  def __post_init__(self):
    resolve = lambda name, value: object.__setattr__(self, name, value)
    for name, kind in _NUMBER_FIELDS.items():  # plain int / float: one fingerprint per value
      value = getattr(self, name)
      if value is None:
        continue
      real = kind is numbers.Real
      if isinstance(value, bool) or not isinstance(value, kind) or (
          real and not math.isfinite(value)):
        what = "a finite number" if real else "an integer"
        raise ValueError(f"{name} must be {what}, got {value!r}")
      resolve(name, float(value) if real else int(value))
    if self.task not in TASKS:
      raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
    if self.sigma is None:
      resolve("sigma", 25.0 if self.task == "denoise" and self.noise == "gaussian" else 0.0)
    if self.method is None:
      resolve("method", "staged" if self.task == "denoise" else "dip")
    if self.iters is None:
      noise_free = self.method == "dip" and self.task != "denoise"
      resolve("iters", DEFAULT_ITERS_NOISE_FREE if noise_free else DEFAULT_ITERS.get(
          self.method, 1))
    if self.nfe is None:
      resolve("nfe", DEFAULT_NFE.get(self.method, 5))
    if self.holdout is None:
      resolve("holdout", DIP_POSTERIOR_HOLDOUT if self.method in DIP_POSTERIOR else 0.0)
    if self.ddpm_eta is None:
      resolve("ddpm_eta", posterior.DDNM_ETA if self.method.endswith("ddnm") else 0.0)
    if self.width is None:
      resolve("width", DEFAULT_WIDTH.get(self.method, 32))
    defaulted = self.stop is None
    if defaulted:
      has_probe = self.method == "staged" and self.probe > 0 and self.noisy
      dip_start = self.method in DIP_POSTERIOR and self.holdout > 0
      resolve("stop", ("staged",) if has_probe else ("holdout",) if dip_start else ())
    resolve("stop", tuple(self.stop))
    if self.halt is None:
      resolve("halt", defaulted and bool(self.stop))
    for failed, message in self._checks():
      if failed:
        raise ValueError(message)
    for name in self.stop:
      stopping.get(name)  # a clear error for an unknown name

  def _checks(self) -> list[tuple[bool, str]]:
    staged, fits = self.method == "staged", self.fits
    checks = [
        (self.method not in METHODS, f"method must be one of {METHODS}, got {self.method!r}"),
        (not 0 <= self.sigma <= 255, f"sigma must lie in [0, 255] (0-255 units), got "
         f"{self.sigma}"),
        (self.task == "sr" and self.factor not in operators.FACTORS,
         f"factor must be 2, 4 or 8, got {self.factor}"),
        (self.kernel not in operators.KERNELS, f"kernel must be one of {operators.KERNELS}"),
        (self.noise not in NOISES, f"noise must be one of {NOISES}, got {self.noise!r}"),
        (not self.peak > 0, f"peak must be positive, got {self.peak}"),
        (self.noise_corr is not None and not 0 <= self.noise_corr <= noise.MAX_CORRELATION,
         f"noise_corr must lie in [0, {noise.MAX_CORRELATION}] (pixels), got {self.noise_corr}"),
        (self.noise_corr != 0 and self.noise != "gaussian",
         "noise_corr correlates Gaussian noise: noise 'gaussian'"),
        (self.task == "inpaint" and self.noise_corr is None,
         "an unknown noise correlation is estimated from the whole observation, whose missing "
         "pixels would count as noise: give noise_corr for inpainting"),
        (self.task == "inpaint" and not self.sigma_known,
         "an unknown noise level is estimated from the whole observation, whose missing pixels "
         "would count as noise: give sigma for inpainting"),
        (self.mask_kind not in MASK_KINDS,
         f"mask_kind must be one of {MASK_KINDS}, got {self.mask_kind!r}"),
        (not 0 <= self.mask_ratio < 1, f"mask_ratio must lie in [0, 1), got {self.mask_ratio}"),
        (self.blur not in BLURS, f"blur must be one of {BLURS}, got {self.blur!r}"),
        (self.blur_sigma <= 0, f"blur_sigma must be positive, got {self.blur_sigma}"),
        (self.blur_size < 3 or self.blur_size % 2 == 0,
         f"blur_size must be odd and >= 3, got {self.blur_size}"),
        (self.task == "deblur" and self.blur == "file" and not self.blur_file,
         "blur 'file' needs blur_file (a kernel image or .npy)"),
        (self.boundary not in operators.BOUNDARIES,
         f"boundary must be one of {operators.BOUNDARIES}, got {self.boundary!r}"),
        (self.schedule not in SCHEDULES,
         f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
        (fits and self.iters < 1, f"iters must be positive, got {self.iters}"),
        (staged and self.stages < 1, f"stages must be >= 1, got {self.stages}"),
        (staged and self.stages > self.iters,
         f"stages ({self.stages}) cannot exceed iters ({self.iters})"),
        (staged and not 0 < self.t_max <= 1000, f"t_max must lie in [1, 1000], got {self.t_max}"),
        (not 0 <= self.probe <= 1, f"probe must lie in [0, 1], got {self.probe}"),
        (self.final_share is not None and not 0 < self.final_share < 1,
         f"final_share must lie in (0, 1), got {self.final_share}"),
        ("staged" in self.stop and not (staged and self.probe),
         "stop 'staged' needs method 'staged' with probe > 0"),
        ("staged" in self.stop and not self.noisy,
         "stop 'staged' needs the noise level: sigma > 0, noise 'poisson', or sigma_known=False "
         "(estimated)"),
        (len(set(self.stop)) != len(self.stop), f"stop lists a criterion twice: {self.stop}"),
        (not 0 <= self.holdout <= 0.5, f"holdout must lie in [0, 0.5], got {self.holdout}"),
        ("holdout" in self.stop and not self.holdout,
         "stop 'holdout' needs holdout > 0 (the share of measurements held out)"),
        (self.seeds < 1, f"seeds must be >= 1, got {self.seeds}"),
        (self.net not in nets.NETS, f"net must be one of {nets.NETS}, got {self.net!r}"),
        (self.width < 1 or self.scales < 1, "width and scales must be positive"),
        (self.dtype not in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}"),
        (self.input not in INPUTS, f"input must be one of {INPUTS}, got {self.input!r}"),
        (self.input == "ddpm" and self.input_t is None and not self.noisy,
         "input 'ddpm' needs input_t when the noise level is 0 or unknown"),
        (self.input_t is not None and not 0 <= self.input_t <= 1000,
         f"input_t must lie in [0, 1000], got {self.input_t}"),
        (self.input_extra < 0, f"input_extra must be >= 0, got {self.input_extra}"),
        (not 0 <= self.exp_weight < 1, f"exp_weight must lie in [0, 1), got {self.exp_weight}"),
        (not 0 < self.lr <= 1, f"lr must lie in (0, 1], got {self.lr}"),
        (self.reg_noise_std < 0, f"reg_noise_std must be >= 0, got {self.reg_noise_std}"),
        (self.loss not in losses.LOSSES, f"loss must be one of {tuple(losses.LOSSES)}"),
        (losses.needs_params(self.loss) and not self.vgg19,
         f"loss {self.loss!r} needs vgg19 weights (no weights ship with dipjax)"),
        (self.halt and not self.stop, "halt needs a stop criterion"),
        (self.window < 1, f"window must be positive, got {self.window}"),
    ]
    if self.method in DDPM_METHODS:
      checks += self._ddpm_checks()
    return checks

  def _ddpm_checks(self) -> list[tuple[bool, str]]:
    m = f"method {self.method!r}"
    solver = self.method.removeprefix("dip_")
    if solver in POSTERIOR:
      task_checks = [
          (self.noise != "gaussian", f"{m} takes Gaussian noise only, not {self.noise!r}"),
          (solver != "dps" and self.task == "deblur" and self.boundary != "circular",
           f"{m} solves its data step in closed form: it needs boundary 'circular', not "
           f"{self.boundary!r} (method 'dps' takes either)"),
          (self.method in DIP_POSTERIOR and not self.holdout, f"{m} takes t* from the fit's "
           "held-out error: it needs holdout > 0"),
          (self.method in POSTERIOR and bool(self.stop), f"{m} fits nothing: no stop applies"),
          (self.method in POSTERIOR and self.holdout > 0,
           f"{m} fits nothing: holdout does not apply"),
          (solver in ("diffpir", "dps") and self.ddpm_eta > 0,
           f"{m} takes no ddpm_eta (DiffPIR's zeta and DPS's ancestral steps set its noise)")]
    else:
      task_checks = [
          (self.task != "denoise", f"{m} denoises only, not task {self.task!r}"),
          (self.noise != "gaussian", f"{m} takes Gaussian noise only, not {self.noise!r}"),
          (self.sigma_known and not self.sigma, f"{m} needs the noise level: sigma > 0, or "
           "sigma_known=False (estimated from the observation)")]
    return task_checks + [
        (not self.ddpm_weights, f"{m} needs ddpm_weights (dipjax ships assets/ddpm_colour.npz)"),
        (self.nfe < 1, f"nfe must be >= 1, got {self.nfe}"),
        (self.ddpm_samples < 1, f"ddpm_samples must be >= 1, got {self.ddpm_samples}"),
        (not 0 <= self.ddpm_eta <= 1, f"ddpm_eta must lie in [0, 1], got {self.ddpm_eta}"),
        (self.guide_weight is not None and not 0 <= self.guide_weight <= 1,
         f"guide_weight must lie in [0, 1], got {self.guide_weight}"),
        (self.guide_weight is not None and self.method != "dip_guided",
         f"guide_weight applies to method 'dip_guided' only, not {self.method!r}"),
        (self.method == "ddpm" and bool(self.stop), "method 'ddpm' fits nothing: no stop applies"),
    ]

  @property
  def noisy(self) -> bool:
    """Whether the observation has noise of a known or estimated level."""
    return self.noise == "poisson" or self.sigma > 0 or not self.sigma_known

  @property
  def fits(self) -> bool:
    """Whether the method fits a DIP network (all but 'ddpm' and the solvers from noise)."""
    return self.method not in ("ddpm",) + POSTERIOR

  @property
  def scale(self) -> int:
    """Network resolution over observation resolution: the SR factor, else 1."""
    return self.factor if self.task == "sr" else 1


@dataclasses.dataclass(frozen=True)
class Restoration:
  """What :func:`restore` returns; images (H, W, C) float32 in [0, 1], unpadded.

  Attributes:
    image: the restored image: the EMA output at the first criterion's stop (else at the last
      iteration), averaged over seeds; after the DDPM for the DDPM methods.
    observation: (h, w, C) the observation y.
    restored_at: the criterion `image` was taken at, or 'last iteration' (or 'ddpm').
    sigma: the noise std used, [0, 1] units (given, or estimated from y).
    stops: per criterion name, (iterations (seeds,) 1-based, EMA images (seeds, H, W, C)).
    ema, out: (seeds, H, W, C) the EMA and raw outputs after the last iteration run.
    fit_image: the fit's own restored image before the DDPM (hybrids), else None.
    trace: per-iteration arrays (seeds, iters) by :class:`fit.Trace` field, SSIM per
      `trace_every` iterations (seeds, ceil(iters / trace_every)); where not run, NaN
      (the stage -1, the flags False).
    trace_every: the SSIM records' spacing.
    stage_ends: cumulative iteration at which each stage ends.
    iterations: iterations done, up to the end of the chunk in which a halt fired (fewer than
      configured when halted; the skipped ones have NaN records).
    compile_seconds, fit_seconds: wall time of the fit's compile and of its chunks' compute.
    ddpm: the DDPM stage's settings and timings, or None.
    scores: with a ground truth, PSNR / SSIM of 'restored', 'degraded' (same-size tasks),
      'fit' (hybrids), 'per_seed' and 'stops'; else None.
    tiles: a tiled restoration's tiles (origin in the output, where each stopped, iterations,
      seconds), else None; its stops, outputs and trace are the tiles' (in `tiles`), not here.
    noise_used: the observation's noise as restored, its parameters given or estimated:
      :class:`noise.GaussianNoise` (sigma, correlation width) or :class:`noise.PoissonNoise`
      (peak, read noise sigma); None only where a Restoration is built by hand.
  """
  image: np.ndarray
  observation: np.ndarray
  restored_at: str
  sigma: float
  stops: dict[str, tuple[np.ndarray, np.ndarray]]
  ema: np.ndarray | None
  out: np.ndarray | None
  fit_image: np.ndarray | None
  trace: dict[str, np.ndarray] | None
  trace_every: int
  stage_ends: tuple[int, ...]
  iterations: int
  compile_seconds: float
  fit_seconds: float
  ddpm: dict | None
  scores: dict | None
  tiles: list[dict] | None = None
  noise_used: noise.NoiseModel | None = None

  def summary(self) -> dict:
    """A JSON-able summary: where it stopped, timings, every criterion's stop and the scores
    (PSNR / SSIM) where a ground truth was given."""
    scores = self.scores or {}
    result = dict(restored_at=self.restored_at, sigma_used=round(255 * self.sigma, 4),
                  **noise_summary(self.noise_used),
                  **{k: scores[k] for k in ("restored", "degraded") if k in scores})
    if self.ddpm is not None:
      result["ddpm"] = dict(self.ddpm, **scores.get("restored", {}))
    if self.tiles is not None:
      result.update(compile_seconds=round(self.compile_seconds, 2),
                    fit_seconds=round(self.fit_seconds, 2), tiles=self.tiles)
    if self.trace is None:
      return result
    result.update(
        iterations_run=self.iterations, stage_ends=list(self.stage_ends),
        compile_seconds=round(self.compile_seconds, 2), fit_seconds=round(self.fit_seconds, 2),
        iterations_per_second=round(self.iterations / self.fit_seconds, 3)
        if self.fit_seconds else None,
        rolled_back=int(np.nansum(self.trace["rolled_back"])))
    if "fit" in scores:
      result["dip"] = scores["fit"]
    if "per_seed" in scores:
      result["per_seed"] = scores["per_seed"]
    result["stops"] = {name: dict(iteration=[int(i) for i in steps],
                                  **scores.get("stops", {}).get(name, {}))
                       for name, (steps, _) in self.stops.items()}
    return result


def make_physics(config: RestoreConfig, mask: np.ndarray | None = None) -> physics_lib.Physics:
  """The config's forward model: the task's operator (inpainting: `mask` (h, w) or (h, w, 1),
  1 = known pixel, 0 = missing) and its noise model (:func:`noise_model`)."""
  if config.task == "inpaint":
    op = operators.inpainting(_mask_of(mask, np.shape(mask)))
  elif config.task == "sr":
    op = operators.downsampler(config.factor, config.kernel)
  elif config.task == "deblur":
    op = operators.blur(blur_kernel(config), config.boundary)
  else:
    op = operators.identity()
  return physics_lib.Physics(op, noise_model(config))


def make_mask(config: RestoreConfig, shape: tuple[int, ...], seed: int) -> np.ndarray:
  """The config's generated inpainting mask for an image of `shape` (H, W, ...), (H, W, 1)
  float32, 1 = known pixel; seeded by `seed`."""
  if config.mask_kind == "file":
    raise ValueError("mask_kind 'file': the mask is given, not generated")
  return masks.make(config.mask_kind, shape[0], shape[1], seed, config.mask_ratio)


def blur_kernel(config: RestoreConfig) -> np.ndarray:
  """The deblurring kernel (k, k) of the config (not yet normalised for 'file')."""
  if config.blur == "gaussian":
    return operators.gaussian_kernel(config.blur_sigma)
  if config.blur == "motion":
    return operators.motion_kernel(config.blur_seed, config.blur_size)
  path = config.blur_file
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no blur kernel file {path}")
  if path.endswith(".npy"):
    try:
      return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read the blur kernel {path} ({e})") from e
  return io.load_image(path, channels=1)[..., 0]


def noise_model(config: RestoreConfig) -> noise.NoiseModel:
  """The observation's noise: Gaussian of std sigma / 255 (unknown when not `sigma_known`),
  correlated by noise_corr, or Poisson of `peak` with Gaussian read noise sigma / 255 (known:
  an unknown one is estimated by :func:`resolve_noise` first)."""
  if config.noise == "poisson":
    if not config.sigma_known:
      raise ValueError("noise 'poisson' with sigma_known=False: its peak and read noise are "
                       "unknown; estimate them first with pipeline.resolve_noise(config, y)")
    return noise.PoissonNoise(config.peak, config.sigma / 255)
  return noise.GaussianNoise(config.sigma / 255 if config.sigma_known else None,
                             config.noise_corr)


def noise_summary(model: noise.NoiseModel | None) -> dict[str, float]:
  """A noise model's parameters beyond sigma_used, for a summary: a correlated Gaussian's
  'noise_corr_used', a Poisson's 'peak_used' and 'read_sigma_used' (0-255); {} otherwise."""
  if isinstance(model, noise.PoissonNoise):
    return dict(peak_used=round(model.peak, 3), read_sigma_used=round(255 * model.sigma, 4))
  if isinstance(model, noise.GaussianNoise) and model.correlation:
    return dict(noise_corr_used=model.correlation)
  return {}


def degrade(config: RestoreConfig, clean: np.ndarray, *, seed: int | list[int] | np.ndarray,
            mask: np.ndarray | None = None) -> np.ndarray:
  """A synthetic observation of `clean` (H, W, C) by the config's forward model
  (:func:`make_physics`), (h, w, C) float32: masked (inpainting, `mask` (H, W) or (H, W, 1)),
  down-sampled by `factor` (super-resolution) or blurred (deblurring), then the noise model's
  noise added and the result clipped to [0, 1], drawn from ``numpy.random.default_rng(seed)``.
  """
  if not config.sigma_known or config.noise_corr is None:
    raise ValueError("degrade adds noise of a known sigma and correlation: sigma_known must be "
                     "True and noise_corr a number")
  clean = io.check_image(clean, "the clean image")
  if config.task == "inpaint":
    mask = _mask_of(mask, clean.shape)
  elif config.task == "sr":
    operators.check_divisible(clean.shape, config.factor)
  return make_physics(config, mask).measure(clean, np.random.default_rng(seed))


def _mask_of(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
  """The inpainting mask as (H, W, 1) float32 in {0, 1}; ValueError if absent, not of the
  image's size or not binary (values within MASK_SLACK of 0 or 1 are rounded)."""
  if mask is None:
    raise ValueError("task 'inpaint' needs a mask (1 = known pixel)")
  mask = np.asarray(mask, np.float32)
  mask = mask[..., None] if mask.ndim == 2 else mask[..., :1]
  if mask.ndim != 3 or mask.shape[:2] != tuple(shape[:2]):
    raise ValueError(f"the mask is {'x'.join(map(str, mask.shape[1::-1]))} but the image is "
                     f"{shape[1]}x{shape[0]}")
  binary = (np.abs(mask) <= MASK_SLACK) | (np.abs(mask - 1) <= MASK_SLACK)  # NaN: neither
  if not binary.all():
    raise ValueError(f"the mask must be binary (1 = known pixel, 0 = missing), but "
                     f"{1 - binary.mean():.1%} of its pixels are neither: binarise it first")
  return (mask >= 0.5).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Frame:
  """The observation and ground truth padded to the network's multiple, and the forward model
  at the padded size."""
  y: np.ndarray  # (h', w', C) padded observation
  clean: np.ndarray | None  # (H', W', C) at the network's resolution
  physics: physics_lib.Physics
  padding: io.Padding  # of y
  scale: int

  @property
  def net_padding(self) -> io.Padding:
    """The padding at the network's (scale x larger) resolution."""
    return io.Padding(*(self.scale * v for v in dataclasses.astuple(self.padding)))

  def unpad(self, x: np.ndarray) -> np.ndarray:
    """(..., H', W', C) network-resolution images back to the observation's frame."""
    p = self.net_padding
    return x[..., p.top:x.shape[-3] - p.bottom, p.left:x.shape[-2] - p.right, :]


def make_frame(config: RestoreConfig, y: np.ndarray, clean: np.ndarray | None = None,
               mask: np.ndarray | None = None) -> Frame:
  """The observation y (h, w, C), ground truth (H, W, C) and mask padded to the network's
  multiple (reflect; the mask with zeros), and the forward model at that size; ValueError if
  they do not fit each other."""
  s = config.scale
  y = io.check_image(y, "the observation", min_size=max(2, -(-MIN_SIDE // s)))
  if clean is not None:
    clean = io.check_image(clean, "the ground truth", min_size=MIN_SIDE)
    want = (y.shape[0] * s, y.shape[1] * s, y.shape[2])
    if clean.shape != want:
      raise ValueError(f"the ground truth is {clean.shape} but the observation needs {want}")
  multiple = 2 ** config.scales
  if config.task == "inpaint":
    mask, _ = io.pad_to_multiple(_mask_of(mask, y.shape), multiple, mode="constant")
  y, padding = io.pad_to_multiple(y, max(multiple // s, 1))
  framed = Frame(y.astype(np.float32), None, make_physics(config, mask), padding, s)
  op = framed.physics.operator
  if isinstance(op, operators.Blur) and op.kernel.shape[0] > min(y.shape[:2]):
    raise ValueError(f"the {op.kernel.shape[0]}x{op.kernel.shape[0]} blur kernel is larger "
                     f"than the (padded) {y.shape[1]}x{y.shape[0]} observation")
  if clean is None:
    return framed
  p = framed.net_padding
  return dataclasses.replace(framed, clean=np.pad(
      clean, ((p.top, p.bottom), (p.left, p.right), (0, 0)), mode="reflect"))


def noise_sigma(config: RestoreConfig, frame: Frame) -> float:
  """The observation's noise std in [0, 1] units from the frame's noise model: config.sigma /
  255, or estimated from the (unpadded) observation."""
  sigma = frame.physics.noise_level(io.unpad(frame.y, frame.padding))
  if config.sigma_known:
    return sigma
  logging.info("noise level estimated from the observation: sigma = %.2f (0-255)", 255 * sigma)
  if sigma > 1:
    raise ValueError(f"the noise level estimated from the observation, {255 * sigma:.0f} "
                     "(0-255), exceeds the image's range: it is not a noisy photo's (give sigma)")
  level_methods = ("ddpm", "dip_ddpm", "dip_guided", "staged")
  needs = [f"method {config.method!r}"] if config.method in level_methods else []
  needs += [f"stop {name!r}" for name in config.stop if name in ("staged", "discrepancy")]
  if needs and sigma <= 0:
    raise ValueError(f"{' and '.join(needs)} need(s) the noise level, but its estimate from the "
                     "observation is 0 (no noise in its finest wavelet band: a clean or JPEG-"
                     "compressed image): give sigma")
  return sigma


def input_timestep(config: RestoreConfig, sigma: float) -> int:
  """The timestep of the DDPM-noised input: input_t, or where the schedule's noise is sigma."""
  if config.input_t is not None:
    return config.input_t
  return int(schedules.t_for_sigma(schedules.get(config.schedule), sigma))


def _net_input(key: jax.Array, config: RestoreConfig, frame: Frame, sigma: float):
  height, width = (frame.y.shape[0] * frame.scale, frame.y.shape[1] * frame.scale)
  if config.input == "noise":
    return inputs.dip_noise(key, height, width, reg_noise_std=config.reg_noise_std)
  if config.input == "meshgrid":
    return inputs.meshgrid(height, width, reg_noise_std=config.reg_noise_std)
  schedule = schedules.get(config.schedule)
  t = input_timestep(config, sigma)
  y = jnp.asarray(frame.y)
  if frame.scale > 1:
    y = jax.image.resize(y, (height, width, y.shape[-1]), "bicubic")
  return inputs.ddpm_noised(key, y, schedule, t, fresh=config.input_fresh,
                            extra_channels=config.input_extra,
                            reg_noise_std=config.reg_noise_std)


def build_problem(key: jax.Array, config: RestoreConfig, frame: Frame,
                  sigma: float) -> problems.Problem:
  """The fit problem: plain DIP (one for all seeds), or the staged targets stacked per seed
  (each seed its own probe and stage noise, which average out over the seeds). `key`: the
  problem's (fold_in(run key, PROBLEM_STREAM)); sigma: the noise std in [0, 1] units."""
  k_input, k_targets = jax.random.split(key)
  net_input = _net_input(k_input, config, frame, sigma)
  loss_params = losses.load_vgg19(config.vgg19) if losses.needs_params(config.loss) else None
  y = jnp.asarray(frame.y)
  clean = None if frame.clean is None else jnp.asarray(frame.clean)
  poisson = isinstance(frame.physics.noise, noise.PoissonNoise)
  # Poisson: the std per entry (the probe's std and the SURE terms follow the noise's)
  stds = jnp.asarray(frame.physics.noise.std_map(frame.y)) if poisson else sigma
  if config.method != "staged":
    problem = problems.plain_problem(net_input, y, frame.physics.operator, config.iters, clean,
                                     jnp.asarray(stds, jnp.float32))
    problem = problem.replace(loss_params=loss_params)
  else:
    y_seen = io.unpad(frame.y, frame.padding)
    correlation = 0.0 if poisson else frame.physics.noise.width(y_seen)
    problem = problems.staged_problems(
        k_targets, config.seeds, net_input, y, frame.physics.operator, config.iters,
        schedule=schedules.get(config.schedule), num_stages=config.stages, t_max=config.t_max,
        sigma=stds, probe_ratio=config.probe, correlation=correlation,
        fresh_noise=config.fresh_eps, scaled=config.scaled_targets,
        final_share=config.final_share, clean=clean)
    problem = problem.replace(loss_params=problems.stack([loss_params] * config.seeds))
  if poisson:
    problem = problem.replace(poisson=True)
  if config.holdout:
    problem = problems.with_holdout(problem, jax.random.fold_in(key, HOLDOUT_STREAM),
                                    config.holdout)
  return problem


def network(config: RestoreConfig, channels: int):
  """The config's network (:func:`nets.make`) with `channels` output channels."""
  return nets.make(config.net, config.width, config.scales, out_channels=channels,
                   dtype=jnp.dtype(config.dtype))


def fit_config(config: RestoreConfig, chunk: int) -> fit.FitConfig:
  """The optimisation settings of a run fitted `chunk` iterations per compiled call (bounded
  by the budget where `chunk` does not divide it)."""
  criteria = tuple(stopping.get(name) for name in config.stop)
  return fit.FitConfig(
      learning_rate=config.lr, exp_weight=config.exp_weight,
      segment=math.gcd(chunk, SSIM_EVERY),
      window=config.window if "es_wmv" in config.stop else 0, criteria=criteria,
      halt=criteria[0] if config.halt else None, loss=config.loss,
      bounded=config.iters % chunk != 0)


def chunk_length(config: RestoreConfig, chunk: int, checkpoint_every: int = 0) -> int:
  """Iterations per compiled call: at most `chunk` and `iters`, dividing `checkpoint_every`."""
  if chunk < 1 or checkpoint_every < 0:
    raise ValueError(f"chunk must be positive and checkpoint_every >= 0, got {chunk}, "
                     f"{checkpoint_every}")
  n = min(chunk, config.iters)
  return math.gcd(n, checkpoint_every) if checkpoint_every else n


def restore(config: RestoreConfig, observation: np.ndarray, *, key: jax.Array,
            clean: np.ndarray | None = None, mask: np.ndarray | None = None,
            progress: Progress | None = None, chunk: int = 100,
            checkpoint_dir: str | None = None, checkpoint_every: int = 0,
            resume: bool = False, tile: int | None = None,
            overlap: int = TILE_OVERLAP) -> Restoration:
  """Restores `observation` (h, w, C) in [0, 1] as `config` says.

  Args:
    config: the run's settings.
    observation: the degraded image y; (H / factor, W / factor, C) for super-resolution.
    key: PRNG key of the problem (input, probe, stage noise), the fits and the DDPM stage.
    clean: the ground truth (H, W, C), to trace and score against; optional.
    mask: the inpainting mask (h, w) or (h, w, 1), 1 = known pixel.
    progress: called after every chunk as ``progress(done, iters, latest)``, `latest` the
      seeds' mean of the last iteration's records plus 'it_per_s'.
    chunk: iterations per compiled call (progress and checkpoint granularity); any `iters`
      runs with one compiled function (iterations past the budget are skipped).
    checkpoint_dir, checkpoint_every: Orbax checkpoints of the fit every that many iterations;
      the directory is bound to this run (:func:`fingerprint`): a new run is refused where
      checkpoints exist.
    resume: continue from the latest checkpoint in `checkpoint_dir`, bit for bit (from the start
      when there is none yet); refused, naming what changed, if it is of another run.
    tile, overlap: restore in square tiles of side `tile` (output pixels), neighbours
      overlapping by `overlap`, one after the other and blended (:mod:`dipjax.tiles`), so that
      the peak memory is the tile's: every tile is fitted with the same key, settings and
      noise level (estimated once, from the whole observation) and stops by its own criterion.
      0, or a tile as large as the image: the whole image; None: whole where
      :func:`memory_estimate` fits the available memory (or with checkpoints), else the largest
      tile that does (:func:`auto_tile`), with a warning. Fit methods without a DDPM stage only
      (dip, staged), no deblurring, no checkpoints.
  """
  config = resolve_noise(config, observation)
  if tile is None:
    tile = 0 if checkpoint_every or resume else auto_tile(config, np.shape(observation), overlap)
  if tile and tile < config.scale * max(np.shape(observation)[:2]):
    if checkpoint_every or resume:
      raise ValueError("a tiled restoration is not checkpointed: give tile=0, or no checkpoints")
    return _restore_tiled(config, observation, key, clean, mask, progress, chunk, tile, overlap)
  if (resume or checkpoint_every) and not checkpoint_dir:
    raise ValueError("resume and checkpoint_every need a checkpoint_dir")
  if (resume or checkpoint_every) and not config.fits:
    raise ValueError(f"method {config.method!r} has no fit to checkpoint or resume")
  padded = make_frame(config, observation, clean, mask)
  check_memory(config, np.shape(observation))
  ddpm = _load_ddpm(config, padded.y.shape[-1])
  y = io.unpad(padded.y, padded.padding)
  sigma = noise_sigma(config, padded)
  k_ddpm = jax.random.fold_in(key, DDPM_STREAM)
  if not config.fits:
    image, info = _ddpm_stage(config, ddpm, y, sigma, None, k_ddpm, mask=mask)
    return _result(config, padded, y, sigma, image, "ddpm", None, ddpm=info)
  length = chunk_length(config, chunk, checkpoint_every)
  found = False
  if checkpoint_every or resume:
    found = checkpoint.bind(checkpoint_dir, fingerprint(config, padded, key, length),
                            resume=resume)
    if resume and not found:
      logging.info("no checkpoint yet in %s: starting at iteration 0", checkpoint_dir)
  run = FitRun(config, padded, sigma, key, chunk=length)
  run.fit(progress=progress, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
          resume=found)
  fit_image, restored_at = run.restored()
  image, info = fit_image, None
  if ddpm is not None:
    est = None
    if config.method in DIP_POSTERIOR:  # held-out residuals = A x_hat - A x - noise
      est = fit_error_estimate(config, run.held_out_error(), y, fit_image, sigma, mask)
    image, info = _ddpm_stage(config, ddpm, y, sigma, fit_image, k_ddpm, mask=mask,
                              est_mse=est)
  return _result(config, padded, y, sigma, image, restored_at, run,
                 fit_image=fit_image if ddpm is not None else None, ddpm=info)


def resolve_noise(config: RestoreConfig, observation: np.ndarray) -> RestoreConfig:
  """`config` with the noise parameters it leaves unknown estimated from the whole observation,
  once, so that tiles and checkpoints share them: a Gaussian noise's correlation (noise_corr
  None; :func:`noise.estimate_noise`; its sigma stays to :func:`noise_sigma`), a Poisson
  noise's peak and read noise (sigma_known False; :func:`noise.estimate_poisson_gaussian`),
  which then count as known."""
  if config.noise_corr is None:
    width = round(noise.estimate_noise(io.check_image(observation, "the observation"))[1], 3)
    logging.info("noise correlation estimated from the observation: width %.2f pixels", width)
    config = dataclasses.replace(config, noise_corr=width)
  if config.noise == "poisson" and not config.sigma_known:
    y = io.check_image(observation, "the observation")
    peak, read = noise.estimate_poisson_gaussian(y)
    if noise.PoissonNoise(peak, read).level(y) < 1 / 255:
      raise ValueError("no noise found in the observation (a clean or compressed image?): "
                       "give its peak and read noise sigma (restore.py --noisy: --peak, --sigma)")
    logging.info("Poisson-Gaussian noise estimated from the observation: peak %.1f photons, "
                 "read noise sigma %.2f (0-255)", peak, 255 * read)
    config = dataclasses.replace(config, peak=round(peak, 3), sigma=round(255 * read, 4),
                                 sigma_known=True)
  return config


def auto_tile(config: RestoreConfig, shape: tuple[int, ...], overlap: int = TILE_OVERLAP,
              free: int | None = None) -> int:
  """The tile side :func:`restore` takes for tile=None: 0 (the whole image) where its
  :func:`memory_estimate` fits `free` bytes (default :func:`available_memory`; always on an
  accelerator, or where unknown, or where tiles do not apply: DDPM methods, deblurring), else
  the largest multiple of the network's 2^scales whose tile fits (0 if none does, and
  :func:`check_memory` refuses the run)."""
  if (config.method in DDPM_METHODS or config.task == "deblur"
      or jax.default_backend() != "cpu"):
    return 0
  free = available_memory() if free is None else free
  if free is None or memory_estimate(config, shape) <= free:
    return 0
  multiple = 2 ** config.scales
  side = min(shape[0], shape[1]) * config.scale // multiple * multiple
  smallest = max(4 * overlap, multiple, MIN_SIDE * config.scale)
  while side >= smallest:
    if memory_estimate(config, (side // config.scale, side // config.scale, shape[-1])) <= free:
      return side
    side -= multiple
  return 0


def _restore_tiled(config: RestoreConfig, observation: np.ndarray, key: jax.Array,
                   clean: np.ndarray | None, mask: np.ndarray | None,
                   progress: Progress | None, chunk: int, tile: int,
                   overlap: int) -> Restoration:
  """:func:`restore` in tiles of side `tile` (output pixels) overlapping by `overlap`, one
  compiled chunk for all of them, blended by :func:`tiles.merge`."""
  s = config.scale
  if config.method in DDPM_METHODS or config.task == "deblur":
    what = "deblurring (a tile's blur reaches outside it)" if config.task == "deblur" else (
        f"method {config.method!r}")
    raise ValueError(f"tiled restoration runs the fit methods (dip, staged) on denoising, "
                     f"inpainting and super-resolution, not {what}: give tile=0")
  if tile % s or overlap % s or not 0 <= overlap < tile or tile // s < MIN_SIDE:
    raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be multiples of the factor "
                     f"{s} with 0 <= overlap < tile and tile >= {MIN_SIDE * s}")
  y = io.check_image(observation, "the observation", min_size=2)
  whole = make_frame(config, y, clean, mask)  # checks the inputs fit each other
  sigma = noise_sigma(config, whole)
  if not config.sigma_known and config.noise == "gaussian":
    config = dataclasses.replace(config, sigma=255 * sigma, sigma_known=True)  # one level
  grid = tiles_lib.Tiling(y.shape[:2], tile // s, overlap // s)
  out_grid = grid.scaled(s)
  check_memory(config, grid.size + y.shape[-1:])
  logging.warning("restoring %dx%d in %d tiles of %dx%d (overlap %d), each fitted on its own",
                  y.shape[1] * s, y.shape[0] * s, len(grid.origins), out_grid.size[1],
                  out_grid.size[0], overlap)
  mask = _mask_of(mask, y.shape) if config.task == "inpaint" else None
  length = chunk_length(config, chunk)
  compiled = {}

  def compile_once(*args, **kwargs):  # every tile has the same shapes: one compiled chunk
    if "chunk" not in compiled:
      compiled["chunk"] = fit.compile_many(*args, **kwargs)
    return compiled["chunk"]

  images, found, compile_seconds, fit_seconds = [], [], 0.0, 0.0
  for n, origin in enumerate(grid.origins):
    out_origin = (origin[0] * s, origin[1] * s)
    frame = make_frame(config, grid.crop(y, origin),
                       None if clean is None else out_grid.crop(clean, out_origin),
                       None if mask is None else grid.crop(mask, origin))
    run = FitRun(config, frame, noise_sigma(config, frame), key, chunk=length)
    run.compile(compile_once)
    run.fit(progress=progress)
    image, at = run.restored()
    images.append(image)
    compile_seconds += run.compile_seconds
    fit_seconds += run.fit_seconds
    found.append(dict(origin=list(out_origin), restored_at=at, iterations=run.done,
                      stops={k: [int(i) for i in v[0]] for k, v in run.stops().items()},
                      fit_seconds=round(run.fit_seconds, 2)))
    logging.info("tile %d/%d at %s: %s", n + 1, len(grid.origins), out_origin, at)
  image = tiles_lib.merge(images, out_grid)
  scores = None
  if clean is not None:
    scores = dict(restored=score(image, clean))
    if config.task == "denoise" or s == 1:
      scores["degraded"] = score(y, clean)
  ats = sorted({t["restored_at"] for t in found})
  return Restoration(
      image=image, observation=y, restored_at=f"{len(found)} tiles at: {', '.join(ats)}",
      sigma=float(sigma), stops={}, ema=None, out=None, fit_image=None, trace=None,
      trace_every=0, stage_ends=(), iterations=max(t["iterations"] for t in found),
      compile_seconds=compile_seconds, fit_seconds=fit_seconds, ddpm=None, scores=scores,
      tiles=found, noise_used=restored_noise(config, sigma))


def network_size(config: RestoreConfig, shape: tuple[int, ...]) -> tuple[int, int]:
  """(H, W) of the network's output for an observation of `shape` (h, w, ...): scaled by the
  SR factor and padded to a multiple of 2^scales."""
  multiple = 2 ** config.scales
  return tuple(-(-n * config.scale // multiple) * multiple for n in shape[:2])


def memory_estimate(config: RestoreConfig, shape: tuple[int, ...]) -> int:
  """Estimated peak host memory (bytes) of :func:`restore` on a CPU for an observation of
  `shape` (h, w, C): :data:`MEMORY_MODEL` at the network's padded resolution, plus ES-WMV's
  window of outputs; the base alone for a method without a fit."""
  m = MEMORY_MODEL
  if not config.fits:
    return int(m["base_bytes"])
  h, w = network_size(config, shape)
  per_channel = (m["per_pixel_channel_bytes"]
                 + (config.seeds - 1) * m["per_extra_seed_pixel_channel_bytes"])
  window = config.seeds * config.window * shape[-1] * 4 if "es_wmv" in config.stop else 0
  return int(m["base_bytes"] + h * w * (m["per_pixel_bytes"] + config.width * per_channel
                                        + window))


def available_memory() -> int | None:
  """Bytes this process may still allocate: the host's MemAvailable, or less where a cgroup
  (v2) limit leaves less; None if unknown (not Linux)."""
  try:
    with open("/proc/meminfo") as f:
      fields = dict(line.split(":", 1) for line in f)
    free = int(fields["MemAvailable"].split()[0]) * 1024
  except (OSError, KeyError, ValueError):
    return None
  try:
    with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
      limit, used = f.read().strip(), int(g.read())
    if limit != "max":
      free = min(free, int(limit) - used)
  except (OSError, ValueError):
    pass
  return free


def check_memory(config: RestoreConfig, shape: tuple[int, ...]) -> None:
  """Logs the run's memory estimate on a CPU and refuses (ValueError) a run that would need more
  than is available, before any work."""
  if jax.default_backend() != "cpu":
    return
  need, free = memory_estimate(config, shape), available_memory()
  gib = lambda n: f"{n / 2**30:.1f} GiB"
  logging.info("memory: about %s needed (estimate), %s available", gib(need),
               "?" if free is None else gib(free))
  if free is not None and need > free:
    raise ValueError(
        f"a {shape[1]}x{shape[0]} image at width {config.width} with {config.seeds} seed(s) "
        f"needs about {gib(need)} (estimate) but {gib(free)} is available: crop the image, "
        "or lower the width or the seeds")


def identity_fields(config: RestoreConfig) -> dict:
  """The config's fields by name as what identifies a run: every one, but those of
  LATER_FIELDS only where they differ from their default."""
  return {k: v for k, v in vars(config).items()
          if k not in LATER_FIELDS or v != LATER_FIELDS[k]}


def fingerprint(config: RestoreConfig, frame: Frame, key: jax.Array,
                chunk: int) -> dict[str, str]:
  """What defines a fit, as text by name (:func:`checkpoint.bind`): every config setting but the
  DDPM stage's, digests of the observation, ground truth and mask, the key and the iterations
  per compiled call (which set the checkpoint's trace layout)."""

  def digest(a: np.ndarray | None) -> str:
    if a is None:
      return "none"
    a = np.ascontiguousarray(a, np.float32)
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()[:16]

  key = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  fp = {k: json.dumps(v) for k, v in identity_fields(config).items()
        if k not in _AFTER_FIT_FIELDS}
  return fp | {"observation": digest(frame.y), "ground_truth": digest(frame.clean),
               "mask": digest(getattr(frame.physics.operator, "mask", None)),
               "key": str(np.asarray(key).tolist()),
               "iterations per call (chunk, checkpoint_every)": str(chunk)}


def _host(tree):
  """A pytree of arrays as numpy; an array that spans processes (a multi-process run) gathered
  from all of them, so that each process holds the whole."""

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(get, tree)


CompileFn = Callable[..., Callable]  # fit.compile_many's signature


class FitRun:
  """The seeds' fits of one restoration, run chunk by chunk: the loop of :func:`restore`.

  Programs that run many fits use it directly: a grid passes a `compile_fn` that keeps compiled
  chunks across configs and a `mesh` to shard the seeds; a report reads outputs between chunks
  through `on_chunk`.

  Attributes:
    problem, net, fit_config, shared: what :func:`fit.compile_many` takes (`shared`: one problem
      for all seeds; the staged problem is stacked per seed).
    states: the seeds' train states (leading axis: seeds).
    trace: the records (seeds, iters) by :class:`fit.Trace` field, SSIM (seeds,
      ceil(iters / segment)) (:func:`fit.blank_trace` where not run).
    compile_seconds, fit_seconds: the chunk's compile; the chunks' compute (without recording,
      callbacks and checkpoints).
  """

  def __init__(self, config: RestoreConfig, frame: Frame, sigma: float, key: jax.Array, *,
               chunk: int, mesh: jax.sharding.Mesh | None = None, stop_diverged: bool = True):
    """`key`: the run's key (the problem from fold_in(key, PROBLEM_STREAM), the fits from
    split(key, seeds)); `chunk`: iterations per compiled call (:func:`chunk_length`);
    `stop_diverged`: raise DivergedError when every seed diverges (a grid records it instead)."""
    self.config, self.frame, self.chunk, self.mesh = config, frame, chunk, mesh
    self.stop_diverged = stop_diverged
    self.fit_config = fit_config(config, chunk)
    self.problem = build_problem(jax.random.fold_in(key, PROBLEM_STREAM), config, frame, sigma)
    self.shared = config.method != "staged"
    self.net = network(config, frame.y.shape[-1])
    # The states depend on the problem only through its shapes: drawn for the plain problem of
    # those shapes, so plain and staged runs share net.init's compiled ops.
    p = self.problem if self.shared else jax.tree.map(lambda x: x[0], self.problem)
    plain = problems.plain_problem(p.inputs, p.observation, p.operator, 1, p.clean, p.sigma)
    self.states = fit.init_many(jax.random.split(key, config.seeds), self.net, plain,
                                self.fit_config)
    if mesh is not None and jax.process_count() > 1:  # host arrays, sharded by the compiled chunk
      self.states, self.problem = jax.device_get((self.states, self.problem))
    self.trace = fit.blank_trace(config.seeds, config.iters, self.fit_config.segment)
    self.compile_seconds = self.fit_seconds = 0.0
    self.start = 0
    self._chunk_fn = None

  @property
  def stage_ends(self) -> tuple[int, ...]:
    ends = self.problem.ends if self.shared else self.problem.ends[0]
    return tuple(int(e) for e in np.asarray(ends))

  @property
  def done(self) -> int:
    """Iterations run (to the end of the chunk in which a halt fired)."""
    return min(int(_host(self.states.step)[0]), self.config.iters)

  def compile(self, compile_fn: CompileFn = fit.compile_many) -> Callable:
    """Compiles the chunk ``run(states, problem) -> (states, trace)`` (with `compile_fn`, e.g. a
    cache of :func:`fit.compile_many`) and returns it."""
    t0 = time.perf_counter()
    self._chunk_fn = compile_fn(self.states, self.problem, self.chunk, net=self.net,
                                config=self.fit_config, shared=self.shared, mesh=self.mesh)
    self.compile_seconds = time.perf_counter() - t0
    logging.info("compiled in %.1f s (%s, %s, %d seed(s), %s width %d)", self.compile_seconds,
                 jax.default_backend(), "x".join(map(str, self.states.out.shape[2:0:-1])),
                 self.config.seeds, self.config.net, self.config.width)
    return self._chunk_fn

  def fit(self, *, progress: Progress | None = None,
          on_chunk: Callable[[FitRun], None] | None = None, checkpoint_dir: str | None = None,
          checkpoint_every: int = 0, resume: bool = False) -> None:
    """Runs chunks to the budget or until the halting criterion has fired for every seed,
    after compiling (:meth:`compile`) if not done; `on_chunk(self)` after each chunk."""
    if resume:
      self._resume(checkpoint_dir)
    if self._chunk_fn is None:
      self.compile()
    while self.done < self.config.iters and not self._halted():
      lo, t0 = self.done, time.perf_counter()
      self.states, records = jax.block_until_ready(self._chunk_fn(self.states, self.problem))
      self.fit_seconds += time.perf_counter() - t0
      self._record(lo, _host(records))
      if self.stop_diverged:
        self._check_divergence()
      if on_chunk is not None:
        on_chunk(self)
      if progress is not None:
        progress(self.done, self.config.iters, self._latest())
      if checkpoint_every and self.done % checkpoint_every == 0:
        checkpoint.save(checkpoint_dir, self.done, {"state": self.states, "trace": self.trace})
    if self._halted():
      logging.info("%s fired for every seed: halted at iteration %d", self.fit_config.halt.name,
                   self.done)
    if jax.process_count() > 1:
      self.states = _host(self.states)

  def _halted(self) -> bool:
    """Whether the halting criterion (if any) has fired for every seed."""
    return self.fit_config.halt is not None and bool(
        np.all(_host(self.states.monitors.fired[:, 0])))

  def _check_divergence(self) -> None:
    """DivergedError when every seed was rolled back in at least DIVERGED_SHARE of its last
    (up to 100) iterations: its steps keep producing non-finite or collapsing outputs."""
    recent = self.trace["rolled_back"][:, max(0, self.done - 100):self.done]
    if recent.shape[1] >= 10 and np.all(recent.mean(axis=1) >= DIVERGED_SHARE):
      raise DivergedError(
          f"the fit diverged: {recent.mean():.0%} of iterations {self.done - recent.shape[1] + 1}"
          f"-{self.done} were rolled back (non-finite or collapsing outputs) in every seed; "
          f"lower lr (now {self.config.lr:g})")

  def _resume(self, checkpoint_dir) -> None:
    step = checkpoint.latest_step(checkpoint_dir)
    if step is None:
      raise ValueError(f"resume: no checkpoint in {checkpoint_dir}")
    restored = checkpoint.load(checkpoint_dir, {"state": self.states, "trace": self.trace})
    self.states = restored["state"]
    self.trace = {k: np.asarray(v) for k, v in restored["trace"].items()}
    self.start = self.done
    logging.info("resumed from iteration %d of %d", step, self.config.iters)

  def _record(self, lo: int, records: fit.Trace) -> None:
    n = self.done - lo
    every = self.fit_config.segment
    for name, values in vars(records).items():
      values = np.asarray(values)
      if name.startswith("ssim"):
        first, count = lo // every, -(-n // every)
        self.trace[name][:, first:first + count] = values[:, :count]
      else:
        self.trace[name][:, lo:lo + n] = values[:, :n]

  def _latest(self) -> dict[str, float]:
    """The seeds' mean records of the last iteration run (before a halt), and the speed."""
    ran = np.flatnonzero(np.isfinite(self.trace["loss"][:, :self.done]).any(0))
    i = ran[-1] if ran.size else self.done - 1
    latest = {k: float(np.nanmean(v[:, i])) for k, v in self.trace.items()
              if not k.startswith("ssim") and np.isfinite(v[:, i]).any()}
    seconds = self.fit_seconds
    latest["it_per_s"] = (self.done - self.start) / seconds if seconds > 0 else float("nan")
    return latest

  def restored(self) -> tuple[np.ndarray, str]:
    """The seeds' mean EMA output at the first criterion's stop (else the last), its name. A
    seed whose criterion never had a defined score (e.g. a noise level of 0 for the staged
    stop) gives its last iteration, with a warning: never the blank it started from."""
    if not self.fit_config.criteria:
      return self.frame.unpad(np.asarray(self.states.ema)).mean(0), "last iteration"
    name = self.fit_config.criteria[0].name
    steps, kept = self.stops()[name]
    never = steps == 0
    if never.any():
      logging.warning("the %s criterion never had a defined score in %d of %d seed(s): their "
                      "last iteration is taken", name, never.sum(), never.size)
      if never.all():
        name = f"last iteration ({name}: no stop)"
    return kept.mean(0), name

  def held_out_error(self) -> float:
    """The mean over seeds of the held-out error (MSE on the held-out measurements, [0, 1]
    units squared, noise included) of each seed's EMA output at the first criterion's stop, or
    at the last iteration (a seed whose criterion never stopped, or no criterion): what the
    dip_* solvers take t* from. With several seeds it exceeds the error of their mean image
    (the restored one), so t* errs late: towards more noise."""
    errors = self.trace["holdout_mse_ema"][:, :self.done]
    steps = (self.stops()[self.fit_config.criteria[0].name][0] if self.fit_config.criteria
             else np.zeros(self.config.seeds, int))
    last = [np.flatnonzero(np.isfinite(e))[-1] for e in errors]
    at = [s - 1 if s > 0 else l for s, l in zip(steps, last)]
    return float(np.mean([e[i] for e, i in zip(errors, at)]))

  def stops(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per criterion, (1-based stop iterations (seeds,), EMA outputs there (seeds, H, W, C));
    iteration 0 where its score was never defined, with the last EMA output there (not the
    blank the criterion's slot started as)."""
    final = self.frame.unpad(np.asarray(self.states.ema))
    found = {}
    for name, (step, kept) in fit.stops(self.states, self.fit_config).items():
      step = np.asarray(step) + 1
      found[name] = (step, np.where((step == 0)[:, None, None, None], final,
                                    self.frame.unpad(np.asarray(kept))))
    return found


def noise_energy(config: RestoreConfig, y: np.ndarray, x_hat: np.ndarray, sigma: float,
                 mask: np.ndarray | None = None) -> float:
  """E mean e^2 of the noise e in y's measured entries ([0, 1] units squared; inpainting: the
  known pixels of `mask`): sigma^2, or less where y lies in [0, 1] and its noise was clipped,
  at the clean measurement taken as A x_hat (:func:`noise.noise_std`). What the held-out error
  of x_hat (H, W, C) carries beside its own."""
  measured = np.ones(np.shape(y), bool)
  if config.task == "inpaint":
    measured = np.broadcast_to(_mask_of(mask, np.shape(y)) > 0, np.shape(y))
  proxy = np.asarray(make_physics(config, mask).operator(jnp.asarray(x_hat, jnp.float32)))
  y = np.asarray(y, np.float32)
  return float(noise.noise_std(y[measured], sigma, proxy=proxy[measured])) ** 2


def fit_error_estimate(config: RestoreConfig, held_out: float, y: np.ndarray,
                       x_hat: np.ndarray, sigma: float, mask: np.ndarray | None = None, *,
                       white_gain: bool = True) -> float:
  """The image MSE of a fit's output x_hat (H, W, C) that the dip_* solvers match t* to, from
  its held-out error (MSE on held-out measurements, noise included): (held_out - the noise
  energy (:func:`noise_energy`)) / the operator's white-noise gain, at least ERROR_FLOOR.

  The remainder measures the error through A only: a blur of kernel k passes sum k^2 of a white
  error's energy (0.03 for the report's Gaussian kernel), so without the division
  (white_gain=False, the posterior report's first rows) t* fell at 1 on deblurring: est / true
  MSE 0.03, and 0.22 on SR x4. Divided by the gain (:meth:`operators.Operator.white_noise_gain`,
  exact in expectation for a white error; 1 for denoising and inpainting): 0.88 on the blur,
  where DDNM from the guided start gained 1.1 dB, but 5.2 on SR (its held-out low-resolution
  pixels are interpolated, their error far above the fitted ones'), where DDNM was unchanged
  and DPS lost 0.4 dB (2 crops; RESULTS, "Diffusion posterior solvers")."""
  remainder = held_out - noise_energy(config, y, x_hat, sigma, mask)
  if white_gain:
    remainder /= make_physics(config, mask).operator.white_noise_gain()
  return max(remainder, ERROR_FLOOR)


def _load_ddpm(config: RestoreConfig, channels: int):
  """(params, UNetConfig) of config.ddpm_weights for the DDPM methods, else None."""
  if config.method not in DDPM_METHODS:
    return None
  path = config.ddpm_weights
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no DDPM weights file {path}: run experiments/train_ddpm.py or "
                            "pass ddpm_weights")
  params, unet_config = ddpm_train.load_weights(path)
  ddpm_solvers.check_channels(unet_config, channels)
  return params, unet_config


def _ddpm_stage(config: RestoreConfig, ddpm, y: np.ndarray, sigma: float,
                x_hat: np.ndarray | None, key: jax.Array, *, mask: np.ndarray | None = None,
                est_mse: float | None = None) -> tuple[np.ndarray, dict]:
  """The method's DDPM on y (h, w, C) and, for the hybrids, the fit's estimate x_hat (H, W, C),
  jitted once: (restored (H, W, C), the stage's settings and timings). The posterior solvers
  take the task's operator (inpainting: `mask`, as :func:`make_physics`) and, from a DIP start,
  t* matched to est_mse (the fit's held-out error), the start guiding every x0 prediction."""
  params, unet_config = ddpm
  schedule = schedules.get(unet_config.schedule, unet_config.num_steps)
  method, nfe = config.method, config.nfe
  solver = method.removeprefix("dip_")
  kw = dict(samples=config.ddpm_samples, config=unet_config)
  if solver in POSTERIOR:
    op = make_physics(config, mask).operator
    settings = dict(ddnm=dict(eta=config.ddpm_eta),
                    diffpir=dict(lam=posterior.DIFFPIR_LAMBDA, zeta=posterior.DIFFPIR_ZETA),
                    dps=dict(scale=posterior.DPS_SCALE))[solver]
    kw.update(settings)
    if x_hat is None:
      t_start = schedule.num_steps
    else:
      t_start = int(ddpm_solvers.dip_timestep(schedule, est_mse))
      kw.update(start=x_hat, t_start=t_start, guide_mse=est_mse)
  else:
    kw.update(eta=config.ddpm_eta)
    est_mse = None if x_hat is None else float(ddpm_solvers.estimate_dip_error(x_hat, y, sigma))
    t_start = int(ddpm_solvers.dip_timestep(schedule, est_mse) if method == "dip_ddpm"
                  else ddpm_solvers.matched_timestep(schedule, ddpm_solvers.observed_sigma(
                      sigma, y.shape[-1], unet_config)))

  def run(params, key):
    eps = ddpm_unet.eps_fn(unet_config, params)
    if solver == "dps":
      return posterior.dps(eps, schedule, op, y, nfe, key, **kw)
    if solver in POSTERIOR:
      return getattr(posterior, solver)(eps, schedule, op, y, sigma, nfe, key, **kw)
    if method == "ddpm":
      return ddpm_solvers.ddpm_denoise(eps, schedule, y, sigma, nfe, key, **kw)
    if method == "dip_ddpm":
      return ddpm_solvers.dip_ddpm(eps, schedule, x_hat, est_mse, nfe, key, **kw)
    return ddpm_solvers.dip_guided(eps, schedule, x_hat, y, sigma, nfe, key,
                                   weight=config.guide_weight, est_mse=est_mse, **kw)

  t0 = time.perf_counter()
  compiled = jax.jit(run).lower(params, key).compile()
  t1 = time.perf_counter()
  restored = np.asarray(compiled(params, key))
  t2 = time.perf_counter()
  logging.info("DDPM (%s): t* = %d, %d evaluations in %.2f s (compiled in %.1f s)", method,
               t_start, min(nfe, t_start), t2 - t1, t1 - t0)
  return restored, dict(
      weights=os.path.abspath(config.ddpm_weights), model=json.loads(unet_config.to_json()),
      t_start=t_start, nfe=nfe, steps=min(nfe, t_start), samples=kw["samples"],
      **{k: kw[k] for k in ("eta", "lam", "zeta", "scale") if k in kw},
      sigma=round(255 * sigma, 4), est_mse=est_mse, guided_by_fit="guide_mse" in kw,
      guide_weight=config.guide_weight if method == "dip_guided" else None,
      compile_seconds=round(t1 - t0, 2), seconds=round(t2 - t1, 3))


def score(x: np.ndarray, truth: np.ndarray) -> dict[str, float]:
  """PSNR (dB) and SSIM of x against truth, both (H, W, C) in [0, 1]."""
  return dict(psnr=float(metrics.psnr(x, truth)), ssim=float(metrics.ssim(x, truth)))


def restored_noise(config: RestoreConfig, sigma: float) -> noise.NoiseModel:
  """The noise model a restoration took: the config's (:func:`noise_model`) with a Gaussian's
  sigma as used (given or estimated, [0, 1] units)."""
  if config.noise == "poisson":
    return noise_model(config)
  return noise.GaussianNoise(float(sigma), config.noise_corr)


def _result(config, frame, y, sigma, image, restored_at, run, fit_image=None,
            ddpm=None) -> Restoration:
  stops = run.stops() if run is not None else {}
  ema = out = None
  if run is not None:
    ema = frame.unpad(np.asarray(run.states.ema))
    out = frame.unpad(np.asarray(run.states.out))
  scores = None
  if frame.clean is not None:
    truth = frame.unpad(frame.clean)
    scores = dict(restored=score(image, truth))
    if config.task == "denoise" or frame.scale == 1:
      scores["degraded"] = score(y, truth)
    if fit_image is not None:
      scores["fit"] = score(fit_image, truth)
    if run is not None:
      scores["per_seed"] = [dict(output=score(o, truth), ema=score(e, truth))
                            for o, e in zip(out, ema)]
      scores["stops"] = {name: dict(per_seed=[score(x, truth) for x in kept],
                                    mean_of_seeds=score(kept.mean(0), truth))
                         for name, (_, kept) in stops.items()}
  return Restoration(
      image=np.asarray(image, np.float32), observation=y, restored_at=restored_at,
      noise_used=restored_noise(config, sigma),
      sigma=float(sigma), stops=stops, ema=ema, out=out, fit_image=fit_image,
      trace=None if run is None else run.trace,
      trace_every=0 if run is None else run.fit_config.segment,
      stage_ends=() if run is None else run.stage_ends,
      iterations=0 if run is None else run.done,
      compile_seconds=0.0 if run is None else run.compile_seconds,
      fit_seconds=0.0 if run is None else run.fit_seconds, ddpm=ddpm, scores=scores)
