"""experiments/grid.py and summary.py: resume without duplicate rows, the grid's size and
estimate, the rows, the summary tables from a hand-written fixture, and clear errors.

One tiny grid (a 16x16 image, staged with 3 values of t_max, width 4, 2 scales, 20 iterations,
2 seeds) runs in-process; it compiles one init and one fit for the module.
"""

import dataclasses
import importlib.util
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from dipjax import io
from dipjax import noise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  """An experiments/ script as a module (its folder on sys.path, as when run as a script)."""
  if os.path.join(ROOT, "experiments") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments",
                                                                   name + ".py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


grid = _load("grid")
summary = _load("summary")
# The shared modules the scripts import (loaded with them; the same objects).
common, estimates, fits, grid_spec = (sys.modules[name] for name in
                                      ("common", "estimates", "fits", "grid_spec"))

TINY = dict(crop=0, widths=(4,), scales=1, seeds=2, iters=20, window=5,
            criteria=("fixed", "oracle", "es_wmv", "discrepancy"))


def _write_images(folder, n, size=16):
  folder.mkdir(parents=True, exist_ok=True)
  yy, xx = np.mgrid[0:size, 0:size] / size
  for i in range(n):
    image = np.stack([0.2 + 0.6 * (xx > 0.3 + 0.1 * i), 0.3 + 0.4 * yy, 0.5 + 0.3 * xx * yy], -1)
    io.save_image(folder / f"im{i}.png", image)
  return folder


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
  """A 3-config grid killed after its first config and mid-write of a row, then resumed."""
  tmp = tmp_path_factory.mktemp("grid")
  images = common.expand_images([str(_write_images(tmp / "Tiny", 1))])
  spec = grid_spec.GridSpec(images=images, methods=("staged",), stages=(2,), t_max=(5, 10, 15),
                            **TINY)
  out = str(tmp / "results.jsonl")
  compiler = fits.Compiler()
  first = grid.run_grid(spec, out, argv="first", limit=1, compiler=compiler)
  with open(out) as f:
    first_line = f.read()
  with open(out, "a") as f:
    f.write('{"key": "killed mid-wr')  # a row cut short by a kill
  rest = grid.run_grid(spec, out, argv="second", compiler=compiler)
  return spec, out, first, rest, first_line


def test_resume_after_interruption_has_no_duplicate_rows(resumed):
  spec, out, first, rest, first_line = resumed
  with open(out) as f:
    text = f.read()
  rows = [json.loads(line) for line in text.splitlines()]
  assert text.startswith(first_line) and text.endswith("\n") and len(rows) == 3
  assert [r["key"] for r in rows] == [j.key for j in grid.jobs(spec)]
  assert len(first) == 1 and len(rest) == 2  # the finished config was not recomputed
  assert first[0]["key"] not in {r["key"] for r in rest}
  assert [r["argv"] for r in rows] == ["first", "second", "second"]
  assert grid.run_grid(spec, out, compiler=fits.Compiler()) == []  # nothing left to do


def test_rows_hold_stops_scores_and_arrays(resumed):
  spec, out, _, _, _ = resumed
  rows = common.read_rows(out)
  assert [r["config"]["t_max"] for r in rows] == [5, 10, 15]
  for row in rows:
    assert row["stage_ends"] == [10, 20] and row["device"]["backend"] == "cpu"
    assert row["ms_per_it"] > 0 and row["noisy"]["psnr"] == rows[0]["noisy"]["psnr"]
    assert list(row["criteria"]) == list(spec.criteria)
    fixed, oracle = row["criteria"]["fixed"], row["criteria"]["oracle"]
    assert fixed["stop"] == [19, 19] and fixed["iters_saved"] == 0
    assert oracle["stop"] == row["oracle_peak"]["step"]
    assert oracle["gap_db"] == pytest.approx(0, abs=1e-3) and oracle["iter_error"] == 0
    assert fixed["gap_db"] >= -1e-3 and len(fixed["psnr"]) == len(fixed["ssim"]) == 2
    assert row["criteria"]["es_wmv"]["no_stop"] == 0
    arrays = np.load(os.path.join(os.path.dirname(out), row["arrays"]))
    assert arrays["curve_psnr_clean_ema"].shape == (2, 20)
    assert arrays["kept0_oracle"].shape == arrays["clean"].shape == (16, 16, 3)
    np.testing.assert_array_equal(arrays["stop_es_wmv"], row["criteria"]["es_wmv"]["stop"])
    assert arrays["curve_stage"][0, [0, 9, 10, 19]].tolist() == [0, 0, 1, 1]


