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

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from seqdec.decoding.drafters.base import Drafter, DrafterError, Outcome, Round
from seqdec.decoding.trees import Tree, TreeShape
from seqdec.ops import write_rows


@flax.struct.dataclass
class History:
  """`tokens [B, H]` prompt + emitted tokens; `length [B]` valid entries."""
  tokens: jax.Array
  length: jax.Array


def find_matches(hist: History, max_n: int, min_n: int, k: int):
  """The k best earlier matches of each row's last n tokens.

  Returns:
    `(end [B, k] int32, found [B, k] bool)`: match end positions j (the
    continuation starts at j + 1), best first.
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
  return end.astype(jnp.int32), best >= 0


class NgramDrafter(Drafter):
  """Prompt-lookup drafting (see module docstring).

  Args:
    max_n, min_n: longest and shortest suffix n-gram to match.
  """

  def __init__(self, max_n: int = 3, min_n: int = 1, name: str = "ngram"):
    if not 1 <= min_n <= max_n:
      raise DrafterError(f"n-gram sizes need 1 <= min_n <= max_n, got "
                         f"min_n={min_n}, max_n={max_n}")
    self.name, self.max_n, self.min_n = name, max_n, min_n

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
    return History(tokens=hist, length=prompt_len + 1)

  def propose(self, params, state: History, shape, rnd, target_cache, key):
    branch, on_line = self._layout(shape)
    k = int(branch.max()) + 1
    end, found = find_matches(state, self.max_n, self.min_n, k)
    depth = jnp.asarray(shape.depth, jnp.int32)
    src = end[:, branch] + depth[None]                       # [B, N]
    tokens = jnp.take_along_axis(state.tokens,
                                 jnp.clip(src, 0, state.tokens.shape[1] - 1),
                                 axis=1)
    valid = (jnp.asarray(on_line)[None] & found[:, branch]
             & (src < state.length[:, None]))
    tokens = tokens.at[:, 0].set(rnd.root)
    valid = valid.at[:, 0].set(True)
    return Tree.from_shape(shape, tokens, valid=valid), state, target_cache

  def commit(self, params, state: History, shape, rnd, outcome: Outcome):
    return History(tokens=write_rows(state.tokens, outcome.tokens,
                                     state.length),
                   length=state.length + outcome.num_kept)
