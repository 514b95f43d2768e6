"""A decoder-only transformer in Flax NNX with an explicit, tree-ready KV
cache: the Llama family (Llama, Qwen2, Mistral, SmolLM2) and Gemma 3, as
points of one `TransformerConfig`.

Shapes follow the legend of `seqdec.shapes`: B batch rows, T new tokens in
this call, S cache slots, D model width, H query heads, K key/value heads,
G = H / K, Dh head size, F MLP width, V vocabulary, L layers.

The cache and mask contract (everything in `seqdec.decoding` relies on it):

* `KVCache.kv` is a tuple of per-layer `(k, v)` arrays `[B, K, S, Dh]`;
  `KVCache.length` `[B]` int32 counts the *committed* tokens of each row.
  Committed tokens are contiguous and slot `s` holds position `s`.
* A forward call takes new tokens `[B, T]`, their positions `[B, T]`, the cache
  and an optional boolean mask `[B, T, T]` among the new tokens (default:
  causal). New token `t` of row `b` attends to the committed slots
  `s < length[b]` and to new token `u` iff `mask[b, t, u]`. The new tokens'
  K/V are written to the scratch slots `length[b] .. length[b] + T - 1`; the
  returned cache keeps `length` unchanged, so nothing is committed yet.
* Scratch window (tree drafting, level by level): the mask may be wider,
  `[B, T, W]` with W >= T. Then the scratch window is the W slots from
  `length[b]`; its first W - T entries hold K/V written by earlier calls of
  the same round (earlier tree levels), the T new tokens are written to its
  last T entries, and new token t sees window entry u iff `mask[b, t, u]`.
* `commit(cache, keep_index, n_keep)` moves the kept new tokens' K/V down to
  contiguous slots and advances `length` by `n_keep`. Autoregressive decoding is
  "forward T=1, commit it"; speculative decoding is "forward the tree, commit the
  accepted path"; a rejected draft costs nothing to roll back.

The caller guarantees `length[b] + T <= S` (the generators size the cache on the
host and raise a clear error otherwise): `dynamic_update_slice` would silently
clamp an out-of-range write.
"""

from __future__ import annotations

import math
import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from seqdec.kernels import packed_matmul
from seqdec.kernels.packed_matmul import PackedWeight
from seqdec.kernels.tree_attention import kernel_options, tree_attention
from seqdec.kernels.tree_mask import pack_mask
from seqdec.models.config import PRECISIONS, TransformerConfig, as_dtype
from seqdec.ops import write_rows
from seqdec.parallel.sharding import DATA as DATA_AXIS, kv_head_axis

# Logical axis names carried by every parameter as sharding metadata.
# (MLP_DIM, not MLP: `class MLP` below would rebind the name.)
EMBED, VOCAB, HEADS, KV_HEADS, HEAD_DIM, MLP_DIM = (
    "embed", "vocab", "heads", "kv_heads", "head_dim", "mlp")


class KVCache(NamedTuple):
  """Explicit KV cache pytree.

  Attributes:
    kv: per-layer `(k, v)`, each `[B, K, S, Dh]`.
    length: `[B]` int32, committed tokens per row.
  """
  kv: tuple[tuple[jax.Array, jax.Array], ...]
  length: jax.Array

  @property
  def max_len(self) -> int:
    return self.kv[0][0].shape[2]

  @property
  def batch_size(self) -> int:
    return self.kv[0][0].shape[0]


def init_cache(config: TransformerConfig, batch_size: int, max_len: int,
               dtype=None) -> KVCache:
  """An empty cache with `max_len` slots per row (K/V in `config.dtype`)."""
  dtype = as_dtype(dtype or config.dtype)
  shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
  kv = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
             for _ in range(config.num_layers))
  return KVCache(kv=kv, length=jnp.zeros((batch_size,), jnp.int32))


def commit(cache: KVCache, n_keep: jax.Array,
           keep_index: Optional[jax.Array] = None,
           layers: Optional[Sequence[int]] = None) -> KVCache:
  """Commits kept new tokens: compacts their K/V and advances `length`.

  After a forward over T new tokens (K/V in scratch slots `length .. length+T-1`),
  row b keeps the new tokens `keep_index[b, :n_keep[b]]` (indices into the T new
  tokens, in path order):

      slot[length[b] + j] <- slot[length[b] + keep_index[b, j]],  j < T
      length[b]           <- length[b] + n_keep[b]

  Slots past the new length are scratch and may hold anything.

  Args:
    cache: the cache returned by the forward call.
    n_keep: `[B]` int32, how many new tokens each row keeps (0 .. T).
    keep_index: `[B, T]` int32 or None. None keeps a prefix (0, 1, ...), which
      needs no data movement: the autoregressive and prefill case.
    layers: the entries of `cache.kv` that are `(k, v)` pairs (None: all);
      the others (a hybrid model's recurrent states) pass through.

  Returns:
    The committed cache.
  """
  n_keep = jnp.asarray(n_keep, jnp.int32)
  if keep_index is None:
    return KVCache(kv=cache.kv, length=cache.length + n_keep)
  keep_index = jnp.asarray(keep_index, jnp.int32)
  src = (cache.length[:, None] + keep_index)[:, None, :, None]  # [B,1,T,1]

  def move(buf):
    return write_rows(buf, jnp.take_along_axis(buf, src, axis=2),
                      cache.length, axis=2)

  moved = set(range(len(cache.kv)) if layers is None else layers)
  kv = tuple((move(e[0]), move(e[1])) if i in moved else e
             for i, e in enumerate(cache.kv))
  return KVCache(kv=kv, length=cache.length + n_keep)


class NewKV(NamedTuple):
  """K/V of T new tokens that a deferred-write call (`run_blocks(...,
  defer_writes=True)`) computed but did not put in the cache: `kv[i]` block
  i's `(k, v)`, each `[B, T, K, Dh]` (new tokens on axis 1, as every leaf
  of a call's outputs), or None for a block not run."""
  kv: tuple[Optional[tuple[jax.Array, jax.Array]], ...]


