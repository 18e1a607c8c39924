"""What the experiments/ scripts share; no flags are defined here, so importing it adds none.

The results store (JSON-lines rows keyed by the sha1 of their config, appended under a lock,
their arrays in an atomically written .npz outside the tracked tree), image loading for grids
(``expand_images``, ``load_clean``, ``noisy_image``: the noise of an image depends only on
its file name, sigma and a seed), scores (``quality``, ``uint8``), the (C)BM3D baseline,
markdown tables, list-flag parsing and the machine's tag for results files (``machine_tag``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import platform
import re
import zlib
from typing import Any, Callable, Iterable

from absl import logging
import jax
import numpy as np

from dipjax import io
from dipjax import metrics
from dipjax import noise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


# ----------------------------------------------------------------------------- results store


def row_key(config: dict) -> str:
  """sha1 of the config's canonical JSON (sorted keys, no spaces)."""
  return hashlib.sha1(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
                      ).hexdigest()


def arrays_dir(out: str) -> str:
  """Where the .npz files of the rows in `out` go, never into tracked files: for a rows file in
  the repository outside runs/, runs/arrays/<its path from the root, docs/results/ and .jsonl
  left off>/ (docs/results/stopping/rows/x.jsonl: runs/arrays/stopping/rows/x/); else beside
  it, <out without .jsonl>_arrays/."""
  stem = os.path.abspath(out).removesuffix(".jsonl")
  rel = os.path.relpath(stem, REPO)
  if rel.split(os.sep)[0] in (os.pardir, "runs"):
    return stem + "_arrays"
  docs = os.path.join("docs", "results", "")
  return os.path.join(REPO, "runs", "arrays", rel.removeprefix(docs))


def _parse_rows(data: bytes, path: str) -> list[dict]:
  rows = []
  for number, line in enumerate(data.decode().splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number} is not a JSON row ({e})") from None
  return rows


def read_rows(path: str) -> list[dict]:
  """The complete rows of a results file ([] if there is none; a partial last line left out)."""
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  return _parse_rows(data[:data.rfind(b"\n") + 1], path)


