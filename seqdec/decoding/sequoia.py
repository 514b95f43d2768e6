"""Sequoia-optimal token trees from per-rank (positional) acceptance rates.

The positional acceptance model (Sequoia, Chen et al. 2024): a drafter
proposes the children of every tree node as its ranked candidates there
(rank 1 = its top token, rank 2 = the runner-up, ...), and

    p_k = P(the accepted token at a reached node is its rank-k child),

the same at every node, independently of depth and of the path that led
there. The p_k are *marginal* ("the k-th child is the one"), so they add up:
sum_k p_k = P(some child is accepted) <= 1. Under greedy verification p_k is
the probability that the target's argmax is the drafter's k-th token; under
the lossless rule for deterministic children at temperature T (accept the
child equal to a sample y ~ p_target) it is E[p_target(x_k)], x_k the
drafter's k-th token.

A draft node v is accepted iff every node on its path is, so with the root
always "accepted" (it is the last committed token) the expected number of
tokens a round emits, accepted drafts plus the bonus token, is

    tau(tree) = 1 + sum_{draft nodes v} prod_{u on root -> v, u != root}
                                          p_{rank(u)}.                  (1)

`optimal_tree` maximises (1) over all trees of at most n draft nodes (and
optionally depth <= D) by dynamic programming (the recursion is in its
docstring); `expected_accepted` evaluates (1) for any `TreeShape`.

The rates come from acceptance files (`seqdec.decoding.acceptance_rates`,
measured by `seqdec.decoding.rank_statistics`); the tree spec
'sequoia<n>[d<D>]:<path.json>' of `seqdec.decoding.tree_specs` joins the
three. This module is the host-side dynamic program only: numpy, no model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from seqdec.decoding import trees
from seqdec.decoding.acceptance_rates import check_probs

# Relative slack under which a smaller tree counts as equally good.
_TIE = 1e-12


# ----------------------------------------------------------------- validation


def _check_budget(budget: int) -> int:
  if isinstance(budget, (bool, np.bool_)) or not isinstance(
      budget, (int, np.integer)):
    raise ValueError(f"node budget must be an integer, got {budget!r}")
  if budget < 0:
    raise ValueError(f"node budget must be >= 0 (draft nodes, the root "
                     f"excluded), got {budget}")
  return int(budget)


def _check_depth(max_depth: Optional[int]) -> Optional[int]:
  if max_depth is None:
    return None
  if isinstance(max_depth, (bool, np.bool_)) or not isinstance(
      max_depth, (int, np.integer)):
    raise ValueError(f"max_depth must be an integer or None, got "
                     f"{max_depth!r}")
  if max_depth < 1:
    raise ValueError(f"max_depth must be >= 1 (or None for no limit), got "
                     f"{max_depth}")
  return int(max_depth)


# ------------------------------------------------------------------ the model


def expected_accepted(shape: trees.TreeShape, probs: Sequence[float]) -> float:
  """Expected tokens per round, eq. (1) of the module docstring.

      tau = 1 + sum_{v >= 1} w(v),   w(root) = 1,
      w(v) = w(parent(v)) * p_{rank(v) + 1}

  (`TreeShape.ranks` are 0-based; a rank >= R = len(probs) has p = 0).
  Chain of gamma nodes with p_1 = a: tau = (1 - a^(gamma+1)) / (1 - a).

  Args:
    shape: any `TreeShape` (parents precede children, so one pass in index
      order computes every w).
    probs: `[R]` per-rank acceptance rates (`check_probs`).

  Returns:
    tau >= 1.
  """
  if not isinstance(shape, trees.TreeShape):
    raise TypeError(f"expected a trees.TreeShape, got {type(shape).__name__}")
  p = check_probs(probs)
  w = np.zeros(shape.num_nodes)
  w[0] = 1.0
  for i in range(1, shape.num_nodes):
    r = shape.ranks[i]
    w[i] = w[shape.parents[i]] * (p[r] if r < len(p) else 0.0)
  return float(w.sum())


@dataclasses.dataclass(frozen=True)
class _Tables:
  """DP tables: `value[d][m]` best subtree value with m nodes (root
  included) and depth <= d; `choice[d][k][m]` the nodes given to the rank-k
  child (0: none) when m descendants go to ranks k..R (k 0-based here)."""
  value: np.ndarray     # [D + 1, M + 1] float64, -inf where infeasible
  choice: np.ndarray    # [D + 1, R, M] int32


@functools.lru_cache(maxsize=64)
def _solve(probs: tuple[float, ...], max_nodes: int, depth: int) -> _Tables:
  """Fills the tables of `optimal_tree` for subtrees of <= max_nodes nodes
  and depth <= depth (all arguments hashable, so repeated specs are free)."""
  p = np.asarray(probs, np.float64)
  k_max, m_len = len(p), max_nodes + 1
  value = np.full((depth + 1, m_len + 1), -np.inf)
  value[:, 1] = 1.0                 # a lone node: itself
  choice = np.zeros((depth + 1, k_max, m_len), np.int32)
  # Max-plus convolution indices: c[m, j] = a[j] + b[m - j], 0 <= j <= m.
  m_idx = np.arange(m_len)[:, None]
  j_idx = np.arange(m_len)[None, :]
  lower = (m_idx - j_idx) >= 0
  b_idx = np.where(lower, m_idx - j_idx, 0)
  for d in range(1, depth + 1):
    child = value[d - 1, :m_len]                     # V(j, d - 1), j < M
    w = np.full(m_len, -np.inf)                      # W(., R + 1, d)
    w[0] = 0.0
    for k in range(k_max - 1, -1, -1):
      a = np.full(m_len, -np.inf)                    # p_k V(j, d - 1)
      a[np.isfinite(child)] = p[k] * child[np.isfinite(child)]
      c = np.where(lower, a[None, :] + w[b_idx], -np.inf)   # [M, M]
      c[:, 0] = w                                    # j = 0: skip rank k
      choice[d, k] = np.argmax(c, axis=1)
      w = c[np.arange(m_len), choice[d, k]]
    value[d, 1:] = 1.0 + w                           # V(m, d) = 1 + W(m-1, 1, d)
  return _Tables(value, choice)


def optimal_tree(probs: Sequence[float], budget: int,
                 max_depth: Optional[int] = None
                 ) -> tuple[trees.TreeShape, float]:
  """The tree of at most `budget` draft nodes maximising tau, eq. (1).

  Dynamic program. Let V(m, d) be the best value sum_{v in subtree}
  prod_{u on the path below the subtree's root} p_{rank(u)} (the root
  counting 1) of a subtree of exactly m nodes (root included) and depth
  <= d, and W(m, k, d) the best total over the children of ranks k..R of a
  node whose m descendants (depth <= d below it) are split among them:

      V(1, d) = 1;   V(m, 0) = -inf for m > 1
      V(m, d) = 1 + W(m - 1, 1, d)                                 (d >= 1)
      W(0, k, d) = 0;   W(m, R + 1, d) = -inf for m > 0
      W(m, k, d) = max( W(m, k + 1, d),                       rank k unused
                        max_{1 <= j <= m} p_k V(j, d - 1) + W(m - j, k + 1, d) )

  A child subtree's value enters weighted by its own p_k because every path
  through it starts with that child (eq. (1) factorises over subtrees). The
  answer is tau* = max_{m <= n + 1} V(m, min(D, n)), taking the smallest such
  m (a node can only add p >= 0, so fewer nodes than n means the rest would
  add nothing: every rank of every reachable node is used, or p has zeros).
  Ranks may be skipped, so unsorted p is handled exactly; with
  p_1 >= p_2 >= ... the best tree uses ranks 1..c under each node and gives
  larger subtrees to better ranks.

  Cost: O(D R n^2) with numpy max-plus convolutions, D = min(max_depth, n)
  (n = 64, R = 16: a few tens of ms); tables are cached per (p, n, D).

  Args:
    probs: `[R]` per-rank acceptance rates (`check_probs`); R caps the
      number of children of any node.
    budget: n >= 0, draft nodes (the root excluded).
    max_depth: D >= 1, deepest draft node's depth, or None (no limit).

  Returns:
    `(shape, tau)`: the tree (`trees.from_paths`, nodes numbered level by
    level, ranks 0-based) and its expected accepted length.
  """
  p = check_probs(probs)
  n = _check_budget(budget)
  limit = _check_depth(max_depth)
  depth = n if limit is None else min(limit, n)
  tables = _solve(tuple(float(x) for x in p), n + 1, depth)
  values = tables.value[depth, 1:n + 2]            # V(m, depth), m = 1..n+1
  best = float(values.max())
  m = int(np.argmax(values >= best - _TIE * best)) + 1
  return _build(tables, m, depth), float(tables.value[depth, m])


def _build(tables: _Tables, m: int, depth: int) -> trees.TreeShape:
  """The tree of V(m, depth) (root included in m) from the DP's choices."""
  paths: list[tuple[int, ...]] = []

  def build(path: tuple[int, ...], size: int, d: int) -> None:
    rest, k = size - 1, 0
    while rest > 0:
      j = int(tables.choice[d, k, rest])
      if j:
        child = path + (k,)
        paths.append(child)
        build(child, j, d - 1)
        rest -= j
      k += 1

  build((), m, depth)
  return trees.from_paths(paths) if paths else trees.chain(0)


