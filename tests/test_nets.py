"""Network shapes, the DIP paper's F16 parameter count, and bad configurations."""

import math

import jax
import jax.numpy as jnp
import pytest

from dipjax import nets


def _num_params(net, in_channels, size=64):
  x = jnp.zeros((1, size, size, in_channels))
  variables = jax.eval_shape(net.init, jax.random.PRNGKey(0), x)
  return sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"]))


def test_paper_f16_has_the_original_parameter_count():
  assert _num_params(nets.paper_f16(), in_channels=32) == 2_217_831


@pytest.mark.parametrize("name", nets.NETS)
def test_nets_map_input_size_to_output_in_unit_range(name):
  net = nets.make(name, width=4, scales=3, out_channels=1)
  x = jax.random.uniform(jax.random.PRNGKey(0), (1, 16, 16, 2))
  variables = jax.jit(net.init)(jax.random.PRNGKey(1), x)
  y, updates = jax.jit(lambda v, x: net.apply(v, x, mutable=["batch_stats"]))(variables, x)
  assert y.shape == (1, 16, 16, 1)
  assert float(y.min()) >= 0 and float(y.max()) <= 1
  assert "batch_stats" in updates
  assert net.multiple == 8 if name != "unet" else net.multiple == 4


def test_hourglass_has_no_skip_branch():
  with_skip = _num_params(nets.make("skip", width=8, scales=2), 3, 16)
  without = _num_params(nets.make("hourglass", width=8, scales=2), 3, 16)
  assert without < with_skip


def test_bad_network_name_and_width():
  with pytest.raises(ValueError, match="unknown network"):
    nets.make("resnet")
  with pytest.raises(ValueError, match="positive"):
    nets.make("skip", width=0)


def test_bfloat16_compute_keeps_float32_params_and_output():
  """Mixed precision: same float32 parameters, bf16 activations (Winograd layer included)."""
  x = jax.random.uniform(jax.random.PRNGKey(0), (1, 32, 32, 4))
  f32, bf16 = (nets.make("skip", width=8, scales=2, dtype=d) for d in (jnp.float32, jnp.bfloat16))
  variables = jax.jit(f32.init)(jax.random.PRNGKey(1), x)
  apply = lambda net: jax.jit(lambda v: net.apply(v, x, mutable=["batch_stats"])[0])(variables)
  y32, y16 = apply(f32), apply(bf16)
  assert y16.dtype == jnp.float32
  assert float(jnp.abs(y16 - y32).max()) < 0.05
  grads = jax.jit(jax.grad(lambda p: jnp.sum(bf16.apply({**variables, "params": p}, x,
                                                        mutable=["batch_stats"])[0])))(
                                                            variables["params"])
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
