"""Losses: pixel losses against numpy, MSE + SSIM, the VGG19 perceptual loss (its features
against PyTorch on the same weights), converting and loading VGG19 weights and their errors.
Tiny images; the jitted functions are shared by the whole module, so each compiles once."""

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dipjax import losses
from dipjax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16  # the smallest image that reaches VGG19's block 5
TORCH = "needs the optional torch package (pip install -e '.[torch]')"
# torchvision's cfgs["E"] (VGG19): conv widths, "M" a max-pool; features.{i} counts every
# conv, ReLU and pool, so conv k of the list is features.{2k + pools before it}.
CFG_E = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"]

_perceptual_and_grad = jax.jit(jax.value_and_grad(losses.perceptual))
_mse_ssim_grad = jax.jit(jax.grad(losses.mse_ssim))


def _load_convert_script():
  spec = importlib.util.spec_from_file_location(
      "convert_vgg19", os.path.join(ROOT, "experiments", "convert_vgg19.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


convert_vgg19 = _load_convert_script()


def _pair(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=shape).astype(np.float32)
  return x, np.clip(x + 0.1 * rng.standard_normal(shape), 0, 1).astype(np.float32)


def _torch_state_dict() -> dict[str, np.ndarray]:
  """Random VGG19 weights in torchvision's layout (OIHW), plus a classifier tensor."""
  rng = np.random.default_rng(0)
  state, index, cin = {}, 0, 3
  for v in CFG_E:
    if v == "M":
      index += 1
      continue
    std = np.sqrt(2 / (9 * v))  # torchvision's He init keeps the activations O(1)
    state[f"features.{index}.weight"] = (std * rng.standard_normal((v, cin, 3, 3))).astype(
        np.float32)
    state[f"features.{index}.bias"] = (0.1 * rng.standard_normal(v)).astype(np.float32)
    index, cin = index + 2, v
  state["classifier.0.weight"] = np.ones((4, 8), np.float32)
  return state


@pytest.fixture(scope="module")
def torch_state():
  return _torch_state_dict()


@pytest.fixture(scope="module")
def npz_file(torch_state, tmp_path_factory):
  path = tmp_path_factory.mktemp("vgg") / "vgg19.npz"
  np.savez(path, **convert_vgg19.convert(torch_state))
  return path


@pytest.fixture(scope="module")
def params(npz_file):
  return losses.load_vgg19(npz_file)


def test_pixel_losses_match_numpy():
  x, t = _pair((SIZE, SIZE, 3))
  np.testing.assert_allclose(losses.mse(x, t), np.mean((x - t) ** 2), rtol=1e-5)
  np.testing.assert_allclose(losses.l1(x, t), np.mean(np.abs(x - t)), rtol=1e-5)
  np.testing.assert_allclose(jax.jit(losses.get("mse"))(x, t, None), np.mean((x - t) ** 2),
                             rtol=1e-5)


@pytest.mark.parametrize("name", ["mse", "l1", "mse_ssim"])
def test_losses_vmap_and_jit(name):
  x, t = _pair((2, SIZE, SIZE, 1), seed=1)
  loss = losses.get(name)
  got = jax.vmap(jax.jit(loss), (0, 0, None))(x, t, None)
  assert got.shape == (2,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, [loss(x[i], t[i], None) for i in range(2)], rtol=1e-5)


def test_mse_ssim():
  x, t = _pair((SIZE, SIZE, 3), seed=2)
  ssim = metrics.ssim(x, t)
  np.testing.assert_allclose(losses.mse_ssim(x, t),
                             losses.mse(x, t) + losses.SSIM_WEIGHT * (1 - ssim), rtol=1e-5)
  np.testing.assert_allclose(losses.mse_ssim(x, t, weight=0.0), losses.mse(x, t), rtol=1e-6)
  np.testing.assert_allclose(losses.mse_ssim(x, x), 0.0, atol=1e-6)
  grad = _mse_ssim_grad(x, t)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  assert np.all(np.isfinite(_mse_ssim_grad(x, x)))  # finite even at an exact fit


def test_bad_inputs_and_registry():
  with pytest.raises(ValueError, match="equal shape"):
    losses.mse(np.zeros((8, 8, 3)), np.zeros((8, 8, 1)))
  with pytest.raises(ValueError, match=r"\(H, W, C\)"):
    losses.l1(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 3)))
  with pytest.raises(ValueError, match="unknown loss 'nope'.*mse, l1, mse_ssim, perceptual"):
    losses.get("nope")
  with pytest.raises(ValueError, match="unknown loss"):
    losses.needs_params("nope")
  assert [losses.needs_params(n) for n in losses.LOSSES] == [False, False, False, True]


def test_convert_keeps_features_as_hwio(torch_state):
  arrays = convert_vgg19.convert(torch_state)
  assert "classifier.0.weight" not in arrays and len(arrays) == 32
  np.testing.assert_array_equal(arrays["features.34.weight"],
                                torch_state["features.34.weight"].transpose(2, 3, 1, 0))
  assert arrays["features.34.weight"].shape == (3, 3, 512, 512)
  with pytest.raises(ValueError, match="not a torchvision VGG"):
    convert_vgg19.convert({"fc.weight": np.zeros((2, 2))})


