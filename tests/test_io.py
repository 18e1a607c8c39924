"""Tests for dipjax.io."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dipjax import io
from dipjax import noise


def _rand(shape, seed=0):
  return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _save(im, path):
  im.save(path)
  return path


@pytest.mark.parametrize("shape", [(5, 7, 1), (5, 7, 3), (5, 7)])
def test_save_load_round_trip(tmp_path, shape):
  x = _rand(shape)
  path = tmp_path / "sub" / "dir" / "x.png"
  io.save_image(path, x)
  y = io.load_image(path)
  assert y.dtype == np.float32 and y.shape == (5, 7, 1 if len(shape) == 2 else shape[-1])
  assert np.abs(y - x.reshape(y.shape)).max() <= 0.5 / 255 + 1e-6


def test_save_clips_and_rounds(tmp_path):
  io.save_image(tmp_path / "x.png", np.array([[-1.0, 2.0, 0.6 / 255, 0.4 / 255]]))
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x.png")), [[0, 255, 1, 0]])


def test_save_rejects_bad_input(tmp_path):
  with pytest.raises(ValueError, match=".png"):
    io.save_image(tmp_path / "x.jpg", _rand((4, 4, 3)))
  with pytest.raises(ValueError, match="shape"):
    io.save_image(tmp_path / "x.png", _rand((4, 4, 2)))
  with pytest.raises(ValueError, match="NaN"):
    io.save_image(tmp_path / "x.png", np.full((4, 4), np.nan))


def test_rgba_opaque_becomes_rgb(tmp_path):
  rgb = (_rand((4, 6, 3)) * 255).astype(np.uint8)
  Image.fromarray(np.dstack([rgb, np.full((4, 6), 255, np.uint8)])).save(tmp_path / "a.png")
  y = io.load_image(tmp_path / "a.png")
  np.testing.assert_array_equal(y, rgb / np.float32(255))


def test_transparency_is_an_error(tmp_path):
  rgba = np.full((4, 6, 4), 200, np.uint8)
  rgba[0, 0, 3] = 10
  Image.fromarray(rgba).save(tmp_path / "a.png")
  with pytest.raises(io.ImageError, match="a.png has transparency"):
    io.load_image(tmp_path / "a.png")
  Image.fromarray(rgba).convert("P").save(tmp_path / "p.png")  # transparent palette
  with pytest.raises(io.ImageError, match="transparency"):
    io.load_image(tmp_path / "p.png")


def test_palette(tmp_path):
  grey = Image.fromarray(np.arange(24, dtype=np.uint8).reshape(4, 6) * 10)
  grey.convert("P").save(tmp_path / "g.png")
  assert io.load_image(tmp_path / "g.png").shape == (4, 6, 1)
  np.testing.assert_array_equal(io.load_image(tmp_path / "g.png"),
                                io.load_image(_save(grey, tmp_path / "l.png")))
  colour = Image.new("RGB", (6, 4), (10, 20, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
  y = io.load_image(_save(colour, tmp_path / "c.png"))
  assert y.shape == (4, 6, 3)
  np.testing.assert_allclose(y[0, 0], np.array([10, 20, 30]) / 255)


def test_16bit_grey_png_full_precision(tmp_path):
  a = np.array([[0, 1, 2, 65535], [12345, 40000, 65534, 300]], np.uint16)
  im = Image.fromarray(a)
  assert im.mode == "I;16"
  im.save(tmp_path / "a.png")
  assert Image.open(tmp_path / "a.png").mode == "I;16"
  y = io.load_image(tmp_path / "a.png")
  assert y.shape == (2, 4, 1)
  np.testing.assert_array_equal(y[..., 0], a.astype(np.float32) / 65535)


def test_tiff(tmp_path):
  rgb = (_rand((5, 3, 3)) * 255).astype(np.uint8)
  y = io.load_image(_save(Image.fromarray(rgb), tmp_path / "a.tif"))
  np.testing.assert_array_equal(y, rgb / np.float32(255))
  f = _rand((5, 3))
  y = io.load_image(_save(Image.fromarray(f), tmp_path / "f.tif"))
  np.testing.assert_array_equal(y[..., 0], f)
  with pytest.raises(io.ImageError, match=r"outside \[0, 1\]"):
    io.load_image(_save(Image.fromarray(f * 2), tmp_path / "f2.tif"))


def test_32bit_integer_tiff(tmp_path):
  a = np.array([[0, 70], [65535, 3]], np.int32)
  y = io.load_image(_save(Image.fromarray(a), tmp_path / "i.tif"))
  np.testing.assert_array_equal(y[..., 0], a.astype(np.float32) / 65535)
  with pytest.raises(io.ImageError, match="16-bit range"):
    io.load_image(_save(Image.fromarray(a * 2), tmp_path / "i2.tif"))


def test_la_opaque_becomes_grey(tmp_path):
  la = np.stack([np.arange(6, dtype=np.uint8).reshape(2, 3), np.full((2, 3), 255, np.uint8)], -1)
  y = io.load_image(_save(Image.fromarray(la), tmp_path / "la.png"))
  np.testing.assert_array_equal(y, la[..., :1] / np.float32(255))


def test_cmyk_jpeg_is_rgb(tmp_path):
  y = io.load_image(_save(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), tmp_path / "c.jpg"))
  assert y.shape == (8, 8, 3) and y.min() > 0.95


def test_not_an_image(tmp_path):
  path = tmp_path / "x.png"
  path.write_text("hello, I am text\n")
  with pytest.raises(io.ImageError, match=r"cannot read .*x\.png as an image \(") as e:
    io.load_image(path)
  assert "\n" not in str(e.value)


def test_truncated(tmp_path):
  path = tmp_path / "x.png"
  io.save_image(path, _rand((32, 32, 3)))
  path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(io.ImageError, match="cannot read"):
    io.load_image(path)


def test_missing_file(tmp_path):
  with pytest.raises(io.ImageError, match="no such image file: .*nope.png"):
    io.load_image(tmp_path / "nope.png")


def test_channels(tmp_path):
  rgb = _rand((4, 5, 3))
  io.save_image(tmp_path / "c.png", rgb)
  grey = io.load_image(tmp_path / "c.png", channels=1)
  pil_l = np.asarray(Image.open(tmp_path / "c.png").convert("L"), np.float32) / 255
  assert grey.shape == (4, 5, 1)
  assert np.abs(grey[..., 0] - pil_l).max() <= 0.5 / 255 + 1e-6
  io.save_image(tmp_path / "g.png", rgb[..., :1])
  three = io.load_image(tmp_path / "g.png", channels=3)
  assert three.shape == (4, 5, 3) and np.all(three == three[..., :1])
  assert io.load_image(tmp_path / "g.png", channels=1).shape == (4, 5, 1)
  with pytest.raises(ValueError, match="channels"):
    io.load_image(tmp_path / "g.png", channels=2)


@pytest.mark.parametrize("multiple", [32, 64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 3), (33, 70, 1), (64, 31), (64, 64, 3)])
@pytest.mark.parametrize("mode", ["reflect", "symmetric", "edge", "constant"])
def test_pad_unpad(shape, multiple, mode):
  x = _rand(shape)
  y, pad = io.pad_to_multiple(x, multiple, mode)
  assert y.shape[0] % multiple == 0 and y.shape[1] % multiple == 0
  assert y.shape[0] - shape[0] < multiple and y.shape[2:] == shape[2:]
  assert abs(pad.top - pad.bottom) <= 1 and abs(pad.left - pad.right) <= 1
  np.testing.assert_array_equal(io.unpad(y, pad), x)


def test_reflect_pad_values():
  y, pad = io.pad_to_multiple(np.arange(3, dtype=np.float32)[None, :, None], 8)
  assert pad == io.Padding(top=3, bottom=4, left=2, right=3)
  np.testing.assert_array_equal(y[3, :, 0], [2, 1, 0, 1, 2, 1, 0, 1])


def test_crop_to_multiple():
  x = _rand((70, 100, 3))
  y = io.crop_to_multiple(x, 32)
  assert y.shape == (64, 96, 3)
  np.testing.assert_array_equal(y, x[3:67, 2:98])
  assert io.crop_to_multiple(x[:64, :96], 32).shape == (64, 96, 3)
  with pytest.raises(ValueError, match="smaller"):
    io.crop_to_multiple(x[:31], 32)
  assert io.center_crop(x[..., 0], 5, 4).shape == (5, 4)
  with pytest.raises(ValueError):
    io.center_crop(x, 71, 4)


def test_add_noise():
  x = np.full((16, 16, 3), 0.5, np.float32)
  a = noise.add_noise(0, x, 25 / 255)
  np.testing.assert_array_equal(a, noise.add_noise(np.random.default_rng(0), x, 25 / 255))
  assert a.dtype == np.float32 and not np.array_equal(a, noise.add_noise(1, x, 25 / 255))
  assert 0.08 < np.std(a - x) < 0.12
  big = noise.add_noise(0, x, 1.0)
  assert big.min() == 0 and big.max() == 1
  np.testing.assert_array_equal(noise.add_noise(0, x, 0.0), x)
  for sigma in (-0.1, 25, float("nan")):  # 25: 0-255 units where [0, 1] is expected
    with pytest.raises(ValueError, match=r"sigma is a std in \[0, 1\] units"):
      noise.add_noise(0, x, sigma)
  with pytest.raises(ValueError, match="finite images"):
    noise.add_noise(0, x * np.nan, 0.1)
