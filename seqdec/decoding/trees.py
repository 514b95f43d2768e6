"""Token trees: fixed-shape topologies for tree drafting and verification.

A tree has N nodes per row. Node 0 is the root: the last accepted token,
whose K/V is not yet in the cache. Nodes 1..N-1 are drafted tokens. Parents
come before children (`parent[i] < i` for i >= 1; `parent[0] = -1`), so a
single pass in index order visits every parent before its children, and no
cycle can exist. A node at depth d sits at position `length + d`, where
`length` is the row's committed cache length, so a tree fits a row iff
`length + max_depth < context`.

Two levels of description:

* `TreeShape` is the static topology (a tuple of parent indices plus, for each
  node, which ranked candidate of its parent it is); it is hashable and
  chooses the compiled program. Shapes are built by `chain(gamma)`,
  `kary(branching)` and `from_paths(paths)` (Medusa-style lists of rank
  paths), parsed from config strings by `seqdec.decoding.tree_specs.parse`,
  and validated on the host by `seqdec.kernels.tree_mask.validate_parents`
  with `forest=False` (node 0 the only root), which raises `TreeError` with
  a clear message.
* `Tree` is the per-row array form a drafter fills in inside jit: tokens,
  parents, depth, validity, the ancestor mask, and for every node the
  *proposal scheme* that produced its children (`DETERMINISTIC`: top-k,
  static, n-gram; `IID`: k draws from q; `WITHOUT_REPLACEMENT`: Gumbel-top-k
  from q) with q itself where the scheme has one. Verification rules read
  the scheme: a lossless sampling rule must match how the children were drawn.
  Its mask and depth are derived from the parents on device by
  `seqdec.kernels.tree_mask.ancestor_mask` (`Tree.from_parents`), so
  parents computed inside jit get exact masks.

Topology arrays (ancestor masks, parent validation) live in
`seqdec.kernels.tree_mask`, the leaf both decoding and the kernels build on;
this module holds the decoding-level objects.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from seqdec.errors import TreeError
from seqdec.kernels import tree_mask as tree_mask_lib

# Proposal schemes of a node's children (`Tree.scheme`).
DETERMINISTIC, IID, WITHOUT_REPLACEMENT = 0, 1, 2


def depths(parents: Sequence[int]) -> np.ndarray:
  """Depth of each node (root 0) of a valid parent array."""
  d = np.zeros(len(parents), np.int32)
  for i in range(1, len(parents)):
    d[i] = d[parents[i]] + 1
  return d


class FrontierBudget:
  """A tree grown on device each round, level by level from a frontier of
  `top_k` nodes (`drafters.dynamic`), within static bounds: at most
  `num_nodes` nodes (root included) and depth `max_depth`. The topology
  differs per row and round; only the bounds are static (one compiled
  program). Subclasses: `DynamicTree` (EAGLE-2), `BeamTree` (ReDrafter).
  """
  num_nodes: int
  max_depth: int
  top_k: int
  # Kept nodes are a path through a per-row tree, never known to be a
  # prefix of the node order (`TreeShape.is_chain`).
  is_chain = False

  @property
  def levels(self):
    raise TreeError(f"a {type(self).__name__} budget has no static levels; "
                    f"this drafter grows only static trees")


@dataclasses.dataclass(frozen=True)
class DynamicTree(FrontierBudget):
  """EAGLE-2's budget: each level expands the `top_k` best nodes by
  cumulative draft log-probability into `top_k` children each, then the
  `num_nodes - 1` best candidates of all levels are kept. With `stop` > 0
  (the cost of one more drafter level, in target decoding steps) a level
  is grown only while it can pay for itself (`drafters.dynamic`)."""
  num_nodes: int
  max_depth: int
  top_k: int
  stop: float = 0.0

  def __post_init__(self):
    n, d, k = self.num_nodes, self.max_depth, self.top_k
    if d < 1 or k < 1 or n < 2:
      raise TreeError(f"a dynamic tree needs num_nodes >= 2, depth >= 1 and "
                      f"top_k >= 1, got N={n}, D={d}, K={k}")
    if not 0 <= self.stop < float("inf"):
      raise TreeError(f"a dynamic tree's stop cost must be a finite number "
                      f">= 0, got {self.stop!r}")
    if n - 1 > self.num_candidates:
      raise TreeError(f"a dynamic tree of depth {d} and top_k {k} grows "
                      f"{self.num_candidates} candidates, fewer than its "
                      f"{n - 1} draft nodes")

  @property
  def num_candidates(self) -> int:
    """K at depth 1, then K * K per level: the nodes the re-ranking picks
    the N - 1 best of."""
    return self.top_k + (self.max_depth - 1) * self.top_k ** 2


@dataclasses.dataclass(frozen=True)
class BeamTree(FrontierBudget):
  """ReDrafter's budget: a beam search of `width` beams over `max_depth`
  levels below the root; the final beams, merged where they share a
  prefix, are the tree. Slots: the root and `width` per level
  (`num_nodes = 1 + width * max_depth`); the beam entries no final beam
  passes through are invalid nodes."""
  width: int
  max_depth: int

  def __post_init__(self):
    if self.width < 1 or self.max_depth < 1:
      raise TreeError(f"a beam tree needs width >= 1 and depth >= 1, got "
                      f"width={self.width}, depth={self.max_depth}")

  @property
  def num_nodes(self) -> int:
    return 1 + self.width * self.max_depth

  @property
  def top_k(self) -> int:
    """The frontier: every level feeds its `width` beams."""
    return self.width


@dataclasses.dataclass(frozen=True)
class WithLookup:
  """A drafter's tree (`base`: a `TreeShape` or a `FrontierBudget`) with a
  prompt-lookup chain of `chain` tokens merged into it each round
  (`seqdec.decoding.drafters.lookup`): slots 0 .. N_b - 1 are the base
  tree's, N_b .. N_b + chain - 1 the chain's nodes the base tree does not
  already hold. What the loop verifies: N = N_b + chain slots, depth
  max(D_b, chain). A round with no new chain node verifies the base
  tree's slots alone (`verify_widths`)."""
  base: object
  chain: int

  def __post_init__(self):
    if isinstance(self.base, WithLookup):
      raise TreeError("a tree takes one prompt-lookup chain")
    if self.chain < 1:
      raise TreeError(f"a prompt-lookup chain needs >= 1 token, got "
                      f"{self.chain}")

  @property
  def num_nodes(self) -> int:
    return self.base.num_nodes + self.chain

  @property
  def max_depth(self) -> int:
    return max(self.base.max_depth, self.chain)

  is_chain = False      # a path may leave the base tree for the chain

  @property
  def verify_widths(self) -> tuple[int, ...]:
    """Forward widths besides N: the base tree's slots (no new chain node
    in any live row)."""
    return (self.base.num_nodes,)

  @property
  def levels(self):
    raise TreeError("a tree with a merged prompt-lookup chain has no static "
                    "levels")


