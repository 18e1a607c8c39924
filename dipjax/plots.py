"""Figures of fit traces (matplotlib, imported lazily so the library does not need a display)."""

from __future__ import annotations

import os

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def fit_curves(trace: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """PSNR curves (dB) of fits by label, from per-iteration traces (seeds, n) by
  :class:`dipjax.fit.Trace` field: against the observation, the ground truth (where traced)
  and the staged probe's estimate of it (where traced)."""
  curves = {}
  seeds = trace["loss"].shape[0]
  for m in range(seeds):
    tag = f" (seed {m})" if seeds > 1 else ""
    if np.isfinite(trace["psnr_clean"][m]).any():
      curves["output vs clean" + tag] = trace["psnr_clean"][m]
      curves["EMA vs clean" + tag] = trace["psnr_clean_ema"][m]
    curves["output vs observation" + tag] = trace["psnr_obs"][m]
    est = trace["mse_est_ema"][m]
    if np.isfinite(est).any():
      curves["EMA vs clean, estimated (staged probe)" + tag] = np.where(
          est > 0, -10 * np.log10(np.where(est > 0, est, 1.0)), np.nan)
  return curves


def psnr_curves(path: str | os.PathLike, curves: dict[str, np.ndarray],
                stage_ends: np.ndarray | None = None, title: str = "",
                stops: dict[str, int] | None = None) -> None:
  """Saves a PNG of PSNR (dB) against iteration, one line per entry of `curves` ((n,) each, NaN
  gaps allowed), with a dashed vertical line at each stopping criterion's stop in `stops`
  (0-based iteration, drawn at iteration + 1) and dotted ones at the stage boundaries
  `stage_ends` (all but the last)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
  for label, y in curves.items():
    ax.plot(np.arange(1, len(y) + 1), y, label=label, linewidth=1)
  colours = plt.get_cmap("tab10")
  for i, (name, stop) in enumerate((stops or {}).items()):
    ax.axvline(stop + 1, color=colours((i + len(curves)) % 10), linestyle="--", linewidth=1,
               label=f"{name} stop ({stop + 1})")
  if stage_ends is not None:
    for i, end in enumerate(stage_ends[:-1]):
      ax.axvline(end, color="grey", linestyle=":", linewidth=1,
                 label="stage boundary" if i == 0 else None)
  ax.set_xlabel("iteration")
  ax.set_ylabel("PSNR (dB)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7 if stops else 8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def stage_psnr(path: str | os.PathLike, curves: dict[str, np.ndarray], stage: np.ndarray,
               title: str = "") -> None:
  """Saves a PNG of a staged fit: left, the PSNR curves ((n,) each, dB) over iterations with
  alternate stages shaded; right, per stage (from `stage`, the (n,) stage index of each
  iteration) each curve's value at the stage's last iteration (bars) and its peak in the stage
  (ticks)."""
  plt = _pyplot()
  stage = np.asarray(stage)
  ids = [k for k in np.unique(stage) if k >= 0]
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110,
                                    gridspec_kw=dict(width_ratios=[3, 2]))
  x = np.arange(1, len(stage) + 1)
  for k in ids[::2]:
    at = x[stage == k]
    left.axvspan(at[0] - 0.5, at[-1] + 0.5, color="grey", alpha=0.12, linewidth=0)
  width = 0.8 / max(len(curves), 1)
  for j, (label, y) in enumerate(curves.items()):
    left.plot(x, y, label=label, linewidth=1)
    last = [y[stage == k][-1] for k in ids]
    peak = [np.nanmax(y[stage == k]) for k in ids]
    at = np.arange(len(ids)) + (j - (len(curves) - 1) / 2) * width
    right.bar(at, last, width, label=f"{label}, stage end")
    right.scatter(at, peak, marker="_", s=200, color="black",
                  label="peak in stage" if j == 0 else None)
  left.set_xlabel("iteration")
  left.set_ylabel("PSNR (dB)")
  left.grid(alpha=0.3)
  left.legend(fontsize=7)
  right.set_xticks(np.arange(len(ids)), [f"stage {k + 1}" for k in ids])
  values = np.concatenate([np.asarray(y)[np.isfinite(y)] for y in curves.values()])
  if values.size:
    right.set_ylim(values.min() - 1, values.max() + 1)
  right.set_ylabel("PSNR (dB)")
  right.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def image_row(path: str | os.PathLike, images: list[tuple[str, np.ndarray]],
              title: str = "") -> None:
  """Saves a PNG of images side by side, each (H, W, 1 or 3) in [0, 1] or uint8, captioned."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(images), figsize=(2.4 * len(images), 3.0), dpi=110,
                           squeeze=False)
  for ax, (caption, image) in zip(axes[0], images):
    image = np.asarray(image)
    if image.dtype == np.uint8:
      image = image.astype(np.float32) / 255
    grey = image.shape[-1] == 1
    ax.imshow(image[..., 0] if grey else np.clip(image, 0, 1), cmap="gray" if grey else None,
              vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(caption, fontsize=8)
    ax.axis("off")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 0.93))
  fig.savefig(path)
  plt.close(fig)


def psnr_vs_time(path: str | os.PathLike, series: dict[str, list[tuple[float, float]]],
                 title: str = "") -> None:
  """Saves a PNG of PSNR (dB) against wall time (s, log axis): per label, its (seconds, PSNR)
  points joined in order of time (a single point: a marker)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
  for label, points in series.items():
    t, p = zip(*sorted(points))
    ax.plot(t, p, marker="o", markersize=3, linewidth=1, label=label)
  ax.set_xscale("log")
  ax.set_xlabel("wall time per image (s)")
  ax.set_ylabel("PSNR (dB)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