def write_new(cache: KVCache, new: NewKV) -> KVCache:
  """The cache with `new`'s K/V in the scratch slots `length[b] .. length[b]
  + T - 1` (`length` unchanged): what the call without deferred writes
  returns. Outside a `lax.cond` the writes are in place on a donated cache;
  inside a branch XLA:CPU copies every buffer it updates."""
  kv = tuple(e if n is None else tuple(
      write_rows(buf, x.transpose(0, 2, 1, 3), cache.length, 2)
      for buf, x in zip(e, n)) for e, n in zip(cache.kv, new.kv))
  return KVCache(kv=kv, length=cache.length)


def causal_mask(batch_size: int, num_tokens: int) -> jax.Array:
  """`[B, T, T]` lower-triangular boolean mask."""
  m = jnp.tril(jnp.ones((num_tokens, num_tokens), jnp.bool_))
  return jnp.broadcast_to(m, (batch_size, num_tokens, num_tokens))


def attention_visibility(length: jax.Array, positions: jax.Array,
                         mask: jax.Array, num_slots: int,
                         sliding_window: Optional[int],
                         window_positions: Optional[jax.Array] = None
                         ) -> jax.Array:
  """Which cache slots each new token sees, `[B, T, S]` bool.

  With the scratch window of W = mask.shape[2] slots starting at length[b]:

  visible[b, t, s] = s < length[b]                                (committed)
                   or (0 <= s - length[b] < W and mask[b, t, s - length[b]])

  and, with a sliding window, additionally q_pos - k_pos < sliding_window,
  where k_pos = s for committed slots and the new tokens' `positions` for the
  last T window entries. Earlier window entries (W > T) take their
  positions from `window_positions` `[B, W - T]` when given (e.g. a
  teacher-forced pass whose window holds another pass's K/V of the whole
  sequence); otherwise they are tree nodes of this round at positions
  >= length[b], inside any window wider than W (checked).
  """
  b, t = positions.shape
  w = mask.shape[2]
  slot = jnp.arange(num_slots, dtype=jnp.int32)
  rel = slot[None, :] - length[:, None]                          # [B, S]
  in_window = (rel >= 0) & (rel < w)
  idx = jnp.broadcast_to(jnp.clip(rel, 0, w - 1)[:, None, :], (b, t, num_slots))
  new_vis = jnp.take_along_axis(mask, idx, axis=2) & in_window[:, None, :]
  visible = (rel < 0)[:, None, :] | new_vis
  if sliding_window is not None:
    if w > t and sliding_window <= w and window_positions is None:
      raise ValueError(f"a scratch window of {w} slots needs a sliding window "
                       f"wider than it, got {sliding_window}")
    rel_new = jnp.clip(rel - (w - t), 0, t - 1)
    k_pos = jnp.where(rel < w - t, slot[None, :],
                      jnp.take_along_axis(positions, rel_new, axis=1))
    if window_positions is None:
      earlier = length[:, None]
    else:
      earlier = jnp.take_along_axis(
          window_positions, jnp.clip(rel, 0, max(w - t - 1, 0)), axis=1)
    k_pos = jnp.where((rel >= 0) & (rel < w - t), earlier, k_pos)
    visible &= (positions[:, :, None] - k_pos[:, None, :]) < sliding_window
  return visible


class SplitVisibility(NamedTuple):
  """What T new tokens see when their K/V are not yet in the cache (a
  deferred-write call, `run_blocks(defer_writes=True)`): `cache` `[B, T, S]`
  over the committed slots, `new` `[B, T, T]` among the new tokens."""
  cache: jax.Array
  new: jax.Array


def split_visibility(length: jax.Array, positions: jax.Array, mask: jax.Array,
                     num_slots: int, sliding_window: Optional[int]
                     ) -> SplitVisibility:
  """`attention_visibility` of a call without a scratch window (W = T), in
  two parts:

      cache[b, t, s] = s < length[b]         and q_pos - s < window
      new[b, t, u]   = mask[b, t, u]         and q_pos - pos[b, u] < window

  with q_pos = positions[b, t] (committed slot s holds position s); the
  window terms only with a sliding window."""
  slot = jnp.arange(num_slots, dtype=jnp.int32)
  cache = jnp.broadcast_to((slot[None, :] < length[:, None])[:, None, :],
                           (*positions.shape, num_slots))
  new = mask
  if sliding_window is not None:
    q_pos = positions[:, :, None]
    cache = cache & (q_pos - slot[None, None, :] < sliding_window)
    new = new & (q_pos - positions[:, None, :] < sliding_window)
  return SplitVisibility(cache=cache, new=new)


def rope_inv_freq(config: TransformerConfig, local: bool = False
                  ) -> np.ndarray:
  """RoPE inverse frequencies `[Dh/2]` (float64), with HF's scaling rules.

  default: inv_freq_i = theta^(-2i/Dh); theta is `rope_local_theta` for
    local layers (`local=True`, Gemma 3), which take no scaling.
  linear:  inv_freq_i / factor.
  llama3:  wavelengths longer than L0/low_freq_factor are divided by `factor`,
    shorter than L0/high_freq_factor are kept, and the band between is
    interpolated with s = (L0/wavelen - low) / (high - low):
    (1 - s) * inv/factor + s * inv, where L0 = original_max_position_embeddings.
  """
  dh = config.rotary_dim
  theta = config.rope_local_theta if local else config.rope_theta
  inv = 1.0 / (theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
  rope = None if local else config.rope_scaling_dict
  if rope is None:
    return inv
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return inv
  factor = float(rope["factor"])
  if kind == "linear":
    return inv / factor
  # llama3
  low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
  old_len = float(rope["original_max_position_embeddings"])
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > old_len / low, inv / factor, inv)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(medium, smoothed, scaled)


def inv_freq_array(config: TransformerConfig, local: bool = False
                   ) -> jax.Array:
  """`rope_inv_freq` in float32, or float64 for a float64 model."""
  return jnp.asarray(rope_inv_freq(config, local),
                     jnp.promote_types(as_dtype(config.dtype), jnp.float32))


