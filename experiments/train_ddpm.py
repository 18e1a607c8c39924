r"""Trains dipjax's own DDPM, an epsilon-prediction U-Net, on random patches of a folder.

  python experiments/train_ddpm.py --workdir runs/ddpm         # 12,000 steps of 8 64x64 patches
  python experiments/train_ddpm.py --workdir runs/ddpm_grey --grey \
      --init_weights assets/ddpm_colour.npz --steps 2000 --warmup 0  # a grey model, fine-tuned
  python experiments/train_ddpm.py --workdir runs/ddpm_denoiser --loss x0 --sigma_range 5,75 \
      --init_weights assets/ddpm_colour.npz --lr 5e-5 --warmup 0 \
      --steps 6000                           # the shipped model fine-tuned as a one-step denoiser

Runs again with the same --workdir continue from its latest checkpoint (a run can be spread
over several sessions; the settings must be the same, see <workdir>/config.json). Writes to
--workdir: checkpoints/ (Orbax, every --every steps), loss.json ([[step, loss], ...], the mean
loss of each --log_every steps), and at each checkpoint and the end the loss curve (--loss_png)
and the EMA weights (--out_weights, the .npz that ``dipjax.ddpm.train.load_weights`` reads).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

from absl import flags
from absl import logging
import jax
import matplotlib
import numpy as np

import cli
import common
from dipjax import checkpoint
from dipjax import schedules
from dipjax.ddpm import solvers
from dipjax.ddpm import train
from dipjax.ddpm.unet import UNetConfig

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_SETS = ("CSet9", "Set12", "BSD68", "Set5", "Set14")  # never trained on

_DATA = flags.DEFINE_string("data", os.path.join(os.path.dirname(REPO), "shared", "data", "train"),
                            "Folder of training images (PNG / JPEG / TIFF).")
_PATCH = flags.DEFINE_integer("patch", 64, "Training patch side (a multiple of 2^(levels-1)).")
_BATCH = flags.DEFINE_integer("batch", 8, "Patches per step.")
_STEPS = flags.DEFINE_integer("steps", 12000, "Total training steps (a multiple of --log_every).")
_LR = flags.DEFINE_float("lr", 2e-4, "Adam learning rate.")
_WARMUP = flags.DEFINE_integer("warmup", 500, "Linear learning-rate warm-up steps (0: none).")
_GRAD_CLIP = flags.DEFINE_float("grad_clip", 1.0, "Global gradient-norm clip (0: none).")
_EMA = flags.DEFINE_float("ema", 0.999, "EMA decay of the shipped weights.")
_CHANNELS = flags.DEFINE_integer("channels", 32, "Channels of the U-Net's first level.")
_MULTS = flags.DEFINE_list("mults", ["1", "2", "2", "2"], "Channel multiplier per level.")
_RES_BLOCKS = flags.DEFINE_integer("res_blocks", 2, "Residual blocks per level.")
_ATTENTION = flags.DEFINE_bool("attention", False, "Self-attention at the lowest resolution.")
_GROUPS = flags.DEFINE_integer("norm_groups", 8, "GroupNorm groups.")
_GREY = flags.DEFINE_bool("grey", False, "Train a grey (1-channel) model on luma.")
_SCHEDULE = flags.DEFINE_enum("schedule", "linear", ["linear", "cosine"], "Noise schedule.")
_T_HI = flags.DEFINE_integer(
    "t_hi", 0, "Timestep weighting: 0 samples t uniformly on [1, T]; else a fraction "
    "--frac_hi of the batches' timesteps is uniform on [1, t_hi].")
_FRAC_HI = flags.DEFINE_float("frac_hi", 0.5, "Fraction of timesteps drawn from [1, t_hi].")
_SIGMA_RANGE = flags.DEFINE_list(
    "sigma_range", [], "Noise std range, 0-255 units (e.g. 5,75): every timestep drawn "
    "uniformly from those matched to it (instead of --t_hi / --frac_hi).")
_LOSS = flags.DEFINE_enum("loss", "eps", list(train.LOSSES), "eps: the DDPM's epsilon MSE; x0: "
                          "the one-step denoiser's error (fine-tuning a model as a denoiser).")
_SSIM_WEIGHT = flags.DEFINE_float("ssim_weight", 0.0, "--loss=x0: weight of 1 - SSIM.")
_INIT = flags.DEFINE_string(
    "init_weights", None, "Start from this weights .npz (fine-tuning) instead of a random "
    "initialisation: a model of the same flags, or a colour model for --grey "
    "(dipjax.ddpm.train.adapt_channels).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initialisation and of the batches.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/ddpm", "Checkpoints, loss curve, weights.")
_EVERY = flags.DEFINE_integer("every", 500, "Steps between checkpoints (and loss PNG, weights); "
                              "a multiple of --log_every.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 100, "Steps between progress lines (steps per "
                                  "compiled call).")
_OUT_WEIGHTS = flags.DEFINE_string("out_weights", None,
                                   "EMA weights .npz (default <workdir>/ema_weights.npz).")
_LOSS_PNG = flags.DEFINE_string("loss_png", None, "Loss curve (default <workdir>/loss.png).")


def _configs() -> tuple[UNetConfig, train.TrainConfig]:
  """The model and training configs from the flags; ValueError for bad values."""
  try:
    mults = tuple(int(m) for m in _MULTS.value)
  except ValueError as e:
    raise ValueError(f"--mults must be integers, got {_MULTS.value}") from e
  checks = [
      (_STEPS.value < 1, f"--steps must be positive, got {_STEPS.value}"),
      (_LOG_EVERY.value < 1 or _STEPS.value % _LOG_EVERY.value,
       f"--steps ({_STEPS.value}) must be a multiple of --log_every ({_LOG_EVERY.value})"),
      (_EVERY.value < 1 or _EVERY.value % _LOG_EVERY.value,
       f"--every ({_EVERY.value}) must be a multiple of --log_every ({_LOG_EVERY.value})"),
  ]
  for failed, message in checks:
    if failed:
      raise ValueError(message)
  config = UNetConfig(channels=_CHANNELS.value, channel_mults=mults,
                      num_res_blocks=_RES_BLOCKS.value, attention=_ATTENTION.value,
                      image_channels=1 if _GREY.value else 3, norm_groups=_GROUPS.value,
                      schedule=_SCHEDULE.value)
  t_lo, t_hi, frac_hi = 1, _T_HI.value, _FRAC_HI.value
  if _SIGMA_RANGE.value:
    if flags.FLAGS["t_hi"].present or flags.FLAGS["frac_hi"].present:
      raise ValueError("--sigma_range sets the timesteps: give it or --t_hi / --frac_hi")
    stds = common.parse_list("sigma_range", _SIGMA_RANGE.value, float)
    if len(stds) != 2 or not 0 < stds[0] <= stds[1]:
      raise ValueError(f"--sigma_range must be two stds 0 < low <= high, got {stds}")
    schedule = schedules.get(config.schedule, config.num_steps)
    t_lo, t_hi = (int(solvers.matched_timestep(schedule, s / 255)) for s in stds)
    frac_hi = 1.0
  if t_hi > config.num_steps:
    raise ValueError(f"--t_hi must lie in [0, {config.num_steps}], got {t_hi}")
  if _PATCH.value < 1 or _PATCH.value % config.multiple:
    raise ValueError(f"--patch ({_PATCH.value}) must be a positive multiple of "
                     f"{config.multiple} for {len(mults)} levels")
  return config, train.TrainConfig(
      batch_size=_BATCH.value, patch_size=_PATCH.value, learning_rate=_LR.value,
      warmup_steps=_WARMUP.value, grad_clip=_GRAD_CLIP.value, ema_decay=_EMA.value,
      t_hi=t_hi, frac_hi=frac_hi, t_lo=t_lo, loss=_LOSS.value, ssim_weight=_SSIM_WEIGHT.value)


def _check_data(folder: str) -> None:
  """Refuses the test sets, whatever part of the path names them."""
  parts = set(pathlib.Path(folder).resolve().parts)
  named = sorted(parts.intersection(TEST_SETS))
  if named:
    raise ValueError(f"refusing to train on {folder}: {named[0]} is a test set "
                     f"({', '.join(TEST_SETS)} are never trained on)")


def _flat(settings: dict) -> dict:
  """{'model': {'channels': 32}, 'seed': 0} -> {'model.channels': 32, 'seed': 0}."""
  flat = {}
  for k, v in settings.items():
    flat.update({f"{k}.{kk}": vv for kk, vv in v.items()} if isinstance(v, dict) else {k: v})
  return flat


def _settings_file(workdir: str, config: UNetConfig, train_config: train.TrainConfig) -> None:
  """Writes <workdir>/config.json, or checks a resumed run's settings against it."""
  settings = dict(model=json.loads(config.to_json()), train=dataclasses.asdict(train_config),
                  data=os.path.abspath(_DATA.value), seed=_SEED.value,
                  init_weights=_INIT.value and os.path.abspath(_INIT.value))
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      before, now = _flat(json.load(f)), _flat(json.loads(json.dumps(settings)))
    defaults = _flat(dict(train=dataclasses.asdict(train.TrainConfig())))
    before = {**{k: v for k, v in defaults.items() if k not in before}, **before}
    diff = [f"{k} {before.get(k)} (now {now.get(k)})" for k in sorted(before.keys() | now.keys())
            if before.get(k) != now.get(k)]
    if diff:
      raise ValueError(f"{workdir} holds a run with other settings: {', '.join(diff)}; use "
                       "the same flags to resume it, or another --workdir")
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(settings, f, indent=2)


