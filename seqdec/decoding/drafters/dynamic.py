"""Dynamic draft trees grown on device (EAGLE-2, Li et al. 2024), within a
static budget (`trees.DynamicTree`: N nodes, depth D, top-k K).

Each node v carries its cumulative draft log-probability
score(v) = sum over its path of log q(x_u | ancestors), a proxy for the
probability that v is accepted. Per row:

    level 1    the root's K most likely children            (K candidates)
    level d+1  the K best candidates of level d (the frontier) are fed to
               the drafter; each proposes its K most likely children
               (K * K candidates, score = parent's + log q)
    re-rank    the N - 1 best candidates of all levels by score (ties: the
               shallower first) become the tree; scores fall along a path,
               so the set holds every kept node's ancestors
    renumber   kept nodes in that (-score, depth) order, root 0: a child's
               score is at most its parent's (log q <= 0) and ties go to
               the shallower, so every parent precedes its children, and
               every prefix of the slots is the best tree of its size (what
               a verify budget keeps: `seqdec.decoding.budget`); parents
               `[B, N]` and the ancestor mask are built on device
               (`Tree.from_parents`)

Stopping (`DynamicTree.stop` = c > 0, the cost of one drafter level in
target decoding steps): a node's children are distinct tokens, so the
events "child j accepted" are disjoint and within "the node accepted";
all of level d+1 is then accepted with expected length at most the
frontier's mass, and so is every deeper level (its frontier's mass is at
most this one's):

    E[accepted at level d+1]  <=  M_d = sum_{live b} sum_{j in F_d} exp(score_j)

Level d+1 is grown (its drafter forward run, under a `lax.cond`) only if
M_d >= c; once skipped, its candidates score -inf, the next frontier's mass
is 0 and every deeper level is skipped too. Skipped levels' candidates fill
the slots the grown ones leave (last in the order; a verify budget drops
them first). The verify still checks every kept node, so the output is the
same function of the target's distributions: stopping changes speed only.

Children are the deterministic top-k (the re-ranking would break the laws
of i.i.d. or without-replacement children), so at temperature > 0 a dynamic
tree is verified with the lossless rule's deterministic step.

A trimmed drafter head (VocabTrim) scores M kept ids only; its logits can
come as `[..., M]` with the ids `vocab_ids` (ascending), and log q and the
top-k run over the M entries: log q is the same (the other V - M tokens
have q = 0) and so are the children, ties included (the lower id first),
without a `[..., V]` array per level.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from seqdec.decoding import trees as trees_lib
from seqdec.decoding.trees import BeamTree, DynamicTree, FrontierBudget, Tree
from seqdec.parallel import sharding

# expand(d, tokens [B, K], parent_pos [B, K], carry) -> (logits [B, K, V],
# carry): the drafter's distributions at level d's frontier nodes, whose
# parents are the previous frontier's nodes parent_pos (level 1: the root).
ExpandFrontier = Callable[[int, jax.Array, jax.Array, Any],
                          tuple[jax.Array, Any]]


def _top_k(logits: jax.Array, k: int, vocab_ids: Optional[jax.Array]
           ) -> tuple[jax.Array, jax.Array]:
  """`(log q, token ids)` `[..., k]` of the k most likely children from
  drafter logits `[..., V]`, or `[..., M]` over the ascending sub-vocabulary
  `vocab_ids` `[M]` (module docstring)."""
  logq = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  score, idx = sharding.top_k(logq, k)
  tok = idx if vocab_ids is None else jnp.take(vocab_ids, idx)
  return score, tok.astype(jnp.int32)


def _lexsort_rows(primary: jax.Array, secondary: jax.Array) -> jax.Array:
  """Per-row order by `primary` ascending, then `secondary` ascending."""
  return jax.vmap(lambda p, s: jnp.lexsort((s, p)))(primary, secondary)


def grow_dynamic_tree(budget: DynamicTree, root: jax.Array,
                      root_logits: jax.Array, expand: ExpandFrontier,
                      carry: Any, live: Optional[jax.Array] = None,
                      vocab_ids: Optional[jax.Array] = None
                      ) -> tuple[Tree, Any]:
  """The module docstring's tree under each row's root.

  Args:
    budget: N, D, K, and the stop cost.
    root: `[B]` root tokens.
    root_logits: `[B, V]` the drafter's logits at the root.
    expand: the drafter's frontier expansion (`ExpandFrontier`). With a
      stop cost a skipped level keeps the carry, broadcast to the shapes
      `expand` returns.
    carry: the drafter's state threaded through `expand`.
    live: `[B]` the rows whose mass counts for stopping (default: all).
    vocab_ids: `[M]` ascending: the logits (root's and `expand`'s) are over
      these ids only (a trimmed head; module docstring), else over V.

  Returns:
    `(tree, carry)`: a valid tree of N nodes and depth <= D per row.
  """
  k, depth_max, n = budget.top_k, budget.max_depth, budget.num_nodes
  b = root.shape[0]
  score, tok = _top_k(root_logits, k, vocab_ids)                   # [B, K]
  toks, scores = [tok], [score]
  parents = [jnp.full((b, k), -1, jnp.int32)]     # candidate slot, -1: root
  depths = [jnp.ones((b, k), jnp.int32)]
  front_slot = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k))
  front_tok, front_score = tok, score
  parent_pos = jnp.zeros((b, k), jnp.int32)
  base = k
  for d in range(1, depth_max):
    grow = functools.partial(expand, d, front_tok, parent_pos)
    if budget.stop > 0:
      mass = jnp.exp(front_score).sum(-1)
      mass = jnp.sum(mass if live is None else jnp.where(live, mass, 0.0))
      go = mass >= budget.stop
      logits, carry = jax.lax.cond(go, grow, _skipped(grow, carry), carry)
    else:
      go, (logits, carry) = None, grow(carry)                     # [B, K, V]
    child_lp, child_tok = _top_k(logits, k, vocab_ids)            # [B, K, K]
    if go is not None:                 # a skipped level's candidates: -inf
      child_lp = jnp.where(go, child_lp, -jnp.inf)
    cand_score = (front_score[:, :, None] + child_lp).reshape(b, k * k)
    cand_tok = child_tok.reshape(b, k * k)
    cand_parent = jnp.repeat(front_slot, k, axis=1)
    toks.append(cand_tok)
    scores.append(cand_score)
    parents.append(cand_parent)
    depths.append(jnp.full((b, k * k), d + 1, jnp.int32))
    front_score, idx = jax.lax.top_k(cand_score, k)
    front_tok = jnp.take_along_axis(cand_tok, idx, 1)
    front_slot = base + idx.astype(jnp.int32)
    parent_pos = (idx // k).astype(jnp.int32)
    base += k * k
  tok_all = jnp.concatenate(toks, 1)                               # [B, C]
  score_all = jnp.concatenate(scores, 1)
  parent_all = jnp.concatenate(parents, 1)
  depth_all = jnp.concatenate(depths, 1)
  # Re-rank: the N - 1 best by score, shallower first on ties; that order
  # numbers them (parents before children, best first).
  kept = _lexsort_rows(-score_all, depth_all)[:, :n - 1]          # [B, N-1]
  take = lambda x, i: jnp.take_along_axis(x, i, 1)                # noqa: E731
  new_index = jnp.zeros_like(tok_all).at[
      jnp.arange(b)[:, None], kept].set(jnp.arange(1, n, dtype=jnp.int32))
  kept_parent = take(parent_all, kept)
  parent_new = jnp.where(kept_parent < 0, 0,
                         take(new_index, jnp.maximum(kept_parent, 0)))
  tokens = jnp.concatenate([root[:, None].astype(jnp.int32),
                            take(tok_all, kept)], 1)
  parents_out = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32),
                                 parent_new.astype(jnp.int32)], 1)
  path_logq = jnp.concatenate([jnp.zeros((b, 1), jnp.float32),
                               take(score_all, kept)], 1)
  return Tree.from_parents(tokens, parents_out, scheme=trees_lib.DETERMINISTIC,
                           path_logq=path_logq), carry


def _skipped(grow: Callable[[Any], tuple[jax.Array, Any]], carry: Any):
  """A level's stand-in for `grow` when it is not grown: zero logits (its
  candidates are masked to -inf) and the carry unchanged, broadcast to the
  shapes `grow` returns (the first level's frontier widens 1 -> K)."""
  out = jax.eval_shape(grow, carry)

  def skip(c):
    logits = jnp.zeros(out[0].shape, out[0].dtype)
    return logits, jax.tree.map(
        lambda x, s: jnp.broadcast_to(x, s.shape).astype(s.dtype), c, out[1])
  return skip


def grow_beam_tree(budget: BeamTree, root: jax.Array, root_logits: jax.Array,
                   expand: ExpandFrontier, carry: Any,
                   vocab_ids: Optional[jax.Array] = None
                   ) -> tuple[Tree, Any]:
  """ReDrafter's candidates (Cheng et al., 2024): a beam search of W =
  `budget.width` beams over D = `budget.max_depth` tokens below each row's
  root, its final beams merged into a prefix tree.

      level 1    beams = the root's W most likely children, score log q
      level d+1  each beam b feeds the drafter (expand); candidates are
                 (b, x) with score(b) + log q(x | b), and the W best of
                 all W * V become the beams (the W best of each beam's
                 top W, which hold them)
      tree       slot (d, j) = the j-th beam of level d, child of its
                 parent beam's slot; slots numbered root 0, then level by
                 level, so parents precede children. The final beams and
                 their ancestors are valid; a beam of level d < D that no
                 final beam descends from is an invalid node (ReDrafter
                 verifies the final beams only). Beams are distinct
                 prefixes, so shared prefixes are shared nodes.

  Children are deterministic (the beam's best), verified at T > 0 by the
  lossless rule's deterministic step, as dynamic trees.

  Args and returns as `grow_dynamic_tree`; `path_logq` holds each beam's
  score.
  """
  w, depth = budget.width, budget.max_depth
  b = root.shape[0]
  score, tok = _top_k(root_logits, w, vocab_ids)                   # [B, W]
  toks, scores = [tok], [score]
  parent_beams = [jnp.zeros((b, w), jnp.int32)]   # level 1: the root
  for d in range(1, depth):
    logits, carry = expand(d, tok, parent_beams[-1], carry)       # [B, W, V]
    child_lp, child_tok = _top_k(logits, w, vocab_ids)            # [B, W, W]
    cand = (score[:, :, None] + child_lp).reshape(b, w * w)
    score, idx = jax.lax.top_k(cand, w)                           # [B, W]
    tok = jnp.take_along_axis(child_tok.reshape(b, w * w), idx, 1)
    parent_beams.append((idx // w).astype(jnp.int32))
    toks.append(tok)
    scores.append(score)
  # Alive: the final beams, then backwards every parent of an alive beam.
  alive = [jnp.ones((b, w), jnp.bool_)]
  for d in range(depth - 1, 0, -1):
    hit = (parent_beams[d][:, :, None] == jnp.arange(w)[None, None]) & (
        alive[0][:, :, None])                                      # [B,W,W]
    alive.insert(0, jnp.any(hit, axis=1))
  slot = lambda d, j: 1 + (d - 1) * w + j                          # noqa: E731
  parents = [jnp.full((b, 1), -1, jnp.int32), jnp.zeros((b, w), jnp.int32)]
  parents += [slot(d, parent_beams[d]) for d in range(1, depth)]
  return Tree.from_parents(
      jnp.concatenate([root[:, None].astype(jnp.int32)] + toks, 1),
      jnp.concatenate(parents, 1),
      valid=jnp.concatenate([jnp.ones((b, 1), jnp.bool_)] + alive, 1),
      scheme=trees_lib.DETERMINISTIC,
      path_logq=jnp.concatenate([jnp.zeros((b, 1), jnp.float32)] + scores,
                                1)), carry


def grow_frontier_tree(budget: FrontierBudget, root: jax.Array,
                       root_logits: jax.Array, expand: ExpandFrontier,
                       carry: Any, live: Optional[jax.Array] = None,
                       vocab_ids: Optional[jax.Array] = None
                       ) -> tuple[Tree, Any]:
  """The tree of `budget`'s kind: `grow_dynamic_tree` (EAGLE-2; `live`
  rows count for its stopping) or `grow_beam_tree` (ReDrafter), from one
  frontier expansion (logits over `vocab_ids` if given)."""
  if isinstance(budget, DynamicTree):
    return grow_dynamic_tree(budget, root, root_logits, expand, carry, live,
                             vocab_ids)
  return grow_beam_tree(budget, root, root_logits, expand, carry, vocab_ids)