def apply_rope(x: jax.Array, positions: jax.Array,
               inv_freq: jax.Array) -> jax.Array:
  """Rotates split halves: x' = x * cos(p w) + rotate_half(x) * sin(p w).

  With R = 2 len(inv_freq) < Dh (partial rotary, Bamba), only the first R
  entries of each head rotate and the rest pass through.

  Args:
    x: `[B, T, N, Dh]`.
    positions: `[B, T]` int.
    inv_freq: `[R/2]` float32 (float64 for float64 models), R <= Dh.
  """
  rot = 2 * inv_freq.shape[-1]
  if rot < x.shape[-1]:
    return jnp.concatenate([apply_rope(x[..., :rot], positions, inv_freq),
                            x[..., rot:]], axis=-1)
  angle = positions.astype(inv_freq.dtype)[..., None] * inv_freq   # [B,T,Dh/2]
  angle = jnp.concatenate([angle, angle], axis=-1)[:, :, None, :]  # [B,T,1,Dh]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos + rotated * sin).astype(x.dtype)


def logical_param(rngs: Optional[nnx.Rngs], shape, axes, dtype, init) -> nnx.Param:
  """A parameter with logical axes; zeros when `rngs` is None (to be loaded).

  Zeros keep `nnx.eval_shape` of the whole model cheap: tracing 270 random
  initialisers costs ~1.5 s of JAX bookkeeping, tracing zeros ~0.1 s.
  """
  value = (jnp.zeros(shape, dtype) if rngs is None
           else init(rngs.params(), shape, dtype))
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * (offset + w), computed in float32.

  offset is 0 for Llama (w starts at 1) and 1 for Gemma (w starts at 0, as
  its checkpoints store it); the product is rounded to x's dtype last.

  Attributes:
    scale: `[D]` (w), logical axes ('embed',), or ('head_dim',) for QK-norm.
  """

  def __init__(self, dim: int, eps: float, *, param_dtype,
               rngs: Optional[nnx.Rngs], offset: float = 0.0,
               axis_name: str = EMBED):
    self.eps, self.offset = eps, float(offset)
    self.scale = logical_param(rngs, (dim,), (axis_name,), param_dtype,
                        nnx.initializers.zeros if self.offset
                        else nnx.initializers.ones)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                            + self.eps)
    w = self.scale[...].astype(y.dtype)
    return (y * (w + self.offset if self.offset else w)).astype(x.dtype)


def rms_norm(config: TransformerConfig, rngs: Optional[nnx.Rngs],
             dim: Optional[int] = None, axis_name: str = EMBED) -> RMSNorm:
  """An RMSNorm with the config's eps, offset and parameter dtype."""
  return RMSNorm(dim or config.hidden_size, config.rms_norm_eps,
                 param_dtype=as_dtype(config.param_dtype), rngs=rngs,
                 offset=config.norm_offset, axis_name=axis_name)


def weight_matmul(spec: str, x, w, dtype, mm_dtype, cast: bool = True):
  """`einsum(spec, x, w)` of a weight matmul: both operands in `mm_dtype`
  (the config's `matmul_dtype`, default the compute dtype), accumulated in
  float32 (or wider), the result in the compute `dtype` (`cast`) or left in
  the accumulation dtype (logits). Under the bf16_weights policy
  (`config.PRECISIONS`) the activation is rounded to bf16 here and meets
  the bf16 weight in a bf16 x bf16 -> f32 dot: a bf16 x f32 dot would be
  promoted to f32 and run no bf16 kernel. A `PackedWeight` (the f32_packed
  policy) is multiplied by its CPU kernel; `spec` then contracts x's last
  axis with the packed matrix's input, as every spec here does."""
  acc = jnp.promote_types(dtype, jnp.float32)
  if isinstance(w, PackedWeight):
    y = w.matmul(x.astype(jnp.float32))
    return y.astype(dtype) if cast else y
  x = x.astype(mm_dtype)
  rows = x.size // x.shape[-1]
  pad = rows == 1 and jnp.dtype(mm_dtype) == jnp.bfloat16
  if pad:   # one row: a slower bf16 kernel on CPU than two rows
    x = jnp.concatenate([x, jnp.zeros_like(x)], axis=0)
  y = jnp.einsum(spec, x, w.astype(mm_dtype), preferred_element_type=acc)
  if pad:
    y = y[:1]
  return y.astype(dtype) if cast else y


def _dot(x, w, dtype, mm_dtype=None):
  """x @ w (`weight_matmul`)."""
  return weight_matmul("...i,io->...o", x, w, dtype, mm_dtype or dtype)


# Above this many queries per kv head (T*G), 'auto' uses matmuls on CPU too:
# the broadcast-multiply form has no blocking and loses to a GEMM once the
# query block grows. Re-measured once the packed kernel had made the weight
# matmuls cheap (SmolLM2, G = 3, 2-core Xeon with AMX, jax 0.10.2;
# `host_profile.measure_forward`, medians of 20; fused / dot ms):
#
#   policy       S    T=1          T=2          T=4
#   bf16_packed  128  12.4 / 13.6  13.4 / 12.4  16.1 / 13.6
#   bf16_packed  512  16.1 / 21.5  22.5 / 16.7  31.3 / 17.7
#   f32_packed   512  27.1 / 28.7  33.0 / 27.1  43.9 / 29.6
#   f32          512  32.0 / 36.1  44.2 / 38.2  60.5 / 49.6
#
# so only a single-token step keeps the fused form (T*G <= 4 covers it for
# G <= 4: SmolLM2's 3, Gemma 3 270M's 4). Before, with f32 XLA dots, T up to
# 4 had gained from it (this constant was 12).
FUSED_MAX_QUERIES = 4


# 'pallas' runs `seqdec.kernels.tree_attention` for calls of 2 ..
# PALLAS_MAX_TREE new tokens whose mask is [B, T, T] (a tree or chain to
# verify); prefill of longer prompts, single-token decode and scratch-window
# calls ([B, T, W], W > T) keep the XLA path.
PALLAS_MAX_TREE = 128


