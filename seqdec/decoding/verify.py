"""Tree verification: which drafted path the target accepts, and the bonus.

An acceptance rule reads the drafted `Tree` and the target's logits at every
node (one forward over the tree with the ancestor mask) and returns a
`Verdict`: the accepted root-to-node path and the tokens to emit (the
accepted drafts, then one token from the target at the path's end: the
"bonus"). Every rule emits between 1 and max_depth + 1 tokens per row and
call, so a speculative step never does worse than an autoregressive one in
tokens per target call.

Rules (`AcceptanceRule`) are small static objects chosen by name
(`make_rule`):

* `greedy` (`Greedy`): exact for temperature 0 only (refused otherwise).
* `sample` (`Sample`): lossless speculative sampling for any temperature,
  top-k and top-p, matched per node to how the node's children were proposed
  (`Tree.scheme`: deterministic, i.i.d. from q, without replacement from q).
  The emitted tokens are distributed exactly as autoregressive sampling from
  the processed target; temperature-0 rows equal `greedy` exactly.
* `sample_vector` (`SampleVector`): `sample` without its scalar walk for
  trees whose children are all deterministic (the same law; for timing).
* `typical_lossy` (`TypicalLossy`): Medusa's typical acceptance. NOT
  lossless: the emitted distribution differs from the target's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from seqdec.errors import ConfigError
from seqdec.decoding import trees
from seqdec.decoding.sampling import SamplingParams, processed_probs
from seqdec.decoding.trees import Tree
from seqdec.ops import argmax_last
from seqdec.parallel import sharding


@flax.struct.dataclass
class Verdict:
  """What a rule accepted, per row (M = max tree depth + 1).

  Attributes:
    path: `[B, M]` node indices from the root along the accepted path; entries
      past `num_accepted` repeat the last accepted node.
    num_accepted: `[B]` int32 D, accepted draft nodes (0 .. M-1).
    tokens: `[B, M]` emitted tokens: the D accepted drafts, then the bonus at
      index D (entries past D are meaningless).
    logprobs: `[B, M]` log p_target of each emitted token at its parent node
      (temperature 1).
  """
  path: jax.Array
  num_accepted: jax.Array
  tokens: jax.Array
  logprobs: jax.Array


def deepest_accepted_path(tree: Tree, node_ok: jax.Array,
                          max_depth: int) -> tuple[jax.Array, jax.Array]:
  """The deepest node whose whole root path is accepted, and that path.

      accepted[i] = AND_{j ancestor-or-self of i} node_ok[j]   (node_ok[0] := 1)
      best = argmax_i (accepted[i], depth[i], -i)      (deepest, then first)
      path[d] = the ancestor of best at depth d        (d <= depth[best])

  Args:
    tree: the drafted `Tree`.
    node_ok: `[B, N]` bool, node i's own token passes the rule given that its
      parent was reached.
    max_depth: static maximum depth of the tree.

  Returns:
    `(path [B, max_depth + 1], num_accepted [B])`.
  """
  b, n = node_ok.shape
  ok = node_ok.at[:, 0].set(True)
  accepted = jnp.all(~tree.mask | ok[:, None, :], axis=-1)          # [B, N]
  index = jnp.arange(n, dtype=jnp.int32)
  score = jnp.where(accepted, tree.depth * n + (n - 1 - index), -1)
  best = jnp.argmax(score, axis=-1).astype(jnp.int32)               # [B]
  num_accepted = jnp.take_along_axis(tree.depth, best[:, None], 1)[:, 0]
  on_path = jnp.take_along_axis(tree.mask, best[:, None, None], 1)[:, 0]
  d = jnp.arange(max_depth + 1, dtype=jnp.int32)
  at_depth = on_path[:, None, :] & (tree.depth[:, None, :] == d[None, :, None])
  path = jnp.where(d[None] <= num_accepted[:, None],
                   jnp.argmax(at_depth, axis=-1).astype(jnp.int32),
                   best[:, None])
  return path, num_accepted


def along_path(fn: Callable[[jax.Array], jax.Array], logits: jax.Array,
               path: jax.Array) -> jax.Array:
  """`fn(logits[b, path[b, d]])`, `[B, M, ...]`, for `fn` a reduction over
  the vocabulary axis `[..., V] -> [...]`.

  The M path entries repeat nodes when fewer are accepted, and a tree may
  have fewer nodes than M (a root-only round: N = 1), so `fn` runs over
  min(N, M) rows of V logits: per node and then gathered when N <= M,
  else on the gathered path rows.
  """
  if logits.shape[1] <= path.shape[1]:
    out = fn(logits)                                             # [B, N, ...]
    idx = path.reshape(path.shape + (1,) * (out.ndim - 2))
    return jnp.take_along_axis(
        out, jnp.broadcast_to(idx, path.shape + out.shape[2:]), axis=1)
  return fn(jnp.take_along_axis(logits, path[:, :, None], axis=1))


def _max_and_log_sum(x: jax.Array) -> jax.Array:
  """`[..., V] -> [..., 2]`: (max x, log sum_v exp(x[v] - max x))."""
  top = jnp.max(x, axis=-1, keepdims=True)
  return jnp.concatenate(
      [top, jnp.log(jnp.sum(jnp.exp(x - top), axis=-1, keepdims=True))], -1)


def path_logprobs(logits: jax.Array, path: jax.Array,
                  tokens: jax.Array) -> jax.Array:
  """log softmax(logits[b, path[b, d]])[tokens[b, d]], `[B, M]`:

      (x[t] - max x) - log sum_v exp(x[v] - max x),   x = logits[b, path[b, d]]

  (the arithmetic of `jax.nn.log_softmax`), the normaliser over the
  vocabulary computed for min(N, M) rows (`along_path`).
  """
  x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  b, n, _ = x.shape
  stats = along_path(_max_and_log_sum, x, path)                  # [B, M, 2]
  # x[b, path[b, d], tokens[b, d]]: the M tokens' logits at every node
  # `[B, N, M]`, then each one's node (no flattening of the vocabulary
  # axis, which a mesh may split).
  at_tokens = jnp.take_along_axis(
      x, jnp.broadcast_to(tokens[:, None, :], (b, n, tokens.shape[1])), 2)
  picked = jnp.take_along_axis(at_tokens, path[:, None, :], 1)[:, 0]
  return (picked - stats[..., 0]) - stats[..., 1]


class AcceptanceRule:
  """`rule(tree, logits [B, N, V], keys [B], sparams, max_depth) -> Verdict`.

  `keys` are the rows' keys for this step (sampling rules draw from them).
  `lossless`: whether the emitted tokens follow the target's distribution.
  """
  name = "rule"
  lossless = True

  def __call__(self, tree: Tree, logits: jax.Array, keys: jax.Array,
               sparams: SamplingParams, max_depth: int) -> Verdict:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Greedy(AcceptanceRule):
  """Greedy verification: a drafted token is accepted iff it is the target's
  argmax at its parent; the bonus is the argmax at the deepest accepted node.

      y[i]     = argmax_v logits[i, v]
      ok[i]    = valid[i] and tokens[i] == y[parent[i]]
      emit[d]  = y[path[d]],  d = 0 .. D   (= the accepted drafts, then bonus)

  The emitted sequence is exactly what greedy autoregressive decoding would
  produce, whatever the drafter proposed (lossless for temperature 0).
  """
  name = "greedy"

  def __call__(self, tree, logits, keys=None, sparams=None, max_depth=None):
    if max_depth is None:
      raise ValueError("max_depth (static) is required")
    y = argmax_last(logits)                                          # [B, N]
    parent_y = jnp.take_along_axis(y, jnp.maximum(tree.parents, 0), axis=1)
    ok = tree.valid & (tree.tokens == parent_y)
    path, num_accepted = deepest_accepted_path(tree, ok, max_depth)
    tokens = jnp.take_along_axis(y, path, axis=1)
    return Verdict(path=path, num_accepted=num_accepted, tokens=tokens,
                      logprobs=path_logprobs(logits, path, tokens))


# Lossless speculative sampling over token trees.

# Folded into each row's step key before the rule draws: the drafter may be
# handed the same key, and the acceptance uniforms must be independent of
# the draws that proposed the tree.
_VERIFY_TAG = 0x76657269
# Residual mass below this is rounding (a rejection of probability ~0).
_TINY = 1e-30


class ChildTry(NamedTuple):
  """One try of a drafted child x at the current node (one row).

  Attributes:
    r: `[V]` the residual target at the current node (sums to 1).
    p: `[V]` the target's processed distribution at the current node.
    q: `[V]` the draft distribution the node's children were drawn from.
    drawn: `[V]` bool, tokens of the current node's earlier (rejected)
      children.
    x: `[]` int32, the child's token.
    u: `[]` float32, a fresh uniform in [0, 1).
  """
  r: jax.Array
  p: jax.Array
  q: jax.Array
  drawn: jax.Array
  x: jax.Array
  u: jax.Array


# A step: `(ChildTry) -> (accept [] bool, residual after a rejection [V])`.
Step = Callable[[ChildTry], tuple[jax.Array, jax.Array]]


def normalise(x: jax.Array, fallback: jax.Array) -> jax.Array:
  """x / sum(x) `[V]`, or `fallback` if x has no mass.

  Zero mass only arises from rounding on a branch of probability ~0 (e.g.
  rejecting a token with r(x) = 1 - 1e-8); keeping the previous distribution
  there avoids 0/0.
  """
  mass = jnp.sum(x)
  return jnp.where(mass > _TINY, x / jnp.maximum(mass, _TINY), fallback)


def rejection_test(r: jax.Array, q: jax.Array, x: jax.Array,
                   u: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Speculative sampling of one draw x ~ q against r (`[V]` each).

      accept   iff  u < min(1, r(x) / q(x))     (computed as u q(x) < r(x))
      residual      r' = norm(max(r - q, 0))

  For x ~ q: P(accept, x = y) = min(q(y), r(y)) and P(reject) =
  sum_y max(r(y) - q(y), 0) = Z, so "the accepted x, else a draw from r'"
  is distributed as min(q, r) + Z r' = r (Leviathan et al. 2023; Chen et
  al. 2023). q(x) = 0 (a draft that q could not have drawn) accepts iff
  r(x) > 0.
  """
  rx, qx = r[x], q[x]
  accept = jnp.where(qx > 0, u * qx < rx, rx > 0)
  return accept, normalise(jnp.maximum(r - q, 0.0), r)


