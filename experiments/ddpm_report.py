r"""The DDPM report of issue 10: dipjax's own DDPM for denoising, alone and after DIP, against DIP
and BM3D, on the CPU protocol of experiments/stopping_report.sh; and the generation question.

  python experiments/ddpm_report.py --weights=assets/ddpm_colour.npz --out_dir=runs/ddpm_report
  python experiments/ddpm_report.py --out_dir=runs/ddpm_report --summary
  python experiments/ddpm_report.py --quick --out_dir=runs/ddpm_quick   # 2 images, few settings

Protocol: 128x128 centre crops of ../shared/data/CSet9 and Set12 (``common.load_clean``), the
noise of ``common.noisy_image`` (seeded by the file name, sigma and --noise_seed; clipped), so
every method sees the noisy inputs of the stopping report; the DIP fits as ``fits.setup`` builds
them for grid.py (skip net, width 32, 5 scales, Adam 0.01, jitter 1/30, EMA 0.99), one seed. For
each image and sigma, rows of these kinds:

  ddpm        the DDPM alone (``ddpm_denoise``) for each of --nfes: t*, PSNR/SSIM, seconds.
  dip         one DIP fit to max(--dip_iters): its EMA output at each of --dip_iters (PSNR/SSIM,
              seconds, the discrepancy estimate of its error against the true one) and at the
              oracle / discrepancy / ES-WMV stops.
  dip_ddpm,   the DDPM on that fit's EMA output at each of --dip_iters, for each of --dip_nfes:
  dip_guided  ``dip_ddpm`` (t' from the discrepancy estimate) and ``dip_guided``.
  bm3d        (C)BM3D, when the bm3d package is installed.
  gen         on the first --gen_images images at the first sigma: DDIM from pure noise (t = T)
              and from the DIP output at max(--dip_iters) forward-noised to each of --gen_t, for
              each of --gen_nfes and --gen_ref_nfe steps; PSNR to that reference (same start,
              most steps) and to the clean image.

Rows go to <out_dir>/rows.jsonl as they finish, keyed by the sha1 of their config (which
includes the weights file's digest): a killed run resumes and never repeats a row. A second
model may add its rows to the same <out_dir> (e.g. a grey model on Set12:
``--weights=<grey.npz> --sets=<Set12> --hybrids= --gen_images=0``): the DIP and BM3D rows are
shared, and the tables and curves show each model's rows apart. Images and DIP checkpoints go
to common.arrays_dir(<out_dir>/rows.jsonl)/<key>.npz (for docs/results/ddpm/report:
runs/arrays/ddpm/report/rows/, git-ignored). Every run ends by writing <out_dir>/summary.md
and <out_dir>/figures/ from all the rows so far (--summary: only that, no weights needed):
tables per sigma and set, PSNR against NFE and against wall time, the generation table (steps
to reach --gen_psnr dB to the reference) and an image grid. Times are seconds per image on this
machine, compiles excluded (reported apart).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import hashlib
import importlib.util
import itertools
import math
import os
import shlex
import sys
import time
import zlib
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import cli
import common
import fits
import grid_spec
from dipjax import io
from dipjax import metrics
from dipjax import pipeline
from dipjax import schedules
from dipjax.ddpm import solvers as ddpm_solvers
from dipjax.ddpm import train as ddpm_train
from dipjax.ddpm import unet as ddpm_unet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
HYBRIDS = ("dip_ddpm", "dip_guided")
CRITERIA = ("oracle", "discrepancy", "es_wmv")
# The DIP fit settings of experiments/grid.py (and so of the stopping report), as its defaults.
PROTOCOL = {f.name: f.default for f in dataclasses.fields(grid_spec.GridSpec)
            if f.default is not dataclasses.MISSING}
QUICK = dict(images_per_set=1, nfes=["1", "5", "20"], dip_iters=["100", "300"],
             dip_nfes=["1", "5"], gen_images=1, gen_t=["100", "250"], gen_nfes=["1", "5"],
             gen_ref_nfe=20)

_WEIGHTS = flags.DEFINE_string("weights", os.path.join(REPO, "assets", "ddpm_colour.npz"),
                               "DDPM weights (.npz of experiments/train_ddpm.py).")
_SETS = flags.DEFINE_list("sets", [os.path.join(DATA, "CSet9"), os.path.join(DATA, "Set12")],
                          "Image folders (their sorted images) or files.")
_IMAGES_PER_SET = flags.DEFINE_integer("images_per_set", 0, "First images of each --sets "
                                       "entry (0: all).")
_SIZE = flags.DEFINE_integer("size", 128, "Centre crop side (0: whole images).")
_NOISE_LEVELS = flags.DEFINE_list("noise_levels", ["25", "50"], "Noise std, 0-255 units.")
_NFES = flags.DEFINE_list("nfes", ["1", "2", "5", "10", "20", "50"], "NFEs of the DDPM alone.")
_DIP_ITERS = flags.DEFINE_list("dip_iters", ["100", "300", "1000"], "DIP iterations after "
                               "which the DDPM refines the fit (one fit to the largest; empty: "
                               "no DIP fit, with --hybrids= --gen_images=0).")
_DIP_NFES = flags.DEFINE_list("dip_nfes", ["1", "5", "20"], "NFEs of the DDPM after DIP.")
_HYBRIDS = flags.DEFINE_list("hybrids", list(HYBRIDS), "DIP + DDPM methods.")
_GUIDE_WEIGHT = flags.DEFINE_float("guide_weight", None, "dip_guided's constant weight "
                                   "(default: the inverse-variance weights).")
_DIP_WIDTH = flags.DEFINE_integer("dip_width", PROTOCOL["widths"][0], "DIP skip net width.")
_DIP_SCALES = flags.DEFINE_integer("dip_scales", PROTOCOL["scales"], "DIP skip net scales.")
_NOISE_SEED = flags.DEFINE_integer("noise_seed", PROTOCOL["noise_seed"], "Seed of the noise "
                                    "added to every image (grid.py's --noise_seed).")
_GEN_IMAGES = flags.DEFINE_integer("gen_images", 2, "Images of the generation question.")
_GEN_T = flags.DEFINE_list("gen_t", ["100", "250", "500"], "Timesteps of the DIP starts.")
_GEN_NFES = flags.DEFINE_list("gen_nfes", ["1", "2", "5", "10", "20", "50"],
                              "NFEs of the generation question.")
_GEN_REF_NFE = flags.DEFINE_integer("gen_ref_nfe", 200, "NFE of the generation reference.")
_GEN_PSNR = flags.DEFINE_float("gen_psnr", 30.0, "--summary: PSNR to the reference (dB) a start "
                               "must reach.")
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/ddpm_report", "Rows, arrays, summary.")
_QUICK = flags.DEFINE_bool("quick", False, "Fewer settings (flags given still win): "
                           + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
_SUMMARY = flags.DEFINE_bool("summary", False, "Only write the summary from the rows so far.")


@dataclasses.dataclass(frozen=True)
class ReportSpec:
  """The report's settings (the flags, parsed); validated on construction."""
  images: tuple[str, ...]
  size: int = 128
  sigmas: tuple[float, ...] = (25.0, 50.0)
  nfes: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
  dip_iters: tuple[int, ...] = (100, 300, 1000)  # empty: no DIP fit
  dip_nfes: tuple[int, ...] = (1, 5, 20)
  hybrids: tuple[str, ...] = HYBRIDS
  guide_weight: float | None = None
  dip_width: int = 32
  dip_scales: int = 5
  gen_images: int = 2
  gen_t: tuple[int, ...] = (100, 250, 500)
  gen_nfes: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
  gen_ref_nfe: int = 200
  noise_seed: int = 0

  def __post_init__(self):
    lists = dict(images=self.images, noise_levels=self.sigmas, nfes=self.nfes,
                 dip_nfes=self.dip_nfes, gen_t=self.gen_t, gen_nfes=self.gen_nfes)
    for name, values in lists.items():
      if not values:
        raise ValueError(f"--{name} is empty")
    if not self.dip_iters and (self.hybrids or self.gen_images):
      raise ValueError("--dip_iters= (no DIP fit) needs --hybrids= and --gen_images=0")
    unknown = [h for h in self.hybrids if h not in HYBRIDS]
    counts = [*self.nfes, *self.dip_nfes, *self.gen_nfes, self.gen_ref_nfe, *self.dip_iters,
              *self.gen_t]
    checks = [
        (unknown, f"--hybrids: unknown {unknown}; valid: {', '.join(HYBRIDS)}"),
        (min(self.sigmas) <= 0, f"--noise_levels must be positive, got {self.sigmas}"),
        (min(counts) < 1, "--nfes, --dip_nfes, --gen_nfes, --gen_ref_nfe, --dip_iters and "
         "--gen_t must be positive"),
        (self.size < 0, f"--size must be >= 0, got {self.size}"),
        (self.dip_width < 1 or self.dip_scales < 1, "--dip_width and --dip_scales must be "
         "positive"),
        (self.gen_images < 0, f"--gen_images must be >= 0, got {self.gen_images}"),
        (self.guide_weight is not None and not 0 <= self.guide_weight <= 1,
         f"--guide_weight must lie in [0, 1], got {self.guide_weight}"),
    ]
    for failed, message in checks:
      if failed:
        raise ValueError(message)

  @property
  def dip_total(self) -> int:
    return max(self.dip_iters)

  @property
  def chunk(self) -> int:
    """Iterations per compiled DIP call: every checkpoint is a chunk boundary."""
    return math.gcd(*self.dip_iters, fits.CHUNK_ITERS)