def resolve_attention_impl(impl: str, num_queries: int = 1,
                           platform: Optional[str] = None) -> str:
  """The XLA contraction: 'auto' (alias 'xla', and 'pallas' outside trees)
  -> 'fused' on XLA:CPU for small query blocks, else 'dot'. `platform`
  (None: the default backend) is the one the program is built for."""
  if impl in ("auto", "xla", "pallas"):
    cpu = (platform or jax.default_backend()) == "cpu"
    return "fused" if cpu and num_queries <= FUSED_MAX_QUERIES else "dot"
  if impl not in ("dot", "fused"):
    raise ValueError(f"unknown attention_impl {impl!r}; expected auto, xla, "
                     f"dot, fused or pallas")
  return impl


def _kernel_call(q, k_cache, v_cache, lengths, k_tree, v_tree, words,
                 positions, *, sliding_window, options):
  return tree_attention(q, k_cache, v_cache, lengths, k_tree, v_tree, words,
                        positions=positions, sliding_window=sliding_window,
                        **dict(options))


def _per_shard(kernel, mesh, kv_axis: Optional[str], args):
  """The tree-attention kernel under `shard_map` on the context mesh:
  rows over 'data', heads over `kv_axis` ('model' when the kv heads are
  split, `seqdec.parallel.sharding.kv_head_axis`; None: every model shard
  computes all heads, as the replicated attention weights do). Rows and
  heads are independent in attention, so each shard's result is its block
  of the unsharded one."""
  rows = DATA_AXIS if DATA_AXIS in mesh.axis_names else None
  heads, row = P(rows, kv_axis), P(rows)
  #        q      k_cache v_cache lengths k_tree v_tree words positions
  specs = (heads, heads, heads, row, heads, heads, row, row)
  return jax.shard_map(kernel, mesh=mesh, in_specs=specs, out_specs=heads,
                       check_vma=False)(*args)


class PackedTreeMask(NamedTuple):
  """The 'pallas' path's stand-in for `visible`: the `[B, T, T]` mask among
  new tokens bit-packed to `[B, T, ceil(T/32)]` uint32 words (committed
  slots `< length` are visible, the window is applied in the kernel)."""
  words: jax.Array


def grouped_attention(q: jax.Array,
                      segments: Sequence[tuple[jax.Array, jax.Array,
                                               jax.Array]],
                      scale: float, acc_dtype, impl: str) -> jax.Array:
  """softmax(q k^T * scale, masked) v for grouped queries, over keys held in
  one or more segments (the cache, and the new tokens when they are not
  written to it yet); one softmax over all of them:

      s[b,k,i,j] = scale * sum_d q[b,k,i,d] k[b,k,j,d]   (-inf where not visible)
      out[b,k,i,:] = sum_j softmax_j(s[b,k,i,:]) v[b,k,j,:]

  with j running over the keys of every segment in turn.

  Args:
    q: `[B, K, Q, Dh]` queries (Q = T*G grouped per kv head).
    segments: `(k, v, visible)` triples: k, v `[B, K, S_i, Dh]` (e.g. the
      cache, already holding the new tokens), visible `[B, 1, Q, S_i]` bool.
    scale: 1/sqrt(Dh).
    acc_dtype: accumulation dtype (float32 or wider).
    impl: 'dot' uses batched matmuls (accelerators). 'fused' writes both
      contractions as broadcast-multiply-reduce, which XLA:CPU fuses into
      loops: a CPU dot whose operand is the cache buffer that the same program
      updates in place makes XLA insert several full copies of that buffer
      per layer (measured: 240 copies of every cache buffer per decode step),
      which costs more than the contraction itself.
  """
  def scores_of(k, visible):
    if impl == "dot":
      s = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=acc_dtype)
    else:
      s = jnp.sum(q[:, :, :, None, :].astype(acc_dtype)
                  * k[:, :, None, :, :], axis=-1)
    return jnp.where(visible, s * scale, jnp.finfo(s.dtype).min)

  def contract(p, v):
    if impl == "dot":
      return jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), v,
                        preferred_element_type=acc_dtype)
    return jnp.sum(p[..., None] * v[:, :, None, :, :], axis=-2)

  scores = [scores_of(k, vis) for k, _, vis in segments]
  probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
  out, start = None, 0
  for (_, v, _), s in zip(segments, scores):
    part = contract(probs[..., start:start + s.shape[-1]], v)
    out, start = part if out is None else out + part, start + s.shape[-1]
  return out


