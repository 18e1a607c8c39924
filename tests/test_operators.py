"""Tests for dipjax.operators."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dipjax import operators


def _image(shape, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), shape)


def _dip_lanczos(factor, support=2):
  """Direct port of DIP's get_kernel(factor, 'lanczos', 0.5, 4 * factor + 1, support)."""
  width = 4 * factor + 1
  kernel = np.zeros([width - 1, width - 1])
  center = (width + 1) / 2.
  for i in range(1, kernel.shape[0] + 1):
    for j in range(1, kernel.shape[1] + 1):
      di = abs(i + 0.5 - center) / factor
      dj = abs(j + 0.5 - center) / factor
      val = 1
      if di != 0:
        val = val * support * np.sin(np.pi * di) * np.sin(np.pi * di / support)
        val = val / (np.pi * np.pi * di * di)
      if dj != 0:
        val = val * support * np.sin(np.pi * dj) * np.sin(np.pi * dj / support)
        val = val / (np.pi * np.pi * dj * dj)
      kernel[i - 1][j - 1] = val
  return kernel / kernel.sum()


def test_identity():
  x = _image((8, 8, 3))
  op = operators.identity()
  np.testing.assert_array_equal(op(x), x)
  assert op.measurement_shape((8, 8, 3)) == (8, 8, 3)


def test_mask_zeroes_masked_pixels_only():
  x = _image((8, 8, 3)) + 0.1
  raw = np.asarray(_image((8, 8), seed=1))
  op = operators.inpainting(raw)
  assert op.mask.shape == (8, 8, 1) and op.mask.dtype == jnp.float32
  known = raw >= 0.5
  y = np.asarray(op(x))
  np.testing.assert_array_equal(y[~known], 0.0)
  np.testing.assert_array_equal(y[known], np.asarray(x)[known])
  assert op(x[None]).shape == (1, 8, 8, 3)


def test_mask_shape_errors():
  with pytest.raises(ValueError, match="mask must have shape"):
    operators.inpainting(np.ones((2, 8, 8, 1)))
  with pytest.raises(ValueError, match="does not fit"):
    operators.inpainting(np.ones((8, 8)))(jnp.ones((4, 4, 3)))


@pytest.mark.parametrize("factor", [2, 4, 8])
@pytest.mark.parametrize("kernel", ["lanczos", "box"])
def test_downsampler_shapes(factor, kernel):
  op = operators.downsampler(factor, kernel)
  for shape in [(16, 24, 1), (16, 24, 3), (2, 16, 24, 3)]:
    out = op.measurement_shape(shape)
    assert out == shape[:-3] + (16 // factor, 24 // factor, shape[-1])
    assert jax.eval_shape(op, jnp.zeros(shape)).shape == out  # traced, not compiled


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_constant_image_stays_constant(factor):
  apply = jax.jit(lambda op, x: op(x))  # The operator is a pytree argument.
  y = apply(operators.downsampler(factor), jnp.full((16, 16, 3), 0.3))
  np.testing.assert_allclose(y, 0.3, rtol=1e-5)


def test_lanczos_kernel_matches_dip():
  op = operators.downsampler(4)
  k = np.asarray(op.kernel)
  assert k.shape == (16, 16) and op.pad == 6
  np.testing.assert_allclose(k, _dip_lanczos(4), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(k, k.T, atol=1e-9)
  np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-9)
  np.testing.assert_allclose(k.sum(), 1.0, rtol=1e-6)


def test_box2_is_block_average():
  x = _image((2, 8, 6, 3))
  want = np.asarray(x).reshape(2, 4, 2, 3, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(operators.downsampler(2, "box")(x), want, rtol=1e-6)


def test_vmap_stacked_masks():
  masks = [np.asarray(_image((8, 8), seed=s)) for s in (1, 2)]
  ops = [operators.inpainting(m) for m in masks]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *ops)
  xs = _image((2, 8, 8, 3))
  ys = jax.vmap(lambda op, x: op(x))(stacked, xs)
  for i in range(2):
    np.testing.assert_array_equal(ys[i], ops[i](xs[i]))


def test_bad_arguments():
  with pytest.raises(ValueError, match="not divisible by the super-resolution factor 4"):
    operators.downsampler(4)(jnp.zeros((250, 250, 3)))
  with pytest.raises(ValueError, match="image size 250x250"):
    operators.downsampler(4).measurement_shape((250, 250, 3))
  with pytest.raises(ValueError, match="factor must be one of"):
    operators.downsampler(3)
  with pytest.raises(ValueError, match="unknown down-sampling kernel"):
    operators.downsampler(2, "bicubic")


@pytest.mark.parametrize("op", [operators.downsampler(2), operators.downsampler(4, "box"),
                                operators.inpainting(np.eye(8)),
                                operators.blur(operators.motion_kernel(1, size=5)),
                                operators.blur(operators.gaussian_kernel(1.0, 5), "reflect")])
def test_gradient_and_adjoint(op):
  x = _image((8, 8, 2))
  y = _image(op.measurement_shape(x.shape), seed=3)
  g = jax.grad(lambda x: op(x).sum())(x)
  assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))
  ax, vjp = jax.vjp(op, x)
  (aty,) = vjp(y)
  np.testing.assert_allclose(jnp.vdot(ax, y), jnp.vdot(x, aty), rtol=1e-5)


