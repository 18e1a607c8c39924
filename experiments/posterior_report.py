r"""The posterior-solver report (docs/RESULTS.md, "Diffusion posterior solvers"): DDNM, DiffPIR
and DPS on dipjax's DDPM from pure noise and from a DIP fit, against DIP alone at its
ground-truth-free stop, on inpainting, super-resolution and deblurring crops.

  python experiments/posterior_report.py              # rows; resumable
  python experiments/posterior_report.py --summary    # tables + PSNR-vs-wall-time figures

Per (task, image): one DIP fit (width 32, 5% of the measurements held out, halted by the
'holdout' stop: its wall time is the time to that stop), then each solver from pure noise at
NFE_NOISE and from the fit's output, forward-noised to t* matched to its held-out error less
the noise variance (--t_rule: as measured, or divided by the operator's white-noise gain as the
pipeline does; a rule's rows are kept apart), at NFE_DIP, with and without that output guiding
every x0 prediction (STARTS); and from the same fit's output at DIP_CHECKPOINTS iterations
(guided, NFE 5), so that the curve of PSNR against wall time shows what a shorter fit buys. A
DIP-start row's wall time is the fit's plus the solver's; a solver's time excludes its compile
(one per solver, NFE and shape, reused over images). Each result is a row of
docs/results/posterior/rows.jsonl, appended as it ends: a killed report resumes where it
stopped.
"""

from __future__ import annotations

import collections
import datetime
import functools
import os
import time
import zlib

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import cli
import common
import fits
import task_sections
from dipjax import pipeline
from dipjax import schedules
from dipjax.ddpm import posterior
from dipjax.ddpm import solvers as ddpm_solvers
from dipjax.ddpm import train as ddpm_train
from dipjax.ddpm import unet as ddpm_unet

TASKS = {
    "inpaint_random50": dict(task="inpaint", mask_kind="random", mask_ratio=0.5),
    "inpaint_text": dict(task="inpaint", mask_kind="text"),
    "sr_x4": dict(task="sr", factor=4),
    "deblur_gauss_1pct": dict(task="deblur", blur="gaussian", sigma=2.55)}
IMAGES = task_sections.CSET9[2:4] + task_sections.CSET9[5:8] + tuple(
    f"Set12/{i:02d}.png" for i in (1, 2, 5))
NFE_NOISE = (10, 20, 50, 100)
NFE_DIP = (1, 2, 5, 10, 20)
# Where a solver starts: pure noise at T; the DIP output forward-noised to t*; the same start
# that also guides every x0 prediction (posterior's guide_mse = the fit's estimated MSE).
STARTS = ("noise", "dip", "dip_guide")
START_LABELS = dict(noise="from noise", dip="from DIP", dip_guide="from DIP, guided")
# Shorter fits of the same run (its output at these iterations): the guided start at NFE 5 from
# each, so that PSNR against wall time shows what a shorter DIP fit buys.
DIP_CHECKPOINTS = (200, 500, 1000)
# How t* is matched to the fit (pipeline.fit_error_estimate): its held-out error less the noise
# ('measured', the rule of the report's first rows), or that divided by the operator's
# white-noise gain (the pipeline's rule). Rows of a rule other than 'measured' carry it in their
# key and are compared in their own table.
T_RULES = ("measured", "white_gain")

_TASKS = flags.DEFINE_list("tasks", list(TASKS), f"Tasks, of {', '.join(TASKS)}.")
_SOLVERS = flags.DEFINE_list("solvers", list(posterior.SOLVERS), "Posterior solvers.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Only the first N images (0: all).")
_CROP = flags.DEFINE_integer("crop", 128, "Centre crop of every image.")
_ITERS = flags.DEFINE_integer("iters", 2000, "The DIP fit's budget (halted by its hold-out).")
_WIDTH = flags.DEFINE_integer("width", 32, "The DIP network's width.")
_SCALES = flags.DEFINE_integer("scales", 5, "The DIP network's scales (fewer: a quick run).")
_NFE_NOISE = flags.DEFINE_list("nfe_noise", list(map(str, NFE_NOISE)), "NFEs from noise.")
_NFE_DIP = flags.DEFINE_list("nfe_dip", list(map(str, NFE_DIP)), "NFEs from the DIP start.")
_STARTS = flags.DEFINE_list("starts", list(STARTS), f"Starts, of {', '.join(STARTS)}.")
_CHECKPOINTS = flags.DEFINE_list("dip_checkpoints", list(map(str, DIP_CHECKPOINTS)),
                                 "Iterations (multiples of 100) whose fit output also starts "
                                 "each solver, guided, at NFE 5 (empty: none).")
