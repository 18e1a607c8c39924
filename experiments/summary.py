r"""Markdown tables and figures from the rows of experiments/grid.py.

  python experiments/summary.py --results=runs/grid/results.jsonl --out_md=runs/grid/summary.md

Tables: the main one (PSNR / SSIM per method and stopping criterion, per image set and sigma),
the criteria (gap to the oracle peak, iteration error, iterations saved), the K-seed ensembles
against single seeds, one line per image and method and the discrepancy and staged stops
with sigma estimated or off by a factor (pages without ablations), and an ablation
table for each axis (stages, schedule, t_max, fresh_eps, probe, final_share, net, width, loss,
sigma_estimated) along which rows vary with the rest fixed. Each table names
the command lines and devices its rows came from. Figures (from the rows' .npz files, where
present: see common.arrays_dir): PSNR curves with every criterion's stop, per-stage PSNR of a
staged fit (measured and estimated without the ground truth), and clean | noisy | DIP | staged
| ensemble | BM3D for one image.
"""

from __future__ import annotations

import collections
import json
import os
import sys
from typing import Any, Callable, Iterable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import common
from dipjax import noise
from dipjax import plots
from dipjax import stopping
from grid_spec import STAGED

METHOD_NAMES = dict(dip="DIP", staged="staged", ddpm_input="DDPM input",
                    ddpm_input_staged="DDPM input + staged", bm3d="(C)BM3D")
CRITERION_NAMES = dict(fixed="fixed budget", oracle="oracle", es_wmv="ES-WMV", es_emv="ES-EMV",
                       plateau="loss plateau", discrepancy="discrepancy",
                       staged="staged (probe SURE)")
AXES = ("stages", "schedule", "t_max", "fresh_eps", "probe", "final_share", "net", "width",
        "loss", "sigma_estimated")
PLACE = ("image", "set", "sigma")  # where a row is; the rest of its config is its variant

_RESULTS = flags.DEFINE_list("results", ["runs/grid/results.jsonl"], "grid.py results files.")
_OUT_MD = flags.DEFINE_string("out_md", None, "Markdown output (default: summary.md beside the "
                              "first results file).")
_FIG_DIR = flags.DEFINE_string("fig_dir", None, "Figures (default: figures/ beside --out_md).")
_TITLE = flags.DEFINE_string("title", "DIP ablation grid", "Title of the markdown page.")
_CRITERION = flags.DEFINE_string("criterion", "es_wmv", "The stop whose outputs the image "
                                 "figure shows: a name, or names in order of preference "
                                 "(comma-separated; each fit shows the first it has, else "
                                 "fixed).")


def load_rows(paths: Iterable[str]) -> list[dict]:
  """The rows of grid.py results files, first copy of each key; a partial last line (a grid
  still writing) is left out. Each row's 'arrays' becomes a path usable from here."""
  rows, seen = [], set()
  for path in paths:
    if not os.path.isfile(path):
      raise ValueError(f"no such results file: {path}")
    with open(path) as f:
      text = f.read()
    for number, line in enumerate(text[:text.rfind("\n") + 1].splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number} is not a JSON row ({e})") from None
      if not isinstance(row, dict) or not {"key", "config", "noisy"} <= row.keys():
        raise ValueError(f"{path}:{number} is not a grid.py row")
      if row["key"] in seen:
        continue
      seen.add(row["key"])
      if row["config"]["method"] != "bm3d":
        # grid.py leaves the default loss and the known sigma out of its keys
        row["config"].setdefault("loss", "mse")
        row["config"].setdefault("sigma_estimated", False)
      if row.get("arrays"):
        row["arrays"] = _arrays_path(path, row["arrays"])
      rows.append(row)
  if not rows:
    raise ValueError(f"no rows in {', '.join(paths)}")
  return rows


# ----------------------------------------------------------------------------- row accessors


def _column(row: dict) -> tuple[str, float]:
  return row["config"]["set"], row["config"]["sigma"]


