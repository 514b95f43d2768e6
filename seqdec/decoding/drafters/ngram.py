"""N-gram (prompt lookup) drafting on device, over the prompt and the output.

Each row keeps its token history h[0 .. n_h - 1] (prompt, then every emitted
token; the last one is the root). For each n in max_n .. min_n, a match is an
earlier end position j (n-1 <= j < n_h - 1) with

    h[j - n + 1 .. j] == h[n_h - n .. n_h - 1]

and its continuation is h[j + 1], h[j + 2], ... Matches are ranked by n
(longer first), then by recency (larger j first); the best K, K the number of
the root's children in the tree, become the tree's branches: branch r is the
continuation of the r-th match along the rank-0 line of the root's r-th child.
Tree nodes off those lines (a rank > 0 below depth 1), branches without a
match, and continuation tokens past the history's end are invalid (never
accepted). Proposals are deterministic (q = delta).

Everything is static-shape array work over the `[B, H]` history: a few
compares per n, one `top_k`, gathers; no host round trip.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from seqdec.decoding.drafters.base import Drafter, DrafterError, Outcome, Round
from seqdec.decoding.trees import Tree, TreeShape
from seqdec.ops import write_rows


@flax.struct.dataclass
class History:
  """`tokens [B, H]` prompt + emitted tokens; `length [B]` valid entries;
  the lookup's own record (`NgramDrafter`, `adapt`): per row and match
  length n, `tries [B, max_n + 1]` rounds that had a best match of length
  n and `hits` those whose first draft was the target's next token, and
  this round's best match length `last_n [B]` (0: none) and first draft
  `last_first [B]`."""
  tokens: jax.Array
  length: jax.Array
  tries: jax.Array
  hits: jax.Array
  last_n: jax.Array
  last_first: jax.Array

  @classmethod
  def start(cls, tokens: jax.Array, length: jax.Array, max_n: int
            ) -> "History":
    """A history with an empty record."""
    b = tokens.shape[0]
    record = jnp.zeros((b, max_n + 1), jnp.float32)
    none = jnp.zeros((b,), jnp.int32)
    return cls(tokens=tokens, length=length, tries=record, hits=record,
               last_n=none, last_first=none - 1)


def find_matches(hist: History, max_n: int, min_n: int, k: int):
  """The k best earlier matches of each row's last n tokens.

  Returns:
    `(end [B, k] int32, found [B, k] bool, n [B, k] int32)`: match end
    positions j (the continuation starts at j + 1), best first, and the
    matched lengths (0 where none).
  """
  h, n_h = hist.tokens, hist.length
  size = h.shape[1]
  j = jnp.arange(size, dtype=jnp.int32)
  score = jnp.full(h.shape, -1, jnp.int32)
  for n in range(min_n, max_n + 1):
    ok = (j[None] >= n - 1) & (j[None] < (n_h - 1)[:, None])
    for back in range(n):
      cand = jnp.take_along_axis(h, jnp.maximum(j[None] - back, 0), axis=1)
      last = jnp.take_along_axis(h, jnp.maximum(n_h - 1 - back, 0)[:, None],
                                 axis=1)
      ok &= cand == last
    score = jnp.where(ok, n * size + j[None], score)     # longer n wins
  best, end = jax.lax.top_k(score, k)
  found = best >= 0
  return (end.astype(jnp.int32), found,
          jnp.where(found, best // size, 0).astype(jnp.int32))


def best_match(history: np.ndarray, max_n: int, min_n: int
               ) -> tuple[int, int]:
  """Host twin of `find_matches` for one row and k = 1: `(n, j)`, the
  longest suffix n-gram (max_n .. min_n) of `history` that occurs earlier,
  ending at its latest such end j (n-1 <= j < len - 1); (0, -1) when none."""
  h = np.asarray(history)
  size = len(h)
  for n in range(max_n, min_n - 1, -1):
    if size < n + 1:
      continue
    suffix = h[size - n:]
    for j in range(size - 2, n - 2, -1):
      if np.array_equal(h[j - n + 1:j + 1], suffix):
        return n, j
  return 0, -1


def chain_acceptance(prompt: Sequence[int], continuation: Sequence[int],
                     max_n: int, min_n: int, depth: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Teacher-forced prompt lookup along a target's greedy continuation y.

  At each position i (root y_i, history h = prompt + y_0..y_i), the best
  match (n, j) (`best_match`) proposes the chain h[j+1], h[j+2], ...
  (entries past the history's end are not proposed: at most
  len(h) - 1 - j), of which greedy verification accepts the longest prefix
  equal to y_{i+1}, y_{i+2}, ...

  Returns:
    `(match_len [N], accepted [N], available [N])` int: n (0: no match),
    the accepted drafts (0 .. depth) and the drafts the history holds
    (0 .. depth) at each of the N = len(y) positions.
  """
  h = list(prompt) + list(continuation)
  p, n_pos = len(prompt), len(continuation)
  match_len, accepted, available = (np.zeros(n_pos, np.int64)
                                    for _ in range(3))
  for i in range(n_pos):
    n_h = p + i + 1
    n, j = best_match(np.asarray(h[:n_h]), max_n, min_n)
    match_len[i] = n
    available[i] = min(depth, n_h - 1 - j) if n else 0
    a = 0
    while (a < available[i] and i + 1 + a < n_pos
           and h[j + 1 + a] == continuation[i + 1 + a]):
      a += 1
    accepted[i] = a
  return match_len, accepted, available