_WEIGHTS = flags.DEFINE_string("weights", os.path.join(common.REPO, "assets", "ddpm_colour.npz"),
                               "DDPM weights (.npz).")
_DATA = flags.DEFINE_string("data", "../shared/data", "Folder of the image sets.")
_OUT = flags.DEFINE_string("out", os.path.join(common.REPO, "docs", "results", "posterior",
                                               "rows.jsonl"), "Rows file.")
_T_RULE = flags.DEFINE_enum("t_rule", "measured", T_RULES, "How t* is matched to the fit.")
_SUMMARY = flags.DEFINE_bool("summary", False, "Write the tables and figures from the rows.")


class Solvers:
  """The posterior solvers with the weights, operator, measurement and start as arguments,
  compiled once per (solver, NFE, start or not, argument shapes), timed apart from compiling;
  keeps the `keep` most recent executables."""

  def __init__(self, params, config: ddpm_unet.UNetConfig, keep: int = 16):
    self.params, self.config = params, config
    self.schedule = schedules.get(config.schedule, config.num_steps)
    self._compiled = collections.OrderedDict()
    self._keep = keep

  def _fn(self, solver: str, nfe: int, params, op, y, sigma, key, start=None, t_start=None,
          guide_mse=None):
    eps = ddpm_unet.eps_fn(self.config, params)
    kw = dict(start=start, t_start=t_start, guide_mse=guide_mse, config=self.config)
    if solver == "dps":
      return posterior.dps(eps, self.schedule, op, y, nfe, key, **kw)
    return getattr(posterior, solver)(eps, self.schedule, op, y, sigma, nfe, key, **kw)

  def __call__(self, solver: str, nfe: int, *args) -> tuple[np.ndarray, float]:
    """(output (H, W, C), seconds of the run, compile excluded)."""
    leaves = jax.tree.leaves(args)
    signature = (solver, nfe, len(args), jax.tree.structure(args)) + tuple(
        (jnp.shape(a), str(jnp.asarray(a).dtype)) for a in leaves)
    if signature in self._compiled:
      self._compiled.move_to_end(signature)
    else:
      if len(self._compiled) >= self._keep:
        self._compiled.popitem(last=False)
      fn = functools.partial(self._fn, solver, nfe)
      self._compiled[signature] = jax.jit(fn).lower(self.params, *args).compile()
    t0 = time.perf_counter()
    out = np.asarray(jax.block_until_ready(self._compiled[signature](self.params, *args)))
    return out, time.perf_counter() - t0


def dip_fit(setting: dict, y, clean, mask, compiler, checkpoints: tuple[int, ...],
            white_gain: bool = False) -> tuple[np.ndarray, dict, dict]:
  """The DIP fit halted by its hold-out: (its output (H, W, C), row fields, {iteration: (the
  output there, its row fields)} for the `checkpoints` it reached before halting)."""
  config = pipeline.RestoreConfig(**setting, method="dip", iters=_ITERS.value,
                                  width=_WIDTH.value, scales=_SCALES.value, holdout=0.05,
                                  stop=("holdout", "oracle"), halt=True)
  frame = pipeline.make_frame(config, y, clean, mask)
  sigma = pipeline.noise_sigma(config, frame)
  run = pipeline.FitRun(config, frame, sigma, jax.random.PRNGKey(0), chunk=100)
  run.compile(compiler)

  def error_estimate(held_out: float, image: np.ndarray) -> float:
    return pipeline.fit_error_estimate(config, held_out, y, image, sigma, mask,
                                       white_gain=white_gain)

  early = {}

  def keep(fitted: pipeline.FitRun) -> None:
    held_out = float(np.mean(fitted.trace["holdout_mse_ema"][:, fitted.done - 1]))
    if fitted.done in checkpoints and np.isfinite(held_out):  # not past a halt in this chunk
      image = fitted.frame.unpad(np.asarray(fitted.states.ema)).mean(0)
      early[fitted.done] = image, dict(est_mse=error_estimate(held_out, image),
                                       seconds=round(fitted.fit_seconds, 2),
                                       **task_sections.score(config, image, clean))

  run.fit(on_chunk=keep)
  image, at = run.restored()
  curve = np.nanmean(run.trace["psnr_clean_ema"], axis=0)
  return image, dict(restored_at=at, stop=int(run.stops()["holdout"][0].mean()), done=run.done,
                     oracle_psnr=float(np.nanmax(curve)),
                     est_mse=error_estimate(run.held_out_error(), image),
                     seconds=round(run.fit_seconds, 2),
                     **task_sections.score(config, image, clean)), early