def _variant(row: dict) -> str:
  """The row's config without its place (image, set, sigma), as canonical JSON."""
  return json.dumps({k: v for k, v in row["config"].items() if k not in PLACE}, sort_keys=True)


def _is_fit(row: dict) -> bool:
  return row["config"]["method"] != "bm3d"


def _single(row: dict, criterion: str) -> tuple[float, float]:
  """Mean over the seeds of PSNR and SSIM at the criterion's stop."""
  c = row["criteria"][criterion]
  return float(np.mean(c["psnr"])), float(np.mean(c["ssim"]))


def _ensemble(row: dict, criterion: str) -> tuple[float, float]:
  e = row["criteria"][criterion]["ensemble"]
  return e["psnr"], e["ssim"]


def _bm3d(row: dict, criterion: str) -> tuple[float, float]:
  del criterion
  return row["output"]["psnr"], row["output"]["ssim"]


def _criterion_name(name: str) -> str:
  return CRITERION_NAMES.get(name, name)


def _variant_labels(rows: list[dict]) -> dict[str, str]:
  """A short label per variant: the method's name, plus the settings in which variants of the
  same method differ."""
  by_method = collections.defaultdict(dict)
  for row in rows:
    by_method[row["config"]["method"]][_variant(row)] = row["config"]
  labels = {}
  for method, variants in by_method.items():
    keys = sorted({k for c in variants.values() for k in c if k not in PLACE})
    differ = [k for k in keys if len({json.dumps(c.get(k)) for c in variants.values()}) > 1]
    for variant, config in variants.items():
      extra = ", ".join(f"{k}={config.get(k)}" for k in differ)
      labels[variant] = METHOD_NAMES.get(method, method) + (f" ({extra})" if extra else "")
  return labels


def _ordered_variants(rows: list[dict]) -> list[tuple[str, dict]]:
  """(variant, a config of it) in method order, then label order."""
  labels = _variant_labels(rows)
  first = {}
  for row in rows:
    first.setdefault(_variant(row), row["config"])
  order = list(METHOD_NAMES)
  return sorted(first.items(), key=lambda vc: (order.index(vc[1]["method"])
                                               if vc[1]["method"] in order else len(order),
                                               labels[vc[0]]))


# ----------------------------------------------------------------------------- tables


def _provenance(rows: list[dict]) -> str:
  """The command lines and devices that produced `rows`."""
  commands = list(dict.fromkeys(row.get("argv") or "(no command line stored)" for row in rows))
  devices = list(dict.fromkeys(f"{row['device']['backend']} ({row['device']['kind']})"
                               for row in rows if row.get("device")))
  return (f"Rows from {len(rows)} config(s) on {', '.join(devices) or 'an unknown device'}, "
          "made by:\n\n```\n" + "\n".join(commands) + "\n```")


def _columns(rows: list[dict]) -> list[tuple[str, float]]:
  return sorted({_column(r) for r in rows})


def _column_label(column: tuple[str, float], n: int) -> str:
  return f"{column[0]} σ={column[1]:g} (n={n})"


def _images(rows: list[dict]) -> dict[tuple[str, float], set[str]]:
  out = collections.defaultdict(set)
  for row in rows:
    out[_column(row)].add(row["config"]["image"])
  return out


def _mean_cell(values: list[tuple[float, float]], n_images: int, n_column: int) -> str:
  if not values:
    return "—"
  psnr, ssim = np.mean(values, axis=0)
  return f"{psnr:.2f} / {ssim:.4f}" + (f" ({n_images}/{n_column})" if n_images < n_column else "")


