"""Bit-packed ancestor masks of token trees, built on device.

A row of N tree nodes is given by parent pointers `parents [B, N]` int32:
`parents[b, i] = -1` makes node i a child of the committed prefix (node 0,
the root, always is; several such nodes make a forest), otherwise it names
node i's parent, which comes before it (`parents[b, i] < i`). Node i sees
itself and its ancestors; that set is stored as N bits, 32 to a uint32 word:

    words[b, i, w] bit t  <=>  node 32 w + t is node i or an ancestor of i

so a 64-node tree costs 2 words (8 bytes) per node instead of a dense
`[N, N]` mask (64 bytes as bool, 256 as int32), and the attention kernel
unpacks only the words of the nodes it is processing.

This module is the one home of tree topology arrays (kernels are the leaf
of the import graph, so decoding builds on it, never the reverse):

* `tree_mask` (Pallas) and `tree_mask_reference` (jnp, pointer doubling)
  build the packed words and depths and agree bit for bit;
* `ancestor_mask` is the dense `[B, N, N]` mask, `unpack_mask` of
  `tree_mask_reference`'s words: the one on-device builder the decode path
  uses (`Tree.from_shape`, the model drafters' scratch-window masks), exact
  for parents computed inside `jit`;
* `validate_parents` is the one host check of parent pointers (a parent
  listed after its child, a cycle, an index out of range; with
  `forest=False` also the decoding rule that node 0 is the only root), and
  `parents_valid` the same check as a device array, for parents built
  inside `jit`.

The tests' oracle is an independent host pointer walk
(`seqdec.testing.ancestor_mask_oracle`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from seqdec.errors import TreeError
from seqdec.kernels import _common

__all__ = ["tree_mask", "tree_mask_reference", "ancestor_mask",
           "validate_parents", "parents_valid", "pack_mask", "unpack_mask",
           "num_words"]


def num_words(num_nodes: int) -> int:
  """W = ceil(N / 32) uint32 words per node."""
  return max(1, -(-int(num_nodes) // 32))


def validate_parents(parents: Any, *, forest: bool = True) -> np.ndarray:
  """Checks concrete parent arrays `[N]` or `[B, N]` on the host.

  Valid: every entry is -1 or an earlier node, `-1 <= parents[b, i] < i`
  (a forest: any node with parent -1 hangs from the committed prefix).
  With `forest=False`, the rule of decoding trees (`trees.TreeShape`,
  `trees.Tree`) also holds: node 0 is the root (`parents[b, 0] == -1`) and
  the only one (`parents[b, i] >= 0` for i >= 1). Violations are reported
  in the order root rule (forest=False), out-of-range, cycle (including a
  self-loop), parent listed after its child, naming the node (and the row,
  for `[B, N]` input).

  Args:
    parents: integer `[N]` or `[B, N]`, N >= 1 (a list, tuple or array).
    forest: accept several roots (the kernels' contract); False for the
      decoding rule.

  Returns:
    The parents as an int32 `[B, N]` numpy array.

  Raises:
    TreeError: with the first violation found.
  """
  if isinstance(parents, jax.core.Tracer):
    raise TreeError("validate_parents needs concrete parents; inside jit use "
                    "parents_valid (a device-side flag) instead")
  arr = np.asarray(parents)
  batched = arr.ndim == 2
  if arr.ndim == 1:
    arr = arr[None]
  if arr.ndim != 2 or arr.shape[1] == 0:
    raise TreeError(f"parents must be [B, N] with N >= 1 (a tree needs at "
                    f"least the root node), got shape {np.shape(parents)}")
  if not np.issubdtype(arr.dtype, np.integer):
    raise TreeError(f"parents must be integers, got {arr.dtype}")
  n = arr.shape[1]
  for b, row in enumerate(arr.tolist()):
    at = f"row {b}: " if batched else ""
    if not forest:
      if row[0] != -1:
        raise TreeError(f"{at}node 0 is the root and must have parent -1, "
                        f"got {row[0]}")
      for i, p in enumerate(row[1:], 1):
        if p == -1:
          raise TreeError(f"{at}node {i} has parent -1, but node 0 is the "
                          f"only root of a decoding tree")
    for i, p in enumerate(row):
      if p < -1 or p >= n:
        raise TreeError(f"{at}node {i} has parent {p}, outside [-1, {n})")
    for i in range(n):  # follow pointers: a walk longer than N is a cycle
      j, steps = i, 0
      while j >= 0 and steps <= n:
        j, steps = row[j], steps + 1
      if j >= 0:
        cycle, k = [j], row[j]
        while k != j:
          cycle.append(k)
          k = row[k]
        what = (f"node {j} is its own parent, " if len(cycle) == 1 else "")
        raise TreeError(f"{at}{what}parent pointers form a cycle through "
                        f"nodes {sorted(cycle)}")
    for i, p in enumerate(row):
      if p >= i:
        raise TreeError(f"{at}node {i} has parent {p} listed after it "
                        f"(parents must precede their children)")
  return arr.astype(np.int32)


def parents_valid(parents: jax.Array, *, forest: bool = True) -> jax.Array:
  """`[B]` bool: `-1 <= parents[b, i] < i` for all i (jit-friendly check);
  with `forest=False` also node 0 the only root (`validate_parents`).

  Parents preceding children rules out cycles, so this is the whole of
  `validate_parents` as a device array.
  """
  idx = jnp.arange(parents.shape[1], dtype=parents.dtype)
  ok = jnp.all((parents >= -1) & (parents < idx), axis=1)
  if not forest:
    ok &= (parents[:, 0] == -1) & jnp.all(parents[:, 1:] >= 0, axis=1)
  return ok


@jax.jit
def tree_mask_reference(parents: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Bit-packed ancestor masks by pointer doubling, in plain jnp.

  With M_k[i] the set of ancestors of i at distance < 2^k (M_0[i] = {i}) and
  P_k[i] the ancestor at distance 2^k (P_0 = parents; -1 past the root):

      M_{k+1}[i] = M_k[i] | M_k[P_k[i]]      (nothing when P_k[i] = -1)
      P_{k+1}[i] = P_k[P_k[i]]

  directly on the packed words (a row gather and an OR per round), until no
  pointer is live: ceil(log2(depth + 1)) rounds, at most ceil(log2 N).
  depth[i] = popcount(M[i]) - 1.

  Args:
    parents: `[B, N]` int32, valid (see `validate_parents`).

  Returns:
    `(words [B, N, W] uint32, depth [B, N] int32)`, W = ceil(N / 32).
  """
  b, n = parents.shape
  w = num_words(n)
  node = jnp.arange(n, dtype=jnp.int32)
  words = jnp.zeros((n, w), jnp.uint32).at[node, node // 32].set(
      jnp.left_shift(jnp.uint32(1), (node % 32).astype(jnp.uint32)))
  words = jnp.broadcast_to(words, (b, n, w))
  ptr = jnp.where((parents >= 0) & (parents < n), parents, -1).astype(jnp.int32)
  max_rounds = max(1, math.ceil(math.log2(n))) if n > 1 else 0

  def cond(c):
    k, p, _ = c
    return (k < max_rounds) & jnp.any(p >= 0)

  def body(c):
    k, p, m = c
    live = p >= 0
    pc = jnp.where(live, p, 0)
    gathered = jnp.take_along_axis(m, pc[:, :, None], axis=1)
    m = m | jnp.where(live[:, :, None], gathered, jnp.uint32(0))
    p = jnp.where(live, jnp.take_along_axis(p, pc, axis=1), -1)
    return k + 1, p, m

  _, _, words = jax.lax.while_loop(cond, body, (jnp.int32(0), ptr, words))
  depth = jnp.sum(jax.lax.population_count(words), axis=2).astype(jnp.int32)
  return words, depth - 1


@jax.jit
def pack_mask(mask: jax.Array) -> jax.Array:
  """Any boolean mask `[B, N, M]` -> `[B, N, ceil(M/32)]` uint32 words.

      words[b, i, w] = sum_t mask[b, i, 32 w + t] << t
  """
  b, n, m = mask.shape
  w = num_words(m)
  bits = jnp.pad(mask, ((0, 0), (0, 0), (0, 32 * w - m))).astype(jnp.uint32)
  shifts = jnp.arange(32, dtype=jnp.uint32)
  return jnp.sum(bits.reshape(b, n, w, 32) << shifts, axis=-1,
                 dtype=jnp.uint32)


@functools.partial(jax.jit, static_argnums=1)
def unpack_mask(words: jax.Array, num_keys: int) -> jax.Array:
  """`[B, N, W]` uint32 words -> `[B, N, num_keys]` bool (inverse of pack)."""
  shifts = jnp.arange(32, dtype=jnp.uint32)
  bits = (words[..., None] >> shifts) & 1
  return bits.reshape(*words.shape[:-1], -1)[..., :num_keys] == 1


def ancestor_mask(parents: jax.Array) -> jax.Array:
  """`[B, N, N]` bool ancestor-or-self masks from parents `[B, N]`, on device.

      mask[b, i, j]  <=>  j is i or an ancestor of i

  = `unpack_mask(tree_mask_reference(parents)[0], N)`: exact for any valid
  parents (forests included), concrete or computed inside `jit`, in
  ceil(log2(depth + 1)) pointer-doubling rounds. The decode path's one
  dense builder.
  """
  words, _ = tree_mask_reference(parents)
  return unpack_mask(words, parents.shape[1])


def _tree_mask_kernel(parents_ref, words_ref, depth_ref, *, max_rounds: int,
                      num_words_out: int):
  """One tree per program. parents `[Np, 1]` -> words `[Np, Wp]`, depth.

  Pointer doubling with the pointers as one-hot rows, so the row gather
  M_k[P_k[i]] is a matmul (the MXU / tensor-core friendly gather; exact, as
  every operand is 0/1):

      J_0 = onehot(parents) (zero row for -1),  M_0 = I
      M_{k+1} = M_k  or  J_k M_k,        J_{k+1} = J_k J_k

  looping while some row of J is non-zero (ceil(log2(depth + 1)) rounds).
  The 0/1 rows are then packed, 16 bits at a time, by exact float32
  reductions: lo_w = sum_{t<16} M[:, 32w+t] 2^t, hi_w likewise for t >= 16,
  word_w = lo_w | hi_w << 16 (int32, bit-cast to uint32 by the wrapper).
  """
  n = parents_ref.shape[0]
  p = parents_ref[...]                                          # [Np, 1]
  row = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
  jump = (p == col).astype(jnp.float32)
  anc = (row == col).astype(jnp.float32)

  def dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)

  def cond(c):
    k, j, _ = c
    return (k < max_rounds) & (jnp.max(j) > 0.5)

  def body(c):
    k, j, m = c
    return k + 1, dot(j, j), jnp.maximum(m, dot(j, m))

  _, _, anc = jax.lax.while_loop(cond, body, (jnp.int32(0), jump, anc))
  depth_ref[...] = (jnp.sum(anc, axis=1, keepdims=True) - 1.0).astype(
      jnp.int32)
  lane = col & 31   # (& and >> rather than % and //: no sign ops in Mosaic)
  weight = jnp.where(lane < 16, 1 << lane, 1 << (lane - 16)).astype(
      jnp.float32)
  low = lane < 16
  words = jnp.zeros((n, num_words_out), jnp.int32)
  out_col = jax.lax.broadcasted_iota(jnp.int32, (n, num_words_out), 1)
  for w in range(num_words_out):
    in_word = (col >> 5) == w
    lo = jnp.sum(jnp.where(in_word & low, anc * weight, 0.0), axis=1,
                 keepdims=True).astype(jnp.int32)
    hi = jnp.sum(jnp.where(in_word & ~low, anc * weight, 0.0), axis=1,
                 keepdims=True).astype(jnp.int32)
    words = jnp.where(out_col == w, lo | (hi << 16), words)
  words_ref[...] = words