def deterministic_step(t: ChildTry) -> tuple[jax.Array, jax.Array]:
  """A child proposed deterministically (top-k, static tree, n-gram, beam).

      accept   iff  u < r(x)
      residual      r' = norm(r with r(x) := 0)

  This is `rejection_test` with q = onehot(x): the children form a fixed
  list, so the law of x is a point mass. P(emit x) = r(x), and on rejection
  r' is r conditioned on "not x", so trying the next child (or the bonus)
  against r' keeps the emitted token distributed as r.
  """
  accept = t.u < t.r[t.x]
  return accept, normalise(t.r.at[t.x].set(0.0), t.r)


def iid_step(t: ChildTry) -> tuple[jax.Array, jax.Array]:
  """A child drawn i.i.d. from q with its siblings (duplicates kept;
  SpecInfer, multi-candidate speculative sampling).

      accept   iff  u < min(1, r(x) / q(x))
      residual      r' = norm(max(r - q, 0))

  Each sibling is a fresh draw from the same q, independent of the earlier
  siblings' rejections, so `rejection_test` applies with r the residual left
  by the earlier siblings: the first accepted sibling, else the bonus drawn
  from the last residual, is distributed as the node's p (induction on the
  number of siblings). A chain with one sampled draft is the case k = 1.
  """
  return rejection_test(t.r, t.q, t.x, t.u)


