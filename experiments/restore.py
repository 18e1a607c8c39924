r"""Restores one image with Deep Image Prior, plain or with DDPM-staged targets.

  python experiments/restore.py                        # sigma=25 denoising of the bundled image
  python experiments/restore.py --image x.png --sigma 50 --method staged --stages 4
  python experiments/restore.py --image x.png --task inpaint --mask m.png
  python experiments/restore.py --image x.png --task sr --factor 4
  python experiments/restore.py --preset paper         # the DIP paper's network and budget
  python experiments/restore.py --method ddpm --nfe 10 # dipjax's own DDPM alone (denoising)
  python experiments/restore.py --method dip_ddpm      # 300 DIP iterations, then the DDPM

Writes to --out_dir: restored.png (EMA output; the mean over seeds when --seeds > 1),
degraded.png (and degraded.npy, the exact float observation), metrics.json, trace.csv,
psnr.png, and checkpoints/ with --checkpoint_every. The DDPM methods (denoising only, with the
weights of experiments/train_ddpm.py): ddpm runs no fit (restored.png, degraded.png/.npy,
metrics.json); dip_ddpm and dip_guided refine the fit's restored EMA output with the DDPM
(dipjax.ddpm.restore), whose result is restored.png; metrics.json's "ddpm" holds that stage's
t*, NFE, wall time and PSNR/SSIM, "dip" the fit's own.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dipjax import checkpoint
import cli
from dipjax import fit
from dipjax import inputs
from dipjax import io
from dipjax import losses
from dipjax import metrics
from dipjax import nets
from dipjax import operators
from dipjax import plots
from dipjax import schedules
from dipjax import stopping
from dipjax.ddpm import restore as ddpm_restore
from dipjax.ddpm import train as ddpm_train
from dipjax.ddpm import unet as ddpm_unet

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DDPM_METHODS = ("ddpm", "dip_ddpm", "dip_guided")
HYBRIDS = ("dip_ddpm", "dip_guided")  # a DIP fit, then the DDPM
HYBRID_ITERS = 300  # the hybrids' DIP budget when --iters is not given: the DDPM finishes it
DDPM_STREAM = 10  # fold_in data of the DDPM stage's key (apart from the fits')

_IMAGE = flags.DEFINE_string("image", os.path.join(ASSETS, "house.png"), "Image to restore.")
_TASK = flags.DEFINE_enum("task", "denoise", ["denoise", "inpaint", "sr"], "Restoration task.")
_SIGMA = flags.DEFINE_float(
    "sigma", None, "Std of the Gaussian noise added to the clean image, in 0-255 units "
    "(default 25 for denoise, 0 otherwise).")
_NOISY = flags.DEFINE_bool(
    "noisy", False, "--image is already the degraded observation (noisy, masked or low-res); "
    "no noise is added and there is no ground truth unless --clean is given.")
_CLEAN = flags.DEFINE_string("clean", None, "Ground truth for an observation given with --noisy.")
_MASK = flags.DEFINE_string("mask", None, "Inpainting mask image: white = known pixel.")
_FACTOR = flags.DEFINE_integer("factor", 4, "Super-resolution factor (2, 4 or 8).")
_KERNEL = flags.DEFINE_enum("kernel", "lanczos", ["lanczos", "box"], "SR down-sampling kernel.")
_CROP = flags.DEFINE_integer("crop", 0, "Centre-crop the image to this size first (0: no crop).")
_METHOD = flags.DEFINE_enum("method", "dip", ["dip", "staged", "ddpm", "dip_ddpm", "dip_guided"],
                            "dip: fit y; staged: fit DDPM-noised targets, noisiest first; "
                            "ddpm: dipjax's DDPM alone (DDIM from the timestep matched to sigma); "
                            "dip_ddpm: a DIP fit, its output forward-noised to the timestep "
                            "matched to its estimated error and denoised by the DDPM; "
                            "dip_guided: the DDPM from y with every x0 prediction blended with "
                            "the DIP output. The DDPM methods denoise only.")
_SCHEDULE = flags.DEFINE_enum("schedule", "linear", ["linear", "cosine"], "Noise schedule.")
_STAGES = flags.DEFINE_integer("stages", 4, "Number of stages for --method staged.")
_T_MAX = flags.DEFINE_integer("t_max", 100, "Timestep of the noisiest stage target.")
_FRESH_EPS = flags.DEFINE_bool("fresh_eps", False, "Draw a new noise image for every stage.")
_PROBE = flags.DEFINE_float(
    "probe", 0.3, "--method staged: the targets are staged from y + probe * sigma * eps, a known "
    "noise the fit uses to estimate its own PSNR (the 'staged' criterion); 0: none.")
_FINAL_SHARE = flags.DEFINE_float("final_share", None, "--method staged: fraction of --iters "
                                  "for the last stage (default: equal stages).")
_SCALED = flags.DEFINE_bool("scaled_targets", True,
                            "Targets sqrt(abar) y + sqrt(1-abar) eps (else y + sigma_t eps).")
_ITERS = flags.DEFINE_integer("iters", 500, "Total iterations (a multiple of --log_every; "
                              f"{HYBRID_ITERS} for dip_ddpm / dip_guided unless given).")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Independent fits, averaged into restored.png.")
_NET = flags.DEFINE_enum("net", "skip", list(nets.NETS), "Network.")
_WIDTH = flags.DEFINE_integer("width", 32, "Channels per scale.")
_SCALES = flags.DEFINE_integer("scales", 5, "Number of scales (the image is padded to 2^scales).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype of the network (bfloat16: mixed precision, for "
                           "accelerators; slower on CPU).")
_INPUT = flags.DEFINE_enum("input", "noise", ["noise", "meshgrid", "ddpm"],
                           "Network input: DIP noise, meshgrid, or the DDPM-noised observation.")
_INPUT_T = flags.DEFINE_integer(
    "input_t", None, "Timestep of --input ddpm (default: where the schedule's noise matches "
    "--sigma).")
_INPUT_FRESH = flags.DEFINE_bool("input_fresh", True, "--input ddpm: redraw its noise each step.")
_INPUT_EXTRA = flags.DEFINE_integer("input_extra", 0, "--input ddpm: extra DIP noise channels.")
_REG_NOISE = flags.DEFINE_float("reg_noise_std", 1 / 30, "Input jitter std (DIP's reg_noise_std).")
_STOP = flags.DEFINE_list(
    "stop", [], f"Stopping criteria to monitor ({', '.join(stopping.KINDS)}; published "
    "settings). restored.png is the EMA output at the first one's stop (per seed); metrics.json "
    "reports every one's stop. Empty: the last iteration.")
_HALT = flags.DEFINE_bool("halt", False, "End the fit when the first --stop criterion fires.")
_WINDOW = flags.DEFINE_integer("window", 100, "ES-WMV window, used with --stop es_wmv.")
_LOSS = flags.DEFINE_enum("loss", "mse", list(losses.LOSSES),
                          "Training loss (perceptual: VGG19 features, needs --vgg19).")
_VGG19 = flags.DEFINE_string("vgg19", None, "VGG19 weights for --loss perceptual: the .npz "
                             "experiments/convert_vgg19.py writes from torchvision's file.")
_LR = flags.DEFINE_float("lr", 0.01, "Adam learning rate.")
_EXP_WEIGHT = flags.DEFINE_float("exp_weight", 0.99, "Output EMA weight (0: no EMA).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic degradation and of the fits.")
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/restore", "Output directory.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 100, "Iterations between progress lines.")
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", 0, "Iterations between checkpoints (a multiple of --log_every; 0: none).")
_RESUME = flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --out_dir.")
_DDPM_WEIGHTS = flags.DEFINE_string(
    "ddpm_weights", os.path.join(ASSETS, "ddpm_colour.npz"), "The DDPM methods' U-Net: the "
    ".npz of experiments/train_ddpm.py (dipjax.ddpm.train.save_weights).")
_NFE = flags.DEFINE_integer("nfe", 10, "DDPM methods: network evaluations (DDIM steps).")
_DDPM_SAMPLES = flags.DEFINE_integer("ddpm_samples", 1, "DDPM methods: samples averaged (they "
                                     "differ with --ddpm_eta > 0, or dip_ddpm's fresh noise).")
_DDPM_ETA = flags.DEFINE_float("ddpm_eta", 0.0, "DDPM methods: 0 DDIM (deterministic) .. 1 "
                               "ancestral sampling.")
_GUIDE_WEIGHT = flags.DEFINE_float(
    "guide_weight", None, "dip_guided: a constant blending weight w in [0, 1], x0 <- (1 - w) x0 "
    "+ w x_dip at every step; default: the inverse-variance weights s_t^2 / (s_t^2 + 4 est_mse) "
    "(dipjax.ddpm.restore.guide_weight).")
_PRESET = flags.DEFINE_enum(
    "preset", "default", ["default", "paper"],
    "paper: the DIP paper's network (paper_f16: 128 channels x 5 scales) and its notebooks' "
    "budgets (denoise 3000 it, sr 2000 it with reg_noise_std 0.03), overriding --net/--width/"
    "--scales/--iters/--reg_noise_std.")


class _Settings:
  """Flags after the preset is applied, validated."""

  def __init__(self):
    self.net_name, self.width, self.scales = _NET.value, _WIDTH.value, _SCALES.value
    self.iters, self.reg_noise_std = _ITERS.value, _REG_NOISE.value
    if _METHOD.value in HYBRIDS and not flags.FLAGS["iters"].present:
      self.iters = HYBRID_ITERS
    if _PRESET.value == "paper":
      if _TASK.value == "inpaint":
        raise ValueError("--preset paper covers denoise and sr (the DIP notebooks tune "
                         "inpainting per image); set --net/--width/--iters instead")
      self.net_name, self.width, self.scales = "skip", 128, 5
      self.iters = {"denoise": 3000, "sr": 2000}[_TASK.value]
      self.reg_noise_std = {"denoise": 1 / 30, "sr": 0.03}[_TASK.value]
    self.sigma = _SIGMA.value if _SIGMA.value is not None else (
        25.0 if _TASK.value == "denoise" and not _NOISY.value else 0.0)
    checks = [
        (self.sigma < 0, f"--sigma must be >= 0, got {self.sigma}"),
        (_NOISY.value and _SIGMA.value, "--sigma adds noise to a clean image; with --noisy the "
         "image is already degraded (leave --sigma out)"),
        (_TASK.value == "sr" and _FACTOR.value not in (2, 4, 8),
         f"--factor must be 2, 4 or 8, got {_FACTOR.value}"),
        (_TASK.value == "inpaint" and not _MASK.value, "--task inpaint needs --mask"),
        (self.iters < 1, f"--iters must be positive, got {self.iters}"),
        (_LOG_EVERY.value < 1 or self.iters % _LOG_EVERY.value,
         f"--iters ({self.iters}) must be a positive multiple of --log_every "
         f"({_LOG_EVERY.value})"),
        (_CHECKPOINT_EVERY.value < 0 or _CHECKPOINT_EVERY.value % _LOG_EVERY.value,
         f"--checkpoint_every ({_CHECKPOINT_EVERY.value}) must be a multiple of --log_every "
         f"({_LOG_EVERY.value})"),
        (_METHOD.value == "staged" and _STAGES.value < 1, "--stages must be >= 1"),
        (_METHOD.value == "staged" and _STAGES.value > self.iters,
         f"--stages ({_STAGES.value}) cannot exceed --iters ({self.iters})"),
        (_METHOD.value == "staged" and _PROBE.value < 0, "--probe must be >= 0"),
        (_METHOD.value == "staged" and _FINAL_SHARE.value is not None and
         not 0 < _FINAL_SHARE.value < 1, "--final_share must lie in (0, 1)"),
        ("staged" in _STOP.value and (_METHOD.value != "staged" or not _PROBE.value),
         "--stop staged needs --method staged with --probe > 0"),
        (_SEEDS.value < 1, f"--seeds must be >= 1, got {_SEEDS.value}"),
        (self.width < 1 or self.scales < 1, "--width and --scales must be positive"),
        (not 0 <= _EXP_WEIGHT.value < 1, "--exp_weight must lie in [0, 1)"),
        (_LR.value <= 0, "--lr must be positive"),
        (self.reg_noise_std < 0, "--reg_noise_std must be >= 0"),
        (_CROP.value < 0, "--crop must be >= 0"),
        (_INPUT.value == "ddpm" and _INPUT_T.value is None and self.sigma == 0,
         "--input ddpm needs --input_t when the noise level is unknown (--sigma 0 or --noisy)"),
        (_HALT.value and not _STOP.value, "--halt needs a --stop criterion"),
        (losses.needs_params(_LOSS.value) and not _VGG19.value,
         f"--loss {_LOSS.value} needs --vgg19 (no weights ship with dipjax)"),
        (_WINDOW.value < 1, f"--window must be positive, got {_WINDOW.value}"),
    ]
    if _METHOD.value in DDPM_METHODS:
      m = f"--method {_METHOD.value}"
      checks += [
          (_TASK.value != "denoise", f"{m} denoises only, not --task {_TASK.value}"),
          (not self.sigma and not _NOISY.value, f"{m} needs the noise level: --sigma > 0, or "
           "--noisy (the level is estimated from the observation)"),
          (_NFE.value < 1, f"--nfe must be >= 1, got {_NFE.value}"),
          (_DDPM_SAMPLES.value < 1, f"--ddpm_samples must be >= 1, got {_DDPM_SAMPLES.value}"),
          (not 0 <= _DDPM_ETA.value <= 1, f"--ddpm_eta must lie in [0, 1], got {_DDPM_ETA.value}"),
          (_GUIDE_WEIGHT.value is not None and not 0 <= _GUIDE_WEIGHT.value <= 1,
           f"--guide_weight must lie in [0, 1], got {_GUIDE_WEIGHT.value}"),
          (_METHOD.value == "ddpm" and (_STOP.value or _RESUME.value or _CHECKPOINT_EVERY.value),
           "--method ddpm fits nothing: --stop, --resume and --checkpoint_every do not apply"),
      ]
    for failed, message in checks:
      if failed:
        raise ValueError(message)
    self.criteria = tuple(stopping.get(name) for name in _STOP.value)
    self.log_every = _LOG_EVERY.value
    self.segment = math.gcd(self.log_every, 100)
    self.factor = _FACTOR.value if _TASK.value == "sr" else 1
    self.ddpm = _load_ddpm() if _METHOD.value in DDPM_METHODS else None


def _load_ddpm():
  """(params, UNetConfig) from --ddpm_weights; FileNotFoundError / ValueError if unusable."""
  path = _DDPM_WEIGHTS.value
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no DDPM weights file {path}: run experiments/train_ddpm.py or "
                            "pass --ddpm_weights")
  return ddpm_train.load_weights(path)


def _degrade(s: _Settings):
  """Returns (observation y (h,w,C), clean (H,W,C) or None, operator, padding of y)."""
  image = io.load_image(_IMAGE.value)
  if _CROP.value:
    image = io.center_crop(image, _CROP.value, _CROP.value)
  clean = None
  if _NOISY.value:
    y = image
    if _CLEAN.value:
      clean = io.load_image(_CLEAN.value, channels=y.shape[-1])
      want = (y.shape[0] * s.factor, y.shape[1] * s.factor)
      if clean.shape[:2] != want:
        raise ValueError(f"--clean is {clean.shape[1]}x{clean.shape[0]} but the observation "
                         f"needs {want[1]}x{want[0]}")
  else:
    clean = y = image
  multiple = 2 ** s.scales
  rng = np.random.default_rng(_SEED.value)
  if _TASK.value == "inpaint":
    mask = io.load_image(_MASK.value, channels=1)
    if _CROP.value and mask.shape[:2] != image.shape[:2]:
      mask = io.center_crop(mask, _CROP.value, _CROP.value)
    if mask.shape[:2] != image.shape[:2]:
      raise ValueError(f"mask {_MASK.value} is {mask.shape[1]}x{mask.shape[0]} but the image "
                       f"is {image.shape[1]}x{image.shape[0]}")
    mask = (mask >= 0.5).astype(np.float32)  # as operators.inpainting binarises
    if clean is not None:
      y = clean * mask
    mask, _ = io.pad_to_multiple(mask, multiple, mode="constant")
    op = operators.inpainting(mask)
  elif _TASK.value == "sr":
    op = operators.downsampler(s.factor, _KERNEL.value)
    if not _NOISY.value:
      operators.check_divisible(clean.shape, s.factor)
      y = np.asarray(op(jnp.asarray(clean)))
  else:
    op = operators.identity()
  if not _NOISY.value and s.sigma:
    y = io.add_noise(rng, y, s.sigma / 255)
  y, padding = io.pad_to_multiple(y, max(multiple // s.factor, 1))
  if clean is not None:  # the same frame at the network's resolution
    p = _scaled(padding, s.factor)
    clean = np.pad(clean, ((p.top, p.bottom), (p.left, p.right), (0, 0)), mode="reflect")
  return y.astype(np.float32), clean, op, padding


def _problem(key, s: _Settings, y, clean, op, sigma: float) -> fit.Problem:
  """The fit problem: plain DIP (one for all seeds), or the staged targets (stacked per seed:
  each seed its own probe and stage noise, which then average out over the seeds)."""
  height, width = y.shape[0] * s.factor, y.shape[1] * s.factor
  k_input, k_targets = jax.random.split(key)
  schedule = schedules.get(_SCHEDULE.value)
  if _INPUT.value == "noise":
    net_input = inputs.dip_noise(k_input, height, width, reg_noise_std=s.reg_noise_std)
  elif _INPUT.value == "meshgrid":
    net_input = inputs.meshgrid(height, width, reg_noise_std=s.reg_noise_std)
  else:
    t = _INPUT_T.value
    if t is None:
      t = int(schedules.t_for_sigma(schedule, s.sigma / 255))
    y_full = jax.image.resize(y, (height, width, y.shape[-1]), "bicubic") if s.factor > 1 else y
    net_input = inputs.ddpm_noised(k_input, jnp.asarray(y_full), schedule, t,
                                   fresh=_INPUT_FRESH.value, extra_channels=_INPUT_EXTRA.value,
                                   reg_noise_std=s.reg_noise_std)
  sigma = jnp.asarray(sigma, jnp.float32)
  loss_params = losses.load_vgg19(_VGG19.value) if losses.needs_params(_LOSS.value) else None
  y = jnp.asarray(y)
  clean = None if clean is None else jnp.asarray(clean)
  if _METHOD.value != "staged":
    problem = fit.plain_problem(net_input, y, op, s.iters, clean, sigma)
    return problem.replace(loss_params=loss_params)
  problems = fit.staged_problems(
      k_targets, _SEEDS.value, net_input, y, op, s.iters, schedule=schedule,
      num_stages=_STAGES.value, t_max=_T_MAX.value, sigma=sigma, probe_ratio=_PROBE.value,
      fresh_noise=_FRESH_EPS.value, scaled=_SCALED.value, final_share=_FINAL_SHARE.value,
      clean=clean)
  return problems.replace(loss_params=fit.stack([loss_params] * _SEEDS.value))


def _noise_sigma(s: _Settings, y: np.ndarray) -> float:
  """The observation's noise std in [0, 1] units: the one added, else estimated from y."""
  if s.sigma or not _NOISY.value:
    return s.sigma / 255
  sigma = stopping.estimate_sigma(y)
  logging.info("noise level estimated from the observation: sigma = %.2f (0-255)", 255 * sigma)
  return sigma


