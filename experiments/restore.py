r"""Restores one image: flags -> dipjax.pipeline.RestoreConfig -> dipjax.pipeline.restore -> files.

  python experiments/restore.py                        # staged DIP on the bundled image, sigma 25
  python experiments/restore.py --image x.png --sigma 50
  python experiments/restore.py --image photo.png --noisy   # a real noisy photo: sigma estimated
  python experiments/restore.py --image raw.png --noisy --noise poisson  # peak, read noise too
  python experiments/restore.py --image x.png --task inpaint --mask m.png
  python experiments/restore.py --image x.png --task sr --factor 4
  python experiments/restore.py --task deblur --blur motion --noise poisson --peak 30
  python experiments/restore.py --method ddpm          # dipjax's own DDPM alone (denoising)

Writes to --out_dir: restored.png and restored.npy (the seeds' mean EMA output at the first
--stop criterion's stop; after the DDPM for the DDPM methods; .npy: exact float32),
degraded.png and degraded.npy (the observation), metrics.json; for the fitting methods also
trace.csv, psnr.png (experiments/outputs.py: all or nothing) and, with --checkpoint_every,
checkpoints/. Every flag: docs/cli.md.
"""

from __future__ import annotations

import json
import os

from absl import flags
from absl import logging
import jax

import cli
import outputs
from dipjax import io
from dipjax import nets
from dipjax import pipeline
from dipjax import stopping

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
D = pipeline.RestoreConfig.__dataclass_fields__  # the library's defaults, shown in --help
METHOD_DEFAULT = "(default: the method's, docs/cli.md)"

_IMAGE = flags.DEFINE_string("image", os.path.join(ASSETS, "house.png"), "Image to restore.")
_NOISY = flags.DEFINE_bool(
    "noisy", False, "--image is already the degraded observation (noisy, masked or low-res); "
    "no noise is added, sigma (and, unless --noise_corr is given, the noise's correlation; with "
    "--noise poisson, unless --peak is given, its peak and read noise) is estimated from it, "
    "and there is no ground truth unless --clean is given.")
_CLEAN = flags.DEFINE_string("clean", None, "Ground truth for an observation given with --noisy.")
_MASK = flags.DEFINE_string("mask", None, "Inpainting mask image: white = known pixel.")
_CROP = flags.DEFINE_integer("crop", 0, "Centre-crop the image to this size first (0: no crop).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic degradation and of the fits.")
_PRESET = flags.DEFINE_enum(
    "preset", "default", ["default", "paper"],
    "paper: the DIP paper's network (128 channels x 5 scales) and budgets (denoise 3000 it, sr "
    "2000 it with reg_noise_std 0.03), method dip, overriding --net/--width/--scales/--iters/"
    "--reg_noise_std.")
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/restore", "Output directory.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 100, "Iterations between progress lines (and per "
                                  "compiled call).")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 0,
                                         "Iterations between checkpoints (0: none).")
_RESUME = flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --out_dir "
                            "(from the start if none yet; refused if of other settings).")
_TILE = flags.DEFINE_integer(
    "tile", None, "Restore in overlapping square tiles of this side (output pixels), blended: "
    "peak memory set by the tile. 0: the whole image; default: whole where the memory estimate "
    "fits the available memory, else the largest tile that does (with checkpoints: whole).",
    lower_bound=0)
_TILE_OVERLAP = flags.DEFINE_integer("tile_overlap", pipeline.TILE_OVERLAP,
                                     "Pixels neighbouring tiles share.", lower_bound=0)

# One flag per RestoreConfig field, of the same name; None: the library's (method's) default.
flags.DEFINE_enum("task", D["task"].default, list(pipeline.TASKS), "Restoration task.")
flags.DEFINE_float("sigma", None, "Std of the Gaussian noise added to the clean image, 0-255 "
                   "units (default 25 for Gaussian denoising, 0 otherwise).")
flags.DEFINE_enum("noise", D["noise"].default, list(pipeline.NOISES), "Noise model: gaussian "
                  "(--sigma) or poisson (--peak photons at white, plus --sigma read noise).")
