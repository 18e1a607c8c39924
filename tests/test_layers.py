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
    ((17, 16), 1, 2, 9, 3), ((34, 34), 4, 3, 3, 1), ((33, 34), 2, 3, 3, 1),
    ((40, 48), 1, 1, 32, 8)])
def test_conv2d_value_and_gradients_match_lax(size, cin, cout, k, stride):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (2, *size, cin))
  w = jax.random.normal(kw, (k, k, cin, cout))
  y = layers.conv2d(x, w, stride)
  np.testing.assert_allclose(y, _lax_conv(x, w, stride), rtol=1e-5, atol=1e-5)
  g = jax.random.normal(kg, y.shape)
  _, vjp = jax.vjp(lambda x, w: layers.conv2d(x, w, stride), x, w)
  _, vjp_ref = jax.vjp(lambda x, w: _lax_conv(x, w, stride), x, w)
  for got, want in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m,size", [(2, (10, 14)), (4, (18, 10))])
def test_winograd_value_and_gradients_match_lax(m, size):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(m), 3)
  x = jax.random.normal(kx, (2, *size, 3))
  w = jax.random.normal(kw, (3, 3, 3, 4))
  f = lambda x, w: layers.winograd_conv3x3(x, w, m)
  ref = lambda x, w: _lax_conv(x, w, 1)
  np.testing.assert_allclose(f(x, w), ref(x, w), rtol=1e-4, atol=1e-4)  # F(4x4): ~1e-5
  g = jax.random.normal(kg, ref(x, w).shape)
  for got, want in zip(jax.vjp(f, x, w)[1](g), jax.vjp(ref, x, w)[1](g)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_conv2d_vmapped_over_weights_equals_one_by_one():
  """The many-fits axis: per-model weights batch the GEMMs (no grouped convolution)."""
  x = jax.random.normal(jax.random.PRNGKey(4), (3, 1, 34, 34, 2))
  w = jax.random.normal(jax.random.PRNGKey(5), (3, 3, 3, 2, 4))
  for stride in (1, 2):
    loss = lambda x, w: jnp.sum(jnp.sin(layers.conv2d(x, w, stride)))
    got = jax.vmap(jax.value_and_grad(loss, (0, 1)))(x, w)
    want = [jax.value_and_grad(loss, (0, 1))(x[i], w[i]) for i in range(3)]
    for i in range(3):
      np.testing.assert_allclose(got[0][i], want[i][0], rtol=1e-5)
      for a, b in zip(got[1], want[i][1]):
        np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-4)


def test_conv2d_gradient_inside_scan_equals_outside():
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 3))
  w = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 3, 4))
  grad = jax.grad(lambda w: jnp.sum(jnp.tanh(layers.conv2d(x, w, 1))))
  scanned = jax.lax.scan(lambda c, _: (c, grad(w)), 0, length=2)[1]
  # Float32 sums of 64 terms, fused differently inside and outside the loop.
  np.testing.assert_allclose(scanned[1], grad(w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 4, 6, 2), (2, 5, 3, 1)])
def test_bilinear_upsample_matches_half_pixel_resize(shape):
  x = jax.random.uniform(jax.random.PRNGKey(3), shape)
  want = jax.image.resize(x, (shape[0], 2 * shape[1], 2 * shape[2], shape[3]), "bilinear")
  np.testing.assert_allclose(layers.upsample2x(x, "bilinear"), want, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 4, 6, 2), (2, 1, 3, 1)])
def test_bilinear_upsample_gradient_matches_resize(shape):
  """The hand-written adjoint (edge-padded 4-tap filter) equals autodiff of the resize."""
  x = jax.random.uniform(jax.random.PRNGKey(4), shape)
  g = jax.random.normal(jax.random.PRNGKey(5), (shape[0], 2 * shape[1], 2 * shape[2], shape[3]))
  resize = lambda x: jax.image.resize(x, g.shape, "bilinear")
  got = jax.vjp(lambda x: layers.upsample2x(x, "bilinear"), x)[1](g)[0]
  np.testing.assert_allclose(got, jax.vjp(resize, x)[1](g)[0], atol=1e-5)


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
