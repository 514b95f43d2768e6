"""Token tree topologies: constructors, host validation, the jitted mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqdec.decoding import tree_specs
from seqdec.decoding import trees


def reference_mask(parents):
  n = len(parents)
  m = np.zeros((n, n), bool)
  for i in range(n):
    j = i
    while j >= 0:
      m[i, j] = True
      j = parents[j]
  return m


def test_jitted_ancestor_mask_matches_reference_for_every_small_tree():
  shapes = trees.all_shapes_up_to(5)
  assert len(shapes) == 24  # 1 * 2 * 3 * 4 parent choices
  parents = jnp.asarray([s.parents for s in shapes])
  masks = np.asarray(jax.jit(trees.ancestor_mask)(parents))
  for s, m in zip(shapes, masks):
    np.testing.assert_array_equal(m, reference_mask(s.parents))


def test_constructors():
  c = trees.chain(3)
  assert c.parents == (-1, 0, 1, 2) and c.max_depth == 3
  k = trees.kary((3, 2))
  assert k.num_nodes == 10 and k.max_children == 3
  assert list(k.depth) == [0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
  assert k.parents[4:] == (1, 1, 2, 2, 3, 3) and k.ranks[4:6] == (0, 1)
  p = trees.from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
  assert p.parents == (-1, 0, 0, 1, 1, 2, 3)
  assert p.ranks == (0, 0, 1, 0, 1, 0, 0)
  assert tree_specs.parse("chain4") == trees.chain(4)
  assert tree_specs.parse("kary2x2") == trees.kary((2, 2))


@pytest.mark.parametrize("parents,message", [
    ([], "at least the root"),
    ([0, 0], "must have parent -1"),
    ([-1, 5], "outside"),
    ([-1, 1], "its own parent"),
    ([-1, 2, 1], "listed after it"),
])
def test_invalid_parents(parents, message):
  with pytest.raises(trees.TreeError, match=message):
    trees.validate_parents(parents)


@pytest.mark.parametrize("paths,message", [
    ([(0,), (0, 0, 1)], "no parent path"),
    ([(0,), (0,)], "listed twice"),
    ([()], "empty path"),
    ([(-1,)], "negative rank"),
])
def test_invalid_paths(paths, message):
  with pytest.raises(trees.TreeError, match=message):
    trees.from_paths(paths)


def test_bad_specs_and_duplicate_ranks():
  with pytest.raises(trees.TreeError, match="unknown tree spec"):
    tree_specs.parse("star5")
  with pytest.raises(trees.TreeError, match="bad tree spec"):
    tree_specs.parse("karyAx2")
  with pytest.raises(trees.TreeError, match="repeats rank"):
    trees.TreeShape((-1, 0, 0), (0, 0, 0))


def test_tree_larger_than_remaining_context():
  t = trees.chain(4)
  t.check_fits(length=10, context=15)
  with pytest.raises(trees.TreeError, match="beyond the context"):
    t.check_fits(length=11, context=15)


def test_positions_are_length_plus_depth():
  t = trees.kary((2, 1))
  pos = trees.positions(jnp.array([5, 9]), jnp.asarray(t.depth)[None])
  np.testing.assert_array_equal(pos, [[5, 6, 6, 7, 7], [9, 10, 10, 11, 11]])