def run() -> None:
  params, unet_config = ddpm_train.load_weights(_WEIGHTS.value)
  solve = Solvers(params, unet_config)
  compiler = fits.Compiler()
  for name, values, valid in (("tasks", _TASKS.value, TASKS), ("starts", _STARTS.value, STARTS),
                              ("solvers", _SOLVERS.value, posterior.SOLVERS)):
    unknown = [v for v in values if v not in valid]
    if unknown:
      raise ValueError(f"--{name}: unknown {unknown}; valid: {', '.join(valid)}")
  nfe_noise = common.parse_list("nfe_noise", _NFE_NOISE.value, int)
  nfe_dip = common.parse_list("nfe_dip", _NFE_DIP.value, int)
  checkpoints = common.parse_list("dip_checkpoints", _CHECKPOINTS.value, int)
  if any(k < 100 or k % 100 or k >= _ITERS.value for k in checkpoints):
    raise ValueError(f"--dip_checkpoints must be multiples of 100 below --iters "
                     f"({_ITERS.value}), got {checkpoints}")
  base = dict(crop=_CROP.value, iters=_ITERS.value, width=_WIDTH.value,
              weights=os.path.basename(_WEIGHTS.value),
              **({} if _SCALES.value == _SCALES.default else dict(scales=_SCALES.value)))
  rule = {} if _T_RULE.value == "measured" else dict(t_rule=_T_RULE.value)
  with common.Results(_OUT.value) as results:
    done = {r["key"] for r in results.rows}

    def emit(spec: dict, fields: dict) -> None:
      results.append(dict(spec, key=common.row_key(spec), **fields, machine=common.host(),
                          date=str(datetime.date.today())))
      logging.info("%s: %.2f dB", {k: spec[k] for k in ("task", "image", "method", "nfe")
                                   if k in spec}, fields["psnr"])

    for name in IMAGES[:_LIMIT.value or None]:
      clean = common.load_clean(os.path.join(_DATA.value, name), _CROP.value)
      for task in _TASKS.value:
        config = pipeline.RestoreConfig(**TASKS[task])
        y, mask = task_sections.observe(config, clean, name)
        op = pipeline.make_physics(config, mask).operator
        sigma = config.sigma / 255
        dip_spec = dict(base, task=task, image=name, method="dip")
        wanted = [dict(base, task=task, image=name, method=s, start=start, nfe=n,
                       **({} if start == "noise" else rule))
                  for s in _SOLVERS.value for start in _STARTS.value
                  for n in (nfe_noise if start == "noise" else nfe_dip)]
        fitted = next((r for r in results.rows if r["key"] == common.row_key(dip_spec)), None)
        reached = [k for k in checkpoints if fitted is None or k < fitted["done"]]
        early_specs = {k: [dict(dip_spec, dip_iters=k)] + [
            dict(base, task=task, image=name, method=s, start="dip_guide", nfe=5, dip_iters=k,
                 **rule)
            for s in _SOLVERS.value] for k in reached}  # a fit halted earlier never reaches k
        specs = wanted + [dip_spec] + [s for got in early_specs.values() for s in got]
        if all(common.row_key(s) in done for s in specs):
          continue
        x_hat, fit, early = dip_fit(TASKS[task], y, clean, mask, compiler, checkpoints,
                                    white_gain=_T_RULE.value == "white_gain")
        if common.row_key(dip_spec) not in done:
          emit(dip_spec, fit)
        for k, (image, fields) in early.items():  # the shorter fits and the solvers from them
          key = jax.random.PRNGKey(zlib.crc32(name.encode()))
          t_k = int(ddpm_solvers.dip_timestep(solve.schedule, fields["est_mse"]))
          for spec in early_specs.get(k, ()):
            if common.row_key(spec) in done:
              continue
            if spec["method"] == "dip":
              emit(spec, fields)
              continue
            out, seconds = solve(spec["method"], 5, op, y, sigma, key, image, t_k,
                                 fields["est_mse"])
            emit(spec, dict(task_sections.score(config, out, clean), seconds=round(seconds, 3),
                            wall_seconds=round(seconds + fields["seconds"], 2), t_start=t_k,
                            est_mse=fields["est_mse"]))
        t_start = int(ddpm_solvers.dip_timestep(solve.schedule, fit["est_mse"]))
        key = jax.random.PRNGKey(zlib.crc32(name.encode()))
        for spec in wanted:
          if common.row_key(spec) in done:
            continue
          from_dip = spec["start"] != "noise"
          args = (op, y, sigma, key) + ((x_hat, t_start) if from_dip else ()) + (
              (fit["est_mse"],) if spec["start"] == "dip_guide" else ())
          out, seconds = solve(spec["method"], spec["nfe"], *args)
          total = seconds + (fit["seconds"] if from_dip else 0.0)
          emit(spec, dict(task_sections.score(config, out, clean), seconds=round(seconds, 3),
                          wall_seconds=round(total, 2),
                          t_start=t_start if from_dip else solve.schedule.num_steps,
                          **(dict(est_mse=fit["est_mse"]) if from_dip else {})))