flags.DEFINE_float("peak", D["peak"].default, "--noise poisson: photons at a white pixel "
                   "(with --noisy: estimated with the read noise unless given).")
flags.DEFINE_float("noise_corr", D["noise_corr"].default, "--noise gaussian: std in pixels of the "
                   "kernel that correlates the noise between neighbouring pixels (a camera's "
                   "demosaicing); 0: white. The staged probe takes it. With --noisy and no "
                   "--noise_corr it is estimated from the image, with sigma.")
flags.DEFINE_enum("mask_kind", D["mask_kind"].default, list(pipeline.MASK_KINDS),
                  "Inpainting mask: file (--mask) or generated with --seed: random pixels "
                  "(--mask_ratio missing), text or brush strokes.")
flags.DEFINE_float("mask_ratio", D["mask_ratio"].default, "--mask_kind random: share missing.")
flags.DEFINE_integer("factor", D["factor"].default, "Super-resolution factor (2, 4 or 8).")
flags.DEFINE_enum("kernel", D["kernel"].default, ["lanczos", "box"], "SR down-sampling kernel.")
flags.DEFINE_enum("blur", D["blur"].default, list(pipeline.BLURS), "Deblurring kernel: "
                  "Gaussian (--blur_sigma), seeded camera shake (--blur_seed, --blur_size) or "
                  "--blur_file.")
flags.DEFINE_float("blur_sigma", D["blur_sigma"].default, "--blur gaussian: std in pixels.")
flags.DEFINE_integer("blur_size", D["blur_size"].default, "--blur motion: kernel side (odd).")
flags.DEFINE_integer("blur_seed", D["blur_seed"].default, "--blur motion: trajectory seed.")
flags.DEFINE_string("blur_file", None, "--blur file: a kernel as a grey image or a 2-D .npy.")
flags.DEFINE_enum("boundary", D["boundary"].default, ["circular", "reflect"],
                  "Deblurring boundary: circular (FFT) or reflect.")
flags.DEFINE_enum("method", None, list(pipeline.METHODS),
                  "staged: DIP fitted to DDPM-noised targets, noisiest first, with a probe "
                  "that gives a ground-truth-free stop; dip: fit y; ddpm: dipjax's DDPM alone; "
                  "dip_ddpm / dip_guided: a DIP fit refined by the DDPM (denoising only); "
                  "ddnm / diffpir / dps: a diffusion posterior solver from noise (any task); "
                  "dip_ddnm / dip_diffpir / dip_dps: the same from a DIP fit at t* (from its "
                  "held-out error), its output guiding every step. Default: staged for "
                  "denoise, dip otherwise.")
flags.DEFINE_enum("schedule", D["schedule"].default, list(pipeline.SCHEDULES), "Noise schedule.")
flags.DEFINE_integer("stages", D["stages"].default, "Stage count (staged).")
flags.DEFINE_integer("t_max", D["t_max"].default, "Timestep of the noisiest stage (staged).")
flags.DEFINE_bool("fresh_eps", D["fresh_eps"].default, "A new noise image per stage (staged).")
flags.DEFINE_bool("scaled_targets", D["scaled_targets"].default,
                  "Targets sqrt(abar) y + sqrt(1-abar) eps (else y + sigma_t eps).")
flags.DEFINE_float("probe", D["probe"].default, "Probe noise ratio c: stages built from y + c "
                   "sigma eps, what --stop staged needs (0: none).")
flags.DEFINE_float("final_share", D["final_share"].default, "Share of --iters for the last "
                   "stage (staged; the rest split equally); 0: all stages equal.")
flags.DEFINE_integer("iters", None, f"Total fit iterations, any count {METHOD_DEFAULT}.")
flags.DEFINE_integer("seeds", D["seeds"].default, "Independent fits, averaged.")
flags.DEFINE_enum("net", D["net"].default, list(nets.NETS), "Network.")
flags.DEFINE_integer("width", None, f"Channels per scale {METHOD_DEFAULT}.")
flags.DEFINE_integer("scales", D["scales"].default, "Scales (the image is padded to 2^scales).")
flags.DEFINE_enum("dtype", D["dtype"].default, list(pipeline.DTYPES),
                  "Network compute dtype (bfloat16: for accelerators; slower on CPU).")