def write_rows(path: str, rows: list[dict]) -> None:
  """Replaces a results file with `rows` in one rename (a reader sees the old or the new file)."""
  tmp = path + ".rewrite"
  with open(tmp, "wb") as f:
    for row in rows:
      f.write((json.dumps(_finite(row), allow_nan=False) + "\n").encode())
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class Results:
  """A results file open for appending under an exclusive lock (one grid per file).

  On opening, a partial last line (a grid killed mid-write) is truncated away; `rows` holds the
  complete rows. Each appended row is one write, flushed and fsynced.
  """

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path = path
    self._file = open(path, "a+b")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.close()
      raise ValueError(f"{path} is being written by another grid.py") from None
    self._file.seek(0)
    data = self._file.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
      logging.warning("%s ended in a partial line (%d bytes, a killed write): truncated",
                      path, len(data) - end)
      self._file.truncate(end)
    self.rows = _parse_rows(data[:end], path)

  def append(self, row: dict) -> None:
    self._file.write((json.dumps(_finite(row), allow_nan=False) + "\n").encode())
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> Results:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _finite(x: Any) -> Any:
  """x with every non-finite float replaced by None (strict JSON)."""
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def save_arrays(path: str, arrays: dict) -> None:
  """np.savez_compressed, atomically (a killed write leaves no .npz behind)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    np.savez_compressed(f, **arrays)
  os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- images


def expand_images(paths: Iterable[str]) -> tuple[str, ...]:
  """Files as given, folders as their sorted image files; ValueError for a missing path or a
  folder without images."""
  out = []
  for path in paths:
    if os.path.isdir(path):
      found = sorted(os.path.join(path, f) for f in os.listdir(path)
                     if f.lower().endswith(IMAGE_EXTENSIONS))
      if not found:
        raise ValueError(f"--images: no {'/'.join(IMAGE_EXTENSIONS)} images in folder {path}")
      out += found
    elif os.path.isfile(path):
      out.append(path)
    else:
      raise ValueError(f"--images: no such file or folder: {path}")
  return tuple(dict.fromkeys(out))


def load_clean(path: str, crop: int) -> np.ndarray:
  """The clean image, centre-cropped to crop x crop (0: whole), float32 (H, W, C) in [0, 1]."""
  image = io.load_image(path)
  if crop:
    if min(image.shape[:2]) < crop:
      raise ValueError(f"--crop {crop} is larger than {path} ({image.shape[1]}x"
                       f"{image.shape[0]})")
    image = io.center_crop(image, crop, crop)
  return image


def noisy_image(clean: np.ndarray, image_name: str, sigma: float, noise_seed: int) -> np.ndarray:
  """clean + N(0, (sigma / 255)^2), clipped; the same for every method (seeded by the file
  name, sigma and noise_seed)."""
  rng = np.random.default_rng([noise_seed, zlib.crc32(image_name.encode()), round(sigma * 100)])
  return noise.add_noise(rng, clean, sigma / 255)


# ----------------------------------------------------------------------------- scores


def quality(x: np.ndarray, clean: np.ndarray) -> dict[str, Any]:
  """PSNR (dB) and SSIM of images (..., H, W, C) against clean; lists for a leading axis."""
  clean = np.broadcast_to(clean, np.shape(x))
  p, s = np.asarray(metrics.psnr(x, clean)), np.asarray(metrics.ssim(x, clean))
  return dict(psnr=np.round(p, 4).tolist(), ssim=np.round(s, 5).tolist())


def uint8(x: np.ndarray) -> np.ndarray:
  """An image in [0, 1] as 8 bits (clipped, rounded)."""
  return np.round(np.clip(np.asarray(x), 0, 1) * 255).astype(np.uint8)


def bm3d_denoise(noisy: np.ndarray, sigma: float) -> np.ndarray:
  """(C)BM3D of (H, W, 1 or 3) at noise std `sigma` ([0, 1] units), clipped to [0, 1]."""
  import bm3d  # optional extra: pip install -e '.[baselines]'
  if noisy.shape[-1] == 3:
    out = bm3d.bm3d_rgb(noisy, sigma)
  else:
    out = bm3d.bm3d(noisy[..., 0], sigma)[..., None]
  return np.clip(out, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------- tables, flags


def md_table(header: list[str], body: list[list[str]]) -> str:
  """A markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def parse_list(flag: str, values: list[str], kind: Callable[[str], Any]) -> tuple:
  """A list flag's strings as `kind`, with a one-line error naming the flag."""
  try:
    return tuple(kind(v) for v in values)
  except ValueError:
    raise ValueError(f"--{flag}: cannot read {values} as {kind.__name__}s") from None


def _cpuinfo(key: str) -> str | None:
  """The first `key` line's value in /proc/cpuinfo, or None."""
  if not os.path.exists("/proc/cpuinfo"):
    return None
  with open("/proc/cpuinfo") as f:
    return next((l.split(":", 1)[1].strip() for l in f if l.split(":")[0].strip() == key), None)


def host() -> str:
  """The CPU's model name and core count."""
  return f"{_cpuinfo('model name') or platform.machine()}, {os.cpu_count()} cores"


def machine_tag() -> str:
  """A results file's machine: the accelerator's kind, or cpu_ and the widest x86 vector ISA
  (the virtual CPUs here report only "AMD EPYC" as their model)."""
  if jax.default_backend() != "cpu":
    return re.sub(r"[^a-z0-9]+", "_", jax.devices()[0].device_kind.lower()).strip("_")
  cpu_flags = (_cpuinfo("flags") or "").split()
  isa = ("avx512" if "avx512f" in cpu_flags else "avx2" if "avx2" in cpu_flags
         else platform.machine().lower())
  return f"cpu_{isa}"
