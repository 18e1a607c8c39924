r"""Speed of DIP fits: dipjax's scanned fit against the PyTorch original, many fits at once.

  python experiments/benchmark.py --quick --out_dir=docs/results

One result file pair per machine: the run is appended to
<out_dir>/benchmark_<machine>.json (a list of runs, each with its date, device, flags and rows)
and <out_dir>/benchmark_<machine>.md shows every run of that machine, newest first. The machine
tag is the accelerator's kind, or on CPU `cpu_` and the widest x86 vector ISA (cpu_avx512,
cpu_avx2), since the virtual CPUs here report only "AMD EPYC" as their model.

Per configuration (skip net, 5 scales, 4 skip channels, 32-channel noise input, Adam, jitter,
EMA, divergence roll-back, per-iteration traces):
* ms/it of `fit.fit`'s compiled scan (one fit), its compile time and XLA's memory analysis;
* with --step_loop, the same `fit.train_step` jitted once and called from a Python loop;
* when PyTorch is installed (`pip install -e '.[torch]'`), the original DIP network and loop in
  PyTorch (experiments/torch_dip.py) in each of --torch_variants (eager, channels_last, bf16
  autocast, torch.compile), timed in rounds alternating with dipjax's, so slow drifts of the
  machine hit both sides alike; dipjax is compared with eager and with the fastest variant;
* the analytic FLOP count of the network's convolutions (per layer in the JSON; training =
  3 x forward: forward, input gradient, weight gradient, as direct convolutions) and the
  achieved direct-convolution-equivalent GFLOP/s against a 2048² matmul timed in the same run.
Many fits (--fits at --fits_at): N fits in one `fit.fit_many` call, lowered one after the other
(batch=1) and vmapped (batch=N), aggregate speed against N single fits. Also the process's peak
RSS (CPU) or the device's peak memory (GPU). Results print as markdown and go to --out_dir.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Callable

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import common
from dipjax import fit
from dipjax import layers
from dipjax import pipeline

_QUICK = flags.DEFINE_bool(
    "quick", False, "The performance issue's configurations only: 128²/32, 128²/128, 256²/64 "
    "(fp32), 128²/32 in bf16, many fits at 64²/32.")
_SIZES = flags.DEFINE_list("sizes", ["64", "128", "256"], "Image sizes (square).")
_WIDTHS = flags.DEFINE_list("widths", ["32", "64", "128"], "Skip-net widths.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
_ITERS = flags.DEFINE_integer(
    "iters", 50, "Iterations per timed run (one compiled call). A call has a fixed cost (its XLA "
    "buffers are allocated afresh); restore.py runs --log_every = 100 iterations per call.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs (alternating with PyTorch); median.")
_STEP_LOOP = flags.DEFINE_bool("step_loop", False, "Also time the jitted step in a Python loop.")
_FITS = flags.DEFINE_list("fits", ["1", "2", "4", "8"],
                          "Many-fits counts N (the first must be 1, the reference).")
_FITS_AT = flags.DEFINE_list("fits_at", ["64:32", "128:32", "128:128"],
                             "size:width pairs of the many-fits table.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time the PyTorch original when installed.")
_TORCH_VARIANTS = flags.DEFINE_list(
    "torch_variants", ["eager", "channels_last", "bf16", "compile"],
    "PyTorch variants timed (experiments/torch_dip.py VARIANTS): eager, channels_last, bf16 "
    "(autocast), compile (torch.compile); dipjax is compared with the fastest.")
_LAYERS = flags.DEFINE_list(
    "layers", ["16:128:128", "32:128:128", "64:36:32", "128:36:32", "128:64:64", "128:132:128",
               "256:68:64"],
    "size:C_in:C_out of the 3x3 stride-1 layers timed with each convolution lowering.")
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "Append this run to <out_dir>/benchmark_<machine>.json (a list of runs) and "
    "rewrite <out_dir>/benchmark_<machine>.md (every run of the machine, newest first).")
_MACHINE = flags.DEFINE_string(
    "machine", None, "The machine tag of the result files; default: the accelerator's kind, or "
    "cpu_avx512 / cpu_avx2 / cpu_<arch> from /proc/cpuinfo.")
_GRID_FLAGS = ("sizes", "widths", "dtypes", "fits", "fits_at", "layers")

_QUICK_CONFIGS = [(128, 32, "float32"), (128, 128, "float32"), (256, 64, "float32"),
                  (128, 32, "bfloat16")]
_IN_CHANNELS = 32


def _setup(size: int, width: int, iters: int, dtype: str = "float32"):
  """The skip net, fit settings and denoising problem of one benchmark configuration, built by
  dipjax.pipeline (a uniform random image as observation and ground truth)."""
  config = pipeline.RestoreConfig(method="dip", width=width, scales=5, dtype=dtype, iters=iters,
                                  stop=())
  y = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (size, size, 3)))
  problem = pipeline.build_problem(jax.random.PRNGKey(1), config,
                                   pipeline.make_frame(config, y, y), sigma=0.0)
  return pipeline.network(config, 3), pipeline.fit_config(config, iters), problem


def conv_layers(net: nn.Module, size: int, in_channels: int = _IN_CHANNELS) -> list[dict]:
  """Every convolution of `net` on a (1, size, size, in_channels) input, with its direct
  convolution's forward FLOP count (2 x MACs) and fp32 bytes (input, output, kernel)."""
  rows = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if isinstance(module, layers.Conv) and context.method_name == "__call__":
      (_, h, w, cin), (_, ho, wo, cout), k = args[0].shape, out.shape, module.kernel_size
      rows.append(dict(layer="/".join(module.path), input=f"{h}x{w}x{cin}",
                       output=f"{ho}x{wo}x{cout}", kernel=k, stride=module.stride,
                       flop=2 * ho * wo * k * k * cin * cout,
                       bytes=4 * (h * w * cin + ho * wo * cout + k * k * cin * cout)))
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, in_channels)))
  return rows


