"""The conv layer's custom VJP equals XLA's convolution gradients; up-sampling matches resize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dipjax import layers


def _lax_conv(x, w, stride):
  return lax.conv_general_dilated(x, w, (stride, stride), "VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("size,cin,cout,k,stride", [
    ((9, 9), 3, 5, 3, 1), ((10, 11), 3, 4, 3, 2), ((11, 10), 2, 3, 3, 2), ((8, 8), 4, 4, 1, 1),
    ((17, 16), 1, 2, 9, 3)])
def test_conv2d_value_and_gradients_match_lax(size, cin, cout, k, stride):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (2, *size, cin))
  w = jax.random.normal(kw, (k, k, cin, cout))
  y = layers.conv2d(x, w, stride)
  np.testing.assert_allclose(y, _lax_conv(x, w, stride), atol=1e-5)
  g = jax.random.normal(kg, y.shape)
  _, vjp = jax.vjp(lambda x, w: layers.conv2d(x, w, stride), x, w)
  _, vjp_ref = jax.vjp(lambda x, w: _lax_conv(x, w, stride), x, w)
  for got, want in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_conv2d_gradient_inside_scan_equals_outside():
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 3))
  w = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 3, 4))
  grad = jax.grad(lambda w: jnp.sum(jnp.tanh(layers.conv2d(x, w, 1))))
  scanned = jax.lax.scan(lambda c, _: (c, grad(w)), 0, length=2)[1]
  np.testing.assert_allclose(scanned[1], grad(w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 4, 6, 2), (2, 5, 3, 1)])
def test_bilinear_upsample_matches_half_pixel_resize(shape):
  x = jax.random.uniform(jax.random.PRNGKey(3), shape)
  want = jax.image.resize(x, (shape[0], 2 * shape[1], 2 * shape[2], shape[3]), "bilinear")
  np.testing.assert_allclose(layers.upsample2x(x, "bilinear"), want, atol=1e-6)


def test_nearest_upsample_and_bad_mode():
  x = jnp.arange(4.0).reshape(1, 2, 2, 1)
  np.testing.assert_array_equal(layers.upsample2x(x, "nearest")[0, :, :, 0],
                                [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
  with pytest.raises(ValueError, match="up-sampling mode"):
    layers.upsample2x(x, "bicubic")


def test_conv_module_keeps_size_and_uses_torch_init_bounds():
  conv = layers.Conv(8, 3, stride=2)
  x = jnp.ones((1, 8, 8, 4))
  v = conv.init(jax.random.PRNGKey(0), x)
  assert conv.apply(v, x).shape == (1, 4, 4, 8)
  bound = 1 / np.sqrt(3 * 3 * 4)
  assert float(jnp.abs(v["params"]["kernel"]).max()) <= bound
  assert float(jnp.abs(v["params"]["bias"]).max()) <= bound