class Attention(nnx.Module):
  """Grouped-query attention over the explicit cache.

  scores[b,k,(t,g),s] = <q[b,t,k*G+g], k[b,k,s]> / sqrt(Dh) masked by the
  visibility `[B,T,S]`; softmax in float32; out = sum_s p * v.

  With QK-norm (Gemma 3), each query and key head is RMS-normed over Dh
  before RoPE; the score scale is `config.attention_scale`.

  Attributes:
    qkv_proj: `[D, K, G+2, Dh]` ('embed', 'kv_heads', None, 'head_dim'): for
      each kv head k, its G query heads (query head h = k*G + g, HF's order),
      then its key, then its value. One matmul instead of three (~10% of a
      CPU decode step), and sharding along 'kv_heads' keeps every query head
      with its kv head.
    qkv_bias: `[K, G+2, Dh]` or None (Qwen2).
    o_proj: `[H*Dh, D]` ('heads', 'embed').
    o_bias: `[D]` or None.
    q_norm, k_norm: RMSNorm over Dh, or None.
    sliding_window: this layer's window (None: full attention).
  """

  def __init__(self, config: TransformerConfig, layer: int = 0, *,
               rngs: Optional[nnx.Rngs]):
    c = config
    pdt, self.dtype = as_dtype(c.param_dtype), as_dtype(c.dtype)
    self.mm_dtype = as_dtype(c.matmul_dtype or c.dtype)
    self.num_heads, self.num_kv_heads, self.head_dim = (
        c.num_heads, c.num_kv_heads, c.head_dim)
    self.groups = c.num_heads // c.num_kv_heads
    resolve_attention_impl(c.attention_impl)  # validates the name
    self.attention_impl = c.attention_impl
    self.platform = c.platform
    self.sliding_window = c.layer_window(layer)
    self.scale = c.attention_scale
    init = nnx.initializers.normal(0.02)
    shape = (c.num_kv_heads, self.groups + 2, c.head_dim)
    self.qkv_proj = logical_param(rngs, (c.hidden_size, *shape),
                           (EMBED, KV_HEADS, None, HEAD_DIM), pdt, init)
    self.o_proj = logical_param(rngs, (c.num_heads * c.head_dim, c.hidden_size),
                         (HEADS, EMBED), pdt, init)
    self.qkv_bias = (logical_param(rngs, shape, (KV_HEADS, None, HEAD_DIM), pdt,
                            nnx.initializers.zeros) if c.qkv_bias else None)
    self.o_bias = (logical_param(rngs, (c.hidden_size,), (EMBED,), pdt,
                          nnx.initializers.zeros) if c.o_bias else None)
    self.q_norm = (rms_norm(c, rngs, c.head_dim, HEAD_DIM) if c.qk_norm
                   else None)
    self.k_norm = (rms_norm(c, rngs, c.head_dim, HEAD_DIM) if c.qk_norm
                   else None)

  def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
               kv: tuple[jax.Array, jax.Array], write_start: jax.Array,
               visible: jax.Array, defer: bool = False):
    """Attends T new tokens to the cache.

    Args:
      x: `[B, T, D]` normed hidden states.
      positions: `[B, T]`.
      inv_freq: `[Dh/2]`.
      kv: this layer's `(k, v)` cache, each `[B, K, S, Dh]`.
      write_start: `[B]` first slot of the new tokens' K/V (the committed
        length, or further into the scratch window).
      visible: `[B, T, S]` bool from `attention_visibility`, a
        `PackedTreeMask` ('pallas': `write_start` is the committed length),
        or with `defer` a `SplitVisibility` (or a `PackedTreeMask`).
      defer: read the cache only; the new tokens attend to the committed
        slots and to each other's K/V directly.

    Returns:
      `([B, T, D], (k, v))` with the new tokens' K/V written to scratch;
      with `defer`, `([B, T, D], (k_new, v_new))`, the new K/V `[B, T, K,
      Dh]` for `write_new` to put in scratch.
    """
    b, t, _ = x.shape
    nk, g, dh = self.num_kv_heads, self.groups, self.head_dim
    acc = jnp.promote_types(self.dtype, jnp.float32)
    y = weight_matmul("btd,dkjh->btkjh", x, self.qkv_proj[...],
                      self.dtype, self.mm_dtype)
    if self.qkv_bias is not None:
      y = y + self.qkv_bias[...].astype(self.dtype)
    q, k, v = y[:, :, :, :g], y[:, :, :, g], y[:, :, :, g + 1]
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q.reshape(b, t, nk * g, dh), positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)                    # [B, T, K, Dh]
    k_tree, v_tree = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if defer:    # the kernel and the split softmax read the cache's committed
      k_cache, v_cache = kv      # slots only: it may stay as it is
      written = (k.astype(kv[0].dtype), v.astype(kv[1].dtype))
    else:
      k_cache = write_rows(kv[0], k_tree, write_start, 2)
      v_cache = write_rows(kv[1], v_tree, write_start, 2)
      written = (k_cache, v_cache)
    if isinstance(visible, PackedTreeMask):
      kernel = functools.partial(
          _kernel_call, sliding_window=self.sliding_window,
          options=tuple(kernel_options(self.platform).items()))
      args = (q.transpose(0, 2, 1, 3), k_cache.astype(q.dtype),
              v_cache.astype(q.dtype), write_start, k_tree,
              v_tree.astype(q.dtype), visible.words, positions)
      mesh = jax.sharding.get_abstract_mesh()
      if mesh.empty or mesh.size == 1:
        out = kernel(*args)
      else:   # a kernel is opaque to the partitioner: run it per shard
        out = _per_shard(kernel, mesh, kv_head_axis(nk, mesh), args)
      out = out.astype(self.dtype).transpose(0, 2, 1, 3).reshape(b, t, -1)
      return self._out(out), written

    # Queries grouped per kv head as [B, K, T*G, Dh]: one batched contraction
    # per (b, k) against the cache [B, K, S, Dh] (a 4-d layout XLA:CPU runs
    # ~3x faster than a 5-d einsum with separate T and G axes).
    q = q.reshape(b, t, nk, g, dh).transpose(0, 2, 1, 3, 4).reshape(
        b, nk, t * g, dh)
    def grouped(vis):                                         # [B, 1, T*G, S]
      return jnp.repeat(vis, g, axis=1)[:, None]
    segments = [(k_cache.astype(q.dtype), v_cache.astype(self.dtype),
                 grouped(visible.cache if defer else visible))]
    if defer:
      segments.append((k_tree.astype(q.dtype), v_tree.astype(self.dtype),
                       grouped(visible.new)))
    out = grouped_attention(q, segments, self.scale, acc,
                            resolve_attention_impl(self.attention_impl, t * g,
                                                   self.platform))
    out = out.astype(self.dtype).reshape(b, nk, t, g, dh)
    out = out.transpose(0, 2, 1, 3, 4).reshape(b, t, nk * g * dh)
    return self._out(out), written

  def _out(self, out: jax.Array) -> jax.Array:
    """`[B, T, H*Dh]` -> `[B, T, D]`: o_proj (+ o_bias)."""
    y = _dot(out, self.o_proj[...], self.dtype, self.mm_dtype)
    if self.o_bias is not None:
      y = y + self.o_bias[...].astype(self.dtype)
    return y


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    # tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


