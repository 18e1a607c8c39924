"""A forward model as one object: the operator A and the noise of y = noise(A x).

As deepinv's ``Physics`` pairs an operator with its noise model, :class:`Physics` pairs a
:class:`dipjax.operators.Operator` (what the fit's data term applies) with a noise model of
:mod:`dipjax.noise` (how an observation is drawn, and the noise level the stops take).

  physics = Physics(operators.downsampler(4), noise.GaussianNoise(10 / 255))
  y = physics.measure(x, np.random.default_rng(0))   # (H / 4, W / 4, C)
  sigma = physics.noise_level(y)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from dipjax import noise as noise_lib
from dipjax import operators


@dataclasses.dataclass(frozen=True)
class Physics:
  """y = noise(A x): `operator` A and `noise` its noise model (Gaussian or Poisson)."""
  operator: operators.Operator
  noise: noise_lib.NoiseModel

  def measure(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An observation of the image x (H, W, C) in [0, 1]: float32 of A's measurement shape;
    `rng` (numpy) draws the noise and is advanced."""
    ax = np.asarray(self.operator(jnp.asarray(x, jnp.float32)))
    return self.noise.sample(rng, ax)

  def noise_level(self, y: np.ndarray) -> float:
    """The noise std in observation y (h, w, C), [0, 1] units: known, or estimated from y."""
    return self.noise.level(y)
