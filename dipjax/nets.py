"""The DIP paper's networks: skip (encoder-decoder with skip connections), hourglass, U-Net.

All take (N, H, W, C_in) and return (N, H, W, C_out) in [0, 1] (sigmoid output); H and W must
be multiples of ``net.multiple`` (2 ** scales). BatchNorm uses batch statistics in training
mode, as in the original code, so call with ``mutable=['batch_stats']``. Parameters are float32;
`dtype` is the compute dtype (jnp.bfloat16 for mixed precision; the output is float32 always).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dipjax import layers

Array = jax.Array


class Skip(nn.Module):
  """DIP's ``skip`` network (models/skip.py of the original), every knob kept.

  Per scale i (from full resolution down): a skip branch (filter_skip conv to channels_skip[i],
  BN, act) and a deeper branch (stride-2 filter_down conv to channels_down[i], BN, act, a second
  filter_down conv, BN, act, the next scale, 2x up-sampling); the two are concatenated, batch-
  normalised, then a filter_up conv to channels_up[i], BN, act (and a 1x1 conv, BN, act when
  `need_1x1_up`). A final 1x1 conv maps channels_up[0] to `out_channels`, then a sigmoid.
  A scale with channels_skip[i] == 0 has no skip branch (all zeros: the hourglass network).
  """
  out_channels: int = 3
  channels_down: Sequence[int] = (128,) * 5
  channels_up: Sequence[int] = (128,) * 5
  channels_skip: Sequence[int] = (4,) * 5
  filter_down: int = 3
  filter_up: int = 3
  filter_skip: int = 1
  upsample: str = "bilinear"
  padding: str = "reflect"
  need_1x1_up: bool = True
  sigmoid: bool = True
  dtype: jnp.dtype = jnp.float32

  @property
  def multiple(self) -> int:
    return 2 ** len(self.channels_down)

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    if not len(self.channels_down) == len(self.channels_up) == len(self.channels_skip):
      raise ValueError("channels_down, channels_up and channels_skip need one entry per scale")
    x = self._scale(x, 0, train)
    x = layers.Conv(self.out_channels, 1, padding=self.padding, dtype=self.dtype)(x)
    x = x.astype(jnp.float32)
    return nn.sigmoid(x) if self.sigmoid else x

  def _scale(self, x: Array, i: int, train: bool) -> Array:
    block = lambda f, k, s=1: layers.ConvBlock(f, k, s, self.padding, self.dtype)
    deeper = block(self.channels_down[i], self.filter_down, 2)(x, train)
    deeper = block(self.channels_down[i], self.filter_down)(deeper, train)
    if i + 1 < len(self.channels_down):
      deeper = self._scale(deeper, i + 1, train)
    deeper = layers.upsample2x(deeper, self.upsample)
    if self.channels_skip[i]:
      skip = block(self.channels_skip[i], self.filter_skip)(x, train)
      deeper = _concat(skip, deeper)
    x = layers.batch_norm(deeper, train, self.dtype)
    x = block(self.channels_up[i], self.filter_up)(x, train)
    if self.need_1x1_up:
      x = block(self.channels_up[i], 1)(x, train)
    return x


def _concat(skip: Array, deeper: Array) -> Array:
  """Channel concat [skip, deeper], skip first as in the original's Concat."""
  return jnp.concatenate([skip, deeper], axis=-1)


class UNet(nn.Module):
  """A plain U-Net: per level two 3x3 ConvBlocks; stride-2 conv down, up-sample + concat up."""
  out_channels: int = 3
  features: Sequence[int] = (32, 64, 128, 256)
  upsample: str = "bilinear"
  padding: str = "reflect"
  sigmoid: bool = True
  dtype: jnp.dtype = jnp.float32

  @property
  def multiple(self) -> int:
    return 2 ** (len(self.features) - 1)

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    block = lambda f, k=3, s=1: layers.ConvBlock(f, k, s, self.padding, self.dtype)
    skips = []
    for level, f in enumerate(self.features):
      if level:
        x = block(f, 3, 2)(x, train)
      x = block(f)(block(f)(x, train), train)
      skips.append(x)
    for f, skip in zip(reversed(self.features[:-1]), reversed(skips[:-1])):
      x = layers.upsample2x(x, self.upsample)
      x = _concat(skip, block(f, 1)(x, train))
      x = block(f)(block(f)(x, train), train)
    x = layers.Conv(self.out_channels, 1, padding=self.padding, dtype=self.dtype)(x)
    x = x.astype(jnp.float32)
    return nn.sigmoid(x) if self.sigmoid else x


NETS = ("skip", "hourglass", "unet")


def make(name: str, width: int = 128, scales: int = 5, out_channels: int = 3,
         skip_channels: int = 4, upsample: str = "bilinear",
         dtype: jnp.dtype = jnp.float32) -> nn.Module:
  """A network by name: 'skip' | 'hourglass' | 'unet', `width` channels at every scale
  (the U-Net doubles them per level, up to 8 x width); `dtype` the compute dtype."""
  if width < 1 or scales < 1:
    raise ValueError(f"width and scales must be positive, got width={width}, scales={scales}")
  if name == "skip" or name == "hourglass":
    skip = skip_channels if name == "skip" else 0
    return Skip(out_channels, (width,) * scales, (width,) * scales, (skip,) * scales,
                upsample=upsample, dtype=dtype)
  if name == "unet":
    return UNet(out_channels, tuple(width * 2 ** min(i, 3) for i in range(scales)),
                upsample=upsample, dtype=dtype)
  raise ValueError(f"unknown network {name!r}; expected one of {', '.join(NETS)}")


def paper_f16(out_channels: int = 3) -> Skip:
  """The DIP paper's denoising network for F16 (denoising.ipynb): 32-channel noise input,
  128 channels x 5 scales down and up, 4 skip channels, bilinear, reflection padding.
  2,217,831 parameters for 3 output channels, as the original."""
  return make("skip", width=128, scales=5, out_channels=out_channels)
