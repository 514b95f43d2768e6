"""Dynamic draft trees (EAGLE-2): grown on device within a budget, valid in
every row, the N - 1 best candidates by cumulative log-probability, a batch
equal to its rows alone; lossless through the engine with EAGLE."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqdec.decoding import tree_specs
from seqdec.decoding.drafters.dynamic import grow_dynamic_tree
from seqdec.decoding.trees import DynamicTree
from seqdec.errors import TreeError
from seqdec.kernels.tree_mask import validate_parents

V = 12


def table(seed):
  """A fixed draft distribution: logits of a node = f(its token, depth)."""
  return np.random.default_rng(seed).normal(size=(8, V, V)) * 2.0


def grow(budget, roots, logit_table, live=None, vocab_ids=None):
  """The tree; with `vocab_ids`, `logit_table`'s last axis holds those
  ids' logits only (a trimmed head's)."""
  root_logits = jnp.asarray(logit_table[0][roots])

  def expand(d, tokens, parent_pos, carry):
    return jnp.asarray(logit_table[d])[tokens], carry + 1
  tree, levels = jax.jit(lambda r, l, live: grow_dynamic_tree(
      budget, r, l, expand, 0, live, vocab_ids))(jnp.asarray(roots),
                                                 root_logits, live)
  return jax.tree.map(np.asarray, tree), int(levels)


def brute_force(budget, root, logit_table):
  """Every candidate EAGLE-2 generates, with its score: level 1 = the
  root's top-K; level d+1 = top-K children of level d's top-K (the
  frontier: `frontier_mass` sums its exp(score))."""
  def logsm(x):
    return x - np.log(np.exp(x - x.max()).sum()) - x.max()
  lp = logsm(logit_table[0][root])
  level = [((int(t),), lp[t]) for t in np.argsort(-lp, kind="stable")[:budget.top_k]]
  cands = list(level)
  for d in range(1, budget.max_depth):
    nxt = []
    for path, s in sorted(level, key=lambda c: -c[1])[:budget.top_k]:
      lq = logsm(logit_table[d][path[-1]])
      for t in np.argsort(-lq, kind="stable")[:budget.top_k]:
        nxt.append((path + (int(t),), s + lq[t]))
    cands += nxt
    level = nxt
  return cands


@pytest.mark.parametrize("budget", [DynamicTree(8, 3, 2), DynamicTree(6, 4, 3)])
def test_trees_are_valid_and_keep_the_best_candidates(budget):
  logit_table = table(0)
  roots = np.array([3, 7, 0, 11])
  tree, _ = grow(budget, roots, logit_table)
  assert tree.tokens.shape == (4, budget.num_nodes)
  validate_parents(tree.parents, forest=False)              # every row
  assert (tree.depth <= budget.max_depth).all()
  # Priority order: scores never rise along the slots (ties: the shallower
  # first), so every prefix of the slots is the best tree of its size.
  score, depth = tree.path_logq[:, 1:], tree.depth[:, 1:]
  assert ((np.diff(score, axis=1) < 0)
          | ((np.diff(score, axis=1) == 0) & (np.diff(depth, axis=1) >= 0))).all()
  assert (tree.parents[:, 1:] < np.arange(1, budget.num_nodes)).all()
  for b, root in enumerate(roots):
    want = brute_force(budget, root, logit_table)
    best = sorted(want, key=lambda c: (-c[1], len(c[0])))[:budget.num_nodes - 1]
    # The tree's root-to-node token paths are exactly the best candidates.
    paths = []
    for i in range(1, budget.num_nodes):
      path, j = [], i
      while j > 0:
        path.append(int(tree.tokens[b, j]))
        j = int(tree.parents[b, j])
      paths.append(tuple(reversed(path)))
    assert sorted(paths) == sorted(p for p, _ in best)
  # A batch equals its rows alone.
  for b in range(len(roots)):
    alone, _ = grow(budget, roots[b:b + 1], logit_table)
    np.testing.assert_array_equal(alone.tokens[0], tree.tokens[b])
    np.testing.assert_array_equal(alone.parents[0], tree.parents[b])


def test_a_trimmed_heads_kept_logits_grow_the_same_tree():
  """Logits over M ascending kept ids (`vocab_ids`) grow the tree that the
  same logits spread over V with -inf elsewhere (`grow.trimmed_logits`)
  grow: the same tokens, parents and scores, ties included (the table is
  rounded so that some logits tie)."""
  keep = np.array([0, 2, 3, 5, 8, 11])
  compact = np.round(table(2)[:, :, keep])        # [depth, V, M] with ties
  full = np.full(table(2).shape, -np.inf)
  full[:, :, keep] = compact
  roots = np.array([2, 11, 4])
  for budget in (DynamicTree(8, 3, 2), DynamicTree(10, 4, 3)):
    want, _ = grow(budget, roots, full)
    got, _ = grow(budget, roots, compact, vocab_ids=keep)
    assert np.isin(got.tokens[:, 1:], keep).all()
    for field in ("tokens", "parents", "path_logq"):
      np.testing.assert_array_equal(getattr(got, field),
                                    getattr(want, field), err_msg=field)


def frontier_mass(budget, cands, d):
  """Σ exp(score) over level d's frontier (its top-K candidates)."""
  level = sorted((s for p, s in cands if len(p) == d), reverse=True)
  return float(np.exp(level[:budget.top_k]).sum())


