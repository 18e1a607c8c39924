"""Figures of fit traces (matplotlib, imported lazily so the library does not need a display)."""

from __future__ import annotations

import os

import numpy as np


def psnr_curves(path: str | os.PathLike, curves: dict[str, np.ndarray],
                stage_ends: np.ndarray | None = None, title: str = "") -> None:
  """Saves a PNG of PSNR (dB) against iteration, one line per entry of `curves` ((n,) each),
  with dotted vertical lines at the stage boundaries `stage_ends` (all but the last)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
  for label, y in curves.items():
    ax.plot(np.arange(1, len(y) + 1), y, label=label, linewidth=1)
  if stage_ends is not None:
    for i, end in enumerate(stage_ends[:-1]):
      ax.axvline(end, color="grey", linestyle=":", linewidth=1,
                 label="stage boundary" if i == 0 else None)
  ax.set_xlabel("iteration")
  ax.set_ylabel("PSNR (dB)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
