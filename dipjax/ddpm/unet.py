"""The epsilon-prediction U-Net of the DDPM (Ho et al. 2020), small enough to train on a CPU.

Input x_t (N, H, W, C) in the DDPM's [-1, 1] convention (:func:`dipjax.ddpm.diffusion.to_model`
maps dipjax's [0, 1] images there) and the timestep t (N,) int in [0, T]; output the predicted
noise eps (N, H, W, C), unit variance. Per level: residual blocks (GroupNorm, SiLU, 3x3 conv,
the time embedding added in between); a stride-2 conv down, nearest up-sampling + conv up; the
up path concatenates the down path's activations. Optional single-head self-attention in the
middle block (the lowest resolution). The network is fully convolutional (attention attends
over all positions of any size): a model trained on 64x64 patches runs on any H, W that are
multiples of ``UNetConfig.multiple``.

Every convolution goes through :func:`dipjax.layers.conv2d` (GEMMs / Winograd, no convolution
op): on XLA:CPU a native convolution's weight gradient inside ``lax.scan`` runs ~43x slower.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dipjax import layers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The U-Net's architecture and the timestep convention it was trained with.

  Attributes:
    channels: channels of the first level; also the sinusoidal embedding's size (the time MLP
      has 4 x channels).
    channel_mults: per level, its channels as a multiple of `channels`; len(channel_mults)
      levels, with a 2x down-sampling between consecutive ones.
    num_res_blocks: residual blocks per level in the down path (the up path has one more).
    attention: self-attention between the middle block's two residual blocks.
    image_channels: 3 for colour, 1 for a grey model.
    norm_groups: GroupNorm groups; must divide channels x every multiplier.
    schedule, num_steps: the noise schedule the model was trained on,
      ``schedules.get(schedule, num_steps)``; t indexes it.
  """
  channels: int = 64
  channel_mults: tuple[int, ...] = (1, 2, 2)
  num_res_blocks: int = 2
  attention: bool = False
  image_channels: int = 3
  norm_groups: int = 8
  schedule: str = "linear"
  num_steps: int = 1000

  def __post_init__(self):
    object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
    widths = [self.channels * m for m in self.channel_mults]
    checks = [
        (self.channels < 1 or not self.channel_mults or min(self.channel_mults) < 1,
         f"channels and channel_mults must be positive, got {self.channels}, "
         f"{self.channel_mults}"),
        (self.num_res_blocks < 1, f"num_res_blocks must be >= 1, got {self.num_res_blocks}"),
        (self.image_channels not in (1, 3),
         f"image_channels must be 1 or 3, got {self.image_channels}"),
        (self.norm_groups < 1 or any(w % self.norm_groups for w in widths),
         f"norm_groups={self.norm_groups} must divide every level's channels {widths}"),
        (self.num_steps < 1, f"num_steps must be >= 1, got {self.num_steps}"),
    ]
    for failed, message in checks:
      if failed:
        raise ValueError(f"UNetConfig: {message}")

  @property
  def multiple(self) -> int:
    """H and W must be multiples of this: 2^(number of down-samplings)."""
    return 2 ** (len(self.channel_mults) - 1)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> UNetConfig:
    """Inverse of :meth:`to_json`; ValueError for unknown or missing fields."""
    fields = json.loads(text)
    names = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(fields, dict) or set(fields) != names:
      got = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
      raise ValueError(f"not a UNetConfig: expected fields {sorted(names)}, got {got}")
    return cls(**fields)


