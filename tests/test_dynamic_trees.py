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


def grow(budget, roots, logit_table):
  root_logits = jnp.asarray(logit_table[0][roots])

  def expand(d, tokens, parent_pos, carry):
    return jnp.asarray(logit_table[d])[tokens], carry
  tree, _ = jax.jit(lambda r, l: grow_dynamic_tree(budget, r, l, expand, 0))(
      jnp.asarray(roots), root_logits)
  return jax.tree.map(np.asarray, tree)


def brute_force(budget, root, logit_table):
  """Every candidate EAGLE-2 generates, with its score: level 1 = the
  root's top-K; level d+1 = top-K children of level d's top-K."""
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
  tree = grow(budget, roots, logit_table)
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
    alone = grow(budget, roots[b:b + 1], logit_table)
    np.testing.assert_array_equal(alone.tokens[0], tree.tokens[b])
    np.testing.assert_array_equal(alone.parents[0], tree.parents[b])


def test_budget_spec_round_trip_and_refusals():
  shape = tree_specs.parse("dyn16d4k4")
  assert shape == DynamicTree(16, 4, 4)
  assert tree_specs.to_spec(shape) == "dyn16d4k4"
  with pytest.raises(TreeError, match="fewer than its 15 draft nodes"):
    tree_specs.parse("dyn16d2k2")
  with pytest.raises(TreeError, match="bad dynamic tree spec"):
    tree_specs.parse("dyn16d4")
