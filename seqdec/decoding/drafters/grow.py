"""Growing a static-topology tree level by level, shared by the drafters
that score candidates with a network (`model.ModelDrafter`, `eagle`).

A drafter supplies `expand(d, tokens, carry) -> (logits [B, w, V], carry)`,
its distribution at level d's w nodes (it feeds those nodes, whose tokens
are set, and may carry a cache or per-node state); `grow_static_tree` turns
the logits into each node's children by rank (the child of rank r gets
candidate r) under the proposal scheme (`PROPOSALS`):

* 'topk': the r-th most likely token (deterministic; the only scheme for
  greedy rows, whatever the configured proposal);
* 'iid': K independent draws from q = softmax(logits / temperature)
  (duplicates kept), the proposal of speculative sampling (K = 1, a chain)
  and of SpecInfer-style multi-draft trees;
* 'wor': K draws without replacement from q by Gumbel-top-K,
      children = top_K(log q + G),  G_v ~ Gumbel(0, 1) i.i.d.,
  which draws the first child from q, the second from q renormalised without
  the first, and so on (Recursive Speculative Decoding's proposal).

The tree records each node's scheme and q, which the lossless sampling rule
(`verify.py`) matches. Leaves are never fed: a tree of depth D costs D calls
of `expand` whatever its width.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from seqdec.decoding import trees as trees_lib
from seqdec.decoding.drafters.base import DrafterError, Round, static_children
from seqdec.decoding.trees import Tree, TreeShape
from seqdec.kernels.tree_mask import ancestor_mask
from seqdec.parallel import sharding


def window_mask(parents: jax.Array, lag: int) -> jax.Array:
  """Ancestor mask of the tree with a chain of `lag` committed-behind tokens
  prepended above the root, `[B, lag + N, lag + N]` (each sees its whole
  path), built on device from parents `[B, N]`:

      mask[:, e, f] = f <= e               f < lag   (the chain behind)
      mask[:, lag + i, lag + j] = ancestor_mask(parents)[:, i, j]
      mask[:, e, lag + j] = 0              e < lag
  """
  b, n = parents.shape
  behind = jnp.tril(jnp.ones((lag + n, lag), jnp.bool_))
  tree = jnp.concatenate([jnp.zeros((b, lag, n), jnp.bool_),
                          ancestor_mask(parents)], axis=1)
  return jnp.concatenate([jnp.broadcast_to(behind, (b, lag + n, lag)), tree],
                         axis=2)


PROPOSALS = {"topk": trees_lib.DETERMINISTIC, "iid": trees_lib.IID,
             "wor": trees_lib.WITHOUT_REPLACEMENT}


def check_proposal(proposal: str) -> None:
  """DrafterError unless `proposal` names a scheme of `PROPOSALS`."""
  if proposal not in PROPOSALS:
    raise DrafterError(f"unknown proposal {proposal!r}; known: "
                       f"{sorted(PROPOSALS)}")


def propose_children(logits: jax.Array, k: int, proposal: str,
                     temperature: Optional[jax.Array], key: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """K ranked candidates per node by the proposal scheme (module docstring).

  Args:
    logits: `[B, w, V]` drafter logits at w nodes of a level.
    k: static number of candidates (the widest branching of the level).
    proposal: 'topk', 'iid' or 'wor'.
    temperature: `[B]` per-row temperature (0: greedy) or None.
    key: `[B]` typed keys for this level.

  Returns:
    `(tokens [B, w, k] int32, scheme [B] int32, q [B, w, V] float32,
    logq [B, w, k] float32)`: the candidates, each row's scheme
    (deterministic for greedy rows), q (None when every row is
    deterministic), and each candidate's log-probability under the row's
    law (softmax(logits / T), T = 1 for greedy rows): the drafter's
    confidence (`Tree.path_logq`).
  """
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  top_logit, top = sharding.top_k(logits, k)
  top = top.astype(jnp.int32)
  b = logits.shape[0]
  check_proposal(proposal)
  if proposal == "topk" or temperature is None:
    top_logq = top_logit - jax.nn.logsumexp(logits, -1, keepdims=True)
    return (top, jnp.full((b,), trees_lib.DETERMINISTIC, jnp.int32), None,
            top_logq)
  sampled = temperature > 0
  t = jnp.where(sampled, temperature, 1.0)[:, None, None]
  logq = jax.nn.log_softmax(logits / t, axis=-1)                  # [B, w, V]

  if proposal == "iid":
    def row(key, logq):                                           # [w, V]
      draws = jax.random.categorical(key, logq, axis=-1,
                                     shape=(k,) + logq.shape[:-1])
      return jnp.moveaxis(draws, 0, -1)                           # [w, k]
    drawn = jax.vmap(row)(key, logq)
  else:   # Gumbel top-k: k distinct draws, without replacement
    gumbel = jax.vmap(lambda key: jax.random.gumbel(
        key, logq.shape[1:], logq.dtype))(key)                    # [B, w, V]
    drawn = sharding.top_k(logq + gumbel, k)[1]
  drawn = drawn.astype(jnp.int32)
  tokens = jnp.where(sampled[:, None, None], drawn, top)
  scheme = jnp.where(sampled, PROPOSALS[proposal], trees_lib.DETERMINISTIC)
  return (tokens, scheme.astype(jnp.int32), jnp.exp(logq),
          jnp.take_along_axis(logq, tokens, axis=-1))


Expand = Callable[[int, jax.Array, Any], tuple[jax.Array, Any]]


def trimmed_logits(kept: jax.Array, keep_ids: Optional[jax.Array],
                   vocab_size: int) -> jax.Array:
  """`[..., M]` logits of the kept ids -> `[..., V]` with -inf elsewhere
  (identity when `keep_ids` is None), so that softmax at any temperature is
  the kept-set law renormalised, zero off the set (VocabTrim): exactly the
  law a trimmed drafter's children are drawn from."""
  if keep_ids is None:
    return kept
  full = jnp.full(kept.shape[:-1] + (vocab_size,), -jnp.inf, kept.dtype)
  return full.at[..., keep_ids].set(kept)