def without_replacement_step(t: ChildTry) -> tuple[jax.Array, jax.Array]:
  """A child drawn without replacement from q (Gumbel-top-k, stochastic
  beam; Recursive Speculative Decoding).

      q_j(v)   = q(v) [v not drawn by an earlier sibling] / Z_j
      accept   iff  u < min(1, r(x) / q_j(x))
      residual      r' = norm(max(r - q_j, 0))

  Gumbel-top-k in rank order is sequential sampling without replacement:
  given the earlier siblings, sibling j is a draw from q_j, so
  `rejection_test` against q_j keeps the invariant of `iid_step`. A
  rejected x had r(x) <= q_j(x), hence r'(x) = 0, consistent with x not
  being drawn again. `drawn` holds the tried siblings only, so a drafter
  may invalidate a suffix of its ranked draws but not a draw in the middle.
  """
  qj = normalise(jnp.where(t.drawn, 0.0, t.q), t.q)
  return rejection_test(t.r, qj, t.x, t.u)


def inverse_cdf(r: jax.Array, u: jax.Array) -> jax.Array:
  """A draw from `r` `[V]` (sums to ~1) by inversion with u in [0, 1).

      x = min { i : sum_{v <= i} r(v) > u sum(r) }

  A token with r = 0 is never chosen (the cumulative sum does not rise
  there); if rounding puts u sum(r) past the last step, the last token of
  positive mass is taken.
  """
  c = sharding.blocked_cumsum(r)         # local to each vocabulary shard
  x = jnp.sum(c <= u * c[-1]).astype(jnp.int32)
  last = (r.shape[0] - 1 - jnp.argmax((r > 0)[::-1])).astype(jnp.int32)
  return jnp.minimum(x, last)


