"""Verify budgets (`seqdec.decoding.budget`): the width each round verifies
is the ladder width of the largest expected gain, by brute force; the
ladder's grammar and its refusals. The engine's losslessness with a budget
is shown in tests/test_eagle.py (a trained drafter, float64)."""

import jax.numpy as jnp
import numpy as np
import pytest

from seqdec.decoding import budget as budget_lib
from seqdec.decoding.budget import WidthBudget
from seqdec.decoding.spec import SpecConfig
from seqdec.decoding.trees import DETERMINISTIC, IID, Tree, kary
from seqdec.errors import ConfigError, TreeError

SHAPE = kary((3, 2, 1))          # 1 + 3 + 6 + 6 = 16 nodes, level order


def random_tree(rng, b, *, drawn_row=None, no_logq=False):
  n = SHAPE.num_nodes
  valid = rng.random((b, n)) < 0.8
  valid[:, 0] = True
  logq = np.sort(-rng.exponential(1.5, (b, n)), axis=1)[:, ::-1]
  logq[:, 0] = 0.0
  scheme = np.full((b, n), DETERMINISTIC)
  if drawn_row is not None:
    scheme[drawn_row, 0] = IID
  return Tree.from_parents(
      jnp.asarray(rng.integers(0, 50, (b, n))), jnp.asarray(SHAPE.parents),
      valid=jnp.asarray(valid), scheme=jnp.asarray(scheme),
      path_logq=None if no_logq else jnp.asarray(logq, jnp.float32))


def brute_force(ladder, tree, live):
  """(gains, chosen index, kept valid) by the module docstring's sums."""
  valid = np.asarray(tree.valid)
  p = (np.ones(valid.shape) if tree.path_logq is None
       else np.exp(np.asarray(tree.path_logq, np.float64)))
  gains = []
  for w, c in zip(ladder.widths, ladder.costs):
    s = sum(p[b, i] for b in range(valid.shape[0]) if live[b]
            for i in range(1, w) if valid[b, i])
    gains.append(s - live.sum() * c)
  j = int(np.argmax(np.round(gains, 5)))        # first of the largest
  drawn = any(live[b] and (valid[b] & (np.asarray(tree.scheme)[b] != 0)).any()
              for b in range(valid.shape[0]))
  if drawn:
    j = len(ladder.widths) - 1
  keep = valid & (np.arange(valid.shape[1]) < ladder.widths[j])[None]
  return np.asarray(gains), j, keep


@pytest.mark.parametrize("case", ["plain", "drawn", "no_logq", "dead_rows"])
def test_chosen_width_has_the_largest_gain(case):
  rng = np.random.default_rng(["plain", "drawn", "no_logq",
                               "dead_rows"].index(case))
  ladder = WidthBudget((1, 2, 4, 8, 16), (0.0, 0.12, 0.4, 0.9, 2.1))
  for trial in range(6):
    b = 3
    tree = random_tree(rng, b, drawn_row=1 if case == "drawn" else None,
                       no_logq=case == "no_logq")
    live = np.ones(b, bool) if case != "dead_rows" else rng.random(b) < 0.5
    want_gains, want_j, want_valid = brute_force(ladder, tree, live)
    gains = np.asarray(ladder.gains(tree, jnp.asarray(live)))
    np.testing.assert_allclose(gains, want_gains, rtol=1e-5, atol=1e-5)
    pruned, j = ladder.apply(tree, jnp.asarray(live))
    assert int(j) == want_j, (trial, gains)
    np.testing.assert_array_equal(np.asarray(pruned.valid), want_valid)
    # The loop then runs the smallest width holding every live row's nodes.
    k = int(budget_lib.width_index(ladder.widths, pruned, jnp.asarray(live)))
    last = max([i + 1 for b_ in range(b) if live[b_]
                for i in np.flatnonzero(want_valid[b_])] or [1])
    assert ladder.widths[k] >= last and (k == 0
                                         or ladder.widths[k - 1] < last)
    assert k <= want_j
  if case == "drawn":        # a row with drawn children keeps its tree
    assert int(j) == len(ladder.widths) - 1


def test_zero_cost_keeps_every_node_and_high_cost_none():
  rng = np.random.default_rng(7)
  tree = random_tree(rng, 2)
  live = jnp.ones((2,), bool)
  free = WidthBudget((1, 4, 16), (0.0, 0.0, 0.0))
  pruned, _ = free.apply(tree, live)
  np.testing.assert_array_equal(np.asarray(pruned.valid),
                                np.asarray(tree.valid))
  dear = WidthBudget((1, 4, 16), (0.0, 50.0, 100.0))
  pruned, j = dear.apply(tree, live)
  assert int(j) == 0 and not np.asarray(pruned.valid)[:, 1:].any()