def _flag(name: str) -> Any:
  """A flag's value, with --quick's default where --quick is on and the flag not given."""
  flag = flags.FLAGS[name]
  return QUICK[name] if _QUICK.value and name in QUICK and not flag.present else flag.value


def _numbers(name: str, kind: type = int) -> tuple:
  """A list flag (with --quick's default) as numbers, with a one-line error naming it."""
  return common.parse_list(name, _flag(name), kind)


def spec_from_flags() -> ReportSpec:
  per_set = _flag("images_per_set")
  images = []
  for entry in _SETS.value:
    found = common.expand_images([entry])
    images += found[:per_set] if per_set else found
  return ReportSpec(
      images=tuple(images), size=_SIZE.value,
      sigmas=_numbers("noise_levels", float), nfes=_numbers("nfes"),
      dip_iters=tuple(sorted(set(_numbers("dip_iters")))), dip_nfes=_numbers("dip_nfes"),
      hybrids=tuple(_HYBRIDS.value), guide_weight=_GUIDE_WEIGHT.value,
      dip_width=_DIP_WIDTH.value, dip_scales=_DIP_SCALES.value,
      gen_images=_flag("gen_images"), gen_t=_numbers("gen_t"), gen_nfes=_numbers("gen_nfes"),
      gen_ref_nfe=_flag("gen_ref_nfe"), noise_seed=_NOISE_SEED.value)


