"""A prompt-lookup chain merged into a drafter's tree (`drafters.lookup`):
the merged tree holds every path of the base tree and of the chain exactly
once, the grammar builds it and refuses what cannot be merged, and through
the engine it keeps the target's law (the float64 spec == AR case with a
trained EAGLE drafter is in test_eagle.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqdec import testing
from seqdec.decoding import drafters as drafters_lib
from seqdec.decoding import spec as spec_lib
from seqdec.decoding.drafters.lookup import merge_chain
from seqdec.decoding.trees import DynamicTree, Tree, WithLookup, chain
from seqdec.errors import ConfigError, TreeError
from seqdec.generator import Generator
from seqdec.models import eagle
from seqdec.tokenizer import Tokenizer

V = 4   # a small vocabulary: chains often run along the base tree
TEMPERATURE = 4.0


def random_trees(rng, rows: int, n: int):
  """`[rows, n]` (tokens, parents, valid) of random trees whose valid
  siblings hold distinct tokens (a node's children draw without
  replacement from V tokens; a node with V children takes no more)."""
  tokens = np.zeros((rows, n), np.int32)
  parents = np.full((rows, n), -1, np.int32)
  valid = np.ones((rows, n), bool)
  for b in range(rows):
    tokens[b, 0] = rng.integers(V)
    used = {0: set()}
    for i in range(1, n):
      free = [p for p in range(i) if len(used[p]) < V]
      p = int(rng.choice(free))
      t = int(rng.choice(sorted(set(range(V)) - used[p])))
      used[p].add(t)
      used[i] = set()
      tokens[b, i], parents[b, i] = t, p
      # An invalid node (and so its subtree) now and then; its token stays
      # taken, as an n-gram miss's slot does.
      valid[b, i] = valid[b, p] and rng.random() > 0.15
  return tokens, parents, valid


def valid_paths(tokens, parents, valid):
  """The token paths (below the root) of a row's valid nodes, as a list
  (duplicates kept)."""
  paths = {0: ()}
  out = []
  for i in range(1, len(tokens)):
    paths[i] = paths[int(parents[i])] + (int(tokens[i]),)
    if valid[i]:
      out.append(paths[i])
  return out


def test_a_merged_tree_holds_every_path_once():
  """Per row: the base tree's slots are unchanged; the merged tree is a
  tree (parents before children, depth within max(D_b, L)); its valid
  paths are exactly the base tree's and the chain's valid prefixes, each
  once; the chain's new nodes fill the slots after the base tree."""
  rng = np.random.default_rng(0)
  rows, n, length = 300, 7, 4
  tokens, parents, valid = random_trees(rng, rows, n)
  base = Tree.from_parents(jnp.asarray(tokens), jnp.asarray(parents),
                           valid=jnp.asarray(valid))
  # Chains: half run along a path of the base tree for a while.
  chains = rng.integers(0, V, (rows, length)).astype(np.int32)
  for b in range(0, rows, 2):
    node, j = 0, 0
    while j < length:
      kids = [i for i in range(n) if parents[b, i] == node and valid[b, i]]
      if not kids:
        break
      node = int(rng.choice(kids))
      chains[b, j] = tokens[b, node]
      j += 1
  found = rng.integers(0, length + 1, rows)          # valid chain prefix
  chain_valid = np.arange(length)[None] < found[:, None]
  merged = jax.jit(merge_chain)(base, jnp.asarray(chains),
                                jnp.asarray(chain_valid))
  merged.check()
  merged = jax.tree.map(np.asarray, merged)
  np.testing.assert_array_equal(merged.tokens[:, :n], tokens)
  np.testing.assert_array_equal(merged.parents[:, :n], parents)
  np.testing.assert_array_equal(merged.valid[:, :n], valid)
  assert merged.depth.max() <= max(base.depth.max(), length)
  shared = 0
  for b in range(rows):
    got = valid_paths(merged.tokens[b], merged.parents[b], merged.valid[b])
    assert len(got) == len(set(got)), f"row {b}: a path twice"
    want = set(valid_paths(tokens[b], parents[b], valid[b]))
    prefixes = {tuple(chains[b, :j]) for j in range(1, found[b] + 1)}
    assert set(got) == want | prefixes, b
    new = merged.valid[b, n:]
    assert not (new[1:] & ~new[:-1]).any(), "new chain nodes are a prefix"
    assert new.sum() == len(prefixes - want)
    shared += len(prefixes & want)
  assert shared > rows // 2       # chains did run along the base trees


