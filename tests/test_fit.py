"""Fitting: a tiny DIP beats its noisy input; many fits equal separate fits; resume is exact;
divergence rolls back; stages follow their budgets. One tiny network and shape for the whole
module, so each compiled function is built once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dipjax import checkpoint
from dipjax import fit
from dipjax import inputs
from dipjax import metrics
from dipjax import nets
from dipjax import noise
from dipjax import operators
from dipjax import problems
from dipjax import schedules
from dipjax import targets

SIZE, SEG = 32, 50
NET = nets.make("skip", width=8, scales=3)
CONFIG = fit.FitConfig(segment=SEG)


def _clean():
  yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
  disk = ((yy - 0.5) ** 2 + (xx - 0.45) ** 2 < 0.08).astype(np.float32)
  return np.stack([0.2 + 0.6 * disk, 0.3 + 0.4 * xx, 0.7 - 0.4 * yy], -1).astype(np.float32)


@pytest.fixture(scope="module")
def problem():
  clean = _clean()
  noisy = np.clip(clean + np.random.default_rng(0).normal(0, 25 / 255, clean.shape), 0, 1)
  net_input = inputs.dip_noise(jax.random.PRNGKey(0), SIZE, SIZE, channels=8)
  return problems.plain_problem(net_input, jnp.asarray(noisy, jnp.float32), operators.identity(),
                           4 * SEG, clean=jnp.asarray(clean))


def _run(state, problem, n, config=CONFIG):
  for _ in range(n):
    state, trace = fit.fit(state, problem, SEG, net=NET, config=config)
  return state, trace


def test_tiny_fit_beats_the_noisy_input(problem):
  state = fit.init_state(jax.random.PRNGKey(1), NET, problem, CONFIG)
  state, trace = _run(state, problem, 4)
  noisy_psnr = float(metrics.psnr(problem.observation, problem.clean))
  assert float(metrics.psnr(state.ema, problem.clean)) > noisy_psnr + 1.0
  assert trace.loss.shape == (SEG,) and trace.ssim_clean.shape == (1,)
  assert np.isfinite(np.asarray(trace.psnr_clean_ema)).all()
  assert int(state.step) == 4 * SEG


def test_resume_from_checkpoint_equals_uninterrupted(problem, tmp_path):
  init = lambda: fit.init_state(jax.random.PRNGKey(2), NET, problem, CONFIG)
  straight, _ = _run(init(), problem, 2)
  half, _ = _run(init(), problem, 1)
  checkpoint.save(tmp_path, SEG, half)
  resumed, _ = _run(checkpoint.load(tmp_path, init()), problem, 1)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def _assert_same_fit(loss_a, loss_b, out_a, out_b):
  """Same fit up to float rounding: GEMMs compiled in another context round differently, and
  a DIP fit amplifies rounding (BatchNorm over few pixels, Adam's normalised steps), so the
  first two iterations agree to 1e-5 and the outputs after SEG iterations to 1e-2."""
  np.testing.assert_allclose(loss_a[:2], loss_b[:2], rtol=1e-5)
  np.testing.assert_allclose(out_a, out_b, atol=1e-2)
  np.testing.assert_allclose(loss_a[-1], loss_b[-1], rtol=1e-2)


@pytest.mark.parametrize("batch", [1, 2])  # one after the other; vmapped
def test_many_fits_equal_separate_fits(problem, batch):
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  states = fit.init_many(keys, NET, problem, CONFIG)
  states, traces, mean = fit.fit_many(states, problem, SEG, net=NET, config=CONFIG, batch=batch)
  assert traces.loss.shape == (2, SEG)
  for m in range(2):
    single, trace = _run(fit.init_state(keys[m], NET, problem, CONFIG), problem, 1)
    _assert_same_fit(traces.loss[m], trace.loss, states.ema[m], single.ema)
  np.testing.assert_allclose(mean, states.ema.mean(0), rtol=1e-6)


def test_many_fits_reject_a_batch_that_does_not_divide(problem):
  states = fit.init_many(jax.random.split(jax.random.PRNGKey(3), 2), NET, problem, CONFIG)
  with pytest.raises(ValueError, match="batch=3"):
    fit.fit_many(states, problem, SEG, net=NET, config=CONFIG, batch=3)
  with pytest.raises(ValueError, match="devices"):
    fit.fit_many(states, problem, SEG, net=NET, config=CONFIG,
                 mesh=fit.fits_mesh(jax.devices() * 3))


def test_many_fits_over_stacked_problems(problem):
  sched = schedules.linear()
  ts = jnp.asarray(targets.stage_timesteps(2, 50))
  stacked = problems.stack([
      problem.replace(targets=targets.staged_targets(jax.random.PRNGKey(k), problem.observation,
                                                     sched, ts),
                      ends=jnp.asarray(targets.stage_ends([SEG // 2, SEG // 2])))
      for k in range(2)])
  keys = jax.random.split(jax.random.PRNGKey(4), 2)
  states = fit.init_many(keys, NET, stacked, CONFIG, shared=False)
  states, traces, _ = fit.fit_many(states, stacked, SEG, net=NET, config=CONFIG, shared=False)
  expected_stage = np.repeat([0, 1], SEG // 2)
  np.testing.assert_array_equal(traces.stage, np.stack([expected_stage] * 2))
  # The fits saw different targets, so they differ.
  assert not np.allclose(traces.psnr_target[0], traces.psnr_target[1])


def test_divergence_rolls_back_instead_of_poisoning(problem):
  config = fit.FitConfig(segment=SEG, learning_rate=1e30)
  state = fit.init_state(jax.random.PRNGKey(5), NET, problem, config)
  state, trace = fit.fit(state, problem, SEG, net=NET, config=config)
  assert np.asarray(trace.rolled_back).any()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  assert np.isfinite(np.asarray(state.ema)).all()


def test_iterations_must_fill_segments(problem):
  state = fit.init_state(jax.random.PRNGKey(6), NET, problem, CONFIG)
  with pytest.raises(ValueError, match="multiple of the segment"):
    fit.fit(state, problem, SEG + 1, net=NET, config=CONFIG)


def test_losses_are_checked(problem):
  with pytest.raises(ValueError, match="unknown loss"):
    fit.FitConfig(loss="nope")
  config = fit.FitConfig(segment=SEG, loss="perceptual")
  state = fit.init_state(jax.random.PRNGKey(6), NET, problem, CONFIG)
  with pytest.raises(ValueError, match="loss_params"):
    fit.fit(state, problem, SEG, net=NET, config=config)


def test_staged_problem_targets_probe_and_budgets():
  y = jnp.asarray(_clean())
  sched, sigma = schedules.linear(), 0.1
  p = problems.staged_problem(jax.random.PRNGKey(0), None, y, operators.identity(), 400,
                         schedule=sched, num_stages=3, t_max=60, sigma=sigma, probe_ratio=0.3,
                         final_share=0.5)
  scale = np.sqrt(np.asarray(sched.alphas_cumprod)[[60, 30, 0]])
  np.testing.assert_allclose(p.stage_scale, scale, rtol=1e-6)
  np.testing.assert_array_equal(p.ends, [100, 200, 400])
  assert abs(float(jnp.std(p.probe)) / (0.3 * sigma) - 1) < 0.05
  np.testing.assert_allclose(p.targets[-1], y + p.probe, atol=1e-6)  # t = 0: y + probe
  np.testing.assert_allclose(p.stage_noise, p.targets - scale[:, None, None, None] * y,
                             atol=1e-6)
  plain = problems.staged_problem(jax.random.PRNGKey(0), None, y, operators.identity(), 400,
                             schedule=sched, num_stages=1, t_max=0, sigma=sigma)
  assert plain.probe is None
  np.testing.assert_array_equal(plain.targets, y[None])
  with pytest.raises(ValueError, match="probe_ratio"):
    problems.staged_problem(jax.random.PRNGKey(0), None, y, operators.identity(), 400,
                       schedule=sched, num_stages=2, t_max=9, sigma=sigma, probe_ratio=-1)
  with pytest.raises(ValueError, match="final_share"):
    problems.staged_problem(jax.random.PRNGKey(0), None, y, operators.identity(), 400,
                       schedule=sched, num_stages=2, t_max=9, sigma=sigma, final_share=1.5)


@pytest.mark.parametrize("clipped", [False, True])
def test_sure_mse_tracks_the_error_against_the_clean_stage_target(clipped):
  """Outputs that fit a growing fraction of every noise in their target (and all of the
  clipping bias) while a smooth error shrinks: the estimate (no ground truth) follows the true
  error up to a small constant, so it has its minimum at the same output."""
  rng = np.random.default_rng(1)
  yy, xx = np.mgrid[0:128, 0:128] / 128
  x = np.stack([0.5 + 0.45 * np.sin(6 * xx), 0.4 + 0.3 * yy, 0.9 + 0.1 * xx * yy], -1)
  sigma, a, b = 0.1, 0.95, 0.2
  n, probe_eps, eps = (rng.standard_normal(x.shape) for _ in range(3))
  y = x + sigma * n
  bias = 0.0
  if clipped:
    y = np.clip(y, 0, 1)
    bias = np.asarray(noise.clipped_noise_moments(jnp.asarray(x, jnp.float32), sigma)[0])
  probe = 0.3 * sigma * probe_eps
  known = a * probe + b * eps  # the known noise of the stage target
  target = a * y + known
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  smooth = 0.05 * np.cos(9 * yy)[..., None]
  est, true = [], []
  for lam in np.linspace(0.0, 0.6, 13):
    f = a * (x + bias) + (1 - lam) ** 4 * smooth + lam * (target - a * (x + bias))
    est.append(float(noise.sure_mse(f32(f), f32(target), f32(known), f32(probe), f32(a),
                                  f32(sigma), clipped)))
    true.append(float(np.mean((f - a * x) ** 2)))
  est, true = np.array(est), np.array(true)
  assert 0 < np.argmin(true) < len(true) - 1  # an interior optimum
  assert np.argmin(est) == np.argmin(true)
  offset = est - true
  assert np.std(offset) < 0.05 * np.ptp(true), (offset, true)
  assert abs(np.mean(offset)) < 0.2 * np.min(true), (offset, true)


@pytest.mark.parametrize("clipped", [False, True])
def test_sure_noise_terms_swap_sigma(clipped):
  """sure_mse with another sigma is sure_mse with the first, its noise terms swapped (what the
  summary's after-the-fact sigma table relies on); unclipped, the terms are sigma^2 (2 lam - 1)."""
  rng = np.random.default_rng(2)
  y, f, probe, eps = (jnp.asarray(v, jnp.float32) for v in (
      rng.uniform(0, 1, (16, 16, 3)), rng.uniform(0, 1, (16, 16, 3)),
      0.03 * rng.standard_normal((16, 16, 3)), 0.1 * rng.standard_normal((16, 16, 3))))
  a, s1, s2 = 0.9, 0.1, 0.12
  known = a * probe + eps
  target, reference = a * y + known, a * y
  lam = jnp.sum((f - reference) * a * probe) / jnp.sum((a * probe) ** 2)
  mse = lambda s: noise.sure_mse(f, target, known, probe, a, s, clipped)
  terms = lambda s: noise.sure_noise_terms(y, s, lam, clipped)
  np.testing.assert_allclose(mse(s2), mse(s1) - a**2 * terms(s1) + a**2 * terms(s2), rtol=1e-5)
  if not clipped:
    np.testing.assert_allclose(terms(s2), s2**2 * (2 * lam - 1), rtol=1e-5)


def test_sure_mse_is_unbiased_for_a_linear_fit_with_varying_noise():
  """A synthetic linear problem with a known answer: noise of per-entry std s in measurement
  space, a probe c s eps, and a 'fit' that is a fixed linear smoother J of its target (a
  weighted circular blur: J != I, not diagonal, fitting more noise where the noise is larger).
  Averaged over draws the estimate (no ground truth) equals the true mean (f - x)^2: for
  Gaussian noise of that std map, and for Poisson noise with s estimated from y itself
  (PoissonNoise.std_map; no pixel saturates). With the noise's mean std in place of its map the
  probe weighs the entries unlike the noise and the estimate is biased."""
  rng = np.random.default_rng(3)
  yy, xx = np.mgrid[0:32, 0:32] / 32
  x = (0.3 + 0.2 * np.sin(5 * xx) * np.cos(3 * yy))[..., None]
  kernel = np.zeros((32, 32))
  kernel[:2, :2] = [[0.6, 0.1], [0.1, 0.2]]
  blur = lambda v: np.real(np.fft.ifft2(np.fft.fft2(v[..., 0]) * np.fft.fft2(kernel)))[..., None]
  weight = (0.2 + 0.7 * (xx > 0.5))[..., None]
  sure = jax.jit(noise.sure_mse, static_argnums=7)
  poisson = noise.PoissonNoise(peak=30.0)
  s_true = np.sqrt(x / 30) * (1 + 2 * (xx > 0.5))[..., None]

  def draw(kind):
    if kind == "poisson":
      y = poisson.sample(rng, x)
      s = poisson.std_map(y)
    else:
      s = s_true if kind == "gaussian" else np.full(x.shape, np.sqrt(np.mean(s_true**2)))
      y = x + s_true * rng.standard_normal(x.shape)
    p = 0.3 * s * rng.standard_normal(x.shape)
    f = (1 - weight) * x + weight * blur(y + p)
    args = [jnp.asarray(v, jnp.float32) for v in (f, y + p, p, p, 1.0, s)]
    return float(sure(*args, kind == "poisson", kind != "poisson")) - np.mean((f - x) ** 2)

  for kind, n in (("gaussian", 400), ("poisson", 400)):
    err = np.array([draw(kind) for _ in range(n)])
    assert abs(err.mean()) < 3 * err.std() / np.sqrt(n) + 1e-6, (kind, err.mean(), err.std())
  flat = np.mean([draw("flat") for _ in range(100)])
  assert abs(flat) > 5 * abs(err.mean())  # the map is what makes it unbiased


def test_held_out_entries_steer_nothing_and_are_traced(problem):
  """Pixels held out of the loss: changing y there leaves the step's update unchanged, and
  their traced error is the EMA output's error there; a mask's zeros are never held out; a
  stacked problem's fits share one hold-out set."""
  held = problems.with_holdout(problem, jax.random.PRNGKey(4), 0.2)
  share = float(np.mean(np.asarray(held.holdout)))
  assert 0.15 < share < 0.25 and set(np.unique(np.asarray(held.holdout))) == {0.0, 1.0}
  assert (np.ptp(np.asarray(held.holdout), axis=-1) == 0).all()  # whole pixels, all channels
  stacked = problems.with_holdout(problems.stack([problem, problem]), jax.random.PRNGKey(4), 0.2)
  np.testing.assert_array_equal(stacked.holdout, np.stack([held.holdout] * 2))
  moved = held.replace(observation=jnp.where(held.holdout > 0, 1.0 - held.observation,
                                             held.observation),
                       targets=jnp.where(held.holdout > 0, 1.0 - held.targets, held.targets))
  state = fit.init_state(jax.random.PRNGKey(5), NET, problem, CONFIG)
  step = jax.jit(lambda s, p: fit.train_step(s, p, net=NET, config=CONFIG))
  (a, ra), (b, rb) = step(state, held), step(state, moved)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  assert float(ra["loss"]) == float(rb["loss"]) and float(ra["holdout_mse_ema"]) != float(
      rb["holdout_mse_ema"])
  h = np.asarray(held.holdout)
  want = np.sum(h * (np.asarray(a.ema) - np.asarray(held.observation)) ** 2) / np.sum(h)
  assert float(ra["holdout_mse_ema"]) == pytest.approx(want, rel=1e-4)
  mask = np.ones((SIZE, SIZE, 1), np.float32)
  mask[:, : SIZE // 2] = 0
  masked = problem.replace(operator=operators.inpainting(mask))
  held = np.asarray(problems.with_holdout(masked, jax.random.PRNGKey(4), 0.5).holdout)
  assert held[:, : SIZE // 2].max() == 0 and held[:, SIZE // 2:].mean() > 0.4
  with pytest.raises(ValueError, match="hold-out ratio"):
    problems.with_holdout(problem, jax.random.PRNGKey(4), 1.0)
