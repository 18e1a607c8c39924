r"""Speed of a DIP fit: one jitted step in a Python loop against the scanned fit.

  python experiments/benchmark.py --quick       # skip net, 128x128, widths 32 and 128

For each size and width it reports compile time and ms per iteration of (a) `fit.train_step`
jitted once and called from a Python loop, (b) `fit.fit`, the same step inside `lax.scan`
(segments) inside `lax.scan` (stages), and their ratio b/a; and, when PyTorch is installed
(`pip install -e '.[torch]'`), (c) the original DIP network and loop in PyTorch eager
(experiments/torch_dip.py) in the same process, with dipjax's speed-up c/b. Results print as a
markdown table and go to --json_out. On XLA:CPU a naive scanned fit is ~16x slower than (a);
dipjax's conv layer keeps the ratio near 1. Also: the FLOP count per iteration (XLA's cost
analysis) and achieved GFLOP/s against a 2048² matmul timed in the same run, and the aggregate
speed of N fits in one `fit.fit_many` call against N fits one after the other (--fits,
--fits_at).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from dipjax import fit
from dipjax import inputs
from dipjax import nets
from dipjax import operators

_QUICK = flags.DEFINE_bool("quick", False, "128x128, widths 32 and 128 only.")
_SIZES = flags.DEFINE_list("sizes", ["128", "256"], "Image sizes (square).")
_WIDTHS = flags.DEFINE_list("widths", ["32", "64", "128"], "Skip-net widths.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed iterations per measurement.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats; the median is reported.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the results as JSON here.")
_FITS = flags.DEFINE_list("fits", ["1", "2", "4", "8"],
                          "Many-fits counts N (the first must be 1, the reference).")
_FITS_AT = flags.DEFINE_list("fits_at", ["64:32"], "size:width pairs of the many-fits table.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time the PyTorch original when torch is installed.")


def _median_seconds(run, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _setup(size: int, width: int, iters: int):
  """The skip net, config and a denoising problem of one benchmark configuration."""
  net = nets.make("skip", width=width, scales=5)
  config = fit.FitConfig(segment=iters // 2)
  y = jax.random.uniform(jax.random.PRNGKey(0), (size, size, 3))
  problem = fit.plain_problem(inputs.dip_noise(jax.random.PRNGKey(1), size, size), y,
                              operators.identity(), iters, clean=y)
  return net, config, problem


def _time_scanned(states, problem, iters, net, config, repeats) -> tuple[float, float]:
  """(compile seconds, seconds per call) of `fit_many`'s core for these stacked states."""
  t0 = time.perf_counter()
  scanned = fit.compile_many(states, problem, iters, net=net, config=config)
  compile_s = time.perf_counter() - t0

  def scan():
    nonlocal states
    states, trace = scanned(states, problem)
    jax.block_until_ready(trace)

  scan()  # warm-up
  return compile_s, _median_seconds(scan, repeats)


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Achieved fp32 GFLOP/s of an n x n matmul: this machine's practical peak."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
  mm = jax.jit(jnp.dot)
  jax.block_until_ready(mm(a, a))
  return 2 * n**3 / _median_seconds(lambda: jax.block_until_ready(mm(a, a)), repeats) / 1e9


def bench_one(size: int, width: int, iters: int, repeats: int) -> dict:
  """Compile time, FLOP count and ms/it of the Python-loop step and of the scanned fit."""
  net, config, problem = _setup(size, width, iters)
  state = fit.init_state(jax.random.PRNGKey(2), net, problem, config)

  step = jax.jit(functools.partial(fit.train_step, net=net, config=config), donate_argnums=0)
  t0 = time.perf_counter()
  compiled_step = step.lower(state, problem).compile()
  step_compile = time.perf_counter() - t0
  cost = compiled_step.cost_analysis()
  flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])

  def loop():
    nonlocal state
    for _ in range(iters):
      state, record = compiled_step(state, problem)
    jax.block_until_ready(record)

  loop()  # warm-up
  step_ms = _median_seconds(loop, repeats) / iters * 1e3
  scan_compile, scan_s = _time_scanned(fit.stack([state]), problem, iters, net, config, repeats)
  scan_ms = scan_s / iters * 1e3
  return dict(size=size, width=width, step_ms=step_ms, scan_ms=scan_ms,
              ratio=scan_ms / step_ms, step_compile_s=step_compile, scan_compile_s=scan_compile,
              gflop_per_it=flops / 1e9, gflops=flops / scan_ms / 1e6)