def _median_ms(times: list[float], iters: int) -> float:
  return float(np.median(times)) / iters * 1e3


def _seconds(call: Callable[[], object], repeats: int) -> list[float]:
  """Wall seconds of `repeats` calls of `call` (which blocks until its work is done), after one
  warm-up call."""
  call()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return times


def _compile_fits(n: int, batch: int, net, config, problem, iters: int):
  """(compiled run, states, compile seconds, XLA temp+argument+output bytes) for n fits."""
  states = fit.init_many(jax.random.split(jax.random.PRNGKey(3), n), net, problem, config)
  t0 = time.perf_counter()
  run = fit.compile_many(states, problem, iters, net=net, config=config, batch=batch)
  compile_s = time.perf_counter() - t0
  mem = run.memory_analysis()
  xla_bytes = None if mem is None else (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                        + mem.output_size_in_bytes - mem.alias_size_in_bytes)
  return run, states, compile_s, xla_bytes


class _Timer:
  """Times repeated calls of a compiled fit, carrying (and donating) the states."""

  def __init__(self, run, states, problem):
    self.run, self.states, self.problem, self.times = run, states, problem, []
    self()  # warm-up

  def __call__(self):
    t0 = time.perf_counter()
    self.states, trace = self.run(self.states, self.problem)
    jax.block_until_ready(trace)
    self.times.append(time.perf_counter() - t0)

  def measured(self) -> list[float]:
    return self.times[1:]


