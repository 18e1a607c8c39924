"""Tests for dipjax.targets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dipjax import schedules, targets

SCHEDULE = schedules.linear(1000)
KEY = jax.random.key(0)
Y = np.random.default_rng(0).random((8, 8, 3), np.float32)
TS = targets.stage_timesteps(4, 600)
ABAR = np.asarray(SCHEDULE.alphas_cumprod)[TS]


@pytest.mark.parametrize("spacing", ["linear", "quadratic"])
def test_stage_timesteps(spacing):
  for k, t_max in [(2, 1), (5, 4), (5, 300), (40, 50)]:
    t = targets.stage_timesteps(k, t_max, spacing)
    assert t.dtype == np.int32 and t.shape == (k,)
    assert t[0] == t_max and t[-1] == 0 and np.all(np.diff(t) < 0)
  np.testing.assert_array_equal(targets.stage_timesteps(1, 100, spacing), [0])


def test_stage_timesteps_spacing_and_errors():
  np.testing.assert_array_equal(targets.stage_timesteps(5, 100), [100, 75, 50, 25, 0])
  quad = targets.stage_timesteps(5, 100, "quadratic")
  assert np.all(np.diff(np.diff(quad)) > 0)  # gaps shrink towards t = 0
  with pytest.raises(ValueError):
    targets.stage_timesteps(0, 10)
  with pytest.raises(ValueError):
    targets.stage_timesteps(5, 3)
  with pytest.raises(ValueError, match="spacing"):
    targets.stage_timesteps(3, 10, "cubic")


def test_stage_lengths():
  np.testing.assert_array_equal(targets.stage_lengths(10, 3), [3, 3, 4])
  np.testing.assert_array_equal(targets.stage_lengths(11, 3), [3, 4, 4])
  np.testing.assert_array_equal(targets.stage_lengths(10, 3, [2, 2, 2]), [3, 3, 4])
  lengths = targets.stage_lengths(1003, 3, [1, 2, 7])
  assert lengths.dtype == np.int32 and lengths.sum() == 1003
  np.testing.assert_allclose(lengths / 1003, [0.1, 0.2, 0.7], atol=2e-3)
  lengths = targets.stage_lengths(5, 4, [1000, 1, 1, 1])
  assert lengths.sum() == 5 and lengths.min() >= 1
  np.testing.assert_array_equal(targets.stage_lengths(4, 4), [1, 1, 1, 1])


def test_stage_lengths_errors():
  with pytest.raises(ValueError, match="total_iters"):
    targets.stage_lengths(3, 4)
  with pytest.raises(ValueError, match="shape"):
    targets.stage_lengths(10, 3, [1, 2])
  with pytest.raises(ValueError, match="positive"):
    targets.stage_lengths(10, 3, [1, 0, 2])


def test_stage_index_boundaries():
  ends = targets.stage_ends(targets.stage_lengths(10, 3))
  np.testing.assert_array_equal(ends, [3, 6, 10])
  idx = jax.jit(targets.stage_index)(ends, jnp.arange(12))
  np.testing.assert_array_equal(idx, [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2])
  assert targets.stage_index(ends, 2) == 0 and targets.stage_index(ends, 3) == 1


def test_ordering_and_endpoints():
  x = np.asarray(targets.staged_targets(KEY, Y, SCHEDULE, TS))
  assert x.shape == (4,) + Y.shape and x.dtype == np.float32
  np.testing.assert_array_equal(x[-1], Y)
  energy = np.sqrt(np.sum((x - Y) ** 2, axis=(1, 2, 3)))
  assert np.all(np.diff(energy) < 0)
  resid = x[0] - np.sqrt(ABAR[0]) * Y
  np.testing.assert_allclose(resid.std(), np.sqrt(1 - ABAR[0]), rtol=0.15)


def _normalised(x):
  """(x_k - sqrt(abar) y) / sqrt(1 - abar) for the noisy stages (all but the last)."""
  abar = ABAR[:-1, None, None, None]
  return (x[:-1] - np.sqrt(abar) * Y) / np.sqrt(1 - abar)


def test_fixed_vs_fresh_noise():
  fixed = np.asarray(targets.staged_targets(KEY, Y, SCHEDULE, TS))
  fresh = np.asarray(targets.staged_targets(KEY, Y, SCHEDULE, TS, fresh_noise=True))
  r = _normalised(fixed)
  np.testing.assert_allclose(r, np.broadcast_to(r[0], r.shape), atol=1e-3)
  r = _normalised(fresh)
  assert abs(np.corrcoef(r[0].ravel(), r[1].ravel())[0, 1]) < 0.3
  np.testing.assert_array_equal(fresh[-1], Y)


@pytest.mark.parametrize("fresh", [False, True])
def test_scaled_vs_unscaled(fresh):
  scaled = np.asarray(targets.staged_targets(KEY, Y, SCHEDULE, TS, fresh_noise=fresh))
  unscaled = np.asarray(
      targets.staged_targets(KEY, Y, SCHEDULE, TS, fresh_noise=fresh, scaled=False))
  abar = ABAR[:, None, None, None]
  np.testing.assert_allclose(unscaled, scaled / np.sqrt(abar), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(unscaled[-1], Y)


def test_vmap_over_traced_timesteps():
  ts = jnp.stack([TS, targets.stage_timesteps(4, 900)])
  out = jax.vmap(lambda t: targets.staged_targets(KEY, Y, SCHEDULE, t))(ts)
  assert out.shape == (2, 4) + Y.shape
  np.testing.assert_allclose(out[0], targets.staged_targets(KEY, Y, SCHEDULE, TS), atol=1e-6)