BM3D = "needs the optional bm3d package (pip install -e '.[baselines]')"


def test_dry_run_prints_the_size(resumed, capsys):
  spec, out, _, _, _ = resumed
  assert grid.run_grid(spec, out, dry_run=True) == []
  printed = capsys.readouterr().out
  assert "grid: 3 configs (3 fit configs = 6 fits of 20 iterations, 0 BM3D)" in printed
  assert "3 already in" in printed and "0 to run" in printed


def test_estimates_from_rows_and_calibrations(resumed):
  pytest.importorskip("bm3d", reason=BM3D)  # a grid with --methods bm3d
  spec, out, _, _, _ = resumed
  # A bigger grid: rows give the speed of their group, the new group is calibrated.
  wide = dataclasses.replace(spec, methods=("dip", "staged", "bm3d"),
                             schedules=("linear", "cosine"), widths=(4, 8))
  jobs = grid.jobs(wide)
  assert len(jobs) == 2 + 2 * 2 * 3 + 1  # dip: widths; staged: widths x schedules x t_max; bm3d
  rows = common.read_rows(out)
  pending = [j for j in jobs if j.key not in {r["key"] for r in rows}]
  measured = []
  seconds, notes = estimates.estimate(pending, {p: (256, 3) for p in wide.images}, rows,
                                 lambda job: measured.append(job) or (10.0, 5.0))
  assert len(measured) == 4  # plain widths 4 and 8, staged width 8, BM3D
  staged_ms = np.median([r["ms_per_it"] for r in rows if r["config"]["method"] == "staged"])
  cosine = next(s for s, j in zip(seconds, pending) if j.config.get("schedule") == "cosine"
                and j.config["width"] == 4)
  assert cosine >= staged_ms / 1000 * 20 * 2
  assert any("median of 3 done row(s)" in n for n in notes)
  assert sum("calibrated" in n for n in notes) == 4


def test_ddpm_input_and_staged_problems(tmp_path):
  clean = io.load_image(_write_images(tmp_path, 1) / "im0.png")
  noisy = common.noisy_image(clean, "im0.png", 25, 0)
  np.testing.assert_array_equal(noisy, common.noisy_image(clean, "im0.png", 25, 0))
  assert not np.array_equal(noisy, common.noisy_image(clean, "im0.png", 50, 0))
  tiny = dict(TINY, criteria=TINY["criteria"] + ("staged",))
  spec = grid_spec.GridSpec(images=(str(tmp_path / "im0.png"),), methods=grid_spec.METHODS[:4],
                            stages=(3,), t_max=(30,), fresh_eps=(True,), **tiny)
  built = {j.config["method"]: fits.setup(j.config, clean, noisy) for j in grid.jobs(spec)}
  runs = {method: run for method, (run, _) in built.items()}
  info = {method: info for method, (_, info) in built.items()}
  assert runs["ddpm_input"].problem.inputs.base.shape == (16, 16, 3)
  assert info["ddpm_input"]["input_t"] == info["ddpm_input_staged"]["input_t"] > 0
  assert runs["dip"].problem.inputs.base.shape == (16, 16, 32)
  staged = runs["staged"].problem  # stacked per seed: each seed its own probe and stage noise
  assert not runs["staged"].shared and runs["dip"].shared
  assert staged.targets.shape == (2, 3, 16, 16, 3) and staged.stage_noise.shape == (2, 3, 16, 16, 3)
  np.testing.assert_allclose(staged.stage_noise[:, -1], staged.probe, atol=1e-6)  # t = 0
  assert not np.allclose(staged.probe[0], staged.probe[1])
  stage_noise = staged.stage_noise[0]
  assert not np.allclose(stage_noise[0] / np.std(stage_noise[0]),
                         stage_noise[1] / np.std(stage_noise[1]))  # fresh eps
  # The staged criterion needs the probe: it is scored on staged fits only.
  assert [c.kind for c in runs["staged"].fit_config.criteria][-1] == "staged"
  assert "staged" not in [c.kind for c in runs["dip"].fit_config.criteria]
  assert not np.allclose(staged.stage_noise[0] / np.std(staged.stage_noise[0]),
                         staged.stage_noise[1] / np.std(staged.stage_noise[1]))  # fresh eps