def bench_one(size: int, width: int, dtype: str, iters: int, repeats: int,
              torch_dip) -> dict:
  """One fit: scanned ms/it (alternating with PyTorch when given), compile time, FLOPs."""
  net, config, problem = _setup(size, width, iters, dtype)
  run, states, compile_s, xla_bytes = _compile_fits(1, 1, net, config, problem, iters)
  jax_timer = _Timer(run, states, problem)
  torch_steps, torch_failed = {}, {}
  if torch_dip is not None and dtype == "float32":
    for variant in _TORCH_VARIANTS.value:
      try:  # e.g. torch.compile without a C compiler: that variant only is left out
        step, _ = torch_dip.make_step(size, width, variant=variant)
        for _ in range(2):  # warm-up (torch.compile compiles here)
          step()
      except Exception as e:  # pylint: disable=broad-except
        torch_failed[variant] = f"{type(e).__name__}: {str(e)[:200]}"
        continue
      torch_steps[variant] = step
  torch_times = {variant: [] for variant in torch_steps}
  for _ in range(repeats):
    jax_timer()
    for variant, step in torch_steps.items():
      t0 = time.perf_counter()
      for _ in range(iters):
        step()
      torch_times[variant].append(time.perf_counter() - t0)
  per_layer = conv_layers(net, size)
  train_flop = 3 * sum(r["flop"] for r in per_layer)
  scan_ms = _median_ms(jax_timer.measured(), iters)
  row = dict(size=size, width=width, dtype=dtype, scan_ms=scan_ms, it_per_s=1e3 / scan_ms,
             compile_s=compile_s, xla_bytes=xla_bytes, train_gflop=train_flop / 1e9,
             gflops=train_flop / scan_ms / 1e6, layers=per_layer,
             scan_ms_runs=[t / iters * 1e3 for t in jax_timer.measured()])
  if torch_times:
    torch_ms = {v: _median_ms(t, iters) for v, t in torch_times.items()}
    best = min(torch_ms, key=torch_ms.get)
    row.update(torch_variants_ms=torch_ms, best_torch=best,
               speedup_vs_best_torch=torch_ms[best] / scan_ms,
               torch_ms_runs={v: [x / iters * 1e3 for x in t] for v, t in torch_times.items()})
    if "eager" in torch_ms:
      row.update(torch_ms=torch_ms["eager"], speedup_vs_torch=torch_ms["eager"] / scan_ms)
  if torch_failed:
    row["torch_failed"] = torch_failed
  if _STEP_LOOP.value:
    row.update(_bench_step_loop(net, config, problem, iters, repeats))
  return row


def _bench_step_loop(net, config, problem, iters, repeats) -> dict:
  """The same step jitted once and called from a Python loop (XLA:CPU's loop-trap reference)."""
  state = fit.init_state(jax.random.PRNGKey(2), net, problem, config)
  step = jax.jit(lambda s, p: fit.train_step(s, p, net=net, config=config), donate_argnums=0)
  compiled = step.lower(state, problem).compile()

  def loop():
    nonlocal state
    for _ in range(iters):
      state, record = compiled(state, problem)
    jax.block_until_ready(record)

  return dict(step_ms=_median_ms(_seconds(loop, repeats), iters))


def bench_many(size: int, width: int, fits: list[int], iters: int, repeats: int) -> list[dict]:
  """Aggregate speed of N fits in one `fit_many` call, both lowerings, against N single fits."""
  net, config, problem = _setup(size, width, iters)
  timers = {}
  for n in fits:
    for batch in sorted({1, n}):
      run, states, compile_s, xla_bytes = _compile_fits(n, batch, net, config, problem, iters)
      timers[n, batch] = (_Timer(run, states, problem), compile_s, xla_bytes)
  for _ in range(repeats):  # Rounds over all variants, so drifts hit them alike.
    for timer, _, _ in timers.values():
      timer()
  single_ms = _median_ms(timers[1, 1][0].measured(), iters)
  rows = []
  for (n, batch), (timer, compile_s, xla_bytes) in timers.items():
    ms = _median_ms(timer.measured(), iters)  # one iteration of all n fits
    rows.append(dict(size=size, width=width, fits=n, batch=batch, ms_per_step_of_all=ms,
                     compile_s=compile_s, xla_bytes=xla_bytes,
                     aggregate_speedup=n * single_ms / ms,
                     default=batch == fit.default_batch(n, size * size)))
  return rows