flags.DEFINE_enum("input", D["input"].default, list(pipeline.INPUTS),
                  "Network input: DIP noise, meshgrid, or the DDPM-noised observation.")
flags.DEFINE_integer("input_t", None, "--input ddpm: its timestep (default: matched to sigma).")
flags.DEFINE_bool("input_fresh", D["input_fresh"].default, "--input ddpm: redraw its noise.")
flags.DEFINE_integer("input_extra", D["input_extra"].default, "--input ddpm: extra DIP noise "
                     "channels.")
flags.DEFINE_float("reg_noise_std", D["reg_noise_std"].default, "Input jitter std.")
flags.DEFINE_float("lr", D["lr"].default, "Adam learning rate.")
flags.DEFINE_float("exp_weight", D["exp_weight"].default, "Output EMA weight (0: no EMA).")
flags.DEFINE_enum("loss", D["loss"].default, ["mse", "l1", "mse_ssim", "perceptual"],
                  "Training loss (perceptual: VGG19 features, needs --vgg19).")
flags.DEFINE_string("vgg19", None, "VGG19 weights .npz for --loss perceptual "
                    "(experiments/convert_vgg19.py).")
flags.DEFINE_list("stop", None, f"Stopping criteria ({', '.join(stopping.KINDS)}); "
                  "restored.png is taken at the first one's stop; --stop= for none "
                  f"{METHOD_DEFAULT}.")
flags.DEFINE_bool("halt", None, f"End the fit when the first --stop criterion fires "
                  f"{METHOD_DEFAULT}.")
flags.DEFINE_integer("window", D["window"].default, "ES-WMV window (--stop es_wmv).")
flags.DEFINE_float("holdout", None, "Share of the measurements held out of the loss for --stop "
                   "holdout (self-validation; 0: none). Default: 0.05 for the dip_* solvers, "
                   "else 0.")
flags.DEFINE_string("ddpm_weights", os.path.join(ASSETS, "ddpm_colour.npz"),
                    "The DDPM methods' U-Net weights (.npz of experiments/train_ddpm.py).")
flags.DEFINE_integer("nfe", None, f"DDPM methods: network evaluations {METHOD_DEFAULT}.")
flags.DEFINE_integer("ddpm_samples", D["ddpm_samples"].default, "DDPM methods: samples averaged.")
flags.DEFINE_float("ddpm_eta", None, "DDPM methods and ddnm: 0 DDIM .. 1 ancestral (default: "
                   "0.85 for ddnm / dip_ddnm, DDNM's; else 0).")
flags.DEFINE_float("guide_weight", None, "dip_guided: a constant blending weight in [0, 1] "
                   "(default: inverse-variance weights).")

PRESETS = dict(paper=dict(denoise=dict(iters=3000, reg_noise_std=1 / 30),
                          sr=dict(iters=2000, reg_noise_std=0.03)))


def config_from_flags() -> pipeline.RestoreConfig:
  """The RestoreConfig the flags describe; ValueError (naming the field) for bad values."""
  values = {name: flags.FLAGS[name].value for name in D if name in flags.FLAGS}
  # --noisy: the noise is the image's, estimated; with --noise poisson, --peak (and --sigma, its
  # read noise) may give it instead
  given = values["noise"] == "poisson" and flags.FLAGS["peak"].present
  values["sigma_known"] = not _NOISY.value or given
  if (_NOISY.value and not flags.FLAGS["noise_corr"].present and values["noise"] == "gaussian"
      and values["task"] != "inpaint"):
    values["noise_corr"] = None  # a real photo's: estimated with its sigma
  if _NOISY.value and values["sigma"] is not None and not given:
    raise ValueError("--sigma adds noise to a clean image; with --noisy the image is already "
                     "degraded and its sigma is estimated (leave --sigma out; with --noise "
                     "poisson, --peak and --sigma give its known noise)")
  if _PRESET.value == "paper":
    if values["task"] not in PRESETS["paper"]:
      raise ValueError("--preset paper covers denoise and sr (the DIP notebooks tune "
                       "inpainting per image); set --net/--width/--iters instead")
    values.update(method="dip", net="skip", width=128, scales=5,
                  **PRESETS["paper"][values["task"]])
  if values["final_share"] == 0:
    values["final_share"] = None
  if values["stop"] is not None:
    values["stop"] = tuple(values["stop"])
  return pipeline.RestoreConfig(**values)


