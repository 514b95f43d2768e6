"""Mosaic (TPU) body of `tree_attention`.

Grid `(B, K, NB, 1 + S / Bk)`: batch row, kv head, node tile, and a step
axis whose step 0 is the tree block and step 1 + c is cache block c. The
per-row block range `[blk_lo, blk_hi)` (from the committed length and the
sliding window) is scalar-prefetched into SMEM; the cache index_map clamps
the block index into that range, so a step outside it re-uses the block
already in VMEM (no DMA is issued) and `pl.when` skips its compute. m, l and
acc live in VMEM scratch across the step axis ("arbitrary"); the output tile
is written at the last step.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from seqdec.kernels import _common


def _kernel(len_ref, lo_ref, hi_ref,                     # scalar prefetch
            q_ref, kt_ref, vt_ref, words_ref, qpos_ref, kpos_ref, k_ref, v_ref,
            o_ref, m_sc, l_sc, acc_sc, *, scale: float,
            sliding_window: Optional[int], block_kv: int, num_words: int):
  b, step = pl.program_id(0), pl.program_id(3)
  q = q_ref[...]
  window = dict(scale=scale, sliding_window=sliding_window)
  q_pos = qpos_ref[...] if sliding_window is not None else None

  @pl.when(step == 0)
  def _tree():
    carry = _common.init_carry(*q.shape, q.dtype)
    cols = [words_ref[:, w:w + 1] for w in range(num_words)]
    k_pos = kpos_ref[...] if sliding_window is not None else None
    m, l, acc = _common.tree_block(carry, q, kt_ref[...], vt_ref[...], cols,
                                   q_pos, k_pos, **window)
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

  block = step - 1

  @pl.when((step > 0) & (block >= lo_ref[b]) & (block < hi_ref[b]))
  def _cache():
    carry = (m_sc[...], l_sc[...], acc_sc[...])
    m, l, acc = _common.cache_block(carry, q, k_ref[...], v_ref[...],
                                    block * block_kv, len_ref[b], q_pos,
                                    **window)
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

  @pl.when(step == pl.num_programs(3) - 1)
  def _out():
    o_ref[...] = _common.finish(l_sc[...], acc_sc[...]).astype(o_ref.dtype)


def call(q, k_tree, v_tree, words, q_pos, k_pos, k_cache, v_cache, lengths,
         blk_lo, blk_hi, *, scale: float, sliding_window: Optional[int],
         block_kv: int, interpret: Any, compiler_params: Any):
  """Runs the TPU body on the wrapper's tiled operands.

  Args:
    q: `[B, K, NB, R, Dh]` query tiles (R = G * block_n rows).
    k_tree, v_tree: `[B, K, Nk, Dh]`.
    words: `[B, NB, R, W]` int32 packed masks of each tile row's node.
    q_pos: `[B, NB, R, 1]` int32; k_pos: `[B, 1, Nk]` int32.
    k_cache, v_cache: `[B, K, S, Dh]`.
    lengths, blk_lo, blk_hi: `[B]` int32 (scalar-prefetched).

  Returns:
    `[B, K, NB, R, Dh]` in q's dtype.
  """
  b, nk, nb, r, dh = q.shape
  s = k_cache.shape[2]
  ntree, w = k_tree.shape[2], words.shape[3]
  steps = 1 + s // block_kv
  acc = _common.acc_dtype(q.dtype)

  def kv_map(i, h, n, j, len_ref, lo_ref, hi_ref):
    del n, len_ref
    hi = jnp.maximum(hi_ref[i] - 1, lo_ref[i])
    return i, h, jnp.minimum(jnp.maximum(j - 1, lo_ref[i]), hi), 0

  kernel = functools.partial(_kernel, scale=scale,
                             sliding_window=sliding_window,
                             block_kv=block_kv, num_words=w)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(b, nk, nb, steps),
      in_specs=[
          pl.BlockSpec((None, None, None, r, dh),
                       lambda i, h, n, j, *_: (i, h, n, 0, 0)),
          pl.BlockSpec((None, None, ntree, dh),
                       lambda i, h, n, j, *_: (i, h, 0, 0)),
          pl.BlockSpec((None, None, ntree, dh),
                       lambda i, h, n, j, *_: (i, h, 0, 0)),
          pl.BlockSpec((None, None, r, w), lambda i, h, n, j, *_: (i, n, 0, 0)),
          pl.BlockSpec((None, None, r, 1), lambda i, h, n, j, *_: (i, n, 0, 0)),
          pl.BlockSpec((None, 1, ntree), lambda i, h, n, j, *_: (i, 0, 0)),
          pl.BlockSpec((None, None, block_kv, dh), kv_map),
          pl.BlockSpec((None, None, block_kv, dh), kv_map),
      ],
      out_specs=pl.BlockSpec((None, None, None, r, dh),
                             lambda i, h, n, j, *_: (i, h, n, 0, 0)),
      scratch_shapes=[pltpu.VMEM((r, 1), acc),
                      pltpu.VMEM((r, 1), acc),
                      pltpu.VMEM((r, dh), acc)],
  )
  if compiler_params is None:
    compiler_params = pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=interpret,
      compiler_params=compiler_params,
  )(lengths, blk_lo, blk_hi, q, k_tree, v_tree, words, q_pos, k_pos, k_cache,
    v_cache)