def main_table(rows: list[dict]) -> str:
  """Mean PSNR / SSIM per method variant and stop (rows) and image set and sigma (columns)."""
  columns, images = _columns(rows), _images(rows)
  labels = _variant_labels(rows)
  header = ["method", "stop"] + [_column_label(c, len(images[c])) for c in columns]
  noisy = {}
  for row in rows:
    noisy.setdefault(_column(row), {})[(row["config"]["image"], row["config"]["noise_seed"])] = (
        row["noisy"]["psnr"], row["noisy"]["ssim"])
  body = [["noisy input", "—"] + [_mean_cell(list(noisy[c].values()), len(noisy[c]),
                                              len(images[c])) for c in columns]]

  def cells(members: list[dict], value: Callable[[dict, str], tuple[float, float]],
            criterion: str) -> list[str]:
    out = []
    for c in columns:
      here = [r for r in members if _column(r) == c]
      out.append(_mean_cell([value(r, criterion) for r in here],
                            len({r["config"]["image"] for r in here}), len(images[c])))
    return out

  ensembles, baselines = [], []
  for variant, config in _ordered_variants(rows):
    members = [r for r in rows if _variant(r) == variant]
    if config["method"] == "bm3d":
      baselines.append([labels[variant], "—"] + cells(members, _bm3d, ""))
      continue
    for criterion in config["criteria"]:
      body.append([labels[variant], _criterion_name(criterion)]
                  + cells(members, _single, criterion))
      if config["seeds"] > 1:
        ensembles.append([f"{labels[variant]}, {config['seeds']}-seed ensemble",
                          _criterion_name(criterion)] + cells(members, _ensemble, criterion))
  return common.md_table(header, body + ensembles + baselines)


def criteria_table(rows: list[dict]) -> str:
  """Per fit variant and criterion, per sigma: gap to the oracle peak (dB), |t_stop - t_peak|
  and iterations saved, means over images; and the share of fits where it fired."""
  fits = [r for r in rows if _is_fit(r)]
  sigmas = sorted({r["config"]["sigma"] for r in fits})
  labels = _variant_labels(fits)
  header = ["method", "stop"]
  for s in sigmas:
    header += [f"gap (dB) σ={s:g}", f"\\|Δt\\| σ={s:g}", f"saved σ={s:g}"]
  header.append("fired")
  body = []
  for variant, config in _ordered_variants(fits):
    members = [r for r in fits if _variant(r) == variant]
    for criterion in config["criteria"]:
      line = [labels[variant], _criterion_name(criterion)]
      for s in sigmas:
        here = [r["criteria"][criterion] for r in members if r["config"]["sigma"] == s]
        line += ([f"{np.mean([c[k] for c in here]):{f}}" for k, f in
                  (("gap_db", ".2f"), ("iter_error", ".0f"), ("iters_saved", ".0f"))]
                 if here else ["—"] * 3)
      fired = [f >= 0 for r in members for f in r["criteria"][criterion]["fired_at"]]
      no_stop = sum(r["criteria"][criterion]["no_stop"] for r in members)
      line.append(f"{100 * np.mean(fired):.0f}%" + (f" ({no_stop} no stop)" if no_stop else ""))
      body.append(line)
  return common.md_table(header, body)


def ensemble_table(rows: list[dict]) -> str | None:
  """Per fit variant with K > 1 seeds and criterion: the ensemble's PSNR and its gain over the
  mean single seed, per image set and sigma. None when every variant has one seed."""
  fits = [r for r in rows if _is_fit(r) and r["config"]["seeds"] > 1]
  if not fits:
    return None
  columns, images, labels = _columns(fits), _images(fits), _variant_labels(fits)
  header = ["ensemble", "stop"] + [_column_label(c, len(images[c])) for c in columns] + [
      "mean gain PSNR (dB)", "mean gain SSIM"]
  body = []
  for variant, config in _ordered_variants(fits):
    members = [r for r in fits if _variant(r) == variant]
    for criterion in config["criteria"]:
      gains = lambda rs: [np.subtract(_ensemble(r, criterion), _single(r, criterion)) for r in rs]
      line = [f"{labels[variant]}, {config['seeds']} seeds", _criterion_name(criterion)]
      for c in columns:
        here = [r for r in members if _column(r) == c]
        line.append(f"{np.mean([_ensemble(r, criterion)[0] for r in here]):.2f} "
                    f"({np.mean(gains(here), axis=0)[0]:+.2f})" if here else "—")
      total = np.mean(gains(members), axis=0)
      body.append(line + [f"{total[0]:+.2f}", f"{total[1]:+.4f}"])
  return common.md_table(header, body)


