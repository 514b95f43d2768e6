"""Bit-packed tree masks: Pallas kernel == jnp reference, bit for bit.

Oracle: a host pointer walk (`seqdec.testing.ancestor_mask_oracle`)
packed with `pack_mask`, and depths counted from it (forests included);
the dense `ancestor_mask` (the decode path's builder) must equal it
unpacked. Both kernel bodies ('gpu', 'tpu') run in interpret mode; shapes
are bucketed (N in {1, 32, 40, 120} plus the all-trees batch) so that
compiles stay few.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqdec import testing
from seqdec.decoding import trees
from seqdec.kernels import tree_mask as tm

PLATFORMS = ("gpu", "tpu")


def expected(parents):
  """Packed oracle masks; depth = ancestors - 1 (forests included)."""
  dense = testing.ancestor_mask_oracle(parents)
  depth = dense.sum(-1) - 1
  return np.asarray(tm.pack_mask(jnp.asarray(dense))), depth, dense


def check_all(parents):
  """Kernel (both bodies) == reference == packed oracle; dense == oracle."""
  words, depth, dense = expected(parents)
  ref_w, ref_d = tm.tree_mask_reference(jnp.asarray(parents, jnp.int32))
  np.testing.assert_array_equal(np.asarray(ref_w), words)
  np.testing.assert_array_equal(np.asarray(ref_d), depth)
  np.testing.assert_array_equal(
      np.asarray(tm.ancestor_mask(jnp.asarray(parents, jnp.int32))), dense)
  for platform in PLATFORMS:
    got_w, got_d = tm.tree_mask(parents, platform=platform)
    assert got_w.dtype == jnp.uint32 and got_d.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got_w), words)
    np.testing.assert_array_equal(np.asarray(got_d), depth)


def test_every_tree_of_six_nodes():
  shapes = trees.all_shapes_up_to(6)
  assert len(shapes) == 120
  check_all(np.array([s.parents for s in shapes], np.int32))


def _tree(kind, n, rng):
  """Parent arrays of a given family; node 0 is always a root."""
  if kind == "chain":
    return [-1] + list(range(n - 1))
  if kind == "star":
    return [-1] + [0] * (n - 1)
  if kind == "deep":      # a long spine with a few side branches
    return [-1] + [i - 1 if i % 7 else max(0, i - 3) for i in range(1, n)]
  if kind == "bushy":     # heap order, branching 4
    return [-1] + [(i - 1) // 4 for i in range(1, n)]
  if kind == "forest":    # several children of the committed prefix
    return [-1] + [-1 if i % 9 == 0 else int(rng.integers(0, i))
                   for i in range(1, n)]
  return [-1] + [int(rng.integers(0, i)) for i in range(1, n)]


KINDS = ("chain", "star", "deep", "bushy", "forest", "random")


@settings(deadline=None, derandomize=True, max_examples=10)
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=4, max_size=4),
       n=st.just(40), seed=st.integers(0, 2**16))
def test_random_trees(kinds, n, seed):
  rng = np.random.default_rng(seed)
  check_all(np.array([_tree(k, n, rng) for k in kinds], np.int32))


def test_single_node_and_one_word_boundary():
  check_all(np.array([[-1]], np.int32))
  check_all(np.array([[-1] + list(range(31)), [-1] * 32], np.int32))


def test_rounds_are_logarithmic_in_depth():
  """A 120-node chain needs ceil(log2 120) = 7 doubling rounds (the cap);
  next to it a bushy tree, a star and a forest of the same size."""
  rng = np.random.default_rng(0)
  parents = np.array([[-1] + list(range(119))]
                     + [_tree(k, 120, rng) for k in ("bushy", "star",
                                                      "forest")], np.int32)
  check_all(parents)
  words, depth = tm.tree_mask(parents[:1])
  assert int(depth.max()) == 119
  assert int(jax.lax.population_count(words[0, -1]).sum()) == 120


@pytest.mark.parametrize("parents,message", [
    ([[-1, 0, 3, 1]], "node 2 has parent 3 listed after it"),
    ([[-1, 0, 5]], "node 2 has parent 5, outside"),
    ([[-1, -2]], "node 1 has parent -2, outside"),
    ([[-1, 2, 1]], r"cycle through nodes \[1, 2\]"),
    ([[-1, 1]], r"cycle through nodes \[1\]"),
    ([[-1, 0], [-1, 3]], "row 1: node 1 has parent 3"),
    ([[]], "N >= 1"),
    ([[-1, 0.5]], "integers"),
])
def test_invalid_parents_are_rejected(parents, message):
  with pytest.raises(trees.TreeError, match=message):
    tm.tree_mask(np.array(parents))
  arr = np.array(parents)
  if arr.size and np.issubdtype(arr.dtype, np.integer):
    assert not bool(jnp.all(tm.parents_valid(jnp.asarray(arr))))


def test_forests_and_the_decoding_root_rule():
  """Kernels accept forests; decoding trees (forest=False) have one root."""
  forest = np.array([[-1, 0, -1, 2]], np.int32)
  np.testing.assert_array_equal(tm.validate_parents(forest), forest)
  assert bool(tm.parents_valid(jnp.asarray(forest))[0])
  with pytest.raises(trees.TreeError, match="row 0: node 2 has parent -1"):
    tm.validate_parents(forest, forest=False)
  assert not bool(tm.parents_valid(jnp.asarray(forest), forest=False)[0])
  tree = np.array([[-1, 0, 0, 2]], np.int32)
  tm.validate_parents(tree, forest=False)
  assert bool(tm.parents_valid(jnp.asarray(tree), forest=False)[0])


def test_validation_inside_jit():
  parents = jnp.array([[-1, 0, 1], [-1, 0, 0]])
  with pytest.raises(trees.TreeError, match="inside jit"):
    jax.jit(tm.tree_mask)(parents)
  words, _ = jax.jit(lambda p: tm.tree_mask(p, validate=False))(parents)
  np.testing.assert_array_equal(np.asarray(words[:, :, 0]),
                                [[1, 3, 7], [1, 3, 5]])
  assert np.asarray(tm.parents_valid(parents)).all()
