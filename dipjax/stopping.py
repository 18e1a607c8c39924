"""When to stop a DIP fit: criteria over its per-iteration records, online or after the fact.

Every criterion here is "argmin with patience" over a per-iteration score s_t (lower is better,
NaN where it is not defined yet): the detected stop is the iteration of the lowest score seen
so far, and the criterion fires once `patience` defined iterations pass without a new minimum
(`patience=None`: it never fires and the stop is the argmin over the whole run). One function,
:func:`update`, runs both online inside the fit's scan (``fit.FitConfig(criteria=...)`` keeps
the EMA output at each criterion's current stop and ``halt=`` ends the fit when one fires) and
after the fact over a trace (:func:`detect`), so the two give the same stop by construction.

Criteria (``Criterion.kind``):
  fixed        the last iteration (a fixed budget).
  oracle       argmax PSNR of the EMA output against the ground truth: the upper bound every
               other criterion is scored by (needs the clean image).
  es_wmv       ES-WMV (Wang et al., "Early Stopping for Deep Image Prior", TMLR 2023): the
               variance of the last W raw outputs, mean over the window of the per-pixel
               squared distance to the window mean; detection at its minimum, patience P
               (W=100, P=1000 as published; W is ``fit.FitConfig.window``).
  es_emv       ES-EMV from the same paper: exponential moving variance of the raw outputs,
               mean_t = clip(mean + a d, 0, 1), v_t = (1 - a)(v + a |d|^2), d = out - mean
               (a = ``fit.FitConfig.emv_alpha`` = 0.1; |d|^2 averaged over pixels, which only
               rescales v); the first ``fit.EMV_BURN_IN`` iterations are not scored.
  plateau      loss plateau: the training loss has not improved by a relative `min_delta`
               within `patience` iterations.
  discrepancy  Morozov's discrepancy principle: the first iteration where the EMA output's
               mean squared residual to the observation drops to tau * s^2, s the noise's
               std (:func:`dipjax.noise.noise_std`: sigma, or less where it is clipped).
  staged       the staged-supervision criterion: argmin over the last stage of the EMA
               output's squared error estimated without the ground truth (``mse_est_ema``,
               :func:`dipjax.noise.sure_mse`). Every stage target carries a known probe noise in a
               fixed ratio to the observation's noise; how much of the probe the output has
               fitted measures how much of the unknown noise it has fitted, which turns the
               error against the known-noise stage target into an unbiased estimate of the
               error against the clean image (SURE). Needs a fit with a probe
               (``problems.staged_problem(probe_ratio > 0)``) and sigma (known or estimated).
               Any operator: the error is A's, in measurement space; Poisson noise: a probe of
               the noise's own varying std (:func:`dipjax.noise.sure_mse`).
  holdout      self-validation: argmin over the last stage of the EMA output's error on
               measurement pixels held out of the loss (``holdout_mse_ema``,
               :func:`dipjax.problems.with_holdout`), which the fit never sees: an estimate
               of its prediction error, noise-free tasks included, where no noise-based
               estimate says anything.

Scores are computed from a mapping of per-iteration records (a fit's step record, or the
arrays of a :class:`dipjax.fit.Trace` plus ``step``), elementwise, so one :func:`score`
serves both uses. sigma, the noise std of the observation in [0, 1] units, is known or
estimated with :func:`dipjax.noise.estimate_sigma`. Every kind is one entry of
:data:`REGISTRY` (its score and published settings); :func:`get` builds a criterion by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp

Array = jax.Array

@dataclasses.dataclass(frozen=True)
class Criterion:
  """A stopping rule (hashable: it is part of the static fit configuration); build it with
  :func:`get`.

  Attributes:
    kind: one of :data:`KINDS`.
    patience: defined iterations without a new minimum before it fires; None never fires.
    min_delta: relative improvement a new minimum needs (plateau).
    tau: discrepancy level as a multiple of sigma^2.
  """
  kind: str
  patience: int | None = None
  min_delta: float = 0.0
  tau: float = 1.0

  def __post_init__(self):
    if self.kind not in REGISTRY:
      raise ValueError(f"Unknown criterion {self.kind!r}; valid kinds are {list(KINDS)}.")
    if self.patience is not None and self.patience < 0:
      raise ValueError(f"patience must be >= 0 or None, got {self.patience}.")
    if not 0.0 <= self.min_delta < 1.0:
      raise ValueError(f"min_delta must be in [0, 1), got {self.min_delta}.")
    if self.tau <= 0:
      raise ValueError(f"tau must be positive, got {self.tau}.")

  @property
  def name(self) -> str:
    return self.kind


Score = Callable[[Criterion, Mapping[str, Array], Array], Array]


@dataclasses.dataclass(frozen=True)
class Kind:
  """A registered criterion kind: its per-iteration score (lower is better, NaN undefined) of
  (criterion, records, sigma), and its published settings (:class:`Criterion` fields)."""
  score: Score
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _mse_from_psnr(psnr: Array) -> Array:
  return 10.0 ** (-psnr / 10.0)


def _discrepancy(criterion: Criterion, records: Mapping[str, Array], sigma: Array) -> Array:
  residual = _mse_from_psnr(records["psnr_obs_ema"])
  crossed = residual <= criterion.tau * jnp.asarray(sigma, jnp.float32) ** 2
  return jnp.where(crossed, 0.0, jnp.nan)


# Every criterion, in one table: adding one is one entry (and, for a new traced quantity, its
# record in fit.train_step). The staged criterion's patience is shorter than ES-WMV's: its
# score is smooth (an EMA output's error), so 500 iterations end a fit well past its minimum.
REGISTRY: dict[str, Kind] = {
    "fixed": Kind(lambda c, r, sigma: -jnp.asarray(r["step"], jnp.float32)),
    "oracle": Kind(lambda c, r, sigma: -r["psnr_clean_ema"]),
    "es_wmv": Kind(lambda c, r, sigma: r["wmv"], dict(patience=1000)),
    "es_emv": Kind(lambda c, r, sigma: r["emv"], dict(patience=1000)),
    "plateau": Kind(lambda c, r, sigma: r["loss"], dict(patience=500, min_delta=1e-3)),
    "discrepancy": Kind(_discrepancy, dict(patience=0)),
    "staged": Kind(lambda c, r, sigma: jnp.where(r["final_stage"], r["mse_est_ema"], jnp.nan),
                   dict(patience=500)),
    "holdout": Kind(lambda c, r, sigma: jnp.where(r["final_stage"], r["holdout_mse_ema"],
                                                  jnp.nan), dict(patience=500)),
}
KINDS = tuple(REGISTRY)


def get(name: str, **settings: Any) -> Criterion:
  """The criterion `name` with its published settings, any of them overridden by `settings`
  (e.g. ``get('es_wmv', patience=500)``)."""
  if name not in REGISTRY:
    raise ValueError(f"Unknown criterion {name!r}; valid names are {list(KINDS)}.")
  return Criterion(name, **{**REGISTRY[name].settings, **settings})


def score(criterion: Criterion, records: Mapping[str, Array], sigma: Array | float) -> Array:
  """The criterion's per-iteration score (lower is better, NaN = undefined), elementwise.

  Args:
    records: per-iteration values of the fit's trace fields ('step', 'loss', 'psnr_obs_ema',
      'psnr_clean_ema', 'wmv', 'emv', 'mse_est_ema' with 'final_stage', 'holdout_mse_ema';
      where present, 'rolled_back' set or 'loss' NaN make an iteration undefined), scalars or
      arrays of one shape.
    sigma: noise std of the observation in [0, 1] units (used by 'discrepancy', which wants
      :func:`dipjax.noise.noise_std` of a clipped observation; NaN if unknown).
  """
  s = REGISTRY[criterion.kind].score(criterion, records, sigma)
  if "rolled_back" in records:  # a rolled-back iteration's output was discarded
    s = jnp.where(records["rolled_back"], jnp.nan, s)
  if "loss" in records:  # NaN: an iteration a halted fit skipped
    s = jnp.where(jnp.isnan(records["loss"]), jnp.nan, s)
  return s


def window_variance(window: Array, total: Array | None = None) -> Array:
  """ES-WMV's variance of W images (W, H, W', C): the mean over the window of each image's
  mean squared distance to the window's mean image.

  total: the window's sum over W, (H, W', C), if known (a fit keeps it as a running sum: an
  error d in it changes the result by only mean(d / W)^2).
  """
  total = jnp.sum(window, axis=0) if total is None else total
  return jnp.mean((window - total / window.shape[0]) ** 2)


def emv_update(mean: Array, var: Array, out: Array, alpha: float) -> tuple[Array, Array]:
  """One ES-EMV step: (mean, var) after output `out` (the first step sets mean = out, var = 0
  and is not taken through here)."""
  delta = out - mean
  return (jnp.clip(mean + alpha * delta, 0.0, 1.0),
          (1.0 - alpha) * (var + alpha * jnp.mean(delta**2)))


@flax.struct.dataclass
class Monitor:
  """Online state of one criterion: lowest score so far, its step, steps since, fired."""
  best: Array
  best_step: Array
  wait: Array
  fired: Array


def init_monitor() -> Monitor:
  return Monitor(best=jnp.full((), jnp.inf, jnp.float32), best_step=jnp.full((), -1, jnp.int32),
                 wait=jnp.zeros((), jnp.int32), fired=jnp.zeros((), bool))


def update(criterion: Criterion, monitor: Monitor, s: Array, step: Array
           ) -> tuple[Monitor, Array]:
  """One iteration's score `s` at `step` -> (new monitor, whether it is the new stop).

  A fired monitor no longer changes. A new minimum needs s < best - min_delta * |best|.
  """
  defined = jnp.isfinite(s) & ~monitor.fired
  bar = jnp.where(jnp.isfinite(monitor.best),
                  monitor.best - criterion.min_delta * jnp.abs(monitor.best), jnp.inf)
  better = defined & (s < bar)
  wait = jnp.where(better, 0, jnp.where(defined, monitor.wait + 1, monitor.wait))
  fired = monitor.fired
  if criterion.patience is not None:
    fired = fired | (defined & (wait >= criterion.patience))
  new = Monitor(best=jnp.where(better, s, monitor.best).astype(jnp.float32),
                best_step=jnp.where(better, step, monitor.best_step).astype(jnp.int32),
                wait=wait.astype(jnp.int32), fired=fired)
  return new, better


@flax.struct.dataclass
class Detection:
  """A criterion's result on one trace: the stop and the iteration at which it fired (-1:
  never; the stop is then the best over the whole run)."""
  stop: Array
  fired_at: Array


def detect(criterion: Criterion, records: Mapping[str, Array], sigma: Array | float = jnp.nan
           ) -> Detection:
  """Runs the criterion over a whole trace after the fact (jittable, vmappable over fits).

  Args:
    records: the trace's per-iteration arrays, each (n,) (e.g. ``fit.trace_records(trace)``).
  """
  scores = score(criterion, records, sigma)
  steps = jnp.arange(scores.shape[0], dtype=jnp.int32)

  def body(carry, xs):
    monitor, fired_at = carry
    monitor, _ = update(criterion, monitor, *xs)
    fired_at = jnp.where((fired_at < 0) & monitor.fired, xs[1], fired_at)
    return (monitor, fired_at), None

  (monitor, fired_at), _ = jax.lax.scan(body, (init_monitor(), jnp.full((), -1, jnp.int32)),
                                        (scores, steps))
  return Detection(stop=monitor.best_step, fired_at=fired_at)