@dataclasses.dataclass(frozen=True)
class TreeShape:
  """A static tree topology.

  Attributes:
    parents: `(N,)` parent index per node, root -1.
    ranks: `(N,)` which candidate of its parent each node is (0 = the
      parent's top proposal, 1 = the runner-up, ...); root 0.
  """
  parents: tuple[int, ...]
  ranks: tuple[int, ...]

  def __post_init__(self):
    tree_mask_lib.validate_parents(self.parents, forest=False)
    if len(self.ranks) != len(self.parents):
      raise TreeError(f"{len(self.ranks)} ranks for {len(self.parents)} nodes")
    seen = set()
    for i in range(1, len(self.parents)):
      key = (self.parents[i], self.ranks[i])
      if self.ranks[i] < 0:
        raise TreeError(f"node {i} has negative rank {self.ranks[i]}")
      if key in seen:
        raise TreeError(f"node {i} repeats rank {self.ranks[i]} under parent "
                        f"{self.parents[i]}")
      seen.add(key)

  @property
  def num_nodes(self) -> int:
    return len(self.parents)

  @property
  def depth(self) -> np.ndarray:
    return depths(self.parents)

  @property
  def max_depth(self) -> int:
    return int(self.depth.max())

  @property
  def is_chain(self) -> bool:
    """Every node's parent is the node before it (root -> 1 -> 2 -> ...):
    an accepted path is then always a prefix of the nodes."""
    return self.parents == tuple(range(-1, self.num_nodes - 1))

  @property
  def max_children(self) -> int:
    """The largest number of children of any node (top-k width needed)."""
    counts = np.bincount(np.asarray(self.parents[1:], np.int64),
                         minlength=self.num_nodes)
    return int(counts.max()) if self.num_nodes > 1 else 0

  @property
  def levels(self) -> tuple[tuple[int, int], ...]:
    """`(lo, hi)` node ranges of each depth (nodes numbered level by level).

    Drafters expand a tree one level per call, so the nodes of a level must
    be contiguous: depth non-decreasing in index order (`chain`, `kary` and
    `from_paths` all number nodes this way).
    """
    d = self.depth
    if (np.diff(d) < 0).any():
      i = int(np.argmax(np.diff(d) < 0)) + 1
      raise TreeError(f"node {i} (depth {d[i]}) follows a deeper node; number "
                      f"the nodes level by level (depth non-decreasing)")
    return tuple((int(np.searchsorted(d, k)), int(np.searchsorted(d, k + 1)))
                 for k in range(self.max_depth + 1))

  def rank_paths(self) -> list[tuple[int, ...]]:
    """Each node's ranks from the root, e.g. (0, 1); the root's is ()."""
    out: list[tuple[int, ...]] = [()]
    for i in range(1, self.num_nodes):
      out.append(out[self.parents[i]] + (self.ranks[i],))
    return out


