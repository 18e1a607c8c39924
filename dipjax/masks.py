"""Seeded inpainting masks, (H, W, 1) float32 with 1 = known pixel and 0 = missing.

* :func:`random_pixels`: each pixel missing independently, exactly round(ratio * H * W) of them
  (the DIP paper's "50% of pixels missing" protocol).
* :func:`text`: lines of random text drawn over the image (the DIP paper's text inpainting).
* :func:`strokes`: free-form brush strokes (random walks of a round brush), as in the
  free-form inpainting literature.

The same seed and shape give the same mask.
"""

from __future__ import annotations

import string

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

KINDS = ("random", "text", "strokes")


def _check(height: int, width: int, ratio: float | None = None) -> None:
  if height < 1 or width < 1:
    raise ValueError(f"mask size must be positive, got {height}x{width}")
  if ratio is not None and not 0 <= ratio <= 1:
    raise ValueError(f"the missing ratio must lie in [0, 1], got {ratio}")


def random_pixels(height: int, width: int, ratio: float, seed: int) -> np.ndarray:
  """`ratio` of the pixels missing, chosen uniformly without replacement."""
  _check(height, width, ratio)
  rng = np.random.default_rng(seed)
  missing = rng.permutation(height * width) < round(ratio * height * width)
  return (~missing).reshape(height, width, 1).astype(np.float32)


def text(height: int, width: int, seed: int, *, size: int | None = None) -> np.ndarray:
  """Lines of random words drawn in PIL's default font at `size` pixels (default H / 16)."""
  _check(height, width)
  rng = np.random.default_rng(seed)
  size = max(8, height // 16) if size is None else size
  canvas = Image.new("L", (width, height), 255)
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default(size=size)
  letters = np.array(list(string.ascii_letters))
  for top in range(size // 2, height - size // 2, 2 * size):
    words = [''.join(rng.choice(letters, rng.integers(3, 9))) for _ in range(width // size + 1)]
    draw.text((int(rng.integers(0, size)), top), " ".join(words), fill=0, font=font)
  return (np.asarray(canvas, np.float32) / 255 > 0.5).astype(np.float32)[..., None]


def strokes(height: int, width: int, seed: int, *, count: int = 8,
            brush: int | None = None) -> np.ndarray:
  """`count` brush strokes: random walks of 4-12 segments, a round brush `brush` pixels wide
  (default max(3, min(H, W) / 24))."""
  _check(height, width)
  rng = np.random.default_rng(seed)
  brush = max(3, min(height, width) // 24) if brush is None else brush
  canvas = Image.new("L", (width, height), 255)
  draw = ImageDraw.Draw(canvas)
  step = max(height, width) / 8
  for _ in range(count):
    point = rng.uniform(0, 1, 2) * (width, height)
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(rng.integers(4, 13)):
      angle += rng.normal(0, 0.8)
      end = np.clip(point + rng.uniform(0.3, 1) * step * np.array([np.cos(angle), np.sin(angle)]),
                    0, (width - 1, height - 1))
      draw.line([tuple(point), tuple(end)], fill=0, width=brush)
      r = brush / 2
      draw.ellipse([end[0] - r, end[1] - r, end[0] + r, end[1] + r], fill=0)
      point = end
  return (np.asarray(canvas, np.float32) / 255 > 0.5).astype(np.float32)[..., None]


def make(kind: str, height: int, width: int, seed: int, ratio: float = 0.5) -> np.ndarray:
  """A mask of `kind` ('random' at `ratio` missing, 'text', 'strokes'), (H, W, 1) float32."""
  if kind == "random":
    return random_pixels(height, width, ratio, seed)
  if kind == "text":
    return text(height, width, seed)
  if kind == "strokes":
    return strokes(height, width, seed)
  raise ValueError(f"mask kind must be one of {KINDS}, got {kind!r}")