def _initial_params(config: UNetConfig):
  """The --init_weights parameters adapted to `config`, or None (random initialisation)."""
  if not _INIT.value:
    return None
  params, stored = train.load_weights(_INIT.value)
  if dataclasses.replace(stored, image_channels=config.image_channels) != config:
    raise ValueError(f"--init_weights {_INIT.value} holds {stored}, not the model these flags "
                     f"describe ({config})")
  return train.adapt_channels(params, stored, config.image_channels)[0]


def _publish(workdir: str, curve: list[list[float]], png: str, weights: str,
             state: train.DDPMTrainState, config: UNetConfig) -> None:
  """Writes the loss curve (loss.json and the PNG) and the EMA weights."""
  with open(os.path.join(workdir, "loss.json"), "w") as f:
    json.dump(curve, f)
  train.save_weights(weights, state.ema_params, config)
  steps, losses = np.array(curve).T
  fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
  ax.plot(steps, losses, linewidth=1)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  name = {"eps": "epsilon MSE", "x0": "one-step x0 error"}[_LOSS.value]
  ax.set_ylabel(f"{name} (mean of {_LOG_EVERY.value} steps)")
  ax.set_title(f"DDPM training, {os.path.basename(os.path.abspath(workdir))}")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(png)
  plt.close(fig)
  logging.info("wrote %s, %s", weights, png)


