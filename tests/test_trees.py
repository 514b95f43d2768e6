"""Token tree topologies: constructors, host validation, the on-device
mask (`seqdec.kernels.tree_mask.ancestor_mask`) against a pointer walk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqdec import testing
from seqdec.decoding import tree_specs
from seqdec.decoding import trees
from seqdec.kernels import tree_mask


def test_jitted_ancestor_mask_matches_reference_for_every_small_tree():
  shapes = trees.all_shapes_up_to(5)
  assert len(shapes) == 24  # 1 * 2 * 3 * 4 parent choices
  parents = jnp.asarray([s.parents for s in shapes])
  masks = np.asarray(jax.jit(tree_mask.ancestor_mask)(parents))
  for s, m in zip(shapes, masks):
    np.testing.assert_array_equal(m, testing.ancestor_mask_oracle(s.parents))


def test_tree_from_parents_inside_jit():
  """Parents computed inside jit (a data-dependent tree) get exact masks and
  depths: a chain or a star chosen by a traced flag."""
  @jax.jit
  def build(star):
    chain = jnp.arange(-1, 4, dtype=jnp.int32)
    parents = jnp.where(star, jnp.array([-1, 0, 0, 0, 0]), chain)
    return trees.Tree.from_parents(jnp.zeros((2, 5), jnp.int32),
                                   jnp.stack([parents, chain]))
  for star in (False, True):
    tree = build(star)
    tree.check()
    expected = [-1, 0, 0, 0, 0] if star else [-1, 0, 1, 2, 3]
    np.testing.assert_array_equal(np.asarray(tree.mask[0]),
                                  testing.ancestor_mask_oracle(expected))
    assert list(np.asarray(tree.depth[0])) == list(trees.depths(expected))


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
    ([-1, 2, 1], r"cycle through nodes \[1, 2\]"),
    ([-1, 2, 0], "listed after it"),
    ([-1, 0, -1], "only root"),
])
def test_invalid_parents(parents, message):
  """Decoding trees: the kernels' host check with node 0 the only root."""
  with pytest.raises(trees.TreeError, match=message):
    tree_mask.validate_parents(parents, forest=False)
  with pytest.raises(trees.TreeError, match=message):
    trees.TreeShape(tuple(parents), (0,) * len(parents))
  if parents and parents[0] == -1 and min(parents) >= -1:
    assert not bool(tree_mask.parents_valid(jnp.asarray([parents]),
                                            forest=False)[0])


@pytest.mark.parametrize("paths,message", [
    ([(0,), (0, 0, 1)], "no parent path"),
    ([(0,), (0,)], "listed twice"),
    ([()], "empty path"),
    ([(-1,)], "negative rank"),
])
def test_invalid_paths(paths, message):
  with pytest.raises(trees.TreeError, match=message):
    trees.from_paths(paths)


def test_from_shape_takes_per_node_schemes():
  shape = trees.kary((2, 1))
  tokens = jnp.zeros((2, 5), jnp.int32)
  per_node = [trees.DETERMINISTIC, trees.IID, trees.WITHOUT_REPLACEMENT,
              trees.IID, trees.IID]
  for scheme, want in [
      (trees.IID, [[trees.IID] * 5] * 2),
      (per_node, [per_node] * 2),
      (np.array([per_node, per_node[::-1]]), [per_node, per_node[::-1]]),
      (jnp.asarray(per_node), [per_node] * 2)]:
    tree = trees.Tree.from_shape(shape, tokens, scheme=scheme)
    np.testing.assert_array_equal(np.asarray(tree.scheme), want)
    assert tree.scheme.dtype == jnp.int32
  traced = jax.jit(lambda s: trees.Tree.from_shape(shape, tokens, scheme=s))
  np.testing.assert_array_equal(
      np.asarray(traced(jnp.asarray(per_node)).scheme), [per_node] * 2)
  with pytest.raises(trees.TreeError, match="scheme must be"):
    trees.Tree.from_shape(shape, tokens, scheme=[0, 1])


def test_bad_specs_and_duplicate_ranks():
  with pytest.raises(trees.TreeError, match="unknown tree spec"):
    tree_specs.parse("star5")
  with pytest.raises(trees.TreeError, match="bad tree spec"):
    tree_specs.parse("karyAx2")
  with pytest.raises(trees.TreeError, match="repeats rank"):
    trees.TreeShape((-1, 0, 0), (0, 0, 0))


def test_positions_are_length_plus_depth():
  t = trees.kary((2, 1))
  pos = trees.positions(jnp.array([5, 9]), jnp.asarray(t.depth)[None])
  np.testing.assert_array_equal(pos, [[5, 6, 6, 7, 7], [9, 10, 10, 11, 11]])


def test_expected_accepted_and_the_gate():
  """E = sum over valid draft nodes of exp(path log q) (each valid node 1
  without path_logq); `gated` keeps only the root of rows below the gate
  whose children were all chosen deterministically."""
  # Row 0: root -> a (q .5) -> b (q .5), root -> c (q .25): E = .5+.25+.25.
  # Row 1: the same with c invalid: E = .75.
  parents = jnp.array([[-1, 0, 1, 0], [-1, 0, 1, 0]], jnp.int32)
  logq = jnp.log(jnp.array([[1.0, 0.5, 0.25, 0.25]] * 2))
  valid = jnp.array([[True, True, True, True], [True, True, True, False]])
  tree = trees.Tree.from_parents(jnp.zeros((2, 4), jnp.int32), parents,
                                 valid=valid, path_logq=logq)
  np.testing.assert_allclose(np.asarray(tree.expected_accepted()),
                             [1.0, 0.75], rtol=1e-6)
  gated, speculate = jax.jit(lambda t: t.gated(0.9))(tree)
  assert np.asarray(speculate).tolist() == [True, False]
  np.testing.assert_array_equal(np.asarray(gated.valid),
                                [[1, 1, 1, 1], [1, 0, 0, 0]])
  # Drawn children (row 1's root: i.i.d.) are never gated: the decision
  # would read the draws.
  drawn = tree.replace(scheme=tree.scheme.at[1, 0].set(trees.IID))
  gated, speculate = drawn.gated(0.9)
  assert np.asarray(speculate).tolist() == [True, True]
  np.testing.assert_array_equal(np.asarray(gated.valid), np.asarray(valid))
  counted = trees.Tree.from_parents(jnp.zeros((2, 4), jnp.int32), parents,
                                    valid=valid)
  np.testing.assert_array_equal(np.asarray(counted.expected_accepted()),
                                [3, 2])