def test_ladder_grammar_round_trip_and_refusals():
  ladder = WidthBudget.parse("1:0+5:0.45+16:1.2")
  assert ladder.widths == (1, 5, 16) and ladder.costs == (0.0, 0.45, 1.2)
  assert WidthBudget.parse(str(ladder)) == ladder
  assert ladder.fitted(16) is ladder
  with pytest.raises(TreeError, match="must end at the tree's 8 nodes"):
    ladder.fitted(8)
  for bad, match in [("5:0.1+4:0.2", "ascending"), ("0:0+4:1", "ascending"),
                     ("1:0+4:-1", "finite"),
                     ("1:0+4:nan", "bad verify budget"), ("4", "bad verify budget"),
                     ("1:0+x:1", "bad verify budget"), ("1:0+4:1.2.3",
                                                        "not a number")]:
    with pytest.raises(ConfigError, match=match):
      WidthBudget.parse(bad)
  spec = SpecConfig.parse("eagle@budget=1:0+5:0.45+16:1.2/dyn16d4k4")
  assert spec.budget == "1:0+5:0.45+16:1.2"
  assert SpecConfig.parse(str(spec)) == spec
  assert SpecConfig.from_config(spec.to_config()) == spec
  assert SpecConfig.parse("eagle@budget=auto/dyn16d4k4").budget == "auto"
  with pytest.raises(ConfigError, match="bad verify budget"):
    SpecConfig.parse("eagle@budget=wide/dyn16d4k4")
  with pytest.raises(ConfigError, match="resolved from this host's profile"):
    budget_lib.parse_budget("auto")
  priced = WidthBudget.from_costs(13, lambda w: 0.1 * (w - 1))
  assert priced.widths == (1, 2, 4, 8, 13)
  np.testing.assert_allclose(priced.costs, (0, 0.1, 0.3, 0.7, 1.2))


def test_a_ladder_priced_per_cache_length():
  """Priced at cache lengths S_l, a row pays its own costs: linear in its
  committed length between the two nearest S_l, clamped outside; the
  gains and the chosen width by brute force with those per-row costs; the
  grammar's round trip and refusals."""
  ladder = WidthBudget.parse("128=1:0+4:0.1+16:0.3;512=1:0+4:0.5+16:1.5")
  assert ladder.lengths == (128, 512) and ladder.widths == (1, 4, 16)
  assert WidthBudget.parse(str(ladder)) == ladder
  lengths = jnp.asarray([64, 128, 320, 512, 2000])
  want = np.array([[0, 0.1, 0.3], [0, 0.1, 0.3], [0, 0.3, 0.9],
                   [0, 0.5, 1.5], [0, 0.5, 1.5]])
  np.testing.assert_allclose(ladder.row_costs(lengths, 5), want, atol=1e-6)
  rng = np.random.default_rng(3)
  for _ in range(4):
    tree = random_tree(rng, 3)
    live = np.array([True, False, True])
    length = rng.integers(0, 700, 3)
    costs = np.asarray(ladder.row_costs(jnp.asarray(length), 3))
    p = np.exp(np.asarray(tree.path_logq, np.float64))
    valid = np.asarray(tree.valid)
    gains = [sum(p[b, i] for b in range(3) if live[b] for i in range(1, w)
                 if valid[b, i]) - sum(costs[b, j] for b in range(3)
                                       if live[b])
             for j, w in enumerate(ladder.widths)]
    got = np.asarray(ladder.gains(tree, jnp.asarray(live), jnp.asarray(
        length)))
    np.testing.assert_allclose(got, gains, rtol=1e-5, atol=1e-5)
    _, j = ladder.apply(tree, jnp.asarray(live), jnp.asarray(length))
    assert int(j) == int(np.argmax(np.round(gains, 5)))
  # Without lengths the largest priced length's ladder applies.
  np.testing.assert_allclose(ladder.gains(tree, jnp.asarray(live)),
                             WidthBudget((1, 4, 16), (0, 0.5, 1.5)).gains(
                                 tree, jnp.asarray(live)), atol=1e-6)
  priced = WidthBudget.from_costs(13, lambda w, s: (w - 1) * s / 1000,
                                  lengths=(100, 400))
  assert str(priced) == ("100=1:0+2:0.1+4:0.3+8:0.7+13:1.2;"
                         "400=1:0+2:0.4+4:1.2+8:2.8+13:4.8")
  spec = SpecConfig.parse(f"eagle@budget={priced}/dyn13d4k4")
  assert SpecConfig.parse(str(spec)) == spec
  for bad, match in [("128=1:0+4:1;512=1:0+8:1", "same widths"),
                     ("128=1:0+4:1;1:0+4:2", "every part"),
                     ("512=1:0+4:1;128=1:0+4:2", "ascending")]:
    with pytest.raises(ConfigError, match=match):
      WidthBudget.parse(bad)