def level_widths(shape: trees.TreeShape) -> list[int]:
  """Nodes per depth, root (depth 0) first: `[1, w_1, ..., w_D]`."""
  depth = np.asarray(shape.depth)
  return [int((depth == d).sum()) for d in range(int(depth.max()) + 1)]


@dataclasses.dataclass(frozen=True)
class Choice:
  """A hardware-aware tree: its shape, tau (eq. (1)), cost of a round
  (ms) and the predicted tokens per second tau / cost."""
  shape: trees.TreeShape
  tau: float
  cost_ms: float
  # The plain decoding step the choice was weighed against (ms; nan when
  # the optimizer priced rounds with the verify curve alone).
  step_ms: float = float("nan")

  @property
  def tokens_per_s(self) -> float:
    return 1e3 * self.tau / self.cost_ms

  @property
  def nodes(self) -> int:
    """Draft nodes (the root excluded)."""
    return self.shape.num_nodes - 1


def hardware_aware_tree(probs: Sequence[float], round_cost, max_nodes: int,
                        max_depth: Optional[int] = None) -> Choice:
  """Sequoia's hardware-aware choice: the tree maximising tokens per second,

      (n*, d*) = argmax_{n <= N, d <= D}  tau(n, d) / cost(T(n, d)),

  where T(n, d) is the tau-optimal tree of at most n draft nodes and depth
  <= d (`optimal_tree`) and `round_cost(shape)` the ms of one round with it
  on this host (a verify of its n + 1 tokens plus the drafter's levels,
  `host_profile`). n = 0 is autoregressive decoding (tau = 1, one plain
  step): where no tree beats it, none is chosen. All T(n, d) come from one
  set of DP tables (V(m, d) for every m <= N + 1 and d <= D), so the search
  costs one `optimal_tree` solve plus N * D reconstructions.

  Args:
    probs: `[R]` per-rank acceptance rates.
    round_cost: TreeShape -> ms of a round (a chain(0) shape: a plain step).
    max_nodes: N, the largest node budget considered.
    max_depth: D, or None (up to N).

  Returns:
    the best `Choice` (ties: the smaller tree).
  """
  p = check_probs(probs)
  n = _check_budget(max_nodes)
  limit = _check_depth(max_depth)
  depth = n if limit is None else min(limit, n)
  plain = trees.chain(0)
  best = Choice(plain, 1.0, float(round_cost(plain)))
  if n == 0:
    return best
  tables = _solve(tuple(float(x) for x in p), n + 1, depth)
  seen = set()
  for d in range(1, depth + 1):
    values = tables.value[d, 1:n + 2]
    for m in range(2, n + 2):
      # Only trees that are tau-optimal for their budget: with a larger
      # budget the DP may return the same tree (kept once).
      top = float(np.max(values[:m]))
      mm = int(np.argmax(values[:m] >= top - _TIE * top)) + 1
      if (mm, d) in seen or mm < 2:
        continue
      seen.add((mm, d))
      shape = _build(tables, mm, d)
      choice = Choice(shape, float(tables.value[d, mm]),
                      float(round_cost(shape)))
      if choice.tokens_per_s > best.tokens_per_s * (1 + _TIE):
        best = choice
  return best