PER_IMAGE_CRITERIA = ("oracle", "es_wmv", "discrepancy", "staged")


def per_image_table(rows: list[dict]) -> str | None:
  """One line per image and fit variant: mean single-seed PSNR at the oracle and the automatic
  stops the report discusses (PER_IMAGE_CRITERIA), the K-seed ensemble's at the same stops, and
  the noisy input's and (C)BM3D's on the same image. None without fit rows."""
  fits = [r for r in rows if _is_fit(r)]
  if not fits:
    return None
  present = {c for r in fits for c in r["config"]["criteria"]}
  criteria = [c for c in PER_IMAGE_CRITERIA if c in present]
  multi = {c for r in fits if r["config"]["seeds"] > 1 for c in r["config"]["criteria"]}
  ensembles = [c for c in criteria if c in multi]
  labels = _variant_labels(fits)
  order = {v: i for i, (v, _) in enumerate(_ordered_variants(fits))}
  bm3d = {(*_column(r), r["config"]["image"]): r["output"]["psnr"]
          for r in rows if not _is_fit(r)}
  header = (["set σ", "image", "method", "noisy"] + [_criterion_name(c) for c in criteria]
            + [f"ensemble, {_criterion_name(c)}" for c in ensembles] + ["(C)BM3D"])
  cell = lambda value: "—" if value is None else f"{value:.2f}"
  body = []
  for row in sorted(fits, key=lambda r: (_column(r), r["config"]["image"], order[_variant(r)])):
    c, k = row["criteria"], row["config"]["seeds"]
    place = (*_column(row), row["config"]["image"])
    body.append([f"{place[0]} σ={place[1]:g}", place[2], labels[_variant(row)],
                 f"{row['noisy']['psnr']:.2f}"]
                + [cell(float(np.mean(c[n]["psnr"])) if n in c else None) for n in criteria]
                + [cell(c[n]["ensemble"]["psnr"] if n in c and k > 1 else None)
                   for n in ensembles]
                + [cell(bm3d.get(place))])
  return common.md_table(header, body)


SIGMA_FACTORS = (0.9, 0.95, 1.0, 1.05, 1.1)


def _detect(criterion: stopping.Criterion, records: dict, noise_std: Any = np.nan
            ) -> np.ndarray:
  """Stops of (seeds, iters) traces by ``stopping.detect``."""
  records = {k: jnp.asarray(v) for k, v in records.items()}
  shape = next(iter(records.values())).shape
  records["step"] = jnp.broadcast_to(jnp.arange(shape[-1]), shape)
  return np.asarray(jax.vmap(lambda r: stopping.detect(criterion, r, noise_std).stop)(records))


def _stops_with(name: str, a: dict, y: jax.Array, sigma: float, used: float) -> np.ndarray:
  """The discrepancy or staged stops of a fit's traces `a` with sigma `used` in place of the
  true `sigma`."""
  if name == "discrepancy":
    return _detect(stopping.get("discrepancy"), dict(psnr_obs_ema=a["curve_psnr_obs_ema"]),
                   noise.noise_std(y, used))
  lam, clipped = a["curve_noise_fit_ema"], (jnp.min(y) >= 0.0) & (jnp.max(y) <= 1.0)
  estimate = (a["curve_mse_est_ema"] - noise.sure_noise_terms(y, sigma, lam, clipped)
              + noise.sure_noise_terms(y, used, lam, clipped))  # the last stage: a = 1
  final = a["curve_stage"] == a["curve_stage"].max(axis=-1, keepdims=True)
  return _detect(stopping.get("staged"), dict(mse_est_ema=estimate, final_stage=final))


