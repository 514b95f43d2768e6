"""Triton (GPU) body of `tree_attention`.

The Triton backend has no scalar prefetch and no scratch memory (jax 0.10),
so this is its own body: grid `(B, K, NB)`, one program per (row, kv head,
node tile); the row's `(length, blk_lo, blk_hi)` arrive as an ordinary
`[B, 4]` int32 operand; the tree block is processed first, then a dynamic
`fori_loop` runs over the live cache blocks `[blk_lo, blk_hi)` only, with m,
l and acc carried in registers. Triton needs power-of-two tiles (>= 16 for
`tl.dot`): the wrapper pads G, the node tile, the tree keys and W.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from seqdec.kernels import _common


def _kernel(meta_ref, q_ref, kt_ref, vt_ref, words_ref, qpos_ref, kpos_ref,
            k_ref, v_ref, o_ref, *, scale: float,
            sliding_window: Optional[int], block_kv: int, num_words: int):
  length, blk_lo, blk_hi = meta_ref[0], meta_ref[1], meta_ref[2]
  q = q_ref[...]
  window = dict(scale=scale, sliding_window=sliding_window)
  q_pos = qpos_ref[...] if sliding_window is not None else None
  k_pos = kpos_ref[...] if sliding_window is not None else None
  cols = [words_ref[:, pl.ds(w, 1)] for w in range(num_words)]
  carry = _common.tree_block(_common.init_carry(*q.shape, q.dtype), q,
                             kt_ref[...], vt_ref[...], cols, q_pos, k_pos,
                             **window)

  def body(block, carry):
    start = block * block_kv
    k = k_ref[pl.ds(start, block_kv), :]
    v = v_ref[pl.ds(start, block_kv), :]
    return _common.cache_block(carry, q, k, v, start, length, q_pos,
                               **window)

  _, l, acc = jax.lax.fori_loop(blk_lo, blk_hi, body, carry)
  o_ref[...] = _common.finish(l, acc).astype(o_ref.dtype)


def call(q, k_tree, v_tree, words, q_pos, k_pos, k_cache, v_cache, lengths,
         blk_lo, blk_hi, *, scale: float, sliding_window: Optional[int],
         block_kv: int, interpret: Any, compiler_params: Any):
  """Runs the GPU body; operands as in `_tree_attention_tpu.call`."""
  b, nk, nb, r, dh = q.shape
  s = k_cache.shape[2]
  ntree, w = k_tree.shape[2], words.shape[3]
  meta = jnp.stack([lengths, blk_lo, blk_hi, jnp.zeros_like(lengths)], axis=1)
  kernel = functools.partial(_kernel, scale=scale,
                             sliding_window=sliding_window,
                             block_kv=block_kv, num_words=w)
  return pl.pallas_call(
      kernel,
      grid=(b, nk, nb),
      in_specs=[
          pl.BlockSpec((None, 4), lambda i, h, n: (i, 0)),
          pl.BlockSpec((None, None, None, r, dh),
                       lambda i, h, n: (i, h, n, 0, 0)),
          pl.BlockSpec((None, None, ntree, dh), lambda i, h, n: (i, h, 0, 0)),
          pl.BlockSpec((None, None, ntree, dh), lambda i, h, n: (i, h, 0, 0)),
          pl.BlockSpec((None, None, r, w), lambda i, h, n: (i, n, 0, 0)),
          pl.BlockSpec((None, None, r, 1), lambda i, h, n: (i, n, 0, 0)),
          pl.BlockSpec((None, 1, ntree), lambda i, h, n: (i, 0, 0)),
          pl.BlockSpec((None, None, s, dh), lambda i, h, n: (i, h, 0, 0)),
          pl.BlockSpec((None, None, s, dh), lambda i, h, n: (i, h, 0, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, None, r, dh),
                             lambda i, h, n: (i, h, n, 0, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=interpret,
      compiler_params=compiler_params,
  )(meta, q, k_tree, v_tree, words, q_pos, k_pos, k_cache, v_cache)
