"""ReDrafter: beam trees are the beam search's final beams merged into a
prefix tree (against a brute-force search); the recurrent head learns on a
tiny target's continuations; it decodes losslessly through the engine with
beam, static and dynamic trees (f64), samples the target's law at T=1
(χ²), and round-trips through a checkpoint of its own kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqdec import testing
from seqdec.checkpoints import drafters as drafter_ckpt
from seqdec.decoding import drafters as drafters_lib
from seqdec.decoding import tree_specs
from seqdec.decoding.drafters.dynamic import grow_beam_tree
from seqdec.decoding.trees import BeamTree
from seqdec.errors import TreeError
from seqdec.generator import Generator
from seqdec.kernels.tree_mask import validate_parents
from seqdec.models import redrafter
from seqdec.tokenizer import Tokenizer

from test_dynamic_trees import table
from test_eagle import assert_same_as_ar, continuations
from test_medusa import train_heads

V = 12


def logsoftmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def beam_search(budget, root, logit_table):
  """The W best token paths of length D below `root` by summed log q, a
  node's law depending on its token and depth (`table`), by exhaustive
  beam search in numpy: the W best of every beam's every child."""
  beams = [((), 0.0)]
  for d in range(budget.max_depth):
    cands = []
    for path, s in beams:
      last = path[-1] if path else root
      lq = logsoftmax(logit_table[d][last])
      cands += [(path + (t,), s + lq[t]) for t in range(V)]
    beams = sorted(cands, key=lambda c: -c[1])[:budget.width]
  return beams


def grow(budget, roots, logit_table):
  def expand(d, tokens, parent_pos, carry):
    return jnp.asarray(logit_table[d])[tokens], carry
  fn = jax.jit(lambda r, l: grow_beam_tree(budget, r, l, expand, 0))
  tree, _ = fn(jnp.asarray(roots), jnp.asarray(logit_table[0][roots]))
  return jax.tree.map(np.asarray, tree)


def paths_of(tree, b):
  """Root-to-node token paths of row b's valid nodes (root excluded)."""
  out = {}
  for i in range(1, tree.tokens.shape[1]):
    if not tree.valid[b, i]:
      continue
    path, j = [], i
    while j > 0:
      assert tree.valid[b, j], "an invalid node on a valid node's path"
      path.append(int(tree.tokens[b, j]))
      j = int(tree.parents[b, j])
    out[tuple(reversed(path))] = float(tree.path_logq[b, i])
  return out


@pytest.mark.parametrize("budget", [
    BeamTree(3, 3), pytest.param(BeamTree(4, 2), marks=pytest.mark.slow)])
def test_beam_tree_is_the_beam_search_merged(budget):
  """Per row: valid slots = every prefix of the W final beams, each once
  (shared prefixes shared), scored by its path log-probability; the final
  beams are the brute-force search's; level order; a batch equals its
  rows alone."""
  logit_table = table(1)
  roots = np.array([3, 7, 0, 11])
  tree = grow(budget, roots, logit_table)
  assert tree.tokens.shape == (4, budget.num_nodes)
  validate_parents(tree.parents, forest=False)
  assert (np.diff(tree.depth, axis=1) >= 0).all()
  assert (tree.depth <= budget.max_depth).all()
  for b, root in enumerate(roots):
    want = beam_search(budget, root, logit_table)
    prefixes = {p[:d] for p, _ in want for d in range(1, budget.max_depth + 1)}
    got = paths_of(tree, b)
    assert set(got) == prefixes
    assert int(tree.valid[b].sum()) - 1 == len(prefixes)
    for path, score in want:
      assert got[path] == pytest.approx(score, abs=1e-5)
    # ReDrafter's merge shares prefixes: fewer nodes than W * D when
    # beams share their first tokens.
    assert len(prefixes) <= budget.width * budget.max_depth
  for b in range(len(roots)):
    alone = grow(budget, roots[b:b + 1], logit_table)
    for f in ("tokens", "parents", "valid"):
      np.testing.assert_array_equal(getattr(alone, f)[0],
                                    getattr(tree, f)[b])


def test_beam_spec_round_trip_and_refusals():
  shape = tree_specs.parse("beam4x3")
  assert shape == BeamTree(4, 3) and shape.num_nodes == 13
  assert tree_specs.to_spec(shape) == "beam4x3"
  with pytest.raises(TreeError, match="width >= 1"):
    tree_specs.parse("beam0x3")
  with pytest.raises(TreeError, match="bad beam tree spec"):
    tree_specs.parse("beam4")
  target = testing.tiny_model()
  ngram = drafters_lib.make_drafter("ngram", target)
  with pytest.raises(drafters_lib.DrafterError, match="beam tree budget"):
    Generator(target, Tokenizer.byte_level(), drafter=ngram, tree="beam2x2")


@pytest.fixture(scope="module")
def trained(no_compile_cache_module):  # pylint: disable=unused-argument
  target = testing.tiny_model()
  tokens = continuations(target)
  head, history = train_heads(target, tokens, own_heads=False,
                              kind="redrafter")
  return target, head, history, tokens