def load_inputs(config: pipeline.RestoreConfig):
  """(observation y, ground truth or None, mask or None) from the image flags."""
  full = io.load_image(_IMAGE.value)
  crop = lambda x: io.center_crop(x, _CROP.value, _CROP.value) if _CROP.value else x
  image = crop(full)
  mask = None
  if config.task == "inpaint" and config.mask_kind != "file" and _NOISY.value:
    raise ValueError("with --noisy the observation is already masked: give its --mask")
  if config.task == "inpaint" and config.mask_kind != "file":
    mask = pipeline.make_mask(config, image.shape, _SEED.value)
  elif config.task == "inpaint":
    if not _MASK.value:
      raise ValueError("--task inpaint needs --mask (or --mask_kind random, text or strokes)")
    mask = io.load_image(_MASK.value, channels=1)
    if mask.shape[:2] != full.shape[:2]:
      raise ValueError(f"mask {_MASK.value} is {mask.shape[1]}x{mask.shape[0]} but the image "
                       f"is {full.shape[1]}x{full.shape[0]}: they must match before --crop")
    mask = crop(mask)
  if not _NOISY.value:
    if config.task == "sr" and (image.shape[0] % config.factor or image.shape[1] % config.factor):
      cropped = io.crop_to_multiple(image, config.factor)
      logging.info("%dx%d is not a multiple of --factor %d: centre-cropped to %dx%d",
                   image.shape[1], image.shape[0], config.factor, cropped.shape[1],
                   cropped.shape[0])
      image = cropped
    return pipeline.degrade(config, image, seed=_SEED.value, mask=mask), image, mask
  clean = None
  if _CLEAN.value:
    clean = io.load_image(_CLEAN.value, channels=image.shape[-1])
  return image, clean, mask


def run() -> None:
  config = config_from_flags()
  out_dir = _OUT_DIR.value
  cli.writable_dir(out_dir)
  y, clean, mask = load_inputs(config)

  def progress(done: int, total: int, latest: dict[str, float]) -> None:
    shown = "psnr_clean_ema" if clean is not None else "psnr_obs_ema"
    rate = latest["it_per_s"]
    logging.info("iteration %d/%d  %.2f it/s  ETA %.0f s  %s %.2f dB  loss %.5f", done, total,
                 rate, (total - done) / rate, shown, latest[shown], latest["loss"])

  cache = cli.cache_events()
  result = pipeline.restore(
      config, y, key=jax.random.PRNGKey(_SEED.value), clean=clean, mask=mask,
      progress=progress, chunk=_LOG_EVERY.value,
      checkpoint_dir=os.path.join(os.path.abspath(out_dir), "checkpoints"),
      checkpoint_every=_CHECKPOINT_EVERY.value, resume=_RESUME.value,
      tile=_TILE.value, overlap=_TILE_OVERLAP.value)
  logging.info("persistent compilation cache: %d hits, %d misses", cache["hits"], cache["misses"])
  write_outputs(out_dir, config, result)


def write_outputs(out_dir: str, config: pipeline.RestoreConfig, r: pipeline.Restoration) -> None:
  """Writes the files (:func:`outputs.write`), logs the stops and prints the summary line."""
  result = outputs.write(out_dir, config, r, _IMAGE.value)
  for name, (steps, _) in r.stops.items():
    logging.info("%s stops at iteration %s", name, ", ".join(str(int(i)) for i in steps))
  summary = result.get("restored", {})
  logging.info("wrote %s: %s", out_dir, ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
  keys = ("compile_seconds", "fit_seconds", "iterations_per_second", "restored_at")
  print(json.dumps({k: result[k] for k in keys if k in result} | summary))


if __name__ == "__main__":
  cli.run_main(__file__, run)
