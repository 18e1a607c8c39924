r"""The task report: super-resolution, inpainting, deblurring and Poisson noise, each with every
ground-truth-free stop beside the oracle and the classical baselines (docs/RESULTS.md, "Every
task"). Every DIP fit holds out 5% of its measured pixels (for the 'holdout' stop): its
fixed-budget, ES-WMV, discrepancy and oracle figures are of that fit.

  python experiments/task_report.py --section=deblur              # fits; resumable
  python experiments/task_report.py --section=deblur --summary    # table + figure from the rows

A section (task_sections.py) is settings x images; each (setting, image, method) is one row of
docs/results/tasks/<section>.jsonl, appended when its fit ends: a killed report resumes where it
stopped and never repeats a row. A row holds every traced criterion's stop and the PSNR / SSIM
there, the oracle peak, the last iteration, and the baselines on the same observation (which
depends only on the image's name and the setting). Curves go to runs/arrays/tasks/ (git-ignored).
Baselines (scikit-image, bm3d) are optional: a row without one says why.
"""

from __future__ import annotations

import datetime
import os
import shutil
import time

from absl import flags
from absl import logging
import jax
import numpy as np

import baselines as baselines_lib
import cli
import common
import fits
import task_sections
from dipjax import checkpoint
from dipjax import io
from dipjax import pipeline
from dipjax import plots

_SECTION = flags.DEFINE_enum("section", None, list(task_sections.SECTIONS), "Report section.")
_DATA = flags.DEFINE_string("data", "../shared/data", "Folder of the image sets.")
_OUT = flags.DEFINE_string("out", None, "Rows (default docs/results/tasks/<section>.jsonl).")
_SETTINGS = flags.DEFINE_list("settings", None, "Only these settings of the section.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Only the section's first N images (0: all).")
_IMAGES = flags.DEFINE_list("images", None, "Only the section's images whose path contains one "
                            "of these (e.g. butterfly).")
_ITERS = flags.DEFINE_integer("iters", None, "Override the section's iterations (a smoke run; "
                              "a paper's budget).")
_WIDTH = flags.DEFINE_integer("width", None, "Override the section's network width.")
_LR = flags.DEFINE_float("lr", None, "Override the learning rate (the DIP paper's inpainting: "
                         "0.001 over 11,000 iterations).")
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", 0, "Checkpoint each fit every N iterations under runs/ (a multiple of "
    "100), so that a killed long fit resumes there; removed once its row is written.")
_SUMMARY = flags.DEFINE_bool("summary", False, "Write the section's table and figure from its "
                             "rows (no fits).")
_REFRESH = flags.DEFINE_bool("refresh_baselines", False, "Recompute the baselines of the "
                             "section's rows in place (no fits), e.g. after adding one.")
flags.mark_flag_as_required("section")


def _out() -> str:
  return _OUT.value or os.path.join(common.REPO, "docs", "results", "tasks",
                                    f"{_SECTION.value}.jsonl")


def load_clean(path: str, crop: int) -> np.ndarray:
  """The image, centre-cropped to crop x crop, or (crop 0) to a multiple of 32 as the DIP
  repository's super-resolution loader does."""
  return common.load_clean(path, crop) if crop else io.crop_to_multiple(io.load_image(path), 32)


def restore_config(section: task_sections.Section, setting: dict,
                   method: str) -> pipeline.RestoreConfig:
  return pipeline.RestoreConfig(
      **task_sections.restore_fields(setting), method=method, iters=_ITERS.value or section.iters,
      width=_WIDTH.value or section.width, seeds=section.seeds,
      **({"lr": _LR.value} if _LR.value is not None else {}),
      stop=task_sections.criteria(setting, method), halt=False,
      holdout=task_sections.HOLDOUT if method == "dip" else 0.0)


