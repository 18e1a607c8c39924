"""dipjax.tiles: tilings cover the image with the overlap asked, the blend is a partition of
unity; restore() in tiles: a tile as large as the image is the untiled restoration, several blend
into an image as good as the untiled one, the memory estimate picks the tile, bad input
refused; the CLI's --tile on a masked image."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dipjax import io
from dipjax import pipeline
from dipjax import tiles

TINY = dict(method="dip", width=4, scales=1, iters=40, stop=("oracle",), halt=False)
KEY = jax.random.PRNGKey(0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "assets", "house.png")


@pytest.fixture(scope="module")
def clean():
  return io.center_crop(io.load_image(IMAGE), 40, 48)


@pytest.mark.parametrize("n,tile,overlap", [(100, 32, 8), (64, 32, 0), (33, 32, 8), (20, 32, 8),
                                            (257, 64, 16)])
def test_starts_cover_the_axis_with_the_overlap(n, tile, overlap):
  s = tiles.starts(n, tile, overlap)
  side = min(tile, n)
  assert s[0] == 0 and s[-1] + side == n and s == sorted(set(s))
  assert all(b - a <= tile - overlap for a, b in zip(s, s[1:]))  # neighbours share >= overlap


def test_merge_of_an_images_tiles_is_the_image():
  x = np.random.default_rng(0).random((50, 70, 3)).astype(np.float32)
  grid = tiles.Tiling((50, 70), 24, 6)
  parts = [grid.crop(x, o) for o in grid.origins]
  np.testing.assert_allclose(tiles.merge(parts, grid), x, rtol=1e-6)
  assert grid.scaled(2).shape == (100, 140) and grid.scaled(2).size == (48, 48)
  with pytest.raises(ValueError, match="overlap"):
    tiles.Tiling((50, 70), 24, 24)
  with pytest.raises(ValueError, match="tiles for a tiling of"):
    tiles.merge(parts[:-1], grid)


@pytest.fixture(scope="module")
def whole(clean):
  """(config, observation, its untiled restoration)."""
  config = pipeline.RestoreConfig(**TINY)
  y = pipeline.degrade(config, clean, seed=1)
  return config, y, pipeline.restore(config, y, key=KEY, clean=clean, tile=0)


def test_a_tile_as_large_as_the_image_is_the_untiled_restoration(clean, whole):
  config, y, whole = whole
  one = pipeline.restore(config, y, key=KEY, clean=clean, tile=64)
  assert one.tiles is None and one.trace is not None
  np.testing.assert_array_equal(one.image, whole.image)


def test_tiles_blend_into_the_image(clean, whole):
  config, y, whole = whole
  r = pipeline.restore(config, y, key=KEY, clean=clean, tile=24, overlap=8)
  assert r.image.shape == clean.shape and len(r.tiles) == 2 * 3
  assert abs(r.scores["restored"]["psnr"] - whole.scores["restored"]["psnr"]) < 1.0
  assert r.restored_at.startswith("6 tiles at: oracle")
  sr = pipeline.RestoreConfig(task="sr", factor=2, **TINY)
  y = pipeline.degrade(sr, clean, seed=1)
  r = pipeline.restore(sr, y, key=KEY, clean=clean, tile=24, overlap=8)  # 12x12 observed tiles
  assert r.image.shape == clean.shape and len(r.tiles) == 6


def test_the_memory_estimate_picks_the_tile(monkeypatch):
  monkeypatch.setattr(pipeline.jax, "default_backend", lambda: "cpu")  # the estimate's device
  config = pipeline.RestoreConfig(method="dip", width=32)
  photo = (3000, 4000, 3)
  assert pipeline.auto_tile(config, photo, free=10**13) == 0
  need = pipeline.memory_estimate(config, (512, 512, 3))
  tile = pipeline.auto_tile(config, photo, free=need)
  assert tile == 512  # the largest multiple of 2^scales that fits
  assert pipeline.memory_estimate(config, (tile + 32, tile + 32, 3)) > need
  for no_tiles in (dict(method="ddpm", ddpm_weights="w.npz"), dict(task="deblur")):
    assert pipeline.auto_tile(pipeline.RestoreConfig(**no_tiles), photo, free=1) == 0


@pytest.mark.parametrize("fields,kw,message", [
    (dict(method="ddpm", ddpm_weights="w.npz"), dict(tile=24), "not method 'ddpm'"),
    (dict(task="deblur"), dict(tile=24), "a tile's blur reaches outside it"),
    (dict(task="sr", factor=2), dict(tile=25), "multiples of the factor 2"),
    ({}, dict(tile=24, overlap=24), "0 <= overlap < tile"),
    ({}, dict(tile=24, checkpoint_every=10, checkpoint_dir="x"), "not checkpointed"),
])
def test_tiling_refuses_what_it_cannot_do(clean, fields, kw, message):
  config = pipeline.RestoreConfig(**fields)
  y = clean[::2, ::2] if config.task == "sr" else clean
  with pytest.raises(ValueError, match=message):
    pipeline.restore(config, y, key=KEY, **kw)


def test_the_cli_restores_a_masked_image_in_tiles(clean, tmp_path, cli_cache):
  """restore.py --tile on an inpainting problem: each tile takes its part of the mask (the known
  pixels fitted, the hole filled); the metrics list the tiles, no per-iteration trace is written
  (each tile has its own)."""
  image, mask = tmp_path / "image.png", np.ones((40, 48), np.float32)
  mask[10:22, 30:40] = 0
  io.save_image(image, clean)
  io.save_image(tmp_path / "mask.png", mask)
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "restore.py"),
       f"--cache_dir={cli_cache}", f"--image={image}", "--task=inpaint",
       f"--mask={tmp_path / 'mask.png'}", "--width=4", "--scales=1", "--iters=200",
       "--method=dip", "--stop=holdout", "--holdout=0.05", "--tile=32", "--tile_overlap=8",
       f"--out_dir={out}"],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.loads((out / "metrics.json").read_text())
  assert len(metrics["tiles"]) == 4 and metrics["restored_at"].startswith("4 tiles at: holdout")
  restored = io.load_image(out / "restored.png")
  assert restored.shape == clean.shape and not (out / "trace.csv").exists()
  known = np.broadcast_to(mask[..., None] > 0, clean.shape)
  error = np.abs(restored - clean)
  assert error[known].mean() < error[~known].mean()
  # The hole is filled, not fitted to the observation's zeros there (a misplaced mask would).
  assert restored[~known].mean() > 0.5 * clean[~known].mean()