def timestep_embedding(t: Array, dim: int) -> Array:
  """Sinusoidal embedding of timesteps (N,) -> (N, dim): sin then cos of t * 10000^(-i / half)
  for i < half = dim // 2 (zero-padded to an odd dim), as in DDPM / guided-diffusion."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class Conv(nn.Module):
  """Zero-padded 2-D convolution ('same' size divided by `stride`) through
  :func:`dipjax.layers.conv2d`; (N, H, W, C_in) -> (N, H / stride, W / stride, features).

  Kernels are initialised like DDPM's (variance scaling 1, fan_avg, uniform), or to zero
  (`zero_init`: the last conv of each residual branch and the output, so each block starts as
  the identity and the network as eps = 0).
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  zero_init: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    init = (nn.initializers.zeros if self.zero_init
            else nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"))
    w = self.param("kernel", init, (k, k, x.shape[-1], self.features))
    b = self.param("bias", nn.initializers.zeros, (self.features,))
    return layers.conv2d(layers.pad2d(x, (k - 1) // 2, "zero"), w, self.stride) + b


class ResBlock(nn.Module):
  """GN-SiLU-conv, + Dense(SiLU(temb)), GN-SiLU-conv, plus a 1x1-conv (or identity) skip."""
  features: int
  groups: int

  @nn.compact
  def __call__(self, x: Array, temb: Array) -> Array:
    h = Conv(self.features)(nn.silu(nn.GroupNorm(self.groups)(x)))
    h = h + nn.Dense(self.features)(nn.silu(temb))[:, None, None, :]
    h = Conv(self.features, zero_init=True)(nn.silu(nn.GroupNorm(self.groups)(h)))
    skip = x if x.shape[-1] == self.features else Conv(self.features, 1)(x)
    return skip + h


class Attention(nn.Module):
  """Single-head self-attention over all H x W positions, residual: (N, H, W, C) -> same."""
  groups: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, height, width, c = x.shape
    qkv = Conv(3 * c, 1)(nn.GroupNorm(self.groups)(x)).reshape(n, height * width, 3 * c)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    weights = jax.nn.softmax(jnp.einsum("nqc,nkc->nqk", q, k) / math.sqrt(c), axis=-1)
    out = jnp.einsum("nqk,nkc->nqc", weights, v).reshape(x.shape)
    return x + Conv(c, 1, zero_init=True)(out)


class EpsUNet(nn.Module):
  """eps_theta(x_t, t): x (N, H, W, image_channels) in [-1, 1], t (N,) int (or a scalar, used
  for every image) -> eps (N, H, W, image_channels); H, W multiples of config.multiple."""
  config: UNetConfig

  @nn.compact
  def __call__(self, x: Array, t: Array) -> Array:
    cfg = self.config
    if x.ndim != 4 or x.shape[-1] != cfg.image_channels:
      raise ValueError(f"EpsUNet: expected (N, H, W, {cfg.image_channels}) input, got {x.shape}")
    if x.shape[1] % cfg.multiple or x.shape[2] % cfg.multiple:
      raise ValueError(f"EpsUNet: H and W must be multiples of {cfg.multiple}, got "
                       f"{x.shape[1]}x{x.shape[2]}")
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    temb = timestep_embedding(t, cfg.channels)
    temb = nn.Dense(4 * cfg.channels)(nn.silu(nn.Dense(4 * cfg.channels)(temb)))
    res = lambda f: ResBlock(f, cfg.norm_groups)
    last = len(cfg.channel_mults) - 1

    h = Conv(cfg.channels)(x)
    hs = [h]
    for level, mult in enumerate(cfg.channel_mults):
      for _ in range(cfg.num_res_blocks):
        h = res(cfg.channels * mult)(h, temb)
        hs.append(h)
      if level != last:
        h = Conv(h.shape[-1], stride=2)(h)
        hs.append(h)

    h = res(h.shape[-1])(h, temb)
    if cfg.attention:
      h = Attention(cfg.norm_groups)(h)
    h = res(h.shape[-1])(h, temb)

    for level, mult in reversed(list(enumerate(cfg.channel_mults))):
      for _ in range(cfg.num_res_blocks + 1):
        h = res(cfg.channels * mult)(jnp.concatenate([h, hs.pop()], axis=-1), temb)
      if level:
        h = Conv(h.shape[-1])(layers.upsample2x(h, "nearest"))

    h = nn.silu(nn.GroupNorm(cfg.norm_groups)(h))
    return Conv(cfg.image_channels, zero_init=True)(h)


def eps_fn(config: UNetConfig, params) -> Callable[[Array, Array], Array]:
  """The U-Net with `params` as the samplers' ``eps_fn(x (N, H, W, C), t (N,)) -> eps``."""
  model = EpsUNet(config)
  return lambda x, t: model.apply({"params": params}, x, t)
