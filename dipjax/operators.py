"""Forward operators A of the DIP data term ||A f(z) - y||^2.

An :class:`Operator` maps an image (H, W, C), or a batch (N, H, W, C), to its measurement:

* :class:`Identity` (denoising): A x = x.
* :class:`Mask` (inpainting): A x = x * mask, mask in {0, 1} of shape (H, W, 1) or (H, W, C).
* :class:`Downsample` (super-resolution): replication padding by `pad`, then per-channel
  filtering with `kernel` and stride `factor`: (H, W, C) -> (H / factor, W / factor, C). This is
  the original DIP code's ``Downsampler(kernel_type='lanczos2', phase=0.5, preserve_size=True)``.
* :class:`Blur` (deblurring): A x = k * x per channel, same size, with circular (FFT) or reflect
  boundaries; kernels: :func:`gaussian_kernel`, :func:`motion_kernel`, or the user's own.

The arrays (`mask`, `kernel`) are pytree leaves and everything else is static, so operators of the
same kind and shapes can be stacked (``jax.tree.map(jnp.stack, ...)``) and vmapped.

Besides A, each kind solves with its Gram matrix in closed form, (A A^T + lam I)^+ r
(:meth:`Operator.gram_solve`), which gives the data steps of the diffusion posterior solvers
exactly (:func:`data_step`): DDNM's projection onto {x : A x = y} (lam = 0) and DiffPIR's proximal
step (lam > 0). A mask's Gram matrix is diagonal, a circular blur's diagonal in Fourier, and a
downsampler's the Kronecker product of two small per-axis matrices (its kernel is separable),
solved through their eigenvectors (as DDRM's SVD of separable operators).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dipjax.layers import conv2d

Array = jax.Array

FACTORS = (2, 4, 8)
KERNELS = ("lanczos", "box")
BOUNDARIES = ("circular", "reflect")
PINV_RTOL = 1e-5  # eigenvalues + lam of A A^T below this share of the largest count as 0

# A spectral weight: eigenvalues of A A^T (any shape) -> a multiplier of the same shape.
Weight = Callable[[Array], Array]


def _gain(values: Array, lam: Array | float, weight: Weight | None) -> Array:
  """weight(values) / (values + lam), 0 where values + lam <= PINV_RTOL * max(values) (the
  pseudo-inverse; exact for lam >= PINV_RTOL * max(values))."""
  s = values + lam
  keep = s > PINV_RTOL * jnp.max(values)
  gain = jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)
  return gain if weight is None else gain * weight(values)


def _kernel_energy(kernel: Array) -> float:
  """sum k^2 of a filter kernel: the white-noise gain of filtering with it."""
  return float(np.sum(np.square(np.asarray(kernel, np.float64))))


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

  def image_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of the images whose measurements have `shape` ((..., h, w, C))."""
    return tuple(shape)

  def white_noise_gain(self) -> float:
    """E (A z)_i^2 for white z of unit variance, at a measured entry i away from the border:
    the measurement-space MSE of an image error that is white with MSE 1. 1 for the identity and
    a mask (at its known pixels); the kernel's sum of squares for a blur or a down-sampler."""
    return 1.0

  def gram_solve(self, r: Array, lam: Array | float = 0.0, weight: Weight | None = None
                 ) -> Array:
    """(A A^T + lam I)^+ r for a measurement-shaped r ((h, w, C) or (N, h, w, C)), lam >= 0,
    in closed form through A A^T's eigenvectors; eigenvalues + lam below PINV_RTOL of the
    largest eigenvalue count as 0 (the pseudo-inverse). `weight` (optional) scales each
    eigen-direction by weight(its eigenvalue): DDNM+'s per-direction lambda."""
    raise NotImplementedError(f"{type(self).__name__} has no closed-form Gram solve")


@flax.struct.dataclass
class Identity(Operator):
  """A x = x (denoising)."""

  def apply(self, x: Array) -> Array:
    return x

  def gram_solve(self, r: Array, lam: Array | float = 0.0, weight: Weight | None = None
                 ) -> Array:
    return r * _gain(jnp.ones(()), lam, weight)


@flax.struct.dataclass
class Mask(Operator):
  """A x = x * mask (inpainting); mask (H, W, 1) or (H, W, C) float32 in {0, 1}."""
  mask: Array

  def apply(self, x: Array) -> Array:
    if self.mask.shape[:2] != x.shape[-3:-1] or self.mask.shape[2] not in (1, x.shape[-1]):
      raise ValueError(f"mask of shape {self.mask.shape} does not fit images of shape {x.shape}")
    return x * self.mask

  def gram_solve(self, r: Array, lam: Array | float = 0.0, weight: Weight | None = None
                 ) -> Array:
    return r * self.mask * _gain(self.mask, lam, weight)  # A A^T = diag(mask), mask in {0, 1}


