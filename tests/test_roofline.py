"""The accelerator cost model (`seqdec.roofline`, launch/tpu_estimates.py)."""

import math

import jax
from flax import nnx

from seqdec import roofline, testing
from seqdec.models.config import PRESETS


def test_parameter_count_equals_the_models_matrices():
  model = testing.tiny_model()
  sizes = {"/".join(map(str, path)): math.prod(x.shape)
           for path, x in jax.tree_util.tree_leaves_with_path(
               nnx.state(model, nnx.Param))}
  matrices = sum(n for name, n in sizes.items()
                 if "norm" not in name and "bias" not in name)
  assert roofline.parameter_counts(model.config)["total"] == matrices
  # Published sizes: SmolLM2-135M (134.5M), Llama-2-7B (6.74B).
  assert round(roofline.parameter_counts(PRESETS["smollm2-135m"])["total"]
               / 1e6, 1) == 134.5
  assert round(roofline.parameter_counts(PRESETS["llama-2-7b"])["total"]
               / 1e9, 2) == 6.74


def test_decoding_is_memory_bound_until_the_ridge_point():
  c, chip = PRESETS["llama-2-7b"], roofline.TPU_V5E
  t = {n: roofline.predicted_seconds(
      roofline.forward_cost(c, batch=1, new_tokens=n, context=1024, chips=8),
      chip, allreduce_latency=0.0) for n in (1, 16, 64, 4096)}
  assert t[16] / t[1] < 1.1          # a 16-token verify ~ one step
  assert t[4096] / t[1] > 5          # compute-bound far past the ridge
  # Tensor parallelism: per-chip bytes are an eighth, plus ICI traffic.
  one = roofline.forward_cost(c, batch=1, new_tokens=1, context=1024)
  tp = roofline.forward_cost(c, batch=1, new_tokens=1, context=1024, chips=8)
  assert math.isclose(tp["bytes"] * 8, one["bytes"])
  assert one["ici_bytes"] == 0 and tp["ici_bytes"] > 0