def _sigma_results(members: list[dict], name: str) -> tuple[dict[str, list], list[float]]:
  """For the criterion `name` of the fits of `members`: per sigma used (its label), (PSNR at
  the stop, gap, |dt|, never reached) of each fit; and each row's estimated sigma / sigma."""
  results = collections.defaultdict(list)  # sigma used -> (psnr, gap, |dt|, never)
  ratios = []
  for row in members:
    a, sigma = _arrays(row), row["config"]["sigma"] / 255
    y = jnp.asarray(a["noisy"], jnp.float32) / 255
    estimate = noise.estimate_sigma(y)
    ratios.append(estimate / sigma)
    clean = a["curve_psnr_clean_ema"]  # (seeds, iters)
    for label, used in [("estimated", estimate)] + [(f"{f:.2f} σ", f * sigma)
                                                    for f in SIGMA_FACTORS]:
      stop = _stops_with(name, a, y, sigma, used)
      never = stop < 0
      stop = np.where(never, clean.shape[1] - 1, stop)
      psnr = clean[np.arange(len(stop)), stop]
      results[label] += zip(psnr, a["oracle_psnr"] - psnr,
                            np.abs(stop - a["oracle_step"]), never)
  return results, ratios


def sigma_table(rows: list[dict]) -> str | None:
  """The discrepancy and staged stops when sigma is not the one added: estimated from the noisy
  image (``noise.estimate_sigma``) or off by a factor (SIGMA_FACTORS), computed after the
  fact from each fit's traces by ``stopping.detect`` and read off its PSNR curve. Discrepancy:
  the first iteration whose traced residual (``curve_psnr_obs_ema``) is at or below
  ``noise.noise_std(y, s)^2`` (none: the last). Staged: the traced estimate
  (``curve_mse_est_ema``) with its sigma terms swapped (``noise.sure_noise_terms``, at the traced
  probe fit ``curve_noise_fit_ema``; the fit itself, and its probe drawn with the true sigma,
  unchanged). y is the .npz's 8-bit noisy image (rounding: 0.1% of sigma at 25). Single fits
  only (the ensembles need the kept images). None without such rows."""
  fits = [r for r in rows if _is_fit(r) and _has_arrays(r)
          and {"discrepancy", "staged"} & set(r["config"]["criteria"])]
  if not fits:
    return None
  labels = _variant_labels(fits)
  body = []
  for variant, config in _ordered_variants(fits):
    for column in _columns(fits):
      members = [r for r in fits if _variant(r) == variant and _column(r) == column]
      for name in [c for c in ("discrepancy", "staged") if c in config["criteria"]]:
        results, ratios = _sigma_results(members, name)
        for label, values in results.items():
          psnr, gap, dt, never = np.mean(values, axis=0)
          shown = (f"estimated ({np.min(ratios):.2f}–{np.max(ratios):.2f} σ)"
                   if label == "estimated" else label)
          body.append([labels[variant], f"{column[0]} σ={column[1]:g}", _criterion_name(name),
                       shown, f"{psnr:.2f}", f"{gap:.2f}", f"{dt:.0f}",
                       f"{100 * never:.0f}%" if name == "discrepancy" else "—"])
  return common.md_table(["method", "set σ", "criterion", "σ used", "PSNR at the stop",
                          "gap (dB)", "\\|Δt\\|", "never reached"], body)


def ablation_tables(rows: list[dict]) -> list[tuple[str, str, list[dict]]]:
  """For each axis and each group of fit rows that differ only in it (and in their place):
  (heading, table, the rows used). Cells: mean single-seed PSNR at each stop over the images
  every value of the axis has."""
  fits = [r for r in rows if _is_fit(r)]
  out = []
  for axis in AXES:
    groups = collections.defaultdict(list)
    for row in fits:
      if axis in row["config"]:
        rest = {k: v for k, v in row["config"].items()
                if k not in PLACE + (axis, "criteria")}
        groups[json.dumps(rest, sort_keys=True)].append(row)
    for rest, members in groups.items():
      values = sorted({r["config"][axis] for r in members}, key=json.dumps)
      if len(values) < 2:
        continue
      criteria = list(dict.fromkeys(c for r in members for c in r["config"]["criteria"]))
      body, used = [], []
      for column in _columns(members):
        here = [r for r in members if _column(r) == column]
        shared = set.intersection(*({r["config"]["image"] for r in here
                                     if r["config"][axis] == v} for v in values))
        for v in values:
          chosen = [r for r in here if r["config"][axis] == v and r["config"]["image"] in shared]
          used += chosen
          shown = "equal stages" if v is None and axis == "final_share" else str(v)
          body.append([f"{column[0]} σ={column[1]:g}", shown, str(len(shared))] + [
              f"{np.mean([_single(r, c)[0] for r in chosen]):.2f}"
              if chosen and all(c in r["criteria"] for r in chosen) else "—"
              for c in criteria])
      fixed = ", ".join(f"{k}={v}" for k, v in json.loads(rest).items())
      heading = f"### Ablation: {axis}\n\nFixed: {fixed}. Mean PSNR (dB) of single fits."
      header = ["set σ", axis, "images"] + [_criterion_name(c) for c in criteria]
      out.append((heading, common.md_table(header, body), used))
  return out