class NgramDrafter(Drafter):
  """Prompt-lookup drafting (see module docstring).

  Args:
    max_n, min_n: longest and shortest suffix n-gram to match.
    confidence: None, or for each match length n its chain acceptance
      c_n = (c_n[1], c_n[2], ...), c_n[d] the probability that greedy
      verification accepts a match's first d drafts (an acceptance file's
      'chain_by_match', `launch/measure_acceptance.py --drafter=ngram`).
      A node at depth d on a branch matched with length n then carries
      path_logq = log c_n[d] (0 past the curve's end), so
      `Tree.expected_accepted` is sum_d c_n[d] and the round gate
      (`SpecLoop.gate`) declines weak matches. Without it every valid node
      counts 1.
    adapt: with `confidence`, how many rounds of prior the curves weigh
      against the row's own record (0: the curves as given). Every round
      the lookup checks its first draft against the token the target
      emitted (gated rounds included), so the row's depth-1 rate for match
      length n is, with s = adapt, t_n tries and h_n hits,

          r_n = (h_n + s c_n[1]) / (t_n + s),
          c'_n[d] = min(1, c_n[d] r_n / c_n[1])   (0 where c_n[1] = 0)

      and the round uses c'_n: a row whose matches keep failing (a
      question answered in new words) stops paying for verifies, a row
      that copies (a rewrite) keeps them. The decision reads committed
      rounds only, so every rule stays lossless.
  """

  may_propose_nothing = True

  def __init__(self, max_n: int = 3, min_n: int = 1, name: str = "ngram",
               confidence: Optional[Mapping[int, Sequence[float]]] = None,
               adapt: float = 0.0):
    if adapt < 0:
      raise DrafterError(f"adapt must be >= 0, got {adapt}")
    if adapt and confidence is None:
      raise DrafterError("adapt rescales the confidence curves: give "
                         "confidence=<n-gram acceptance file> too")
    self.adapt = float(adapt)
    if not 1 <= min_n <= max_n:
      raise DrafterError(f"n-gram sizes need 1 <= min_n <= max_n, got "
                         f"min_n={min_n}, max_n={max_n}")
    self.name, self.max_n, self.min_n = name, max_n, min_n
    self.confidence = None
    if confidence is not None:
      width = 1 + max(len(c) for c in confidence.values())
      table = np.zeros((max_n + 1, width), np.float32)
      table[:, 0] = 1.0                          # depth 0: the root
      for n, curve in confidence.items():
        if 1 <= int(n) <= max_n:
          table[int(n), 1:1 + len(curve)] = curve
      self.confidence = table

  def _layout(self, shape: TreeShape):
    """Static per-node (branch, on_line) arrays: node i sits on branch
    paths[i][0] at depth len(paths[i]) and is proposable iff its ranks below
    depth 1 are all 0."""
    paths = shape.rank_paths()
    branch = np.array([p[0] if p else 0 for p in paths], np.int32)
    on_line = np.array([bool(p) and all(r == 0 for r in p[1:]) for p in paths])
    return branch, on_line

  def init(self, params, tokens, prompt_len, first, capacity, target_cache):
    b = tokens.shape[0]
    hist = jnp.zeros((b, capacity), jnp.int32)
    hist = hist.at[:, :tokens.shape[1]].set(tokens)
    hist = write_rows(hist, first[:, None], prompt_len)
    return History.start(hist, prompt_len + 1, self.max_n)

  def curves(self, state: History, n: jax.Array) -> jax.Array:
    """`[B, K, W]` the confidence c'_n (class docstring) of each row's K
    matches of lengths `n [B, K]` at depths 0 .. W - 1 (1 at the root)."""
    table = jnp.asarray(self.confidence)
    c = table[n]                                             # [B, K, W]
    if not self.adapt:
      return c
    prior = c[..., 1]
    tries = jnp.take_along_axis(state.tries, n, axis=1)
    hits = jnp.take_along_axis(state.hits, n, axis=1)
    rate = (hits + self.adapt * prior) / (tries + self.adapt)
    scale = jnp.where(prior > 0, rate / jnp.where(prior > 0, prior, 1.0), 0.0)
    return jnp.minimum(c * scale[..., None], 1.0).at[..., 0].set(1.0)

  def propose(self, params, state: History, shape, rnd, target_cache, key):
    branch, on_line = self._layout(shape)
    k = int(branch.max()) + 1
    end, found, n = find_matches(state, self.max_n, self.min_n, k)
    depth = jnp.asarray(shape.depth, jnp.int32)
    src = end[:, branch] + depth[None]                       # [B, N]
    tokens = jnp.take_along_axis(state.tokens,
                                 jnp.clip(src, 0, state.tokens.shape[1] - 1),
                                 axis=1)
    valid = (jnp.asarray(on_line)[None] & found[:, branch]
             & (src < state.length[:, None]))
    tokens = tokens.at[:, 0].set(rnd.root)
    valid = valid.at[:, 0].set(True)
    tree = Tree.from_shape(shape, tokens, valid=valid)
    if self.confidence is not None:
      curves = self.curves(state, n)                         # [B, K, W]
      width = curves.shape[2]
      c = jnp.take_along_axis(
          curves[:, branch], jnp.minimum(depth, width - 1)[None, :, None],
          axis=2)[..., 0]                                    # [B, N]
      c = jnp.where(depth[None] < width, c, 0.0)
      tree = tree.replace(path_logq=jnp.log(c))          # log 0 = -inf: E 0
    # The record: branch 0's match and first draft (node of rank path (0,)).
    first = self._first_child(shape)
    state = state.replace(
        last_n=n[:, 0],
        last_first=(jnp.where(valid[:, first], tokens[:, first], -1)
                    if first is not None else jnp.full_like(n[:, 0], -1)))
    return tree, state, target_cache

  @staticmethod
  def _first_child(shape: TreeShape) -> Optional[int]:
    paths = shape.rank_paths()
    return paths.index((0,)) if (0,) in paths else None

  def commit(self, params, state: History, shape, rnd, outcome: Outcome):
    kept = outcome.num_kept > 0
    tried = kept & (state.last_n > 0)
    hit = tried & (outcome.tokens[:, 0] == state.last_first)
    at = jax.nn.one_hot(state.last_n, state.tries.shape[1], dtype=jnp.float32)
    return state.replace(
        tokens=write_rows(state.tokens, outcome.tokens, state.length),
        length=state.length + outcome.num_kept,
        tries=state.tries + at * tried[:, None],
        hits=state.hits + at * hit[:, None])
