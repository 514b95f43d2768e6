"""Sequoia trees: the DP against brute force, closed forms, acceptance files,
tree specs, and the teacher-forced rank statistics against the drafters."""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqdec import testing
from seqdec.decoding import acceptance_rates
from seqdec.decoding import rank_statistics
from seqdec.decoding import sequoia
from seqdec.decoding import tree_specs
from seqdec.decoding import trees
from seqdec.decoding.drafters import draft_lm, layer_skip, truncated
from seqdec.decoding.drafters.base import Round
from seqdec.models.transformer import commit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBS = {
    "sorted": (0.6, 0.2, 0.1),
    "flat": (0.3, 0.25, 0.2, 0.15),
    "unsorted": (0.1, 0.5, 0.05),       # rank 2 best: the DP may skip rank 1
    "zeros": (0.7, 0.0, 0.2),
    "single": (0.9,),
    "weak": (0.2, 0.1),
}


def all_trees(k, max_nodes):
  """Yields `(m, depth, paths)` for every tree of m <= max_nodes draft nodes
  whose ranks are < k: every topology with every injective assignment of
  ranks 0..k-1 to each node's children (trees as prefix-closed sets of rank
  paths).

  Canonical growth: the last node of a tree in (depth, path) order is a
  leaf, and removing it leaves a tree, so every tree arises exactly once by
  appending a node after the current last one.
  """
  def grow(paths, last):
    yield len(paths), len(last), paths
    if len(paths) == max_nodes:
      return
    for parent in [()] + paths:
      for r in range(k):
        child = parent + (r,)
        if (len(child), child) > (len(last), last):
          yield from grow(paths + [child], child)
  yield from grow([], ())


@functools.lru_cache(maxsize=None)
def brute_force(p, max_nodes):
  """`best[m][d]`: the best tau (eq. (1), computed here independently) over
  every tree of exactly m draft nodes and max depth exactly d."""
  best = np.full((max_nodes + 1, max_nodes + 1), -np.inf)
  for m, d, paths in all_trees(len(p), max_nodes):
    tau = 1.0 + sum(math.prod(p[r] for r in path) for path in paths)
    best[m, d] = max(best[m, d], tau)
  return best


def test_brute_force_enumerates_every_labelled_tree():
  """K-ary trees of N nodes: C(KN, N) / ((K - 1) N + 1) (Fuss-Catalan)."""
  counts = np.bincount([m for m, _, _ in all_trees(3, 5)])
  # m draft nodes + the root: ternary trees of m + 1 nodes.
  assert list(counts) == [math.comb(3 * (m + 1), m + 1) // (2 * (m + 1) + 1)
                          for m in range(6)]


@pytest.mark.parametrize("name", sorted(PROBS))
def test_dp_equals_brute_force(name):
  p = PROBS[name]
  best = brute_force(p, 6)
  for n in range(7):
    for depth in (None, 1, 2, 3):
      d_max = n if depth is None else depth
      want = best[:n + 1, :d_max + 1].max()       # at most n nodes, depth <= D
      shape, tau = sequoia.optimal_tree(p, n, depth)
      assert abs(tau - want) <= 1e-12, (name, n, depth, tau, want)
      assert abs(sequoia.expected_accepted(shape, p) - tau) <= 1e-12
      assert shape.num_nodes - 1 <= n and shape.max_depth <= d_max
      shape.levels                          # numbered level by level
      assert shape == trees.from_paths(shape.rank_paths()[1:]) or n == 0
      if min(p) > 0 and depth is None:
        assert shape.num_nodes - 1 == n     # every node adds something
    taus = sequoia.optimal_taus(p, 6)
    assert np.abs(taus - np.maximum.accumulate(best.max(1))).max() <= 1e-12


