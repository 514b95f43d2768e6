"""The kernels lower for hardware this machine does not have.

* Mosaic (TPU): `jax.export.export(jax.jit(f), platforms=["tpu"])` runs the
  Pallas TPU lowering on CPU and embeds the Mosaic kernel as a
  `tpu_custom_call` (jax 0.10.2: works without a TPU).
* Triton (GPU): `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`
  with `compiler_params=pallas.triton.CompilerParams(...)` lowers the
  Triton kernel into a `__gpu$xla.gpu.triton` custom call (jax 0.10.2:
  works without a GPU or CUDA).

Lowering is not compiling: Mosaic's and Triton's own compilers (tiling,
VMEM / register limits) run only on the device, so these tests prove the
kernels are expressible in each backend's Pallas dialect, not that they fit.
Shapes are realistic (bf16, Dh=128, S=1024, N=64, G=4).
"""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import triton as pltriton

from seqdec.kernels import tree_attention as ta
from seqdec.kernels import tree_mask as tm

B, H, K, N, S, DH = 2, 16, 4, 64, 1024, 128
sd = jax.ShapeDtypeStruct
ATTN_ARGS = (sd((B, H, N, DH), jnp.bfloat16), sd((B, K, S, DH), jnp.bfloat16),
             sd((B, K, S, DH), jnp.bfloat16), sd((B,), jnp.int32),
             sd((B, K, N, DH), jnp.bfloat16), sd((B, K, N, DH), jnp.bfloat16),
             sd((B, N, 2), jnp.uint32), sd((B, N), jnp.int32))
TRITON = pltriton.CompilerParams(num_warps=4, num_stages=2)


def attention(platform, window, **kw):
  def f(*args):
    return ta.tree_attention(*args[:7], positions=args[7],
                             sliding_window=window, platform=platform,
                             interpret=False, **kw)
  return f


def mask(platform, **kw):
  return lambda p: tm.tree_mask(p, validate=False, platform=platform,
                                interpret=False, **kw)


@pytest.mark.parametrize("window", [None, 256])
def test_tree_attention_lowers_to_mosaic(window):
  exported = jax.export.export(jax.jit(attention("tpu", window)),
                               platforms=["tpu"])(*ATTN_ARGS)
  assert "tpu_custom_call" in exported.mlir_module()


@pytest.mark.parametrize("window", [None, 256])
def test_tree_attention_lowers_to_triton(window):
  lowered = jax.jit(attention("gpu", window, compiler_params=TRITON)).trace(
      *ATTN_ARGS).lower(lowering_platforms=("cuda",))
  assert "triton" in lowered.as_text()


def test_tree_mask_lowers_to_mosaic_and_triton():
  parents = sd((B, N), jnp.int32)
  exported = jax.export.export(jax.jit(mask("tpu")), platforms=["tpu"])(
      parents)
  assert "tpu_custom_call" in exported.mlir_module()
  lowered = jax.jit(mask("gpu", compiler_params=TRITON)).trace(
      parents).lower(lowering_platforms=("cuda",))
  assert "triton" in lowered.as_text()
