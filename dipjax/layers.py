"""The one convolution of dipjax, and the layers built on it.

Every convolution in dipjax (network layers, the down-sampling operator) goes through
:func:`conv2d`, so how a convolution is lowered is decided here and nowhere else.

Layout: activations (N, H, W, C), kernels (kh, kw, C_in, C_out), float32.

Why a custom VJP: on XLA:CPU the weight gradient of a convolution placed inside a loop body
(``lax.scan`` / ``fori_loop``) runs ~43x slower than the same op outside a loop (jax-ml/jax#12868),
which makes a scanned DIP fit ~16x slower than a Python loop of jitted steps. Here the weight
gradient is written as patches x matmul (im2col, one GEMM) and the input gradient as a plain
forward convolution of the (dilated, padded) cotangent with the flipped kernel; both run at full
speed inside loops, and the maths is exactly the convolution's VJP.
"""

from __future__ import annotations

import functools

import jax
import flax.linen as nn
import jax.numpy as jnp
from jax import lax

Array = jax.Array

_DIMS = ("NHWC", "HWIO", "NHWC")


def _forward(x: Array, w: Array, stride: int) -> Array:
  return lax.conv_general_dilated(
      x, w, (stride, stride), "VALID", dimension_numbers=_DIMS)


def _patches(x: Array, kh: int, kw: int, stride: int, ho: int, wo: int) -> Array:
  """im2col: (N, H, W, C) -> (N*ho*wo, kh*kw*C), ordered (i, j, c) like an HWIO kernel."""
  cols = [
      lax.slice(x, (0, i, j, 0),
                (x.shape[0], i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, x.shape[3]),
                (1, stride, stride, 1))
      for i in range(kh) for j in range(kw)
  ]
  return jnp.concatenate(cols, axis=-1).reshape(-1, kh * kw * x.shape[3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x: Array, w: Array, stride: int = 1) -> Array:
  """VALID 2-D convolution (cross-correlation, as in every deep-learning framework).

  Args:
    x: (N, H, W, C_in) input, already padded as the caller wants.
    w: (kh, kw, C_in, C_out) kernel.
    stride: spatial stride (same for both axes).

  Returns:
    (N, (H - kh) // stride + 1, (W - kw) // stride + 1, C_out).
  """
  return _forward(x, w, stride)


def _conv2d_fwd(x, w, stride):
  return _forward(x, w, stride), (x, w)


def _conv2d_bwd(stride, res, g):
  x, w = res
  kh, kw, cin, cout = w.shape
  n, ho, wo, _ = g.shape
  # Weight gradient: one GEMM of im2col patches with the cotangent.
  dw = jnp.dot(_patches(x, kh, kw, stride, ho, wo).T, g.reshape(-1, cout),
               preferred_element_type=g.dtype).reshape(kh, kw, cin, cout)
  # Input gradient: dilate the cotangent by the stride, pad by kernel-1 (plus the rows/columns
  # the strided forward never reached), then a forward conv with the flipped, transposed kernel.
  rh = x.shape[1] - (stride * (ho - 1) + kh)
  rw = x.shape[2] - (stride * (wo - 1) + kw)
  g = lax.pad(g, jnp.zeros((), g.dtype),
              ((0, 0, 0), (kh - 1, kh - 1 + rh, stride - 1), (kw - 1, kw - 1 + rw, stride - 1),
               (0, 0, 0)))
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  dx = _forward(g, w_t, 1)
  return dx.astype(x.dtype), dw.astype(w.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def pad2d(x: Array, pad: int, mode: str) -> Array:
  """Pads the two spatial axes of (N, H, W, C) by `pad`; mode 'reflect' | 'zero'."""
  if pad == 0:
    return x
  widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return jnp.pad(x, widths, mode="reflect" if mode == "reflect" else "constant")


def upsample2x(x: Array, mode: str) -> Array:
  """2x spatial up-sampling of (N, H, W, C): 'nearest', or 'bilinear'.

  'bilinear' equals PyTorch's ``nn.Upsample(scale_factor=2, mode='bilinear')``
  (align_corners=False, edges clamped): each output pixel is 3/4 of its nearest input pixel plus
  1/4 of the next one, written as shifted slices (much cheaper than a general resize).
  """
  if mode == "nearest":
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  if mode != "bilinear":
    raise ValueError(f"unknown up-sampling mode {mode!r}; expected 'nearest' or 'bilinear'")
  for axis in (1, 2):
    n = x.shape[axis]
    prev = jnp.concatenate([lax.slice_in_dim(x, 0, 1, axis=axis),
                            lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
    nxt = jnp.concatenate([lax.slice_in_dim(x, 1, n, axis=axis),
                           lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)
    even = 0.75 * x + 0.25 * prev
    odd = 0.75 * x + 0.25 * nxt
    x = jnp.stack([even, odd], axis=axis + 1)
    shape = list(x.shape)
    shape[axis:axis + 2] = [2 * n]
    x = x.reshape(shape)
  return x


def _torch_uniform(fan_in_axes: tuple[int, ...]):
  """PyTorch's default conv initialiser, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as DIP used it."""

  def init(key, shape, dtype=jnp.float32, fan_in=None):
    if fan_in is None:
      fan_in = 1
      for a in fan_in_axes:
        fan_in *= shape[a]
    bound = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Conv(nn.Module):
  """Padded 2-D convolution through :func:`conv2d`, with PyTorch's default initialisation.

  Padding keeps the size (divided by `stride`): (k - 1) // 2 pixels each side, reflected
  ('reflect', the DIP default) or zeros ('zero').
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: str = "reflect"
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, cin = self.kernel_size, x.shape[-1]
    w = self.param("kernel", _torch_uniform((0, 1, 2)), (k, k, cin, self.features))
    y = conv2d(pad2d(x, (k - 1) // 2, self.padding), w, self.stride)
    if self.use_bias:
      b = self.param("bias", lambda key, s: _torch_uniform(())(key, s, fan_in=k * k * cin),
                     (self.features,))
      y = y + b
    return y


class ConvBlock(nn.Module):
  """Conv -> BatchNorm (batch statistics when `train`) -> LeakyReLU(0.2): DIP's unit."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: str = "reflect"

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    x = Conv(self.features, self.kernel_size, self.stride, self.padding)(x)
    x = batch_norm(x, train)
    return nn.leaky_relu(x, 0.2)


def batch_norm(x: Array, train: bool) -> Array:
  """BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5), inside a compact module."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
