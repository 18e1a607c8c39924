r"""Kill -9 at a random moment, resume, compare: restore.py's checkpoints and grid.py's rows
against uninterrupted runs.

  python experiments/kill_resume.py --trials=20 --out=docs/results/kill_resume.jsonl
  python experiments/kill_resume.py --target=grid --trials=5 --out=docs/results/kill_resume.jsonl

restore: runs experiments/restore.py once uninterrupted (the reference), then per trial starts
the same command with --checkpoint_every into a fresh directory, sends it SIGKILL at a uniformly
random moment of the fit (after its first "compiled in" log line, within the reference's time
from that line to the end), and reruns it with --resume until it exits. A trial
passes when the kill left no restored.npy without its metrics.json (the last file moved in),
and the resumed run's restored.npy equals the reference's to --atol with the same stops.
grid: the same with a three-config grid.py run and its results file: rerun (it resumes) until
it exits; a trial passes when the rows and their arrays equal the reference's (timings aside).
One row per trial is appended to --out; the summary line counts the passes.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from absl import app
from absl import flags
import numpy as np

import common

_TRIALS = flags.DEFINE_integer("trials", 20, "Kill / resume trials.")
_OUT = flags.DEFINE_string("out", "runs/kill_resume.jsonl", "Rows (JSON lines, appended).")
_ATOL = flags.DEFINE_float("atol", 1e-6, "Largest allowed |resumed - reference| per pixel.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the kill moments.")
_TARGET = flags.DEFINE_enum("target", "restore", ["restore", "grid"], "What is killed.")
HERE = os.path.dirname(os.path.abspath(__file__))
ARGS = dict(
    restore=["--crop=64", "--width=8", "--iters=200", "--log_every=20", "--checkpoint_every=20",
             "--stop=staged,oracle,discrepancy", "--halt=false"],
    grid=[f"--images={os.path.join(os.path.dirname(HERE), 'assets', 'house.png')}", "--crop=32",
          "--methods=dip,staged,ddpm_input_staged", "--seeds=2", "--iters=100", "--scales=2",
          "--widths=4", "--criteria=oracle,staged,discrepancy", "--stages=2", "--t_max=30"])
MAX_RESUMES = 5
TIMINGS = ("compile_s", "fit_s", "ms_per_it", "wall_s", "date", "argv")


def _start(out_dir: str, *extra: str) -> subprocess.Popen:
  if _TARGET.value == "grid":
    where = [f"--out={os.path.join(out_dir, 'rows.jsonl')}"]
  else:
    where = [f"--out_dir={out_dir}", *extra]
  return subprocess.Popen(
      [sys.executable, os.path.join(HERE, f"{_TARGET.value}.py"), *ARGS[_TARGET.value], *where],
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


class _Watch:
  """Drains a process's stderr in a thread; `fitting` is set at its first "compiled in" line."""

  def __init__(self, proc: subprocess.Popen):
    self.fitting = threading.Event()
    self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
    self.thread.start()

  def _read(self, proc: subprocess.Popen) -> None:
    for line in proc.stderr:
      if "compiled in" in line:
        self.fitting.set()


def _timed_reference(out_dir: str) -> float:
  """Runs the reference; returns the seconds from its first "compiled in" line to its end."""
  proc = _start(out_dir)
  watch = _Watch(proc)
  watch.fitting.wait()
  t0 = time.perf_counter()
  proc.wait()
  watch.thread.join()
  if proc.returncode:
    raise RuntimeError(f"{_TARGET.value}.py failed (exit {proc.returncode})")
  return time.perf_counter() - t0


def _finish(proc: subprocess.Popen) -> str:
  _, stderr = proc.communicate()
  if proc.returncode:
    raise RuntimeError(f"{_TARGET.value}.py failed: {stderr[-2000:]}")
  return stderr


