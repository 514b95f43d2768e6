"""Mamba-2's state-space duality (SSD) in three forms, and its causal conv,
as pure functions: the chunked form (prefill, training), the masked form
(a token tree verified from the root state, STree), the step form
(decoding) and the replay that commits a kept path.

Shapes (`seqdec.shapes` legend, plus): H SSM heads, P head size, G groups
(B and C shared by H / G heads each), N state size, K conv taps, C conv
channels, W scratch-window slots, M kept tokens.

The recurrence, per head h (A_h < 0 a scalar, scalar-times-identity decay):

    a_t   = exp(dt_t A_h)                               decay in (0, 1]
    h_t   = a_t h_{t-1} + dt_t x_t B_t^T                 [P, N]
    y_t   = h_t C_t                                      [P]

Unrolled from h_{-1} = h0, with the segment sum S(t, s) = sum_{s<v<=t}
dt_v A_h:

    y_t = sum_{s<=t} exp(S(t, s)) (C_t . B_s) dt_s x_s  +  exp(S(t, -1)) h0 C_t

which is causal attention with scores C_t . B_s weighted by the decay mask
L(t, s) = exp(S(t, s)): the "dual" quadratic form. On a token tree the
same holds with "s <= t" replaced by "s is t or an ancestor of t" and S
summed along t's root path (`ssd_masked`): each node sees exactly the
sequence its root path spells, in one pass, without materialising a state
per node.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from seqdec.parallel.scan import linear_scan


def _acc(dtype) -> jnp.dtype:
  """Accumulation dtype: float32 at least (float64 stays float64)."""
  return jnp.promote_types(dtype, jnp.float32)


def heads_of_groups(m: jax.Array, num_heads: int) -> jax.Array:
  """`[..., G, N]` group-shared B or C -> `[..., H, N]` (head h uses group
  h // (H / G), as Mamba-2 and HF's repeat_interleave)."""
  return jnp.repeat(m, num_heads // m.shape[-2], axis=-2)


def segsum(dA: jax.Array) -> jax.Array:
  """`[..., T]` -> `[..., T, T]`: S[t, s] = sum_{s < v <= t} dA_v for s <= t,
  -inf above the diagonal, summed directly (no difference of cumulative
  sums, which cancels catastrophically in float32)."""
  t = dA.shape[-1]
  x = jnp.broadcast_to(dA[..., None, :], dA.shape + (t,))    # [..., t(row), v]
  x = jnp.swapaxes(x, -1, -2)                                 # [..., v, s]
  # x[v, s] = dA_v; keep v > s, cumulative over v gives sum_{s<v<=t}.
  keep = jnp.tril(jnp.ones((t, t), jnp.bool_), -1)
  s = jnp.cumsum(jnp.where(keep, x, 0), axis=-2)
  return jnp.where(jnp.tril(jnp.ones((t, t), jnp.bool_)), s, -jnp.inf)


def ssd_step(h: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array,
             B: jax.Array, C: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One step of the recurrence (module docstring).

  Args:
    h: `[B, H, P, N]` state; x `[B, H, P]`; dt `[B, H]`; A `[H]`;
      B, C: `[B, G, N]`.

  Returns:
    `(y [B, H, P], h' [B, H, P, N])`.
  """
  nh = x.shape[1]
  Bh, Ch = heads_of_groups(B, nh), heads_of_groups(C, nh)
  decay = jnp.exp(dt * A)[:, :, None, None]
  h = decay * h + (dt[:, :, None] * x)[..., None] * Bh[:, :, None, :]
  return jnp.einsum("bhpn,bhn->bhp", h, Ch), h


def ssd_sequential(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array,
                   C: jax.Array, h0: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """`ssd_step` under `lax.scan`: the reference and the decoding form.

  Args: x `[B, T, H, P]`, dt `[B, T, H]`, A `[H]`, B, C `[B, T, G, N]`,
    h0 `[B, H, P, N]`. Returns `(y [B, T, H, P], h_T)`.
  """
  def body(h, inp):
    y, h = ssd_step(h, *inp[:2], A, *inp[2:])
    return h, y

  xs = tuple(jnp.moveaxis(a, 1, 0) for a in (x, dt, B, C))
  h, y = jax.lax.scan(body, h0, xs)
  return jnp.moveaxis(y, 0, 1), h


def ssd_chunked(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array,
                C: jax.Array, h0: jax.Array, chunk: int = 64,
                impl: str = "auto") -> tuple[jax.Array, jax.Array]:
  """The chunked SSD algorithm (Mamba-2, section 6): T = Q chunks of `chunk`.

  Within chunk c (positions l, s), with cumulative log-decay
  a_l = sum_{v<=l} dt_v A and the chunk's start state e_{c-1}:

      y_l  = sum_{s<=l} exp(a_l - a_s) (C_l . B_s) dt_s x_s     (diagonal block)
             + exp(a_l) e_{c-1} C_l                             (off-diagonal)
      s_c  = sum_s exp(a_end - a_s) dt_s x_s B_s^T             (chunk's own state)
      e_c  = exp(a_end) e_{c-1} + s_c                          (state passing)

  The state passing is a diagonal linear recurrence over the Q chunks, run
  through `linear_scan` (`impl` its back end). Work is O(T chunk) in the
  quadratic blocks and O(T N P) in the states.

  Args: as `ssd_sequential`; chunk: static chunk length (T is padded to a
    multiple with dt = 0, which leaves the state unchanged).

  Returns:
    `(y [B, T, H, P], h_T [B, H, P, N])` in the accumulation dtype.
  """
  b, t, nh, p = x.shape
  n = B.shape[-1]
  acc = _acc(x.dtype)
  q = max(1, -(-t // chunk))
  pad = q * chunk - t

  def blocks(a):
    a = jnp.pad(a.astype(acc), [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    return a.reshape((b, q, chunk) + a.shape[2:])

  xc, dtc = blocks(x), blocks(dt)                        # [b,q,l,h,p], [b,q,l,h]
  Bc = blocks(heads_of_groups(B, nh))                    # [b,q,l,h,n]
  Cc = blocks(heads_of_groups(C, nh))
  dA = jnp.moveaxis(dtc * A.astype(acc), -1, 2)          # [b,q,h,l]
  cum = jnp.cumsum(dA, axis=-1)
  L = jnp.exp(segsum(dA))                                # [b,q,h,l,s]
  scores = jnp.einsum("bqlhn,bqshn->bqhls", Cc, Bc) * L
  xdt = xc * dtc[..., None]
  y_diag = jnp.einsum("bqhls,bqshp->bqlhp", scores, xdt)
  to_end = jnp.exp(cum[..., -1:] - cum)                  # [b,q,h,l]
  own = jnp.einsum("bqhl,bqlhn,bqlhp->bqhpn", to_end, Bc, xdt)
  chunk_decay = jnp.exp(cum[..., -1])                    # [b,q,h]
  # e_c = chunk_decay_c e_{c-1} + own_c, time-major over chunks.
  decay_full = jnp.broadcast_to(chunk_decay[..., None, None], own.shape)
  ends = linear_scan(jnp.moveaxis(decay_full, 1, 0), jnp.moveaxis(own, 1, 0),
                     h0.astype(acc), structure="diagonal", impl=impl)
  ends = jnp.moveaxis(ends, 0, 1)                        # [b,q,h,p,n]
  starts = jnp.concatenate([h0.astype(acc)[:, None], ends[:, :-1]], axis=1)
  y_off = jnp.einsum("bqlhn,bqhpn->bqlhp", Cc, starts) * jnp.moveaxis(
      jnp.exp(cum), 2, -1)[..., None]
  y = (y_diag + y_off).reshape(b, q * chunk, nh, p)[:, :t]
  return y, ends[:, -1]


def ssd_masked(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array,
               C: jax.Array, h0: jax.Array, mask: jax.Array) -> jax.Array:
  """Outputs of T new tokens that see a scratch window of W tokens through
  an ancestor mask (STree's tree pass; a chain or causal mask is the
  special case of a path).

  Window entry u holds a token's x_u, dt_u, B_u; the new tokens are its last
  T entries (C is theirs). New token t's visible set {u : mask[t, u]} is
  its root path in the window (itself included). With the decays summed
  along that path,

      S(t, u) = sum_{v > u, mask[t, v]} dt_v A      (v runs over the path)
      y_t     = sum_{u: mask[t, u]} exp(S(t, u)) (C_t . B_u) dt_u x_u
                + exp(sum_{v: mask[t, v]} dt_v A) h0 C_t

  which is the sequential recurrence along t's root path from the root
  state h0 (module docstring): every tree node's output in one pass.
  Entries of a path are ordered by window index (parents precede children),
  so "v > u" on the path is "v after u on it".

  Args:
    x: `[B, W, H, P]`; dt: `[B, W, H]`; B: `[B, W, G, N]` (window entries);
    C: `[B, T, G, N]` (new tokens); A: `[H]`; h0: `[B, H, P, N]`;
    mask: `[B, T, W]` bool.

  Returns:
    `y [B, T, H, P]` in the accumulation dtype.
  """
  w, nh = x.shape[1], x.shape[2]
  acc = _acc(x.dtype)
  m = mask.astype(acc)                                         # [b,t,u]
  dA = dt.astype(acc) * A.astype(acc)                          # [b,u,h]
  on_path = m[..., None] * dA[:, None]                         # [b,t,v,h]
  after = jnp.tril(jnp.ones((w, w), acc), -1)                  # [v,u]: v>u
  S = jnp.einsum("btvh,vu->btuh", on_path, after)
  L = jnp.where(mask[..., None], jnp.exp(S), 0.0)              # [b,t,u,h]
  Bh = heads_of_groups(B.astype(acc), nh)                      # [b,u,h,n]
  Ch = heads_of_groups(C.astype(acc), nh)                      # [b,t,h,n]
  scores = jnp.einsum("bthn,buhn->btuh", Ch, Bh) * L
  xdt = x.astype(acc) * dt.astype(acc)[..., None]
  y = jnp.einsum("btuh,buhp->bthp", scores, xdt)
  root_decay = jnp.exp(on_path.sum(axis=2))                    # [b,t,h]
  return y + root_decay[..., None] * jnp.einsum(
      "bthn,bhpn->bthp", Ch, h0.astype(acc))


def ssd_replay(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array,
               h0: jax.Array, n_keep: jax.Array) -> jax.Array:
  """The state after the first `n_keep[b]` of M kept tokens, from h0:

      h = exp(sum_{j<n} dt_j A) h0 + sum_{j<n} exp(sum_{j<i<n} dt_i A)
                                              dt_j x_j B_j^T

  (the recurrence unrolled over the kept path; what `commit` applies).

  Args:
    x: `[B, M, H, P]`; dt: `[B, M, H]`; B: `[B, M, G, N]`; A: `[H]`;
    h0: `[B, H, P, N]`; n_keep: `[B]` int (0 .. M).

  Returns:
    `[B, H, P, N]` in h0's dtype.
  """
  m, nh = x.shape[1], x.shape[2]
  acc = _acc(h0.dtype)
  kept = (jnp.arange(m)[None] < n_keep[:, None]).astype(acc)      # [b,m]
  dA = dt.astype(acc) * A.astype(acc) * kept[..., None]           # [b,m,h]
  after = jnp.tril(jnp.ones((m, m), acc), -1)                     # [i,j]: i>j
  to_end = jnp.exp(jnp.einsum("bih,ij->bjh", dA, after))           # [b,m,h]
  wts = to_end * dt.astype(acc) * kept[..., None]
  Bh = heads_of_groups(B.astype(acc), nh)
  h = jnp.exp(dA.sum(axis=1))[..., None, None] * h0.astype(acc)
  h = h + jnp.einsum("bmh,bmhp,bmhn->bhpn", wts, x.astype(acc), Bh)
  return h.astype(h0.dtype)


def conv_causal(raw: jax.Array, conv_state: jax.Array, w: jax.Array,
                bias: Optional[jax.Array]) -> jax.Array:
  """Depthwise causal conv over a sequence that continues `conv_state`:

      out_t = bias + sum_{k<K} w[k] * ext[t + k],   ext = conv_state ++ raw

  Args:
    raw: `[B, T, C]`; conv_state: `[B, K-1, C]` the K-1 inputs before
      raw[0] (oldest first); w: `[K, C]` (HF's conv1d.weight[c, 0, k]);
      bias: `[C]` or None.

  Returns:
    `[B, T, C]` (before the activation).
  """
  k, t = w.shape[0], raw.shape[1]
  ext = jnp.concatenate([conv_state.astype(raw.dtype), raw], axis=1)
  out = sum(ext[:, j:j + t] * w[j] for j in range(k))
  return out if bias is None else out + bias


def conv_tree(raw: jax.Array, conv_state: jax.Array, w: jax.Array,
              bias: Optional[jax.Array], mask: jax.Array) -> jax.Array:
  """`conv_causal` along each new token's root path in a scratch window.

  New token t's visible window entries (`mask[t]`, itself included) are its
  root path, ordered by index; its depth in the window is d_t = |path| - 1.
  The input j steps back on the path is the path entry of rank d_t - j,
  and before the window's first entry it is conv_state[K-1-(j-d_t)]:

      out_t = bias + sum_{j<K} w[K-1-j] * (input j steps back of t)

  Args:
    raw: `[B, W, C]` window inputs; conv_state: `[B, K-1, C]`; w: `[K, C]`;
      bias: `[C]` or None; mask: `[B, T, W]` bool (new tokens = last T).

  Returns:
    `[B, T, C]`.
  """
  k = w.shape[0]
  rank = jnp.cumsum(mask.astype(jnp.int32), axis=2) - 1        # [b,t,u]
  depth = rank[:, :, -1]                                       # [b,t]
  out = 0.0
  for j in range(k):
    pick = mask & (rank == (depth - j)[..., None])              # [b,t,u]
    in_window = jnp.take_along_axis(
        raw, jnp.argmax(pick, axis=2)[..., None], axis=1)        # [b,t,c]
    before = jnp.take_along_axis(
        conv_state.astype(raw.dtype),
        jnp.clip(k - 1 - (j - depth), 0, k - 2)[..., None], axis=1)
    value = jnp.where((j <= depth)[..., None], in_window, before)
    out = out + value * w[k - 1 - j]
  return out if bias is None else out + bias


def conv_state_after(raw: jax.Array, conv_state: jax.Array,
                     n_keep: jax.Array) -> jax.Array:
  """The last K-1 inputs after the first `n_keep[b]` of `raw` `[B, M, C]`
  continue `conv_state` `[B, K-1, C]`: (conv_state ++ raw[:n])[-(K-1):]."""
  km1 = conv_state.shape[1]
  ext = jnp.concatenate([conv_state, raw.astype(conv_state.dtype)], axis=1)
  idx = n_keep[:, None] + jnp.arange(km1)[None]                # [b,K-1]
  return jnp.take_along_axis(ext, idx[..., None], axis=1)


def ssd_tree_states(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array,
                    C: jax.Array, h0: jax.Array, parents: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """The naive tree pass that STree improves on: every node's state.

      h_i = exp(dt_i A) h_{parent(i)} + dt_i x_i B_i^T,   h_{parent(root)} = h0
      y_i = h_i C_i

  Nodes are numbered so that parents precede children; the loop runs over
  the N nodes in order. Memory: N states of H P N entries per row (what
  `ssd_masked` never materialises); it is the test oracle of the masked
  pass and the bench's baseline.

  Args:
    x: `[B, N, H, P]`; dt: `[B, N, H]`; A: `[H]`; B, C: `[B, N, G, N_s]`;
    h0: `[B, H, P, N_s]`; parents: `[B, N]` int (-1 for the root).

  Returns:
    `(y [B, N, H, P], states [B, N, H, P, N_s])`.
  """
  n = x.shape[1]
  acc = _acc(x.dtype)
  states = jnp.zeros(x.shape + (B.shape[-1],), acc)

  def body(i, carry):
    states, ys = carry
    par = parents[:, i]
    prev = jnp.where((par >= 0)[:, None, None, None],
                     jnp.take_along_axis(
                         states, jnp.maximum(par, 0)[:, None, None, None,
                                                     None], 1)[:, 0],
                     h0.astype(acc))
    y, h = ssd_step(prev, x[:, i].astype(acc), dt[:, i].astype(acc),
                    A.astype(acc), B[:, i].astype(acc), C[:, i].astype(acc))
    return states.at[:, i].set(h), ys.at[:, i].set(y)

  states, ys = jax.lax.fori_loop(0, n, body,
                                 (states, jnp.zeros(x.shape, acc)))
  return ys, states
