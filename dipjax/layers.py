"""The one convolution of dipjax, and the layers built on it.

Every convolution in dipjax (network layers, the down-sampling operator) goes through
:func:`conv2d`, so how a convolution is lowered is decided here and nowhere else.

Layout: activations (N, H, W, C), kernels (kh, kw, C_in, C_out).

No convolution op is emitted at all: every convolution is written as matrix products, for three
measured reasons (docs/PERFORMANCE.md).
1. The XLA:CPU loop trap: the weight gradient of a convolution inside a loop body (``lax.scan``)
   runs ~43x slower than outside one (jax-ml/jax#12868), which makes a scanned DIP fit ~16x
   slower than a Python loop. Matrix products and their gradients run at full speed in loops.
2. Many fits: ``vmap`` over per-model weights turns a convolution into a grouped convolution
   (16x slower than the same maths as batched GEMMs on this CPU); a matrix product simply gains
   a batch dimension.
3. Speed: a 3x3, stride-1 convolution on a large image runs as Winograd F(m x m, 3x3), m = 2 or 4
   (:func:`winograd_tile`): (m + 2)^2 GEMMs on transformed tiles, 2.25x (m = 2) or 4x (m = 4)
   fewer multiplications than direct convolution, with its own VJP whose gradients are GEMMs in
   the same transformed domain.
Everything else (strides, 1x1 and other kernels, small images) is im2col: one GEMM of the
patches with the flattened kernel, differentiated by JAX (the patches' gradient is col2im).
"""

from __future__ import annotations

import functools

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

# Which Winograd tile pays, by output size (`experiments/benchmark.py` layer table, 2-core CPU):
# below 32x32 the transforms' overhead dominates (im2col wins at 16^2); from 64x64 on F(4x4, 3x3)
# (4x fewer multiplications, 2.25x the input's size transformed) beats F(2x2, 3x3) (2.25x, 4x).
WINOGRAD_MIN_PIXELS = 32 * 32
WINOGRAD_F4_MIN_PIXELS = 64 * 64


def conv2d(x: Array, w: Array, stride: int = 1) -> Array:
  """VALID 2-D convolution (cross-correlation, as in every deep-learning framework).

  Args:
    x: (N, H, W, C_in) input, already padded as the caller wants.
    w: (kh, kw, C_in, C_out) kernel.
    stride: spatial stride (same for both axes).

  Returns:
    (N, (H - kh) // stride + 1, (W - kw) // stride + 1, C_out), in x's dtype.
  """
  kh, kw, cin, _ = w.shape
  if x.ndim != 4 or x.shape[3] != cin:
    raise ValueError(f"conv2d: input {x.shape} does not match kernel {w.shape}")
  ho, wo = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  m = winograd_tile(x.shape, w.shape, stride, x.dtype)
  return winograd_conv3x3(x, w, m) if m else _gemm_conv(x, w, stride, ho, wo)


def winograd_tile(x_shape: tuple[int, ...], w_shape: tuple[int, ...], stride: int,
                  dtype=jnp.float32) -> int:
  """The output tile m of the Winograd F(m x m, 3x3) that :func:`conv2d` uses, 0 for im2col.

  F(4x4)'s transforms (coefficients up to 8) amplify rounding ~10x more than F(2x2)'s: fine in
  float32 (~1e-5 relative), too much for bfloat16's 8-bit mantissa, which gets F(2x2) at most.
  """
  kh, kw = w_shape[:2]
  ho, wo = x_shape[1] - 2, x_shape[2] - 2
  if (kh, kw, stride) != (3, 3, 1) or ho * wo < WINOGRAD_MIN_PIXELS:
    return 0
  if ho % 4 == wo % 4 == 0 and ho * wo >= WINOGRAD_F4_MIN_PIXELS and \
      jnp.dtype(dtype).itemsize >= 4:
    return 4
  return 2 if ho % 2 == wo % 2 == 0 else 0


def _patches(x: Array, kh: int, kw: int, stride: int, ho: int, wo: int) -> Array:
  """im2col: (N, H, W, C) -> (N, ho, wo, kh*kw*C), ordered (i, j, c) like an HWIO kernel.

  Gathered in two passes (kh row slices, then kw column slices), so large kernels (the
  super-resolution operator's 32x32) cost kh + kw slices, not kh * kw.
  """
  if kh == kw == 1:
    return x[:, ::stride, ::stride][:, :ho, :wo]
  rows = jnp.stack([lax.slice_in_dim(x, i, i + stride * (ho - 1) + 1, stride, axis=1)
                    for i in range(kh)], axis=3)                       # (N, ho, W, kh, C)
  cols = jnp.stack([lax.slice_in_dim(rows, j, j + stride * (wo - 1) + 1, stride, axis=2)
                    for j in range(kw)], axis=4)                       # (N, ho, wo, kh, kw, C)
  return cols.reshape(x.shape[0], ho, wo, kh * kw * x.shape[3])