# ----------------------------------------------------------------------------- figures


def _arrays_path(rows_file: str, arrays: str) -> str:
  """A row's .npz from here: its path from its rows file's folder, else (rows written before the
  arrays left docs/results/ for runs/arrays/) the file of that name in common.arrays_dir."""
  here = os.path.join(os.path.dirname(os.path.abspath(rows_file)), arrays)
  moved = os.path.join(common.arrays_dir(rows_file), os.path.basename(arrays))
  return moved if not os.path.isfile(here) and os.path.isfile(moved) else here


def _has_arrays(row: dict) -> bool:
  return bool(row.get("arrays")) and os.path.isfile(row["arrays"])


def _arrays(row: dict) -> dict[str, np.ndarray]:
  with np.load(row["arrays"]) as f:
    return dict(f)


def _pick(criteria: list[str], wanted: str) -> str:
  """The first of the comma-separated `wanted` names in `criteria`, else fixed (else the first)."""
  for name in wanted.split(",") + ["fixed"]:
    if name in criteria:
      return name
  return criteria[0]


def _slug(kind: str, sigma: float, image: str, method: str = "") -> str:
  return "_".join(p for p in (kind, method, f"s{sigma:g}", os.path.splitext(image)[0]) if p)


def figures(rows: list[dict], fig_dir: str, criterion: str) -> list[tuple[str, str]]:
  """PNG figures for one showcase image (the one with the most methods) and sigma: curves of
  each fit method with every stop, per-stage PSNR of a staged fit, and an image row.
  Returns (caption, path) pairs; rows without their .npz are passed over."""
  rows = [r for r in rows if _has_arrays(r)]
  if not rows:
    return []
  places = collections.defaultdict(list)
  for row in rows:
    places[(row["config"]["set"], row["config"]["sigma"], row["config"]["image"])].append(row)
  place = max(sorted(places), key=lambda p: len({r["config"]["method"] for r in places[p]}))
  here = places[place]
  name = f"{place[2]} (σ={place[1]:g})"
  os.makedirs(fig_dir, exist_ok=True)
  out = []
  by_method = {}
  for row in here:
    by_method.setdefault(row["config"]["method"], row)
  for method, row in by_method.items():
    if method == "bm3d":
      continue
    a = _arrays(row)
    stops = {_criterion_name(c): int(a[f"stop_{c}"][0]) for c in row["config"]["criteria"]}
    curves = {"EMA vs clean": a["curve_psnr_clean_ema"][0],
              "output vs clean": a["curve_psnr_clean"][0],
              "EMA vs noisy": a["curve_psnr_obs_ema"][0]}
    ends = row.get("stage_ends")
    path = os.path.join(fig_dir, _slug("curves", *place[1:], method) + ".png")
    plots.psnr_curves(path, curves, np.asarray(ends) if ends and len(ends) > 1 else None,
                      title=f"{METHOD_NAMES.get(method, method)}, {name}, seed 0", stops=stops)
    out.append((f"PSNR curves, {METHOD_NAMES.get(method, method)}, {name}, seed 0, with each "
                "criterion's stop", path))
  staged = next((r for m, r in by_method.items() if m in STAGED
                 and len(r.get("stage_ends", [])) > 1), None)
  if staged is not None:
    a = _arrays(staged)
    method = METHOD_NAMES[staged["config"]["method"]]
    path = os.path.join(fig_dir, _slug("stages", *place[1:], staged["config"]["method"]) + ".png")
    curves = {"EMA vs clean": a["curve_psnr_clean_ema"][0],
              "EMA vs stage target": a["curve_psnr_target_ema"][0]}
    est = a.get("curve_mse_est_ema")
    if est is not None and np.isfinite(est[0]).any():
      curves["EMA vs clean stage target, estimated"] = np.where(
          est[0] > 0, -10 * np.log10(np.where(est[0] > 0, est[0], 1.0)), np.nan)
    plots.stage_psnr(path, curves, a["curve_stage"][0], title=f"{method}, {name}, seed 0")
    out.append((f"Per-stage PSNR, {method}, {name}, seed 0", path))
  out.append(_image_row(here, by_method, fig_dir, place, name, criterion))
  return out


