"""The axes and fixed settings of an experiments/grid.py grid (``GridSpec``, validated on
construction) and the methods it knows; no flags. Its defaults are the DIP fit protocol of the
stopping report, which experiments/ddpm_report.py reuses.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Iterable

from dipjax import losses
from dipjax import nets
from dipjax import schedules
from dipjax import stopping

METHODS = ("dip", "staged", "ddpm_input", "ddpm_input_staged", "bm3d")
STAGED = ("staged", "ddpm_input_staged")
DDPM_INPUT = ("ddpm_input", "ddpm_input_staged")
LOSSES = tuple(name for name in losses.LOSSES if not losses.needs_params(name))  # no weights


@dataclasses.dataclass(frozen=True)
class GridSpec:
  """The grid's axes and fixed settings (the flags, parsed); validated on construction."""
  images: tuple[str, ...]
  crop: int = 128
  sigmas: tuple[float, ...] = (25.0,)
  methods: tuple[str, ...] = ("dip", "staged")
  schedules: tuple[str, ...] = ("linear",)
  stages: tuple[int, ...] = (4,)
  t_max: tuple[int, ...] = (100,)
  fresh_eps: tuple[bool, ...] = (False,)
  probes: tuple[float, ...] = (0.3,)
  final_shares: tuple[float | None, ...] = (None,)
  sigma_estimated: tuple[bool, ...] = (False,)
  losses: tuple[str, ...] = ("mse",)
  nets: tuple[str, ...] = ("skip",)
  widths: tuple[int, ...] = (32,)
  scales: int = 5
  seeds: int = 3
  seed_base: int = 0
  iters: int = 3000
  lr: float = 0.01
  reg_noise_std: float = 1 / 30
  exp_weight: float = 0.99
  criteria: tuple[str, ...] = stopping.KINDS
  window: int = 100
  noise_seed: int = 0

  def __post_init__(self):
    axes = dict(images=self.images, sigmas=self.sigmas, methods=self.methods,
                schedules=self.schedules, stages=self.stages, t_max=self.t_max,
                fresh_eps=self.fresh_eps, probes=self.probes, final_shares=self.final_shares,
                sigma_estimated=self.sigma_estimated, losses=self.losses, nets=self.nets,
                widths=self.widths)
    for name, values in axes.items():
      if not values:
        raise ValueError(f"--{name} is empty")
    checks = [
        (_unknown(self.methods, METHODS), f"--methods: unknown {_unknown(self.methods, METHODS)}"
         f"; valid methods are {', '.join(METHODS)}"),
        (_unknown(self.losses, LOSSES), f"--losses: unknown {_unknown(self.losses, LOSSES)}; "
         f"valid losses are {', '.join(LOSSES)}"),
        (_unknown(self.nets, nets.NETS), f"--nets: unknown {_unknown(self.nets, nets.NETS)}; "
         f"valid networks are {', '.join(nets.NETS)}"),
        (self.crop < 0, f"--crop must be >= 0, got {self.crop}"),
        (min(self.sigmas) <= 0, f"--sigmas must be positive, got {self.sigmas}"),
        (min(self.widths) < 1, f"--widths must be positive, got {self.widths}"),
        (self.scales < 1, f"--scales must be positive, got {self.scales}"),
        (self.seeds < 1, f"--seeds must be positive, got {self.seeds}"),
        (self.iters < 1, f"--iters must be positive, got {self.iters}"),
        (self.lr <= 0, f"--lr must be positive, got {self.lr}"),
        (self.reg_noise_std < 0, f"--reg_noise_std must be >= 0, got {self.reg_noise_std}"),
        (not 0 <= self.exp_weight < 1, f"--exp_weight must lie in [0, 1), got {self.exp_weight}"),
        (not self.criteria, "--criteria is empty"),
        (len(set(self.criteria)) != len(self.criteria), f"--criteria repeats a kind: "
         f"{list(self.criteria)}"),
        (self.window < 1, f"--window must be positive, got {self.window}"),
    ]
    if set(self.methods) & set(STAGED):
      checks += [
          (max(self.stages) > self.iters, f"--stages ({max(self.stages)}) cannot exceed "
           f"--iters ({self.iters})"),
          (min(self.stages) < 1, f"--stages must be positive, got {self.stages}"),
          (min(self.probes) < 0, f"--probes must be >= 0, got {self.probes}"),
          (any(f is not None and not 0 < f < 1 for f in self.final_shares),
           f"--final_shares must lie in (0, 1) or be 'equal', got {self.final_shares}"),
          (min(self.t_max) < max(self.stages) - 1, f"--t_max ({min(self.t_max)}) must be at "
           f"least --stages - 1 ({max(self.stages) - 1})"),
      ]
    for failed, message in checks:
      if failed:
        raise ValueError(message)
    for name in self.criteria:
      stopping.get(name)  # ValueError naming the valid kinds
    for name in self.schedules:
      steps = schedules.get(name).num_steps  # ValueError naming the valid schedules
      if max(self.t_max) > steps:
        raise ValueError(f"--t_max ({max(self.t_max)}) exceeds the {name} schedule's {steps} "
                         "steps")
    if "bm3d" in self.methods and importlib.util.find_spec("bm3d") is None:
      raise ValueError("--methods bm3d needs the optional bm3d package "
                       "(pip install -e '.[baselines]')")


def boolean(text: str) -> bool:
  """A boolean axis value: true, false, 1 or 0 (ValueError otherwise)."""
  lowered = text.strip().lower()
  if lowered not in ("true", "false", "1", "0"):
    raise ValueError(text)
  return lowered in ("true", "1")


def share(text: str) -> float | None:
  """A final_shares value: 'equal' (None: all stages equally long) or a float."""
  return None if text.strip().lower() == "equal" else float(text)


def _unknown(values: Iterable[str], valid: Iterable[str]) -> str:
  return ", ".join(repr(v) for v in values if v not in valid)


@dataclasses.dataclass(frozen=True)
class Job:
  """One config of the grid: the image file, the canonical config (a JSON-able dict) and its
  row key."""
  path: str
  config: dict
  key: str