def _result(out_dir: str) -> tuple[Any, Any]:
  """restore: (restored.npy, the stops); grid: (the rows without timings, their arrays)."""
  if _TARGET.value == "grid":
    rows = common.read_rows(os.path.join(out_dir, "rows.jsonl"))
    arrays = {r["key"]: dict(np.load(os.path.join(out_dir, r["arrays"]))) for r in rows}
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows], arrays
  with open(os.path.join(out_dir, "metrics.json")) as f:
    return np.load(os.path.join(out_dir, "restored.npy")), json.load(f)["stops"]


def _done(out_dir: str) -> bool:
  if _TARGET.value == "grid":
    return len(common.read_rows(os.path.join(out_dir, "rows.jsonl"))) == 3
  return os.path.exists(os.path.join(out_dir, "metrics.json"))


def _max_diff(a: tuple[Any, Any], b: tuple[Any, Any]) -> float:
  if _TARGET.value == "restore":
    return float(np.max(np.abs(a[0] - b[0])))
  return max(float(np.max(np.abs(x[k].astype(np.float64) - b[1][key][k]), initial=0))
             for key, x in a[1].items() for k in x)


def trial(reference: tuple[Any, Any], seconds: float, kill_at: float) -> dict:
  """One kill `kill_at` seconds into the fit, then resumes until done."""
  out = tempfile.mkdtemp(prefix="kill_resume-")
  try:
    proc = _start(out)
    watch = _Watch(proc)
    if not watch.fitting.wait(timeout=600):
      raise RuntimeError("no fit started within 10 minutes")
    time.sleep(kill_at)
    killed = proc.poll() is None
    proc.kill()
    proc.wait()
    watch.thread.join()
    done_at_kill = len(common.read_rows(os.path.join(out, "rows.jsonl"))) if (
        _TARGET.value == "grid") else _latest_checkpoint(out)
    # restore: metrics.json is moved in last, so a kill may leave restored.npy without it.
    partial = killed and _TARGET.value == "restore" and not _done(out) and os.path.exists(
        os.path.join(out, "restored.npy"))
    resumes = 0
    while not _done(out):
      if resumes == MAX_RESUMES:
        raise RuntimeError(f"not done after {resumes} resumes: {out}")
      _finish(_start(out, "--resume"))
      resumes += 1
    result = _result(out)
    same = result[1] == reference[1] if _TARGET.value == "restore" else (
        result[0] == reference[0] and set(result[1]) == set(reference[1]))
    diff = _max_diff(result, reference)
    return dict(kill_into_fit_s=round(kill_at, 2), of_fit_s=round(seconds, 2), killed=killed,
                done_at_kill=done_at_kill, resumes=resumes, max_abs_diff=diff, same=same,
                partial_result_after_kill=partial,
                passed=same and diff <= _ATOL.value and not partial)
  finally:
    shutil.rmtree(out, ignore_errors=True)


def _latest_checkpoint(out: str) -> int | None:
  ckpt = os.path.join(out, "checkpoints")
  steps = [int(n) for n in os.listdir(ckpt) if n.isdigit()] if os.path.isdir(ckpt) else []
  return max(steps, default=None)


def main(argv: list[str]) -> None:
  del argv
  rng = random.Random(_SEED.value)
  ref_dir = tempfile.mkdtemp(prefix="kill_resume-ref-")
  _finish(_start(ref_dir))  # warms the compilation cache
  shutil.rmtree(ref_dir)
  seconds = _timed_reference(ref_dir)
  reference = _result(ref_dir)
  shutil.rmtree(ref_dir)
  passed = 0
  with common.Results(_OUT.value) as results:
    for i in range(_TRIALS.value):
      row = dict(trial(reference, seconds, rng.uniform(0, seconds)), trial=i,
                 target=_TARGET.value, args=ARGS[_TARGET.value],
                 machine=common.machine_tag(), date=datetime.date.today().isoformat())
      results.append(row)
      passed += row["passed"]
      print(json.dumps(row), flush=True)
  print(f"{_TARGET.value}: {passed} of {_TRIALS.value} trials resumed to the uninterrupted "
        f"result (max |diff| <= {_ATOL.value:g}, same stops / rows)")


if __name__ == "__main__":
  app.run(main)