def test_the_recurrent_head_learns(trained):
  """Every trained step's CE falls by a fifth, and step 2 (which reads two
  drafted tokens through the RNN) ends at 3x its initial top-1 agreement."""
  history = trained[2]
  first, last = history[0], history[-1]
  print({k: (round(first[k], 3), round(last[k], 3))
         for k in ("ce1", "ce2", "ce3", "top1_1", "top1_2", "top1_3")})
  for k in (1, 2, 3):
    assert last[f"ce{k}"] < 0.8 * first[f"ce{k}"]
  assert last["top1_2"] > max(0.1, 3 * first["top1_2"])


def as_float64(target32, head32):
  target = testing.tiny_model("float64")
  hdef = nnx.graphdef(nnx.eval_shape(lambda: redrafter.ReDrafterHead(
      redrafter.redrafter_config(target, head32.config.num_layers,
                                 head32.config.train_depth), rngs=None)))
  return target, nnx.merge(hdef, jax.tree.map(
      lambda x: jnp.asarray(x, jnp.float64), nnx.state(head32)))


@pytest.mark.parametrize("tree", [
    "beam3x3",
    pytest.param("kary2x2x1", marks=pytest.mark.slow),
    pytest.param("dyn8d3k2", marks=pytest.mark.slow),
    pytest.param("chain5", marks=pytest.mark.slow)])   # deeper than trained
def test_redrafter_equals_autoregressive_float64(x64, trained, tree):
  """Greedy speculative decoding with the trained recurrent head equals
  greedy autoregressive decoding exactly (float64), rows of different
  lengths, drafts accepted and rejected."""
  target, head = as_float64(*trained[:2])
  tokens = trained[3]
  prompts = [tokens[0, :6].tolist(), tokens[1, :9].tolist(), [5, 17, 99]]
  tok = Tokenizer.byte_level()
  ar = Generator(target, tok, max_new_tokens=24, eos_ids=()).generate_ids(
      prompts)
  drafter = drafters_lib.make_drafter("redrafter", target, eagle_net=head)
  spec = Generator(target, tok, max_new_tokens=24, eos_ids=(),
                   drafter=drafter, tree=tree).generate_ids(prompts)
  assert_same_as_ar(ar, spec)
  accepted = [r.metrics["mean_accepted"] for r in spec]
  print(f"{tree}: accepted drafts per round {accepted}")
  assert 0.5 < np.mean(accepted[:2])


@pytest.mark.slow
def test_beam_tree_sampling_keeps_the_target_law(trained):
  """T=1 with a beam tree (deterministic children, the lossless rule's
  deterministic step): the joint law of the first two tokens over 4096
  rows equals the target's (χ²)."""
  from test_spec_sampling import (BATCH, P_MIN, ROWS,  # pylint: disable=g-import-not-at-top
                                  first_pair_chi2)
  target, head, _, tokens = trained
  prompt = tokens[0, :6].tolist()
  drafter = drafters_lib.make_drafter("redrafter", target, eagle_net=head)
  gen = Generator(target, Tokenizer.byte_level(), max_new_tokens=3,
                  eos_ids=(), drafter=drafter, tree="beam2x2",
                  rule="sample", temperature=1.0, max_batch=BATCH)
  results = gen.generate_ids([prompt] * ROWS, seed=5)
  stat, pvalue, dof = first_pair_chi2(target, prompt, results)
  accepted = np.mean([r.metrics["mean_accepted"] for r in results])
  print(f"chi2 {stat:.1f} dof {dof} p {pvalue:.3g}, accepted {accepted:.2f}")
  assert accepted > 0.1, "the test must exercise acceptance"
  assert pvalue > P_MIN


@pytest.mark.slow
def test_checkpoint_round_trip_by_kind(tmp_path, trained):
  """A 'redrafter' checkpoint restores bit for bit, decodes through its
  spec string as autoregressive decoding (f32 greedy) with its trimmed
  head and with `trim=false`, and an 'eagle' spec refuses it."""
  target, head, _, tokens = trained
  keep = np.arange(0, target.config.vocab_size, 2)
  path = drafter_ckpt.save(str(tmp_path / "r"), head, target,
                           dtype="float32", keep_ids=keep)
  back, ids = drafter_ckpt.load(path, target)
  np.testing.assert_array_equal(ids, keep)
  assert isinstance(back, redrafter.ReDrafterHead)
  for a, b in zip(jax.tree.leaves(nnx.state(head)),
                  jax.tree.leaves(nnx.state(back))):
    np.testing.assert_array_equal(a, b)
  tok = Tokenizer.byte_level()
  prompts = [tokens[0, :6].tolist(), [5, 17, 99]]
  ar = Generator(target, tok, max_new_tokens=12, eos_ids=()).generate_ids(
      prompts)
  spec = Generator(target, tok, f"redrafter@checkpoint={path}/beam2x3",
                   max_new_tokens=12, eos_ids=()).generate_ids(prompts)
  assert [r.tokens for r in spec] == [r.tokens for r in ar]
  full = Generator(target, tok, f"redrafter@checkpoint={path}@trim=false/"
                   f"beam2x3", max_new_tokens=12, eos_ids=())
  assert full.drafter.params[2] is None          # the whole vocabulary
  assert [r.tokens for r in full.generate_ids(prompts)] == [
      r.tokens for r in ar]
  with pytest.raises(drafter_ckpt.DrafterCheckpointError,
                     match="holds a redrafter drafter, not eagle"):
    Generator(target, tok, f"eagle@checkpoint={path}/chain2")