def test_the_grammar_builds_a_merged_tree_and_refuses_what_cannot_merge():
  """`eagle@lookup=L/<tree>`: the verified tree is `WithLookup`, N_b + L
  slots and depth max(D_b, L), round-tripping as a string; refusals name
  the problem: a negative chain, drawn children (proposal iid), a drafter
  without the option, a drafter that caches its own tree nodes."""
  s = spec_lib.SpecConfig.parse("eagle@lookup=6@stop=0.5/dyn8d3k2")
  assert spec_lib.SpecConfig.parse(str(s)) == s
  shape = spec_lib.build_tree(s)
  assert shape == WithLookup(DynamicTree(8, 3, 2, stop=0.5), 6)
  assert (shape.num_nodes, shape.max_depth, shape.verify_widths) == (
      14, 6, (8,))
  with pytest.raises(ConfigError, match="lookup"):
    spec_lib.SpecConfig.parse("eagle@lookup=-1/dyn8d3k2")
  with pytest.raises(ConfigError, match="proposal='topk'"):
    spec_lib.SpecConfig.parse("eagle@lookup=4@proposal=iid/kary2x2")
  with pytest.raises(ConfigError, match="unknown option 'lookup'"):
    spec_lib.SpecConfig.parse("ngram@lookup=4/chain4")
  with pytest.raises(TreeError, match="one prompt-lookup chain"):
    WithLookup(shape, 2)
  target = testing.tiny_model()
  with pytest.raises(drafters_lib.DrafterError, match="caches its own"):
    drafters_lib.WithLookupChain(
        drafters_lib.make_drafter("layerskip", target, layers="first:1"), 4)
  net = eagle.create(target.config, seed=0)
  wor = drafters_lib.make_drafter("eagle", target, eagle_net=net,
                                  proposal="wor")
  with pytest.raises(drafters_lib.DrafterError, match="deterministic"):
    drafters_lib.WithLookupChain(wor, 4)


@pytest.mark.slow
def test_sampling_rounds_at_each_verify_width_equal_the_host_loop():
  """T=4 with a merged chain: the compiled loop runs each verify width in
  its own nested loop (the rule sees the tree cut to that width), the host
  loop chooses the width with a `lax.switch` (the whole tree, zero logits
  past the width); both verify at both widths and emit the same tokens."""
  from seqdec.decoding.loops import (DECODE, PREFILL, DecodeShapes,  # pylint: disable=g-import-not-at-top
                                     HostLoop, Inputs)
  from seqdec.decoding.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  model = testing.cyclic_model()
  base = drafters_lib.make_drafter(
      "eagle", model, eagle_net=eagle.create(model.config, seed=0))
  gen = Generator(model, Tokenizer.byte_level(),
                  drafter=drafters_lib.WithLookupChain(base, 3, min_ngram=1),
                  tree="dyn4d2k2", max_new_tokens=12, eos_ids=(),
                  temperature=TEMPERATURE, max_batch=4)
  prompts = [[10, 11, 12, 13, 14] * 2, [20, 21, 22, 20, 21],
             [5, 6, 7, 8, 5, 6], [30, 31, 32, 33]]
  shapes = DecodeShapes.for_batch(4, 10, 12, 1)
  loop = gen.loop(shapes, [TEMPERATURE] * 4)
  assert len(loop.verify_widths) > 1, loop.verify_widths
  inputs = Inputs.make(shapes, prompts, [12] * 4, [-1],
                       SamplingParams.make(4, temperature=TEMPERATURE),
                       seed=3)
  compiled = DECODE(loop, params=gen.loop_params, inputs=inputs,
                    state=PREFILL(loop, params=gen.loop_params,
                                  inputs=inputs))
  host = HostLoop(loop).run(params=gen.loop_params, inputs=inputs)
  for state in (compiled, host):
    assert (np.asarray(state.width_rounds) > 0).all(), state.width_rounds
  np.testing.assert_array_equal(np.asarray(compiled.tokens)[:, :12],
                                np.asarray(host.tokens)[:, :12])
  np.testing.assert_array_equal(np.asarray(compiled.accept_hist),
                                np.asarray(host.accept_hist))


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["sample", "typical_lossy"])
def test_a_merged_chain_keeps_the_target_law(rule):
  """T=4, lossless rule: the joint law of the first two tokens over 4096
  rows equals the target's (χ²) when an (untrained) EAGLE drafter's
  dynamic tree has a prompt-lookup chain merged in. The target's text
  repeats (`testing.cyclic_model`, whose successor token has ~65% of the
  mass at this temperature) and so does the prompt, so the chain often
  offers the sampled x1's likely successor beside the drafter's children.
  The negative control: typical acceptance (lossy) on the same trees
  fails the test."""
  from test_spec_sampling import (BATCH, P_MIN, ROWS,  # pylint: disable=g-import-not-at-top
                                  first_pair_chi2)
  model = testing.cyclic_model()
  base = drafters_lib.make_drafter(
      "eagle", model, eagle_net=eagle.create(model.config, seed=0))
  prompt = [10, 11, 12, 13, 14] * 2
  kw = dict(max_new_tokens=3, eos_ids=(), tree="dyn4d2k2", rule=rule,
            temperature=TEMPERATURE, max_batch=BATCH)
  gen = Generator(model, Tokenizer.byte_level(),
                  drafter=drafters_lib.WithLookupChain(base, 3, min_ngram=1),
                  **kw)
  results = gen.generate_ids([prompt] * ROWS, seed=11)
  stat, pvalue, dof = first_pair_chi2(model, prompt, results, TEMPERATURE)
  plain = Generator(model, Tokenizer.byte_level(), drafter=base,
                    **kw).generate_ids([prompt] * BATCH, seed=11)
  mean = lambda rs: np.mean([r.metrics["mean_accepted"] for r in rs])  # noqa: E731
  print(f"chi2 {stat:.1f} dof {dof} p {pvalue:.3g}; accepted drafts per "
        f"round {mean(results):.2f} (without the chain {mean(plain):.2f})")
  assert mean(results) > mean(plain) + 0.2, "the chain must be accepted"
  if rule == "typical_lossy":
    assert pvalue < 1e-6
  else:
    assert pvalue > P_MIN, (stat, dof)