@functools.partial(jax.jit, static_argnames=("platform", "interpret",
                                             "compiler_params"))
def _tree_mask_call(parents, *, platform: str, interpret: Any,
                    compiler_params: Any):
  b, n = parents.shape
  w = num_words(n)
  if platform == "gpu":   # Triton: power-of-two tiles, >= 16 for tl.dot
    n_pad, w_pad = max(16, _common.next_pow2(n)), _common.next_pow2(w)
  else:                   # Mosaic: sublane multiple of 8
    n_pad, w_pad = _common.round_up(n, 8), w
  parents = jnp.where((parents >= 0) & (parents < n), parents, -1)
  parents = jnp.pad(parents.astype(jnp.int32), ((0, 0), (0, n_pad - n)),
                    constant_values=-1)[:, :, None]
  max_rounds = max(1, math.ceil(math.log2(n))) if n > 1 else 0
  kernel = functools.partial(_tree_mask_kernel, max_rounds=max_rounds,
                             num_words_out=w_pad)
  words, depth = pl.pallas_call(
      kernel,
      grid=(b,),
      in_specs=[pl.BlockSpec((None, n_pad, 1), lambda i: (i, 0, 0))],
      out_specs=[pl.BlockSpec((None, n_pad, w_pad), lambda i: (i, 0, 0)),
                 pl.BlockSpec((None, n_pad, 1), lambda i: (i, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, n_pad, w_pad), jnp.int32),
                 jax.ShapeDtypeStruct((b, n_pad, 1), jnp.int32)],
      interpret=interpret,
      compiler_params=compiler_params,
  )(parents)
  words = jax.lax.bitcast_convert_type(words[:, :n, :w], jnp.uint32)
  return words, depth[:, :n, 0]


