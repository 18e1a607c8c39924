"""Forward operators A of the DIP data term ||A f(z) - y||^2.

An :class:`Operator` maps an image (H, W, C), or a batch (N, H, W, C), to its measurement:

* :class:`Identity` (denoising): A x = x.
* :class:`Mask` (inpainting): A x = x * mask, mask in {0, 1} of shape (H, W, 1) or (H, W, C).
* :class:`Downsample` (super-resolution): replication padding by `pad`, then per-channel
  filtering with `kernel` and stride `factor`: (H, W, C) -> (H / factor, W / factor, C). This is
  the original DIP code's ``Downsampler(kernel_type='lanczos2', phase=0.5, preserve_size=True)``.

The arrays (`mask`, `kernel`) are pytree leaves and everything else is static, so operators of the
same kind and shapes can be stacked (``jax.tree.map(jnp.stack, ...)``) and vmapped.
"""

from __future__ import annotations

from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dipjax.layers import conv2d

Array = jax.Array

FACTORS = (2, 4, 8)
KERNELS = ("lanczos", "box")


def check_divisible(shape: Sequence[int], factor: int) -> None:
  """Raises ValueError unless H and W of `shape` (..., H, W, C) are multiples of `factor`."""
  h, w = shape[-3], shape[-2]
  if h % factor or w % factor:
    raise ValueError(
        f"image size {h}x{w} is not divisible by the super-resolution factor {factor}")


class Operator:
  """A linear forward operator A; the kinds below are its subclasses, built by
  :func:`identity`, :func:`inpainting` and :func:`downsampler`.

  Each kind is a ``flax.struct.dataclass``: its arrays are pytree leaves and its integers
  static, so operators of one kind and shape stack and vmap.
  """

  def __call__(self, x: Array) -> Array:
    """Measurement of `x`, (H, W, C) or (N, H, W, C), with the same rank as `x`."""
    if x.ndim not in (3, 4):
      raise ValueError(f"expected an image (H, W, C) or a batch (N, H, W, C), got shape {x.shape}")
    return self.apply(x)

  def apply(self, x: Array) -> Array:
    """A x for a checked image or batch."""
    raise NotImplementedError

  def measurement_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape A maps an image of `shape` ((..., H, W, C)) to."""
    return tuple(shape)


@flax.struct.dataclass
class Identity(Operator):
  """A x = x (denoising)."""

  def apply(self, x: Array) -> Array:
    return x


@flax.struct.dataclass
class Mask(Operator):
  """A x = x * mask (inpainting); mask (H, W, 1) or (H, W, C) float32 in {0, 1}."""
  mask: Array

  def apply(self, x: Array) -> Array:
    if self.mask.shape[:2] != x.shape[-3:-1] or self.mask.shape[2] not in (1, x.shape[-1]):
      raise ValueError(f"mask of shape {self.mask.shape} does not fit images of shape {x.shape}")
    return x * self.mask


@flax.struct.dataclass
class Downsample(Operator):
  """Replication padding by `pad`, then per-channel filtering with `kernel` ((k, k) float32
  summing to 1) and stride `factor`: (H, W, C) -> (H / factor, W / factor, C)."""
  kernel: Array
  factor: int = flax.struct.field(pytree_node=False)
  pad: int = flax.struct.field(pytree_node=False)

  def apply(self, x: Array) -> Array:
    out_shape = self.measurement_shape(x.shape)  # Raises if H, W are not multiples of factor.
    x = x.reshape((-1,) + x.shape[-3:])
    n, h, w, c = x.shape
    x = jnp.moveaxis(x, -1, 1).reshape(n * c, h, w, 1)
    p = self.pad
    x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
    y = conv2d(x, self.kernel[:, :, None, None].astype(x.dtype), self.factor)
    return jnp.moveaxis(y.reshape(n, c, h // self.factor, w // self.factor), 1, -1).reshape(
        out_shape)

  def measurement_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    check_divisible(shape, self.factor)
    h, w, c = shape[-3:]
    return shape[:-3] + (h // self.factor, w // self.factor, c)


def identity() -> Operator:
  """A x = x (denoising)."""
  return Identity()


def inpainting(mask: Array) -> Operator:
  """A x = x * mask (inpainting); `mask` (H, W), (H, W, 1) or (H, W, C), 1 = known pixel.

  The mask is binarised at 0.5 (values >= 0.5 count as known) and stored as float32 with a
  channel axis.
  """
  mask = jnp.asarray(mask)
  if mask.ndim == 2:
    mask = mask[..., None]
  if mask.ndim != 3:
    raise ValueError(f"mask must have shape (H, W), (H, W, 1) or (H, W, C), got {mask.shape}")
  return Mask(mask=(mask >= 0.5).astype(jnp.float32))


def lanczos_kernel(factor: int, support: int = 2) -> np.ndarray:
  """DIP's half-phase Lanczos kernel, (4 * factor, 4 * factor) float32 summing to 1.

  Port of ``get_kernel(factor, 'lanczos', phase=0.5, kernel_width=4 * factor + 1, support=2)``.
  """
  width = 4 * factor + 1
  center = (width + 1) / 2
  d = np.abs(np.arange(1, width) + 0.5 - center) / factor
  safe = np.where(d == 0, 1.0, d)
  taps = np.where(
      d == 0, 1.0,
      support * np.sin(np.pi * safe) * np.sin(np.pi * safe / support) / (np.pi**2 * safe**2))
  kernel = np.outer(taps, taps)
  return (kernel / kernel.sum()).astype(np.float32)


def box_kernel(factor: int) -> np.ndarray:
  """(factor, factor) float32 box filter, every entry 1 / factor^2."""
  return np.full((factor, factor), 1.0 / factor**2, np.float32)


def downsampler(factor: int, kernel: str = "lanczos") -> Operator:
  """Super-resolution operator: (H, W, C) -> (H / factor, W / factor, C).

  Args:
    factor: 2, 4 or 8.
    kernel: 'lanczos' (DIP's 'lanczos2', the default) or 'box' (block averaging).

  Returns:
    A :class:`Downsample` with DIP's size-preserving replication padding:
    (k - 1) / 2 for an odd kernel size k, (k - factor) / 2 for an even one.
  """
  if factor not in FACTORS:
    raise ValueError(f"super-resolution factor must be one of {FACTORS}, got {factor}")
  if kernel not in KERNELS:
    raise ValueError(f"unknown down-sampling kernel {kernel!r}; expected 'lanczos' or 'box'")
  k = lanczos_kernel(factor) if kernel == "lanczos" else box_kernel(factor)
  size = k.shape[0]
  pad = (size - 1) // 2 if size % 2 else (size - factor) // 2
  return Downsample(kernel=jnp.asarray(k), factor=factor, pad=pad)