def _image_row(here: list[dict], by_method: dict[str, dict], fig_dir: str, place: tuple,
               name: str, criterion: str) -> tuple[str, str]:
  a = _arrays(here[0])
  panels = [("clean", a["clean"]), (f"noisy {here[0]['noisy']['psnr']:.2f} dB", a["noisy"])]
  shown = set()
  dip = by_method.get("dip")
  staged = next((by_method[m] for m in STAGED if m in by_method), None)
  for label, row in (("DIP", dip), ("staged", staged)):
    if row is not None:
      c = _pick(row["config"]["criteria"], criterion)
      shown.add(c)
      panels.append((f"{label}, {_criterion_name(c)}\n{row['criteria'][c]['psnr'][0]:.2f} dB",
                     _arrays(row)[f"kept0_{c}"]))
  ensemble = next((r for r in (staged, dip) if r is not None and r["config"]["seeds"] > 1), None)
  if ensemble is not None:
    c = _pick(ensemble["config"]["criteria"], criterion)
    shown.add(c)
    panels.append((f"{METHOD_NAMES[ensemble['config']['method']]} "
                   f"{ensemble['config']['seeds']}-seed ensemble\n"
                   f"{ensemble['criteria'][c]['ensemble']['psnr']:.2f} dB",
                   _arrays(ensemble)[f"ensemble_{c}"]))
  if "bm3d" in by_method:
    panels.append((f"(C)BM3D\n{by_method['bm3d']['output']['psnr']:.2f} dB",
                   _arrays(by_method["bm3d"])["output"]))
  path = os.path.join(fig_dir, _slug("images", *place[1:]) + ".png")
  plots.image_row(path, panels, title=name)
  stops = ", ".join(_criterion_name(c) for c in sorted(shown)) or "—"
  return (f"{name}: clean, noisy and the outputs (seed 0, and the ensemble) at the {stops} "
          "stop", path)


# ----------------------------------------------------------------------------- page


def cost_table(rows: list[dict]) -> str:
  """Wall time of the rows as measured, per method: configs, fits, iterations, hours, and the
  median seconds per config and per 1000 fit-iterations (robust to a few configs that shared
  the CPU; the total is not)."""
  groups = collections.defaultdict(list)
  for row in rows:
    groups[METHOD_NAMES.get(row["config"]["method"], row["config"]["method"])].append(row)
  body, total = [], 0.0
  for name, group in groups.items():
    walls = [r.get("wall_s") or 0.0 for r in group]
    fits = [r["config"].get("seeds", 1) if _is_fit(r) else 0 for r in group]
    iters = [f * r["config"].get("iters", 0) for f, r in zip(fits, group)]
    per_kit = [1000 * w / i for w, i in zip(walls, iters) if i]
    total += sum(walls)
    body.append([name, str(len(group)), str(sum(fits) or "–"),
                 f"{sum(iters):,}" if any(fits) else "–",
                 f"{sum(walls) / 3600:.2f}", f"{np.median(walls):.0f}",
                 f"{np.median(per_kit):.1f}" if per_kit else "–"])
  body.append(["all", str(len(rows)), "", "", f"**{total / 3600:.2f}**", "", ""])
  return common.md_table(["method", "configs", "fits", "fit-iterations", "hours (measured)",
                 "median s / config", "median s / 1000 fit-its"], body)