def test_sigma_estimated_axis(tmp_path):
  """--sigma_estimated=false,true: the known sigma keeps the config (and row key) it had before
  the axis existed; the estimated one gives the fit sigma from the noisy image alone."""
  clean = io.load_image(_write_images(tmp_path, 1, size=32) / "im0.png")
  noisy = common.noisy_image(clean, "im0.png", 25, 0)
  spec = grid_spec.GridSpec(images=(str(tmp_path / "im0.png"),), methods=("staged",),
                            stages=(2,), t_max=(30,), sigma_estimated=(False, True), **TINY)
  known, estimated = grid.jobs(spec)
  assert "sigma_estimated" not in known.config and estimated.config["sigma_estimated"]
  assert known.key == grid.jobs(dataclasses.replace(spec, sigma_estimated=(False,)))[0].key
  built = {name: fits.setup(j.config, clean, noisy)
           for name, j in (("known", known), ("estimated", estimated))}
  assert "sigma_used" not in built["known"][1]
  sigma_hat = built["estimated"][1]["sigma_used"]
  assert sigma_hat == pytest.approx(noise.estimate_sigma(noisy) * 255, abs=1e-3)
  assert sigma_hat != 25 and 10 < sigma_hat < 40  # a 32x32 crop: a rough estimate
  np.testing.assert_allclose(built["estimated"][0].problem.sigma, sigma_hat / 255, rtol=1e-4)
  np.testing.assert_allclose(built["known"][0].problem.sigma, 25 / 255, rtol=1e-6)


def test_bm3d_sees_the_same_noisy_input(tmp_path):
  pytest.importorskip("bm3d", reason=BM3D)
  path = str(_write_images(tmp_path, 1, size=32) / "im0.png")
  job = grid.jobs(grid_spec.GridSpec(images=(path,), methods=("bm3d",), **TINY))[0]
  assert set(job.config) == {"image", "set", "crop", "sigma", "method", "noise_seed"}
  clean = common.load_clean(path, 0)
  row, arrays = grid.run_config(job, clean, fits.Compiler())
  noisy = common.noisy_image(clean, "im0.png", 25, 0)
  np.testing.assert_array_equal(arrays["noisy"], np.round(noisy * 255).astype(np.uint8))
  assert row["output"]["psnr"] > row["noisy"]["psnr"]


def _fit_row(image, method, psnr, ssim, ensemble, **extra):
  """A hand-written grid row: criteria fixed and es_wmv, 2 seeds."""
  config = dict(image=image, set="SetA", crop=128, sigma=25.0, method=method, noise_seed=0,
                net="skip", width=32, scales=5, seeds=2, seed_base=0, iters=1000,
                lr=0.01, reg_noise_std=0.0333, exp_weight=0.99, criteria=["fixed", "es_wmv"],
                **extra)
  crit = lambda p, s, e, stop, fired, gap: dict(
      stop=stop, fired_at=fired, psnr=p, ssim=s, ensemble=dict(psnr=e, ssim=0.9),
      gap_db=gap, iter_error=abs(stop[0] - 400), iters_saved=100.0, no_stop=0)
  return dict(key=f"{image}-{method}-{json.dumps(extra)}", config=config, argv="python grid.py x",
              device=dict(backend="cpu", kind="cpu"), noisy=dict(psnr=20.0, ssim=0.3), wall_s=100.0,
              criteria=dict(fixed=crit(psnr, ssim, ensemble, [999, 999], [-1, -1], 1.5),
                            es_wmv=crit([p + 1 for p in psnr], ssim, ensemble + 1, [500, 500],
                                        [899, -1], 0.5)))


