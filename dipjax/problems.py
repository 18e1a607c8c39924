"""What a DIP fit is fitted to: :class:`Problem` (all arrays, so problems stack and vmap) and
its builders — plain DIP (:func:`plain_problem`), DDPM-staged targets with a probe
(:func:`staged_problem`, :func:`staged_problems`) — and :func:`stack`.

Shapes: the network input z is (H, W, Cz), the ground truth (H, W, C); the observation y and the
stage targets live in measurement space, (h, w, C) and (K, h, w, C).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dipjax import noise as noise_lib
from dipjax import schedules
from dipjax import targets as targets_lib
from dipjax.inputs import NetInput
from dipjax.operators import Operator

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class Problem:
  """What one fit is fitted to (all arrays, so problems can be stacked and vmapped).

  Attributes:
    inputs: the network input z = base + std * N(0, 1), redrawn every step.
    targets: (K, h, w, C) stage targets, noisiest first; the last is usually y itself.
    ends: (K,) int32 cumulative iteration at which each stage ends.
    observation: (h, w, C) the degraded image y.
    operator: the forward operator A, image (H, W, C) -> measurement (h, w, C).
    clean: (H, W, C) ground truth, or None.
    sigma: noise std of the observation in [0, 1] units, known or estimated
      (:func:`noise.estimate_sigma`), for criteria that use it: () or per entry (h, w, C)
      (Poisson noise); None if unknown.
    stage_noise: (K, h, w, C) the known noise m_k each stage target adds to its noise-free
      part a_k y (for x_k = sqrt(abar) (y + p) + sqrt(1 - abar) eps: sqrt(abar) p +
      sqrt(1 - abar) eps; zeros for y itself), to trace how much of it the output has fitted
      (``noise_fit_ema``); None if unknown.
    probe: (h, w, C) a known noise image p added to y before staging, in a fixed ratio to the
      observation's noise (:func:`staged_problem`), so that the fit can estimate its own error
      (``mse_est_ema``, the 'staged' criterion); None without one.
    stage_scale: (K,) a_k, the factor of y in each stage target (sqrt(abar_t), or 1); None
      means all 1.
    loss_params: the weights the loss needs (VGG19's for 'perceptual',
      :func:`losses.load_vgg19`), or None. Stacked problems copy them per fit: prefer one
      shared problem with them.
    poisson: whether y's noise is Poisson (static): the SURE and discrepancy terms then take its
      clipping at white only (:func:`noise.clipped_noise_moments` with lower=False).
    holdout: (h, w, C) float32 in {0, 1}, measurement entries left out of the loss, whose error
      the fit traces (``holdout_mse_ema``, the 'holdout' criterion; :func:`with_holdout`); None
      fits every entry.
  """
  inputs: NetInput
  targets: Array
  ends: Array
  observation: Array
  operator: Operator
  clean: Array | None = None
  sigma: Array | None = None
  stage_noise: Array | None = None
  probe: Array | None = None
  stage_scale: Array | None = None
  loss_params: PyTree = None
  poisson: bool = flax.struct.field(pytree_node=False, default=False)
  holdout: Array | None = None


def plain_problem(inputs: NetInput, observation: Array, operator: Operator, iters: int,
                  clean: Array | None = None, sigma: float | Array | None = None) -> Problem:
  """Classic DIP: one stage whose target is the observation, for `iters` iterations. sigma:
  the noise std, () or (h, w, C), or None."""
  return Problem(inputs, observation[None], jnp.array([iters], jnp.int32), observation,
                 operator, clean, None if sigma is None else jnp.asarray(sigma, jnp.float32))


def staged_problem(key: Array, inputs: NetInput, observation: Array, operator: Operator,
                   iters: int, *, schedule: schedules.Schedule, num_stages: int, t_max: int,
                   sigma: float | Array, probe_ratio: float = 0.0, correlation: float = 0.0,
                   fresh_noise: bool = False, scaled: bool = True,
                   final_share: float | None = None, clean: Array | None = None) -> Problem:
  """DDPM-staged DIP: K targets x_k = a_k (y + p) + b_k eps_k from t_max down to t = 0.

  a_k, b_k are sqrt(abar_t), sqrt(1 - abar_t) (scaled) or 1, noise_level(t)
  (:func:`targets.staged_targets`). p = probe_ratio * sigma * N(0, 1) is the probe: known
  noise in a fixed ratio to the observation's own (unknown) noise and of its spectrum (white,
  or correlated as the observation's: `correlation`), present in every stage, so the network
  fits both at the same rate and the fitted fraction of p tells how much of the
  unknown noise the output has absorbed (``mse_est_ema``; :mod:`dipjax.stopping` 'staged').
  probe_ratio = 0: no probe, the last target is y itself.

  Args:
    key: PRNG key for the probe and the stage noise.
    inputs, observation (h, w, C), operator, clean: as for :func:`plain_problem`.
    iters: total iterations, shared over the stages (:func:`targets.stage_lengths`).
    schedule, num_stages, t_max, fresh_noise, scaled: the stage targets
      (:func:`targets.stage_timesteps`, :func:`targets.staged_targets`).
    sigma: the observation's noise std in [0, 1] units, known or estimated: a float, or per
      entry (h, w, C) for Poisson noise (the probe then has the noise's varying std).
    correlation: the width of the kernel that correlates the observation's noise
      (:func:`noise.correlate`), and so the probe's; 0: white.
    final_share: fraction of `iters` given to the last stage (the rest split equally);
      None splits all equally (with one stage it has nothing to split).
  """
  if probe_ratio < 0:
    raise ValueError(f"probe_ratio must be >= 0, got {probe_ratio}")
  if not 0 <= t_max <= schedule.num_steps:
    raise ValueError(f"t_max must lie in [0, {schedule.num_steps}] (the schedule's timesteps), "
                     f"got {t_max}")
  weights = None
  if final_share is not None:
    if not 0.0 < final_share < 1.0:
      raise ValueError(f"final_share must lie in (0, 1), got {final_share}")
    if num_stages > 1:
      rest = (1.0 - final_share) / (num_stages - 1)
      weights = np.array([rest] * (num_stages - 1) + [final_share])
  ends = targets_lib.stage_ends(targets_lib.stage_lengths(iters, num_stages, weights))
  k_probe, k_stages = jax.random.split(key)
  y = jnp.asarray(observation, jnp.float32)
  probe = None
  if probe_ratio:
    white = jax.random.normal(k_probe, y.shape, jnp.float32)
    probe = probe_ratio * sigma * noise_lib.correlate(white, correlation)
  ts = jnp.asarray(targets_lib.stage_timesteps(num_stages, t_max))
  stage_targets = targets_lib.staged_targets(k_stages, y if probe is None else y + probe,
                                             schedule, ts, fresh_noise=fresh_noise,
                                             scaled=scaled)
  scale = targets_lib.stage_scales(schedule, ts, scaled=scaled)
  noise = stage_targets - scale[:, None, None, None] * y
  return Problem(inputs, stage_targets, jnp.asarray(ends), y, operator, clean,
                 jnp.asarray(sigma, jnp.float32), noise, probe, scale)


def with_holdout(problem: Problem, key: Array, ratio: float) -> Problem:
  """The problem with a random `ratio` of its informative measurement pixels (all channels)
  held out of the loss (self-validation, cf. Li et al., "Self-Validation: Early Stopping for
  Single-Instance Deep Generative Priors", BMVC 2021): their error against y, which the fit
  never sees, estimates the error of its predictions where y says nothing (a mask's missing
  pixels) plus the noise's variance, a constant. Pixels A maps no image to (a mask's zeros) are
  never held out. ratio in (0, 1); a stacked problem gets one hold-out set (drawn from `key`)
  for all fits.
  """
  if not 0.0 < ratio < 1.0:
    raise ValueError(f"the hold-out ratio must lie in (0, 1), got {ratio}")
  y = problem.observation
  operator = problem.operator
  if y.ndim == 4:  # stacked: the fits share the operator
    operator = jax.tree.map(lambda a: a[0], operator)
  shape = problem.inputs.base.shape[-3:-1] + y.shape[-1:]
  informative = operator(jnp.ones(shape, jnp.float32)) > 0.5
  drawn = jax.random.uniform(key, y.shape[-3:-1] + (1,)) < ratio  # whole pixels
  holdout = jnp.broadcast_to(drawn & informative, y.shape).astype(jnp.float32)
  return problem.replace(holdout=holdout)


def staged_problems(key: Array, num_fits: int, *args, **kwargs) -> Problem:
  """`num_fits` staged problems stacked along a leading model axis (``fit_many(...,
  shared=False)``), fit i with key fold_in(key, i): each its own probe and stage noise, which
  then average out in an ensemble. Other arguments as for :func:`staged_problem`."""
  return stack([staged_problem(jax.random.fold_in(key, i), *args, **kwargs)
                for i in range(num_fits)])


def stack(trees: list[PyTree]) -> PyTree:
  """Stacks pytrees of equal structure along a new leading (model) axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