def run() -> None:
  config, train_config = _configs()
  _check_data(_DATA.value)
  workdir = os.path.abspath(_WORKDIR.value)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  weights = _OUT_WEIGHTS.value or os.path.join(workdir, "ema_weights.npz")
  png = _LOSS_PNG.value or os.path.join(workdir, "loss.png")
  if not weights.endswith(".npz"):
    raise ValueError(f"--out_weights must end in .npz, got {weights}")
  params = _initial_params(config)
  t0 = time.perf_counter()
  data = train.load_dataset(_DATA.value, config.image_channels, train_config.patch_size)
  logging.info("loaded %d images from %s in %.1f s (%.0f MB as uint8)", data.images.shape[0],
               _DATA.value, time.perf_counter() - t0, data.images.nbytes / 2**20)
  _settings_file(workdir, config, train_config)

  init = lambda: train.init_train_state(jax.random.PRNGKey(_SEED.value), config, train_config,
                                        params)
  curve = []
  start = checkpoint.latest_step(ckpt_dir)
  if start is None:
    state, start = init(), 0
  else:
    state = checkpoint.load(ckpt_dir, {"state": jax.eval_shape(init)})["state"]
    with open(os.path.join(workdir, "loss.json")) as f:
      curve = [entry for entry in json.load(f) if entry[0] <= start]
    logging.info("resumed from step %d of %d", start, _STEPS.value)
    if start % _LOG_EVERY.value:
      raise ValueError(f"the checkpoint's step {start} is not a multiple of --log_every "
                       f"({_LOG_EVERY.value})")
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  if start >= _STEPS.value:
    logging.info("already trained for %d steps", start)
    _publish(workdir, curve, png, weights, state, config)
    return

  t0 = time.perf_counter()
  train_fn = train.make_train_fn(config, train_config, _LOG_EVERY.value).lower(
      state, data).compile()
  logging.info("compiled in %.1f s (%s; %d parameters, %.1f MB float32; %dx%d patches, "
               "batch %d)", time.perf_counter() - t0, jax.default_backend(), n_params,
               4 * n_params / 1e6, train_config.patch_size, train_config.patch_size,
               train_config.batch_size)
  t_fit = time.perf_counter()
  for done in range(start + _LOG_EVERY.value, _STEPS.value + 1, _LOG_EVERY.value):
    state, losses = train_fn(state, data)
    curve.append([done, float(np.mean(losses))])
    rate = (done - start) / (time.perf_counter() - t_fit)
    logging.info("step %d/%d  loss %.4f  %.2f steps/s  ETA %.0f min", done, _STEPS.value,
                 curve[-1][1], rate, (_STEPS.value - done) / rate / 60)
    if done % _EVERY.value == 0 or done == _STEPS.value:
      checkpoint.save(ckpt_dir, done, {"state": state})
      _publish(workdir, curve, png, weights, state, config)


if __name__ == "__main__":
  cli.run_main(__file__, run)