def test_summary_tables_from_a_fixture(tmp_path):
  rows = [_fit_row("a.png", "dip", [28.0, 29.0], [0.8, 0.8], 29.0),
          _fit_row("b.png", "dip", [30.0, 31.0], [0.8, 0.8], 31.0),
          *(_fit_row(im, "staged", [p, p], [0.7, 0.7], p, schedule="linear", stages=k, t_max=100,
                     fresh_eps=False)
            for im, k, p in (("a.png", 2, 27.0), ("b.png", 2, 29.0), ("a.png", 4, 26.0))),
          dict(key="bm3d-a", config=dict(image="a.png", set="SetA", crop=128, sigma=25.0,
                                         method="bm3d", noise_seed=0),
               argv="python grid.py --methods=bm3d", device=dict(backend="numpy", kind="x86"),
               noisy=dict(psnr=20.0, ssim=0.3), output=dict(psnr=31.0, ssim=0.85), wall_s=2.0)]
  results = tmp_path / "results.jsonl"
  results.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"key": "partial')
  page = summary.summarize([str(results)], str(tmp_path / "s.md"), str(tmp_path / "fig"), "T")
  lines = page.splitlines()
  row_of = lambda *cells: next(l for l in lines if l.startswith("| " + " | ".join(cells) + " |"))
  assert "SetA σ=25 (n=2)" in page and "noisy input | — | 20.00 / 0.3000 |" in page
  assert row_of("DIP", "fixed budget").endswith("| 29.50 / 0.8000 |")  # (28.5 + 30.5) / 2
  assert row_of("DIP", "ES-WMV").endswith("| 30.50 / 0.8000 |")
  assert row_of("DIP, 2-seed ensemble", "fixed budget").endswith("| 30.00 / 0.9000 |")
  assert row_of("staged (stages=4)", "fixed budget").endswith("| 26.00 / 0.7000 (1/2) |")
  assert row_of("(C)BM3D", "—").endswith("| 31.00 / 0.8500 (1/2) |")
  # Criteria: gap, |dt| and saved are means over images; ES-WMV fired in 1 of 2 seeds.
  assert row_of("DIP", "ES-WMV", "0.50", "100", "100", "50%")
  # Ensemble gain over one seed: DIP fixed (29 - 28.5 + 31 - 30.5) / 2 = +0.50.
  assert row_of("DIP, 2 seeds", "fixed budget", "30.00 (+0.50)", "+0.50", "+0.1000")
  # Ablation over stages, on the one image both stage counts have (a.png).
  assert "### Ablation: stages" in page
  assert row_of("SetA σ=25", "2", "1", "27.00", "28.00")
  assert row_of("SetA σ=25", "4", "1", "26.00", "27.00")
  assert page.count("python grid.py x") >= 4 and "numpy (x86)" in page
  # Cost: 2 DIP configs of 2 seeds x 1000 iterations at 100 s each: 50 s per 1000 fit-its.
  assert row_of("DIP", "2", "4", "4,000", "0.06", "100", "50.0")
  assert row_of("(C)BM3D", "1", "–", "–", "0.00", "2", "–")
  assert row_of("all", "6", "", "", "**0.14**")
  assert "## Figures" not in page  # the fixture has no arrays
  assert "## Per image" not in page  # a page with ablations compares variants, not images