def _gemm_conv(x: Array, w: Array, stride: int, ho: int, wo: int) -> Array:
  kh, kw, cin, cout = w.shape
  return jnp.dot(_patches(x, kh, kw, stride, ho, wo), w.reshape(kh * kw * cin, cout))


# Winograd F(m x m, 3x3) (Lavin & Gray 2016): Y = A^T [(G g G^T) * (B^T d B)] A for each
# (m + 2)^2 input tile d (stride m, overlapping) and m x m output tile Y. The transforms are
# additions of strided slices with the matrices' constant coefficients (XLA fuses them); the
# (m + 2)^2 products are one batched GEMM over the tile positions.
_WINOGRAD = {  # m: (B^T, G, A^T)
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
         [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}


def _combine(mat, xs: list[Array]) -> list[Array]:
  """[sum_i mat[a][i] * xs[i] for each row a], skipping zero coefficients."""
  out = []
  for row in mat:
    terms = [x if c == 1 else -x if c == -1 else x * float(c)  # weak type: keeps bf16
             for c, x in zip(row, xs) if c != 0]
    acc = terms[0]
    for term in terms[1:]:
      acc = acc + term
    out.append(acc)
  return out


def _tiles(x: Array, axis: int, m: int) -> list[Array]:
  """The m + 2 overlapping stride-m row sets of an axis of length m * n + 2, each of length n."""
  n = (x.shape[axis] - 2) // m
  return [lax.slice_in_dim(x, i, i + m * (n - 1) + 1, m, axis) for i in range(m + 2)]


def _untiles(ds: list[Array], axis: int, m: int) -> Array:
  """Transpose of :func:`_tiles`: overlap-adds the row sets back into length m * n + 2.

  Row set i lands on positions i, i + m, ...: residue class c gets set c, plus set c + m one
  tile later; the m classes are then interleaved (no strided scatter, no full-size sums).
  """
  shift = lambda d, lo: lax.pad(d, jnp.zeros((), d.dtype),
                                [(lo, 1 - lo, 0) if a == axis else (0, 0, 0)
                                 for a in range(d.ndim)])
  classes = [shift(ds[c], 0) + shift(ds[c + m], 1) if c + m < len(ds) else shift(ds[c], 0)
             for c in range(m)]
  full = _interleave(classes, axis)                  # length m * (n + 1)
  return lax.slice_in_dim(full, 0, full.shape[axis] - (m - 2), axis=axis)


def _interleave(ys: list[Array], axis: int) -> Array:
  """ys[i] (..., n, ...) -> (..., len(ys) * n, ...) with ys[i] at positions i, i + len(ys), ..."""
  shape = list(ys[0].shape)
  shape[axis] *= len(ys)
  return jnp.stack(ys, axis=axis + 1).reshape(shape)


def _strided(y: Array, axis: int, m: int) -> list[Array]:
  """Transpose of :func:`_interleave`."""
  return [lax.slice_in_dim(y, i, None, m, axis) for i in range(m)]


def _transpose(mat) -> list[list[float]]:
  return [list(col) for col in zip(*mat)]


def _input_transform(x: Array, m: int) -> Array:
  """(N, m*h+2, m*w+2, C) -> V ((m+2)^2, N*h*w, C): B^T d B of every tile."""
  bt = _WINOGRAD[m][0]
  rows = jnp.stack(_combine(bt, _tiles(x, 1, m)))                # (t, N, h, W + 2, C)
  v = jnp.stack(_combine(bt, _tiles(rows, 3, m)), axis=1)        # (t, t, N, h, w, C)
  return v.reshape((m + 2)**2, -1, x.shape[3])


def _input_transform_transpose(dv: Array, m: int, n: int, h: int, w: int) -> Array:
  b, t = _transpose(_WINOGRAD[m][0]), m + 2
  dv = dv.reshape(t, t, n, h, w, dv.shape[-1])
  rows = [_untiles(_combine(b, [dv[r, s] for s in range(t)]), 2, m) for r in range(t)]
  return _untiles(_combine(b, rows), 1, m)


def _output_transform(mm: Array, m: int, n: int, h: int, w: int) -> Array:
  """M ((m+2)^2, N*h*w, K) -> (N, m*h, m*w, K): A^T M A of every tile, tiles side by side."""
  at, t = _WINOGRAD[m][2], m + 2
  mm = mm.reshape(t, t, n, h, w, mm.shape[-1])
  cols = [_combine(at, [mm[r, s] for s in range(t)]) for r in range(t)]   # cols[r][v]
  y = [_combine(at, [cols[r][v] for r in range(t)]) for v in range(m)]    # y[v][u]
  return _interleave([_interleave([y[v][u] for v in range(m)], 2) for u in range(m)], 1)


def _output_transform_transpose(g: Array, m: int) -> Array:
  """Transpose of :func:`_output_transform`: (N, m*h, m*w, K) -> dM ((m+2)^2, N*h*w, K)."""
  a = _transpose(_WINOGRAD[m][2])
  rows = jnp.stack(_combine(a, _strided(g, 1, m)))
  dm = jnp.stack(_combine(a, _strided(rows, 3, m)), axis=1)
  return dm.reshape((m + 2)**2, -1, g.shape[-1])


def _kernel_matrix(m: int, dtype) -> Array:
  return jnp.asarray(np.array(_WINOGRAD[m][1], np.float32), dtype)


def _bmm(a: Array, b: Array, contract: tuple[int, int]) -> Array:
  """Batched over the leading (tile position) axis: contracts a's and b's given axes."""
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0,), (0,))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def winograd_conv3x3(x: Array, w: Array, m: int = 2) -> Array:
  """3x3 stride-1 VALID convolution as Winograd F(m x m, 3x3), m in {2, 4}.

  x: (N, H, W, C) with H - 2 and W - 2 multiples of m; w: (3, 3, C, K). Equals :func:`conv2d`
  up to float rounding (relative error ~1e-6 for m = 2, ~1e-5 for m = 4 in fp32).
  """
  return _winograd_fwd(x, w, m)[0]


