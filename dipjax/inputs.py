"""The DIP network input z.

An input is a :class:`NetInput`: a fixed base plus per-channel Gaussian jitter redrawn every
training step, z = base + std * N(0, 1). DIP's ``reg_noise_std`` is a constant std; a DDPM-noised
input with fresh noise puts sqrt(1 - abar_t) on the image channels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.extend.random import threefry_2x32

from dipjax import schedules

Array = jax.Array


@struct.dataclass
class NetInput:
  """A network input distribution z = base + std * N(0, 1).

  Attributes:
    base: (H, W, Cz) float32.
    std: (Cz,) float32 >= 0, per-channel std of the per-step jitter.
  """
  base: Array
  std: Array

  @property
  def channels(self) -> int:
    """Cz, the number of input channels."""
    return self.base.shape[-1]

  def sample(self, key: Array) -> Array:
    """One draw of z, (H, W, Cz) float32; use a fresh key every training step."""
    return self.base + self.std * _standard_normal(key, self.base.shape).astype(self.base.dtype)


def _standard_normal(key: Array, shape: tuple[int, ...]) -> Array:
  """N(0, 1) float32 of ``shape``, bit for bit ``jax.random.normal`` with threefry unpartitioned.

  The per-step jitter is the one large draw of a fit. JAX's default (partitionable) threefry
  hashes a 64-bit counter per output; the classic layout, JAX's generator before 0.5 and the one
  ``jax_threefry_partitionable=False`` selects process-wide, hashes a flat 32-bit counter once
  per two outputs: half the work, e.g. 12 vs 24 ms for 256² x 32 on the 2-core CPU (~5% of a
  256²/64 step). Other key implementations draw through ``jax.random.normal``.
  """
  size = math.prod(shape)
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  if (typed and str(jax.random.key_impl(key)) != "threefry2x32") or size >= 2**32:
    return jax.random.normal(key, shape, jnp.float32)
  bits = threefry_2x32(jax.random.key_data(key), jax.lax.iota(jnp.uint32, size))
  # jax.random.uniform on [nextafter(-1, 0), 1) from the top 23 bits, then sqrt(2) erfinv.
  unit = jax.lax.bitcast_convert_type((bits >> 9) | np.uint32(0x3F800000), jnp.float32) - 1.0
  lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
  u = jnp.maximum(lo, unit * (np.float32(1.0) - lo) + lo)
  return (np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(u)).reshape(shape)


def _check_non_negative(name: str, value: float) -> None:
  if value < 0:
    raise ValueError(f"{name} must be non-negative, got {value}.")


def dip_noise(key: Array, height: int, width: int, channels: int = 32, scale: float = 0.1,
              reg_noise_std: float = 1.0 / 30) -> NetInput:
  """DIP's noise input: base uniform in [0, scale), jitter reg_noise_std on every channel.

  Matches the original's ``get_noise(channels, 'noise', (H, W), var=scale)`` (uniform_() * var).

  Returns:
    NetInput with base (height, width, channels) in [0, scale) and std (channels,).
  """
  if min(height, width, channels) < 1:
    raise ValueError(
        f"height, width and channels must be at least 1, got {height}, {width}, {channels}.")
  _check_non_negative("scale", scale)
  _check_non_negative("reg_noise_std", reg_noise_std)
  base = scale * jax.random.uniform(key, (height, width, channels), jnp.float32)
  return NetInput(base=base, std=jnp.full((channels,), reg_noise_std, jnp.float32))


def meshgrid(height: int, width: int, reg_noise_std: float = 0.0) -> NetInput:
  """DIP's 2-channel meshgrid input: channel 0 is x = arange(W) / (W - 1), channel 1 y.

  Returns:
    NetInput with base (height, width, 2) in [0, 1] and std (2,) = reg_noise_std.
  """
  if min(height, width) < 2:
    raise ValueError(f"meshgrid needs height and width of at least 2, got {height}, {width}.")
  _check_non_negative("reg_noise_std", reg_noise_std)
  xs = np.arange(width, dtype=np.float32) / (width - 1)
  ys = np.arange(height, dtype=np.float32) / (height - 1)
  base = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1)
  return NetInput(base=jnp.asarray(base), std=jnp.full((2,), reg_noise_std, jnp.float32))


def ddpm_noised(key: Array, y: Array, schedule: schedules.Schedule, t: Array | int, *,
                fresh: bool = True, extra_channels: int = 0, extra_scale: float = 0.1,
                reg_noise_std: float = 0.0) -> NetInput:
  """A DDPM-noised observation as input: z = sqrt(abar_t) y + sqrt(1 - abar_t) eps.

  y must be at the network's output resolution (for super-resolution pass an up-sampled
  observation). The image channels come first, then the extra DIP noise channels.

  Args:
    key: PRNG key (for eps when fresh=False, and for the extra channels).
    y: (H, W, C) observation in [0, 1].
    schedule: the noise schedule.
    t: int timestep in [0, T]; may be traced.
    fresh: True: base = sqrt(abar_t) y and image std = sqrt(1 - abar_t + reg_noise_std^2), so
      eps is redrawn every step (plus the usual jitter, independent). False: eps is drawn once,
      base = sqrt(abar_t) y + sqrt(1 - abar_t) eps, image std = reg_noise_std.
    extra_channels: number of DIP noise channels appended (uniform in [0, extra_scale)).
    extra_scale: scale of the extra channels.
    reg_noise_std: per-step jitter std (on the extra channels always).

  Returns:
    NetInput with base (H, W, C + extra_channels) and std (C + extra_channels,).
  """
  if y.ndim != 3:
    raise ValueError(f"y must have shape (H, W, C), got shape {y.shape}.")
  if extra_channels < 0:
    raise ValueError(f"extra_channels must be non-negative, got {extra_channels}.")
  _check_non_negative("reg_noise_std", reg_noise_std)
  if isinstance(t, (int, np.integer)) and not 0 <= t <= schedule.num_steps:
    raise ValueError(f"t must lie in [0, {schedule.num_steps}], got {t}.")
  key_eps, key_extra = jax.random.split(key)
  y = jnp.asarray(y, jnp.float32)
  abar = schedule.alphas_cumprod[t]
  channels = y.shape[-1]
  if fresh:
    base = jnp.sqrt(abar) * y
    std = jnp.full((channels,), jnp.sqrt(1.0 - abar + reg_noise_std**2), jnp.float32)
  else:
    eps = jax.random.normal(key_eps, y.shape, jnp.float32)
    base = schedules.q_sample(schedule, y, t, eps)
    std = jnp.full((channels,), reg_noise_std, jnp.float32)
  inp = NetInput(base=base, std=std)
  if extra_channels:
    extra = dip_noise(key_extra, y.shape[0], y.shape[1], extra_channels, extra_scale,
                      reg_noise_std)
    inp = NetInput(base=jnp.concatenate([inp.base, extra.base], axis=-1),
                   std=jnp.concatenate([inp.std, extra.std]))
  return inp
