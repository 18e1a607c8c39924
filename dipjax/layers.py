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
