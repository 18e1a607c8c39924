r"""Converts torchvision's ImageNet VGG19 weights to the .npz that dipjax.losses.load_vgg19 reads.

  python experiments/convert_vgg19.py --torch_file=vgg19-dcbb9e9d.pth --out_npz=vgg19.npz

--torch_file is torchvision's state dict (download it yourself: dipjax downloads nothing);
reading it needs PyTorch (`pip install -e '.[torch]'`). Only the `features.*` convolutions
are kept, under their torchvision names, kernels transposed from OIHW to HWIO, float32.
"""

from __future__ import annotations

import os
import pickle
import sys

from absl import app
from absl import flags
import numpy as np

from dipjax import losses

_TORCH_FILE = flags.DEFINE_string("torch_file", None,
                                  "torchvision's VGG19 state dict (vgg19-dcbb9e9d.pth).")
_OUT = flags.DEFINE_string("out_npz", None, "Output .npz file.")


def convert(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """torchvision VGG state dict -> the `features.*` arrays, 4-D kernels OIHW -> HWIO, float32."""
  arrays = {}
  for key, value in state_dict.items():
    if key.startswith("features."):
      a = np.asarray(value, np.float32)
      arrays[key] = np.ascontiguousarray(a.transpose(2, 3, 1, 0)) if a.ndim == 4 else a
  if not arrays:
    raise ValueError("no features.* tensors: not a torchvision VGG state dict")
  return arrays


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # optional dependency, only needed here
  except ImportError:
    raise ValueError("reading a .pth file needs PyTorch: pip install -e '.[torch]'") from None
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found")
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
    raise ValueError(f"{path} is not a readable PyTorch state dict: {e}") from None
  if not isinstance(state, dict):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
  return {k: v.numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}


def run(torch_file: str, out: str) -> None:
  if not out.endswith(".npz"):
    raise ValueError(f"--out_npz must end in .npz, got {out}")
  arrays = convert(_read_torch(torch_file))
  params = losses.vgg19_from_arrays(arrays, source=torch_file)  # ValueError unless VGG19
  np.savez(out, **arrays)
  size = sum(a.size for a in arrays.values())
  print(f"wrote {out}: {len(arrays)} arrays of {len(params)} convolutions, {size:,} float32 "
        "parameters, kernels HWIO")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    run(_TORCH_FILE.value, _OUT.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"convert_vgg19.py: error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["torch_file", "out_npz"])
  app.run(main)
