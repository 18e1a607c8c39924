"""Training losses of a DIP fit: pixel (MSE, L1), MSE + SSIM, and a VGG19 perceptual loss.

Every loss is a pure, jittable, vmappable ``loss(x, target, params) -> float32 scalar`` of two
images (H, W, C) in measurement space (values roughly in [0, 1]); `params` is the pytree the
loss needs (VGG19's weights for 'perceptual') or None. :func:`get` looks a loss up by name.

No weights ship with dipjax and nothing is downloaded at run time. For the perceptual loss,
convert torchvision's ImageNet VGG19 (``vgg19-dcbb9e9d.pth``) once with
``experiments/convert_vgg19.py`` and load the result with :func:`load_vgg19`;
:func:`init_vgg19` gives random weights (torchvision's initialisation) for tests and for users
without the file.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Sequence
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dipjax import layers as layers_lib
from dipjax import metrics

Array = jax.Array
PyTree = Any
Loss = Callable[[Array, Array, PyTree], Array]

# Weight of (1 - SSIM) in mse_ssim: against its sigma = 25 observation, the clean
# assets/house.png has MSE 0.0093 and 1 - SSIM 0.71, so at that fit both terms are ~0.009.
SSIM_WEIGHT = 0.013

# torchvision's vgg19().features: the output widths of the 3x3 convolutions of each block.
VGG19_BLOCKS = ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512),
                (512, 512, 512, 512))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PERCEPTUAL_LAYERS = ("relu1_2", "relu2_2", "relu3_4", "relu4_4", "relu5_4")
PERCEPTUAL_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0)


def _vgg19_layers() -> tuple[str, ...]:
  names = []
  for b, widths in enumerate(VGG19_BLOCKS, 1):
    for i in range(1, len(widths) + 1):
      names += [f"conv{b}_{i}", f"relu{b}_{i}"]
    names.append(f"pool{b}")
  return tuple(names)


# The layers of torchvision's vgg19().features in order: `features.{i}` is VGG19_LAYERS[i].
VGG19_LAYERS = _vgg19_layers()
_WIDTHS = {f"conv{b}_{i}": w for b, ws in enumerate(VGG19_BLOCKS, 1)
           for i, w in enumerate(ws, 1)}
# torchvision's VGG initialisation: kaiming_normal_(mode='fan_out', nonlinearity='relu').
_KAIMING = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pair(x: Array, target: Array, name: str) -> tuple[Array, Array]:
  """Checks two images (H, W, C) of equal shape; returns them as float32."""
  x, target = jnp.asarray(x), jnp.asarray(target)
  if x.shape != target.shape or x.ndim != 3:
    raise ValueError(f"{name} needs two images (H, W, C) of equal shape, got {x.shape} and "
                     f"{target.shape}")
  return x.astype(jnp.float32), target.astype(jnp.float32)


def mse(x: Array, target: Array, params: None = None) -> Array:
  """Mean squared error over all pixels and channels (DIP's loss)."""
  x, target = _pair(x, target, "mse")
  return jnp.mean(jnp.square(x - target))


def l1(x: Array, target: Array, params: None = None) -> Array:
  """Mean absolute error over all pixels and channels."""
  x, target = _pair(x, target, "l1")
  return jnp.mean(jnp.abs(x - target))


def mse_ssim(x: Array, target: Array, params: None = None, *,
             weight: float = SSIM_WEIGHT) -> Array:
  """MSE + weight * (1 - SSIM), SSIM from :func:`dipjax.metrics.ssim` (H, W >= 11)."""
  x, target = _pair(x, target, "mse_ssim")
  return jnp.mean(jnp.square(x - target)) + weight * (1.0 - metrics.ssim(x, target))


class _Conv3x3(nn.Module):
  """3x3 convolution with bias on a zero-padded input (size kept), through conv2d."""
  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = self.param("kernel", _KAIMING, (3, 3, x.shape[-1], self.features))
    b = self.param("bias", nn.initializers.zeros, (self.features,))
    return layers_lib.conv2d(layers_lib.pad2d(x, 1, "zero"), w) + b


def _max_pool(x: Array) -> Array:
  """2x2 max-pool, stride 2, odd rows / columns dropped (PyTorch's floor mode)."""
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _check_layers(names: Sequence[str], shape: tuple[int, ...]) -> int:
  """Index in VGG19_LAYERS of the deepest of `names`; ValueError if unknown or too small."""
  if not names:
    raise ValueError("VGG19 needs at least one output layer")
  unknown = [n for n in names if n not in VGG19_LAYERS]
  if unknown:
    raise ValueError(f"unknown VGG19 layers {unknown}; expected names from "
                     f"{', '.join(VGG19_LAYERS)}")
  last = max(VGG19_LAYERS.index(n) for n in names)
  side = 2**sum(n.startswith("pool") for n in VGG19_LAYERS[:last + 1])
  if len(shape) != 4 or shape[-1] not in (1, 3) or min(shape[1:3]) < side:
    raise ValueError(f"VGG19 up to {VGG19_LAYERS[last]} needs images (N, H, W, 1 or 3) with "
                     f"H, W >= {side}, got {shape}")
  return last


class VGG19(nn.Module):
  """torchvision's ``vgg19().features`` as a feature extractor, up to its deepest output.

  Takes images (N, H, W, 1 or 3) in [0, 1] (grey replicated to RGB), normalises them with
  ImageNet's mean and std as torchvision's weights expect, and returns {name: (N, h, w, c)}
  for each name in `outputs` (from VGG19_LAYERS, e.g. 'relu2_2'). Parameters are
  {'conv1_1': {'kernel': (3, 3, 3, 64), 'bias': (64,)}, ...}. The convolutions go through
  :func:`dipjax.layers.conv2d` (no XLA convolution op: gradients stay fast inside
  ``lax.scan``, and ``vmap`` gives batched GEMMs).
  """
  outputs: tuple[str, ...] = PERCEPTUAL_LAYERS

  @nn.compact
  def __call__(self, images: Array) -> dict[str, Array]:
    last = _check_layers(self.outputs, images.shape)
    x = jnp.broadcast_to(images, images.shape[:3] + (3,)).astype(jnp.float32)
    x = (x - jnp.array(IMAGENET_MEAN)) / jnp.array(IMAGENET_STD)
    features = {}
    for name in VGG19_LAYERS[:last + 1]:
      if name.startswith("conv"):
        x = _Conv3x3(_WIDTHS[name], name=name)(x)
      elif name.startswith("relu"):
        x = nn.relu(x)
      else:
        x = _max_pool(x)
      if name in self.outputs:
        features[name] = x
    return features


@jax.jit
def init_vgg19(key: Array) -> PyTree:
  """Random VGG19 parameters, distributed as :class:`VGG19`'s initialisers draw them.

  One normal draw cut into the 16 kernels, compiled once: ``VGG19().init`` compiles a
  random-number kernel per kernel shape and runs the network eagerly (~9 s on the 2-core CPU,
  against ~1.5 s).
  """
  widths = tuple(_WIDTHS.values())
  shapes = [(3, 3, cin, cout) for cin, cout in zip((3,) + widths[:-1], widths)]
  z = jax.random.normal(key, (sum(math.prod(s) for s in shapes),))
  params, start = {}, 0
  for name, shape in zip(_WIDTHS, shapes):
    size = math.prod(shape)
    std = math.sqrt(2 / (9 * shape[3]))  # He normal over fan-out, as _KAIMING
    params[name] = {"kernel": std * z[start:start + size].reshape(shape),
                    "bias": jnp.zeros(shape[3])}
    start += size
  return params


def _array(arrays: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...],
           source: str) -> Array:
  if key not in arrays:
    raise ValueError(f"{source} has no array {key!r}; expected torchvision's vgg19().features "
                     "state dict converted by experiments/convert_vgg19.py")
  a = np.asarray(arrays[key])
  if a.shape != shape:
    oihw = len(shape) == 4 and a.shape == (shape[3], shape[2], shape[0], shape[1])
    hint = " (PyTorch's OIHW layout: convert it with experiments/convert_vgg19.py)" if oihw else ""
    raise ValueError(f"{source}: {key} has shape {a.shape}, expected {shape}{hint}")
  return jnp.asarray(a, jnp.float32)