def _winograd_fwd(x, w, m):
  n, hp, wp, _ = x.shape
  g = _kernel_matrix(m, w.dtype)
  u = jnp.einsum("ai,ijck,bj->abck", g, w, g).reshape((m + 2)**2, *w.shape[2:])
  v = _input_transform(x, m)
  y = _output_transform(_bmm(v, u, (2, 1)), m, n, (hp - 2) // m, (wp - 2) // m)
  return y, (v, u, x.shape)


def _winograd_bwd(m, res, g):
  v, u, (n, hp, wp, _) = res
  dm = _output_transform_transpose(g, m)
  du = _bmm(v, dm, (1, 1)).reshape(m + 2, m + 2, *u.shape[1:])
  gm = _kernel_matrix(m, du.dtype)
  dw = jnp.einsum("ai,abck,bj->ijck", gm, du, gm)
  dx = _input_transform_transpose(_bmm(dm, jnp.swapaxes(u, 1, 2), (2, 1)), m, n,
                                  (hp - 2) // m, (wp - 2) // m)
  return dx, dw


winograd_conv3x3.defvjp(_winograd_fwd, _winograd_bwd)


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
  return _bilinear2x(x)


@jax.custom_vjp
def _bilinear2x(x: Array) -> Array:
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


def _bilinear2x_transpose(g: Array) -> Array:
  """The adjoint of :func:`_bilinear2x`, (N, 2h, 2w, C) -> (N, h, w, C), in one fused pass.

  Per axis, input pixel i receives 1/4, 3/4, 3/4, 1/4 of outputs 2i - 1 ... 2i + 2; the clamped
  edges are exactly an edge-replicated pad of g. (Autodiff of the forward's slices and
  concatenates materialises four half-size arrays: ~3x slower at 256^2 x 64.)
  """
  _, hh, ww, _ = g.shape
  gp = jnp.pad(g, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  taps = (0.25, 0.75, 0.75, 0.25)
  shifted = [gp[:, a:a + hh - 1:2, b:b + ww - 1:2] for a in range(4) for b in range(4)]
  return _combine([[wa * wb for wa in taps for wb in taps]], shifted)[0]


_bilinear2x.defvjp(lambda x: (_bilinear2x(x), None), lambda _, g: (_bilinear2x_transpose(g),))


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
  ('reflect', the DIP default) or zeros ('zero'). Parameters are float32; `dtype` is the compute
  dtype (bfloat16 for mixed precision: input and kernel cast, output in bfloat16).
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: str = "reflect"
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, cin = self.kernel_size, x.shape[-1]
    w = self.param("kernel", _torch_uniform((0, 1, 2)), (k, k, cin, self.features))
    x = pad2d(x.astype(self.dtype), (k - 1) // 2, self.padding)
    y = conv2d(x, w.astype(self.dtype), self.stride)
    if self.use_bias:
      b = self.param("bias", lambda key, s: _torch_uniform(())(key, s, fan_in=k * k * cin),
                     (self.features,))
      y = y + b.astype(self.dtype)
    return y


class ConvBlock(nn.Module):
  """Conv -> BatchNorm (batch statistics when `train`) -> LeakyReLU(0.2): DIP's unit."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: str = "reflect"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    x = Conv(self.features, self.kernel_size, self.stride, self.padding, dtype=self.dtype)(x)
    x = batch_norm(x, train, self.dtype)
    return nn.leaky_relu(x, 0.2)


def batch_norm(x: Array, train: bool, dtype: jnp.dtype = jnp.float32) -> Array:
  """BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5), inside a compact module.

  Statistics are computed in float32 whatever the compute `dtype`."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype)(x)