def head_scores(target, h: jax.Array, keep_ids: Optional[jax.Array],
                weight, vocab_size: int) -> jax.Array:
  """`[..., V]` drafter logits from the target head's input `h [..., D]`:
  head(h), or with a trimmed head (`keep_ids`, its prebuilt `weight =
  target.head_weight(keep_ids)`) the kept ids' logits and -inf elsewhere
  (`trimmed_logits`)."""
  return trimmed_logits(target.head(h, keep_ids, weight), keep_ids,
                        vocab_size)


def prebuilt_head(target, keep_ids: Optional[np.ndarray]):
  """`(keep_ids, weight)` as device arrays for `head_scores`: the trimmed
  head's weight built once (not gathered at every level), or (None,
  None). The ids are sorted ascending, so that a top-k over the kept
  logits breaks ties as one over V does (`drafters.dynamic`)."""
  if keep_ids is None:
    return None, None
  keep = jnp.asarray(np.sort(np.asarray(keep_ids)))
  return keep, target.head_weight(keep)


def check_keep_ids(keep_ids, vocab_size: int):
  """`keep_ids` as int32 numpy (None stays None); DrafterError unless they
  are distinct ids in [0, V)."""
  if keep_ids is None:
    return None
  keep_ids = np.asarray(keep_ids, np.int32)
  if (keep_ids.ndim != 1 or not len(keep_ids) or keep_ids.min() < 0
      or keep_ids.max() >= vocab_size
      or len(np.unique(keep_ids)) != len(keep_ids)):
    raise DrafterError(f"keep_ids must be distinct token ids in [0, "
                       f"{vocab_size}), got {len(keep_ids)} ids")
  return keep_ids


def grow_static_tree(shape: TreeShape, rnd: Round, key: jax.Array,
                     proposal: str, vocab_size: int, expand: Expand,
                     carry: Any) -> tuple[Tree, Any]:
  """The tree of topology `shape` under each row's root (module docstring).

  Args:
    shape: the static topology (nodes numbered level by level).
    rnd: the round (root tokens, per-row temperatures).
    key: `[B]` typed keys of the round (folded with the level).
    proposal: 'topk', 'iid' or 'wor' (sampling rows only).
    vocab_size: V of the logits (the width of q).
    expand: `(d, tokens [B, N], carry) -> (logits [B, w, V], carry)` at
      level d's nodes (tokens of levels <= d are set).
    carry: the drafter's state threaded through `expand`.

  Returns:
    `(tree, carry)`.
  """
  b, n = rnd.root.shape[0], shape.num_nodes
  parents = jnp.broadcast_to(jnp.asarray(shape.parents, jnp.int32), (b, n))
  tokens = jnp.zeros((b, n), jnp.int32).at[:, 0].set(rnd.root)
  k_max = max(shape.ranks) + 1
  sampling = proposal != "topk" and rnd.temperature is not None
  scheme = jnp.full((b, n), trees_lib.DETERMINISTIC, jnp.int32)
  q = jnp.zeros((b, n, vocab_size), jnp.float32) if sampling else None
  path_logq = jnp.zeros((b, n), jnp.float32)
  for d in range(shape.max_depth):
    lo, hi = shape.levels[d]
    logits, carry = expand(d, tokens, carry)                    # [B, w, V]
    level_keys = (jax.vmap(lambda k, d=d: jax.random.fold_in(k, d))(key)
                  if sampling else None)
    cand, level_scheme, level_q, cand_logq = propose_children(
        logits, k_max, proposal if sampling else "topk", rnd.temperature,
        level_keys)                                             # [B, w, k]
    c_lo, c_hi, parent_offset, rank = static_children(shape, d)
    tokens = tokens.at[:, c_lo:c_hi].set(cand[:, parent_offset, rank])
    path_logq = path_logq.at[:, c_lo:c_hi].set(
        path_logq[:, lo + parent_offset]
        + cand_logq[:, parent_offset, rank].astype(jnp.float32))
    scheme = scheme.at[:, lo:hi].set(level_scheme[:, None])
    if sampling:
      q = q.at[:, lo:hi].set(level_q)
  return Tree.from_parents(tokens, parents, scheme=scheme, q=q,
                           path_logq=path_logq), carry