def chain(gamma: int) -> TreeShape:
  """A chain of `gamma` drafted tokens: root -> 1 -> 2 -> ... -> gamma."""
  if gamma < 0:
    raise TreeError(f"chain length must be >= 0, got {gamma}")
  return TreeShape(parents=tuple(range(-1, gamma)), ranks=(0,) * (gamma + 1))


def kary(branching: Sequence[int]) -> TreeShape:
  """A full tree: every node at depth d has `branching[d]` children.

  E.g. (3, 2) is the root, 3 children, and 2 grandchildren under each of them
  (10 nodes). Nodes are numbered breadth first.
  """
  if any(b < 1 for b in branching):
    raise TreeError(f"branching factors must be >= 1, got {tuple(branching)}")
  parents, ranks = [-1], [0]
  level = [0]
  for b in branching:
    nxt = []
    for p in level:
      for r in range(b):
        parents.append(p)
        ranks.append(r)
        nxt.append(len(parents) - 1)
    level = nxt
  return TreeShape(tuple(parents), tuple(ranks))


def from_paths(paths: Sequence[Sequence[int]]) -> TreeShape:
  """A static tree from Medusa-style rank paths.

  Each path is a tuple of candidate ranks from the root, e.g. (0,) is the
  root's top candidate and (0, 1) that candidate's runner-up. Every prefix of
  a path must itself be a path. Nodes are numbered by (depth, path) order.
  """
  norm = []
  for p in paths:
    p = tuple(int(r) for r in p)
    if not p:
      raise TreeError("empty path (the root is implicit)")
    if any(r < 0 for r in p):
      raise TreeError(f"path {p} has a negative rank")
    norm.append(p)
  if len(set(norm)) != len(norm):
    dup = [p for p in norm if norm.count(p) > 1][0]
    raise TreeError(f"path {dup} is listed twice")
  known = set(norm)
  for p in norm:
    if len(p) > 1 and p[:-1] not in known:
      raise TreeError(f"path {p} has no parent path {p[:-1]}")
  ordered = sorted(norm, key=lambda p: (len(p), p))
  index = {(): 0}
  parents, ranks = [-1], [0]
  for p in ordered:
    index[p] = len(parents)
    parents.append(index[p[:-1]])
    ranks.append(p[-1])
  return TreeShape(tuple(parents), tuple(ranks))


# Hand-built sparse trees (Medusa style: most nodes on the top-ranked line),
# by number of draft nodes ('static<n>' in `tree_specs`). Sequoia-optimal
# trees are built from measured acceptance rates instead.
STATIC_TREES = {
    6: [(0,), (1,), (0, 0), (1, 0), (0, 0, 0), (0, 0, 0, 0)],
    10: [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1),
         (0, 0, 0, 0), (0, 0, 0, 0, 0)],
    16: [(0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1),
         (2, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 0, 0),
         (0, 0, 0, 0, 0)],
}


