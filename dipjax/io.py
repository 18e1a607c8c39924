"""Images in and out of dipjax: loading, saving, cropping, padding, noising.

Plain numpy, no JAX. Inside the library an image is float32 (H, W, C) in [0, 1] with
C in {1, 3}; every bad input file raises :class:`ImageError` with one sentence naming it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np
from PIL import Image

# ITU-R 601-2 luma, the weights of pillow's RGB -> 'L' conversion.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_PAD_MODES = ("reflect", "symmetric", "edge", "constant")
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageError(ValueError):
  """An image file that is missing, unreadable or in a mode dipjax does not accept."""


@dataclasses.dataclass(frozen=True)
class Padding:
  """Pixels added on each side by :func:`pad_to_multiple`."""
  top: int
  bottom: int
  left: int
  right: int


def check_image(x: np.ndarray, name: str = "image", *, min_size: int = 1) -> np.ndarray:
  """`x` as float32 (H, W, C), C in {1, 3}, if it is an image as dipjax takes it: a float array
  of finite values in [0, 1], at least `min_size` pixels high and wide. Otherwise a ValueError
  that says what `name` is (an integer or 0-255 image, NaN, a wrong shape)."""
  a = np.asarray(x)
  if a.dtype == bool or not np.issubdtype(a.dtype, np.number):
    raise ValueError(f"{name} must be a float array in [0, 1], got dtype {a.dtype}")
  if np.issubdtype(a.dtype, np.integer):
    raise ValueError(f"{name} is {a.dtype}: dipjax takes float images in [0, 1] "
                     "(divide by 255, or load it with dipjax.io.load_image)")
  if a.ndim != 3 or a.shape[-1] not in (1, 3):
    raise ValueError(f"{name} must have shape (H, W, 1) or (H, W, 3), got {a.shape}")
  if min(a.shape[:2]) < min_size:
    raise ValueError(f"{name} is {a.shape[1]}x{a.shape[0]} pixels; at least "
                     f"{min_size}x{min_size} are needed")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} contains {np.sum(~np.isfinite(a))} NaN or infinite values")
  lo, hi = float(a.min()), float(a.max())
  if lo < -1e-6 or hi > 1 + 1e-6:
    hint = " (0-255 values? divide by 255)" if hi > 2 else " (clip it to [0, 1])"
    raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")
  return a.astype(np.float32)


def _drop_opaque_alpha(x: np.ndarray, path: str) -> np.ndarray:
  """(H, W, C + 1) uint8 with alpha last -> (H, W, C); ImageError if any pixel is not opaque."""
  if np.any(x[..., -1] != 255):
    raise ImageError(
        f"{path} has transparency (an alpha channel that is not fully opaque); "
        "flatten it onto a background first")
  return x[..., :-1]


def _to_float(im: Image.Image, path: str) -> np.ndarray:
  """A loaded pillow image -> float32 (H, W, 1 or 3) in [0, 1], following the file's mode."""
  mode = im.mode
  if mode in ("1", "L"):
    return np.asarray(im.convert("L"), np.float32)[..., None] / 255
  if mode in ("RGB", "CMYK", "YCbCr"):
    # CMYK -> RGB is pillow's plain formula; embedded ICC profiles are ignored.
    return np.asarray(im.convert("RGB"), np.float32) / 255
  if mode in ("LA", "RGBA"):
    return _drop_opaque_alpha(np.asarray(im), path).astype(np.float32) / 255
  if mode in ("P", "PA"):
    if mode == "PA" or im.has_transparency_data:
      rgb = _drop_opaque_alpha(np.asarray(im.convert("RGBA")), path)
    else:
      rgb = np.asarray(im.convert("RGB"))
    if np.all(rgb == rgb[..., :1]):  # grey palette (as used by the pixels) -> one channel
      rgb = rgb[..., :1]
    return rgb.astype(np.float32) / 255
  if mode in _16BIT_MODES or mode == "I":
    x = np.asarray(im)
    if mode == "I" and (x.min() < 0 or x.max() > 65535):
      raise ImageError(f"{path} is a 32-bit integer image with values outside the 16-bit range")
    return x.astype(np.float32)[..., None] / 65535
  if mode == "F":
    x = np.asarray(im, np.float32)
    if not (x.min() >= 0 and x.max() <= 1):  # also rejects NaN
      raise ImageError(f"{path} is a float image with values outside [0, 1]")
    return x[..., None]
  raise ImageError(f"{path} has unsupported image mode {mode!r}")


