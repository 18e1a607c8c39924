r"""Peak memory of a restoration against dipjax's estimate (``pipeline.memory_estimate``).

  python experiments/memory.py --out=docs/results/memory.jsonl

Each configuration (image size x network width x seeds) runs ``pipeline.restore`` for --iters
iterations (the default staged method, its stop) in a fresh process on a synthetic image and
appends a row with the process's peak RSS (``getrusage``) and the machine to --out (configs
already measured on this machine are skipped: the run resumes). It then prints, per row, the
estimate of the current model beside the measurement (also written to
<out without .jsonl>_<machine>.md), and with --fit the least-squares
coefficients of the model's form (``pipeline.MEMORY_MODEL``) over this machine's rows but the
--held_out sizes (which validate it).
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import resource
import subprocess
import sys

from absl import app
from absl import flags
import jax
import numpy as np
from scipy import optimize

import common
from dipjax import pipeline

_SIZES = flags.DEFINE_list("sizes", ["128", "256", "512"], "Image sizes (square).")
_WIDTHS = flags.DEFINE_list("widths", ["32", "128"], "Network widths.")
_SEEDS = flags.DEFINE_list("seeds", ["1"], "Fits per run.")
_NET = flags.DEFINE_string("net", "skip", "Network.")
_ITERS = flags.DEFINE_integer("iters", 20, "Iterations per run (peak memory is reached in the "
                              "first compiled call).")
_OUT = flags.DEFINE_string("out", "runs/memory.jsonl", "Rows (JSON lines, appended).")
_FIT = flags.DEFINE_bool("fit", False, "Print the model's least-squares coefficients.")
_HELD_OUT = flags.DEFINE_list("held_out", ["192", "384", "1536"], "Sizes --fit leaves out (they "
                               "validate the model).")
_MEASURE = flags.DEFINE_string("measure", None, "Internal: 'size,width,seeds' of one run.")


def _config(width: int, seeds: int) -> pipeline.RestoreConfig:
  return pipeline.RestoreConfig(width=width, seeds=seeds, net=_NET.value, iters=_ITERS.value)


def _image(size: int) -> np.ndarray:
  """A smooth synthetic colour image (size, size, 3) in [0, 1]."""
  u = np.linspace(0, 4 * np.pi, size, dtype=np.float32)
  x = 0.5 + 0.4 * np.sin(u[:, None, None] + u[None, :, None] * np.array([1, 0.7, 0.3]))
  return x.astype(np.float32)


def measure(size: int, width: int, seeds: int) -> dict:
  """One restoration in this process: its peak RSS (MiB) and settings."""
  config = _config(width, seeds)
  clean = _image(size)
  y = pipeline.degrade(config, clean, seed=0)
  pipeline.restore(config, y, key=jax.random.PRNGKey(0), chunk=10)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return dict(size=size, width=width, seeds=seeds, net=_NET.value, iters=_ITERS.value,
              peak_rss_mib=round(peak, 1))


def _run_child(size: int, width: int, seeds: int) -> dict:
  args = [sys.executable, os.path.abspath(__file__), f"--measure={size},{width},{seeds}",
          f"--net={_NET.value}", f"--iters={_ITERS.value}"]
  proc = subprocess.run(args, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"measuring {size}^2 width {width}: {proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
  lines = ["| size | width | seeds | net | peak RSS (MiB) | estimate (MiB) | error |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    est = pipeline.memory_estimate(_config(r["width"], r["seeds"]), (r["size"], r["size"], 3))
    est /= 2**20
    lines.append(f"| {r['size']}² | {r['width']} | {r['seeds']} | {r['net']} | "
                 f"{r['peak_rss_mib']:.0f} | {est:.0f} | {est / r['peak_rss_mib'] - 1:+.0%} |")
  return "\n".join(lines)


def _fit(rows: list[dict]) -> str:
  """Non-negative least squares of pipeline.MEMORY_MODEL's form over `rows`: peak = base +
  pixels * (per_pixel + width * (per_pixel_channel + (seeds - 1) *
  per_extra_seed_pixel_channel))."""
  a = []
  for r in rows:
    h, w = pipeline.network_size(_config(r["width"], r["seeds"]), (r["size"], r["size"]))
    pixels = h * w
    a.append([1.0, pixels, pixels * r["width"], pixels * r["width"] * (r["seeds"] - 1)])
  b = [r["peak_rss_mib"] * 2**20 for r in rows]
  coef, _ = optimize.nnls(np.array(a), np.array(b))
  names = ("base_bytes", "per_pixel_bytes", "per_pixel_channel_bytes",
           "per_extra_seed_pixel_channel_bytes")
  return ", ".join(f"{n}={c:.4g}" for n, c in zip(names, coef))


def main(argv: list[str]) -> None:
  del argv
  if _MEASURE.value:
    size, width, seeds = map(int, _MEASURE.value.split(","))
    print(json.dumps(measure(size, width, seeds)))
    return
  machine = common.machine_tag()
  with common.Results(_OUT.value) as results:
    here = [r for r in results.rows if r.get("machine") == machine and r["net"] == _NET.value
            and r["iters"] == _ITERS.value]
    have = {(r["size"], r["width"], r["seeds"]) for r in here}
    for size, width, seeds in itertools.product(*(map(int, f.value) for f in
                                                  (_SIZES, _WIDTHS, _SEEDS))):
      if (size, width, seeds) in have:
        continue
      row = dict(_run_child(size, width, seeds), machine=machine, host=common.host(),
                 date=datetime.date.today().isoformat())
      results.append(row)
      here.append(row)
      print(f"{size}² width {width} seeds {seeds}: {row['peak_rss_mib']:.0f} MiB", flush=True)
  table = _table(sorted(here, key=lambda r: (r["size"], r["width"], r["seeds"])))
  page = _OUT.value.removesuffix(".jsonl") + f"_{machine}.md"
  with open(page, "w") as f:
    f.write(f"# Peak memory against pipeline.memory_estimate, {machine}\n\n"
            f"`python experiments/memory.py` (rows: {os.path.basename(_OUT.value)}); "
            f"{_ITERS.value} iterations of the default staged method, compile included, in a "
            f"fresh process per row.\n\n{table}\n")
  print(table)
  if _FIT.value:
    held_out = set(map(int, _HELD_OUT.value))
    fitted = [r for r in here if r["size"] not in held_out]
    print(f"fitted to sizes {sorted({r['size'] for r in fitted})}:", _fit(fitted))


if __name__ == "__main__":
  app.run(main)