def test_blur_is_a_convolution_with_either_boundary():
  x = _image((32, 32, 3))
  shift = np.zeros((5, 5), np.float32)
  shift[2, 3] = 1.0  # k[r, r + 1]: y[i, j] = x[i, j - 1]
  np.testing.assert_allclose(operators.blur(shift)(x), jnp.roll(x, 1, axis=1), atol=1e-6)
  delta = np.zeros((3, 3))
  delta[1, 1] = 1
  for boundary in operators.BOUNDARIES:
    np.testing.assert_allclose(operators.blur(delta, boundary)(x), x, atol=1e-6)
  for kernel in (operators.gaussian_kernel(1.6), operators.motion_kernel(0, size=15)):
    r = kernel.shape[0] // 2
    circular, reflect = (operators.blur(kernel, b)(x) for b in operators.BOUNDARIES)
    np.testing.assert_allclose(circular[r:-r, r:-r], reflect[r:-r, r:-r], atol=1e-5)
    assert operators.blur(kernel)(x[None]).shape == (1, 32, 32, 3)


def test_blur_kernels():
  g = operators.gaussian_kernel(1.6)
  assert g.shape == (11, 11) and g.dtype == np.float32
  np.testing.assert_allclose(g.sum(), 1, rtol=1e-6)
  np.testing.assert_allclose(g, g.T)
  np.testing.assert_allclose(g, g[::-1])
  m = operators.motion_kernel(3)
  np.testing.assert_array_equal(m, operators.motion_kernel(3))  # seeded
  assert not np.array_equal(m, operators.motion_kernel(4))
  assert m.shape == (31, 31) and m.min() >= 0 and abs(m.sum() - 1) < 1e-5
  assert 20 < (m > 0).sum() < 31 * 31 // 2  # a trajectory, not a blob
  np.testing.assert_allclose(operators.blur(np.full((3, 3), 7.0)).kernel, np.full((3, 3), 1 / 9))
  for bad, message in ((np.ones((4, 4)), "odd side"), (np.ones((3, 5)), "square"),
                       (-np.ones((3, 3)), "non-negative"), (np.full((3, 3), np.nan), "finite")):
    with pytest.raises(ValueError, match=message):
      operators.blur(bad)
  with pytest.raises(ValueError, match="boundary must be one of"):
    operators.blur(g, "zero")
  with pytest.raises(ValueError, match="does not fit"):
    operators.blur(operators.motion_kernel(0, size=31))(jnp.zeros((16, 16, 3)))