_LOWERINGS = {
    "XLA conv": lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")),
    "im2col GEMM": lambda x, w: layers._gemm_conv(x, w, 1, x.shape[1] - 2, x.shape[2] - 2),
    "Winograd F(2x2,3x3)": lambda x, w: layers.winograd_conv3x3(x, w, 2),
    "Winograd F(4x4,3x3)": lambda x, w: layers.winograd_conv3x3(x, w, 4),
}


def bench_layer(size: int, cin: int, cout: int, iters: int, repeats: int) -> dict:
  """ms of one 3x3 stride-1 conv's forward + both gradients inside a `lax.scan`, per lowering
  (what a scanned fit runs; XLA's own conv gradient is the loop trap)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (1, size + 2, size + 2, cin))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, cin, cout)) * 0.01
  row = dict(size=size, cin=cin, cout=cout, flop=3 * 2 * size * size * 9 * cin * cout)
  for name, conv in _LOWERINGS.items():
    def body(carry, _, conv=conv):
      x, w = carry
      y, vjp = jax.vjp(conv, x, w)
      dx, dw = vjp(y)
      return (x + 1e-6 * dx, w - 1e-6 * dw), None
    scanned = jax.jit(lambda x, w, body=body: jax.lax.scan(body, (x, w), length=iters)[0])
    row[name] = _median_ms(_seconds(lambda: jax.block_until_ready(scanned(x, w)), repeats),
                           iters)
  m = layers.winograd_tile(x.shape, w.shape, 1)
  row["dipjax uses"] = f"Winograd F({m}x{m},3x3)" if m else "im2col GEMM"
  return row


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Achieved fp32 GFLOP/s of an n x n matmul: this machine's practical peak."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
  mm = jax.jit(jnp.dot)
  times = _seconds(lambda: jax.block_until_ready(mm(a, a)), repeats)
  return 2 * n**3 / float(np.median(times)) / 1e9


def memory_gbps(mbytes: int = 256, repeats: int = 5) -> float:
  """Achieved GB/s of a streaming x + 1 over `mbytes` (read and write counted)."""
  x = jnp.zeros((mbytes * 2**20 // 4,), jnp.float32)
  inc = jax.jit(lambda x: x + 1, donate_argnums=0)

  def stream():
    nonlocal x
    x = jax.block_until_ready(inc(x))

  times = _seconds(stream, repeats)
  return 2 * x.nbytes / float(np.median(times)) / 1e9


def _peak_memory() -> str:
  """The device's peak memory on accelerators, else this process's peak RSS."""
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    return f"device peak {stats['peak_bytes_in_use'] / 2**30:.2f} GiB"
  return f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def _torch_dip():
  """experiments/torch_dip.py, or None when PyTorch is not installed (or --notorch)."""
  if not _TORCH.value:
    return None
  try:
    import torch_dip  # needs torch
  except ImportError:
    return None
  return torch_dip


def _grid() -> str:
  """Which grid a run measured: quick, full (no grid flag given) or custom."""
  if _QUICK.value:
    return "quick"
  return "custom" if any(flags.FLAGS[n].present for n in _GRID_FLAGS) else "full"


def _command_flags(args: list[str]) -> str:
  """The command line's flags without the output paths."""
  kept, skip = [], False
  for a in args:
    if skip:
      skip = False
    elif a.startswith("--out_dir"):
      skip = "=" not in a
    else:
      kept.append(a)
  return " ".join(kept)


def _mib(b: int | None) -> str:
  return "—" if b is None else f"{b / 2**20:.0f} MiB"