# Indexed by `trees.DETERMINISTIC`, `trees.IID`, `trees.WITHOUT_REPLACEMENT`.
LOSSLESS_STEPS: tuple[Step, Step, Step] = (
    deterministic_step, iid_step, without_replacement_step)
assert (trees.DETERMINISTIC, trees.IID, trees.WITHOUT_REPLACEMENT) == (0, 1, 2)


def node_targets(logits: jax.Array, sparams: SamplingParams,
                 max_top_k: int) -> jax.Array:
  """`[B, N, V]` float32 processed target at every node of every row:
  `processed_probs` of logits[b, i] with row b's sampling parameters."""
  b, n, v = logits.shape
  rows = jax.tree.map(lambda a: jnp.repeat(a, n, axis=0), sparams)
  return processed_probs(logits.reshape(b * n, v), rows,
                         max_top_k).reshape(b, n, v)


def draft_q(tree: Tree, vocab_size: int) -> tuple[jax.Array, bool]:
  """`(q [B, N, V] float32, whether q exists)` (zeros if it does not).

  A tree without q must be all-deterministic (`Tree`'s contract). That is
  checked here when the schemes are concrete (eager calls, tests); inside
  jit the schemes are traced and the caller's contract is trusted.

  Raises:
    ValueError: a concrete tree has a sampled scheme but no q.
  """
  if tree.q is not None:
    return tree.q.astype(jnp.float32), True
  check_deterministic(tree)
  return jnp.zeros(tree.tokens.shape + (vocab_size,), jnp.float32), False


def check_deterministic(tree: Tree) -> None:
  """Raises ValueError if a concrete tree has a sampled scheme (inside jit
  the schemes are traced and the caller's contract, no q means every child
  is deterministic, is trusted)."""
  try:
    schemes = np.asarray(tree.scheme)
  except jax.errors.TracerArrayConversionError:
    return
  if (schemes != trees.DETERMINISTIC).any():
    raise ValueError(
        "the tree has sampled proposal schemes (IID / WITHOUT_REPLACEMENT) "
        "but no q: a drafter that samples children must record the draft "
        "distribution they were drawn from in Tree.q")


def parent_probs(tree: Tree, p: jax.Array) -> jax.Array:
  """`[B, N]` p_{parent(j)}(x_j): each node's token under its parent's
  distribution `p` `[B, N, V]` (the root's under its own). p at every node
  of every node's token `[B, N, N]` is gathered first, then each token's
  parent: the vocabulary axis is gathered, never flattened (a mesh may
  split it)."""
  b, n = tree.tokens.shape
  at_tokens = jnp.take_along_axis(
      p, jnp.broadcast_to(tree.tokens[:, None, :], (b, n, n)), 2)
  return jnp.take_along_axis(at_tokens, jnp.maximum(tree.parents, 0)[:, None],
                             1)[:, 0]