def fit_row(config: pipeline.RestoreConfig, y, clean, mask, compiler,
            checkpoint_dir: str | None = None) -> tuple[dict, dict]:
  """One fit, every criterion's stop scored against `clean`: (row fields, curves); with
  `checkpoint_dir`, checkpointed every --checkpoint_every iterations and resumed from there."""
  resolved = pipeline.resolve_noise(config, y)
  estimated, config = resolved != config, resolved
  frame = pipeline.make_frame(config, y, clean, mask)
  sigma = pipeline.noise_sigma(config, frame)
  every = _CHECKPOINT_EVERY.value if checkpoint_dir else 0
  key, chunk = jax.random.PRNGKey(0), pipeline.chunk_length(config, 100, every)
  found = every > 0 and checkpoint.bind(
      checkpoint_dir, pipeline.fingerprint(config, frame, key, chunk), resume=True)
  run = pipeline.FitRun(config, frame, sigma, key, chunk=chunk, stop_diverged=False)
  run.compile(compiler)
  run.fit(checkpoint_dir=checkpoint_dir, checkpoint_every=every, resume=found)
  curve = np.nanmean(run.trace["psnr_clean_ema"], axis=0)
  stops = {}
  for name, (steps, kept) in run.stops().items():
    never = steps == 0  # its score was never defined (discrepancy never crossed): the last
    stops[name] = dict(stop=int(np.mean(np.where(never, config.iters, steps))),
                       never=int(never.sum()),
                       **task_sections.score(config, kept.mean(0), clean))
  last = task_sections.score(config, frame.unpad(np.asarray(run.states.ema)).mean(0), clean)
  row = dict(stops=stops, last=last, oracle_peak=dict(psnr=float(np.nanmax(curve)),
                                                      stop=int(np.nanargmax(curve)) + 1),
             sigma_used=round(255 * sigma, 4),
             **(pipeline.noise_summary(pipeline.restored_noise(config, sigma))
                if estimated else {}),
             compile_seconds=round(run.compile_seconds, 1),
             fit_seconds=round(run.fit_seconds, 1),  # of this process (after a resume: since)
             **({"resumed_from": run.start} if run.start else {}))
  curves = {f"curve_{k}": run.trace[k] for k in ("psnr_clean_ema", "psnr_obs_ema",
                                                 "mse_est_ema", "holdout_mse_ema")}
  return row, curves


COLUMNS = (("dip", "last"), ("dip", "oracle"), ("dip", "holdout"), ("dip", "es_wmv"),
           ("dip", "discrepancy"), ("staged", "oracle"), ("staged", "staged"))


def _cell(rows: list[dict], method: str, what: str, metric: str) -> str:
  """Mean `metric` (psnr or psnr_y) / SSIM over a setting's images of one stop, with its mean
  gap to the fit's own oracle stop in that metric (dB); '-' where the fit or criterion is
  absent."""
  rows = [r for r in rows if r["method"] == method]
  if not rows or (what not in ("last", "oracle") and what not in rows[0]["stops"]):
    return "-"
  got = [r["last"] if what == "last" else r["stops"][what] for r in rows]
  text = f"{np.mean([g[metric] for g in got]):.2f} / {np.mean([g['ssim'] for g in got]):.3f}"
  if what == "oracle":
    return text
  gap = np.mean([r["stops"]["oracle"][metric] - g[metric] for r, g in zip(rows, got)])
  return text + f" ({-gap:+.2f})"


def summarise(section: task_sections.Section, rows: list[dict]) -> None:
  """Writes docs/results/tasks/<section>.md (one table, means over images) and a
  PSNR-vs-iteration figure per setting (its first image, the stops marked)."""
  if not rows:
    raise ValueError(f"no rows in {_out()}: run the section first")
  metric = "psnr_y" if all("psnr_y" in r["last"] for r in rows) else "psnr"
  head = ["setting", "images", "DIP, last it", "DIP oracle", "DIP holdout stop", "DIP ES-WMV",
          "DIP discrepancy", "staged oracle", "staged stop", "baselines"]
  body = []
  for label in section.settings:
    mine = [r for r in rows if r["setting"] == label]
    if not mine:
      continue
    base = {}
    for r in mine:
      for k, v in r.get("baselines", {}).items():
        base.setdefault(k, []).append(v)
    base_text = ", ".join(
        f"{k} {np.mean([x[metric] for x in v]):.2f} / {np.mean([x['ssim'] for x in v]):.3f}"
        if all(isinstance(x, dict) for x in v) else f"{k}: {v[0]}" for k, v in base.items())
    images = len({r["image"] for r in mine})
    cells = [_cell(mine, m, w, metric) for m, w in COLUMNS]
    body.append([label, str(images)] + cells + [base_text])
    _figure(label, mine)
  stem = _out().removesuffix(".jsonl")
  what = ("PSNR of the luma, the scale factor's border trimmed (the DIP paper's protocol)"
          if metric == "psnr_y" else "PSNR")
  dates = sorted({r["date"] for r in rows})
  with open(stem + ".md", "w") as f:
    f.write(f"`{_command()}` on "
            f"{rows[0]['machine']}, {dates[0]}..{dates[-1]}; {what} (dB) / SSIM, means over "
            "images (gap to the fit's oracle stop in brackets).\n\n")
    f.write(common.md_table(head, body) + "\n")
  logging.info("wrote %s.md", stem)


def _command() -> str:
  """The command that makes the rows (the row-defining flags that were set)."""
  words = [f"python experiments/task_report.py --section={_SECTION.value}"]
  for flag in (_IMAGES, _ITERS, _WIDTH, _LR):
    if flag.value:
      value = ",".join(flag.value) if flag is _IMAGES else flag.value
      words.append(f"--{flag.name}={value}")
  if _OUT.value:
    words.append(f"--out={os.path.relpath(_OUT.value, common.REPO)}")
  return " ".join(words)