def bench_many(size: int, width: int, fits: list[int], iters: int, repeats: int) -> list[dict]:
  """Aggregate speed of N fits in one `fit_many` call against N one after the other."""
  net, config, problem = _setup(size, width, iters)
  rows, single_ms = [], None
  for n in fits:
    keys = jax.random.split(jax.random.PRNGKey(3), n)
    states = fit.init_many(keys, net, problem, config)
    compile_s, seconds = _time_scanned(states, problem, iters, net, config, repeats)
    ms = seconds / iters * 1e3  # one iteration of all n fits
    single_ms = ms if n == 1 else single_ms
    rows.append(dict(size=size, width=width, fits=n, ms_per_step_of_all=ms, compile_s=compile_s,
                     aggregate_speedup=None if single_ms is None else n * single_ms / ms))
  return rows


def _torch_dip():
  """experiments/torch_dip.py, or None when PyTorch is not installed (or --notorch)."""
  if not _TORCH.value:
    return None
  try:
    import torch_dip  # needs torch
  except ImportError:
    return None
  return torch_dip


def _host() -> str:
  """CPU model and core count of this machine."""
  model = platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), model)
  return f"{model}, {os.cpu_count()} cores"


def main(argv):
  del argv
  sizes = [128] if _QUICK.value else [int(s) for s in _SIZES.value]
  widths = [32, 128] if _QUICK.value else [int(w) for w in _WIDTHS.value]
  device = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({_host()})"
  torch_dip = _torch_dip()
  rows = []
  for size in sizes:
    for width in widths:
      r = bench_one(size, width, _ITERS.value, _REPEATS.value)
      if torch_dip is not None:
        t = torch_dip.time_fit(size, width, _ITERS.value)
        r.update(torch_ms=t["ms_per_it"], torch_version=t["torch"], torch_threads=t["threads"],
                 speedup_vs_torch=t["ms_per_it"] / r["scan_ms"])
      rows.append(r)
      print(f"{size}x{size} width {width}: step {r['step_ms']:.1f} ms/it, scan "
            f"{r['scan_ms']:.1f} ms/it, ratio {r['ratio']:.2f}"
            + (f", torch {r['torch_ms']:.1f} ms/it" if "torch_ms" in r else ""), flush=True)
  print(f"\njax {jax.__version__}, {device}; skip net 5 scales, skip 4, 32-ch input, Adam, "
        f"jitter, EMA; median of {_REPEATS.value} x {_ITERS.value} iterations\n")
  torch_cols = torch_dip is not None
  print("| size | width | (a) jitted step, Python loop | (b) scanned fit | b / a | "
        "compile (a) | compile (b) |" + (" (c) PyTorch eager | c / b |" if torch_cols else ""))
  print("|---|---|---|---|---|---|---|" + ("---|---|" if torch_cols else ""))
  for r in rows:
    print(f"| {r['size']}² | {r['width']} | {r['step_ms']:.0f} ms/it | {r['scan_ms']:.0f} ms/it | "
          f"{r['ratio']:.2f} | {r['step_compile_s']:.1f} s | {r['scan_compile_s']:.1f} s |"
          + (f" {r['torch_ms']:.0f} ms/it | {r['speedup_vs_torch']:.2f}× |" if torch_cols else ""))
  fits = [int(n) for n in _FITS.value]
  many = []
  for pair in _FITS_AT.value:
    size, width = (int(v) for v in pair.split(":"))
    many += bench_many(size, width, fits, _ITERS.value, _REPEATS.value)
  peak = matmul_gflops()
  print(f"\nfp32 2048² matmul: {peak:.0f} GFLOP/s. FLOP per iteration from XLA's cost analysis "
        "of the jitted step.\n")
  print("| size | width | GFLOP / it | scanned fit GFLOP/s | % of matmul peak |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['size']}² | {r['width']} | {r['gflop_per_it']:.2f} | {r['gflops']:.1f} | "
          f"{100 * r['gflops'] / peak:.0f}% |")
  print("\n| size | width | fits N | ms per step of all N | "
        "aggregate speed vs N one after the other | compile |")
  print("|---|---|---|---|---|---|")
  for r in many:
    speedup = "—" if r["fits"] == 1 else f"{r['aggregate_speedup']:.2f}×"
    print(f"| {r['size']}² | {r['width']} | {r['fits']} | {r['ms_per_step_of_all']:.1f} | "
          f"{speedup} | {r['compile_s']:.1f} s |")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(dict(device=device, jax=jax.__version__, matmul_gflops=peak, rows=rows,
                     many_fits=many), f, indent=2)


if __name__ == "__main__":
  app.run(main)