def deterministic_walk(tree: Tree, p: jax.Array, keys: jax.Array,
                       max_depth: int
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`Sample`'s walk for a tree whose children are all deterministic (no
  q: dynamic and beam trees, n-gram chains, merged lookup chains), on
  scalars instead of `[V]` residuals.

  With `deterministic_step` only, the residual at the current node c after
  rejecting its children x_1 .. x_m (distinct tokens) is p_c with those
  tokens zeroed, renormalised:

      r(x) = p_c(x) / rem,   rem = 1 - sum_{i <= m} p_c(x_i)    (x untried)
      r(x) = 0                                                  (x tried)

  so trying child j (token x_j, parent c) needs only the scalar
  p_c(x_j), gathered once for every node (`[B, N]`): accept iff
  u_j rem < p_c(x_j) (never for a repeat of a rejected sibling), else
  rem -= p_c(x_j). The walk ends at a node all of whose valid children were
  tried and rejected, so the bonus is one draw (`inverse_cdf`, u_0) from
  p_end with its children's tokens zeroed: the only `[V]` work per row.
  As in `normalise`, a rejection that would leave no mass (rem - p_c(x)
  <= 1e-30 rem: an event of probability ~0) leaves rem, and a bonus
  residual without mass falls back to p_end.

  The uniforms are `Sample.walk`'s, so the verdicts are the walk's except
  where rounding decides a test (u_j within ~1e-7 of r(x_j)): the ratio
  here against a renormalised vector there.

  Args:
    tree: `[B, N]` tokens, parents, valid.
    p: `[B, N, V]` float32 processed targets per node.
    keys: `[B]` the rows' keys for this step.
    max_depth: static maximum depth (M = max_depth + 1).

  Returns:
    `(path [B, M], num_accepted [B], emitted tokens [B, M])`.
  """
  b, n, v = p.shape
  m = max_depth + 1
  u = jax.vmap(lambda k: jax.random.uniform(
      jax.random.fold_in(k, _VERIFY_TAG), (n,)))(keys)             # [B, N]
  tokens, parents, valid = tree.tokens, tree.parents, tree.valid
  px = parent_probs(tree, p)                                        # [B, N]
  earlier = jnp.tril(jnp.ones((n, n), jnp.bool_), -1)               # i < j
  repeat = jnp.any(earlier[None] & valid[:, None, :]
                   & (parents[:, :, None] == parents[:, None, :])
                   & (tokens[:, :, None] == tokens[:, None, :]), axis=2)
  rows = jnp.arange(b)

  def body(j, state):
    cur, rem, path, d = state
    tried = valid[:, j] & (parents[:, j] == cur)
    accept = tried & ~repeat[:, j] & (u[:, j] * rem < px[:, j])
    drop = tried & ~accept & ~repeat[:, j]
    left = rem - px[:, j]
    rem = jnp.where(accept, 1.0,
                    jnp.where(drop & (left > _TINY * rem), left, rem))
    d = d + accept.astype(jnp.int32)
    path = jnp.where(accept[:, None] & (jnp.arange(m) == d[:, None]), j, path)
    cur = jnp.where(accept, j, cur)
    return cur, rem, path, d

  init = (jnp.zeros((b,), jnp.int32), jnp.ones((b,), p.dtype),
          jnp.zeros((b, m), jnp.int32), jnp.zeros((b,), jnp.int32))
  cur, _, path, d = jax.lax.fori_loop(1, n, body, init)
  p_end = p[rows, cur]                                              # [B, V]
  child = valid & (parents == cur[:, None])                         # [B, N]
  hit = jnp.any(child[:, :, None] & (tokens[:, :, None]
                                     == jnp.arange(v)[None, None]), axis=1)
  r = jnp.where(hit, 0.0, p_end)
  r = jnp.where(jnp.sum(r, -1, keepdims=True)
                > _TINY * jnp.sum(p_end, -1, keepdims=True), r, p_end)
  bonus = jax.vmap(inverse_cdf)(r, u[:, 0])
  index = jnp.arange(m)
  path = jnp.where(index <= d[:, None], path, cur[:, None])
  drafts = jnp.concatenate(
      [jnp.take_along_axis(tokens, path[:, 1:], 1), bonus[:, None]], 1)
  return path, d, jnp.where(index < d[:, None], drafts, bonus[:, None])


@dataclasses.dataclass(frozen=True)
class Sample(AcceptanceRule):
  """Lossless speculative sampling over a token tree, any mix of schemes.

  Target at node i: p_i = `processed_probs(logits[:, i])` (temperature,
  top-k, top-p per row; onehot(argmax) for temperature 0). Per row, with
  u_j fresh uniforms and step_s = `steps[s]`:

      cur <- 0;  r <- p_0;  drawn <- {};  D <- 0
      for j = 1 .. N-1:                     (level order: cur's children
        if valid[j] and parent[j] == cur:    all come after cur)
          accept, r' = step_{scheme[cur]}(r, p_cur, q_cur, drawn,
                                          tokens[j], u_j)
          if accept:  D += 1; path[D] <- j; emit tokens[j]
                      cur <- j;  r <- p_j;  drawn <- {}
          else:       r <- r';  drawn <- drawn + {tokens[j]}
      emit bonus ~ r

  Why the emitted sequence is distributed as autoregressive sampling from
  p: at a node, each step keeps the invariant "the accepted child, else a
  draw from the current residual, is distributed as p_cur" (see the step
  functions), so the first emitted token has law p_cur. Given that child j
  (token x) is accepted, its subtree was drafted from x by the drafter's
  own randomness, independent of the uniforms spent at cur, so the walk
  below j is the same procedure at a node whose target is p_j = p(. |
  prefix, x): by induction on depth the whole emitted sequence (drafts, then
  the bonus, then the next round) has the autoregressive law. Invalid nodes
  are never tried (no proposal). With the drafter's and the rule's draws
  independent (the rule folds `_VERIFY_TAG` into its key), the schemes may
  differ from node to node.

  Temperature-0 rows take `Greedy`'s acceptance (`greedy_rows`): the walk
  above already emits exactly the greedy tokens there (r is one-hot), and
  with distinct siblings the same path; with duplicate siblings (i.i.d.
  drafts) it stops at the first copy while `Greedy` takes the deepest, so
  the tokens agree and `Greedy` accepts more.

  A tree without q (every child deterministic: dynamic and beam trees,
  n-gram and merged lookup chains) takes the same walk on scalars
  (`deterministic_walk`) when `steps` has the lossless deterministic step:
  no `[V]` residual per tried child, one `[V]` bonus draw per row.

  Attributes:
    steps: the "try one child" functions indexed by scheme (`trees.
      DETERMINISTIC`, `IID`, `WITHOUT_REPLACEMENT`), each `(ChildTry) ->
      (accept, residual after rejection)`; variants swap one.
    max_top_k: cap on per-row top_k (as `sampling.make_sampler`).
    greedy_rows: temperature-0 rows take `Greedy`'s acceptance (False: the
      walk alone, which agrees whenever siblings are distinct).
    scalar_walk: trees without q take `deterministic_walk` (False: the
      `[V]` walk for every tree; rule 'sample_vector', for A/B timing).
  """
  name = "sample"
  steps: tuple[Step, ...] = LOSSLESS_STEPS
  max_top_k: int = 64
  greedy_rows: bool = True
  scalar_walk: bool = True

  def __call__(self, tree: Tree, logits: jax.Array, keys: jax.Array,
               sparams: SamplingParams, max_depth: int) -> Verdict:
    """tree `[B, N]`, logits `[B, N, V]`, keys `[B]` -> `Verdict`."""
    if max_depth is None:
      raise ValueError("max_depth (static) is required")
    p = node_targets(logits, sparams, self.max_top_k)                # [B,N,V]
    if self.scalar_walk and tree.q is None and self.steps[
        trees.DETERMINISTIC] is deterministic_step:
      check_deterministic(tree)
      path, num_accepted, tokens = deterministic_walk(tree, p, keys,
                                                      max_depth)
    else:
      q, has_q = draft_q(tree, logits.shape[-1])                     # [B,N,V]
      steps = self.steps if has_q else (self.steps[trees.DETERMINISTIC],) * 3
      walk = functools.partial(self.walk, steps=steps, max_depth=max_depth)
      path, num_accepted, tokens = jax.vmap(walk)(
          tree.tokens, tree.parents, tree.valid, tree.scheme, p, q, keys)
    if self.greedy_rows:      # only if some row is greedy (`lax.cond`)
      t0 = sparams.temperature <= 0                                   # [B]

      def greedy_override(walked):
        path, num_accepted, tokens = walked
        greedy = Greedy()(tree, logits, max_depth=max_depth)
        return (jnp.where(t0[:, None], greedy.path, path),
                jnp.where(t0, greedy.num_accepted, num_accepted),
                jnp.where(t0[:, None], greedy.tokens, tokens))
      path, num_accepted, tokens = jax.lax.cond(
          jnp.any(t0), greedy_override, lambda walked: walked,
          (path, num_accepted, tokens))
    return Verdict(path=path, num_accepted=num_accepted, tokens=tokens,
                      logprobs=path_logprobs(logits, path, tokens))

  @staticmethod
  def walk(tokens: jax.Array, parents: jax.Array, valid: jax.Array,
           scheme: jax.Array, p: jax.Array, q: jax.Array, key: jax.Array,
           *, steps: tuple[Step, ...], max_depth: int
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The walk of the class docstring for one row.

    Args:
      tokens, parents, scheme: `[N]` int32; valid: `[N]` bool.
      p, q: `[N, V]` float32 target and draft distributions per node.
      key: a typed PRNG key (the row's key for this step).
      steps: per-scheme step functions.
      max_depth: static maximum depth (M = max_depth + 1).

    Returns:
      `(path [M], num_accepted [], emitted tokens [M])`.
    """
    n, v = p.shape
    m = max_depth + 1
    # One draw of N uniforms: u_j for child j >= 1; u_0 (the root is never
    # tried) for the bonus.
    u = jax.random.uniform(jax.random.fold_in(key, _VERIFY_TAG), (n,))
    vocab = jnp.arange(v)

    def body(j, state):
      cur, r, drawn, path, d = state
      tried = valid[j] & (parents[j] == cur)
      t = ChildTry(r=r, p=p[cur], q=q[cur], drawn=drawn, x=tokens[j], u=u[j])
      accept, r_rejected = jax.lax.switch(scheme[cur], steps, t)
      accept = tried & accept
      rejected = tried & ~accept
      r = jnp.where(accept, p[j], jnp.where(rejected, r_rejected, r))
      drawn = jnp.where(accept, False,
                        drawn | (rejected & (vocab == tokens[j])))
      d = d + accept.astype(jnp.int32)
      path = jnp.where(accept, path.at[d].set(j), path)
      cur = jnp.where(accept, j, cur)
      return cur, r, drawn, path, d

    init = (jnp.int32(0), p[0], jnp.zeros((v,), jnp.bool_),
            jnp.zeros((m,), jnp.int32), jnp.int32(0))
    cur, r, _, path, d = jax.lax.fori_loop(1, n, body, init)
    bonus = inverse_cdf(r, u[0])
    index = jnp.arange(m)
    path = jnp.where(index <= d, path, cur)
    drafts = jnp.append(tokens[path[1:]], bonus)
    return path, d, jnp.where(index < d, drafts, bonus)


