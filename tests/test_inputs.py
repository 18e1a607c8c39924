"""Tests for dipjax.inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dipjax import inputs, schedules

SCHEDULE = schedules.linear(1000)
KEY = jax.random.key(0)
Y = np.random.default_rng(0).random((8, 8, 3), np.float32)


def test_dip_noise_shapes_and_range():
  inp = inputs.dip_noise(KEY, 8, 8, channels=3, scale=0.1, reg_noise_std=0.05)
  assert inp.base.shape == (8, 8, 3) and inp.std.shape == (3,) and inp.channels == 3
  assert float(inp.base.min()) >= 0.0 and float(inp.base.max()) < 0.1
  np.testing.assert_allclose(inp.std, 0.05)
  with pytest.raises(ValueError):
    inputs.dip_noise(KEY, 0, 5)
  with pytest.raises(ValueError, match="reg_noise_std"):
    inputs.dip_noise(KEY, 4, 4, reg_noise_std=-1.0)


def test_meshgrid():
  inp = inputs.meshgrid(3, 5)
  assert inp.base.shape == (3, 5, 2) and inp.channels == 2
  np.testing.assert_allclose(inp.base[0, :, 0], np.arange(5) / 4)
  np.testing.assert_allclose(inp.base[:, 0, 1], np.arange(3) / 2)
  np.testing.assert_allclose(inp.base[2, :, 1], 1.0)
  np.testing.assert_array_equal(inp.sample(KEY), inp.base)
  with pytest.raises(ValueError):
    inputs.meshgrid(1, 5)


def test_sample_statistics():
  inp = inputs.NetInput(base=jnp.broadcast_to(jnp.array([0.2, -1.0, 3.0]), (64, 64, 3)),
                        std=jnp.array([0.0, 0.5, 2.0]))
  z = np.asarray(inp.sample(KEY))
  assert z.shape == (64, 64, 3)
  np.testing.assert_allclose(z.mean(axis=(0, 1)), [0.2, -1.0, 3.0], atol=0.1)
  np.testing.assert_allclose(z.std(axis=(0, 1)), [0.0, 0.5, 2.0], rtol=0.05, atol=1e-4)
  assert not np.allclose(inp.sample(KEY), inp.sample(jax.random.key(1)))


@pytest.mark.parametrize("key", [KEY, jax.random.PRNGKey(5)], ids=["typed", "raw"])
def test_standard_normal_is_jax_classic_threefry(key):
  with jax.threefry_partitionable(False):
    want = jax.random.normal(key, (5, 7, 3))
  np.testing.assert_array_equal(inputs._standard_normal(key, (5, 7, 3)), want)
  batched = jax.vmap(lambda k: inputs._standard_normal(k, (4, 3)))(jax.random.split(key, 2))
  assert batched.shape == (2, 4, 3) and not np.allclose(batched[0], batched[1])


def test_standard_normal_other_key_impl():
  z = np.asarray(inputs._standard_normal(jax.random.key(0, impl="rbg"), (64, 64)))
  assert z.shape == (64, 64) and abs(z.mean()) < 0.05 and abs(z.std() - 1.0) < 0.05


@pytest.mark.parametrize("fresh", [True, False])
def test_ddpm_noised_t0_is_y(fresh):
  inp = inputs.ddpm_noised(KEY, Y, SCHEDULE, 0, fresh=fresh)
  np.testing.assert_array_equal(inp.base, Y)
  np.testing.assert_array_equal(inp.sample(jax.random.key(1)), Y)


def test_ddpm_noised_fresh_vs_fixed():
  t = 300
  abar = float(SCHEDULE.alphas_cumprod[t])
  fresh = inputs.ddpm_noised(KEY, Y, SCHEDULE, t)
  np.testing.assert_allclose(fresh.base, np.sqrt(abar) * Y, rtol=1e-6)
  np.testing.assert_allclose(fresh.std, np.full(3, np.sqrt(1 - abar)), rtol=1e-6)
  z1, z2 = (np.asarray(fresh.sample(jax.random.key(i))) for i in (1, 2))
  np.testing.assert_allclose((z1 - fresh.base).std(), np.sqrt(1 - abar), rtol=0.15)
  assert abs(np.corrcoef((z1 - fresh.base).ravel(), (z2 - fresh.base).ravel())[0, 1]) < 0.3

  fixed = inputs.ddpm_noised(KEY, Y, SCHEDULE, t, fresh=False, reg_noise_std=0.01)
  np.testing.assert_allclose(fixed.std, 0.01)
  resid = (np.asarray(fixed.base) - np.sqrt(abar) * Y) / np.sqrt(1 - abar)
  np.testing.assert_allclose(resid.std(), 1.0, rtol=0.15)
  again = inputs.ddpm_noised(KEY, Y, SCHEDULE, t, fresh=False)
  np.testing.assert_array_equal(again.base, fixed.base)


def test_ddpm_noised_extra_channels_and_errors():
  inp = inputs.ddpm_noised(KEY, Y, SCHEDULE, 100, extra_channels=3, extra_scale=0.2,
                           reg_noise_std=0.03)
  assert inp.base.shape == (8, 8, 6) and inp.std.shape == (6,) and inp.channels == 6
  extra = np.asarray(inp.base[..., 3:])
  assert extra.min() >= 0.0 and extra.max() < 0.2
  np.testing.assert_allclose(inp.std[3:], 0.03)
  with pytest.raises(ValueError, match="t must lie"):
    inputs.ddpm_noised(KEY, Y, SCHEDULE, 1001)
  with pytest.raises(ValueError, match="shape"):
    inputs.ddpm_noised(KEY, Y[0], SCHEDULE, 10)


def test_vmap_over_stacked_inputs():
  a = inputs.NetInput(base=jnp.asarray(Y[..., :2]), std=jnp.zeros(2))
  b = inputs.meshgrid(8, 8)
  stacked = jax.tree.map(lambda *x: jnp.stack(x), a, b)
  z = jax.vmap(lambda inp, k: inp.sample(k))(stacked, jax.random.split(KEY, 2))
  assert z.shape == (2, 8, 8, 2)
  np.testing.assert_array_equal(z[0], a.base)
  np.testing.assert_array_equal(z[1], b.base)


def test_ddpm_noised_traced_t():
  many = jax.vmap(lambda t: inputs.ddpm_noised(KEY, Y, SCHEDULE, t, extra_channels=3))(
      jnp.array([0, 500]))
  assert many.base.shape == (2, 8, 8, 6) and many.std.shape == (2, 6)
  np.testing.assert_array_equal(many.base[0, ..., :3], Y)
  np.testing.assert_allclose(many.std[1, :3], np.sqrt(1 - SCHEDULE.alphas_cumprod[500]),
                             rtol=1e-6)