def markdown(result: dict) -> str:
  """The benchmark's markdown tables."""
  rows, many = result["rows"], result["many_fits"]
  torch = any("torch_variants_ms" in r or "torch_ms" in r for r in rows)
  loop = any("step_ms" in r for r in rows)
  out = [f"`python experiments/benchmark.py {result['flags']}` — {result['date']}, "
         f"{result['device']}, jax {result['jax']}"
         + (f", torch {result['torch']}" if result.get("torch") else "")
         + f"; {result['iters']} iterations per timed run, median of {result['repeats']} runs"
         + (" alternating with PyTorch" if torch else "") + ".", "",
         f"Measured peaks in the same run: fp32 2048² matmul {result['matmul_gflops']:.0f} "
         f"GFLOP/s; streaming memory {result['memory_gbps']:.1f} GB/s. {result['peak_memory']}.",
         "",
         "| size | width | dtype | dipjax scanned fit | it/s | compile | XLA memory |"
         + (" step in a Python loop |" if loop else "")
         + (" PyTorch eager | best PyTorch variant | dipjax vs eager | dipjax vs best |"
            if torch else "")
         + " GFLOP / it (direct conv) | GFLOP/s | % of matmul peak |",
         "|---|---|---|---|---|---|---|" + ("---|" if loop else "") + ("---|" * 4 if torch else "")
         + "---|---|---|"]
  for r in rows:
    cells = [f"{r['size']}²", str(r["width"]), r["dtype"], f"{r['scan_ms']:.1f} ms/it",
             f"{r['it_per_s']:.1f}", f"{r['compile_s']:.1f} s", _mib(r["xla_bytes"])]
    if loop:
      cells.append(f"{r['step_ms']:.1f} ms/it" if "step_ms" in r else "—")
    if torch:
      cells += _torch_cells(r)
    cells += [f"{r['train_gflop']:.2f}", f"{r['gflops']:.0f}",
              f"{100 * r['gflops'] / result['matmul_gflops']:.0f}%"]
    out.append("| " + " | ".join(cells) + " |")
  if result["layers"]:
    names = list(_LOWERINGS)
    out += ["", "One 3x3 stride-1 convolution, forward + input and weight gradients inside a "
            "`lax.scan` (3 iterations, median of 3), ms per iteration:", "",
            "| output | C_in → C_out | GFLOP (direct) | " + " | ".join(names)
            + " | dipjax uses |", "|---|---|---|" + "---|" * len(names) + "---|"]
    for r in result["layers"]:
      out.append(f"| {r['size']}² | {r['cin']} → {r['cout']} | {r['flop'] / 1e9:.2f} | "
                 + " | ".join(f"{r[n]:.1f}" for n in names) + f" | {r['dipjax uses']} |")
  if many:
    out += ["", "| size | width | fits N | lowering | ms per step of all N | aggregate speed vs "
            "N single fits | compile | XLA memory |", "|---|---|---|---|---|---|---|---|"]
    for r in many:
      lowering = ("single fit" if r["fits"] == 1 else
                  "one after the other" if r["batch"] == 1 else f"vmapped ({r['batch']})")
      lowering += " (default)" if r["default"] and r["fits"] > 1 else ""
      out.append(f"| {r['size']}² | {r['width']} | {r['fits']} | {lowering} | "
                 f"{r['ms_per_step_of_all']:.1f} | {r['aggregate_speedup']:.2f}× | "
                 f"{r['compile_s']:.1f} s | {_mib(r['xla_bytes'])} |")
  return "\n".join(out) + "\n"


def _torch_cells(r: dict) -> list[str]:
  """PyTorch eager, the fastest variant, dipjax's speed-up over each (runs before the variants
  were timed hold eager only)."""
  eager = (f"{r['torch_ms']:.1f} ms/it", f"{r['speedup_vs_torch']:.2f}×") if "torch_ms" in r \
      else ("—", "—")
  if "best_torch" not in r:
    return [eager[0], "—", eager[1], "—"]
  best = r["best_torch"]
  others = ", ".join(f"{v} {ms:.1f}" for v, ms in r["torch_variants_ms"].items() if v != best)
  return [eager[0], f"{best} {r['torch_variants_ms'][best]:.1f} ms/it ({others})", eager[1],
          f"**{r['speedup_vs_best_torch']:.2f}×**"]


