"""Overlapping tiles of an image and their seamless blend, so that a photo of any size restores
with peak memory set by the tile, not the image (:func:`dipjax.pipeline.restore`'s `tile`).

A :class:`Tiling` covers an (H, W) image with square tiles of side `tile` whose neighbours
overlap by at least `overlap` pixels; the last tile of a row or column is flush with the edge.
:func:`merge` blends restored tiles with weights that fall linearly to ~0 across each tile's
overlapping margins (a partition of unity after normalisation), so no seam shows where two fits
differ slightly. All functions are numpy, on (H, W, C) float32 images.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def starts(n: int, tile: int, overlap: int) -> list[int]:
  """Tile origins along an axis of length n: the fewest tiles whose neighbours share at least
  `overlap`, spread evenly from 0 to n - tile (the last flush with the end); [0] when
  tile >= n."""
  if tile >= n:
    return [0]
  count = 1 + -(-(n - tile) // (tile - overlap))  # gaps of at most tile - overlap
  return [i * (n - tile) // (count - 1) for i in range(count)]


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Square tiles of side `tile` over an image of `shape` (H, W), neighbours overlapping by at
  least `overlap` (0 <= overlap < tile); a side shorter than `tile` is one tile of that side."""
  shape: tuple[int, int]
  tile: int
  overlap: int

  def __post_init__(self):
    if not 0 <= self.overlap < self.tile:
      raise ValueError(f"the tile overlap must lie in [0, tile = {self.tile}), got "
                       f"{self.overlap}")

  @property
  def size(self) -> tuple[int, int]:
    """(height, width) of every tile."""
    return min(self.tile, self.shape[0]), min(self.tile, self.shape[1])

  @property
  def origins(self) -> list[tuple[int, int]]:
    """(top, left) of every tile, row by row."""
    return [(y, x) for y in starts(self.shape[0], self.tile, self.overlap)
            for x in starts(self.shape[1], self.tile, self.overlap)]

  def scaled(self, factor: int) -> Tiling:
    """The same tiles at `factor` times the resolution (an SR output of the tiles)."""
    return Tiling((self.shape[0] * factor, self.shape[1] * factor), self.tile * factor,
                  self.overlap * factor)

  def crop(self, x: np.ndarray, origin: tuple[int, int]) -> np.ndarray:
    """The tile at `origin` of x (H, W, ...)."""
    (y0, x0), (h, w) = origin, self.size
    return x[y0:y0 + h, x0:x0 + w]


def _ramp(n: int, margin: int) -> np.ndarray:
  """(n,) weights rising linearly over `margin` samples from each end to 1 (all > 0)."""
  i = np.arange(n, dtype=np.float32)
  if margin == 0:
    return np.ones(n, np.float32)
  return np.minimum(1.0, np.minimum(i + 0.5, n - i - 0.5) / margin)


def merge(tiles: list[np.ndarray], tiling: Tiling) -> np.ndarray:
  """The tiles (each (h, w, C) at tiling.origins) blended into one (H, W, C) float32 image:
  per pixel the average of the tiles covering it, weighted by :func:`_ramp` across each tile's
  margins of `overlap` (so a pixel covered by one tile takes that tile's value)."""
  origins = tiling.origins
  if len(tiles) != len(origins):
    raise ValueError(f"{len(tiles)} tiles for a tiling of {len(origins)}")
  h, w = tiling.size
  weight = np.outer(_ramp(h, tiling.overlap), _ramp(w, tiling.overlap))[..., None]
  channels = tiles[0].shape[-1]
  total = np.zeros(tiling.shape + (channels,), np.float32)
  norm = np.zeros(tiling.shape + (1,), np.float32)
  for (y0, x0), t in zip(origins, tiles):
    if t.shape != (h, w, channels):
      raise ValueError(f"a tile is {t.shape}, the tiling's are {(h, w, channels)}")
    total[y0:y0 + h, x0:x0 + w] += weight * t
    norm[y0:y0 + h, x0:x0 + w] += weight
  return total / norm
