"""The tiers' optimisation level (tests/conftest.py, CONTRIBUTING.md):
XLA's backend optimisations follow JAX_DISABLE_MOST_OPTIMIZATIONS (the
Makefile sets it for both tiers), and `realmodel` tests, with the
subprocesses they start, compile fully optimised."""

import os

import jax
import pytest


def test_a_tiny_model_test_follows_the_environment():
  want = os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "0") in ("1",
                                                                    "true")
  assert jax.config.values["jax_disable_most_optimizations"] == want


@pytest.mark.realmodel
def test_a_realmodel_test_compiles_optimised():
  assert jax.config.values["jax_disable_most_optimizations"] is False
  assert os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "0"