@dataclasses.dataclass(frozen=True)
class TypicalLossy(AcceptanceRule):
  """Medusa's typical acceptance. LOSSY: NOT the target distribution.

      p_i    = processed target at node i (as `Sample`)
      H_i    = -sum_v p_i(v) log p_i(v)
      ok[i]  = valid[i] and p_a(tokens[i]) > min(epsilon, delta exp(-H_a)),
               a = parent[i]
      path   = `deepest_accepted_path(ok)`
      bonus  = argmax p_end (bonus="greedy") or a draw from p_end ("sample")

  Any token the target finds plausible enough is accepted whatever the
  draft's q, so the emitted distribution leans toward the drafter's choices
  (and ignores the proposal scheme); use it as a speed baseline only. At
  temperature 0 (p one-hot, H = 0) only the argmax passes: exact greedy.

  Attributes:
    epsilon: hard probability threshold (Medusa's posterior_threshold).
    delta: entropy-scaled threshold factor (Medusa's posterior_alpha).
    bonus: "greedy" or "sample".
    max_top_k: cap on per-row top_k.
  """
  name = "typical_lossy"
  lossless = False
  epsilon: float = 0.09
  delta: float = 0.3
  bonus: str = "greedy"
  max_top_k: int = 64

  def __post_init__(self):
    if self.bonus not in ("greedy", "sample"):
      raise ValueError(f"bonus must be 'greedy' or 'sample', got "
                       f"{self.bonus!r}")

  def __call__(self, tree: Tree, logits: jax.Array, keys: jax.Array,
               sparams: SamplingParams, max_depth: int) -> Verdict:
    """tree `[B, N]`, logits `[B, N, V]`, keys `[B]` -> `Verdict`."""
    if max_depth is None:
      raise ValueError("max_depth (static) is required")
    p = node_targets(logits, sparams, self.max_top_k)                # [B,N,V]
    logp = jnp.log(jnp.maximum(p, 1e-38))
    entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)     # [B,N]
    thresh = jnp.minimum(self.epsilon, self.delta * jnp.exp(-entropy))
    par = jnp.maximum(tree.parents, 0)
    px = parent_probs(tree, p)                                       # [B,N]
    ok = tree.valid & (px > jnp.take_along_axis(thresh, par, axis=1))
    path, num_accepted = deepest_accepted_path(tree, ok, max_depth)
    p_end = jnp.take_along_axis(
        p, jnp.take_along_axis(path, num_accepted[:, None], 1)[:, :, None],
        axis=1)[:, 0]                                                 # [B,V]
    if self.bonus == "greedy":
      bonus = jnp.argmax(p_end, axis=-1).astype(jnp.int32)
    else:
      bonus_keys = jax.vmap(lambda k: jax.random.fold_in(k, _VERIFY_TAG))(
          keys)
      bonus = jax.vmap(jax.random.categorical)(
          bonus_keys, jnp.log(p_end)).astype(jnp.int32)
    drafts = jnp.take_along_axis(tree.tokens, path, axis=1)           # [B,M]
    drafts = jnp.concatenate([drafts[:, 1:], bonus[:, None]], axis=1)
    index = jnp.arange(max_depth + 1)
    tokens = jnp.where(index[None] < num_accepted[:, None], drafts,
                       bonus[:, None])
    return Verdict(path=path, num_accepted=num_accepted, tokens=tokens,
                      logprobs=path_logprobs(logits, path, tokens))


@dataclasses.dataclass(frozen=True)
class SampleVector(Sample):
  """`Sample` with the `[V]`-residual walk for every tree (the scalar walk
  off): the same law, the reference for timing `deterministic_walk`."""
  name = "sample_vector"
  scalar_walk: bool = False


RULES = {"greedy": Greedy, "sample": Sample, "sample_vector": SampleVector,
         "typical_lossy": TypicalLossy}


def make_rule(name: str, *, max_top_k: int):
  """A rule by config name, with the sampler's top-k cap.

  `max_top_k` must be the cap of the autoregressive sampler the rule stands
  in for (`sampling.make_sampler`): the rule's target at a node is
  `processed_probs(logits, sparams, max_top_k)`, so a different cap would
  make speculative sampling draw from another distribution than plain
  sampling. It is a required argument for that reason.
  """
  if name not in RULES:
    raise ConfigError(f"unknown acceptance rule {name!r}; known: "
                      f"{sorted(RULES)}")
  rule = RULES[name]
  if "max_top_k" in {f.name for f in dataclasses.fields(rule)}:
    return rule(max_top_k=max_top_k)
  return rule()