def test_summary_per_image_table(tmp_path):
  rows = [_fit_row("a.png", "dip", [28.0, 29.0], [0.8, 0.8], 29.0),
          _fit_row("b.png", "dip", [30.0, 31.0], [0.8, 0.8], 31.0),
          _fit_row("a.png", "staged", [27.0, 27.0], [0.7, 0.7], 27.0, stages=2),
          dict(key="bm3d-a", config=dict(image="a.png", set="SetA", crop=128, sigma=25.0,
                                         method="bm3d", noise_seed=0),
               argv="python grid.py --methods=bm3d", device=dict(backend="numpy", kind="x86"),
               noisy=dict(psnr=20.0, ssim=0.3), output=dict(psnr=31.0, ssim=0.85), wall_s=2.0)]
  results = tmp_path / "results.jsonl"
  results.write_text("".join(json.dumps(r) + "\n" for r in rows))
  page = summary.summarize([str(results)], str(tmp_path / "s.md"), str(tmp_path / "fig"), "T")
  table = page[page.index("## Per image"):page.index("## Cost")].splitlines()
  assert "| set σ | image | method | noisy | ES-WMV | ensemble, ES-WMV | (C)BM3D |" in table
  # Image by image, methods in order; ES-WMV is the fixture's psnr + 1; no BM3D row for b.png.
  assert [l for l in table if l.startswith("| SetA")] == [
      "| SetA σ=25 | a.png | DIP | 20.00 | 29.50 | 30.00 | 31.00 |",
      "| SetA σ=25 | a.png | staged | 20.00 | 28.00 | 28.00 | 31.00 |",
      "| SetA σ=25 | b.png | DIP | 20.00 | 31.50 | 32.00 | — |"]


def test_figure_stop_by_preference():
  assert summary._pick(["fixed", "es_wmv", "discrepancy"], "staged,discrepancy") == "discrepancy"
  assert summary._pick(["fixed", "staged", "discrepancy"], "staged,discrepancy") == "staged"
  assert summary._pick(["oracle", "fixed"], "staged") == "fixed"


def test_discrepancy_stop_with_sigma_off(tmp_path):
  """The after-the-fact discrepancy stops on a trace with a known answer: the residual falls as
  sigma^2 (2.005 - t / 50) to a floor of 0.85 sigma^2, so a level f^2 sigma^2 is first reached
  at t = ceil(50 (2.005 - f^2)) (never for f = 0.9); the PSNR peaks at t = 51."""
  sigma, t = 25 / 255, np.arange(100)
  rng = np.random.default_rng(0)
  noisy = np.round(255 * np.clip(0.5 + sigma * rng.standard_normal((64, 64, 1)), 0, 1))
  residual = sigma**2 * np.maximum(2.005 - t / 50, 0.85)
  path = tmp_path / "a.npz"
  np.savez(path, noisy=noisy.astype(np.uint8),
           curve_psnr_obs_ema=(-10 * np.log10(residual))[None].astype(np.float32),
           curve_psnr_clean_ema=(30 - 0.01 * np.abs(t - 51))[None].astype(np.float32),
           oracle_step=np.array([51]), oracle_psnr=np.array([30.0], np.float32))
  row = _fit_row("a.png", "dip", [30.0], [0.8], 30.0)
  row["config"].update(seeds=1, criteria=["fixed", "discrepancy"])
  row["arrays"] = str(path)
  lines = summary.sigma_table([row]).splitlines()
  cells = {l.split(" | ")[3]: l.split(" | ")[4:] for l in lines[2:]}
  assert {l.split(" | ")[2] for l in lines[2:]} == {"discrepancy"}
  assert cells["1.00 σ"] == ["30.00", "0.00", "0", "0% |"]  # t = 51: the peak
  assert cells["1.05 σ"] == ["29.95", "0.05", "5", "0% |"]  # t = 46
  assert cells["1.10 σ"] == ["29.89", "0.11", "11", "0% |"]  # t = 40
  assert cells["0.95 σ"] == ["29.95", "0.05", "5", "0% |"]  # t = 56
  assert cells["0.90 σ"] == ["29.52", "0.48", "48", "100% |"]  # never: the last iteration
  assert any(k.startswith("estimated (") for k in cells)


