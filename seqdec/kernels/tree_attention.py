"""Tree attention: verify a whole token tree against the KV cache in one kernel.

For the N tree tokens of each batch row b, query head h (kv head k = h // G):

    out[b, h, i] = sum_j softmax_j(s[b, h, i, j]) v_j,   s = scale <q_i, k_j>

over two key sets: (a) the committed cache slots s < lengths[b], and (b) the
tree tokens j whose bit is set in node i's bit-packed ancestor mask
(`seqdec.kernels.tree_mask`), each optionally limited by a sliding window
`pos_i - pos_j < W` (cache slot s has position s). `tree_attention` is the
Pallas kernel, `tree_attention_reference` the dense jnp reference that
materialises the `[B, N, S + N]` mask, and `tree_attention_from_parents`
the kernel's entry point from parent pointers (it builds the packed words
with the `tree_mask` kernel).

Kernel structure (`_tree_attention_tpu`, `_tree_attention_gpu`; the wrapper
and the per-block online-softmax math in `_common` are shared):
* one program per (row, kv head, node tile) processes the tile's rows for
  all G query heads of that kv head (R = G x block_n rows), so each K/V block
  is read once for G heads (grouped-query attention);
* the tree block is processed first, then the cache blocks
  [blk_lo, blk_hi) of the row: blocks past `lengths[b]` (and, with a window,
  wholly before it) are skipped, not masked: never fetched, never computed;
* float32 online softmax (running max m, normaliser l, accumulator acc)
  across blocks; bf16 inputs feed the matmuls with float32 accumulation.

Paper analysis: one verify call, one layer (predictions)
========================================================

Setting: B=8 rows, H=32 query heads, Hkv=8 (G=4), D=128, every row's cache
full (S=4096 committed slots), a tree of N=64 nodes, bf16 K/V/Q (2 bytes).

FLOPs (same for every exact implementation; the kernel does no work on
skipped blocks, so with shorter rows it does proportionally less):
  QK^T 2 B H N (S+N) D = 17.45 GFLOP, PV the same: 34.9 GFLOP in total, plus
  B H N (S+N) = 68.2M exponentials.

Bytes moved from/to HBM:
  kernel: K+V cache 2 B Hkv S D 2 = 134.2 MB (read once: the G heads of a kv
    head share the read), Q 4.19 MB, tree K+V 2.10 MB, packed mask
    B N ceil(N/32) 4 = 4 KB (16 KB as tiled per query row of the G heads),
    lengths 3B int32; output 4.19 MB.  Total 144.7 MB.
    Arithmetic intensity 34.9 GFLOP / 144.7 MB = 241 FLOP/byte (it is
    G N = 256 FLOP per cache byte).
  dense mask, fused (a flash kernel with an additive bias [B, H, N, S+N] in
    bf16, the form TPU flash attention takes): 136.3 MB of bias on top of the
    same K/V/Q: 281.0 MB. (Without GQA support K/V are also repeated per
    query head: 689.9 MB.)
  dense mask, unfused (XLA softmax(QK^T + mask) V, this repo's `dot` path):
    scores [B, H, N, S] f32 written and read back, probabilities written and
    read back (4 x 268.4 MB) plus the bool mask [B, G N, S] 8.4 MB: 1.23 GB.

Predicted time per layer = max(bytes / bandwidth, FLOPs / peak) (perfect
overlap; a lower bound, real kernels reach perhaps 60-80% of it):
  TPU v5e (819 GB/s HBM, 197 TFLOP/s bf16):
    kernel 177 us (memory 177 us, compute 177 us: right at the ridge point),
    dense-bias flash 343 us (1.9x), unfused dense 1.50 ms (8.5x).
  H100 SXM (3.35 TB/s HBM3, 989 TFLOP/s dense bf16):
    kernel 43 us (memory-bound; compute 35 us), dense-bias flash 84 us
    (1.9x), unfused dense 366 us (8.5x).
With half-full rows the kernel's cache reads and FLOPs halve (blocks past
the length are skipped: 77.6 MB, 17.7 GFLOP, v5e 95 us, H100 23 us) while a
dense mask over S pays for all of S. `launch/bench_tree_attention.py`
recomputes these figures for any setting.

These are predictions from the byte and FLOP counts above. No GPU or TPU is
available to this project: the kernels were run only in interpret mode on
CPU (which says nothing about speed) and lowered, not executed, for Mosaic
and Triton.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from seqdec.kernels import _common
from seqdec.kernels._common import kernel_options
from seqdec.kernels import _tree_attention_gpu
from seqdec.kernels import _tree_attention_tpu
from seqdec.kernels.tree_mask import num_words, tree_mask, unpack_mask

__all__ = ["kernel_options", "tree_attention", "tree_attention_from_parents",
           "tree_attention_reference", "DEFAULT_BLOCKS"]

# (block_kv, block_n) defaults: TPU blocks are multiples of the 8 x 128 vreg
# tile; GPU blocks are powers of two >= 16 (Triton), block_n chosen so that
# R = G * block_n is about 128 rows.
DEFAULT_BLOCKS = {"tpu": (512, 128), "gpu": (64, None)}


def _check(q, k_cache, v_cache, lengths, k_tree, v_tree, mask_words,
           positions, sliding_window):
  if q.ndim != 4 or k_cache.ndim != 4:
    raise ValueError(f"q must be [B, H, N, Dh] and k_cache [B, K, S, Dh]; got "
                     f"{q.shape} and {k_cache.shape}")
  b, h, n, dh = q.shape
  _, nk, s, _ = k_cache.shape
  if k_cache.shape[0] != b or k_cache.shape[3] != dh or h % nk:
    raise ValueError(f"k_cache {k_cache.shape} does not fit q {q.shape} "
                     f"(need the same B and Dh, and H a multiple of K)")
  if v_cache.shape != k_cache.shape:
    raise ValueError(f"v_cache {v_cache.shape} != k_cache {k_cache.shape}")
  for name, x in (("k_tree", k_tree), ("v_tree", v_tree)):
    if x.shape != (b, nk, n, dh):
      raise ValueError(f"{name} must be {(b, nk, n, dh)}, got {x.shape}")
  if lengths.shape != (b,):
    raise ValueError(f"lengths must be [{b}], got {lengths.shape}")
  if mask_words.shape != (b, n, num_words(n)):
    raise ValueError(f"mask_words must be {(b, n, num_words(n))} (uint32, "
                     f"see tree_mask), got {mask_words.shape}")
  dtypes = {x.dtype for x in (q, k_cache, v_cache, k_tree, v_tree)}
  if len(dtypes) != 1:
    raise ValueError(f"q, caches and tree K/V must share a dtype, got "
                     f"{sorted(map(str, dtypes))}")
  if sliding_window is not None:
    if positions is None or positions.shape != (b, n):
      raise ValueError(f"a sliding window needs positions [{b}, {n}]")
    if sliding_window <= 0:
      raise ValueError(f"sliding_window must be positive, got "
                       f"{sliding_window}")


def tree_attention_reference(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
    k_tree: jax.Array, v_tree: jax.Array, mask_words: jax.Array, *,
    positions: Optional[jax.Array] = None,
    sliding_window: Optional[int] = None,
    scale: Optional[float] = None) -> jax.Array:
  """Dense reference: softmax over an explicitly materialised mask.

      keys    = [k_cache[b, k, 0:S] ; k_tree[b, k, 0:N]]          [S + N]
      vis     = [s < lengths[b] ; bit j of mask_words[b, i]]      [N, S + N]
                and pos_i - pos_key < sliding_window (cache slot s at s)
      out     = softmax(scale q keys^T where vis, else -inf) [v_cache ; v_tree]

  in float32 (float64 for float64 inputs) at HIGHEST precision; a row with
  no visible key gives 0.
  Arguments as for `tree_attention`.
  """
  _check(q, k_cache, v_cache, lengths, k_tree, v_tree, mask_words, positions,
         sliding_window)
  b, h, n, dh = q.shape
  nk, s = k_cache.shape[1], k_cache.shape[2]
  g = h // nk
  scale = 1.0 / math.sqrt(dh) if scale is None else scale
  f32 = _common.acc_dtype(q.dtype)
  keys = jnp.concatenate([k_cache, k_tree], axis=2).astype(f32)
  vals = jnp.concatenate([v_cache, v_tree], axis=2).astype(f32)
  slot = jnp.arange(s)
  vis_cache = jnp.broadcast_to((slot[None, :] < lengths[:, None])[:, None],
                               (b, n, s))
  vis_tree = unpack_mask(mask_words, n)
  if sliding_window is not None:
    vis_cache &= (positions[:, :, None] - slot) < sliding_window
    vis_tree &= (positions[:, :, None] - positions[:, None, :]) < sliding_window
  vis = jnp.concatenate([vis_cache, vis_tree], axis=2)      # [B, N, S+N]
  qg = q.reshape(b, nk, g, n, dh).astype(f32)
  hi = jax.lax.Precision.HIGHEST
  scores = jnp.einsum("bkgnd,bksd->bkgns", qg, keys, precision=hi) * scale
  vis = vis[:, None, None]
  scores = jnp.where(vis, scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  p = jnp.where(vis, jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bkgns,bksd->bkgnd", p, vals, precision=hi)
  return out.reshape(b, h, n, dh).astype(q.dtype)


def _blocks(platform: str, s: int, n: int, g: int, block_kv, block_n):
  """Resolved (block_kv, block_n, padded G, padded N, tree keys, words)."""
  kv_default, n_default = DEFAULT_BLOCKS[platform]
  if platform == "gpu":
    gp, nkeys = _common.next_pow2(g), max(16, _common.next_pow2(n))
    bn = block_n or max(16, 128 // gp)
    bn = min(_common.next_pow2(bn), nkeys)
    bk = block_kv or math.gcd(kv_default, s)   # largest power of 2 dividing
    if bk & (bk - 1):
      raise ValueError(f"GPU block_kv must be a power of two, got {bk}")
  else:
    gp, nkeys = g, _common.round_up(n, 8)
    bn = min(_common.round_up(block_n or n_default, 8), nkeys)
    bk = block_kv or next((c for c in (kv_default, 256, 128) if s % c == 0),
                          s)                  # a full-S block is always legal
  if s % bk:
    raise ValueError(f"block_kv={bk} must divide the cache length S={s}")
  return bk, bn, gp, _common.round_up(n, bn), nkeys


@functools.partial(jax.jit, static_argnames=(
    "sliding_window", "scale", "block_kv", "block_n", "platform", "interpret",
    "compiler_params"))
def _tree_attention(q, k_cache, v_cache, lengths, k_tree, v_tree, mask_words,
                    positions, *, sliding_window, scale, block_kv, block_n,
                    platform, interpret, compiler_params):
  b, h, n, dh = q.shape
  nk, s = k_cache.shape[1], k_cache.shape[2]
  g = h // nk
  bk, bn, gp, n_pad, nkeys = _blocks(platform, s, n, g, block_kv, block_n)
  nb, rows = n_pad // bn, gp * bn
  w = num_words(n)
  w_pad = _common.next_pow2(w) if platform == "gpu" else w

  # Query tiles [B, K, NB, R, Dh], row r = g * bn + (node within the tile).
  qt = jnp.pad(q.reshape(b, nk, g, n, dh),
               ((0, 0), (0, 0), (0, gp - g), (0, n_pad - n), (0, 0)))
  qt = qt.reshape(b, nk, gp, nb, bn, dh).transpose(0, 1, 3, 2, 4, 5)
  qt = qt.reshape(b, nk, nb, rows, dh)

  def per_row(x):                 # [B, N, C] -> [B, NB, R, C], tiled over G
    x = jnp.pad(x, ((0, 0), (0, n_pad - n), (0, 0))).reshape(b, nb, 1, bn, -1)
    return jnp.broadcast_to(x, (b, nb, gp, bn, x.shape[-1])).reshape(
        b, nb, rows, x.shape[-1])

  # Packed masks as int32, bits of keys >= N cleared (padded keys are zeros).
  node = jnp.arange(32 * w, dtype=jnp.uint32).reshape(w, 32)
  keep = jnp.sum(jnp.where(node < n, jnp.uint32(1) << (node % 32),
                           jnp.uint32(0)), axis=1, dtype=jnp.uint32)
  words = jax.lax.bitcast_convert_type(mask_words.astype(jnp.uint32) & keep,
                                       jnp.int32)
  words = per_row(jnp.pad(words, ((0, 0), (0, 0), (0, w_pad - w))))
  pos = (jnp.zeros((b, n), jnp.int32) if positions is None
         else positions.astype(jnp.int32))
  q_pos = per_row(pos[:, :, None])
  k_pos = jnp.pad(pos, ((0, 0), (0, nkeys - n)))[:, None, :]
  pad_keys = ((0, 0), (0, 0), (0, nkeys - n), (0, 0))
  kt, vt = jnp.pad(k_tree, pad_keys), jnp.pad(v_tree, pad_keys)

  # Live cache blocks of each row: [blk_lo, blk_hi).
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, s)
  blk_hi = (lengths + bk - 1) // bk
  blk_lo = jnp.zeros_like(blk_hi)
  if sliding_window is not None:
    first = jnp.maximum(jnp.min(pos, axis=1) - sliding_window + 1, 0)
    blk_lo = jnp.minimum(first // bk, blk_hi)

  body = _tree_attention_gpu if platform == "gpu" else _tree_attention_tpu
  out = body.call(qt, kt, vt, words, q_pos, k_pos, k_cache, v_cache, lengths,
                  blk_lo, blk_hi, scale=scale, sliding_window=sliding_window,
                  block_kv=bk, interpret=interpret,
                  compiler_params=compiler_params)
  out = out.reshape(b, nk, nb, gp, bn, dh).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(b, nk, gp, n_pad, dh)[:, :, :g, :n].reshape(b, h, n, dh)


def tree_attention(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
    k_tree: jax.Array, v_tree: jax.Array, mask_words: jax.Array, *,
    positions: Optional[jax.Array] = None,
    sliding_window: Optional[int] = None, scale: Optional[float] = None,
    block_kv: Optional[int] = None, block_n: Optional[int] = None,
    platform: Optional[str] = None, interpret: Any = None,
    compiler_params: Any = None) -> jax.Array:
  """Attention of N tree tokens over the committed cache and their ancestors.

  Computes `tree_attention_reference` (see there and the module docstring)
  as one flash-style Pallas kernel: per (row, kv head, node tile), the tree
  block then the row's live cache blocks, float32 online softmax
  (`_common.online_softmax_update`), blocks past `lengths[b]` skipped.

  Args:
    q: `[B, H, N, Dh]` the tree tokens' queries (RoPE applied).
    k_cache, v_cache: `[B, K, S, Dh]`; slots `< lengths[b]` are committed,
      the rest are never read for row b.
    lengths: `[B]` int32 committed lengths, 0 .. S.
    k_tree, v_tree: `[B, K, N, Dh]` the tree tokens' keys/values.
    mask_words: `[B, N, ceil(N/32)]` uint32; bit j of row i: node i sees
      tree token j (`tree_mask(parents)[0]`, or `pack_mask` of any mask).
    positions: `[B, N]` int32 tree token positions; needed for the window.
    sliding_window: None, or W: keys at positions <= pos_i - W are hidden.
    scale: score scale; default 1/sqrt(Dh).
    block_kv: cache slots per block (divides S). Default on TPU the first of
      512, 256, 128 dividing S (else S), on GPU the largest power of two
      <= 64 dividing S (caches sized in multiples of 128 get full blocks).
    block_n: tree nodes per program. Default 128 on TPU (multiple of 8),
      on GPU a power of two >= 16 giving about 128 rows (G x block_n).
    platform: 'tpu' | 'gpu' | None (default backend; CPU runs 'gpu').
    interpret: None (True on CPU), a bool, or `pltpu.InterpretParams()`.
    compiler_params: passed to `pallas_call`, e.g.
      `pallas.triton.CompilerParams(num_warps=4, num_stages=2)` for CUDA.

  Returns:
    `[B, H, N, Dh]` in q's dtype.
  """
  _check(q, k_cache, v_cache, lengths, k_tree, v_tree, mask_words, positions,
         sliding_window)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  return _tree_attention(
      q, k_cache, v_cache, jnp.asarray(lengths), k_tree, v_tree,
      jnp.asarray(mask_words), positions, sliding_window=sliding_window,
      scale=scale, block_kv=block_kv, block_n=block_n,
      platform=_common.resolve_platform(platform),
      interpret=_common.resolve_interpret(interpret),
      compiler_params=compiler_params)


def tree_attention_from_parents(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
    k_tree: jax.Array, v_tree: jax.Array, parents: jax.Array, *,
    positions: Optional[jax.Array] = None,
    sliding_window: Optional[int] = None, scale: Optional[float] = None,
    block_kv: Optional[int] = None, block_n: Optional[int] = None,
    platform: Optional[str] = None, interpret: Any = None,
    compiler_params: Any = None, validate: bool = True) -> jax.Array:
  """`tree_attention` with the tree given by parent pointers.

      words, depth = tree_mask(parents)        (Pallas, bit-packed)
      out          = tree_attention(..., words)

  so node i sees tree token j iff j is i or one of its ancestors (forests
  are allowed: a node with parent -1 hangs from the committed prefix).
  Positions default to `lengths[b] + depth[b, i]`, where a decoding tree
  puts its nodes; pass them explicitly for other layouts.

  Args:
    parents: `[B, N]` int, -1 for children of the committed prefix,
      otherwise an earlier node (see `tree_mask`).
    positions: `[B, N]` int32 or None (`lengths[:, None] + depth`); used
      by the sliding window only.
    validate: check concrete parents on the host (`validate_parents`,
      raises `TreeError`); pass False inside `jit`.
    Other arguments as for `tree_attention` (platform, interpret and
    compiler_params are passed to both kernels).

  Returns:
    `[B, H, N, Dh]` in q's dtype, equal to `tree_attention(..., words)`.
  """
  words, depth = tree_mask(parents, validate=validate, platform=platform,
                           interpret=interpret,
                           compiler_params=compiler_params)
  if positions is None:
    positions = jnp.asarray(lengths, jnp.int32)[:, None] + depth
  return tree_attention(
      q, k_cache, v_cache, lengths, k_tree, v_tree, words,
      positions=positions, sliding_window=sliding_window, scale=scale,
      block_kv=block_kv, block_n=block_n, platform=platform,
      interpret=interpret, compiler_params=compiler_params)