def test_closed_forms():
  for alpha in (0.0, 0.3, 0.8, 0.95):
    for gamma in (0, 1, 4, 9):
      want = (1 - alpha ** (gamma + 1)) / (1 - alpha)
      assert abs(sequoia.expected_accepted(trees.chain(gamma), [alpha]) -
                 want) <= 1e-12
      shape, tau = sequoia.optimal_tree([alpha], gamma)   # K = 1: a chain
      assert abs(tau - want) <= 1e-12
      if alpha > 0:
        assert shape == trees.chain(gamma)
  p = [0.5, 0.2, 0.1, 0.05]
  for branching in [(2,), (3, 2), (2, 2, 1), (4, 1, 1)]:
    s, want, prod = np.cumsum(p), 1.0, 1.0
    for b in branching:            # tau = 1 + sum_d prod_{j <= d} S_{b_j}
      prod *= s[b - 1]
      want += prod
    assert abs(sequoia.expected_accepted(trees.kary(branching), p) -
               want) <= 1e-12
  # Depth 1: the root's best min(n, K) ranks.
  shape, tau = sequoia.optimal_tree(p, 3, max_depth=1)
  assert shape == trees.kary((3,)) and abs(tau - 1.8) <= 1e-12
  # Ranks past K count p = 0.
  assert sequoia.expected_accepted(trees.kary((6,)), p) == pytest.approx(1.85)


def test_large_budgets():
  p = np.linspace(0.3, 0.005, 16)
  p = p * 0.85 / p.sum()
  prev = 1.0
  for n in (8, 16, 32, 64):
    for depth in (None, 6):
      shape, tau = sequoia.optimal_tree(p, n, depth)
      assert shape.num_nodes == n + 1
      assert abs(sequoia.expected_accepted(shape, p) - tau) <= 1e-10
      assert shape.max_children <= 16
      if depth:
        assert shape.max_depth <= depth
    assert tau >= prev and tau >= sequoia.expected_accepted(trees.chain(n), p)
    prev = tau
  # Sequoia beats the hand-built trees at equal size.
  for size, paths in trees.STATIC_TREES.items():
    assert sequoia.optimal_tree(p, size)[1] >= sequoia.expected_accepted(
        trees.from_paths(paths), p) - 1e-12


@pytest.mark.parametrize("args,message", [
    (([], 4), "is empty"),
    (([0.5, -0.1], 4), r"p_2 = -0.1 is outside \[0, 1\]"),
    (([0.5, float("nan")], 4), "outside"),
    (([0.7, 0.4], 4), "sum to 1.1 > 1"),
    (([True], 4), "not a number"),
    (("0.5", 4), "must be a list"),
    (([0.5], -1), "budget must be >= 0"),
    (([0.5], 2.5), "budget must be an integer"),
    (([0.5], 4, 0), "max_depth must be >= 1"),
    (([0.5], 4, 1.5), "max_depth must be an integer"),
])
def test_bad_inputs(args, message):
  with pytest.raises(ValueError, match=message):
    sequoia.optimal_tree(*args)


def test_expected_accepted_rejects_non_shapes():
  with pytest.raises(TypeError, match="TreeShape"):
    sequoia.expected_accepted((-1, 0), [0.5])


def write(path, obj):
  with open(path, "w", encoding="utf-8") as f:
    f.write(obj if isinstance(obj, str) else json.dumps(obj))
  return str(path)


def test_parse_round_trip(tmp_path):
  p = [0.55, 0.15, 0.08, 0.04]
  path = str(tmp_path / "acc.json")
  acceptance_rates.write_acceptance(path, p, drafter="x", target="y", temperature=0.0,
                           rule="greedy", trials=100, command="test")
  acc = acceptance_rates.load_acceptance(path)
  assert acc.probs == tuple(p) and acc.meta["trials"] == 100
  for n, depth in [(0, None), (8, None), (16, 3), (32, None)]:
    spec = f"sequoia{n}" + (f"d{depth}" if depth else "") + f":{path}"
    shape = tree_specs.parse(spec)
    assert shape == sequoia.optimal_tree(p, n, depth)[0]
    assert shape == tree_specs.parse(spec)           # deterministic, hashable
    assert shape.num_nodes == n + 1