def test_staged_stop_with_sigma_off(tmp_path):
  """The after-the-fact staged stops on a trace with a known answer. y stays > 4 sigma from 0
  and 1 (its clipped noise moments are sigma's), so a factor f adds 2 lambda (f^2 - 1) sigma^2
  to the estimate (plus a constant). With the estimate sigma^2 (t - 50)^2 / 2500 and lambda =
  t / 100 over the last stage (t >= 10), its minimum moves to t = 50 - 25 (f^2 - 1), rounded:
  45 at 1.1 sigma, 55 at 0.9 sigma; the PSNR peaks at t = 50."""
  sigma, t = 25 / 255, np.arange(100)
  rng = np.random.default_rng(0)
  noisy = np.round(255 * (0.5 + 0.2 * sigma * rng.standard_normal((64, 64, 1))))
  path = tmp_path / "a.npz"
  np.savez(path, noisy=noisy.astype(np.uint8),
           curve_mse_est_ema=(sigma**2 * (t - 50) ** 2 / 2500)[None].astype(np.float32),
           curve_noise_fit_ema=(t / 100)[None].astype(np.float32),
           curve_stage=(t >= 10)[None].astype(np.int32),
           curve_psnr_clean_ema=(30 - 0.01 * np.abs(t - 50))[None].astype(np.float32),
           oracle_step=np.array([50]), oracle_psnr=np.array([30.0], np.float32))
  row = _fit_row("a.png", "staged", [30.0], [0.8], 30.0, schedule="linear", stages=2,
                 t_max=30, fresh_eps=False)
  row["config"].update(seeds=1, criteria=["fixed", "staged"])
  row["arrays"] = str(path)
  lines = summary.sigma_table([row]).splitlines()
  assert {l.split(" | ")[2] for l in lines[2:]} == {"staged (probe SURE)"}
  cells = {l.split(" | ")[3]: l.split(" | ")[4:] for l in lines[2:]}
  assert cells["1.00 σ"] == ["30.00", "0.00", "0", "— |"]
  assert cells["1.10 σ"] == ["29.95", "0.05", "5", "— |"]
  assert cells["0.90 σ"] == ["29.95", "0.05", "5", "— |"]
  assert cells["1.05 σ"] == ["29.97", "0.03", "3", "— |"]  # 50 - 2.56: t = 47


def test_arrays_go_under_runs_for_rows_in_the_repository(tmp_path, monkeypatch):
  assert common.arrays_dir(os.path.join(ROOT, "docs/results/stopping/rows/x.jsonl")) == (
      os.path.join(ROOT, "runs/arrays/stopping/rows/x"))
  assert common.arrays_dir(os.path.join(ROOT, "runs/grid/r.jsonl")) == (
      os.path.join(ROOT, "runs/grid/r_arrays"))
  assert common.arrays_dir(str(tmp_path / "r.jsonl")) == str(tmp_path / "r_arrays")
  # summary finds a row's .npz where its rows file says, else (rows from before the move) there.
  monkeypatch.setattr(common, "REPO", str(tmp_path))
  rows = tmp_path / "docs" / "results" / "x.jsonl"
  rows.parent.mkdir(parents=True)
  new, old = (tmp_path / "runs/arrays/x/a.npz", rows.parent / "x_arrays/b.npz")
  for path in (new, old):
    path.parent.mkdir(parents=True)
    np.savez(path, noisy=np.zeros(1))
  row = lambda key, arrays: dict(key=key, config=dict(method="bm3d"), noisy={}, arrays=arrays)
  rows.write_text("".join(json.dumps(r) + "\n" for r in (
      row("a", "x_arrays/a.npz"), row("b", "x_arrays/b.npz"), row("c", "x_arrays/c.npz"),
      row("d", os.path.relpath(new, rows.parent)))))
  found = [os.path.normpath(r["arrays"]) for r in summary.load_rows([str(rows)])]
  missing = rows.parent / "x_arrays/c.npz"  # no .npz anywhere: the figures pass it over
  assert found == [str(new), str(old), str(missing), str(new)]


