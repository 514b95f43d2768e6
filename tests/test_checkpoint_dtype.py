"""Loader dtypes: float64 needs `jax_enable_x64`, and no loader sets it.

Without x64, JAX silently builds float32 arrays from float64 requests; a
loader asked for float64 must refuse with a `CheckpointError` naming the
switch instead of returning a float32 model.
"""

import jax
import jax.numpy as jnp
import pytest

import hf_fixtures
from seqdec.checkpoints import load_pretrained
from seqdec.checkpoints.convert import CheckpointError
from seqdec.checkpoints.hf import load_hf
from seqdec.errors import UserError
from seqdec.models.config import TransformerConfig

X64_HINT = 'jax.config.update("jax_enable_x64", True)'

TINY = TransformerConfig.make(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
    num_heads=2, num_kv_heads=1, head_dim=16, tie_embeddings=True)


def _x64():
  return bool(jax.config.read("jax_enable_x64"))


@pytest.fixture
def no_x64():
  assert not _x64(), "a previous test leaked jax_enable_x64"
  yield
  assert not _x64(), "a loader must never switch jax_enable_x64 on"


def test_tiny_float64_without_x64_raises(no_x64):
  with pytest.raises(CheckpointError) as e:
    load_pretrained("tiny", dtype="float64")
  assert X64_HINT in str(e.value)
  assert "float64" in str(e.value)
  assert isinstance(e.value, UserError)


def test_hf_float64_without_x64_raises(no_x64, tmp_path):
  path = hf_fixtures.write_checkpoint(str(tmp_path), TINY,
                                     hf_fixtures.random_hf_tensors(TINY))
  for kwargs in (dict(dtype="float64"),
                 dict(dtype="float32", param_dtype="float64")):
    with pytest.raises(CheckpointError, match=r"jax_enable_x64"):
      load_hf(path, **kwargs)
    with pytest.raises(CheckpointError, match=r"jax_enable_x64"):
      load_pretrained(path, **kwargs)


def test_unknown_dtype_is_a_checkpoint_error():
  with pytest.raises(CheckpointError, match="float8"):
    load_pretrained("tiny", dtype="float8")


def test_float64_with_x64(x64, tmp_path):
  model, _ = load_pretrained("tiny", dtype="float64")
  assert model.config.dtype == model.config.param_dtype == "float64"
  assert model.embed[...].dtype == jnp.float64
  path = hf_fixtures.write_checkpoint(str(tmp_path), TINY,
                                     hf_fixtures.random_hf_tensors(TINY))
  model, _ = load_hf(path, dtype="float64")
  assert model.embed[...].dtype == jnp.float64


def test_float32_and_bfloat16_need_no_x64(no_x64):
  model, _ = load_pretrained("tiny")
  assert model.embed[...].dtype == jnp.float32
  model, _ = load_pretrained("tiny", dtype="bfloat16")
  assert model.embed[...].dtype == jnp.bfloat16
