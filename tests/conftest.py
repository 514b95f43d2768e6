"""Shared pytest set-up: float32 by default, fixtures for tiny models.

Tests that need float64 use the `x64` fixture (enables `jax_enable_x64` for the
test only). Multi-device tests run in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8, never here.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import pytest


@pytest.fixture
def x64():
  """Runs a test with 64-bit JAX types enabled."""
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", False)