def test_committed_acceptance_files_parse():
  directory = os.path.join(ROOT, "configs", "acceptance")
  files = sorted(f for f in os.listdir(directory) if f.endswith(".json"))
  assert files
  for f in files:
    acc = acceptance_rates.load_acceptance(os.path.join(directory, f))
    assert acc.meta["command"].startswith("python launch/measure_acceptance")
    # Paths relative to the source tree work from any directory.
    shape = tree_specs.parse(f"sequoia16:configs/acceptance/{f}")
    assert shape.num_nodes == 17


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ([0.5], "expected a JSON object"),
    ({"prob": [0.5]}, "missing 'probs'"),
    ({"probs": 0.5}, "must be a list"),
    ({"probs": []}, "is empty"),
    ({"probs": [0.5, 1.5]}, r"p_2 = 1.5 is outside"),
    ({"probs": [0.6, 0.6]}, "sum to 1.2"),
    ('{"probs": [NaN]}', "outside"),
    ({"probs": ["0.5"]}, "not a number"),
    ({"probs": [0.5], "temperature": -1}, "'temperature' must be"),
    ({"probs": [0.5], "trials": 0}, "'trials' must be"),
])
def test_bad_acceptance_files(tmp_path, content, message):
  path = write(tmp_path / "bad.json", content)
  with pytest.raises(acceptance_rates.AcceptanceError, match=message):
    acceptance_rates.load_acceptance(path)
  with pytest.raises(trees.TreeError, match="bad tree spec 'sequoia4:.*" +
                     message):
    tree_specs.parse(f"sequoia4:{path}")


@pytest.mark.parametrize("spec,message", [
    ("sequoia8:/no/such/file.json", "does not exist"),
    ("sequoia:/x.json", "bad sequoia spec"),
    ("sequoia8", "bad sequoia spec"),
    ("sequoia8x3:/x.json", "bad sequoia spec"),
])
def test_bad_specs(spec, message):
  with pytest.raises(trees.TreeError, match=message):
    tree_specs.parse(spec)


def test_bad_spec_depth(tmp_path):
  path = write(tmp_path / "a.json", {"probs": [0.5]})
  with pytest.raises(trees.TreeError, match="max_depth must be >= 1"):
    tree_specs.parse(f"sequoia8d0:{path}")


# ------------------------------------------------ teacher-forced measurement


@pytest.fixture(scope="module")
def target():
  return testing.tiny_model(num_layers=4)


def drafter_top_k(drafter, model, tokens, t, k):
  """The drafter's k children of root tokens[t] through `propose` itself
  (the target cache holds tokens[:t] committed; one compile for every t)."""
  full = jnp.asarray(tokens[None])
  cache = model.init_cache(1, 64)
  _, cache = testing.jitted(model)(full, jnp.arange(len(tokens))[None], cache)
  return np.asarray(_propose_top_k(drafter, trees.kary((k,)), full, cache,
                                   jnp.asarray([t])))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _propose_top_k(drafter, shape, full, cache, t):
  cache = commit(cache, t)                            # committed: tokens[:t]
  first = full[:, t[0]]
  rnd = Round(root=first, prev=full[:, t[0] - 1], length=t,
              live=jnp.asarray([True]))
  state = drafter.init(drafter.params, full, t, first, 48, cache)
  tree, _, _ = drafter.propose(drafter.params, state, shape, rnd, cache,
                               jax.random.split(jax.random.key(0), 1))
  return tree.tokens[0, 1:]


@pytest.fixture(scope="module")
def gemma_target():
  return testing.tiny_gemma3()


@pytest.mark.parametrize("kind", ["layerskip", "draft", pytest.param(
    "layerskip-gemma", marks=pytest.mark.slow)])