@flax.struct.dataclass
class Downsample(Operator):
  """Replication padding by `pad`, then per-channel filtering with `kernel` ((k, k) float32
  summing to 1) and stride `factor`: (H, W, C) -> (H / factor, W / factor, C)."""
  kernel: Array
  factor: int = flax.struct.field(pytree_node=False)
  pad: int = flax.struct.field(pytree_node=False)

  def white_noise_gain(self) -> float:
    return _kernel_energy(self.kernel)

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

  def image_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    return shape[:-3] + (shape[-3] * self.factor, shape[-2] * self.factor, shape[-1])

  def axis_matrix(self, n: int) -> Array:
    """The operator along one axis of n pixels, (n / factor, n) float32: A x = D_H X D_W^T per
    channel, for the separable kernels of :func:`downsampler` (kernel = outer(t, t))."""
    taps = self.kernel.sum(axis=1)  # t, the kernel's 1-D factor (t sums to 1)
    source = (jnp.arange(n // self.factor)[:, None] * self.factor
              + jnp.arange(taps.shape[0])[None, :] - self.pad)  # edge padding: clipped index
    return jnp.einsum("k,ikn->in", taps, jax.nn.one_hot(jnp.clip(source, 0, n - 1), n))

  def gram_solve(self, r: Array, lam: Array | float = 0.0, weight: Weight | None = None
                 ) -> Array:
    h, w = r.shape[-3], r.shape[-2]
    hi = jax.lax.Precision.HIGHEST
    dh, dw = self.axis_matrix(h * self.factor), self.axis_matrix(w * self.factor)
    eh, uh = jnp.linalg.eigh(jnp.matmul(dh, dh.T, precision=hi))
    ew, uw = jnp.linalg.eigh(jnp.matmul(dw, dw.T, precision=hi))
    inverse = _gain(eh[:, None] * ew[None, :], lam, weight)[:, :, None]  # A A^T = G_H (x) G_W
    coef = jnp.einsum("hi,...hwc,wj->...ijc", uh, r, uw, precision=hi)
    return jnp.einsum("hi,...ijc,wj->...hwc", uh, coef * inverse, uw, precision=hi)


@flax.struct.dataclass
class Blur(Operator):
  """A x = k * x (a convolution: the kernel flipped against a cross-correlation) per channel,
  (H, W, C) -> (H, W, C); `kernel` (k, k) float32, k odd, summing to 1, centred; 'circular'
  boundaries (periodic, by FFT: the model of most deblurring papers' synthetic data) or
  'reflect' (the image mirrored beyond its edges)."""
  kernel: Array
  boundary: str = flax.struct.field(pytree_node=False)

  def white_noise_gain(self) -> float:
    return _kernel_energy(self.kernel)

  def apply(self, x: Array) -> Array:
    k = self.kernel.shape[0]
    r = k // 2
    batch = x.reshape((-1,) + x.shape[-3:])
    n, h, w, c = batch.shape
    if self.boundary == "circular":
      spectrum = self._spectrum(h, w, batch.dtype)[None, :, :, None]
      y = jnp.fft.irfft2(jnp.fft.rfft2(batch, axes=(1, 2)) * spectrum, s=(h, w), axes=(1, 2))
      return y.astype(x.dtype).reshape(x.shape)
    if r >= min(h, w):
      raise ValueError(f"a {k}x{k} blur kernel does not fit images of shape {x.shape}")
    padded = jnp.pad(batch, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    planes = jnp.moveaxis(padded, -1, 1).reshape(n * c, h + 2 * r, w + 2 * r, 1)
    flipped = self.kernel[::-1, ::-1, None, None].astype(x.dtype)
    y = conv2d(planes, flipped)
    return jnp.moveaxis(y.reshape(n, c, h, w), 1, -1).reshape(x.shape)

  def _spectrum(self, h: int, w: int, dtype) -> Array:
    """The kernel's transfer function on an h x w periodic grid, (h, w // 2 + 1) complex."""
    k = self.kernel.shape[0]
    if k > min(h, w):
      raise ValueError(f"a {k}x{k} blur kernel does not fit images of {h}x{w} pixels")
    embedded = jnp.roll(jnp.zeros((h, w), dtype).at[:k, :k].set(self.kernel.astype(dtype)),
                        (-(k // 2), -(k // 2)), axis=(0, 1))
    return jnp.fft.rfft2(embedded)

  def gram_solve(self, r: Array, lam: Array | float = 0.0, weight: Weight | None = None
                 ) -> Array:
    if self.boundary != "circular":
      raise ValueError("a closed-form data step needs a circular blur (boundary='circular'); "
                       f"this one is {self.boundary!r}")
    h, w = r.shape[-3], r.shape[-2]
    gain = _gain(jnp.abs(self._spectrum(h, w, jnp.float32)) ** 2, lam, weight)[:, :, None]
    solved = jnp.fft.irfft2(jnp.fft.rfft2(r, axes=(-3, -2)) * gain, s=(h, w), axes=(-3, -2))
    return solved.astype(r.dtype)


def adjoint(op: Operator, y: Array, x_shape: Sequence[int]) -> Array:
  """A^T y: the transpose of `op` (linear) applied to a measurement y, into images of x_shape
  ((H, W, C) or (N, H, W, C))."""
  transpose = jax.linear_transpose(op.apply, jax.ShapeDtypeStruct(tuple(x_shape), y.dtype))
  return transpose(y)[0]


def data_step(op: Operator, x: Array, y: Array, lam: Array | float = 0.0,
              weight: Weight | None = None) -> Array:
  """x + A^T (A A^T + lam I)^+ (y - A x): the data step of the posterior solvers.

  lam = 0: the projection of x onto {x' : A x' = y} (DDNM's A^+ y + (I - A^+ A) x), exact where
  A A^T is invertible (masks, downsamplers; blur at the frequencies it keeps). lam > 0: the
  proximal point argmin_x' ||A x' - y||^2 + lam ||x' - x||^2 (DiffPIR's data step). `weight`
  scales the step along each eigen-direction of A A^T by weight(eigenvalue) (DDNM+).

  Args:
    op: a kind with :meth:`Operator.gram_solve` (not a reflect-boundary blur).
    x: image (H, W, C) or batch (N, H, W, C).
    y: measurement, op(x)'s shape.
    lam: >= 0, scalar (traced or not).
    weight: eigenvalues -> multipliers (same shape), jittable; None: 1.
  """
  residual = y - op(x)
  return x + adjoint(op, op.gram_solve(residual, lam, weight), x.shape)


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


def blur(kernel: np.ndarray, boundary: str = "circular") -> Operator:
  """Deblurring operator of `kernel` (k, k), k odd: non-negative, finite, normalised here to sum
  to 1; `boundary` 'circular' or 'reflect'."""
  k = np.asarray(kernel, np.float64)
  if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] % 2 == 0:
    raise ValueError(f"a blur kernel must be square with an odd side, got shape {k.shape}")
  if not np.all(np.isfinite(k)) or k.min() < 0 or k.sum() <= 0:
    raise ValueError("a blur kernel must be finite and non-negative with a positive sum")
  if boundary not in BOUNDARIES:
    raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
  return Blur(kernel=jnp.asarray(k / k.sum(), jnp.float32), boundary=boundary)


def gaussian_kernel(sigma: float, size: int | None = None) -> np.ndarray:
  """Isotropic Gaussian blur kernel of std `sigma` pixels, (size, size) float32 summing to 1;
  size default 2 ceil(3 sigma) + 1."""
  if not sigma > 0:
    raise ValueError(f"the Gaussian kernel's sigma must be positive, got {sigma}")
  size = 2 * math.ceil(3 * sigma) + 1 if size is None else size
  if size < 1 or size % 2 == 0:
    raise ValueError(f"kernel size must be odd and positive, got {size}")
  u = np.arange(size) - size // 2
  g = np.exp(-0.5 * (u / sigma) ** 2)
  k = np.outer(g, g)
  return (k / k.sum()).astype(np.float32)


def motion_kernel(seed: int, size: int = 31, steps: int = 200) -> np.ndarray:
  """A seeded camera-shake kernel, (size, size) float32 summing to 1: a random trajectory (a
  velocity with inertia, random kicks and a pull back to the start, after Boracchi and Foi,
  2012) scaled to the kernel's support and splatted bilinearly; the same seed, the same kernel.
  """
  if size < 3 or size % 2 == 0:
    raise ValueError(f"kernel size must be odd and >= 3, got {size}")
  rng = np.random.default_rng(seed)
  position, velocity = 0j, np.exp(2j * np.pi * rng.uniform())
  path = np.empty(steps, np.complex128)
  for t in range(steps):
    kick = rng.normal() + 1j * rng.normal()
    velocity = 0.9 * velocity + 0.3 * kick - 0.02 * position
    velocity /= max(abs(velocity), 1e-12)
    position += velocity
    path[t] = position
  path -= (path.real.min() + path.real.max()) / 2 + 1j * (path.imag.min() + path.imag.max()) / 2
  extent = max(np.ptp(path.real), np.ptp(path.imag), 1e-12)
  path *= (size - 3) / extent
  k = np.zeros((size, size))
  for z in path + (size // 2) * (1 + 1j):
    i0, j0 = int(np.floor(z.imag)), int(np.floor(z.real))
    di, dj = z.imag - i0, z.real - j0
    for a, b, weight in ((0, 0, (1 - di) * (1 - dj)), (1, 0, di * (1 - dj)),
                         (0, 1, (1 - di) * dj), (1, 1, di * dj)):
      k[i0 + a, j0 + b] += weight
  return (k / k.sum()).astype(np.float32)
