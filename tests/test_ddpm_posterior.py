"""dipjax.ddpm.posterior: with an oracle eps predictor that knows x0, every solver returns x0
(so A x = y) at every NFE, from noise or from a start image, padded, and grey through colour;
arguments checked before any compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dipjax import operators
from dipjax import schedules
from dipjax.ddpm import diffusion
from dipjax.ddpm import posterior
from dipjax.ddpm import solvers
from dipjax.ddpm.unet import UNetConfig

SCHEDULE = schedules.linear()
KEY = jax.random.PRNGKey(0)


def _image(shape, seed=0):
  return np.random.default_rng(seed).uniform(0.05, 0.95, shape).astype(np.float32)


def _oracle(x0_model):
  """The exact eps predictor for x0 (model units, x_t's trailing shape)."""

  def eps(x, t):
    abar = SCHEDULE.alphas_cumprod[t][:, None, None, None]
    return (x - jnp.sqrt(abar) * x0_model) / jnp.sqrt(1.0 - abar)

  return eps


OPERATORS = {
    "inpaint": operators.inpainting(np.random.default_rng(1).random((16, 16)) > 0.5),
    "sr4": operators.downsampler(4),
    "deblur": operators.blur(operators.gaussian_kernel(1.0, 5))}


def _run(name, solver, x0, y, nfe, **kw):
  op = OPERATORS[name]
  eps = _oracle(diffusion.to_model(jnp.asarray(x0)))
  if solver == "dps":
    return posterior.dps(eps, SCHEDULE, op, y, nfe, KEY, **kw)
  return getattr(posterior, solver)(eps, SCHEDULE, op, y, 0.0, nfe, KEY, **kw)


@pytest.mark.parametrize("solver", posterior.SOLVERS)
def test_oracle_returns_x0_at_every_nfe(solver):
  """Every operator at 3 steps from noise; the mask also at 1 and 4 steps and from a start."""
  x0 = _image((16, 16, 3))
  for name, nfes in (("inpaint", (1, 4)), ("sr4", (3,)), ("deblur", (3,))):
    y = OPERATORS[name](jnp.asarray(x0))
    for nfe in nfes:
      out = _run(name, solver, x0, y, nfe, samples=2)
      np.testing.assert_allclose(out, x0, atol=2e-4)
      np.testing.assert_allclose(OPERATORS[name](out), y, atol=2e-4)
  y = OPERATORS["inpaint"](jnp.asarray(x0))
  start = np.clip(x0 + 0.1, 0, 1)  # a DIP-like estimate, forward-noised to t_start
  out = _run("inpaint", solver, x0, y, 2, start=start, t_start=jnp.asarray(150))
  np.testing.assert_allclose(out, x0, atol=2e-4)


def test_data_step_pulls_a_wrong_model_to_the_measurement():
  """With a model that knows a different image, DDNM's output still satisfies A x = y on the
  measured pixels (noise-free), DiffPIR's nearly so, and DPS's residual shrinks."""
  x0, other = _image((16, 16, 3)), _image((16, 16, 3), seed=5)
  op = OPERATORS["inpaint"]
  y = op(jnp.asarray(x0))
  eps = _oracle(diffusion.to_model(jnp.asarray(other)))
  out = posterior.ddnm(eps, SCHEDULE, op, y, 0.0, 5, KEY)
  np.testing.assert_allclose(op(out), y, atol=2e-4)
  out = posterior.diffpir(eps, SCHEDULE, op, y, 0.0, 5, KEY)
  np.testing.assert_allclose(op(out), y, atol=1e-2)
  assert float(jnp.abs(out - other).max()) > 0.1
  # DPS steers x_t through the network's x0(x_t): with eps = 0 (x0 = x_t / sqrt(abar_t)),
  # started from the wrong image near t = 0, its steps shrink the residual.
  residual = lambda x: float(jnp.linalg.norm(op(x) - y))
  out = posterior.dps(lambda x, t: jnp.zeros_like(x), SCHEDULE, op, y, 5, KEY,
                      start=other, t_start=20, scale=1.0)
  assert residual(out) < 0.8 * residual(jnp.asarray(other))


@pytest.mark.parametrize("solver", posterior.SOLVERS)
def test_the_start_as_guide_pulls_a_wrong_model_to_it(solver):
  """A model that knows another image, started from the true one: with the start as the x0
  guide (a small estimated MSE) the missing pixels end nearer the truth than without."""
  x0, other = _image((16, 16, 3)), _image((16, 16, 3), seed=5)
  op = OPERATORS["inpaint"]
  y = op(jnp.asarray(x0))
  eps = _oracle(diffusion.to_model(jnp.asarray(other)))
  args = (eps, SCHEDULE, op, y) + (() if solver == "dps" else (0.0,)) + (3, KEY)
  missing = np.broadcast_to(~np.asarray(op.mask, bool), x0.shape)
  error = {}
  for guide_mse in (None, 1e-4):
    out = getattr(posterior, solver)(*args, start=x0, t_start=100, guide_mse=guide_mse)
    error[guide_mse] = float(np.sqrt(np.mean((np.asarray(out) - x0)[missing] ** 2)))
  assert error[1e-4] < 0.5 * error[None], error


def test_padding_and_grey_through_colour():
  """An oracle of the framed colour image: exact only if the solver frames the image as
  solvers._frame does and corrects the grey mean in every channel."""
  config = UNetConfig(channels=8, channel_mults=(1, 2), num_res_blocks=1, norm_groups=4)
  grey = _image((12, 20, 1))
  framed, _ = solvers._frame(jnp.asarray(grey), config)  # pylint: disable=protected-access
  eps = _oracle(diffusion.to_model(framed))
  op = operators.downsampler(4)
  y = op(jnp.asarray(grey))
  for solver in posterior.SOLVERS:
    args = (eps, SCHEDULE, op, y) + (() if solver == "dps" else (0.0,))
    out = getattr(posterior, solver)(*args, 3, KEY, config=config)
    assert out.shape == grey.shape
    np.testing.assert_allclose(out, grey, atol=2e-4)


def test_bad_arguments():
  op = OPERATORS["sr4"]
  eps = _oracle(jnp.zeros((16, 16, 3)))
  with pytest.raises(ValueError, match="the operator maps"):
    posterior.ddnm(eps, SCHEDULE, op, jnp.zeros((5, 4, 3)), 0.0, 3, KEY,
                   start=jnp.zeros((16, 16, 3)), t_start=10)
  with pytest.raises(ValueError, match="give both"):
    posterior.diffpir(eps, SCHEDULE, op, jnp.zeros((4, 4, 3)), 0.0, 3, KEY, t_start=10)
  with pytest.raises(ValueError, match="nfe"):
    posterior.dps(eps, SCHEDULE, op, jnp.zeros((4, 4, 3)), 0, KEY)
  with pytest.raises(ValueError, match="guide_mse guides by the start image"):
    posterior.ddnm(eps, SCHEDULE, op, jnp.zeros((4, 4, 3)), 0.0, 3, KEY, guide_mse=0.01)
  with pytest.raises(ValueError, match="guide_mse must be >= 0"):
    posterior.ddnm(eps, SCHEDULE, op, jnp.zeros((4, 4, 3)), 0.0, 3, KEY,
                   start=jnp.zeros((16, 16, 3)), t_start=10, guide_mse=-1.0)
  with pytest.raises(ValueError, match="zeta"):
    posterior.diffpir(eps, SCHEDULE, op, jnp.zeros((4, 4, 3)), 0.0, 3, KEY, zeta=2.0)


def test_noisy_blur_does_not_amplify_the_noise():
  """DDNM+ and DiffPIR on a blur with 1% noise, a model that passes on a fifth of x_t's error
  (x0_hat = x0 + 0.2 (x_t / sqrt(abar) - x0)): both end near x0. A scalar DDNM+ lambda (the
  simplified paper's) lets the pseudo-inverse amplify the noise ~50x along the blur's weak
  frequencies: it ended 0.13 away (RMS) where the per-direction lambda ends 0.03."""
  x0 = np.random.default_rng(0).uniform(0.05, 0.95, (32, 32, 3)).astype(np.float32)
  m = diffusion.to_model(jnp.asarray(x0))

  def eps(x, t):
    abar = SCHEDULE.alphas_cumprod[t][:, None, None, None]
    x0_hat = m + 0.2 * (x / jnp.sqrt(abar) - m)
    return (x - jnp.sqrt(abar) * x0_hat) / jnp.sqrt(1.0 - abar)

  op = operators.blur(operators.gaussian_kernel(1.6))
  sigma = 0.01
  y = op(jnp.asarray(x0)) + sigma * jax.random.normal(jax.random.PRNGKey(3), x0.shape)
  for solver in ("ddnm", "diffpir"):
    out = getattr(posterior, solver)(eps, SCHEDULE, op, y, sigma, 20, KEY)
    assert float(jnp.sqrt(jnp.mean((out - x0) ** 2))) < 0.05, solver