# ----------------------------------------------------------------------------- the DDPM


def load_model(path: str) -> tuple[Any, ddpm_unet.UNetConfig, str]:
  """(params, config, the file's sha1 digest, 12 hex digits) of a weights file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no DDPM weights file {path}: run experiments/train_ddpm.py or "
                            "pass --weights")
  params, config = ddpm_train.load_weights(path)
  with open(path, "rb") as f:
    digest = hashlib.sha1(f.read()).hexdigest()[:12]
  return params, config, digest


class Sampler:
  """The DDPM restorations of :mod:`dipjax.ddpm.solvers` with the weights as an argument,
  compiled once per (function, NFE, input shapes) and timed apart from their compile. Keeps the
  `keep` most recently used executables (XLA:CPU's memory-mapping limit, as fits.Compiler)."""

  def __init__(self, params: Any, config: ddpm_unet.UNetConfig, guide_weight: float | None,
               keep: int = 16):
    self.params, self.config = params, config
    self.schedule = schedules.get(config.schedule, config.num_steps)
    eps = functools.partial(ddpm_unet.eps_fn, config)
    s = self.schedule
    self._fns = dict(
        ddpm=lambda p, y, sigma, key, *, nfe: ddpm_solvers.ddpm_denoise(
            eps(p), s, y, sigma, nfe, key, config=config),
        sdedit=lambda p, x, t, key, *, nfe: ddpm_solvers.sdedit(
            eps(p), s, x, t, nfe, key, config=config),
        dip_guided=lambda p, x, y, sigma, est, key, *, nfe: ddpm_solvers.dip_guided(
            eps(p), s, x, y, sigma, nfe, key, weight=guide_weight, est_mse=est, config=config))
    self._compiled = collections.OrderedDict()
    self._keep = keep

  def __call__(self, name: str, nfe: int, *args) -> tuple[np.ndarray, float, float]:
    """Runs function `name` with nfe on args: (output (H, W, C), compile s (and a first, untimed
    run; 0 when reused), sampling s)."""
    args = tuple(jnp.asarray(a) for a in args)
    signature = (name, nfe) + tuple((a.shape, str(a.dtype)) for a in args)
    t0 = time.perf_counter()
    if signature in self._compiled:
      self._compiled.move_to_end(signature)
    else:
      if len(self._compiled) >= self._keep:
        self._compiled.popitem(last=False)
      fn = functools.partial(self._fns[name], nfe=nfe)
      self._compiled[signature] = jax.jit(fn).lower(self.params, *args).compile()
      jax.block_until_ready(self._compiled[signature](self.params, *args))  # a warm-up run
    t1 = time.perf_counter()
    out = np.asarray(jax.block_until_ready(self._compiled[signature](self.params, *args)))
    return out, t1 - t0, time.perf_counter() - t1


# ----------------------------------------------------------------------------- rows


def _quality(x: np.ndarray, clean: np.ndarray) -> dict[str, float]:
  return dict(psnr=round(float(metrics.psnr(x, clean)), 4),
              ssim=round(float(metrics.ssim(x, clean)), 5))


def _dip_config(base: dict, spec: ReportSpec) -> dict:
  """The DIP fit as fits.setup takes it: plain DIP, one seed, grid.py's settings."""
  return dict(base, method="dip", scales=spec.dip_scales, seeds=1, seed_base=0,
              iters=spec.dip_total, lr=PROTOCOL["lr"], reg_noise_std=PROTOCOL["reg_noise_std"],
              exp_weight=PROTOCOL["exp_weight"], window=PROTOCOL["window"],
              criteria=list(CRITERIA), net="skip", width=spec.dip_width,
              checkpoints=list(spec.dip_iters))


class Report:
  """Runs the rows of a spec not yet in <out_dir>/rows.jsonl, appending each as it finishes."""

  def __init__(self, spec: ReportSpec, out_dir: str, weights: str, argv: str = ""):
    self.spec, self.out_dir, self.argv = spec, out_dir, argv
    params, config, self.digest = load_model(weights)
    for path in spec.images:  # fail before any work, not at the first grey / colour image
      ddpm_solvers.check_channels(config, io.load_image(path).shape[-1])
    self.sampler = Sampler(params, config, spec.guide_weight)
    self.compiler = fits.Compiler()
    self.bm3d = importlib.util.find_spec("bm3d") is not None
    if not self.bm3d:
      logging.warning("the bm3d package is not installed: no BM3D rows")
    self._results, self._rows, self.added = None, {}, 0

  def run(self) -> int:
    """Runs every pending row; returns how many were added."""
    spec = self.spec
    with common.Results(os.path.join(self.out_dir, "rows.jsonl")) as results:
      self._results, self._rows = results, {row["key"]: row for row in results.rows}
      for index, path in enumerate(spec.images):
        clean = common.load_clean(path, spec.size)
        for sigma in spec.sigmas:
          self._image(path, clean, sigma,
                      gen=index < spec.gen_images and sigma == spec.sigmas[0])
    return self.added

  def _arrays(self, key: str) -> str:
    return _arrays_of(self.out_dir, dict(key=key))

  def _emit(self, config: dict, make: Callable[[], tuple[dict, dict]]) -> dict:
    """The row of `config`: the one already done, else make() -> (fields, arrays), appended."""
    key = common.row_key(config)
    if key in self._rows:
      return self._rows[key]
    t0 = time.perf_counter()
    fields, arrays = make()
    common.save_arrays(self._arrays(key), arrays)
    row = dict(key=key, kind=config["kind"], config=config, **fields,
               device=dict(backend=jax.default_backend(), kind=jax.devices()[0].device_kind),
               wall_s=round(time.perf_counter() - t0, 2), argv=self.argv,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    self._results.append(row)
    self._rows[key] = row
    self.added += 1
    shown = {k: fields[k] for k in ("psnr", "t_start", "seconds") if k in fields}
    logging.info("%s %s sigma=%g%s: %s", config["kind"], config["image"], config["sigma"],
                 f" NFE {config['nfe']}" if "nfe" in config else "", shown)
    return row

  def _sample(self, name: str, nfe: int, *args, clean: np.ndarray, t_start: int,
              **extra) -> tuple[dict, dict]:
    """A DDPM row: (fields: PSNR/SSIM, timings, t_start, the steps taken, `extra`; arrays: the
    output as uint8 and as float32 'output_float')."""
    out, compile_s, seconds = self.sampler(name, nfe, *args)
    return dict(_quality(out, clean), seconds=round(seconds, 4), compile_s=round(compile_s, 2),
                t_start=t_start, steps=min(nfe, t_start),
                model_channels=self.sampler.config.image_channels, **extra), dict(
                    output=common.uint8(out), output_float=out)

  def _sample_uint8(self, *args, **kwargs) -> tuple[dict, dict]:
    """:meth:`_sample` keeping the output as uint8 only (what the figures need)."""
    fields, arrays = self._sample(*args, **kwargs)
    return fields, dict(output=arrays["output"])

  def _sdedit(self, image: np.ndarray, t: int, key: jax.Array, clean: np.ndarray,
              nfe: int) -> tuple[dict, dict]:
    """:meth:`_sample` of ``sdedit`` from `image` noised to t."""
    return self._sample("sdedit", nfe, image, t, key, clean=clean, t_start=t)

  def _image(self, path: str, clean: np.ndarray, sigma: float, gen: bool) -> None:
    """Every row of one image at one noise level."""
    spec, schedule = self.spec, self.sampler.schedule
    base = dict(image=os.path.basename(path),
                set=os.path.basename(os.path.dirname(os.path.abspath(path))), crop=spec.size,
                sigma=float(sigma), noise_seed=spec.noise_seed)
    noisy = common.noisy_image(clean, base["image"], sigma, spec.noise_seed)
    s = sigma / 255
    key = jax.random.fold_in(jax.random.PRNGKey(spec.noise_seed),
                             zlib.crc32(base["image"].encode()))
    model = dict(base, model=self.digest)
    t_star = int(ddpm_solvers.matched_timestep(schedule, ddpm_solvers.observed_sigma(
        s, noisy.shape[-1], self.sampler.config)))
    for nfe in spec.nfes:
      self._emit(dict(model, kind="ddpm", nfe=nfe), functools.partial(
          self._sample_uint8, "ddpm", nfe, noisy, s, key, clean=clean, t_start=t_star,
          noisy=_quality(noisy, clean)))

    if self.bm3d:
      def bm3d():
        t0 = time.perf_counter()
        out = common.bm3d_denoise(noisy, s)
        return dict(_quality(out, clean), seconds=round(time.perf_counter() - t0, 3)), dict(
            output=common.uint8(out))
      self._emit(dict(base, kind="bm3d"), bm3d)

    if not spec.dip_iters:  # the DDPM and BM3D only
      return
    dip_config = dict(_dip_config(base, spec), kind="dip")
    dip = self._emit(dip_config, lambda: self._fit(dip_config, clean, noisy))
    with np.load(self._arrays(dip["key"])) as z:
      emas = {k: z[f"ema_{k}"] for k in spec.dip_iters}
    for k, x_hat in emas.items():
      est = dip["checkpoints"][str(k)]["est_mse"]
      t_prime = int(ddpm_solvers.dip_timestep(schedule, est))
      extra = dict(est_mse=est, dip_seconds=dip["checkpoints"][str(k)]["seconds"])
      at = dict(model, dip=dip["key"], dip_iters=k)
      for nfe in spec.dip_nfes:
        if "dip_ddpm" in spec.hybrids:
          self._emit(dict(at, kind="dip_ddpm", nfe=nfe), functools.partial(
              self._sample_uint8, "sdedit", nfe, x_hat, t_prime, key, clean=clean,
              t_start=t_prime, **extra))
        if "dip_guided" in spec.hybrids:
          self._emit(dict(at, kind="dip_guided", nfe=nfe, guide_weight=spec.guide_weight),
                     functools.partial(self._sample_uint8, "dip_guided", nfe, x_hat, noisy, s,
                                       est, key, clean=clean, t_start=t_star, **extra))
    if gen:
      self._generation(model, clean, emas[spec.dip_total], key, dip["key"])

  def _fit(self, config: dict, clean: np.ndarray, noisy: np.ndarray) -> tuple[dict, dict]:
    """One DIP fit in chunks, its EMA output kept at every checkpoint: (row fields, arrays)."""
    spec = self.spec
    run, _ = fits.setup(config, clean, noisy, chunk=spec.chunk)
    run.compile(self.compiler)
    sigma, checkpoints, arrays = config["sigma"] / 255, {}, {}

    def keep(fitted: pipeline.FitRun) -> None:
      if fitted.done in spec.dip_iters:
        ema = fitted.frame.unpad(np.asarray(fitted.states.ema[0]))
        arrays[f"ema_{fitted.done}"] = ema
        checkpoints[str(fitted.done)] = dict(
            _quality(ema, clean), seconds=round(fitted.fit_seconds, 3),
            est_mse=float(ddpm_solvers.estimate_dip_error(ema, noisy, sigma)),
            mse=float(np.mean((ema - clean) ** 2)))

    run.fit(on_chunk=keep)
    final, stops = run.frame.unpad(np.asarray(run.states.ema[0])), {}
    for name, (iteration, image) in run.stops().items():
      missing = iteration[0] == 0  # its score was never defined (ES-WMV before its window)
      image = final if missing else image[0]
      stops[name] = dict(_quality(image, clean), no_stop=bool(missing),
                         iteration=spec.dip_total if missing else int(iteration[0]))
      arrays[f"stop_{name}"] = common.uint8(image)
    arrays["curve"] = run.trace["psnr_clean_ema"][0]
    return dict(checkpoints=checkpoints, stops=stops, compile_s=round(run.compile_seconds, 2),
                seconds=round(run.fit_seconds, 3), noisy=_quality(noisy, clean)), arrays

  def _generation(self, model: dict, clean: np.ndarray, x_hat: np.ndarray, key: jax.Array,
                  dip_key: str) -> None:
    """Samples from pure noise and from the DIP output noised to each of --gen_t, every NFE
    against the --gen_ref_nfe reference from the same start (same key: same noise)."""
    spec, T = self.spec, self.sampler.schedule.num_steps
    starts = [("noise", T, np.full_like(x_hat, 0.5))]  # 0.5 is 0 in the model's units
    starts += [("dip", t, x_hat) for t in spec.gen_t if t < T]
    for start, t, image in starts:
      config = dict(model, kind="gen", start=start, t_start=t, nfe=spec.gen_ref_nfe,
                    **({"dip": dip_key} if start == "dip" else {}))
      sample = functools.partial(self._sdedit, image, t, key, clean)

      def reference(sample=sample, start_image=common.uint8(image if start == "dip" else clean)):
        fields, arrays = sample(spec.gen_ref_nfe)
        return fields, dict(arrays, start=start_image)  # start: the grid's first column

      with np.load(self._arrays(self._emit(config, reference)["key"])) as z:
        ref = z["output_float"]

      def versus(nfe, sample=sample, ref=ref):
        fields, arrays = sample(nfe)
        return dict(fields, reference=_quality(arrays["output_float"], ref)), dict(
            output=arrays["output"])

      for nfe in spec.gen_nfes:
        if nfe != spec.gen_ref_nfe:
          self._emit(dict(config, nfe=nfe, reference_nfe=spec.gen_ref_nfe),
                     functools.partial(versus, nfe))


# ----------------------------------------------------------------------------- summary


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _mean(values: list[float]) -> float:
  return float(np.mean(values)) if values else math.nan


def _cell(rows: list[dict], timed: bool = False) -> str:
  """'PSNR / SSIM' (and seconds) averaged over rows with 'psnr', 'ssim', 'seconds'."""
  if not rows:
    return "–"
  text = f"{_mean([r['psnr'] for r in rows]):.2f} / {_mean([r['ssim'] for r in rows]):.3f}"
  return text + (f" ({_mean([r['seconds'] for r in rows]):.2f} s)" if timed else "")


class Rows:
  """The report's rows grouped for the tables: select(kind, **config values)."""

  def __init__(self, rows: list[dict]):
    self.rows = rows
    self._channels = {r["config"]["model"]: r.get("model_channels") for r in rows
                      if "model" in r["config"]}  # digest -> the model's image channels

  def select(self, kind: str, **where) -> list[dict]:
    return [r for r in self.rows if r["kind"] == kind
            and all(r["config"].get(k) == v for k, v in where.items())]

  def images(self, **where) -> int:
    """The number of images with rows (of any kind) of these config values."""
    return len({r["config"]["image"] for r in self.rows
                if all(r["config"].get(k) == v for k, v in where.items())})

  def values(self, kind: str, field: str, **where) -> list:
    return sorted({r["config"][field] for r in self.select(kind, **where)
                   if r["config"].get(field) is not None})

  def models(self, kind: str, **where) -> list[tuple[str, str]]:
    """(digest, label) of the models with rows of `kind`; the label is empty when the whole
    report holds one model, else its channel count and digest (e.g. a grey model beside the
    colour one on a grey set)."""
    channels = self._channels
    label = lambda d: "" if len(channels) < 2 else (
        f"{channels[d]}-channel model {d[:6]}" if channels[d] else f"model {d[:6]}")
    return [(d, label(d)) for d in self.values(kind, "model", **where)]


def _dip_at(rows: list[dict], k: int) -> list[dict]:
  return [dict(r["checkpoints"][str(k)]) for r in rows if str(k) in r["checkpoints"]]


def _dip_stop(rows: list[dict], name: str) -> list[dict]:
  return [dict(r["stops"][name], seconds=r["seconds"]) for r in rows if name in r["stops"]]


def _total(rows: list[dict]) -> list[dict]:
  """Hybrid rows with seconds = DIP seconds + DDPM seconds."""
  return [dict(r, seconds=r["seconds"] + r["dip_seconds"]) for r in rows]


def _ddpm_table(data: Rows, here: dict) -> list[str]:
  """The DDPM alone at `here` (sigma, set): per model and NFE, t*, PSNR / SSIM, seconds."""
  ddpm, models = [], data.models("ddpm", **here)
  for model, label in models:
    for nfe in data.values("ddpm", "nfe", model=model, **here):
      rows = data.select("ddpm", nfe=nfe, model=model, **here)
      ddpm.append([label] * bool(label) + [
          str(nfe), str(rows[0]["t_start"]), _cell(rows),
          f"{_mean([r['seconds'] for r in rows]):.3f}"])
  if not ddpm:
    return []
  header = ["model"] * any(label for _, label in models) + [
      "NFE", "t*", "PSNR / SSIM", "s / image"]
  return ["DDPM alone (DDIM from t* matched to σ), mean over images:", "",
          common.md_table(header, ddpm), ""]


def _hybrid_table(data: Rows, here: dict) -> list[str]:
  """DIP -> DDPM at `here`: per DIP budget, DIP alone, its error estimate, and each hybrid."""
  dips = data.select("dip", **here)
  nfes = sorted(set(data.values("dip_ddpm", "nfe", **here))
                | set(data.values("dip_guided", "nfe", **here)))
  hybrid_models = sorted(set(data.models("dip_ddpm", **here))
                         | set(data.models("dip_guided", **here)))
  body = []
  for k in data.values("dip_ddpm", "dip_iters", **here) or data.values(
      "dip_guided", "dip_iters", **here):
    at = _dip_at(dips, k)
    row = [str(k), _cell(at, timed=True),
           f"{_mean([a['est_mse'] for a in at]) * 255 ** 2:.1f} / "
           f"{_mean([a['mse'] for a in at]) * 255 ** 2:.1f}" if at else "–"]
    for model, _ in hybrid_models:
      for kind in HYBRIDS:
        for nfe in nfes:
          row.append(_cell(_total(data.select(kind, nfe=nfe, dip_iters=k, model=model,
                                              **here)), timed=True))
    body.append(row)
  if not body:
    return []
  header = ["DIP its", "DIP alone", "est. / true MSE (0-255²)"] + [
      f"{kind} NFE {nfe}" + (f", {label}" if label else "")
      for _, label in hybrid_models for kind in HYBRIDS for nfe in nfes]
  return ["DIP → DDPM: the DDPM on the DIP fit's EMA output after k iterations (t' from the"
          " discrepancy estimate for dip_ddpm; t* with the DIP guide for dip_guided); PSNR /"
          " SSIM (total s / image, DIP + DDPM):", "", common.md_table(header, body), ""]


def _reference_table(data: Rows, here: dict) -> list[str]:
  """DIP at its stops, (C)BM3D and the noisy input at `here`."""
  dips = data.select("dip", **here)
  points = [[f"DIP, {c} stop", _cell(_dip_stop(dips, c), timed=True)] for c in CRITERIA]
  points.append(["(C)BM3D", _cell(data.select("bm3d", **here), timed=True)])
  points.append(["noisy input", _cell([dict(r["noisy"], seconds=0) for r in dips])])
  return ["Reference points (DIP: one fit of the largest budget; the oracle stop needs the "
          "ground truth):", "", common.md_table(["method", "PSNR / SSIM (s / image)"], points),
          ""]


def _generation_row(data: Rows, start: str, t: int, model: str, label: str, nfes: list[int],
                    gen_psnr: float) -> list[str]:
  """One start's PSNR to the reference per NFE, the reference's to the clean image, and the
  fewest NFE reaching gen_psnr."""
  row, reached = [f"{start}, t = {t}" + (f", {label}" if label else "")], None
  for nfe in nfes:
    rows = [r for r in data.select("gen", start=start, t_start=t, nfe=nfe, model=model)
            if "reference" in r]
    if not rows:
      row.append("–")
      continue
    to_ref = _mean([r["reference"]["psnr"] for r in rows])
    row.append(f"{to_ref:.1f} ({_mean([r['psnr'] for r in rows]):.1f})")
    if reached is None and to_ref >= gen_psnr:
      reached = nfe
  ref = [r for r in data.select("gen", start=start, t_start=t, model=model)
         if "reference" not in r]
  row.append(f"({_mean([r['psnr'] for r in ref]):.1f})" if ref else "–")
  row.append(str(reached) if reached is not None else f"> {nfes[-1]}" if nfes else "–")
  return row


def _generation_table(data: Rows, gen_psnr: float) -> list[str]:
  """The generation question: per start, the steps needed to reach the reference."""
  gen = data.select("gen")
  if not gen:
    return []
  nfes = sorted({r["config"]["nfe"] for r in gen if "reference_nfe" in r["config"]})
  starts = sorted({(r["config"]["start"], r["config"]["t_start"]) for r in gen},
                  key=lambda st: (st[0] != "noise", st[1]))
  body = [_generation_row(data, start, t, model, label, nfes, gen_psnr)
          for (start, t), (model, label) in itertools.product(starts, data.models("gen"))]
  ref_nfe = sorted({r["config"]["nfe"] for r in gen if "reference_nfe" not in r["config"]})
  return ["## Generation: DDIM from pure noise and from a DIP start", "",
          f"PSNR (dB) of the NFE-step sample to the reference (most steps, same start), mean "
          f"over {len({r['config']['image'] for r in gen})} image(s); last column: the fewest "
          f"NFE reaching {gen_psnr:g} dB. PSNR to the clean image in parentheses.", "",
          common.md_table(["start"] + [f"NFE {n}" for n in nfes] + [
              f"reference (NFE {'/'.join(map(str, ref_nfe))})", f"NFE to {gen_psnr:g} dB"],
              body), ""]


def tables(data: Rows, gen_psnr: float) -> str:
  """The markdown body: per sigma and set, the DDPM alone, DIP -> DDPM, the reference points;
  then the generation question."""
  out = []
  sets = sorted({r["config"]["set"] for r in data.rows})
  for sigma in sorted({r["config"]["sigma"] for r in data.rows}):
    out.append(f"## σ = {sigma:g}")
    for name in sets:
      here = dict(sigma=sigma, set=name)
      n = data.images(**here)
      out.append(f"### {name}, σ = {sigma:g} ({n} image{'s' if n > 1 else ''})")
      out += _ddpm_table(data, here) + _hybrid_table(data, here) + _reference_table(data, here)
  return "\n".join(out + _generation_table(data, gen_psnr))


def _series(data: Rows, here: dict) -> dict[str, list[tuple[float, float, float]]]:
  """Per curve label (the DDPM alone per model, each hybrid per DIP budget and model): its
  (NFE, mean PSNR, mean seconds) points at `here` (set, sigma)."""
  series = collections.OrderedDict()
  for model, label in data.models("ddpm", **here):
    name = "DDPM alone" + (f", {label}" if label else "")
    for nfe in data.values("ddpm", "nfe", model=model, **here):
      rows = data.select("ddpm", nfe=nfe, model=model, **here)
      series.setdefault(name, []).append(
          (nfe, _mean([r["psnr"] for r in rows]), _mean([r["seconds"] for r in rows])))
  for kind in HYBRIDS:
    for model, label in data.models(kind, **here):
      for k in data.values(kind, "dip_iters", model=model, **here):
        for nfe in data.values(kind, "nfe", dip_iters=k, model=model, **here):
          rows = _total(data.select(kind, nfe=nfe, dip_iters=k, model=model, **here))
          series.setdefault(f"{kind}, DIP {k} its" + (f", {label}" if label else ""),
                            []).append((nfe, _mean([r["psnr"] for r in rows]),
                                        _mean([r["seconds"] for r in rows])))
  return series


def _denoising_figures(plt, data: Rows, here: dict, fig_dir: str) -> list[str]:
  """PSNR vs NFE and vs wall time at `here` (set, sigma); returns the two files."""
  title = f"Denoising, {here['set']} ({data.images(**here)} images), σ = {here['sigma']:g}"
  series = _series(data, here)
  dips = data.select("dip", **here)
  flat = {f"DIP {c} stop": _mean([r["psnr"] for r in _dip_stop(dips, c)]) for c in CRITERIA}
  bm3d = data.select("bm3d", **here)
  if bm3d:
    flat["(C)BM3D"] = _mean([r["psnr"] for r in bm3d])
  written = []
  for name, x_index, xlabel in (("nfe", 0, "NFE (network evaluations)"),
                                ("time", 2, "wall time per image (s, DIP + DDPM)")):
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for label, points in series.items():
      points = sorted(points)
      ax.plot([p[x_index] for p in points], [p[1] for p in points], marker="o", label=label,
              linewidth=1)
    if name == "time":
      ks = sorted({int(k) for r in dips for k in r["checkpoints"]})
      at = [_dip_at(dips, k) for k in ks]
      ax.plot([_mean([a["seconds"] for a in a_k]) for a_k in at],
              [_mean([a["psnr"] for a in a_k]) for a_k in at], marker="s", color="black",
              label="DIP alone (its)", linewidth=1)
      if bm3d:
        ax.scatter([_mean([r["seconds"] for r in bm3d])], [flat["(C)BM3D"]], marker="*",
                   s=120, color="red", label="(C)BM3D", zorder=3)
    else:
      for i, (label, value) in enumerate(flat.items()):
        if math.isfinite(value):
          ax.axhline(value, linestyle="--", linewidth=1, color=f"C{(i + len(series)) % 10}",
                     label=label)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("PSNR (dB), mean over images")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(os.path.join(fig_dir, f"psnr_vs_{name}_{here['set']}_s{here['sigma']:g}.png"))
    fig.savefig(written[-1])
    plt.close(fig)
  return written


def figures(data: Rows, out_dir: str, fig_dir: str) -> list[str]:
  """PSNR vs NFE and vs wall time per test set and sigma (means over the set's images), the
  generation PSNR and an image grid of the first generation image. Returns the files written."""
  plt = _pyplot()
  os.makedirs(fig_dir, exist_ok=True)
  written = []
  for set_name, sigma in sorted({(r["config"]["set"], r["config"]["sigma"]) for r in data.rows}):
    written += _denoising_figures(plt, data, dict(set=set_name, sigma=sigma), fig_dir)
  gen_models = data.models("gen")  # the figures show the first model's samples
  gen = [r for r in data.select("gen", model=gen_models[0][0])
         if os.path.exists(_arrays_of(out_dir, r))] if gen_models else []
  if gen:
    written += _generation_figures(plt, gen, out_dir, fig_dir)
  return written


def _arrays_of(out_dir: str, row: dict) -> str:
  return os.path.join(common.arrays_dir(os.path.join(out_dir, "rows.jsonl")), row["key"] + ".npz")


def _generation_figures(plt, gen: list[dict], out_dir: str, fig_dir: str) -> list[str]:
  """PSNR to the reference against NFE per start; the image grid of the first image."""
  starts = sorted({(r["config"]["start"], r["config"]["t_start"]) for r in gen},
                  key=lambda st: (st[0] != "noise", st[1]))
  fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
  for start, t in starts:
    rows = [r for r in gen if (r["config"]["start"], r["config"]["t_start"]) == (start, t)
            and "reference" in r]
    nfes = sorted({r["config"]["nfe"] for r in rows})
    ax.plot(nfes, [_mean([r["reference"]["psnr"] for r in rows if r["config"]["nfe"] == n])
                   for n in nfes], marker="o", label=f"{start}, t = {t}", linewidth=1)
  ax.set_xscale("log")
  ax.set_xlabel("NFE")
  ax.set_ylabel("PSNR to the reference (dB)")
  ax.set_title("Generation: steps needed from each start")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  psnr_path = os.path.join(fig_dir, "generation_psnr.png")
  fig.savefig(psnr_path)
  plt.close(fig)

  image = gen[0]["config"]["image"]
  mine = [r for r in gen if r["config"]["image"] == image]
  nfes = sorted({r["config"]["nfe"] for r in mine})
  fig, axes = plt.subplots(len(starts), len(nfes) + 1, figsize=(1.8 * (len(nfes) + 1),
                                                                1.9 * len(starts)),
                           dpi=110, squeeze=False)

  def show(ax, x: np.ndarray, title: str) -> None:
    grey = x.shape[-1] == 1
    ax.imshow(x[..., 0] if grey else x, vmin=0, vmax=255, cmap="gray" if grey else None,
              interpolation="nearest")
    ax.set_title(title, fontsize=6)

  for i, (start, t) in enumerate(starts):
    for ax in axes[i]:
      ax.axis("off")
    for j, nfe in enumerate(nfes):
      row = next((r for r in mine if (r["config"]["start"], r["config"]["t_start"],
                                      r["config"]["nfe"]) == (start, t, nfe)), None)
      if row is None:
        continue
      with np.load(_arrays_of(out_dir, row)) as z:
        show(axes[i, j + 1], z["output"], f"{start} t={t}, NFE {nfe}"
             f"{' (ref)' if 'reference' not in row else ''}\n{row['psnr']:.1f} dB to clean")
        if "start" in z:
          show(axes[i, 0], z["start"], "clean" if start == "noise" else "DIP estimate")
  fig.suptitle(f"Generation from pure noise and from DIP starts: {image}", fontsize=8)
  fig.tight_layout()
  grid_path = os.path.join(fig_dir, "generation_grid.png")
  fig.savefig(grid_path)
  plt.close(fig)
  return [psnr_path, grid_path]


def summarize(out_dir: str, gen_psnr: float) -> str:
  """Writes <out_dir>/summary.md and figures/ from the rows; returns the markdown path."""
  path = os.path.join(out_dir, "rows.jsonl")
  rows = common.read_rows(path)
  if not rows:
    raise ValueError(f"no rows in {path}: run the report first")
  data = Rows(rows)
  fig_dir = os.path.join(out_dir, "figures")
  written = figures(data, out_dir, fig_dir)
  commands = sorted({r["argv"] for r in rows if r.get("argv")})
  devices = sorted({f"{r['device']['backend']} ({r['device']['kind']})" for r in rows})
  models = sorted({r["config"]["model"] for r in rows if "model" in r["config"]})
  crops = "/".join(f"{c}²" if c else "whole-image" for c in sorted({r["config"]["crop"]
                                                                     for r in rows}))
  text = "\n".join([
      "# dipjax's own DDPM for denoising (issue 10)", "",
      f"{len(rows)} rows of `{path}`; weights digest(s) {', '.join(models) or '–'}; "
      f"device(s): {', '.join(devices)}. Commands:", "",
      *[f"    {c}" for c in commands], "",
      f"PSNR (dB) / SSIM against the clean {crops} centre crops; seconds per image, compiles "
      "excluded.", "",
      tables(data, gen_psnr), "",
      "Figures: " + ", ".join(f"[{os.path.basename(p)}]({os.path.relpath(p, out_dir)})"
                             for p in written), ""])
  md = os.path.join(out_dir, "summary.md")
  with open(md, "w") as f:
    f.write(text)
  return md


def main(argv):
  cli.start(argv, __file__)
  with cli.errors("ddpm_report.py"):
    if not _SUMMARY.value:
      spec = spec_from_flags()
      report = Report(spec, _OUT_DIR.value, _WEIGHTS.value, argv="python " + shlex.join(sys.argv))
      logging.info("%d images x %d noise levels; %d rows added", len(spec.images),
                   len(spec.sigmas), report.run())
    print(summarize(_OUT_DIR.value, _GEN_PSNR.value))


if __name__ == "__main__":
  app.run(main)
