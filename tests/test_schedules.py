"""Tests for dipjax.schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dipjax import schedules


def test_linear_matches_closed_form():
  s = schedules.linear(100, 1e-4, 0.02)
  betas = np.concatenate([[0.0], np.linspace(1e-4, 0.02, 100)])
  assert s.num_steps == 100
  assert s.betas.shape == s.alphas_cumprod.shape == (101,)
  assert s.betas[0] == 0.0 and s.alphas_cumprod[0] == 1.0
  np.testing.assert_allclose(np.asarray(s.betas)[[1, -1]], [1e-4, 0.02], rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1.0 - betas), rtol=1e-5)


def test_cosine_matches_formula_where_unclipped():
  num_steps, off = 200, 0.008
  s = schedules.cosine(num_steps, s=off)
  t = np.arange(num_steps + 1)
  f = np.cos((t / num_steps + off) / (1 + off) * np.pi / 2) ** 2
  abar = f / f[0]
  assert s.betas[0] == 0.0 and s.alphas_cumprod[0] == 1.0
  assert float(s.betas.max()) <= 0.999 + 1e-6
  # Clipping only bites at the very end; everywhere before it the formula holds.
  np.testing.assert_allclose(s.alphas_cumprod[:-1], abar[:-1], rtol=1e-4, atol=1e-7)
  assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)


def test_get_and_bad_names():
  np.testing.assert_array_equal(schedules.get("cosine", 10).betas, schedules.cosine(10).betas)
  assert schedules.get("linear", 7).num_steps == 7
  with pytest.raises(ValueError, match="valid names"):
    schedules.get("sigmoid")
  with pytest.raises(ValueError):
    schedules.linear(0)
  with pytest.raises(ValueError):
    schedules.linear(10, beta_start=0.1, beta_end=0.01)
  with pytest.raises(ValueError):
    schedules.cosine(10, max_beta=1.0)


def test_noise_level():
  s = schedules.linear(50)
  abar = np.asarray(s.alphas_cumprod)
  np.testing.assert_allclose(schedules.noise_level(s, jnp.arange(51)),
                             np.sqrt((1 - abar) / abar), rtol=1e-5)
  assert schedules.noise_level(s, 0) == 0.0


def test_q_sample_statistics():
  s = schedules.linear(100)
  t = 60
  abar = float(s.alphas_cumprod[t])
  x0 = np.full((200_000,), 0.5, np.float32)
  eps = np.random.default_rng(0).standard_normal(x0.shape, np.float32)
  xt = np.asarray(schedules.q_sample(s, x0, t, eps))
  np.testing.assert_allclose(xt.mean(), np.sqrt(abar) * 0.5, atol=5e-3)
  np.testing.assert_allclose(xt.std(), np.sqrt(1 - abar), rtol=1e-2)


def test_q_sample_batched_t():
  s = schedules.cosine(20)
  x0 = np.ones((3, 4, 4, 1), np.float32)
  xt = schedules.q_sample(s, x0, jnp.array([0, 5, 20]), np.zeros_like(x0))
  np.testing.assert_allclose(xt[:, 0, 0, 0], np.sqrt(np.asarray(s.alphas_cumprod)[[0, 5, 20]]),
                             rtol=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_t_for_sigma_round_trip(name):
  s = schedules.get(name, 1000)
  sigma = jnp.linspace(0.0, 1.0, 41)
  t = jax.jit(schedules.t_for_sigma)(s, sigma)
  assert t.dtype == jnp.int32 and t[0] == 0
  assert np.all(np.diff(np.asarray(t)) >= 0)
  # The chosen step's sigma is within one step's gap of the request.
  levels = schedules.noise_level(s, jnp.arange(1001))
  gap = jnp.maximum(levels[jnp.minimum(t + 1, 1000)] - levels[t],
                    levels[t] - levels[jnp.maximum(t - 1, 0)])
  assert np.all(np.abs(levels[t] - sigma) <= gap + 1e-6)
  assert schedules.t_for_sigma(s, 25 / 255).shape == ()


def test_stack_and_vmap():
  s1, s2 = schedules.linear(30), schedules.cosine(30)
  stacked = jax.tree.map(lambda *a: jnp.stack(a), s1, s2)
  assert stacked.betas.shape == (2, 31) and stacked.num_steps == 30
  x0 = np.full((2, 2, 1), 0.5, np.float32)
  eps = np.random.default_rng(1).standard_normal(x0.shape, np.float32)
  out = jax.vmap(lambda s: schedules.q_sample(s, x0, 10, eps))(stacked)
  np.testing.assert_allclose(out[0], schedules.q_sample(s1, x0, 10, eps), rtol=1e-6)
  np.testing.assert_allclose(out[1], schedules.q_sample(s2, x0, 10, eps), rtol=1e-6)
  ts = jax.vmap(schedules.t_for_sigma, in_axes=(0, None))(stacked, 0.1)
  assert ts.shape == (2,)