def test_load_round_trip_matches_init_structure(params, torch_state):
  random = losses.init_vgg19(jax.random.PRNGKey(0))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, random)
  assert len(params) == 16 and random["conv5_4"]["kernel"].shape == (3, 3, 512, 512)
  np.testing.assert_array_equal(params["conv2_1"]["kernel"],
                                torch_state["features.5.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["conv5_4"]["bias"], torch_state["features.34.bias"])
  np.testing.assert_allclose(np.std(random["conv3_1"]["kernel"]), np.sqrt(2 / (9 * 256)),
                             rtol=0.05)  # torchvision's He init over fan-out


def test_load_errors_name_the_file(tmp_path, torch_state):
  missing = tmp_path / "absent.npz"
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    losses.load_vgg19(missing)
  oihw = tmp_path / "oihw.npz"  # not converted: still PyTorch's layout
  np.savez(oihw, **{k: v for k, v in torch_state.items() if k.startswith("features.0.")})
  with pytest.raises(ValueError, match=re.escape(str(oihw)) + r".*features\.0\.weight.*OIHW"):
    losses.load_vgg19(oihw)
  partial = tmp_path / "partial.npz"
  np.savez(partial, **{k: v for k, v in convert_vgg19.convert(torch_state).items()
                       if k != "features.34.bias"})
  with pytest.raises(ValueError, match=re.escape(str(partial)) + ".*'features.34.bias'"):
    losses.load_vgg19(partial)
  text = tmp_path / "text.npz"
  text.write_text("not an archive")
  with pytest.raises(ValueError, match=re.escape(str(text)) + " is not an .npz file"):
    losses.load_vgg19(text)


def test_vgg19_features_match_torch(params, torch_state):
  torch = pytest.importorskip("torch", reason=TORCH)
  functional = torch.nn.functional
  x = np.random.default_rng(3).uniform(size=(2, 36, 34, 3)).astype(np.float32)  # F(2x2) tiles
  got = losses.VGG19(outputs=("relu1_2", "relu2_2", "pool2")).apply({"params": params}, x)

  def conv_relu(h, index):
    w, b = (torch.from_numpy(torch_state[f"features.{index}.{n}"]) for n in ("weight", "bias"))
    return functional.relu(functional.conv2d(h, w, b, padding=1))

  mean, std = np.array(losses.IMAGENET_MEAN), np.array(losses.IMAGENET_STD)
  h = torch.from_numpy(((x - mean) / std).astype(np.float32).transpose(0, 3, 1, 2))
  with torch.no_grad():
    relu1_2 = conv_relu(conv_relu(h, 0), 2)
    relu2_2 = conv_relu(conv_relu(functional.max_pool2d(relu1_2, 2), 5), 7)
    pool2 = functional.max_pool2d(relu2_2, 2)  # 18x17 -> 9x8: floor mode
  for name, want in [("relu1_2", relu1_2), ("relu2_2", relu2_2), ("pool2", pool2)]:
    want = want.numpy().transpose(0, 2, 3, 1)
    assert got[name].shape == want.shape, name
    np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_convert_script_reads_torch_file(tmp_path, torch_state, params, capsys):
  torch = pytest.importorskip("torch", reason=TORCH)
  pth, out = tmp_path / "vgg19.pth", tmp_path / "out.npz"
  torch.save({k: torch.from_numpy(v) for k, v in torch_state.items()}, pth)
  convert_vgg19.run(str(pth), str(out))
  assert f"wrote {out}: 32 arrays of 16 convolutions, 20,024,384" in capsys.readouterr().out
  loaded = losses.load_vgg19(out)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  with pytest.raises(ValueError, match="must end in .npz"):
    convert_vgg19.run(str(pth), str(tmp_path / "out.bin"))


def test_perceptual(params):
  x, t = _pair((SIZE, SIZE, 3), seed=4)
  loss, grad = _perceptual_and_grad(x, t, params)
  assert loss > 0 and loss.dtype == jnp.float32
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  same, grad_same = _perceptual_and_grad(x, x, params)
  assert same == 0 and not np.any(grad_same)
  grey, grey_t = x[..., :1], t[..., :1]  # grey input is replicated to three channels
  np.testing.assert_allclose(_perceptual_and_grad(grey, grey_t, params)[0],
                             _perceptual_and_grad(*(np.repeat(a, 3, -1) for a in (grey, grey_t)),
                                                  params)[0], rtol=1e-5)


def test_perceptual_layers_and_errors(params):
  x, t = _pair((8, 8, 3), seed=5)
  shallow = losses.perceptual(x, t, params, layers=("relu1_2", "relu2_2"), weights=(1.0, 0.0))
  np.testing.assert_allclose(
      shallow, losses.perceptual(x, t, params, layers=("relu1_2",), weights=(1.0,)), rtol=1e-6)
  with pytest.raises(ValueError, match=r"H, W >= 16"):
    losses.perceptual(x, t, params)
  with pytest.raises(ValueError, match="unknown VGG19 layers"):
    losses.perceptual(x, t, params, layers=("relu9_9",), weights=(1.0,))
  with pytest.raises(ValueError, match="one weight per layer"):
    losses.perceptual(x, t, params, layers=("relu1_2",), weights=(1.0, 2.0))
  with pytest.raises(ValueError, match="1 or 3"):
    losses.perceptual(np.zeros((16, 16, 2)), np.zeros((16, 16, 2)), params)