@flax.struct.dataclass
class Tree:
  """A batch of drafted token trees, `[B, N]` per field (node 0 = root).

  Attributes:
    tokens: `[B, N]` int32 token of each node (node 0: the root token).
    parents: `[B, N]` int32 parent index, -1 for the root.
    depth: `[B, N]` int32, root 0.
    valid: `[B, N]` bool; an invalid node (no proposal, e.g. an n-gram
      branch without a match) is never accepted, nor are its descendants.
    mask: `[B, N, N]` bool ancestor-or-self mask
      (`seqdec.kernels.tree_mask.ancestor_mask(parents)`).
    scheme: `[B, N]` int32 proposal scheme of each node's children
      (`DETERMINISTIC`, `IID` or `WITHOUT_REPLACEMENT`).
    q: `[B, N, V]` float32 draft distribution each node's children were drawn
      from, or None when every scheme is deterministic.
    path_logq: `[B, N]` float32 the drafter's log-probability of each node's
      path below the root, sum over the path's nodes u of log q(x_u |
      ancestors) (root 0; EAGLE-2's node score, the drafter's confidence that
      the node is accepted), or None when the drafter has no distribution
      (n-gram lookup: every valid node counts as certain).
  """
  tokens: jax.Array
  parents: jax.Array
  depth: jax.Array
  valid: jax.Array
  mask: jax.Array
  scheme: jax.Array
  q: Optional[jax.Array] = None
  path_logq: Optional[jax.Array] = None

  @classmethod
  def from_parents(cls, tokens: jax.Array, parents: jax.Array,
                   valid: Optional[jax.Array] = None,
                   scheme=DETERMINISTIC,
                   q: Optional[jax.Array] = None,
                   path_logq: Optional[jax.Array] = None) -> "Tree":
    """A tree of any topology, derived on device (jit-friendly).

        mask  = ancestor_mask(parents)          (`seqdec.kernels.tree_mask`)
        depth[b, i] = sum_j mask[b, i, j] - 1

    Args:
      tokens: `[B, N]` int tokens (node 0: the root).
      parents: `[B, N]` int parents, node 0 the only root; they may be
        computed inside jit (check them with `parents_valid(...,
        forest=False)` if they can be invalid).
      valid: `[B, N]` bool, or None (all valid).
      scheme: proposal scheme of each node's children: an int for every
        node (default `DETERMINISTIC`), or per node `[N]` (the same in every
        row) or `[B, N]`.
      q: `[B, N, V]` draft distributions, or None.
      path_logq: `[B, N]` path log-probabilities (class docstring), or None.
    """
    b, n = tokens.shape
    if np.ndim(scheme) and np.shape(scheme) not in ((n,), (b, n)):
      raise TreeError(f"scheme must be an int, [N] or [B, N] = {(b, n)}, got "
                      f"shape {np.shape(scheme)}")
    parents = jnp.broadcast_to(jnp.asarray(parents, jnp.int32), (b, n))
    mask = tree_mask_lib.ancestor_mask(parents)
    depth = jnp.sum(mask, axis=-1, dtype=jnp.int32) - 1
    return cls(tokens=tokens.astype(jnp.int32), parents=parents, depth=depth,
               valid=(jnp.ones((b, n), jnp.bool_) if valid is None else valid),
               mask=mask,
               scheme=jnp.broadcast_to(jnp.asarray(scheme, jnp.int32),
                                       (b, n)),
               q=q, path_logq=path_logq)

  def expected_accepted(self) -> jax.Array:
    """`[B]` drafts a round is expected to accept, by the drafter's own
    confidence (EAGLE-2: the path probability tracks the acceptance rate).

    The accepted nodes form one path below the root, so their number is the
    sum over nodes of "v is accepted"; taking the drafter's path probability
    as that event's probability,

        E[b] = sum_{i >= 1, valid[b, i]} exp(path_logq[b, i])

    (each valid node counts 1 when `path_logq` is None).
    """
    draft = self.valid.at[:, 0].set(False)
    if self.path_logq is None:
      return jnp.sum(draft, axis=1, dtype=jnp.float32)
    return jnp.sum(jnp.where(draft, jnp.exp(self.path_logq), 0.0), axis=1)

  def truncated(self, width: int) -> "Tree":
    """The tree of each row's first `width` slots (`[B, width]` fields,
    `q` `[B, width, V]`), a tree since parents precede children: what a
    round verifies when no row has a valid node beyond them (`width` 1:
    the roots alone)."""
    cut = lambda x: None if x is None else x[:, :width]  # noqa: E731
    return Tree(tokens=cut(self.tokens), parents=cut(self.parents),
                depth=cut(self.depth), valid=cut(self.valid),
                mask=self.mask[:, :width, :width], scheme=cut(self.scheme),
                q=cut(self.q), path_logq=cut(self.path_logq))

  def gated(self, min_expected: float) -> tuple["Tree", jax.Array]:
    """`(tree, speculate [B] bool)`: rows whose `expected_accepted()` is
    below `min_expected` keep only their root valid, so the round verifies
    the root alone (an autoregressive step; when no row speculates the
    verify runs at T = 1); a row with no valid child emits the target's own
    token, under every rule.

    Only rows whose children are all chosen deterministically are gated
    (greedy rows, top-k proposals at any temperature, n-gram lookup): their
    tree, and so the decision, is a function of the committed prefix, and
    the rule's output law given any fixed tree is the target's. A row with
    drawn children (i.i.d. or without replacement) always speculates:
    its output has the target's law only averaged over the draws, and a
    decision that reads the drawn tokens (their confidence) would select
    draws and bias it (`tests/test_spec_sampling.py` shows the bias).
    """
    drawn = jnp.any(self.valid & (self.scheme != DETERMINISTIC), axis=1)
    speculate = drawn | (self.expected_accepted() >= min_expected)
    keep = speculate[:, None] | (jnp.arange(self.valid.shape[1]) == 0)[None]
    return self.replace(valid=self.valid & keep), speculate

  @classmethod
  def from_shape(cls, shape: "TreeShape", tokens: jax.Array,
                 valid: Optional[jax.Array] = None,
                 scheme=DETERMINISTIC,
                 q: Optional[jax.Array] = None) -> "Tree":
    """A tree of static topology `shape` holding `tokens` `[B, N]`
    (`from_parents` with the shape's parents in every row).

    `scheme` is per node: an int for all nodes, or an `[N]` / `[B, N]`
    array (e.g. deterministic top-k children at the root, i.i.d. draws
    below it); `valid` `[B, N]` and `q` `[B, N, V]` as in `from_parents`.
    """
    b, n = tokens.shape
    if n != shape.num_nodes:
      raise TreeError(f"{n} tokens for a tree of {shape.num_nodes} nodes")
    parents = jnp.broadcast_to(jnp.asarray(shape.parents, jnp.int32), (b, n))
    return cls.from_parents(tokens, parents, valid=valid, scheme=scheme, q=q)

  def check(self) -> None:
    """Host check of every row (tests): parents valid (node 0 the only
    root), depth and mask derived from them."""
    parents = tree_mask_lib.validate_parents(np.asarray(self.parents),
                                             forest=False)
    mask = np.asarray(tree_mask_lib.ancestor_mask(jnp.asarray(parents)))
    for b, row in enumerate(parents):
      np.testing.assert_array_equal(np.asarray(self.depth[b]), depths(row),
                                    err_msg=f"row {b} depth")
      np.testing.assert_array_equal(np.asarray(self.mask[b]), mask[b],
                                    err_msg=f"row {b} mask")


def positions(length: jax.Array, depth: jax.Array) -> jax.Array:
  """`[B, N]` positions of tree nodes: committed length + depth."""
  return length[:, None] + depth


def all_shapes_up_to(num_nodes: int) -> list[TreeShape]:
  """Every parent array with `num_nodes` nodes (ranks by child order); tests."""
  shapes = []
  for parents in itertools.product(*[range(i) for i in range(1, num_nodes)]):
    par = (-1,) + tuple(parents)
    counts: dict[int, int] = {}
    ranks = [0]
    for p in par[1:]:
      ranks.append(counts.get(p, 0))
      counts[p] = ranks[-1] + 1
    shapes.append(TreeShape(par, tuple(ranks)))
  return shapes