def optimal_taus(probs: Sequence[float], max_budget: int,
                 max_depth: Optional[int] = None) -> np.ndarray:
  """`[max_budget + 1]` optimal tau for every budget 0..max_budget.

  tau*(n) = max_{m <= n + 1} V(m, D) of `optimal_tree`'s recursion, from one
  set of tables (the curve of tau against node budget).
  """
  p = check_probs(probs)
  n = _check_budget(max_budget)
  limit = _check_depth(max_depth)
  depth = n if limit is None else min(limit, n)
  tables = _solve(tuple(float(x) for x in p), n + 1, depth)
  return np.maximum.accumulate(tables.value[depth, 1:n + 2])


def _walk(size: int, round_at: Callable[[int], tuple[bool, int]]
          ) -> tuple[int, int, int]:
  """`(rounds, drafted rounds, tokens)` of rounds over a continuation of
  `size` tokens after the prefill's: the round at position i (its root
  y_i) returns `(drafted, emitted)` and the next starts emitted tokens
  later; the last round's tokens are cut at the budget."""
  rounds = drafted = tokens = i = 0
  while i < size:
    did, emit = round_at(i)
    rounds, drafted = rounds + 1, drafted + int(did)
    tokens, i = tokens + min(emit, size - i), i + emit
  return rounds, drafted, tokens


