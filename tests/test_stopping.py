"""Stopping criteria: synthetic traces with known answers, and online == after the fact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dipjax import fit
from dipjax import inputs
from dipjax import metrics
from dipjax import nets
from dipjax import noise
from dipjax import operators
from dipjax import problems
from dipjax import schedules
from dipjax import stopping

NAN = np.nan


def _detect(criterion, sigma=NAN, **records):
  n = len(next(iter(records.values())))
  records = {k: jnp.asarray(v, jnp.float32) for k, v in records.items()}
  records["step"] = jnp.arange(n)
  d = stopping.detect(criterion, records, sigma)
  return int(d.stop), int(d.fired_at)


def test_window_variance_matches_the_published_loop():
  window = np.random.default_rng(0).uniform(size=(7, 5, 4, 3)).astype(np.float32)
  mean = window.mean(axis=0)
  by_hand = np.mean([((mean - img) ** 2).sum() / img.size for img in window])
  np.testing.assert_allclose(stopping.window_variance(jnp.asarray(window)), by_hand, rtol=1e-5)


def test_emv_update_matches_the_recursion():
  rng = np.random.default_rng(1)
  mean, out = rng.uniform(size=(2, 4, 4, 1))
  new_mean, new_var = stopping.emv_update(jnp.asarray(mean), 0.5, jnp.asarray(out), 0.1)
  delta = out - mean
  np.testing.assert_allclose(new_mean, np.clip(mean + 0.1 * delta, 0, 1), rtol=1e-6)
  np.testing.assert_allclose(new_var, 0.9 * (0.5 + 0.1 * np.mean(delta**2)), rtol=1e-6)


def test_es_wmv_detects_the_minimum_and_fires_after_patience():
  t = np.arange(600)
  wmv = np.where(t < 99, NAN, (t - 300.0) ** 2 + 1.0)
  assert _detect(stopping.get("es_wmv", patience=100), wmv=wmv) == (300, 400)
  # Never fires within the run: the stop is the minimum so far.
  assert _detect(stopping.get("es_wmv", patience=1000), wmv=wmv) == (300, -1)


def test_ties_do_not_reset_patience():
  wmv = [3.0, 2.0, 2.0, 2.0, 1.5, 1.5, 1.5]
  assert _detect(stopping.get("es_wmv", patience=2), wmv=wmv) == (1, 3)


def test_plateau_needs_a_relative_improvement():
  loss = [1.0, 0.5, 0.4999, 0.4998, 0.4997, 0.3]
  assert _detect(stopping.get("plateau", patience=3, min_delta=1e-2), loss=loss) == (1, 4)
  assert _detect(stopping.get("plateau", patience=3, min_delta=0.0), loss=loss) == (5, -1)


def test_discrepancy_stops_at_the_first_crossing():
  sigma = 0.1  # sigma^2 = 0.01, i.e. 20 dB
  psnr = [15.0, 18.0, 19.9, 20.1, 22.0, 19.0, 25.0]
  assert _detect(stopping.get("discrepancy"), sigma, psnr_obs_ema=psnr) == (3, 3)
  assert _detect(stopping.get("discrepancy", tau=0.5), sigma, psnr_obs_ema=psnr) == (6, 6)


def test_oracle_and_fixed():
  psnr = [20.0, 25.0, 27.0, 26.0, 24.0]
  assert _detect(stopping.get("oracle"), psnr_clean_ema=psnr) == (2, -1)
  assert _detect(stopping.get("fixed"), psnr_clean_ema=psnr) == (4, -1)


def test_staged_takes_the_best_estimate_of_the_last_stage():
  est = [1.0, 2.0, 9.0, 6.0, 3.0, 4.0, 8.0]  # the first stage's values are not compared
  final = [0, 0, 1, 1, 1, 1, 1]
  assert _detect(stopping.get("staged"), mse_est_ema=est, final_stage=final) == (4, -1)
  staged = stopping.get("staged", patience=2)
  assert _detect(staged, mse_est_ema=est, final_stage=final) == (4, 6)


def test_rolled_back_iterations_are_not_scored():
  psnr = [20.0, 25.0, 30.0, 26.0]
  oracle = stopping.get("oracle")
  assert _detect(oracle, psnr_clean_ema=psnr, rolled_back=[0, 0, 1, 0]) == (3, -1)


def test_detect_vmaps_over_fits():
  wmv = jnp.asarray([[5.0, 1.0, 2.0, 3.0], [5.0, 4.0, 3.0, 4.0]])
  records = dict(wmv=wmv, step=jnp.broadcast_to(jnp.arange(4), (2, 4)))
  d = jax.vmap(lambda r: stopping.detect(stopping.get("es_wmv", patience=1), r))(records)
  np.testing.assert_array_equal(d.stop, [1, 2])
  np.testing.assert_array_equal(d.fired_at, [2, 3])


def test_every_kind_is_one_registry_entry_with_its_published_settings():
  assert stopping.KINDS == tuple(stopping.REGISTRY)
  assert stopping.get("es_wmv") == stopping.Criterion("es_wmv", patience=1000)
  assert stopping.get("staged").patience == 500 and stopping.get("oracle").patience is None
  assert stopping.get("plateau", patience=7) == stopping.Criterion("plateau", 7, 1e-3)
  records = dict(step=jnp.arange(3), loss=jnp.ones(3), psnr_clean_ema=jnp.array([1., 3., 2.]))
  np.testing.assert_array_equal(stopping.score(stopping.get("oracle"), records, 0.1),
                                [-1.0, -3.0, -2.0])


def test_bad_criteria_are_rejected():
  with pytest.raises(ValueError, match="Unknown criterion"):
    stopping.get("early")
  with pytest.raises(ValueError, match="patience"):
    stopping.Criterion("es_wmv", patience=-1)
  with pytest.raises(ValueError, match="window"):
    fit.FitConfig(criteria=(stopping.get("es_wmv"),))
  with pytest.raises(ValueError, match="halt"):
    fit.FitConfig(criteria=(stopping.get("oracle"),), halt=stopping.get("fixed"))
  with pytest.raises(ValueError, match="unique"):
    fit.FitConfig(criteria=(stopping.get("discrepancy", tau=1.0),
                            stopping.get("discrepancy", tau=0.9)))


def test_clipped_noise_moments_match_sampling():
  rng = np.random.default_rng(0)
  x = np.array([0.0, 0.03, 0.5, 0.9, 1.0])
  e = np.clip(x + 0.1 * rng.standard_normal((400_000, 5)), 0, 1) - x
  mean, var = noise.clipped_noise_moments(jnp.asarray(x, jnp.float32), 0.1)
  np.testing.assert_allclose(mean, e.mean(0), atol=1e-3)
  np.testing.assert_allclose(var, e.var(0), rtol=1e-2, atol=1e-5)


def test_noise_std_of_clipped_and_unclipped_observations():
  rng = np.random.default_rng(4)
  x = np.where(rng.uniform(size=(64, 64, 3)) < 0.5, 0.05, 0.95).astype(np.float32)
  e = 50 / 255 * rng.standard_normal(x.shape).astype(np.float32)
  clipped = np.clip(x + e, 0, 1)
  true = np.sqrt(np.mean((clipped - x) ** 2))
  assert true**2 < 0.7 * (50 / 255) ** 2
  assert float(noise.noise_std(clipped, 50 / 255, proxy=x)) == pytest.approx(true, rel=0.02)
  assert float(noise.noise_std(x + e, 50 / 255)) == pytest.approx(50 / 255)  # not clipped


def test_estimate_sigma_on_noise_and_on_a_smooth_image():
  rng = np.random.default_rng(2)
  flat = 0.5 + 0.1 * rng.standard_normal((128, 128, 3))
  assert noise.estimate_sigma(flat) == pytest.approx(0.1, rel=0.03)
  u, v = np.meshgrid(np.linspace(0, 1, 96), np.linspace(0, 1, 96))
  smooth = (0.3 + 0.4 * np.sin(3 * u) * v)[..., None]
  noisy = smooth + 25 / 255 * rng.standard_normal(smooth.shape)
  assert noise.estimate_sigma(noisy) == pytest.approx(25 / 255, rel=0.05)
  with pytest.raises(ValueError, match="H, W, C"):
    noise.estimate_sigma(np.zeros((8, 8)))


# One tiny staged fit (2 stages, with a probe) monitored online by every criterion, halted by
# ES-WMV.
SIZE, ITERS, SEG, WINDOW = 16, 240, 40, 10
CRITERIA = (stopping.get("fixed"), stopping.get("oracle"), stopping.get("es_wmv", patience=30),
            stopping.get("es_emv", patience=30), stopping.get("discrepancy"),
            stopping.get("plateau", patience=50, min_delta=1e-3), stopping.get("staged"))


@pytest.fixture(scope="module")
def monitored():
  rng = np.random.default_rng(3)
  u, v = np.meshgrid(np.linspace(0, 1, SIZE), np.linspace(0, 1, SIZE))
  clean = np.stack([u, v, u * v], -1).astype(np.float32)
  sigma = 0.1
  noisy = jnp.asarray(clean + sigma * rng.standard_normal(clean.shape), jnp.float32)
  net = nets.make("skip", width=4, scales=2)
  problem = problems.staged_problem(
      jax.random.PRNGKey(2), inputs.dip_noise(jax.random.PRNGKey(0), SIZE, SIZE, channels=4),
      noisy, operators.identity(), ITERS, schedule=schedules.linear(), num_stages=2, t_max=20,
      sigma=sigma, probe_ratio=0.3, final_share=0.75, clean=jnp.asarray(clean))
  config = fit.FitConfig(segment=SEG, window=WINDOW, criteria=CRITERIA, halt=CRITERIA[2])
  state = fit.init_state(jax.random.PRNGKey(1), net, problem, config)
  state, trace = fit.fit(state, problem, ITERS, net=net, config=config)
  return state, trace, config, sigma, jnp.asarray(clean)


def test_online_stops_equal_detection_after_the_fact(monitored):
  state, trace, config, sigma, clean = monitored
  records = fit.trace_records(trace)
  online = fit.stops(state, config)
  for criterion in CRITERIA:
    stop, image = online[criterion.name]
    assert int(stop) == int(stopping.detect(criterion, records, sigma).stop), criterion.name
    if int(stop) >= 0:  # the kept image is the EMA output of that iteration
      np.testing.assert_allclose(
          float(metrics.psnr(image, clean)),
          float(trace.psnr_clean_ema[int(stop)]), atol=1e-3)


def test_halting_skips_the_rest_of_the_fit(monitored):
  state, trace, config, sigma, _ = monitored
  fired = int(stopping.detect(config.halt, fit.trace_records(trace), sigma).fired_at)
  assert 0 < fired < ITERS - 1
  assert np.all(np.isfinite(np.asarray(trace.loss[:fired + 1])))
  assert np.all(np.isnan(np.asarray(trace.loss[fired + 1:])))
  assert np.all(np.asarray(trace.stage[fired + 1:]) == -1)
  assert int(state.step) == ITERS
