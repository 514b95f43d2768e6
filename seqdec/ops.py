"""Array primitives shared by every layer (a leaf: imports jax only).

`write_rows` is the per-row slice update behind the KV cache writes and
commits (`seqdec.models.transformer`) and the decoding loops' token buffers
(`seqdec.decoding`); it lives below both so that neither imports the other
for it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Batches up to this size update rows one by one in `write_rows`.
WRITE_ROWS_UNROLL = 16


def write_rows(buf: jax.Array, new: jax.Array, start: jax.Array,
               axis: int = 1) -> jax.Array:
  """buf[b, ..., start[b] : start[b] + T, ...] = new[b] for every row b.

  The slice is along `axis` (T = new.shape[axis]; other axes match buf).
  Up to `WRITE_ROWS_UNROLL` rows: one `dynamic_update_slice` per row, which
  XLA performs in place on a donated buffer (a batched update lowers to a
  scatter, several times slower on CPU for small B). Larger batches use the
  vmapped update: the unrolled form's compile time grows with B (two minutes
  for a B=64 speculative loop).

  Args:
    buf: `[B, ...]`, e.g. a cache buffer `[B, K, S, Dh]` (axis 2) or a token
      buffer `[B, L]` (axis 1).
    new: like buf with T entries along `axis`.
    start: `[B]` int32 offsets along `axis`.
  """
  zero = jnp.zeros((), start.dtype)
  new = new.astype(buf.dtype)
  if buf.shape[0] > WRITE_ROWS_UNROLL:
    return jax.vmap(lambda row, upd, s: jax.lax.dynamic_update_slice_in_dim(
        row, upd, s, axis - 1))(buf, new, start)
  for b in range(buf.shape[0]):
    index = [zero] * buf.ndim
    index[0] = jnp.asarray(b, start.dtype)
    index[axis] = start[b]
    buf = jax.lax.dynamic_update_slice(buf, new[b:b + 1], tuple(index))
  return buf


def argmax_last(x: jax.Array) -> jax.Array:
  """`[..., V] -> [...]` int32: the first index of the largest entry of each
  row (of the first NaN, if any), as `jnp.argmax(x, -1)`:

      m = max_v x[v];   argmax = min { v : x[v] = m or x[v] is NaN }

  Two plain reductions instead of argmax's (value, index) pair reduction,
  which XLA:CPU does not vectorise: ~4x faster over [5, 49152] logits
  (0.22 vs 0.88 ms), and a verify takes several per round.
  """
  m = jnp.max(x, axis=-1, keepdims=True)
  hit = (x == m) | jnp.isnan(x)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where(hit, iota, x.shape[-1]), axis=-1)