def vgg19_from_arrays(arrays: Mapping[str, np.ndarray], source: str = "arrays") -> PyTree:
  """VGG19 parameters from arrays named like torchvision's state dict, kernels in HWIO.

  Args:
    arrays: 'features.{i}.weight' (3, 3, C_in, C_out) and 'features.{i}.bias' (C_out,) for
      each convolution i of VGG19_LAYERS; other keys are ignored.
    source: what the arrays came from, for error messages.

  Returns:
    The parameters of :class:`VGG19` (float32); ValueError naming `source` if a key is
    missing or a shape is wrong.
  """
  params, cin = {}, 3
  for i, name in enumerate(VGG19_LAYERS):
    if name in _WIDTHS:
      cout = _WIDTHS[name]
      params[name] = {"kernel": _array(arrays, f"features.{i}.weight", (3, 3, cin, cout), source),
                      "bias": _array(arrays, f"features.{i}.bias", (cout,), source)}
      cin = cout
  return params


def load_vgg19(path: str | os.PathLike) -> PyTree:
  """VGG19 parameters from an .npz file written by experiments/convert_vgg19.py.

  Raises FileNotFoundError if `path` does not exist and ValueError if it is not an .npz file
  or lacks an array or has one of the wrong shape; every message names the file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"VGG19 weights file {path} not found; convert torchvision's "
                            "vgg19-dcbb9e9d.pth with experiments/convert_vgg19.py")
  try:
    data = np.load(path)
  except OSError as e:
    raise ValueError(f"cannot read {path}: {e}") from None
  except (ValueError, zipfile.BadZipFile):
    raise ValueError(f"{path} is not an .npz file") from None
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ValueError(f"{path} is a single array, not an .npz file of named arrays")
  with data:
    return vgg19_from_arrays(data, source=path)


def perceptual(x: Array, target: Array, params: PyTree, *,
               layers: Sequence[str] = PERCEPTUAL_LAYERS,
               weights: Sequence[float] = PERCEPTUAL_WEIGHTS) -> Array:
  """Weighted sum over `layers` of the mean squared difference of VGG19 features.

  Args:
    x, target: images (H, W, 1 or 3) in [0, 1]; H, W >= 16 for the default (block 5) layers.
    params: VGG19 parameters (:func:`load_vgg19` or :func:`init_vgg19`).
    layers: names from VGG19_LAYERS; the network runs only up to the deepest.
    weights: one weight per layer.

  Returns:
    sum_l weights[l] * mean((phi_l(x) - phi_l(target))^2), a float32 scalar.
  """
  x, target = _pair(x, target, "perceptual")
  layers, weights = tuple(layers), tuple(weights)
  if len(layers) != len(weights):
    raise ValueError(f"perceptual needs one weight per layer, got {len(layers)} layers and "
                     f"{len(weights)} weights")
  net = VGG19(outputs=layers)
  fx = net.apply({"params": params}, x[None])
  ft = net.apply({"params": params}, target[None])
  return sum(w * jnp.mean(jnp.square(fx[n] - ft[n])) for n, w in zip(layers, weights))


LOSSES: dict[str, Loss] = {"mse": mse, "l1": l1, "mse_ssim": mse_ssim, "perceptual": perceptual}


def get(name: str) -> Loss:
  """The loss called `name`; ValueError listing the valid names otherwise."""
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
  return LOSSES[name]


def needs_params(name: str) -> bool:
  """Whether the loss called `name` needs a params pytree (VGG19 weights): 'perceptual' only."""
  return get(name) is perceptual