def _figure(label: str, rows: list[dict]) -> None:
  first = rows[0]["image"]
  files = [os.path.join(common.arrays_dir(_out()), r["key"] + ".npz") for r in rows
           if r["image"] == first]
  missing = [f for f in files if not os.path.exists(f)]
  if missing:  # the curves live under runs/ (not committed): another clone made the rows
    logging.warning("%s: no figure (curves missing, e.g. %s); the one there is kept", label,
                    missing[0])
    return
  curves, stops = {}, {}
  for r in rows:
    if r["image"] != first:
      continue
    arrays = np.load(os.path.join(common.arrays_dir(_out()), r["key"] + ".npz"))
    curves[f"{r['method']}: EMA vs clean"] = np.nanmean(arrays["curve_psnr_clean_ema"], axis=0)
    stops.update({f"{r['method']} {k}": v["stop"] - 1 for k, v in r["stops"].items()
                  if k not in ("oracle", "fixed")})
  path = _out().removesuffix(".jsonl") + f"_{label}.png"
  plots.psnr_curves(path, curves, title=f"{_SECTION.value} {label}: {first}", stops=stops)


def refresh_baselines(section: task_sections.Section) -> None:
  """Recomputes the baselines of every DIP row of the rows file (the observation is a function
  of the image's name and the setting) and rewrites the file in one replace."""
  with common.Results(_out()) as results:  # held: no report appends meanwhile
    rows = results.rows
    for row in rows:
      if row["method"] != "dip":
        continue
      config = pipeline.RestoreConfig(**row["config"])
      observed = pipeline.RestoreConfig(**row.get("observed", row["config"]))
      clean = load_clean(os.path.join(_DATA.value, row["image"]), row["crop"])
      y, mask = task_sections.observe(observed, clean, row["image"])
      row["baselines"] = {
          k: task_sections.score(config, v, clean) if isinstance(v, np.ndarray) else v
          for k, v in baselines_lib.baselines(config, y, mask, clean.shape).items()}
      logging.info("%s %s: %s", row["setting"], row["image"], {
          k: round(v["psnr"], 2) for k, v in row["baselines"].items() if isinstance(v, dict)})
    common.write_rows(_out(), rows)


def run() -> None:
  section = task_sections.SECTIONS[_SECTION.value]
  names = [n for n in section.images[:_LIMIT.value or None]
           if not _IMAGES.value or any(part in n for part in _IMAGES.value)]
  settings = {k: v for k, v in section.settings.items()
              if not _SETTINGS.value or k in _SETTINGS.value}
  if _SUMMARY.value:
    return summarise(section, common.read_rows(_out()))
  if _REFRESH.value:
    return refresh_baselines(section)
  if _CHECKPOINT_EVERY.value < 0 or _CHECKPOINT_EVERY.value % 100:
    raise ValueError(f"--checkpoint_every must be a multiple of 100 (the fits' chunk), got "
                     f"{_CHECKPOINT_EVERY.value}")
  compiler = fits.Compiler()
  with common.Results(_out()) as results:
    done = {r["key"] for r in results.rows}
    for name in names:
      clean = load_clean(os.path.join(_DATA.value, name), section.crop)
      for label, setting in settings.items():
        for method in task_sections.methods(setting):
          config = restore_config(section, setting, method)
          observed = task_sections.observation_config(config, setting)
          spec = dict(section=_SECTION.value, setting=label, image=name, method=method,
                      crop=section.crop, config=pipeline.identity_fields(config),
                      **({"observed": pipeline.identity_fields(observed)}
                         if observed != config else {}))
          key = common.row_key(spec)
          if key in done:
            continue
          t0 = time.time()
          y, mask = task_sections.observe(observed, clean, name)
          saves = os.path.join(common.arrays_dir(_out()), key + "_checkpoints")
          if os.path.isdir(saves) and not _CHECKPOINT_EVERY.value:
            logging.warning("%s: its checkpoints in %s are not resumed without "
                            "--checkpoint_every (the fit starts over)", key, saves)
          row, curves = fit_row(config, y, clean, mask, compiler,
                                saves if _CHECKPOINT_EVERY.value else None)
          found = baselines_lib.baselines(config, y, mask, clean.shape) if method == "dip" else {}
          row["baselines"] = {
              k: task_sections.score(config, v, clean) if isinstance(v, np.ndarray) else v
              for k, v in found.items()}
          if config.task == "denoise" or config.task == "deblur":
            row["degraded"] = pipeline.score(y, clean)
          common.save_arrays(os.path.join(common.arrays_dir(_out()), key + ".npz"), curves)
          results.append(dict(spec, key=key, **row, seconds=round(time.time() - t0, 1),
                              machine=common.host(), date=str(datetime.date.today())))
          shutil.rmtree(saves, ignore_errors=True)
          logging.info("%s %s %s %s: oracle %.2f dB, %s", _SECTION.value, label, name, method,
                       row["oracle_peak"]["psnr"], {k: round(v["psnr"], 2)
                                                    for k, v in row["stops"].items()})


if __name__ == "__main__":
  cli.run_main(__file__, run)