def replay_rounds(match: Sequence[int], accepted: Sequence[int],
                  available: Sequence[int], depth: int,
                  by_match: Mapping[int, Sequence[float]], gate: float,
                  adapt: float = 0.0) -> tuple[int, int, int]:
  """Greedy decoding of one continuation with a deterministic chain
  drafter, chain(depth) and the round gate, replayed from its trace (one
  entry per continuation position i, the root y_i of a possible round):
  the lookup's match length n_i (0: none), the drafts of an unbounded
  chain that greedy verification accepts a_i, and the drafts the history
  holds v_i (`ngram.chain_acceptance`). The first token comes from the
  prefill; a round at position i

      speculates iff n_i > 0 and E_i >= gate  (any n_i > 0 when gate = 0),
          E_i = sum_{d <= min(depth, v_i)} c_{n_i}[d]

  (`Tree.gated` over the confidence of `NgramDrafter`; c_n = 0 for a
  match length without a curve; with `adapt` > 0 the row's record rescales
  c_n, every round counting a try of n_i and a hit when a_i >= 1, i.e.
  the first draft is the target's next token), emitting 1 + min(a_i,
  depth) tokens, else 1, and the next round starts at the position after
  its last token.

  Returns:
    `(rounds, drafted rounds, tokens the rounds emitted)`, the budget being
    the N - 1 tokens after the prefill's.
  """
  tries: dict[int, int] = {}
  hits: dict[int, int] = {}

  def round_at(i: int) -> tuple[bool, int]:
    n = int(match[i])
    curve = np.asarray(by_match.get(n, ()), np.float64)
    if adapt and len(curve):
      prior = curve[0]
      rate = (hits.get(n, 0) + adapt * prior) / (tries.get(n, 0) + adapt)
      curve = np.minimum(curve * (rate / prior if prior > 0 else 0.0), 1.0)
    expected = float(np.sum(curve[:min(depth, int(available[i]))]))
    if n > 0:
      tries[n] = tries.get(n, 0) + 1
      hits[n] = hits.get(n, 0) + int(accepted[i] >= 1)
    if n > 0 and (gate <= 0 or expected >= gate):
      return True, 1 + min(int(accepted[i]), depth)
    return False, 1
  return _walk(len(match) - 1, round_at)


def replay_chain(traces: Sequence[tuple[Sequence[int], ...]],
                 by_match: Mapping[int, Sequence[float]], verify,
                 max_depth: int, adapt: float = 0.0,
                 groups: Optional[Sequence[Any]] = None,
                 floor: float = 0.0) -> Choice:
  """The hardware-aware chain of a deterministic chain drafter (n-gram
  prompt lookup), by replaying its measured rounds rather than by a
  positional model.

  At T = 0 a chain drafter's rounds are a function of the tokens alone, so
  decoding every measured continuation with chain(D) and the gate at the
  chain's break-even b(D) = verify(D + 1) / verify(1) - 1 (`gate=auto`) is
  replayed exactly (`replay_rounds`): a drafted round costs verify(D + 1)
  ms, any other verify(1) (the roots-only fallback). D* maximises tokens
  per ms over all traces; D = 0 is plain decoding.

  Args:
    traces: `(n, a, v)` per continuation (`replay_rounds`).
    by_match: {n: (c_n[1], c_n[2], ...)}, the drafter's confidence.
    verify: T -> ms of a T-token verify on this host.
    max_depth: the deepest chain considered.
    adapt: the drafter's `adapt` (`replay_rounds`).
    groups, floor: each trace's prompt category, and the speed relative to
      plain decoding that every category must keep for a depth to qualify
      (`_choose`; None: pooled tokens per ms alone).

  Returns:
    the best `Choice` (tau: tokens per round of the replay, counting the
    rounds only; cost_ms: mean ms per round; ties: the shorter chain).
  """
  one = float(verify(1))

  def replayed(depth: int) -> list[tuple[int, int, int, float]]:
    cost_d = float(verify(depth + 1))
    gate = max(cost_d / one - 1.0, 0.0)
    out = []
    for trace in traces:
      r, d, t = replay_rounds(*trace, depth, by_match, gate, adapt)
      out.append((r, d, t, d * cost_d + (r - d) * one))
    return out
  return _choose(replayed, range(1, max_depth + 1), one, groups, floor)


