"""Fitting a DIP network: the train state, the pure step, scanned segments, many fits at once.

One fit minimises ‖A f_θ(z) − x_k‖² where x_k is the target of the stage the current
iteration belongs to (plain DIP: one stage, x_1 = y). Iterations run as ``lax.scan`` over steps
inside a segment, and ``lax.scan`` over segments; the stage index is computed from the global
step inside the scan, so any number of stages and any stage budgets share one compiled function.

Shapes: the network input z is (H, W, Cz), its output and the ground truth (H, W, C); the
observation y and the stage targets live in measurement space, (h, w, C) and (K, h, w, C).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dipjax import losses
from dipjax import metrics
from dipjax import noise
from dipjax import problems as problems_lib
from dipjax import stopping
from dipjax import targets as targets_lib
from dipjax.problems import Problem

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """Optimisation settings (hashable: a static argument of the compiled fit).

  Attributes:
    learning_rate: Adam step size (DIP: 0.01).
    exp_weight: output EMA weight (DIP: 0.99; 0 makes the EMA the raw output).
    segment: iterations per scanned segment; SSIM is traced once per segment.
    rollback_db: a fit whose PSNR against the observation drops by more than this in one
      iteration, or whose loss is not finite, is rolled back to its last good state (DIP: 5 dB).
    window: ES-WMV window W, the number of recent raw outputs whose variance is traced as
      ``wmv`` (published: 100; each fit then holds W output images); 0 does not trace it.
    emv_alpha: ES-EMV smoothing weight of the traced ``emv``.
    criteria: stopping criteria monitored online; the fit keeps the EMA output at each one's
      current stop (``TrainState.kept``, in this order; :func:`stops`). Kinds must be unique.
    halt: one of `criteria`; once it fires the remaining iterations are skipped (records NaN).
    loss: training loss by name (:data:`losses.LOSSES`; DIP: 'mse'); 'perceptual' needs
      ``Problem.loss_params``.
    bounded: skip the iterations past the problem's budget (its last stage's end), so that
      calls of a fixed length run any budget (``pipeline.restore``); off, a call runs every
      iteration it is given (one conditional less per iteration).
  """
  learning_rate: float = 0.01
  exp_weight: float = 0.99
  segment: int = 100
  rollback_db: float = 5.0
  window: int = 0
  emv_alpha: float = 0.1
  criteria: tuple[stopping.Criterion, ...] = ()
  halt: stopping.Criterion | None = None
  loss: str = "mse"
  bounded: bool = False

  def __post_init__(self):
    losses.get(self.loss)  # a clear error for an unknown name
    kinds = [c.kind for c in self.criteria]
    if len(set(kinds)) != len(kinds):
      raise ValueError(f"criteria kinds must be unique, got {kinds}")
    if self.halt is not None and self.halt not in self.criteria:
      raise ValueError(f"halt={self.halt} must be one of criteria={self.criteria}")
    if self.window < 0:
      raise ValueError(f"window must be >= 0, got {self.window}")
    if "es_wmv" in kinds and self.window == 0:
      raise ValueError("the es_wmv criterion needs FitConfig(window=...) > 0 (published: 100)")
    if not 0.0 < self.emv_alpha < 1.0:
      raise ValueError(f"emv_alpha must be in (0, 1), got {self.emv_alpha}")


EMV_BURN_IN = 100  # iterations before ES-EMV's variance is scored (it starts at 0)


@flax.struct.dataclass
class Snapshot:
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree


@flax.struct.dataclass
class TrainState:
  """Everything a fit carries from one iteration to the next.

  Attributes:
    step: int32 iterations done.
    params, batch_stats, opt_state: network weights, BatchNorm statistics, Adam state.
    out: (H, W, C) the latest output; ema: its exponential moving average.
    key: PRNG key for the input noise.
    good: the last state whose output was healthy (what a divergence rolls back to).
    good_psnr: PSNR(A out, y) of that state, dB.
    window: (W, H, W, C) the last W raw outputs (ring buffer; W = config.window; None if 0);
      window_sum: their sum (H, W, C), kept as a running sum.
    emv_mean, emv: ES-EMV's moving mean (H, W, C) and variance ().
    monitors: the online state of config.criteria, stacked (len(criteria),); None if none.
    kept: (len(criteria), H, W, C) the EMA output at each criterion's current stop (or None).
  """
  step: Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  out: Array
  ema: Array
  key: Array
  good: Snapshot
  good_psnr: Array
  window: Array | None
  window_sum: Array | None
  emv_mean: Array
  emv: Array
  monitors: stopping.Monitor | None
  kept: Array | None


@flax.struct.dataclass
class Trace:
  """Per-iteration (n,) and per-segment (n / segment,) records of a fit; PSNR in dB.

  `target` is the current stage's target, `obs` the observation y (both compared in measurement
  space, A out), `clean` the ground truth (NaN when none is given); `_ema` for the EMA output.
  `wmv` and `emv` are ES-WMV's windowed and ES-EMV's exponential moving variance of the raw
  outputs (NaN before they are defined, or with FitConfig.window = 0 for `wmv`);
  `noise_fit_ema` the fraction <A ema - a_k y, m_k> / |m_k|^2 of the stage's known noise m_k the
  EMA output has fitted (0: none, 1: all; NaN without known noise); `mse_est_ema` the MSE of
  A ema against the stage's noise-free target a_k A x, estimated without the ground truth from
  the probe (:func:`noise.sure_mse`; NaN without a probe or sigma); `holdout_mse_ema` the mean
  squared error of A ema on the held-out entries of y (NaN without ``Problem.holdout``);
  `final_stage` whether the iteration belongs to the last stage.
  """
  loss: Array
  psnr_target: Array
  psnr_target_ema: Array
  psnr_obs: Array
  psnr_obs_ema: Array
  psnr_clean: Array
  psnr_clean_ema: Array
  stage: Array
  rolled_back: Array
  ssim_clean: Array
  ssim_clean_ema: Array
  wmv: Array
  emv: Array
  noise_fit_ema: Array
  mse_est_ema: Array
  holdout_mse_ema: Array
  final_stage: Array


def trace_records(trace: Trace) -> dict[str, Array]:
  """The per-iteration arrays of a trace (..., n) by name, with 'step' (the 0-based
  iteration), as :func:`stopping.score` and :func:`stopping.detect` take them."""
  records = {f.name: getattr(trace, f.name) for f in dataclasses.fields(Trace)
             if not f.name.startswith("ssim")}
  n = trace.loss.shape[-1]
  records["step"] = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), trace.loss.shape)
  return records


def blank_trace(num_fits: int, iters: int, segment: int) -> dict[str, np.ndarray]:
  """Host buffers for the records of `num_fits` fits over `iters` iterations, before any is
  run, by :class:`Trace` field: (num_fits, iters), SSIM (num_fits, ceil(iters / segment)); NaN,
  the stage -1 and the flags False (the dtypes of a fit's records)."""
  fill = dict(stage=np.int32(-1), rolled_back=np.False_, final_stage=np.False_)
  shape = lambda name: (num_fits, -(-iters // segment) if name.startswith("ssim") else iters)
  return {f.name: np.full(shape(f.name), fill.get(f.name, np.float32(np.nan)))
          for f in dataclasses.fields(Trace)}


def optimizer(config: FitConfig) -> optax.GradientTransformation:
  return optax.adam(config.learning_rate)


def _compiled_at_o0(*static_argnames: str):
  """Decorates a weight initialisation, which runs once per fit: compiled without LLVM's
  optimisation passes when called from Python (XLA:CPU spends ~0.5 s optimising each Threefry
  hash, two per parameter: 25-35 s for a skip or U-Net of 60 parameters, ~5 s at -O0 on the
  2-core CPU); traced inline when its key is traced (XLA takes compiler options only at the top
  level of a jit)."""

  def decorate(fn):
    compiled = jax.jit(fn, static_argnames=static_argnames,
                       compiler_options={"xla_backend_optimization_level": 0})

    @functools.wraps(fn)
    def init(key, *args, **kwargs):
      return (fn if isinstance(key, jax.core.Tracer) else compiled)(key, *args, **kwargs)

    return init

  return decorate


def _init_state(key: Array, net: nn.Module, problem: Problem, config: FitConfig) -> TrainState:
  k_init, k_run = jax.random.split(key)
  z = problem.inputs.base[None]
  variables = net.init(k_init, z, train=True)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  opt_state = optimizer(config).init(params)
  out_shape = z.shape[1:3] + (problem.observation.shape[-1],)
  if problem.clean is not None:
    out_shape = problem.clean.shape
  blank = jnp.zeros(out_shape, jnp.float32)
  num = len(config.criteria)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=opt_state, out=blank, ema=blank, key=k_run,
      good=Snapshot(params, batch_stats, opt_state),
      good_psnr=jnp.full((), -jnp.inf, jnp.float32),
      window=jnp.zeros((config.window,) + out_shape, jnp.float32) if config.window else None,
      window_sum=blank if config.window else None, emv_mean=blank,
      emv=jnp.zeros((), jnp.float32),
      monitors=jax.tree.map(lambda x: jnp.broadcast_to(x, (num,) + x.shape),
                            stopping.init_monitor()) if num else None,
      kept=jnp.zeros((num,) + out_shape, jnp.float32) if num else None)


@_compiled_at_o0("net", "config")
def init_state(key: Array, net: nn.Module, problem: Problem, config: FitConfig) -> TrainState:
  """A fresh fit: network weights drawn from `key` at the input's shape (compiled)."""
  return _init_state(key, net, problem, config)


def _against_clean(metric: Callable[[Array, Array], Array], x: Array,
                   clean: Array | None) -> Array:
  """metric(x, clean), or NaN when there is no ground truth."""
  return jnp.full((), jnp.nan) if clean is None else metric(x, clean)


def _select(pred: Array, a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _variances(state: TrainState, out: Array, config: FitConfig) -> tuple[Array, ...]:
  """ES-WMV's window and variance, ES-EMV's mean and variance after this iteration's output.

  Returns (window, window_sum, wmv, emv_mean, emv, emv score).
  """
  window, total, wmv = state.window, state.window_sum, jnp.full((), jnp.nan)
  if config.window:
    slot = state.step % config.window
    total = total + out - jax.lax.dynamic_index_in_dim(window, slot, 0, keepdims=False)
    window = jax.lax.dynamic_update_index_in_dim(window, out, slot, 0)
    wmv = jnp.where(state.step >= config.window - 1, stopping.window_variance(window, total),
                    jnp.nan)
  first = state.step == 0
  emv_mean, emv = stopping.emv_update(state.emv_mean, state.emv, out, config.emv_alpha)
  emv_mean, emv = jnp.where(first, out, emv_mean), jnp.where(first, 0.0, emv)
  return (window, total, wmv, emv_mean, emv,
          jnp.where(state.step >= EMV_BURN_IN, emv, jnp.nan))


def _monitor(state: TrainState, record: dict[str, Array], ema: Array, sigma: Array | None,
             config: FitConfig) -> tuple[stopping.Monitor, Array]:
  """Updates every criterion's monitor with this iteration's record; keeps `ema` at new stops."""
  if not config.criteria:
    return state.monitors, state.kept
  sigma = jnp.nan if sigma is None else sigma
  monitors, kept = [], []
  for i, criterion in enumerate(config.criteria):
    monitor = jax.tree.map(lambda x, i=i: x[i], state.monitors)
    s = stopping.score(criterion, record, sigma)
    monitor, better = stopping.update(criterion, monitor, s, state.step)
    monitors.append(monitor)
    kept.append(jnp.where(better, ema, state.kept[i]))
  return problems_lib.stack(monitors), jnp.stack(kept)


def train_step(state: TrainState, problem: Problem, *, net: nn.Module,
               config: FitConfig) -> tuple[TrainState, dict[str, Array]]:
  """One Adam step on the current stage's target; returns the new state and scalar metrics."""
  key, k_z = jax.random.split(state.key)
  z = problem.inputs.sample(k_z)[None]
  stage = targets_lib.stage_index(problem.ends, state.step)
  target = problem.targets[stage]
  op = problem.operator

  def loss_fn(params):
    out, updates = net.apply({"params": params, "batch_stats": state.batch_stats}, z,
                             train=True, mutable=["batch_stats"])
    out = out[0]
    measured = op(out)
    fitted = measured
    if problem.holdout is not None:  # held-out entries: equal to the target, no gradient
      fitted = jnp.where(problem.holdout > 0, target, measured)
    loss = losses.get(config.loss)(fitted, target, problem.loss_params)
    return loss, (out, measured, updates["batch_stats"])

  (loss, (out, measured, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer(config).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  w = jnp.where(state.step == 0, 0.0, config.exp_weight)
  ema = w * state.ema + (1.0 - w) * out
  measured_ema = op(ema)
  psnr_obs = metrics.psnr(measured, problem.observation)
  healthy = jnp.isfinite(loss) & (psnr_obs >= state.good_psnr - config.rollback_db)
  # A rolled-back iteration enters ES-WMV's window as the restored output (no full-window
  # select below).
  window, window_sum, wmv, emv_mean, emv, emv_score = _variances(
      state, jnp.where(healthy, out, state.out), config)
  nan = jnp.full((), jnp.nan)
  noise_fit_ema = mse_est_ema = nan
  if problem.stage_noise is not None:
    known = problem.stage_noise[stage]
    noise_fit_ema = noise.fitted_fraction(measured_ema, target - known, known)
    if problem.probe is not None and problem.sigma is not None:
      scale = 1.0 if problem.stage_scale is None else problem.stage_scale[stage]
      y = problem.observation
      clipped = (jnp.min(y) >= 0.0) & (jnp.max(y) <= 1.0)  # inside [0, 1]: taken as clipped
      mse_est_ema = noise.sure_mse(measured_ema, target, known, problem.probe, scale,
                                   problem.sigma, clipped, lower=not problem.poisson)

  holdout_mse_ema = nan
  if problem.holdout is not None:
    held = problem.holdout
    holdout_mse_ema = jnp.sum(held * (measured_ema - problem.observation) ** 2) / jnp.maximum(
        jnp.sum(held), 1.0)

  record = dict(
      loss=loss,
      psnr_target=metrics.psnr(measured, target),
      psnr_target_ema=metrics.psnr(measured_ema, target),
      psnr_obs=psnr_obs,
      psnr_obs_ema=metrics.psnr(measured_ema, problem.observation),
      psnr_clean=_against_clean(metrics.psnr, out, problem.clean),
      psnr_clean_ema=_against_clean(metrics.psnr, ema, problem.clean),
      stage=stage,
      rolled_back=~healthy,
      wmv=wmv,
      emv=emv_score,
      noise_fit_ema=noise_fit_ema,
      mse_est_ema=mse_est_ema,
      holdout_mse_ema=holdout_mse_ema,
      final_stage=stage == problem.ends.shape[0] - 1)
  noise_std = None if problem.sigma is None else noise.noise_std(
      problem.observation, problem.sigma, lower=not problem.poisson)
  monitors, kept = _monitor(state, dict(record, step=state.step), ema, noise_std, config)

  new = TrainState(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
      out=out, ema=ema, key=key, good=Snapshot(state.params, state.batch_stats, state.opt_state),
      good_psnr=jnp.minimum(psnr_obs, 100.0),  # finite even for an exact fit (PSNR = inf)
      window=window, window_sum=window_sum, emv_mean=emv_mean, emv=emv, monitors=monitors,
      kept=kept)
  back = state.replace(step=state.step + 1, key=key, params=state.good.params,
                       batch_stats=state.good.batch_stats, opt_state=state.good.opt_state,
                       window=window, window_sum=window_sum)
  return _select(healthy, new, back), record


def _finished(state: TrainState, problem: Problem, config: FitConfig) -> Array:
  """Whether the halting criterion fired or, with config.bounded, the budget is spent."""
  done = jnp.zeros((), bool)
  if config.bounded:
    done = state.step >= problem.ends[-1]
  if config.halt is not None:
    done = done | state.monitors.fired[config.criteria.index(config.halt)]
  return done


def _segment(state: TrainState, problem: Problem, net: nn.Module,
             config: FitConfig) -> tuple[TrainState, dict[str, Array]]:
  """`config.segment` iterations; with a halt or `bounded`, those after it fired or past the
  budget are skipped (their records undefined: NaN, -1, False)."""
  step = functools.partial(train_step, problem=problem, net=net, config=config)
  if config.halt is not None or config.bounded:
    run = step
    blank = jax.tree.map(_undefined, jax.eval_shape(run, state)[1])
    skip = lambda s: (s.replace(step=s.step + 1), blank)
    step = lambda s: jax.lax.cond(_finished(s, problem, config), skip, run, s)
  state, record = jax.lax.scan(lambda s, _: step(s), state, length=config.segment)
  record["ssim_clean"] = _against_clean(metrics.ssim, state.out, problem.clean)
  record["ssim_clean_ema"] = _against_clean(metrics.ssim, state.ema, problem.clean)
  return state, record


def _undefined(shape: jax.ShapeDtypeStruct) -> Array:
  """What a skipped (halted) iteration records: NaN, -1 for integers, False for flags."""
  fill = {jnp.dtype(bool): False, jnp.dtype(jnp.int32): -1}.get(jnp.dtype(shape.dtype), jnp.nan)
  return jnp.full(shape.shape, fill, shape.dtype)


def _fit(state: TrainState, problem: Problem, num_segments: int, net: nn.Module,
         config: FitConfig) -> tuple[TrainState, Trace]:
  state, rec = jax.lax.scan(lambda s, _: _segment(s, problem, net, config), state,
                            length=num_segments)
  per_iter = {k: v.reshape(-1) for k, v in rec.items() if not k.startswith("ssim")}
  return state, Trace(**per_iter, ssim_clean=rec["ssim_clean"],
                      ssim_clean_ema=rec["ssim_clean_ema"])


def _check_iters(iters: int, config: FitConfig, problem: Problem) -> int:
  if losses.needs_params(config.loss) and problem.loss_params is None:
    raise ValueError(f"the {config.loss!r} loss needs Problem.loss_params (its weights)")
  if iters < 1 or iters % config.segment:
    raise ValueError(f"iterations ({iters}) must be a positive multiple of the segment length "
                     f"({config.segment})")
  return iters // config.segment


@functools.partial(jax.jit, static_argnames=("num_segments", "net", "config"),
                   donate_argnums=(0,))
def _fit_jit(state, problem, num_segments, net, config):
  return _fit(state, problem, num_segments, net, config)


def fit(state: TrainState, problem: Problem, iters: int, *, net: nn.Module,
        config: FitConfig) -> tuple[TrainState, Trace]:
  """Runs `iters` iterations (a multiple of ``config.segment``) from `state`, compiled once.

  `state` is consumed (its buffers are donated); continue from the returned one. Resuming from
  a restored state gives bit-for-bit the same result as an uninterrupted fit.
  """
  return _fit_jit(state, problem, _check_iters(iters, config, problem), net, config)


FITS_AXIS = "fits"


def _fit_local(states, problems, num_segments, net, config, shared, batch):
  """The model axis on one device: groups of `batch` fits vmapped, groups one after the other.

  How the many-fits axis is lowered is decided here and in :func:`default_batch` only.
  """
  one = lambda s, p: _fit(s, p, num_segments, net, config)
  if shared:
    return jax.lax.map(lambda s: one(s, problems), states, batch_size=batch)
  return jax.lax.map(lambda sp: one(*sp), (states, problems), batch_size=batch)


@functools.partial(jax.jit, static_argnames=("num_segments", "net", "config", "shared", "batch",
                                             "mesh"), donate_argnums=(0,))
def _fit_many_jit(states, problems, num_segments, net, config, shared, batch, mesh):
  run = functools.partial(_fit_local, num_segments=num_segments, net=net, config=config,
                          shared=shared, batch=batch)
  if mesh is None:
    return run(states, problems)
  fits = jax.sharding.PartitionSpec(FITS_AXIS)
  return jax.shard_map(run, mesh=mesh, in_specs=(fits, jax.sharding.PartitionSpec() if shared
                                                 else fits), out_specs=fits)(states, problems)


def fits_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes) for the many-fits axis."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.array(devices), (FITS_AXIS,))


CPU_VMAP_MAX_PIXELS = 64 * 64


def default_batch(num_fits: int, pixels: int, backend: str | None = None) -> int:
  """How many fits of `pixels` (H * W) each to vmap together on one device.

  On CPU one fit of a large image already fills the cores: vmapped fits gain only where images
  are small (experiments/benchmark.py, N = 2-8 fits: 64^2, width 32: 1.12-1.14x vmapped vs
  0.99-1.02x one after the other; 128^2, width 32: 0.95-1.09x vmapped vs 1.16-1.19x), so fits of
  up to 64^2 pixels are vmapped and larger ones run one after the other. On accelerators all
  fits of a device are batched into each GEMM.
  """
  backend = jax.default_backend() if backend is None else backend
  if backend == "cpu" and pixels > CPU_VMAP_MAX_PIXELS:
    return 1
  return num_fits


@_compiled_at_o0("net", "config", "shared")
def init_many(keys: Array, net: nn.Module, problems: Problem, config: FitConfig, *,
              shared: bool = True) -> TrainState:
  """Fresh states for M fits, stacked along a leading model axis. keys: (M, ...) PRNG keys.

  shared: one problem for all fits (seeds); otherwise `problems` is stacked (M, ...) too.
  """
  init = lambda k, p: _init_state(k, net, p, config)
  return jax.vmap(init, in_axes=(0, None if shared else 0))(keys, problems)


def _many_args(states, problems, iters, config, batch, mesh):
  m = states.step.shape[0]
  shards = 1 if mesh is None else mesh.shape[FITS_AXIS]
  if m % shards:
    raise ValueError(f"{m} fits cannot be split evenly over {shards} devices; use a multiple")
  pixels = states.out.shape[1] * states.out.shape[2]
  batch = default_batch(m // shards, pixels) if batch is None else batch
  if batch < 1 or (m // shards) % batch:
    raise ValueError(f"batch={batch} must divide the {m // shards} fits per device")
  return _check_iters(iters, config, problems), batch


def fit_many(states: TrainState, problems: Problem, iters: int, *, net: nn.Module,
             config: FitConfig, shared: bool = True, batch: int | None = None,
             mesh: jax.sharding.Mesh | None = None) -> tuple[TrainState, Trace, Array]:
  """Fits M models at once. States and traces carry a leading model axis M.

  Args:
    shared: True fits every model to the one `problems` (M seeds); False takes problems stacked
      along M (one per schedule / stage setting / image).
    batch: fits vmapped together on a device (a divisor of M per device); default
      :func:`default_batch`. The result does not depend on it beyond float rounding.
    mesh: shard the M fits over this mesh's devices (:func:`fits_mesh`; M a multiple of the
      device count); None runs them on the default device.

  Returns the states, the traces and the ensemble mean of the M EMA outputs, (H, W, C). Each
  fit equals its separate `fit`.
  """
  num_segments, batch = _many_args(states, problems, iters, config, batch, mesh)
  states, traces = _fit_many_jit(states, problems, num_segments, net, config, shared, batch, mesh)
  return states, traces, jnp.mean(states.ema, axis=0)


def compile_many(states: TrainState, problems: Problem, iters: int, *, net: nn.Module,
                 config: FitConfig, shared: bool = True, batch: int | None = None,
                 mesh: jax.sharding.Mesh | None = None
                 ) -> Callable[[TrainState, Problem], tuple[TrainState, Trace]]:
  """Compiles :func:`fit_many`'s core ahead of time for these shapes (to time the compile).

  Returns ``run(states, problems) -> (states, traces)``; `states` is donated.
  """
  num_segments, batch = _many_args(states, problems, iters, config, batch, mesh)
  return _fit_many_jit.lower(states, problems, num_segments, net, config, shared, batch,
                             mesh).compile()


def stops(state: TrainState, config: FitConfig) -> dict[str, tuple[Array, Array]]:
  """Each monitored criterion's (stop iteration, EMA output there) by name, from a fitted
  state (single fit: () and (H, W, C); many fits: a leading model axis)."""
  return {c.name: (state.monitors.best_step[..., i], state.kept[..., i, :, :, :])
          for i, c in enumerate(config.criteria)}

