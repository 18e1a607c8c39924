"""A tiny random epsilon U-Net saved as a weights file, shared by the DDPM test files."""

import jax
import jax.numpy as jnp
import numpy as np

from dipjax.ddpm import train
from dipjax.ddpm.unet import EpsUNet, UNetConfig

CONFIG = UNetConfig(channels=8, channel_mults=(1, 2), num_res_blocks=1, norm_groups=4)


def tiny_weights(path) -> tuple[str, dict]:
  """Writes a tiny random U-Net (CONFIG) to `path`: (path, params). Drawn on the host (nothing
  to compile): kernels N(0, 1 / fan_in), zero-initialised ones included (so that eps != 0),
  biases N(0, 0.01^2), GroupNorm scales 1."""
  shapes = jax.eval_shape(lambda: EpsUNet(CONFIG).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)))["params"]
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      return jnp.ones(leaf.shape)
    std = 0.01 if name == "bias" else 1 / np.sqrt(np.prod(leaf.shape[:-1]))
    return jnp.asarray(std * rng.standard_normal(leaf.shape), jnp.float32)

  params = jax.tree_util.tree_map_with_path(draw, shapes)
  train.save_weights(path, params, CONFIG)
  return str(path), params


def image(shape, seed=0, lo=0.05, hi=0.95):
  """A uniform random float32 image in [lo, hi]."""
  return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)