def _choose(replayed: Callable[[int], Sequence[tuple[int, int, int, float]]],
            depths: Sequence[int], step_ms: float,
            groups: Optional[Sequence[Any]], floor: float) -> Choice:
  """The chain(D) of `depths`, or chain(0), with the most tokens per ms
  over all replayed continuations, `replayed(D)` giving each one's
  `(rounds, drafted rounds, tokens, ms)`; with `groups` (each
  continuation's prompt category) only depths whose every group runs at
  >= `floor` x plain decoding's speed (1 token per `step_ms`) qualify:

      tokens_g * step_ms / ms_g >= floor      for every group g

  Ties: the shorter chain. Choice.tau is tokens per round (rounds only),
  cost_ms the mean ms per round.
  """
  best = Choice(trees.chain(0), 1.0, step_ms, step_ms)
  for depth in sorted(set(depths) - {0}):
    runs = list(replayed(depth))
    rounds = sum(r[0] for r in runs)
    if not rounds:
      break
    tokens, ms = sum(r[2] for r in runs), sum(r[3] for r in runs)
    if groups is not None:
      by_group: dict[Any, list[float]] = {}
      for g, (_, _, t, m) in zip(groups, runs):
        acc = by_group.setdefault(g, [0.0, 0.0])
        acc[0], acc[1] = acc[0] + t, acc[1] + m
      if any(t * step_ms < floor * m for t, m in by_group.values()):
        continue
    choice = Choice(trees.chain(depth), tokens / rounds, ms / rounds,
                    step_ms)
    if choice.tokens_per_s > best.tokens_per_s * (1 + _TIE):
      best = choice
  return best


def replay_confident_rounds(accepted: Sequence[int],
                            path_logq: Sequence[Sequence[float]], depth: int,
                            gate: float) -> tuple[int, int, int]:
  """Greedy decoding of one continuation with a model drafter's chain
  (EAGLE's), chain(depth) and the round gate, replayed from its trace: at
  each position i, the drafts of its chain that greedy verification
  accepts a_i and the path log-probabilities the drafter gives its nodes,
  log q_i[d] for d = 1 .. (`train.drafter.chain_trace`). A round at i

      speculates iff E_i >= gate  (always when gate <= 0),
          E_i = sum_{d <= depth} exp(log q_i[d])          (`Tree.gated`)

  emitting 1 + min(a_i, depth) tokens, else 1.

  Returns:
    `(rounds, drafted rounds, tokens)` as `replay_rounds`.
  """
  def round_at(i: int) -> tuple[bool, int]:
    expected = float(np.sum(np.exp(np.asarray(path_logq[i][:depth],
                                              np.float64))))
    if gate <= 0 or expected >= gate:
      return True, 1 + min(int(accepted[i]), depth)
    return False, 1
  return _walk(len(accepted) - 1, round_at)


def replay_model_chain(traces: Sequence[tuple[Sequence[int],
                                              Sequence[Sequence[float]]]],
                       round_ms: Callable[[int], tuple[float, float]],
                       gate: Callable[[int], float], depths: Sequence[int],
                       groups: Optional[Sequence[Any]] = None,
                       floor: float = 0.0) -> Choice:
  """The hardware-aware chain of a model drafter (EAGLE), by replaying its
  measured chains (`replay_confident_rounds`) at each depth D of `depths`
  with the gate at `gate(D)`, each round priced by what a round of the
  compiled loop measured on this host (`HostProfile.rounds`):

      round_ms(D) = (drafted ms, gated ms)

  (a round drafts its D levels whatever the gate decides, so both include
  them; `round_ms(0)` is the autoregressive step, D = 0 plain decoding),
  and with `groups` the per-category `floor` (`_choose`).

  Returns:
    the best `Choice` (as `replay_chain`).
  """
  step = float(round_ms(0)[0])

  def replayed(depth: int) -> list[tuple[int, int, int, float]]:
    drafted_ms, gated_ms = map(float, round_ms(depth))
    out = []
    for accepted, path_logq in traces:
      r, d, t = replay_confident_rounds(accepted, path_logq, depth,
                                        gate(depth))
      out.append((r, d, t, d * drafted_ms + (r - d) * gated_ms))
    return out
  return _choose(replayed, depths, step, groups, floor)
