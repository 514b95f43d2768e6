"""Pieces shared by the Pallas kernels: backend choice and online softmax.

Both attention bodies (Mosaic TPU in `_tree_attention_tpu`, Triton GPU in
`_tree_attention_gpu`) call `online_softmax_update` once per key block; only
the way a block is fetched (grid step + scalar-prefetched block index on TPU,
`fori_loop` + `pl.ds` on GPU) differs.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

# Finite "minus infinity" for masked scores: exp(MASK_VALUE - m) underflows to
# 0 for any real m, and MASK_VALUE - MASK_VALUE stays finite (no NaN).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

PLATFORMS = ("tpu", "gpu")


def resolve_platform(platform: Optional[str]) -> str:
  """'tpu' | 'gpu'; None picks the default backend's (CPU runs 'gpu').

  On CPU every kernel runs in interpret mode, where both bodies cost the
  same (27 ms each at B=4, H=8, N=32, S=1024, Dh=64 on 2 cores); 'gpu' is
  the CPU default, and tests run both.
  """
  if platform is None:
    return "tpu" if jax.default_backend() == "tpu" else "gpu"
  if platform not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; expected one of "
                     f"{PLATFORMS} or None")
  return platform


def resolve_interpret(interpret: Any) -> Any:
  """None -> True exactly when running on CPU (Pallas has no CPU lowering).

  Anything else (a bool, or `pltpu.InterpretParams()` for the TPU-semantics
  simulator) is passed to `pallas_call` unchanged.
  """
  if interpret is None:
    return jax.default_backend() == "cpu"
  return interpret


def kernel_options(platform: Optional[str]) -> dict[str, Any]:
  """Keyword arguments of a kernel call built for `platform`.

  None or 'cpu' (the model runs on its default backend): {} -- the kernel
  picks its body by backend and is interpreted on CPU. 'tpu': the Mosaic
  body, compiled (interpret=False). 'gpu': the Triton body, compiled, with
  Triton compiler parameters (4 warps, 2 stages). A named accelerator is
  what lowering on a host without it (`jax.export`) needs.
  """
  if platform in (None, "cpu"):
    return {}
  if platform == "tpu":
    return dict(platform="tpu", interpret=False)
  if platform == "gpu":
    from jax.experimental.pallas import triton  # pylint: disable=g-import-not-at-top
    return dict(platform="gpu", interpret=False,
                compiler_params=triton.CompilerParams(num_warps=4,
                                                      num_stages=2))
  raise ValueError(f"unknown platform {platform!r}; expected None, 'cpu', "
                   f"'tpu' or 'gpu'")


def next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def round_up(n: int, m: int) -> int:
  return -(-int(n) // m) * m


def ancestor_bits(word_columns: Sequence[jax.Array],
                  num_keys: int) -> jax.Array:
  """Unpacks bit-packed rows: W columns `[R, 1]` int32 -> `[R, num_keys]`.

      bit[r, j] = (words[r, j // 32] >> (j % 32)) & 1

  The columns are read from the kernel's ref one at a time (Triton cannot
  slice a loaded value), and combined with broadcasts, selects and shifts
  only (no gather, no lane concatenation, and & / >> instead of % / //, whose
  sign handling Mosaic cannot lower off-TPU), so the same code lowers on
  Mosaic, Triton and XLA.
  """
  rows = word_columns[0].shape[0]
  lane = jax.lax.broadcasted_iota(jnp.int32, (rows, num_keys), 1)
  word = jnp.zeros(lane.shape, jnp.int32)
  for w, column in enumerate(word_columns):
    word = jnp.where(lane >> 5 == w, column, word)
  return (jax.lax.shift_right_logical(word, lane & 31) & 1) == 1


def online_softmax_update(
    carry: tuple[jax.Array, jax.Array, jax.Array],
    scores: jax.Array, visible: jax.Array, v: jax.Array,
    dot: Callable[[jax.Array, jax.Array], jax.Array],
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One flash-attention step over a key block, in float32.

  With running row max m, normaliser l and unnormalised output acc:

      s      = scores where visible, else MASK_VALUE       [R, Bk]
      m'     = max(m, max_j s_j)
      alpha  = exp(m - m')
      p_j    = exp(s_j - m') if visible_j else 0
      l'     = alpha l + sum_j p_j
      acc'   = alpha acc + p v                             [R, Dh]

  After the last block, out = acc / l. Masked entries contribute exactly 0
  (the select, not only the mask value), so a row whose block is entirely
  masked is left unchanged, whatever its running max.

  Args:
    carry: `(m [R, 1], l [R, 1], acc [R, Dh])` float32.
    scores: `[R, Bk]` float32, already scaled.
    visible: `[R, Bk]` bool.
    v: `[Bk, Dh]` values (p is cast to v's dtype for the matmul, with
      float32 accumulation: bf16 MXU / tensor-core inputs on accelerators).
    dot: `(a [M, K], b [K, N]) -> [M, N]` float32, the backend's matmul.
  """
  m, l, acc = carry
  s = jnp.where(visible, scores, MASK_VALUE)
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  alpha = jnp.exp(m - m_new)
  p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
  l_new = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  acc_new = alpha * acc + dot(p.astype(v.dtype), v)
  return m_new, l_new, acc_new


def finish(l: jax.Array, acc: jax.Array) -> jax.Array:
  """out = acc / l, and 0 for rows that saw no key (l = 0: padding)."""
  return jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)