def machine_page(runs: list[dict], machine: str) -> str:
  """Every run of one machine as markdown, newest first."""
  out = [f"# Benchmark runs on `{machine}`", "",
         "Written by `experiments/benchmark.py --out_dir=...`, one section per run, newest first; "
         "the JSON beside this page holds the same runs with per-layer FLOP counts.", ""]
  for run in sorted(runs, key=lambda r: r["date"], reverse=True):
    out += [f"## {run['date']} — {run.get('grid', 'quick')}", "", markdown(run)]
  return "\n".join(out)


def _load_runs(path: str) -> list[dict]:
  """The runs already in a machine's JSON file (a list; a single run's dict is read as one)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    runs = json.load(f)
  return runs if isinstance(runs, list) else [runs]


def main(argv):
  del argv
  if _QUICK.value:
    configs = _QUICK_CONFIGS
    fits_at = ["64:32"]
  else:
    configs = [(int(s), int(w), d) for d in _DTYPES.value for s in _SIZES.value
               for w in _WIDTHS.value]
    fits_at = _FITS_AT.value
  fits = [int(n) for n in _FITS.value]
  if fits[0] != 1:
    raise app.UsageError("--fits must start with 1 (the reference)")
  torch_dip = _torch_dip()
  unknown = [v for v in _TORCH_VARIANTS.value if torch_dip and v not in torch_dip.VARIANTS]
  if unknown:
    raise app.UsageError(f"--torch_variants: unknown {unknown}; valid: "
                         f"{', '.join(torch_dip.VARIANTS)}")
  machine = _MACHINE.value or common.machine_tag()
  stem = os.path.join(_OUT_DIR.value, f"benchmark_{machine}") if _OUT_DIR.value else None
  if stem:
    os.makedirs(_OUT_DIR.value, exist_ok=True)
  runs = _load_runs(stem + ".json") if stem else []
  result = dict(
      flags=_command_flags(sys.argv[1:]), grid=_grid(), machine=machine,
      date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      device=f"{jax.devices()[0].device_kind} x{jax.device_count()} ({common.host()})",
      jax=jax.__version__, torch=None if torch_dip is None else torch_dip.torch.__version__,
      iters=_ITERS.value, repeats=_REPEATS.value, matmul_gflops=matmul_gflops(),
      memory_gbps=memory_gbps(), peak_memory="", rows=[], layers=[], many_fits=[])
  runs.append(result)

  def done(section: str, new: list[dict], line: str) -> None:
    """Records finished measurements and rewrites the outputs (a cut-off run keeps them).

    XLA:CPU keeps every compiled executable's code mapped until the caches are cleared; a
    full run compiles ~70 of them, past the kernel's limit on memory mappings."""
    result[section] += new
    result["peak_memory"] = _peak_memory()
    jax.clear_caches()
    print(line, flush=True)
    if stem:
      with open(stem + ".md", "w") as f:
        f.write(machine_page(runs, machine))
      with open(stem + ".json", "w") as f:
        json.dump(runs, f, indent=1)

  for size, width, dtype in configs:
    r = bench_one(size, width, dtype, _ITERS.value, _REPEATS.value, torch_dip)
    done("rows", [r], f"{size}² width {width} {dtype}: {r['scan_ms']:.1f} ms/it"
         + (f", PyTorch {r['best_torch']} {r['torch_variants_ms'][r['best_torch']]:.1f} ms/it "
            f"({r['speedup_vs_best_torch']:.2f}×)" if "best_torch" in r else ""))
  for spec in _LAYERS.value:
    size, cin, cout = (int(v) for v in spec.split(":"))
    r = bench_layer(size, cin, cout, iters=3, repeats=3)
    done("layers", [r], f"layer {spec}: " + ", ".join(f"{k} {r[k]:.1f} ms" for k in _LOWERINGS))
  for pair in fits_at:
    size, width = (int(v) for v in pair.split(":"))
    rows = bench_many(size, width, fits, _ITERS.value, _REPEATS.value)
    done("many_fits", rows, f"many fits {pair}: " + ", ".join(
        f"N={r['fits']} batch {r['batch']} {r['aggregate_speedup']:.2f}×" for r in rows))
  print("\n" + markdown(result))


if __name__ == "__main__":
  app.run(main)