def _scaled(padding: io.Padding, factor: int) -> io.Padding:
  """The padding of the observation, at the network's (factor x larger) resolution."""
  return io.Padding(*(factor * p for p in dataclasses.astuple(padding)))


def _write_trace_csv(path: str, trace: dict[str, np.ndarray], segment: int) -> None:
  names = [k for k in trace if not k.startswith("ssim")]
  seeds, n = trace["loss"].shape
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["seed", "iteration"] + names + ["ssim_clean", "ssim_clean_ema"])
    for m in range(seeds):
      for i in range(n):
        seg_end = (i + 1) % segment == 0
        ssim = [f"{trace[k][m, i // segment]:.5f}" if seg_end else "" for k in
                ("ssim_clean", "ssim_clean_ema")]
        w.writerow([m, i + 1] + [f"{trace[k][m, i]:.5g}" for k in names] + ssim)


def _cache_events() -> collections.Counter:
  """Counts JAX's persistent compilation-cache 'hits' and 'misses' from now on."""
  counts = collections.Counter()

  def listener(event: str, **kwargs) -> None:
    del kwargs
    if event in ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"):
      counts[event.rsplit("_", 1)[-1]] += 1

  jax.monitoring.register_event_listener(listener)
  return counts


def _ddpm_stage(s: _Settings, y: np.ndarray, sigma: float,
                x_hat: np.ndarray | None) -> tuple[np.ndarray, dict]:
  """--method's DDPM on the observation y (H, W, C) and, for the hybrids, the DIP estimate
  x_hat (H, W, C), jitted once: (restored (H, W, C), the stage's settings and timings)."""
  params, config = s.ddpm
  schedule = schedules.get(config.schedule, config.num_steps)
  method, nfe = _METHOD.value, _NFE.value
  kw = dict(samples=_DDPM_SAMPLES.value, eta=_DDPM_ETA.value, config=config)
  est = None if x_hat is None else float(ddpm_restore.estimate_dip_error(x_hat, y, sigma))

  def restore(params, key):
    eps = ddpm_unet.eps_fn(config, params)
    if method == "ddpm":
      return ddpm_restore.ddpm_denoise(eps, schedule, y, sigma, nfe, key, **kw)
    if method == "dip_ddpm":
      return ddpm_restore.dip_ddpm(eps, schedule, x_hat, est, nfe, key, **kw)
    return ddpm_restore.dip_guided(eps, schedule, x_hat, y, sigma, nfe, key,
                                   weight=_GUIDE_WEIGHT.value, est_mse=est, **kw)

  key = jax.random.fold_in(jax.random.PRNGKey(_SEED.value), DDPM_STREAM)
  t0 = time.perf_counter()
  compiled = jax.jit(restore).lower(params, key).compile()
  t1 = time.perf_counter()
  restored = np.asarray(compiled(params, key))
  t2 = time.perf_counter()
  t_start = int(ddpm_restore.dip_timestep(schedule, est) if method == "dip_ddpm"
                else ddpm_restore.matched_timestep(schedule, ddpm_restore.observed_sigma(
                    sigma, y.shape[-1], config)))
  logging.info("DDPM (%s): t* = %d, %d evaluations in %.2f s (compiled in %.1f s)", method,
               t_start, nfe, t2 - t1, t1 - t0)
  return restored, dict(
      weights=os.path.abspath(_DDPM_WEIGHTS.value), model=json.loads(config.to_json()),
      t_start=t_start, nfe=nfe, steps=min(nfe, t_start), samples=kw["samples"], eta=kw["eta"],
      sigma=round(255 * sigma, 4), est_mse=est,
      guide_weight=_GUIDE_WEIGHT.value if method == "dip_guided" else None,
      compile_seconds=round(t1 - t0, 2), seconds=round(t2 - t1, 3))


