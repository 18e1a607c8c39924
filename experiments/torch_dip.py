"""PyTorch port of the original Deep Image Prior `skip` net and denoising loop, for timing.

Follows `models/skip.py` and `models/common.py` of github.com/DmitryUlyanov/deep-image-prior with
the settings of its denoising notebook (reflection padding, LeakyReLU 0.2, stride downsampling,
1x1 up convs, sigmoid output). `experiments/benchmark.py` uses it to time PyTorch beside dipjax on
the same CPU, in the variants a PyTorch user switches on with one line (VARIANTS).
"""

from __future__ import annotations

import os

import torch
from torch import nn


class Concat(nn.Module):
  """Runs the branches on one input and concatenates along `dim`, center-cropping to fit."""

  def __init__(self, dim: int, *branches: nn.Module):
    super().__init__()
    self.dim = dim
    for i, branch in enumerate(branches):
      self.add_module(str(i), branch)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    outs = [branch(x) for branch in self._modules.values()]
    h = min(o.shape[2] for o in outs)
    w = min(o.shape[3] for o in outs)
    cropped = []
    for o in outs:
      dh = (o.shape[2] - h) // 2
      dw = (o.shape[3] - w) // 2
      cropped.append(o[:, :, dh:dh + h, dw:dw + w])
    return torch.cat(cropped, dim=self.dim)


def _conv(in_f: int, out_f: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
  """Reflection pad then an unpadded conv, like the original `conv()` with pad='reflection'."""
  return nn.Sequential(
      nn.ReflectionPad2d((kernel_size - 1) // 2),
      nn.Conv2d(in_f, out_f, kernel_size, stride, padding=0, bias=True))


def _act() -> nn.Module:
  return nn.LeakyReLU(0.2, inplace=True)


def skip(in_channels: int = 32, out_channels: int = 3, width: int = 128, scales: int = 5,
         skip_channels: int = 4, upsample: str = "bilinear") -> nn.Module:
  """The DIP encoder-decoder with skip connections, `width` channels at every scale."""
  model = nn.Sequential()
  model_tmp = model
  input_depth = in_channels
  for i in range(scales):
    deeper = nn.Sequential()
    skip_branch = nn.Sequential()
    if skip_channels:
      model_tmp.append(Concat(1, skip_branch, deeper))
    else:
      model_tmp.append(deeper)
    model_tmp.append(nn.BatchNorm2d(skip_channels + width))

    if skip_channels:
      skip_branch.append(_conv(input_depth, skip_channels, 1))
      skip_branch.append(nn.BatchNorm2d(skip_channels))
      skip_branch.append(_act())

    deeper.append(_conv(input_depth, width, 3, stride=2))
    deeper.append(nn.BatchNorm2d(width))
    deeper.append(_act())
    deeper.append(_conv(width, width, 3))
    deeper.append(nn.BatchNorm2d(width))
    deeper.append(_act())

    deeper_main = nn.Sequential()
    if i < scales - 1:
      deeper.append(deeper_main)
    deeper.append(nn.Upsample(scale_factor=2, mode=upsample))

    model_tmp.append(_conv(skip_channels + width, width, 3))
    model_tmp.append(nn.BatchNorm2d(width))
    model_tmp.append(_act())
    model_tmp.append(_conv(width, width, 1))
    model_tmp.append(nn.BatchNorm2d(width))
    model_tmp.append(_act())

    input_depth = width
    model_tmp = deeper_main

  model.append(_conv(width, out_channels, 1))
  model.append(nn.Sigmoid())
  return model


# What a PyTorch user switches on with one line: channels-last memory format, bf16 autocast
# (oneDNN's AMX / AVX512-BF16 kernels where the CPU has them), torch.compile (Inductor).
VARIANTS = ("eager", "channels_last", "bf16", "compile")


def make_step(size: int, width: int, threads: int | None = None, seed: int = 0,
              variant: str = "eager"):
  """The DIP denoising loop's iteration (Adam 0.01, input jitter 1/30, EMA 0.99) on a random
  image, as a closure, in one of VARIANTS; returns (step, number of parameters). torch.compile
  compiles on the first call: warm up before timing."""
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
  torch.set_num_threads(threads or os.cpu_count())
  torch.manual_seed(seed)
  net = skip(width=width)
  params = sum(p.numel() for p in net.parameters())
  target = torch.rand(1, 3, size, size)
  net_input_saved = torch.rand(1, 32, size, size) * 0.1
  if variant == "channels_last":
    net = net.to(memory_format=torch.channels_last)
    target, net_input_saved = (t.contiguous(memory_format=torch.channels_last)
                               for t in (target, net_input_saved))
  noise = net_input_saved.clone()
  optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
  forward = torch.compile(net) if variant == "compile" else net
  out_avg = None

  def step() -> None:
    nonlocal out_avg
    optimizer.zero_grad()
    net_input = net_input_saved + noise.normal_() * (1 / 30)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16"):
      out = forward(net_input)
      loss = nn.functional.mse_loss(out.float(), target)
    if out_avg is None:
      out_avg = out.detach().float()
    else:
      out_avg = out_avg * 0.99 + out.detach().float() * 0.01
    loss.backward()
    optimizer.step()

  return step, params