def _set_channels(x: np.ndarray, channels: int | None) -> np.ndarray:
  """(H, W, 1 or 3) -> (H, W, channels): RGB -> luma, grey -> replicated; None keeps C."""
  if channels is None or x.shape[-1] == channels:
    return x
  if channels == 1:
    return (x @ _LUMA)[..., None]
  if channels == 3:
    return np.repeat(x, 3, axis=-1)
  raise ValueError(f"channels must be None, 1 or 3, got {channels}")


def load_image(path: str | os.PathLike, *, channels: int | None = None) -> np.ndarray:
  """Reads a PNG, JPEG or TIFF as float32 (H, W, C) in [0, 1].

  Modes: '1'/'L' -> C=1; RGB, CMYK, YCbCr -> C=3; 16-bit ('I;16*', and 'I' within
  [0, 65535]) -> divided by 65535; 'F' kept as is and must lie in [0, 1]. Palette ('P')
  images are expanded to RGB and collapsed to C=1 when every pixel is grey. Alpha ('LA',
  'RGBA', transparent palettes) is dropped when fully opaque, else ImageError: dipjax never
  picks a background. Multi-frame files give their first frame.

  Args:
    path: image file.
    channels: 1 converts RGB to grey (ITU-R 601 luma, like pillow's 'L'), 3 replicates
      grey, None keeps the file's channels.

  Raises:
    ImageError: missing file, unreadable file, or unsupported content.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ImageError(f"no such image file: {path}")
  with open(path, "rb") as f:
    try:
      im = Image.open(f)
      im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      raise ImageError(f"cannot read {path} as an image ({e})") from e
    x = _to_float(im, path)
  return np.ascontiguousarray(_set_channels(x, channels), np.float32)


def save_image(path: str | os.PathLike, x: np.ndarray) -> None:
  """Writes (H, W, C) with C in {1, 3}, or (H, W), float in [0, 1] as an 8-bit PNG.

  Values are clipped to [0, 1] and rounded to the nearest level; parent directories are
  created. ValueError for a path not ending in .png, a bad shape or non-finite values.
  """
  path = pathlib.Path(path)
  if path.suffix.lower() != ".png":
    raise ValueError(f"save_image writes PNG files; {path} does not end in .png")
  x = np.asarray(x, np.float32)
  if x.ndim == 3 and x.shape[-1] in (1, 3):
    x = x[..., 0] if x.shape[-1] == 1 else x
  elif x.ndim != 2:
    raise ValueError(f"expected an image of shape (H, W), (H, W, 1) or (H, W, 3), got {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"image to save as {path} contains NaN or infinite values")
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)).save(path, format="PNG")


def center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """(H, W, ...) -> (height, width, ...), centred (extra odd pixel dropped at bottom/right)."""
  h, w = x.shape[:2]
  if not (0 < height <= h and 0 < width <= w):
    raise ValueError(f"cannot crop a {h}x{w} image to {height}x{width}")
  top, left = (h - height) // 2, (w - width) // 2
  return x[top:top + height, left:left + width]


def crop_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
  """Centre crop of (H, W, ...) to the largest multiple of `multiple` in each axis.

  As the DIP code's ``crop_image(img, d=32)``. ValueError if H or W < multiple.
  """
  h, w = x.shape[:2]
  if h < multiple or w < multiple:
    raise ValueError(f"a {h}x{w} image is smaller than one multiple of {multiple}")
  return center_crop(x, h - h % multiple, w - w % multiple)


def pad_to_multiple(x: np.ndarray, multiple: int,
                    mode: str = "reflect") -> tuple[np.ndarray, Padding]:
  """Pads (H, W, ...) so H and W are multiples of `multiple`; undo with :func:`unpad`.

  The padding is split evenly (the odd pixel at bottom/right). `mode` is a numpy pad mode:
  'reflect', 'symmetric', 'edge' or 'constant' (zeros). numpy's 'reflect' reflects
  repeatedly when the pad is wider than the image, and repeats the pixel of a 1-pixel axis,
  so any size works.

  Returns:
    (padded image of shape (H', W', ...), Padding).
  """
  if mode not in _PAD_MODES:
    raise ValueError(f"mode must be one of {_PAD_MODES}, got {mode!r}")
  h, w = x.shape[:2]
  dh, dw = -h % multiple, -w % multiple
  pad = Padding(top=dh // 2, bottom=dh - dh // 2, left=dw // 2, right=dw - dw // 2)
  widths = [(pad.top, pad.bottom), (pad.left, pad.right)] + [(0, 0)] * (x.ndim - 2)
  return np.pad(x, widths, mode=mode), pad


def unpad(x: np.ndarray, padding: Padding) -> np.ndarray:
  """Removes `padding` from (H', W', ...): the exact inverse of :func:`pad_to_multiple`."""
  h, w = x.shape[:2]
  return x[padding.top:h - padding.bottom, padding.left:w - padding.right]