_SOLVABLE = {
    "identity": operators.identity(),
    "mask": operators.inpainting(np.random.default_rng(0).random((16, 24)) > 0.5),
    "sr2_lanczos": operators.downsampler(2), "sr4_lanczos": operators.downsampler(4),
    "sr8_box": operators.downsampler(8, "box"),
    "blur_mild": operators.blur(operators.gaussian_kernel(0.6)),
    "blur_motion": operators.blur(operators.motion_kernel(2, size=5))}


@pytest.mark.parametrize("name", list(_SOLVABLE))
def test_data_step_projection_and_proximal_point(name):
  """lam = 0 lands on {A x = y} and fixes its points; lam > 0 solves the proximal problem (its
  gradient vanishes); the adjoint is the transpose."""
  op = _SOLVABLE[name]
  x0, x = _image((16, 24, 3)), _image((16, 24, 3), seed=1)
  y = op(x0)
  aty = operators.adjoint(op, y, x.shape)
  np.testing.assert_allclose(jnp.vdot(op(x), y), jnp.vdot(x, aty), rtol=1e-5)
  projected = operators.data_step(op, x, y)
  np.testing.assert_allclose(op(projected), y, atol=2e-6)
  np.testing.assert_allclose(operators.data_step(op, x0, y), x0, atol=2e-6)
  lam = 0.3
  prox = operators.data_step(op, x, y, lam)
  grad = jax.grad(lambda z: jnp.sum((op(z) - y) ** 2) + lam * jnp.sum((z - x) ** 2))(prox)
  np.testing.assert_allclose(grad, 0, atol=2e-6)


def test_downsampler_is_separable_and_its_pseudo_inverse_exact():
  op = operators.downsampler(4)
  x = _image((32, 48, 2))
  dh, dw = op.axis_matrix(32), op.axis_matrix(48)
  np.testing.assert_allclose(jnp.einsum("ih,hwc,jw->ijc", dh, x, dw), op(x), atol=1e-6)
  # A A^+ = I on the low-resolution grid: the data step from 0 gives A^+ y with A A^+ y = y.
  y = _image((8, 12, 2), seed=2)
  np.testing.assert_allclose(op(operators.data_step(op, jnp.zeros_like(x), y)), y, atol=2e-6)


def test_data_step_batched_and_reflect_refused():
  op = _SOLVABLE["sr4_lanczos"]
  xs = _image((2, 16, 24, 3))
  ys = op(_image((2, 16, 24, 3), seed=4))
  np.testing.assert_allclose(operators.data_step(op, xs, ys)[1],
                             operators.data_step(op, xs[1], ys[1]), atol=1e-6)
  reflect = operators.blur(operators.gaussian_kernel(1.0, 5), "reflect")
  with pytest.raises(ValueError, match="needs a circular blur"):
    operators.data_step(reflect, xs[0], xs[0])


@pytest.mark.parametrize("name,op", [
    ("identity", operators.identity()),
    ("mask", operators.inpainting(jnp.asarray(
        np.random.default_rng(0).random((64, 64, 1)) > 0.5, jnp.float32))),
    ("sr4", operators.downsampler(4)),
    ("blur", operators.blur(operators.gaussian_kernel(1.6))),
])
def test_white_noise_gain_is_the_measured_energy_of_white_noise(name, op):
  """E (A z)_i^2 over the measured entries (a mask's known pixels) away from the border (the
  down-sampler's edge padding repeats pixels there), for z ~ N(0, 1) white."""
  z = jax.random.normal(jax.random.PRNGKey(1), (8, 64, 64, 3))
  az = np.asarray(op(z))
  if name == "mask":
    az = az[np.broadcast_to(np.asarray(op.mask) > 0, az.shape)]
  if name == "sr4":
    az = az[:, 2:-2, 2:-2]
  assert np.mean(np.square(az)) == pytest.approx(op.white_noise_gain(), rel=0.03), name