def summarise(rows: list[dict]) -> None:
  """Per task, a table of mean PSNR / SSIM / wall time over images, and a figure of PSNR
  against wall time: DIP alone and each solver from noise (over NFE) and from the guiding DIP
  start (over the fit's length)."""
  if not rows:
    raise ValueError(f"no rows in {_OUT.value}: run the report first")
  from dipjax import plots  # pylint: disable=g-import-not-at-top
  stem = _OUT.value.removesuffix(".jsonl")
  other_rules = [r for r in rows if "t_rule" in r]
  rows = [r for r in rows if "t_rule" not in r]
  dates = sorted({r["date"] for r in rows})
  lines = [f"`python experiments/posterior_report.py` on {rows[0]['machine']}, "
           f"{dates[0]}..{dates[-1]}; means over images (count in brackets), {rows[0]['crop']}² "
           "crops; wall time per image, the DIP fit's included for a DIP start.", "",
           _headline(rows), "", "At equal wall time (the solver's largest NFE from noise):", "",
           _equal_time(rows), ""]
  if other_rules:
    lines += ["t* by rule (from the full fit, guided, NFE 5; the images with both rules):", "",
              _t_rules(rows, other_rules), ""]
  for task in TASKS:
    mine = [r for r in rows if r["task"] == task]
    if not mine:
      continue
    groups = collections.defaultdict(list)
    for r in mine:
      groups[(r["method"], r.get("start", ""), r.get("nfe", 0), r.get("dip_iters", 0))].append(r)
    body, series = [], collections.defaultdict(list)
    for (method, start, nfe, k), got in sorted(groups.items(),
                                               key=lambda g: (g[0][0] != "dip", g[0])):
      psnr, ssim = np.mean([g["psnr"] for g in got]), np.mean([g["ssim"] for g in got])
      wall = np.mean([g.get("wall_seconds", g["seconds"]) for g in got])
      label = "DIP (holdout stop)" if method == "dip" else f"{method} {START_LABELS[start]}"
      line = label
      if k:  # a shorter fit: one curve over the fit's length
        label = f"{label.removesuffix(' (holdout stop)')} by fit length"
        line = f"{line.removesuffix(' (holdout stop)')} at {k} it"
      body.append([line, str(nfe or "—"), f"{psnr:.2f} / {ssim:.3f} ({len(got)})",
                   f"{wall:.1f}"])
      series[label].append((wall, psnr))
    lines += [f"### {task}", "", common.md_table(["method", "NFE", "PSNR / SSIM", "wall s"], body),
              ""]
    shown = {k: v for k, v in series.items()  # the curves; the full fit's starts: the tables
             if k.startswith("DIP") or k.endswith(("from noise", "by fit length"))}
    plots.psnr_vs_time(f"{stem}_{task}.png", shown, title=task)
  with open(stem + ".md", "w") as f:
    f.write("\n".join(lines))
  logging.info("wrote %s.md", stem)


