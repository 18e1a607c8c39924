"""Tests for dipjax.checkpoint."""

from __future__ import annotations

import gc
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dipjax import checkpoint


@flax.struct.dataclass
class _State:
  params: dict
  opt_state: optax.OptState
  key: jax.Array
  step: jax.Array


_TX = optax.adam(1e-2)
_adam_update = jax.jit(_TX.update)  # one compile instead of many eager ops: keeps the test fast


def _state(seed: int, extra_layer: bool = False) -> _State:
  rng = np.random.default_rng(seed)
  params = {"enc": {"w": jnp.asarray(rng.standard_normal((3, 3, 2, 4), np.float32)),
                    "b": jnp.zeros((4,))},
            "dec": {"w": jnp.asarray(rng.standard_normal((4, 2), np.float32))}}
  if extra_layer:
    params["out"] = {"w": jnp.ones((2, 1))}
  _, opt_state = _adam_update(params, _TX.init(params))  # non-zero moments and count
  return _State(params, opt_state, jax.random.PRNGKey(seed), jnp.int32(seed))


def _assert_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_bit_exact(tmp_path):
  s1, s2 = _state(1), _state(2)
  assert s1.key.dtype == jnp.uint32
  checkpoint.save(tmp_path, 1, s1)
  checkpoint.save(tmp_path, 2, s2)
  assert checkpoint.latest_step(tmp_path) == 2
  _assert_identical(checkpoint.load(tmp_path, _state(0)), s2)
  _assert_identical(checkpoint.load(tmp_path, _state(0), step=1), s1)


def test_relative_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  checkpoint.save("ckpt", 5, _state(5))
  assert checkpoint.latest_step(os.path.join(tmp_path, "ckpt")) == 5


def test_keep_prunes(tmp_path):
  for step in (10, 20, 30):
    checkpoint.save(tmp_path, step, _state(step), keep=2)
  assert checkpoint.latest_step(tmp_path) == 30
  assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [20, 30]
  with pytest.raises(FileNotFoundError, match="step 10"):
    checkpoint.load(tmp_path, _state(0), step=10)


def test_save_over_existing_step_is_an_error(tmp_path):
  checkpoint.save(tmp_path, 3, _state(3))
  with pytest.raises(ValueError, match="already has step 3"):
    checkpoint.save(tmp_path, 2, _state(2))


# Orbax leaves a failed restore's reads, or its event loop, to the garbage collector: here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_mismatched_structure(tmp_path):
  checkpoint.save(tmp_path, 1, _state(1))
  with pytest.raises(ValueError, match="cannot read checkpoint 1 in .*: it is damaged or of another run"):
    checkpoint.load(tmp_path, _state(0, extra_layer=True))
  wrong_shape = _state(0).replace(key=jnp.zeros((4,), jnp.uint32))
  with pytest.raises(ValueError, match="cannot read checkpoint 1 in .*: it is damaged or of another run"):
    checkpoint.load(tmp_path, wrong_shape)
  gc.collect()


# Orbax leaves a failed restore's reads, or its event loop, to the garbage collector: here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_checkpoint(tmp_path):
  assert checkpoint.latest_step(tmp_path) is None
  assert checkpoint.latest_step(tmp_path / "missing") is None
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.load(tmp_path, _state(0))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.load(tmp_path / "missing", _state(0))
  assert not (tmp_path / "missing").exists()
  gc.collect()
