"""Training the DDPM's U-Net on random patches of a folder of images, and its weights file.

The training images live on the device as one uint8 array (:class:`Dataset`); a batch is a pure
function of a key (:func:`sample_batch`: random crops with horizontal flips through
``lax.dynamic_slice``), so k training steps run as one ``lax.scan`` (:func:`make_train_fn`)
with no host data per step. Adam (optional linear warm-up, global-norm clipping) with an EMA of
the parameters; the EMA weights ship as one ``.npz`` (:func:`save_weights`). Resumable
checkpoints of the whole :class:`DDPMTrainState` go through :mod:`dipjax.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax import lax

from dipjax import io
from dipjax import schedules
from dipjax.ddpm import diffusion
from dipjax.ddpm.unet import EpsUNet, UNetConfig, eps_fn

Array = jax.Array
PyTree = Any

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LOSSES = ("eps", "x0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and data settings (hashable: static in the compiled step).

  Attributes:
    batch_size: patches per step.
    patch_size: square patch side, a multiple of ``UNetConfig.multiple``.
    learning_rate: Adam step size after warm-up.
    warmup_steps: linear warm-up of the step size from 0 (0: none).
    grad_clip: clip gradients to this global norm (0: no clipping).
    ema_decay: EMA of the parameters, ema <- decay ema + (1 - decay) params, in [0, 1).
    t_hi, frac_hi, t_lo: timestep sampling (:func:`diffusion.sample_timesteps`): t_hi = 0
      uniform on [1, T]; else a fraction frac_hi of the timesteps uniform on [t_lo, t_hi].
    loss: 'eps', the DDPM's epsilon MSE (:func:`diffusion.eps_loss`), or 'x0', the one-step
      denoiser's error (:func:`diffusion.x0_loss`: fine-tuning a model as a denoiser; only on a
      range of timesteps, t_hi > 0 and frac_hi = 1).
    ssim_weight: the x0 loss's weight of 1 - SSIM (0: MSE only).
  """
  batch_size: int = 8
  patch_size: int = 64
  learning_rate: float = 2e-4
  warmup_steps: int = 500
  grad_clip: float = 1.0
  ema_decay: float = 0.999
  t_hi: int = 0
  frac_hi: float = 0.5
  t_lo: int = 1
  loss: str = "eps"
  ssim_weight: float = 0.0

  def __post_init__(self):
    checks = [
        (self.batch_size < 1, f"batch_size must be >= 1, got {self.batch_size}"),
        (self.patch_size < 1, f"patch_size must be >= 1, got {self.patch_size}"),
        (self.learning_rate <= 0, f"learning_rate must be positive, got {self.learning_rate}"),
        (self.warmup_steps < 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
        (self.grad_clip < 0, f"grad_clip must be >= 0, got {self.grad_clip}"),
        (not 0.0 <= self.ema_decay < 1.0, f"ema_decay must lie in [0, 1), got {self.ema_decay}"),
        (self.t_hi < 0, f"t_hi must be >= 0, got {self.t_hi}"),
        (not 0.0 <= self.frac_hi <= 1.0, f"frac_hi must lie in [0, 1], got {self.frac_hi}"),
        (self.t_lo != 1 and not 1 <= self.t_lo <= self.t_hi,
         f"t_lo must lie in [1, t_hi={self.t_hi}], got {self.t_lo}"),
        (self.loss not in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"),
        (self.ssim_weight < 0, f"ssim_weight must be >= 0, got {self.ssim_weight}"),
        (self.ssim_weight > 0 and self.loss != "x0",
         f"ssim_weight applies to loss 'x0' only, got loss {self.loss!r}"),
        (self.loss == "x0" and (self.t_hi == 0 or self.frac_hi != 1.0),
         "loss 'x0' needs its timesteps in a range (t_hi > 0, frac_hi = 1: e.g. --sigma_range): "
         "near t = T its weight (1 - abar) / abar explodes"),
    ]
    for failed, message in checks:
      if failed:
        raise ValueError(f"TrainConfig: {message}")


@flax.struct.dataclass
class Dataset:
  """Training images in memory, one array for all sizes and both orientations.

  Attributes:
    images: (K, Hs, Ws, C) uint8; image k stored at the top-left corner, transposed (H <-> W)
      when it is taller than wide, so landscape and portrait images share one array unpadded.
    sizes: (K, 2) int32 (height, width) of each stored image.
    transposed: (K,) bool, whether image k is stored transposed.
  """
  images: Array
  sizes: Array
  transposed: Array


@flax.struct.dataclass
class DDPMTrainState:
  """step: () int32 steps done; params, ema_params: U-Net parameters and their EMA; opt_state:
  the optax state; key: raw uint32 PRNG key of the next step."""
  step: Array
  params: PyTree
  opt_state: PyTree
  ema_params: PyTree
  key: Array


def image_files(folder: str | os.PathLike) -> list[str]:
  """The sorted image files (by extension) directly inside `folder`."""
  if not os.path.isdir(folder):
    raise ValueError(f"no such folder: {folder}")
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if f.lower().endswith(IMAGE_EXTENSIONS))


def load_dataset(folder: str | os.PathLike, channels: int, patch_size: int) -> Dataset:
  """Loads every image of `folder` (:func:`image_files`) with ``io.load_image``.

  Args:
    folder: directory of PNG / JPEG / TIFF images, any sizes and orientations.
    channels: 3 (grey images replicated) or 1 (colour converted to luma).
    patch_size: every image must be at least patch_size x patch_size.

  Returns:
    The :class:`Dataset` on the default device. Pixels are stored as 8 bits (exact for 8-bit
    files; 16-bit files are rounded).

  Raises:
    ValueError (``io.ImageError`` for an unreadable file): no images, or one smaller than a
      patch.
  """
  files = image_files(folder)
  if not files:
    raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
  images = []
  for path in files:
    x = io.load_image(path, channels=channels)
    if min(x.shape[:2]) < patch_size:
      raise ValueError(f"{path} is {x.shape[1]}x{x.shape[0]}, smaller than a "
                       f"{patch_size}x{patch_size} patch")
    images.append(np.round(x * 255).astype(np.uint8))
  transposed = np.array([x.shape[0] > x.shape[1] for x in images])
  images = [x.transpose(1, 0, 2) if t else x for x, t in zip(images, transposed)]
  sizes = np.array([x.shape[:2] for x in images], np.int32)
  stored = np.zeros((len(images), *sizes.max(axis=0), channels), np.uint8)
  for k, x in enumerate(images):
    stored[k, :x.shape[0], :x.shape[1]] = x
  return Dataset(jnp.asarray(stored), jnp.asarray(sizes), jnp.asarray(transposed))


def sample_batch(key: Array, data: Dataset, batch_size: int, patch_size: int) -> Array:
  """Random patches: (batch_size, patch_size, patch_size, C) float32 in [0, 1].

  Each patch picks an image uniformly, a position uniformly among those inside it, and a
  horizontal flip with probability 1/2. Pure in `key`; jittable (sizes static).
  """

  def crop(k):
    k_image, k_y, k_x, k_flip = jax.random.split(k, 4)
    i = jax.random.randint(k_image, (), 0, data.images.shape[0])
    y = jax.random.randint(k_y, (), 0, data.sizes[i, 0] - patch_size + 1)
    x = jax.random.randint(k_x, (), 0, data.sizes[i, 1] - patch_size + 1)
    patch = lax.dynamic_slice(data.images, (i, y, x, 0),
                              (1, patch_size, patch_size, data.images.shape[3]))[0]
    patch = jnp.where(data.transposed[i], patch.transpose(1, 0, 2), patch)
    patch = jnp.where(jax.random.bernoulli(k_flip), patch[:, ::-1], patch)
    return patch.astype(jnp.float32) / 255

  return jax.vmap(crop)(jax.random.split(key, batch_size))


def ddpm_optimizer(train: TrainConfig) -> optax.GradientTransformation:
  """Adam with linear warm-up and global-norm gradient clipping as configured.

  On parameters raveled into one vector (``optax.flatten``): the same maths, one fused update
  instead of one per leaf, which compiles 3x faster on XLA:CPU.
  """
  lr = train.learning_rate if train.warmup_steps == 0 else optax.linear_schedule(
      0.0, train.learning_rate, train.warmup_steps)
  clip = [optax.clip_by_global_norm(train.grad_clip)] if train.grad_clip > 0 else []
  return optax.flatten(optax.chain(*clip, optax.adam(lr)))


def init_train_state(key: Array, config: UNetConfig, train: TrainConfig,
               params: PyTree | None = None) -> DDPMTrainState:
  """A fresh state from a raw PRNG key: U-Net parameters initialised on a patch-sized input
  (ValueError if train.patch_size is not a multiple of config.multiple), or `params` when given
  (fine-tuning: e.g. :func:`adapt_channels` of a trained model); EMA = parameters, step 0.

  The parameters are drawn with the RBG generator seeded from `key`: Flax folds a key per
  parameter, and as many unrolled threefry hashes take XLA:CPU ~4x longer to compile.
  """
  k_params, k_train = jax.random.split(key)
  size, c = train.patch_size, config.image_channels

  def init(k):
    rbg = jax.random.wrap_key_data(jax.random.bits(k, (4,), jnp.uint32), impl="rbg")
    return EpsUNet(config).init(rbg, jnp.zeros((1, size, size, c)),
                             jnp.zeros((1,), jnp.int32))["params"]

  if params is None:
    params = jax.jit(init)(k_params)
  else:
    _check_params(traverse_util.flatten_dict(params, sep="/"), config, "initial parameters")
  return DDPMTrainState(step=jnp.int32(0), params=params, opt_state=ddpm_optimizer(train).init(params),
                    ema_params=params, key=k_train)


def adapt_channels(params: PyTree, config: UNetConfig, channels: int) -> tuple[PyTree, UNetConfig]:
  """A colour model's parameters as a grey (`channels` = 1) model's: (params, config).

  The input convolution's kernel is summed over its 3 input channels and the output
  convolution's kernel and bias averaged over its 3 outputs, so the grey model predicts
  exactly the channel mean of the colour model's epsilon for the grey image replicated to 3
  channels (grey restoration through the colour model with the iterate projected to grey at
  every step); a start for fine-tuning on grey images. ValueError for other channel changes.
  """
  if config.image_channels == channels:
    return params, config
  if (config.image_channels, channels) != (3, 1):
    raise ValueError(f"adapt_channels: only a colour (3) model becomes a grey (1) one, not "
                     f"{config.image_channels} -> {channels}")
  grey = dataclasses.replace(config, image_channels=1)
  expected = _expected_shapes(grey)
  flat = traverse_util.flatten_dict(params, sep="/")
  out = {}
  for name, value in flat.items():
    shape = expected.get(name)
    if shape is None or tuple(value.shape) == shape:
      out[name] = value
    elif value.ndim == 4 and value.shape[2] == 3:    # input kernel (3, 3, 3, C)
      out[name] = jnp.sum(value, axis=2, keepdims=True)
    else:                                              # output kernel (3, 3, C, 3), bias (3,)
      out[name] = jnp.mean(value, axis=-1, keepdims=True)
  _check_params(out, grey, "adapted parameters")
  return traverse_util.unflatten_dict(out, sep="/"), grey


def ddpm_train_step(state: DDPMTrainState, data: Dataset, config: UNetConfig,
               train: TrainConfig) -> tuple[DDPMTrainState, Array]:
  """One Adam step on train.loss of a fresh batch; returns (new state, () loss)."""
  schedule = schedules.get(config.schedule, config.num_steps)
  key, k_batch, k_loss = jax.random.split(state.key, 3)
  x0 = diffusion.to_model(sample_batch(k_batch, data, train.batch_size, train.patch_size))
  sampling = dict(t_hi=train.t_hi, frac_hi=train.frac_hi, t_lo=train.t_lo)
  if train.loss == "x0":
    loss_fn = lambda params: diffusion.x0_loss(eps_fn(config, params), schedule, x0, k_loss,
                                               ssim_weight=train.ssim_weight, **sampling)
  else:
    loss_fn = lambda params: diffusion.eps_loss(eps_fn(config, params), schedule, x0, k_loss,
                                                **sampling)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = ddpm_optimizer(train).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  d = train.ema_decay
  ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
  return DDPMTrainState(state.step + 1, params, opt_state, ema, key), loss


def make_train_fn(config: UNetConfig, train: TrainConfig,
                  num_steps: int) -> Callable[[DDPMTrainState, Dataset], tuple[DDPMTrainState, Array]]:
  """The jitted ``(state, data) -> (state, losses (num_steps,))``: :func:`ddpm_train_step` scanned
  num_steps times (num_steps = 1 is the single jitted step)."""

  def run(state, data):
    return lax.scan(lambda s, _: ddpm_train_step(s, data, config, train), state, None,
                    length=num_steps)

  return jax.jit(run)


def _expected_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
  size = config.multiple
  params = jax.eval_shape(lambda: EpsUNet(config).init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, config.image_channels)),
      jnp.zeros((1,), jnp.int32)))["params"]
  return {k: v.shape for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _check_params(flat: dict[str, Any], config: UNetConfig, source: str) -> None:
  """ValueError naming the first missing, unexpected or mis-shaped parameter."""
  expected = _expected_shapes(config)
  missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
  if missing or extra:
    raise ValueError(f"{source} does not match {config}: missing parameters {missing[:3]}, "
                     f"unexpected {extra[:3]}")
  for name, shape in expected.items():
    if tuple(flat[name].shape) != shape:
      raise ValueError(f"{source} does not match {config}: parameter {name} has shape "
                       f"{tuple(flat[name].shape)}, expected {shape}")


def save_weights(path: str | os.PathLike, params: PyTree, config: UNetConfig) -> None:
  """Writes `params` as one ``.npz``: an array 'params/<module>/.../<name>' (float32) per leaf
  and the config as JSON in 'config'. Written to a temporary file and renamed, so a killed run
  never leaves a half-written file; parent directories are created. ValueError if the path
  does not end in .npz or the parameters do not fit the config."""
  path = os.fspath(path)
  if not path.endswith(".npz"):
    raise ValueError(f"weights are written as .npz; {path} does not end in .npz")
  flat = traverse_util.flatten_dict(params, sep="/")
  _check_params(flat, config, "parameters")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, config=np.array(config.to_json()),
             **{f"params/{k}": np.asarray(v, np.float32) for k, v in flat.items()})
  os.replace(tmp, path)


def load_weights(path: str | os.PathLike,
                 config: UNetConfig | None = None) -> tuple[PyTree, UNetConfig]:
  """Reads a file of :func:`save_weights`: (params as jax arrays, the stored UNetConfig).

  Raises:
    FileNotFoundError: no such file.
    ValueError: not such a file, parameters that do not fit its config, or a stored config
      that differs from `config` (when given).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no DDPM weights file {path}")
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
    stored = UNetConfig.from_json(str(arrays.pop("config")))
  except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is not a dipjax DDPM weights file, or it is truncated or damaged "
                     f"({e}): write it again (experiments/train_ddpm.py, or git checkout of a "
                     "shipped file)") from e
  if config is not None and stored != config:
    diff = {f.name: (getattr(stored, f.name), getattr(config, f.name))
            for f in dataclasses.fields(config)
            if getattr(stored, f.name) != getattr(config, f.name)}
    raise ValueError(f"{path} holds a different model: (stored, expected) {diff}")
  flat = {k.removeprefix("params/"): v for k, v in arrays.items()}
  _check_params(flat, stored, path)
  return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()},
                                      sep="/"), stored