def test_rank_statistics_match_the_drafters(target, gemma_target, kind):
  """Teacher-forced top-K == the drafter's own proposal at every root (a
  tiny Gemma 3: sliding window 8 < the 21+ context, so the teacher-forced
  pass must give its scratch window the right positions)."""
  k, length, start, roots = 4, 32, 9, 12
  if kind == "layerskip-gemma":
    target, kind = gemma_target, "layerskip"
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (length,), 0,
                                         target.config.vocab_size), np.int32)
  drafter = (layer_skip(target, (0, target.config.num_layers - 1))
             if kind == "layerskip"
             else draft_lm(truncated(target, 2)))
  s, argmax = rank_statistics.rank_statistics(target, drafter, tokens[None],
                                      np.array([start]), roots, 1.0, k)
  s0, _ = rank_statistics.rank_statistics(target, drafter, tokens[None],
                                  np.array([start]), roots, 0.0, k)
  probs = np.asarray(jax.nn.softmax(testing.full_forward(
      target, jnp.asarray(tokens[None])), -1))[0]            # [T, V]
  assert s.shape == (1, roots, k) and argmax.shape == (1, roots)
  for i in (0, 5, roots - 1):
    t = start + i
    top = drafter_top_k(drafter, target, tokens, t, k)
    # T = 1: s = p_target(x_k) at the drafter's k-th token (1e-5, f32).
    np.testing.assert_allclose(s[0, i], probs[t, top], atol=1e-5)
    # T = 0: s = 1 at the rank of the target's argmax.
    np.testing.assert_array_equal(s0[0, i], top == probs[t].argmax())
    assert argmax[0, i] == probs[t].argmax()
  assert (s0.sum(-1) <= 1).all() and (s.sum(-1) <= 1 + 1e-6).all()


def test_rank_statistics_bad_inputs(target):
  tokens, first = np.zeros((1, 16), np.int32), np.array([3])
  drafter = layer_skip(target, (0, 3))
  with pytest.raises(ValueError, match="max_rank must be in"):
    rank_statistics.rank_statistics(target, drafter, tokens, first, 4, 0.0, 0)
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    rank_statistics.rank_statistics(target, drafter, tokens, first, 4, -1.0, 4)
  with pytest.raises(ValueError, match="need a model drafter"):
    rank_statistics.rank_statistics(target, object(), tokens, first, 4, 0.0, 4)
  with pytest.raises(ValueError, match="built from this target"):
    rank_statistics.rank_statistics(truncated(target, 2), drafter, tokens,
                                    first, 4, 0.0, 4)


def test_measure_acceptance_rejects_ngram_above_t0():
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "measure_acceptance.py"),
       "--drafter=ngram", "--temperature=1", "--output=/tmp/unused.json"],
      capture_output=True, text=True, timeout=60, check=False)
  assert out.returncode == 1
  assert "error: --drafter=ngram measures greedy verification only" in (
      out.stderr)


@pytest.mark.slow
def test_measure_acceptance_ngram_cli_tiny(tmp_path):
  """The n-gram file: chain curves consistent with its own traces, which
  'auto' replays (`test_chain_auto.py` checks the replay)."""
  path = str(tmp_path / "ngram.json")
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "measure_acceptance.py"),
       "--model=tiny", "--drafter=ngram", "--categories=qa,code",
       "--per_category=1", "--max_new_tokens=16", "--max_rank=4",
       f"--output={path}"],
      capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr
  acc = acceptance_rates.load_acceptance(path)
  traces = tree_specs.chain_traces(acc)
  n = np.concatenate([t[0] for t in traces])
  a = np.concatenate([t[1] for t in traces])
  assert acc.meta["trials"] == len(n) == 32
  np.testing.assert_allclose(acc.chain, [(a >= d).mean() for d in range(1, 5)])
  assert acc.probs == acc.chain[:1]
  assert sum(acc.match_share.values()) == pytest.approx(1.0)
  for k, curve in acc.chain_by_match.items():
    np.testing.assert_allclose(curve, [(a[n == k] >= d).mean()
                                       for d in range(1, 5)])


@pytest.mark.slow
def test_measure_acceptance_cli_tiny(tmp_path):
  path = str(tmp_path / "acc.json")
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "measure_acceptance.py"),
       "--model=tiny", "--drafter=layerskip", "--layers=first:1",
       "--categories=qa", "--per_category=1", "--max_new_tokens=8",
       "--max_rank=4", f"--output={path}"],
      capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr
  acc = acceptance_rates.load_acceptance(path)
  assert len(acc.probs) == 4 and acc.meta["trials"] == 8
  assert math.isclose(sum(acc.probs) + acc.meta["reject_all"], 1.0,
                      abs_tol=1e-9)