def test_summary_figures_from_grid_rows(resumed, tmp_path):
  _, out, _, _, _ = resumed
  md = tmp_path / "summary.md"
  page = summary.summarize([out], str(md), str(tmp_path / "figures"), "tiny")
  links = [l[l.index("](") + 2:-1] for l in page.splitlines() if l.startswith("![")]
  assert len(links) == 3  # PSNR curves, per-stage PSNR, the image row
  for link in links:
    assert not os.path.isabs(link) and (tmp_path / link).stat().st_size > 0
  assert "### Ablation: t_max" in page and "## Ensembles" in page


def test_bad_grids_are_clear_errors(tmp_path):
  image = str(_write_images(tmp_path / "imgs", 1) / "im0.png")
  with pytest.raises(ValueError, match="--methods: unknown 'dpi'; valid methods are dip"):
    grid_spec.GridSpec(images=(image,), methods=("dip", "dpi"))
  with pytest.raises(ValueError, match="no .png/.jpg"):
    common.expand_images([str(tmp_path / "imgs"), str(tmp_path)])
  with pytest.raises(ValueError, match="no such file or folder"):
    common.expand_images([str(tmp_path / "missing")])
  with pytest.raises(ValueError, match="--t_max"):
    grid_spec.GridSpec(images=(image,), stages=(4,), t_max=(2,))
  with pytest.raises(ValueError, match="Unknown criterion"):
    grid_spec.GridSpec(images=(image,), criteria=("early",))
  with pytest.raises(ValueError, match="larger than"):
    common.load_clean(image, 128)
  (tmp_path / "empty").mkdir()
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "grid.py"),
                         f"--images={tmp_path / 'empty'}", "--cache_dir="],
                        capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f"grid.py: error: --images: no .png/.jpg/.jpeg/.tif/.tiff images in folder "
      f"{tmp_path / 'empty'}")


def test_two_processes_over_four_devices_equal_one_device(tmp_path):
  """A grid run by 2 processes x 2 CPU devices (jax.distributed, gloo; each config's seeds
  sharded over the 4 devices with shard_map, process 0 writing) writes the rows of a plain
  single-device run (the same grid run here), up to float rounding (there the 4 seeds are
  vmapped together)."""
  image = str(_write_images(tmp_path / "imgs", 1) / "im0.png")
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  args = [sys.executable, os.path.join(ROOT, "experiments", "grid.py"), f"--images={image}",
          "--crop=0", "--methods=staged", "--stages=2", "--t_max=10", "--widths=4",
          "--scales=1", "--seeds=4", "--iters=20", "--cache_dir=",
          "--criteria=fixed,oracle,staged"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_force_host_platform_device_count=2")
  multi = [subprocess.Popen(args + [f"--out={tmp_path / 'multi.jsonl'}",
                                    f"--coordinator=localhost:{port}", "--num_processes=2",
                                    f"--process_id={i}"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  spec = grid_spec.GridSpec(images=(image,), crop=0, methods=("staged",), stages=(2,),
                            t_max=(10,), widths=(4,), scales=1, seeds=4, iters=20,
                            criteria=("fixed", "oracle", "staged"))
  grid.run_grid(spec, str(tmp_path / "single.jsonl"))  # here, on this process's one device
  for proc in multi:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
  rows = [common.read_rows(str(tmp_path / f"{name}.jsonl")) for name in ("multi", "single")]
  assert [r["key"] for r in rows[0]] == [r["key"] for r in rows[1]] and len(rows[0]) == 1
  for a, b in zip(*rows):
    for name in a["config"]["criteria"]:
      assert a["criteria"][name]["stop"] == b["criteria"][name]["stop"], name
      np.testing.assert_allclose(a["criteria"][name]["psnr"], b["criteria"][name]["psnr"],
                                 atol=1e-2)