def _run_ddpm(s: _Settings) -> None:
  """--method ddpm: the DDPM alone on the observation, no fit."""
  y, clean, _, padding = _degrade(s)
  y = io.unpad(y, padding)
  ddpm_restore.check_channels(s.ddpm[1], y.shape[-1])
  restored, info = _ddpm_stage(s, y, _ddpm_sigma(s, y), None)
  out_dir = _OUT_DIR.value
  os.makedirs(out_dir, exist_ok=True)
  io.save_image(os.path.join(out_dir, "restored.png"), restored)
  io.save_image(os.path.join(out_dir, "degraded.png"), y)
  np.save(os.path.join(out_dir, "degraded.npy"), y)
  result = dict(image=os.path.abspath(_IMAGE.value), task=_TASK.value, method="ddpm",
                sigma=s.sigma, device=jax.default_backend(), ddpm=info)
  if clean is not None:
    truth = io.unpad(clean, padding)
    info.update(_score(restored, truth))
    result.update(restored=_score(restored, truth), degraded=_score(y, truth))
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(result, f, indent=2)
  summary = result.get("restored", {})
  logging.info("wrote %s: %s", out_dir, ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
  print(json.dumps({k: info[k] for k in ("t_start", "nfe", "compile_seconds", "seconds")}
                   | summary))


def _score(x: np.ndarray, truth: np.ndarray) -> dict[str, float]:
  return dict(psnr=float(metrics.psnr(x, truth)), ssim=float(metrics.ssim(x, truth)))


def _ddpm_sigma(s: _Settings, y: np.ndarray) -> float:
  """The noise level for the DDPM methods (:func:`_noise_sigma`); ValueError if it is 0."""
  sigma = _noise_sigma(s, y)
  if sigma <= 0:
    raise ValueError(f"--method {_METHOD.value} needs the noise level, but none was given and "
                     "the estimate from the observation is 0: pass --sigma")
  return sigma


def run(s: _Settings) -> None:
  if _METHOD.value == "ddpm":
    return _run_ddpm(s)
  cache = _cache_events()
  out_dir = _OUT_DIR.value
  ckpt_dir = os.path.join(os.path.abspath(out_dir), "checkpoints")
  y, clean, op, padding = _degrade(s)
  if s.ddpm is not None:
    ddpm_restore.check_channels(s.ddpm[1], y.shape[-1])
  sigma = _ddpm_sigma(s, y) if s.ddpm is not None else _noise_sigma(s, y)
  net = nets.make(s.net_name, s.width, s.scales, out_channels=y.shape[-1],
                  dtype=jnp.dtype(_DTYPE.value))
  config = fit.FitConfig(
      learning_rate=_LR.value, exp_weight=_EXP_WEIGHT.value, segment=s.segment,
      window=_WINDOW.value if "es_wmv" in _STOP.value else 0, criteria=s.criteria,
      halt=s.criteria[0] if _HALT.value else None, loss=_LOSS.value)
  key = jax.random.PRNGKey(_SEED.value)
  k_problem, k_fits = jax.random.split(key)
  problem = _problem(k_problem, s, y, clean, op, sigma)
  shared = _METHOD.value != "staged"
  ends = np.asarray(problem.ends if shared else problem.ends[0])
  states = fit.init_many(jax.random.split(k_fits, _SEEDS.value), net, problem, config,
                         shared=shared)
  n_seg = s.iters // s.segment
  trace = {f.name: np.full((_SEEDS.value, n_seg if f.name.startswith("ssim") else s.iters),
                           np.nan, np.float32) for f in dataclasses.fields(fit.Trace)}
  if _RESUME.value:
    step = checkpoint.latest_step(ckpt_dir)
    if step is None:
      raise ValueError(f"--resume: no checkpoint in {ckpt_dir}")
    restored = checkpoint.restore(ckpt_dir, {"state": states, "trace": trace})
    states, trace = restored["state"], {k: np.asarray(v) for k, v in restored["trace"].items()}
    logging.info("resumed from iteration %d of %d", step, s.iters)
  start = int(states.step[0])

  t0 = time.perf_counter()
  run_chunk = fit.compile_many(states, problem, s.log_every, net=net, config=config,
                               shared=shared)
  compile_s = time.perf_counter() - t0
  logging.info("compiled in %.1f s (%s, %dx%d, %d seed(s), %s width %d; persistent cache: "
               "%d hits, %d misses)", compile_s, jax.default_backend(), y.shape[1] * s.factor,
               y.shape[0] * s.factor, _SEEDS.value, s.net_name, s.width, cache["hits"],
               cache["misses"])
  t_fit = time.perf_counter()
  for done in range(start + s.log_every, s.iters + 1, s.log_every):
    states, chunk = run_chunk(states, problem)
    lo, seg_lo = done - s.log_every, (done - s.log_every) // s.segment
    for k, v in vars(chunk).items():
      v = np.asarray(v)
      if k.startswith("ssim"):
        trace[k][:, seg_lo:seg_lo + v.shape[1]] = v
      else:
        trace[k][:, lo:done] = v
    elapsed = time.perf_counter() - t_fit
    rate = (done - start) / elapsed
    shown = "psnr_clean_ema" if clean is not None else "psnr_obs_ema"
    logging.info("iteration %d/%d  %.2f it/s  ETA %.0f s  %s %.2f dB  loss %.5f", done, s.iters,
                 rate, (s.iters - done) / rate, shown, np.mean(trace[shown][:, done - 1]),
                 np.mean(trace["loss"][:, done - 1]))
    if _CHECKPOINT_EVERY.value and done % _CHECKPOINT_EVERY.value == 0:
      checkpoint.save(ckpt_dir, done, {"state": states, "trace": trace})
    if config.halt is not None and bool(np.all(np.asarray(states.monitors.fired[:, 0]))):
      logging.info("%s fired for every seed: halted at iteration %d", config.halt.name, done)
      break
  fit_s = time.perf_counter() - t_fit
  ran = int(states.step[0]) - start
  _write_outputs(s, out_dir, states, config, trace, y, clean, padding, ends, compile_s, fit_s, ran,
                 sigma)


def _write_outputs(s, out_dir, states, config, trace, y, clean, padding, ends, compile_s, fit_s,
                   ran, sigma):
  os.makedirs(out_dir, exist_ok=True)
  unpad = lambda x: io.unpad(x, _scaled(padding, s.factor))
  stops = {name: (np.asarray(step), [unpad(x) for x in np.asarray(kept)])
           for name, (step, kept) in fit.stops(states, config).items()}
  final_ema = [unpad(x) for x in np.asarray(states.ema)]
  restored = np.mean(stops[s.criteria[0].name][1] if s.criteria else final_ema, axis=0)
  dip_restored, ddpm_info = restored, None
  if s.ddpm is not None:
    restored, ddpm_info = _ddpm_stage(s, io.unpad(y, padding), sigma, dip_restored)
  io.save_image(os.path.join(out_dir, "restored.png"), restored)
  io.save_image(os.path.join(out_dir, "degraded.png"), io.unpad(y, padding))
  np.save(os.path.join(out_dir, "degraded.npy"), io.unpad(y, padding))  # exact, for baselines
  result = dict(
      image=os.path.abspath(_IMAGE.value), task=_TASK.value, method=_METHOD.value,
      sigma=s.sigma, net=s.net_name, width=s.width, scales=s.scales, iterations=s.iters,
      seeds=_SEEDS.value, stage_ends=[int(e) for e in ends], loss=_LOSS.value,
      device=jax.default_backend(),
      compile_seconds=round(compile_s, 2), fit_seconds=round(fit_s, 2),
      iterations_per_second=round(ran / fit_s, 3) if fit_s > 0 else None,
      rolled_back=int(np.nansum(trace["rolled_back"])),
      restored_at=s.criteria[0].name if s.criteria else "last iteration")
  if clean is not None:
    truth = io.unpad(clean, _scaled(padding, s.factor))
    score = lambda x: dict(psnr=float(metrics.psnr(x, truth)), ssim=float(metrics.ssim(x, truth)))
    final_out = [unpad(x) for x in np.asarray(states.out)]
    result["per_seed"] = [dict(output=score(o), ema=score(e))
                          for o, e in zip(final_out, final_ema)]
    result["restored"] = score(restored)
    if ddpm_info is not None:
      ddpm_info.update(score(restored))
      result["dip"] = score(dip_restored)
    if _TASK.value == "denoise" or s.factor == 1:
      result["degraded"] = score(io.unpad(y, padding))
  if ddpm_info is not None:
    result["ddpm"] = ddpm_info
  result["stops"] = {
      name: dict(iteration=[int(i) + 1 for i in steps],
                 **({"per_seed": [score(x) for x in kept], "mean_of_seeds": score(
                     np.mean(kept, axis=0))} if clean is not None else {}))
      for name, (steps, kept) in stops.items()}
  for name, (steps, _) in stops.items():
    logging.info("%s stops at iteration %s", name, ", ".join(str(int(i) + 1) for i in steps))
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(result, f, indent=2)
  _write_trace_csv(os.path.join(out_dir, "trace.csv"), trace, s.segment)
  curves = {}
  for m in range(_SEEDS.value):
    tag = f" (seed {m})" if _SEEDS.value > 1 else ""
    if clean is not None:
      curves["output vs clean" + tag] = trace["psnr_clean"][m]
      curves["EMA vs clean" + tag] = trace["psnr_clean_ema"][m]
    curves["output vs observation" + tag] = trace["psnr_obs"][m]
    est = trace["mse_est_ema"][m]
    if np.isfinite(est).any():
      curves["EMA vs clean, estimated (staged probe)" + tag] = np.where(
          est > 0, -10 * np.log10(np.where(est > 0, est, 1.0)), np.nan)
  plots.psnr_curves(os.path.join(out_dir, "psnr.png"), curves, ends if len(ends) > 1 else None,
                    title=f"{_TASK.value}, {_METHOD.value}, {os.path.basename(_IMAGE.value)}")
  summary = result.get("restored", {})
  logging.info("wrote %s: %s", out_dir, ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
  print(json.dumps({k: result[k] for k in ("compile_seconds", "fit_seconds",
                                           "iterations_per_second")} | summary))


def main(argv):
  cli.start(argv, __file__)
  with cli.errors("restore.py"):
    run(_Settings())


if __name__ == "__main__":
  app.run(main)
