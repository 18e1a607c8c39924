"""dipjax.masks: seeded inpainting masks, and generated masks through the pipeline and CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dipjax import masks
from dipjax import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("kind", masks.KINDS)
def test_masks_are_binary_seeded_and_of_the_asked_size(kind):
  m = masks.make(kind, 48, 64, seed=3)
  assert m.shape == (48, 64, 1) and m.dtype == np.float32
  assert set(np.unique(m)) == {0.0, 1.0}
  np.testing.assert_array_equal(m, masks.make(kind, 48, 64, seed=3))
  assert not np.array_equal(m, masks.make(kind, 48, 64, seed=4))
  assert 0.02 < 1 - m.mean() < 0.6  # something missing, most of it known


def test_random_pixels_miss_exactly_the_ratio():
  for ratio in (0.0, 0.25, 0.5, 0.9):
    m = masks.random_pixels(40, 50, ratio, seed=0)
    assert int((m == 0).sum()) == round(ratio * 2000)
  with pytest.raises(ValueError, match="ratio must lie in"):
    masks.random_pixels(8, 8, 1.5, seed=0)
  with pytest.raises(ValueError, match="mask kind must be one of"):
    masks.make("blobs", 8, 8, seed=0)


def test_generated_masks_through_the_pipeline_and_cli(tmp_path, cli_cache):
  config = pipeline.RestoreConfig(task="inpaint", mask_kind="random", mask_ratio=0.5)
  mask = pipeline.make_mask(config, (32, 32, 3), seed=1)
  np.testing.assert_array_equal(mask, masks.random_pixels(32, 32, 0.5, seed=1))
  with pytest.raises(ValueError, match="mask_ratio must lie in"):
    pipeline.RestoreConfig(task="inpaint", mask_kind="random", mask_ratio=1.0)
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "restore.py"),
       f"--cache_dir={cli_cache}",
       "--task=inpaint", "--mask_kind=random", "--crop=32", "--width=4", "--scales=1",
       "--iters=10", "--stop=", f"--out_dir={out}"], capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads((out / "metrics.json").read_text())
  assert result["config"]["mask_kind"] == "random"
  degraded = np.load(out / "degraded.npy")
  assert abs(np.mean(np.all(degraded == 0, axis=-1)) - 0.5) < 0.05  # half the pixels masked