def tree_mask(parents: jax.Array, *, validate: bool = True,
              platform: Optional[str] = None, interpret: Any = None,
              compiler_params: Any = None) -> tuple[jax.Array, jax.Array]:
  """Bit-packed ancestor-or-self masks and depths of token trees (Pallas).

  Computes what `tree_mask_reference` computes (see there and
  `_tree_mask_kernel` for the math), bit for bit, one tree per program.
  Out-of-range pointers are treated as -1 and cycles stop after ceil(log2 N)
  rounds, so the kernel always terminates; validate first to reject them.

  Args:
    parents: `[B, N]` int, -1 for children of the committed prefix.
    validate: check concrete parents with `validate_parents` (raises
      `TreeError`). Inside `jit` the parents are traced: pass False (and use
      `parents_valid` if they may be invalid).
    platform: 'tpu' | 'gpu' | None (the default backend's; see
      `_common.resolve_platform`).
    interpret: None (True on CPU), a bool, or `pltpu.InterpretParams()`.
    compiler_params: passed to `pallas_call` (e.g.
      `pallas.triton.CompilerParams(num_warps=4)` to lower for CUDA).

  Returns:
    `(words [B, N, W] uint32, depth [B, N] int32)`, W = ceil(N / 32).
  """
  if validate:
    if isinstance(parents, jax.core.Tracer):
      raise TreeError("tree_mask(validate=True) needs concrete parents; "
                      "inside jit pass validate=False (see parents_valid)")
    validate_parents(parents)
  parents = jnp.asarray(parents)
  if parents.ndim != 2:
    raise TreeError(f"parents must be [B, N], got shape {parents.shape}")
  return _tree_mask_call(parents, platform=_common.resolve_platform(platform),
                         interpret=_common.resolve_interpret(interpret),
                         compiler_params=compiler_params)