class MLP(nnx.Module):
  """Gated MLP: down(act(x @ gate + b_g) * (x @ up + b_u)) + b_d, with act
  SiLU (SwiGLU, Llama) or tanh-approximated GELU (GeGLU, Gemma); biases
  only with `mlp_bias`.

  Attributes:
    gate_up_proj: `[D, 2, F]` ('embed', None, 'mlp'), gate then up, one
      matmul; down_proj: `[F, D]` ('mlp', 'embed'); gate_up_bias `[2, F]`
      and down_bias `[D]` or None.
  """

  def __init__(self, config: TransformerConfig, *,
               rngs: Optional[nnx.Rngs]):
    pdt, self.dtype = as_dtype(config.param_dtype), as_dtype(config.dtype)
    self.mm_dtype = as_dtype(config.matmul_dtype or config.dtype)
    d, f = config.hidden_size, config.intermediate_size
    init = nnx.initializers.normal(0.02)
    self.activation = config.activation
    self.gate_up_proj = logical_param(rngs, (d, 2, f), (EMBED, None, MLP_DIM), pdt,
                                      init)
    self.down_proj = logical_param(rngs, (f, d), (MLP_DIM, EMBED), pdt, init)
    zeros, bias = nnx.initializers.zeros, config.mlp_bias
    self.gate_up_bias = (logical_param(rngs, (2, f), (None, MLP_DIM), pdt, zeros)
                         if bias else None)
    self.down_bias = logical_param(rngs, (d,), (EMBED,), pdt, zeros) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    gu = weight_matmul("btd,djf->btjf", x, self.gate_up_proj[...],
                       self.dtype, self.mm_dtype)
    if self.gate_up_bias is not None:
      gu = gu + self.gate_up_bias[...].astype(self.dtype)
    h = _ACTIVATIONS[self.activation](gu[:, :, 0]) * gu[:, :, 1]
    y = _dot(h, self.down_proj[...], self.dtype, self.mm_dtype)
    if self.down_bias is not None:
      y = y + self.down_bias[...].astype(self.dtype)
    return y


class Block(nnx.Module):
  """Pre-norm decoder block:

      x += attn(norm(x));  x += mlp(norm(x))                (Llama)
      x += norm(attn(norm(x)));  x += norm(mlp(norm(x)))    (sandwich, Gemma)

  Attributes:
    input_norm: before attention; post_attn_norm: before the MLP (HF's
      Llama `post_attention_layernorm`, Gemma's `pre_feedforward_layernorm`);
    attn_out_norm, mlp_out_norm: on the sub-block outputs (sandwich only;
      Gemma's `post_attention_layernorm` / `post_feedforward_layernorm`).
  """

  def __init__(self, config: TransformerConfig, layer: int = 0, *,
               rngs: Optional[nnx.Rngs]):
    self.input_norm = rms_norm(config, rngs)
    self.attn = Attention(config, layer, rngs=rngs)
    self.post_attn_norm = rms_norm(config, rngs)
    self.mlp = MLP(config, rngs=rngs)
    sandwich = config.sandwich_norm
    self.attn_out_norm = rms_norm(config, rngs) if sandwich else None
    self.mlp_out_norm = rms_norm(config, rngs) if sandwich else None

  def __call__(self, x, positions, inv_freq, kv, write_start, visible,
               defer: bool = False):
    a, kv = self.attn(self.input_norm(x), positions, inv_freq, kv, write_start,
                      visible, defer)
    if self.attn_out_norm is not None:
      a = self.attn_out_norm(a)
    x = x + a
    m = self.mlp(self.post_attn_norm(x))
    if self.mlp_out_norm is not None:
      m = self.mlp_out_norm(m)
    return x + m, kv


def run_blocks(blocks: Sequence[Block], config: TransformerConfig,
               x: jax.Array, positions: jax.Array, cache: KVCache,
               mask: Optional[jax.Array], layers: Optional[Sequence[int]],
               inv_freq: jax.Array, inv_freq_local: jax.Array,
               window_positions: Optional[jax.Array] = None,
               taps: Sequence[int] = (), defer_writes: bool = False):
  """Runs decoder blocks on `[B, T, D]` inputs against a cache (the body of
  `Transformer.backbone`, shared with drafters that feed their own inputs,
  e.g. EAGLE's fused feature + embedding).

  `cache.kv[i]` is block i's; `layers` (None: all) selects the blocks run;
  `mask` and `window_positions` as in `Transformer.backbone`. One visibility
  is built per distinct sliding window (Gemma 3: local and global).

  Returns `(x, cache)`, or with `taps` (block indices, all run)
  `(x, cache, tapped)`: tapped[j] the `[B, T, D]` input of block taps[j]
  (the hidden state after the blocks before it; EAGLE-3's low and middle
  features). With `defer_writes` (no scratch window: mask `[B, T, T]`) the
  cache is only read and a `NewKV` stands in the place of the cache:
  `write_new(cache, new)` is then the cache the call without it returns.
  """
  b, t = positions.shape
  if mask is None:
    mask = causal_mask(b, t)
  if defer_writes and mask.shape[2] != t:
    raise ValueError(f"a deferred-write call has no scratch window; got a "
                     f"mask over {mask.shape[2]} slots for {t} new tokens")
  c = config
  run = list(range(len(blocks)) if layers is None else layers)
  if (c.attention_impl == "pallas" and mask.shape[2] == t
      and 1 < t <= PALLAS_MAX_TREE):
    packed = PackedTreeMask(pack_mask(mask))  # windows applied per layer
    visible = {c.layer_window(i): packed for i in run}
  elif defer_writes:
    visible = {w: split_visibility(cache.length, positions, mask,
                                   cache.max_len, w)
               for w in {c.layer_window(i) for i in run}}
  else:
    visible = {w: attention_visibility(cache.length, positions, mask,
                                       cache.max_len, w, window_positions)
               for w in sorted({c.layer_window(i) for i in run},
                               key=lambda w: -1 if w is None else w)}
  kv = list(cache.kv)
  write_start = cache.length + (mask.shape[2] - t)
  missing = set(taps) - set(run)
  if missing:
    raise ValueError(f"tapped blocks {sorted(missing)} are not run")
  tapped = {}
  for i in run:
    if i in taps:
      tapped[i] = x
    x, kv[i] = blocks[i](
        x, positions, inv_freq_local if c.local_rope(i) else inv_freq,
        kv[i], write_start, visible[c.layer_window(i)], defer_writes)
  if defer_writes:
    cache = NewKV(kv=tuple(kv[i] if i in run else None
                           for i in range(len(kv))))
  else:
    cache = KVCache(kv=tuple(kv), length=cache.length)
  if taps:
    return x, cache, tuple(tapped[i] for i in taps)
  return x, cache