def summarize(paths: list[str], out_md: str, fig_dir: str, title: str,
              criterion: str = "es_wmv") -> str:
  """Writes the markdown page (and its figures) for the rows of `paths`; returns the page."""
  rows = load_rows(paths)
  fits = [r for r in rows if _is_fit(r)]
  parts = [f"# {title}",
           f"{len(rows)} rows from {', '.join(paths)}. PSNR (dB) / SSIM of the kept EMA output "
           "at each criterion's stop, mean over the seeds of a config (ensemble rows: the mean "
           "of the seeds' outputs, each at its own stop), then over the images of a column; "
           "(k/n): a cell with only k of the column's n images."]
  parts += ["## Main table", _provenance(rows), main_table(rows)]
  if fits:
    parts += ["## Stopping criteria",
              "gap: oracle peak PSNR minus PSNR at the stop (dB); |Δt|: |t_stop − t_peak| "
              "(iterations); saved: iterations left when the criterion fired (0 if it never "
              "did); fired: share of fits where it fired.",
              _provenance(fits), criteria_table(fits)]
  ensembles = ensemble_table(rows)
  if ensembles:
    parts += ["## Ensembles", "Ensemble PSNR (its gain over the mean single seed, dB).",
              _provenance([r for r in fits if r["config"]["seeds"] > 1]), ensembles]
  ablations = ablation_tables(rows)
  per_image = None if ablations else per_image_table(rows)
  if per_image:
    parts += ["## Per image", "PSNR (dB) of each image: single fits (mean over the seeds) and "
              "the ensemble at each stop; the oracle column minus another is that criterion's "
              "gap.", _provenance(rows), per_image]
  sensitivity = None if ablations else sigma_table(rows)
  if sensitivity:
    parts += ["## Stops without the true σ",
              "Each fit's discrepancy and staged stops recomputed from its traces with σ "
              "estimated from the noisy image (Donoho's MAD; the range of σ̂/σ over the images "
              "in brackets) or off by a factor: the discrepancy level, and the staged "
              "estimate's noise terms (the fit itself, its probe drawn with the true σ, "
              "unchanged; `ablate --sigma_estimated` re-runs fits given σ̂). Single fits, mean "
              "over fits; never reached: the residual never fell to the level (the stop is then "
              "the last iteration).",
              _provenance([r for r in rows if _is_fit(r) and _has_arrays(r)]), sensitivity]
  if ablations:
    parts.append("## Ablations")
    for heading, table, used in ablations:
      parts += [heading, _provenance(used), table]
  parts += ["## Cost", "Wall time of every row as the grid measured it on its device (compiles "
            "included; a row that shared the CPU with other work counts its longer time).",
            cost_table(rows)]
  figs = figures(rows, fig_dir, criterion)
  if figs:
    base = os.path.dirname(os.path.abspath(out_md))
    parts.append("## Figures")
    parts += [f"![{caption}]({os.path.relpath(os.path.abspath(path), base)})\n\n*{caption}*"
              for caption, path in figs]
  page = "\n\n".join(parts) + "\n"
  os.makedirs(os.path.dirname(os.path.abspath(out_md)), exist_ok=True)
  with open(out_md, "w") as f:
    f.write(page)
  return page


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  out_md = _OUT_MD.value or os.path.join(os.path.dirname(_RESULTS.value[0]), "summary.md")
  fig_dir = _FIG_DIR.value or os.path.join(os.path.dirname(os.path.abspath(out_md)), "figures")
  try:
    summarize(_RESULTS.value, out_md, fig_dir, _TITLE.value, _CRITERION.value)
  except ValueError as e:
    print(f"summary.py: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {out_md}")


if __name__ == "__main__":
  app.run(main)
