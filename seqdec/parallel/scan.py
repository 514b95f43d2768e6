"""Affine recurrences h_t = A_t h_{t-1} + b_t: one front door, several back ends.

`linear_scan(A, b, h0, structure=..., impl=..., reverse=...)` returns every
state of the recurrence

    forward:  h_t = A_t h_{t-1} + b_t,   t = 0 .. T-1,   h_{-1} = h0
    reverse:  h_t = A_t h_{t+1} + b_t,   t = T-1 .. 0,   h_{T}  = h0

(the reverse form is the adjoint recurrence of backpropagation). Arrays are
time-major; shapes (`seqdec.shapes`): T steps, `*B` any batch dims, C channels.

Structures (how `A_t` acts on a state), chosen by string:

  'diagonal'  A [T, *B, C],        b [T, *B, C]      (A h)_k = A_k h_k
  'block2'    A [T, *B, 2, 2, C],  b [T, *B, 2, C]   (A h)_{i,k} = sum_j A_{ijk} h_{jk}
              (C independent 2x2 blocks, planar layout: an LSTM's (c, h))
  'dense'     A [T, *B, C, C],     b [T, *B, C]      (A h)_i = sum_j A_{ij} h_j

Back ends (`impl`), chosen by string:

  'sequential'   `lax.scan` over t: the reference. Depth T.
  'associative'  `lax.associative_scan` over the affine maps x -> A x + b with
                 (A_i, b_i) . (A_j, b_j) = (A_j A_i, A_j b_i + b_j)  (j after i).
                 Depth ~2 log2 T, work O(T) combines.
  'chunked'      T = Q chunks of `chunk` steps. (1) read-only pass, sequential within
                 chunks and vectorised across them: each chunk's composite map
                 (P_n, s_n) = (A_{C-1}...A_0, state at the chunk end from 0);
                 (2) carry pass over the Q chunks: e_n = P_n e_{n-1} + s_n;
                 (3) fix-up: rerun each chunk from its true start e_{n-1},
                 vectorised across chunks, writing the states. Depth 2 chunk + Q,
                 work ~2x sequential. ParaRNN's CUDA reduction (thread-local
                 Thomas sweeps, a reduction over chunk ends, back-substitution)
                 and a future Pallas kernel have this shape.
  'auto'         the fastest for the call as it is made (`resolve_impl`): on
                 CPU 'chunked' for diagonal A when b's buffer may be
                 overwritten and T reaches the crossover measured on this
                 kind of host (`scan_table.json`, written by
                 launch/bench_scan.py), else 'sequential' (measured fastest
                 for block2 and dense here); 'associative' on accelerators,
                 where log depth pays.

The chunked fix-up overwrites b's buffer with the states, so when b is dead
after the call (an intermediate of the program: inside a Newton step or a
layer) no output buffer is allocated; on a 2-core CPU that, not the depth,
is what makes it faster than `lax.scan`, whose output is always a fresh
allocation. When b is live (a concrete array, or a non-donated argument of
the program) XLA must copy it first and chunked loses. A trace cannot see
donation, so `linear_scan(overwrite_b=None)` takes a traced b as an
intermediate and a concrete b as live; `overwrite_b=` says which it is.

Accumulation is in float32 at least (float64 stays float64); the result has the
dtype of `b`. New back ends (e.g. a Pallas kernel) plug in with
`register_impl(name, fn)`, `fn(A, b, h0, ops, chunk) -> h` for the forward
direction; `linear_scan` handles validation, dtypes and `reverse`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

STRUCTURES = ("diagonal", "block2", "dense")
IMPLS = ("sequential", "associative", "chunked", "auto")
DEFAULT_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class Ops:
  """The algebra of one Jacobian structure.

  Attributes:
    name: the structure string.
    extra: trailing axes A has beyond b (0 diagonal, 1 block2 and dense).
    apply: (A, h) -> A h.
    compose: (A2, A1) -> A2 A1 (A1 first).
    transpose: A -> A^T (per block).
    identity_like: b -> the identity map broadcast to b's batch shape.
  """
  name: str
  extra: int
  apply: Callable[[jax.Array, jax.Array], jax.Array]
  compose: Callable[[jax.Array, jax.Array], jax.Array]
  transpose: Callable[[jax.Array], jax.Array]
  identity_like: Callable[[jax.Array], jax.Array]

  def state_shape_ok(self, a_shape, b_shape) -> bool:
    """Whether A's trailing axes fit b's for this structure."""
    if self.name == "diagonal":
      return a_shape == b_shape
    if self.name == "block2":
      return (len(b_shape) >= 2 and b_shape[-2] == 2
              and a_shape == b_shape[:-1] + (2,) + b_shape[-1:])
    return a_shape == b_shape + b_shape[-1:]


def _block2_apply(a, h):
  """(A h)_{ik} = A_{i0k} h_{0k} + A_{i1k} h_{1k}, written out elementwise.

  (A sum over the size-2 axis, or an einsum, is 5-10x slower on XLA:CPU.)
  """
  return a[..., :, 0, :] * h[..., None, 0, :] + a[..., :, 1, :] * h[..., None,
                                                                      1, :]


def _block2_compose(a2, a1):
  """(A2 A1)_{ilk} = sum_j A2_{ijk} A1_{jlk}, the four entries written out."""
  def entry(i, l):
    return a2[..., i, 0, :] * a1[..., 0, l, :] + a2[..., i, 1, :] * a1[..., 1,
                                                                       l, :]
  return jnp.stack([jnp.stack([entry(i, l) for l in (0, 1)], axis=-2)
                    for i in (0, 1)], axis=-3)


def _block2_identity(b):
  eye = jnp.eye(2, dtype=b.dtype)[:, :, None]
  return jnp.broadcast_to(eye, b.shape[:-2] + (2, 2, b.shape[-1]))


def _dense_identity(b):
  h = b.shape[-1]
  return jnp.broadcast_to(jnp.eye(h, dtype=b.dtype), b.shape + (h,))


_OPS = {
    "diagonal": Ops(
        "diagonal", 0,
        apply=lambda a, h: a * h,
        compose=lambda a2, a1: a2 * a1,
        transpose=lambda a: a,
        identity_like=jnp.ones_like),
    "block2": Ops(
        "block2", 1,
        apply=_block2_apply,
        compose=_block2_compose,
        transpose=lambda a: jnp.swapaxes(a, -3, -2),
        identity_like=_block2_identity),
    "dense": Ops(
        "dense", 1,
        apply=lambda a, h: jnp.einsum("...ij,...j->...i", a, h),
        compose=lambda a2, a1: jnp.einsum("...ij,...jk->...ik", a2, a1),
        transpose=lambda a: jnp.swapaxes(a, -1, -2),
        identity_like=_dense_identity),
}


def pick(table, name: str, what: str):
  """table[name], or a ValueError naming `what` and the known names."""
  try:
    return table[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown {what} {name!r}; expected one of "
                     f"{tuple(table)}") from None


def ops_for(structure: str) -> Ops:
  """The `Ops` of a structure string; a clear error for unknown ones."""
  return pick(_OPS, structure, "structure")


# --- back ends (forward direction; h0 given) ---------------------------------


def _scan_states(A, b, h0, ops: Ops, reverse: bool = False):
  """h_t = A_t h_{t-1} + b_t (or h_{t+1} if `reverse`) with `lax.scan`."""
  def step(h, ab):
    h = ops.apply(ab[0], h) + ab[1]
    return h, h
  return lax.scan(step, h0, (A, b), reverse=reverse)[1]


def _sequential(A, b, h0, ops: Ops, chunk: int):
  """The reference: one `lax.scan` step per t. Depth T."""
  del chunk
  return _scan_states(A, b, h0, ops)


def _affine_combine(ops: Ops):
  """(A_i, b_i) . (A_j, b_j) = (A_j A_i, A_j b_i + b_j), element j after i."""
  def combine(earlier, later):
    (a_i, b_i), (a_j, b_j) = earlier, later
    return ops.compose(a_j, a_i), ops.apply(a_j, b_i) + b_j
  return combine


def _associative(A, b, h0, ops: Ops, chunk: int):
  """Prefix composition by `lax.associative_scan`, h0 folded into b_0.

  With b'_0 = A_0 h0 + b_0 the prefix map of steps 0..t sends 0 to h_t, so
  h_t is the offset of the t-th prefix composite.
  """
  del chunk
  b = b.at[0].add(ops.apply(A[0], h0))
  return lax.associative_scan(_affine_combine(ops), (A, b))[1]


def _chunk_sweep(A, b, h, ops: Ops, carry_map: bool, write: bool):
  """Runs the recurrence through the `chunk` steps of Q chunks at once.

  A [Q, chunk, *B, ...], b [Q, chunk, *B, ...], h [Q, *B, ...] (each
  chunk's start).
  Step c reads A[:, c], b[:, c] (one strided slice per step; no transposes).
  Returns the chunk-end states, the composite maps P_n = A_{C-1}..A_0 if
  `carry_map`, and every state [Q, chunk, ...] if `write`.
  """
  n_steps = A.shape[1]
  p0 = ops.identity_like(h) if carry_map else None
  # The states overwrite b in place: step c reads b[:, c] before writing it,
  # so XLA can reuse b's buffer (no fresh allocation when b is dead).
  out0 = b if write else None

  def body(c, carry):
    h, p, out = carry
    a_c = lax.dynamic_index_in_dim(A, c, axis=1, keepdims=False)
    b_c = lax.dynamic_index_in_dim(out if write else b, c, axis=1,
                                   keepdims=False)
    h = ops.apply(a_c, h) + b_c
    if carry_map:
      p = ops.compose(a_c, p)
    if write:
      out = lax.dynamic_update_index_in_dim(out, h, c, axis=1)
    return h, p, out
  return lax.fori_loop(0, n_steps, body, (h, p0, out0))


def _chunked(A, b, h0, ops: Ops, chunk: int):
  """Two-pass chunked scan: read-only chunk reduction, carry pass, fix-up.

  Pads T to Q chunk with identity maps and zero offsets (which leave the state
  unchanged), then (1) (P_n, s_n) per chunk from a zero start, (2)
  e_n = P_n e_{n-1} + s_n with e_{-1} = h0 (`_sequential` over Q), (3) each
  chunk rerun from e_{n-1}.
  """
  t = A.shape[0]
  c = max(1, min(chunk, t))
  n = -(-t // c)
  pad = n * c - t
  if pad:
    A = jnp.concatenate([A, ops.identity_like(jnp.zeros((pad,) + b.shape[1:],
                                                        b.dtype))], axis=0)
    b = jnp.concatenate([b, jnp.zeros((pad,) + b.shape[1:], b.dtype)], axis=0)
  A = A.reshape((n, c) + A.shape[1:])
  b = b.reshape((n, c) + b.shape[1:])
  zeros = jnp.zeros((n,) + h0.shape, b.dtype)
  s, p, _ = _chunk_sweep(A, b, zeros, ops, carry_map=True, write=False)
  ends = _scan_states(p, s, h0, ops)
  starts = jnp.concatenate([h0[None], ends[:-1]], axis=0)
  out = _chunk_sweep(A, b, starts, ops, carry_map=False, write=True)[2]
  return out.reshape((n * c,) + out.shape[2:])[:t]


_IMPL_FNS: dict[str, Callable] = {
    "sequential": _sequential,
    "associative": _associative,
    "chunked": _chunked,
}


def register_impl(name: str, fn: Callable) -> None:
  """Adds a back end: `fn(A, b, h0, ops, chunk) -> h` (forward direction)."""
  if name in ("auto",):
    raise ValueError("'auto' is reserved")
  _IMPL_FNS[name] = fn


# When 'chunked' beats 'sequential' on CPU for a diagonal A: per context
# ('overwrite': b is a dead intermediate; 'live': b must survive the call)
# and per channel count C (the product of b's non-time axes), the smallest T
# from which it won at every longer T measured, or None (never). Measured by
# launch/bench_scan.py --write_table (benchmarks/results/scan_auto.json); a
# call uses the entry of the largest measured C not above its own (the
# smallest if none). The default holds when the file is missing.
_TABLE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "scan_table.json")
_DEFAULT_CROSSOVER = {"overwrite": {"1": 4 * DEFAULT_CHUNK}, "live": {"1": None}}


@functools.cache
def crossover_table() -> dict:
  """`{context: {C: T or None}}` (see above)."""
  try:
    with open(_TABLE_FILE, encoding="utf-8") as f:
      table = json.load(f)["chunked_from_T"]
    return {k: dict(table.get(k) or v) for k, v in _DEFAULT_CROSSOVER.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return {k: dict(v) for k, v in _DEFAULT_CROSSOVER.items()}


def chunked_from(overwrite_b: bool, channels: int):
  """The crossover T of the table entry that applies to `channels`."""
  entries = sorted((int(c), t) for c, t in crossover_table()[
      "overwrite" if overwrite_b else "live"].items())
  below = [t for c, t in entries if c <= channels]
  return below[-1] if below else entries[0][1]


def resolve_impl(impl: str, structure: str, t: int,
                 chunk: int = DEFAULT_CHUNK, overwrite_b: bool = True,
                 channels: int = 1) -> str:
  """The concrete back end `impl` names: 'auto' resolved for this call (T,
  C channels, and whether b's buffer may be overwritten: module
  docstring)."""
  if impl != "auto":
    if impl not in _IMPL_FNS:
      raise ValueError(f"unknown impl {impl!r}; expected one of "
                       f"{tuple(_IMPL_FNS) + ('auto',)}")
    return impl
  if jax.default_backend() == "cpu":
    start = chunked_from(overwrite_b, channels)
    if structure == "diagonal" and start is not None and t >= start:
      return "chunked"
    return "sequential"
  return "associative"


def accumulation_dtype(dtype) -> jnp.dtype:
  """float32, or the input's float type if wider (float64 stays float64)."""
  return jnp.promote_types(dtype, jnp.float32)


def linear_scan(A: jax.Array, b: jax.Array, h0: jax.Array | None = None, *,
                structure: str = "diagonal", impl: str = "auto",
                reverse: bool = False, chunk: int = DEFAULT_CHUNK,
                overwrite_b: bool | None = None) -> jax.Array:
  """All states of h_t = A_t h_{t-1} + b_t (or of the reverse recurrence).

  Args:
    A: [T, *B, C] (diagonal), [T, *B, 2, 2, C] (block2), [T, *B, C, C]
      (dense).
    b: [T, *B, C] (diagonal, dense) or [T, *B, 2, C] (block2).
    h0: b.shape[1:], the state before the first step (after the last one if
      `reverse`); None means zeros.
    structure: 'diagonal' | 'block2' | 'dense'.
    impl: 'sequential' | 'associative' | 'chunked' | 'auto' | a registered
      back end.
    reverse: solve h_t = A_t h_{t+1} + b_t from t = T-1 down to 0.
    chunk: chunk length C of the 'chunked' back end.
    overwrite_b: whether b's buffer is dead after the call (what 'auto'
      weighs, module docstring); None: True when b is traced (an
      intermediate of the program being traced), False when concrete.

  Returns:
    h, b.shape, dtype of b: h[t] is the state after step t.

  Raises:
    ValueError: unknown structure or impl, or shapes that do not fit.
  """
  ops = ops_for(structure)
  if b.ndim < 2:
    raise ValueError(f"b must be [T, ..., C] (time-major), got {b.shape}")
  if not ops.state_shape_ok(tuple(A.shape), tuple(b.shape)):
    raise ValueError(f"A {A.shape} does not fit b {b.shape} for structure "
                     f"{structure!r} (see the shape table in the docstring)")
  if h0 is not None and tuple(h0.shape) != tuple(b.shape[1:]):
    raise ValueError(f"h0 must have shape {b.shape[1:]}, got {h0.shape}")
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  if overwrite_b is None:
    overwrite_b = isinstance(b, jax.core.Tracer)
  name = resolve_impl(impl, structure, b.shape[0], chunk, overwrite_b,
                      channels=math.prod(b.shape[1:]))
  out_dtype = b.dtype
  acc = accumulation_dtype(jnp.result_type(A.dtype, b.dtype))
  A, b = A.astype(acc), b.astype(acc)
  h0 = jnp.zeros(b.shape[1:], acc) if h0 is None else h0.astype(acc)
  if b.shape[0] == 0:
    return b.astype(out_dtype)
  fn = _IMPL_FNS[name]
  if name == "sequential":  # lax.scan reverses without copies
    h = _scan_states(A, b, h0, ops, reverse)
  elif reverse:
    h = jnp.flip(fn(jnp.flip(A, 0), jnp.flip(b, 0), h0, ops, chunk), 0)
  else:
    h = fn(A, b, h0, ops, chunk)
  return h.astype(out_dtype)