class Transformer(nnx.Module):
  """Decoder-only causal LM (Llama, Qwen2, Mistral, SmolLM2, Gemma 3).

  `rngs=None` builds every parameter as zeros, for loading checkpoints.

  Attributes:
    config: the `TransformerConfig`.
    embed: `[V, D]` ('vocab', 'embed').
    layers: L `Block`s.
    final_norm: RMSNorm.
    lm_head: `[D, V]` ('embed', 'vocab'), absent when embeddings are tied.
    inv_freq: `[Dh/2]` RoPE frequencies (of the global layers);
      inv_freq_local: the local layers' (`rope_local_theta`), or None.
  """

  def __init__(self, config: TransformerConfig, *,
               rngs: Optional[nnx.Rngs]):
    self.config = config
    pdt, self.dtype = as_dtype(config.param_dtype), as_dtype(config.dtype)
    self.mm_dtype = as_dtype(config.matmul_dtype or config.dtype)
    self.embed = logical_param(rngs, (config.vocab_size, config.hidden_size),
                        (VOCAB, EMBED), pdt, nnx.initializers.normal(0.02))
    self.layers = nnx.List([Block(config, i, rngs=rngs)
                            for i in range(config.num_layers)])
    self.final_norm = rms_norm(config, rngs)
    if config.tie_embeddings:
      self.lm_head = None
    else:
      self.lm_head = logical_param(rngs, (config.hidden_size, config.vocab_size),
                            (EMBED, VOCAB), pdt, nnx.initializers.normal(0.02))
    self.inv_freq = nnx.Variable(inv_freq_array(config))
    self.inv_freq_local = (
        nnx.Variable(inv_freq_array(config, local=True))
        if config.rope_local_theta is not None else None)

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """An empty cache of `max_len` slots per row (target protocol)."""
    return init_cache(self.config, batch_size, max_len)

  @staticmethod
  def commit(cache: KVCache, n_keep: jax.Array,
             keep_index: Optional[jax.Array] = None) -> KVCache:
    """Commits kept scratch tokens (target protocol; see `commit`)."""
    return commit(cache, n_keep, keep_index)

  def backbone(self, tokens: jax.Array, positions: jax.Array, cache: KVCache,
               mask: Optional[jax.Array] = None,
               layers: Optional[Sequence[int]] = None,
               window_positions: Optional[jax.Array] = None,
               taps: Sequence[int] = (), defer_writes: bool = False):
    """Runs the decoder blocks on new tokens.

    Args:
      tokens: `[B, T]` int32.
      positions: `[B, T]` int32.
      cache: `KVCache`; new K/V are written to scratch, `length` unchanged.
      mask: `[B, T, T]` bool among new tokens, or `[B, T, W]` over a
        scratch window of W >= T slots (module docstring); None means causal.
      layers: indices of the blocks to run (a static subset, e.g. for
        layer-skip self-drafting); None runs all. Skipped layers' caches are
        returned untouched.
      window_positions: `[B, W - T]` int32 positions of the scratch window's
        earlier entries, for sliding-window layers (`attention_visibility`);
        None: tree nodes of this round.
      taps: block indices whose inputs are returned too (`run_blocks`).
      defer_writes: only read the cache (mask `[B, T, T]`): a `NewKV` is
        returned in the cache's place, for `write_new`.

    Returns:
      `(hidden [B, T, D] before the final norm, cache)`, with `taps` also
      the tapped hidden states: `(hidden, cache, tapped)`.
    """
    inv_freq = self.inv_freq[...]
    inv_freq_local = (inv_freq if self.inv_freq_local is None
                      else self.inv_freq_local[...])
    return run_blocks(self.layers, self.config, self.embed_tokens(tokens),
                      positions, cache, mask, layers, inv_freq,
                      inv_freq_local, window_positions, taps, defer_writes)

  @staticmethod
  def write_new(cache: KVCache, new: NewKV) -> KVCache:
    """Puts a deferred-write call's new K/V in scratch (`write_new`)."""
    return write_new(cache, new)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """`[B, T]` ids -> `[B, T, D]` embeddings (times sqrt(D) with
    `embed_scale`, rounded to the parameter dtype as HF does)."""
    table = self.embed[...]
    if isinstance(table, PackedWeight):   # a tied embedding, packed as head
      e = table.columns(tokens)
    else:
      e = jnp.take(table, tokens, axis=0)
    if self.config.embed_scale:
      e = e * jnp.asarray(math.sqrt(self.config.hidden_size), e.dtype)
    return e.astype(self.dtype)

  def features(self, hidden: jax.Array) -> jax.Array:
    """`[..., D]` backbone output -> the LM head's input (the final norm):
    the target feature that feature-reading drafters (EAGLE, Medusa) read."""
    return self.final_norm(hidden)

  def _head_param(self) -> Any:
    """The LM head's parameter value: the untied head, else the tied
    embedding (an array, or a `PackedWeight` under f32_packed)."""
    return self.embed[...] if self.lm_head is None else self.lm_head[...]

  def _head_matrix(self, ids: Optional[jax.Array] = None
                   ) -> tuple[Any, str]:
    """`(W, einsum spec)` of the LM head, its vocabulary entries `ids`
    only if given: the untied head `[D, V]` (columns `ids`), the tied
    embedding `[V, D]` (rows `ids`), or under f32_packed its panels (the
    kept columns read out as `[M, D]` rows)."""
    w = self._head_param()
    if isinstance(w, PackedWeight):   # f32_packed: [D, V] panels either way
      return ((w, "...d,dv->...v") if ids is None
              else (w.columns(ids), "...d,vd->...v"))
    if self.lm_head is None:
      return (w if ids is None else jnp.take(w, ids, 0)), "...d,vd->...v"
    return (w if ids is None else jnp.take(w, ids, 1)), "...d,dv->...v"

  def head_weight(self, ids: jax.Array) -> Any:
    """The LM head restricted to vocabulary entries `ids` `[M]`, as `head`
    takes it (`weight=`): W_head[:, ids] `[D, M]`, packed under the
    f32_packed policy. A trimmed drafter head builds it once, where
    `head(features, ids)` gathers the M columns (M x D entries) at every
    call."""
    w, spec = self._head_matrix(ids)
    if spec == "...d,dv->...v":
      return w
    if isinstance(self._head_param(), PackedWeight):
      return PackedWeight.from_matrix(w, transposed=True)
    return w.T

  def head(self, features: jax.Array,
           ids: Optional[jax.Array] = None, weight: Any = None) -> jax.Array:
    """`[..., D]` features (after the final norm) -> `[..., V]` logits
    (float32 or wider): logits = features @ W_head (the tied embedding's
    transpose when `tie_embeddings`); with `ids` `[M]`, only those
    vocabulary entries' logits `[..., M]` (a trimmed drafter head), or the
    same from their `weight = head_weight(ids)`."""
    w, spec = ((weight, "...d,dv->...v") if weight is not None
               else self._head_matrix(ids))
    return weight_matmul(spec, features, w, self.dtype, self.mm_dtype,
                         cast=False)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """`[..., D]` pre-norm hidden -> `[..., V]` logits: head(features(h))."""
    return self.head(self.features(hidden))

  def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache,
               mask: Optional[jax.Array] = None,
               logit_index: Optional[jax.Array] = None):
    """Forward over new tokens against the cache.

    Args:
      tokens: `[B, T]` int32.
      positions: `[B, T]` int32.
      cache: `KVCache`.
      mask: `[B, T, T]` bool, `[B, T, W]` (scratch window) or None (causal).
      logit_index: `[B, N]` int32 indices into T at which to return logits, or
        None for all T. Prefill asks for one position per row: full `[B, T, V]`
        logits of a long prompt cost hundreds of MB.

    Returns:
      `(logits [B, N or T, V] float32, cache)` with the new K/V in scratch.
    """
    hidden, cache = self.backbone(tokens, positions, cache, mask)
    if logit_index is not None:
      hidden = jnp.take_along_axis(hidden, logit_index[..., None], axis=1)
    return self.logits(hidden), cache