def _headline(rows: list[dict]) -> str:
  """One line per task: DIP alone, and each solver from noise at its largest NFE and from the
  guiding DIP start at NFE 5: mean PSNR (mean wall seconds)."""
  def cell(got: list[dict]) -> str:
    if not got:
      return "—"
    wall = np.mean([g.get("wall_seconds", g["seconds"]) for g in got])
    return f"{np.mean([g['psnr'] for g in got]):.2f} ({wall:.0f} s)"

  solvers = sorted({r["method"] for r in rows if r["method"] != "dip"},
                   key=list(posterior.SOLVERS).index)
  head, body = ["task", "images", "DIP, holdout stop"], []
  for solver in solvers:
    head += [f"{solver} from noise (its largest NFE)", f"{solver} from DIP, guided, NFE 5"]
  for task in TASKS:
    mine = [r for r in rows if r["task"] == task and "dip_iters" not in r]
    if not mine:
      continue
    cells = [task, str(len({r["image"] for r in mine})),
             cell([r for r in mine if r["method"] == "dip"])]
    for solver in solvers:
      at = lambda start, nfe: [r for r in mine if r["method"] == solver and
                               r.get("start") == start and r.get("nfe") == nfe]
      nfe = max([r["nfe"] for r in mine if r["method"] == solver and r["start"] == "noise"],
                default=0)
      cells += [cell(at("noise", nfe)) + (f", NFE {nfe}" if nfe else ""),
                cell(at("dip_guide", 5))]
    fits = [r for r in mine if r["method"] == "dip"]
    ratio = np.mean([r["est_mse"] / 10 ** (-r["psnr"] / 10) for r in fits]) if fits else np.nan
    body.append(cells + [f"{ratio:.2f}"])
  return common.md_table(head + ["DIP's estimated / true MSE (sets t*)"], body)


def _t_rules(rows: list[dict], other_rules: list[dict]) -> str:
  """Per task, solver and t* rule: mean PSNR, mean t* and the estimated / true MSE of the DIP
  start, from the full fit, guided, NFE 5, over the images that have every rule."""
  def pick(group, task, solver):
    return {r["image"]: r for r in group if r["task"] == task and r["method"] == solver and
            r.get("start") == "dip_guide" and r.get("nfe") == 5 and "dip_iters" not in r}
  fits = {(r["task"], r["image"]): r for r in rows if r["method"] == "dip" and
          "dip_iters" not in r}
  body = []
  for task in TASKS:
    for solver in posterior.SOLVERS:
      by_rule = {"measured": pick(rows, task, solver)}
      for name in T_RULES[1:]:
        by_rule[name] = pick([r for r in other_rules if r["t_rule"] == name], task, solver)
      images = sorted(set.intersection(*(set(got) for got in by_rule.values())))
      if not images:
        continue
      for name, got in by_rule.items():
        est = [got[i].get("est_mse", fits[(task, i)]["est_mse"]) /
               10 ** (-fits[(task, i)]["psnr"] / 10) for i in images]
        body.append([task, solver, name, f"{np.mean([got[i]['psnr'] for i in images]):.2f}",
                     f"{np.mean([got[i]['t_start'] for i in images]):.0f}",
                     f"{np.mean(est):.2f}", str(len(images))])
  return common.md_table(["task", "solver", "t* rule", "PSNR", "t*", "est / true MSE",
                          "images"], body)


def _equal_time(rows: list[dict]) -> str:
  """Per task and solver, at the wall time W of its largest-NFE run from noise: the best mean
  PSNR from noise, from a DIP start (any fit length, guided or not) and of DIP alone, each among
  the settings whose mean wall time is at most W."""
  groups = collections.defaultdict(list)
  for r in rows:
    groups[(r["task"], r["method"], r.get("start"), r.get("nfe"), r.get("dip_iters", 0))].append(r)
  means = {k: (np.mean([g.get("wall_seconds", g["seconds"]) for g in got]),
               np.mean([g["psnr"] for g in got]), len(got)) for k, got in groups.items()}

  def best(task, method, starts, budget):
    found = [(psnr, k, wall) for k, (wall, psnr, _) in means.items()
             if k[0] == task and k[1] == method and k[2] in starts and wall <= budget]
    if not found:
      return "—"
    psnr, k, wall = max(found)
    what = (f"{k[4] or 'stop'} it" if k[4] or method == "dip" else "stop") + (
        f", NFE {k[3]}" if k[3] else "") + (", guided" if k[2] == "dip_guide" else "")
    return f"{psnr:.2f} ({what}; {wall:.0f} s)"

  body = []
  for task in TASKS:
    for solver in posterior.SOLVERS:
      noise = [(k[3], v) for k, v in means.items()
               if k[0] == task and k[1] == solver and k[2] == "noise"]
      if not noise:
        continue
      nfe, (budget, psnr, n) = max(noise)
      body.append([task, solver, f"{budget:.0f} s", f"{psnr:.2f} (NFE {nfe})",
                   best(task, solver, ("dip", "dip_guide"), budget),
                   best(task, "dip", (None,), budget), str(n)])
  return common.md_table(["task", "solver", "wall time W", "from noise", "from DIP, best within W",
                          "DIP alone, best within W", "images"], body)


def main() -> None:
  if _SUMMARY.value:
    return summarise(common.read_rows(_OUT.value))
  return run()


if __name__ == "__main__":
  cli.run_main(__file__, main)