def acc_dtype(dtype) -> jnp.dtype:
  """Accumulation dtype: float32, or float64 for float64 inputs (x64 tests)."""
  return jnp.promote_types(dtype, jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b, float32 accumulation: `[M, K] x [K, N] -> [M, N]`."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                             preferred_element_type=acc_dtype(a.dtype))


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b^T, float32 accumulation: `[M, K] x [N, K] -> [M, N]`."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             preferred_element_type=acc_dtype(a.dtype))


def tree_block(carry, q: jax.Array, k: jax.Array, v: jax.Array,
               word_columns: Sequence[jax.Array], q_pos: Optional[jax.Array],
               k_pos: Optional[jax.Array], *, scale: float,
               sliding_window: Optional[int]):
  """Online-softmax step over the tree's own keys, under the ancestor bits.

      s[r, j]   = scale <q_r, k_j>                      [R, Nk]
      vis[r, j] = bit j of node(r)'s words  and  q_pos[r] - k_pos[j] < window

  Args:
    carry: `(m, l, acc)`, see `online_softmax_update`.
    q: `[R, Dh]` query rows (all G heads of one kv head, node tile).
    k, v: `[Nk, Dh]` the tree's keys/values.
    word_columns: W columns `[R, 1]` int32 of the rows' packed masks.
    q_pos, k_pos: `[R, 1]` and `[1, Nk]` int32 positions (window only).
  """
  s = dot_nt(q, k) * scale
  vis = ancestor_bits(word_columns, k.shape[0])
  if sliding_window is not None:
    vis &= (q_pos - k_pos) < sliding_window
  return online_softmax_update(carry, s, vis, v, dot_nn)


def cache_block(carry, q: jax.Array, k: jax.Array, v: jax.Array,
                start: jax.Array, length: jax.Array,
                q_pos: Optional[jax.Array], *, scale: float,
                sliding_window: Optional[int]):
  """Online-softmax step over committed cache slots start .. start + Bk - 1.

      s[r, c]   = scale <q_r, k_c>                      [R, Bk]
      vis[r, c] = start + c < length  and  q_pos[r] - (start + c) < window

  Only a row's boundary blocks have invisible slots; blocks wholly past
  `length` (or wholly before the window) are never fetched or computed.
  """
  s = dot_nt(q, k) * scale
  slot = start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
  vis = slot < length
  if sliding_window is not None:
    vis &= (q_pos - slot) < sliding_window
  return online_softmax_update(carry, s, vis, v, dot_nn)


def init_carry(rows: int, head_dim: int, dtype=jnp.float32):
  """(m, l, acc) before the first block: m = MASK_VALUE, l = acc = 0."""
  dtype = acc_dtype(dtype)
  return (jnp.full((rows, 1), MASK_VALUE, dtype),
          jnp.zeros((rows, 1), dtype), jnp.zeros((rows, head_dim), dtype))