# Config fields that choose how the same function is computed, not what it
# is: `reconfigured` may change them on a built model.
EXECUTION_OPTIONS = ("attention_impl", "platform")


def reconfigured(model: Transformer, **changes) -> Transformer:
  """The same weights (shared, not copied) under a config with `changes`
  to its EXECUTION_OPTIONS: e.g. `attention_impl='pallas'` to verify
  through the tree kernel, `platform='tpu'` to lower for TPU on a CPU host
  (`seqdec.export`)."""
  unknown = sorted(set(changes) - set(EXECUTION_OPTIONS))
  if unknown:
    raise ValueError(f"reconfigured changes only {EXECUTION_OPTIONS}, not "
                     f"{unknown} (they change the parameters)")
  config = model.config.replace(**changes)   # validates the values
  twin = nnx.merge(*nnx.split(model))
  twin.config = config
  for layer in twin.layers:
    for name, value in changes.items():
      setattr(layer.attn, name, value)
  return twin


def with_precision(model: Transformer, policy: str) -> Transformer:
  """`model` under a precision policy of `config.PRECISIONS` ('f32',
  'bf16_weights', 'f32_packed'): the weight matrices and the embedding
  (every parameter of rank >= 2) cast to the policy's param dtype, norm
  scales and biases kept float32, and the matmul operand dtype set; the
  same function otherwise. Under 'f32_packed' every weight matmul's matrix
  (and a tied embedding, the LM head) is then stored as a `PackedWeight`
  (`seqdec.kernels.packed_matmul`, whose kernel is built for this host
  here, once).

  Raises:
    ValueError: an unknown policy.
    KernelBuildError: 'f32_packed' on a host where the kernel cannot be
      built.
  """
  if policy not in PRECISIONS:
    raise ValueError(f"unknown precision policy {policy!r}; expected one of "
                     f"{sorted(PRECISIONS)}")
  fields = PRECISIONS[policy]
  config = model.config.replace(**fields)
  graphdef = nnx.graphdef(nnx.eval_shape(
      lambda: Transformer(config, rngs=None)))
  pdt = as_dtype(fields["param_dtype"])
  state = nnx.state(model)

  def cast(x):
    if isinstance(x, PackedWeight):     # from f32_packed: back to a matrix
      x = x.to_array()
    keep = x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating)
    return x if keep else x.astype(pdt)
  twin = nnx.merge(graphdef, jax.tree.map(
      cast, state, is_leaf=lambda x: isinstance(x, PackedWeight)))
  if config.matmul_impl == "packed":
    pack_weights(twin)
  return twin


def pack_param(param, transposed: bool = False) -> None:
  """Replaces, in place, a weight matrix parameter's value by its
  `PackedWeight` (`transposed`: a `[N, K]` matrix contracted on its last
  axis, a tied embedding used as the head)."""
  param.set_value(PackedWeight.from_matrix(param.get_value(),
                                           transposed=transposed))


def pack_block_weights(block: Block) -> None:
  """Packs, in place, a block's weight matmuls: q/k/v, o, gate/up, down."""
  for param in (block.attn.qkv_proj, block.attn.o_proj,
                block.mlp.gate_up_proj, block.mlp.down_proj):
    pack_param(param)


def pack_weights(model: Transformer) -> None:
  """Replaces, in place, each weight matmul's matrix by its `PackedWeight`:
  q/k/v, o, gate/up and down of every block, and the LM head (a tied
  embedding is packed as the head; the token lookup reads its columns)."""
  packed_matmul.ensure_registered()
  for block in model.layers:
    pack_block_weights(block)
  if model.lm_head is None:
    pack_param(model.embed, transposed=True)
  else:
    pack_param(model.lm_head)


def create(config: TransformerConfig, seed: int = 0) -> Transformer:
  """Builds a randomly initialised `Transformer` with a jitted init.

  Eager NNX initialisation dispatches hundreds of small ops (seconds on CPU);
  one compiled init takes a fraction of that.
  """
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  graphdef = nnx.graphdef(abstract)
  state = jax.jit(lambda: nnx.state(Transformer(config,
                                                rngs=nnx.Rngs(seed))))()
  return nnx.merge(graphdef, state)