def test_growing_stops_when_the_frontier_cannot_repay_a_level():
  """`DynamicTree.stop` = c: level d+1 is grown only while level d's
  frontier mass (summed over the live rows) is >= c. The grown levels'
  candidates are ranked as without stopping, the skipped levels' fill the
  remaining slots last with score -inf, and the tree stays valid; dead
  rows do not count; c = 0 is the plain tree."""
  logit_table = table(1)
  plain = DynamicTree(10, 4, 2)
  root = 5
  cands = brute_force(plain, root, logit_table)
  masses = [frontier_mass(plain, cands, d) for d in (1, 2, 3)]
  assert masses[0] > masses[1] > masses[2]
  for grown, c in ((1, masses[0] * 1.01), (2, (masses[0] + masses[1]) / 2),
                   (3, (masses[1] + masses[2]) / 2), (4, masses[2] * 0.99)):
    budget = DynamicTree(10, 4, 2, stop=c)
    tree, levels = grow(budget, np.array([root, root]), logit_table,
                        jnp.array([True, False]))
    assert levels == grown - 1                  # expand ran per grown level
    validate_parents(tree.parents, forest=False)
    real = np.isfinite(tree.path_logq[0])
    want = sorted((x for x in cands if len(x[0]) <= grown),
                  key=lambda x: (-x[1], len(x[0])))[:plain.num_nodes - 1]
    assert real.sum() == 1 + len(want)
    assert (real[:real.sum()]).all()            # skipped candidates last
    np.testing.assert_allclose(tree.path_logq[0, 1:real.sum()],
                               [x[1] for x in want], rtol=1e-6)
  both_live, _ = grow(DynamicTree(10, 4, 2, stop=masses[0] * 1.01),
                      np.array([root, root]), logit_table)
  assert np.isfinite(both_live.path_logq).all()   # 2 x mass >= c: grown
  zero, _ = grow(DynamicTree(10, 4, 2, stop=0.0), np.array([root]),
                 logit_table)
  again, _ = grow(plain, np.array([root]), logit_table)
  np.testing.assert_array_equal(zero.tokens, again.tokens)


def test_budget_spec_round_trip_and_refusals():
  shape = tree_specs.parse("dyn16d4k4")
  assert shape == DynamicTree(16, 4, 4)
  assert tree_specs.to_spec(shape) == "dyn16d4k4"
  with pytest.raises(TreeError, match="fewer than its 15 draft nodes"):
    tree_specs.parse("dyn16d2k2")
  with pytest.raises(TreeError, match="bad dynamic tree spec"):
    tree_specs.parse("dyn16d4")


def test_stop_grammar_round_trip_and_refusals():
  """`@stop=` in the method grammar and the config block: a number or
  'auto'; refused for static trees, negative or non-numeric values, and
  unresolved 'auto' when the tree is built."""
  from seqdec.decoding import spec as spec_lib  # pylint: disable=g-import-not-at-top
  from seqdec.errors import ConfigError  # pylint: disable=g-import-not-at-top
  s = spec_lib.SpecConfig.parse("eagle@stop=0.25/dyn16d4k4")
  assert s.stop == 0.25 and str(s) == "eagle@stop=0.25/dyn16d4k4"
  assert spec_lib.SpecConfig.from_config(s.to_config()) == s
  assert spec_lib.build_tree(s) == DynamicTree(16, 4, 4, stop=0.25)
  auto = spec_lib.SpecConfig.parse("eagle@stop=auto/dyn16d4k4")
  assert str(auto) == "eagle@stop=auto/dyn16d4k4"
  assert spec_lib.SpecConfig.from_config(auto.to_config()) == auto
  with pytest.raises(ConfigError, match="resolved from the host profile"):
    spec_lib.build_tree(auto)
  with pytest.raises(ConfigError, match="applies to dynamic trees"):
    spec_lib.build_tree(spec_lib.SpecConfig.parse("eagle@stop=0.1/chain4"))
  for bad in ("-1", "nan", "lots"):
    with pytest.raises(ConfigError, match="stop"):
      spec_lib.SpecConfig.parse(f"eagle@stop={bad}/dyn16d4k4")
