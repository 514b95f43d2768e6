"""Speculative decoding: greedy output equals greedy autoregressive decoding.

Oracle: the autoregressive `Generator` (itself checked against full forwards
in test_generator.py), in float64 on tiny models, where equality is exact.
Drafters are chosen to exercise acceptance, not only bonus tokens: the target
itself as draft LM (accepts everything), a perturbed copy (accepts often,
rejects sometimes), prompt lookup on a target whose continuations repeat
(`testing.cyclic_model`), and layer skip.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqdec import testing
from seqdec.decoding import drafters as drafters_lib
from seqdec.decoding import tree_specs
from seqdec.decoding import trees as trees_lib
from seqdec.decoding import verify as verify_lib
from seqdec.decoding.drafters import ngram as ngram_lib
from seqdec.decoding.loops import DecodeShapes
from seqdec.errors import ConfigError
from seqdec.generator import Generator
from seqdec.models import transformer as tr
from seqdec.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREES = ["chain1", "chain4", "kary2x2", "static6", "kary3x1x1"]
# Ragged prompts; the first two hold repeats that prompt lookup can use.
PROMPTS = [[1, 2, 3, 4, 0, 1, 2], [7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 100, 30],
           [33, 34, 200, 1]]
MAX_NEW = 20


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.byte_level()


@functools.cache
def target(kind: str, dtype: str):
  if kind == "cyclic":
    return testing.cyclic_model(dtype=dtype)
  return testing.tiny_model(dtype)


def make(name: str, model):
  """Drafter `name` for `model` (the test's target)."""
  if name == "ngram":
    return drafters_lib.make_drafter("ngram", model)
  if name == "layerskip":
    return drafters_lib.make_drafter("layerskip", model, layers="first:1")
  if name == "draft_self":
    return drafters_lib.draft_lm(model)
  if name == "draft_perturbed":
    return drafters_lib.draft_lm(testing.perturbed(model, 0.02))
  raise ValueError(name)


# Prompt lookup and layer skip on the repeating target; draft LMs on the
# context-heavy random one.
TARGET_OF = {"ngram": "cyclic", "layerskip": "cyclic", "draft_self": "tiny",
             "draft_perturbed": "tiny"}


@functools.cache
def ar_generator(kind: str, dtype: str, eos: tuple = ()):
  return Generator(target(kind, dtype), Tokenizer.byte_level(),
                   max_new_tokens=MAX_NEW, eos_ids=eos)


@functools.cache
def spec_generator(drafter_name: str, tree: str, dtype: str, eos: tuple = ()):
  model = target(TARGET_OF[drafter_name], dtype)
  return Generator(model, Tokenizer.byte_level(), max_new_tokens=MAX_NEW,
                   eos_ids=eos, drafter=make(drafter_name, model), tree=tree)


@functools.cache
def reference(kind: str, dtype: str, max_new: tuple, eos: tuple = ()):
  """Autoregressive output for PROMPTS (each row equals its solo run:
  test_generator.py)."""
  out = ar_generator(kind, dtype, eos).generate_ids(
      PROMPTS, max_new_tokens=list(max_new))
  return [r.tokens for r in out], [r.logprobs for r in out]


def run_case(drafter_name, tree, dtype="float64", rows=(0, 1, 2),
             max_new=(MAX_NEW,) * 3, eos=()):
  """Speculative output for PROMPTS[rows] checked against the reference."""
  gen = spec_generator(drafter_name, tree, dtype, eos)
  out = gen.generate_ids([PROMPTS[i] for i in rows],
                         max_new_tokens=[max_new[i] for i in rows])
  ref_tokens, ref_logp = reference(TARGET_OF[drafter_name], dtype, max_new,
                                   eos)
  tol = 1e-10 if dtype == "float64" else 1e-4
  for r, i in zip(out, rows):
    assert r.tokens == ref_tokens[i], (drafter_name, tree, r.tokens,
                                       ref_tokens[i])
    np.testing.assert_allclose(r.logprobs, ref_logp[i], atol=tol)
  return out


# One tree per drafter in the default tier, as a ragged batch of 3. The full
# drafter x tree x batch {1, 3} matrix (rows equal their solo runs) is in
# the slow tier (tests/TIERS.md); AR rows equal their solo runs in the
# default tier (test_generator.py). CI time: draft_self and the solo runs
# are slow-tier only.
# Default tier: a tree through the model-free drafter and a rejecting chain;
# layer-skip (the target's own caches) is the first slow case.
DEFAULT_CASES = [("ngram", "kary3x1x1"),
                 pytest.param("layerskip", "kary2x2", marks=pytest.mark.slow),
                 ("draft_perturbed", "chain4")]
REJECTING_CASE = ("draft_perturbed", "chain4")   # rejects some drafts


@pytest.mark.parametrize("drafter_name,tree", DEFAULT_CASES)
def test_greedy_speculative_equals_autoregressive_float64(x64, drafter_name,
                                                          tree):
  batch = run_case(drafter_name, tree)     # batch of 3, ragged
  # (each row == that prompt alone: the slow matrix, every drafter x tree)
  mean_acc = np.mean([r.metrics["mean_accepted"] for r in batch])
  if drafter_name != "layerskip" and tree != "chain1":
    assert mean_acc >= 1.0, mean_acc       # acceptance, not only bonus tokens
  if (drafter_name, tree) == REJECTING_CASE:
    assert mean_acc < 3.0, mean_acc        # and rejections (chain4: <= 4)


@pytest.mark.slow
@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("drafter_name", sorted(TARGET_OF))
def test_greedy_speculative_matrix_float64(x64, drafter_name, tree):
  run_case(drafter_name, tree)
  for i in range(len(PROMPTS)):
    run_case(drafter_name, tree, rows=(i,))


def test_gate_switches_inside_a_run_and_keeps_greedy_output(x64):
  """Speculate only when it pays (`SpecLoop.gate`): rounds whose drafts the
  drafter expects to accept fewer than `gate` of verify the root alone.
  The draft LM proposes every round, so a round without a draft is a gated
  one: the gate switches inside each row's run (some rounds drafted, some
  not; gate 0.8 lies inside the rounds' expected accepted drafts on these
  prompts) and the output equals autoregressive decoding exactly
  (float64)."""
  drafter_name, tree, gate = "draft_perturbed", "kary2x2", 0.8
  model = target(TARGET_OF[drafter_name], "float64")
  gen = Generator(model, Tokenizer.byte_level(), max_new_tokens=MAX_NEW,
                  eos_ids=(), drafter=make(drafter_name, model), tree=tree,
                  gate=gate)
  assert gen.spec.gate == gate and gen.loop(gen_shapes()).gate == gate
  out = gen.generate_ids(PROMPTS)
  ref_tokens, ref_logp = reference(TARGET_OF[drafter_name], "float64",
                                   (MAX_NEW,) * 3)
  for r, want, logp in zip(out, ref_tokens, ref_logp):
    assert r.tokens == want
    np.testing.assert_allclose(r.logprobs, logp, atol=1e-10)
  drafted = [r.metrics["drafted_rounds"] for r in out]
  calls = [r.metrics["target_calls"] - 1 for r in out]   # rounds
  print(drafter_name, tree, "gate", gate, "drafted rounds", drafted, "of",
        calls)
  assert all(0 < d < c for d, c in zip(drafted, calls)), (drafted, calls)
  assert np.mean([r.metrics["mean_accepted"] for r in out]) > 0.3


@pytest.mark.parametrize("drafter_name,tree,gate", [
    ("draft_perturbed", "kary2x2", 0.8),
    pytest.param("ngram", "chain4", 0.0, marks=pytest.mark.slow)])
def test_compiled_loop_equals_the_host_loop_round_by_round(
    x64, drafter_name, tree, gate):
  """The compiled decode runs root-only and whole-tree rounds in nested
  loops (`SpecLoop.decode`); the host loop (streaming) runs `step`, whose
  forward is chosen by a `lax.cond`. One row at a time, so that rounds
  with no draft node are whole-batch ones: both give the same tokens,
  log-probabilities, margins and round records, and both kinds of round
  ran."""
  model = target(TARGET_OF[drafter_name], "float64")
  gen = Generator(model, Tokenizer.byte_level(), max_new_tokens=MAX_NEW,
                  eos_ids=(), drafter=make(drafter_name, model), tree=tree,
                  gate=gate, max_batch=1)
  root_only = tree_rounds = 0
  for prompt in PROMPTS:
    [compiled] = gen.generate_ids([prompt])
    [host] = gen.generate_ids([prompt], stream=lambda row, text: None)
    assert compiled.tokens == host.tokens
    np.testing.assert_allclose(compiled.logprobs, host.logprobs, atol=1e-10)
    np.testing.assert_allclose(compiled.margins, host.margins, atol=1e-10)
    for key in ("target_calls", "drafted_rounds", "mean_accepted"):
      assert compiled.metrics[key] == host.metrics[key], key
    rounds = compiled.metrics["target_calls"] - 1
    root_only += rounds - compiled.metrics["drafted_rounds"]
    tree_rounds += compiled.metrics["drafted_rounds"]
  assert root_only > 0 and tree_rounds > 0, (root_only, tree_rounds)


def gen_shapes():
  return DecodeShapes.for_batch(len(PROMPTS), max(map(len, PROMPTS)),
                                MAX_NEW, 1)


def test_rows_accept_different_lengths_and_stop_inside_a_path(x64):
  """EOS and max_new_tokens landing inside an accepted path; per-row budgets.

  The target drafting for itself accepts every draft (rounds of 5 tokens with
  chain4), so stops at other offsets fall inside accepted paths.
  """
  ref_tokens, _ = reference(TARGET_OF["draft_self"], "float64",
                            (MAX_NEW,) * 3)
  eos = (ref_tokens[0][8],)               # mid-path for row 0
  budgets = (MAX_NEW, 8, 13)              # rows 1, 2 end mid-path
  out = run_case("draft_self", "chain4", max_new=budgets, eos=eos)
  assert out[0].finish_reason == "stop" and out[0].tokens[-1] == eos[0]
  assert len(out[0].tokens) == ref_tokens[0].index(eos[0]) + 1
  for r, budget in zip(out[1:], budgets[1:]):
    assert len(r.tokens) <= budget
  lengths = {r.metrics["target_calls"] for r in out}
  assert len(lengths) > 1                 # rows finished at their own pace


@pytest.mark.slow
def test_float32_spec_equals_autoregressive_on_the_tiny_model(tok):
  """Float32: equal tokens (margins of the tiny model are far above 1e-4).

  Slow tier: the default tier has float32 spec == AR tokens in
  test_spec_config.py::test_results_carry_top2_margins."""
  run_case("draft_perturbed", "kary2x2", dtype="float32")


# n-gram in the default tier (data-dependent matches, invalid nodes); the
# model drafters share one code path (ModelDrafter), in the slow tier.
@pytest.mark.parametrize("name,spec", [
    ("ngram", "static10"),
    pytest.param("layerskip", "kary2x2", marks=pytest.mark.slow),
    pytest.param("draft_self", "chain3", marks=pytest.mark.slow)])
def test_trees_built_in_jit_pass_the_host_validator(name, spec):
  # n-gram proposals depend on `tokens` only; model drafters on the float32
  # tiny model that other tests compile for anyway.
  model = target("tiny", "float32")
  rnd = drafters_lib.Round(root=jnp.array([3, 4]), prev=jnp.array([2, 3]),
                           length=jnp.array([6, 4]),
                           live=jnp.array([True, True]))
  tokens = jnp.array([[1, 2, 3, 4, 0, 2, 0, 0], [7, 8, 9, 7, 8, 3, 0, 0]])
  prompt_len = jnp.array([6, 4])
  cache = model.init_cache(2, 48)
  fwd = testing.jitted(model)
  _, cache = fwd(tokens, jnp.broadcast_to(jnp.arange(8), (2, 8)), cache)
  cache = testing.commit(cache, prompt_len)
  drafter = make(name, model)
  shape = tree_specs.parse(spec)

  @jax.jit
  def propose(params, cache):
    state = drafter.init(params, tokens, prompt_len, rnd.root, 40, cache)
    return drafter.propose(params, state, shape, rnd, cache,
                           jax.random.key(0))[0]
  tree = propose(drafter.params, cache)
  tree.check()
  assert tree.tokens.shape == (2, shape.num_nodes)
  np.testing.assert_array_equal(tree.tokens[:, 0], rnd.root)


def test_ngram_matches_equal_a_python_search():
  rng = np.random.default_rng(0)
  for trial in range(20):
    h = rng.integers(0, 3, size=(2, 24))
    n_h = rng.integers(2, 25, size=2)
    hist = ngram_lib.History.start(jnp.asarray(h, jnp.int32),
                                   jnp.asarray(n_h, jnp.int32), 3)
    end, found, _ = ngram_lib.find_matches(hist, 3, 1, 4)
    for b in range(2):
      longest = {}   # match end j -> longest matching n (each j once)
      for n in range(1, 4):
        suffix = list(h[b, n_h[b] - n:n_h[b]])
        for j in range(n - 1, n_h[b] - 1):
          if n_h[b] >= n and list(h[b, j - n + 1:j + 1]) == suffix:
            longest[j] = n
      best = sorted(((n, j) for j, n in longest.items()), reverse=True)[:4]
      got = [int(e) for e, f in zip(end[b], found[b]) if f]
      assert got == [j for _, j in best], (trial, b, got, best)


def test_greedy_rule_equals_brute_force_on_every_small_tree():
  """Accepted path = the deepest node whose every token equals its parent's
  argmax, for all 24 five-node trees and random tokens/logits."""
  rng = np.random.default_rng(1)
  rule = verify_lib.Greedy()
  for shape in trees_lib.all_shapes_up_to(5):
    if (np.diff(shape.depth) < 0).any():
      continue
    logits = rng.normal(size=(3, 5, 4))
    tokens = rng.integers(0, 4, size=(3, 5))
    valid = rng.random((3, 5)) > 0.1
    tree = trees_lib.Tree.from_shape(shape, jnp.asarray(tokens),
                                     valid=jnp.asarray(valid))
    acc = rule(tree, jnp.asarray(logits, jnp.float32), max_depth=shape.max_depth)
    y = logits.argmax(-1)
    for b in range(3):
      ok = [True] + [bool(valid[b, i] and tokens[b, i] == y[b, shape.parents[i]])
                     for i in range(1, 5)]
      anc = testing.ancestor_mask_oracle(shape.parents)
      good = [i for i in range(5) if all(ok[j] for j in range(5) if anc[i, j])]
      best = max(good, key=lambda i: (shape.depth[i], -i))
      path = [j for j in range(5) if anc[best, j]]
      d = len(path) - 1
      assert int(acc.num_accepted[b]) == d
      assert list(np.asarray(acc.path[b, :d + 1])) == path
      assert list(np.asarray(acc.tokens[b, :d + 1])) == [y[b, j] for j in path]


def test_bad_input_gets_clear_errors(tok):
  model = target("tiny", "float32")
  with pytest.raises(trees_lib.TreeError, match="no parent path"):
    trees_lib.from_paths([(0,), (1, 0), (0, 0, 0)])
  with pytest.raises(trees_lib.TreeError, match="listed after it"):
    trees_lib.TreeShape((-1, 2, 0), (0, 0, 0))
  with pytest.raises(trees_lib.TreeError, match="unknown tree spec"):
    tree_specs.parse("bush7")
  with pytest.raises(trees_lib.TreeError, match="level by level"):
    Generator(model, tok, drafter=make("ngram", model),
              tree=trees_lib.TreeShape((-1, 0, 1, 0), (0, 0, 0, 1)))
  other = nnx.eval_shape(lambda: tr.Transformer(     # no weights needed
      model.config.replace(vocab_size=300), rngs=nnx.Rngs(0)))
  with pytest.raises(drafters_lib.DrafterError, match="vocabulary"):
    Generator(model, tok, drafter=drafters_lib.draft_lm(other), tree="chain2")
  with pytest.raises(drafters_lib.DrafterError, match="unknown drafter"):
    drafters_lib.make_drafter("medusa9", model)
  with pytest.raises(drafters_lib.DrafterError, match="outside"):
    drafters_lib.make_drafter("layerskip", model, layers="skip:1-9")
  gen = Generator(model, tok, max_new_tokens=12, eos_ids=(), drafter="ngram",
                  tree="chain4")
  ctx = model.config.max_position_embeddings
  long_prompt = [5] * (ctx - 12)          # fits autoregressively, not the tree
  with pytest.raises(trees_lib.TreeError, match="beyond the context"):
    gen.generate_ids([long_prompt])
  greedy = Generator(model, tok, max_new_tokens=12, eos_ids=(),
                     drafter="ngram", tree="chain4", rule="greedy")
  with pytest.raises(ConfigError, match="temperature 0 only"):
    greedy.generate_ids([[1, 2, 3]], temperature=0.7)


@pytest.mark.slow
@pytest.mark.realmodel
def test_smollm2_speculative_equals_autoregressive(smollm2_model):
  """SmolLM2 in float32: n-gram, layer-skip and the shipped EAGLE drafter
  (dynamic tree, alone and with a merged prompt-lookup chain) give greedy autoregressive decoding's output up to the
  first position whose AR top-1/top-2 margin is <= 1e-4
  (such positions are counted and reported, never asserted on)."""
  model, tok = smollm2_model    # conftest: loaded once per session
  from seqdec import config_utils  # pylint: disable=g-import-not-at-top
  copying = config_utils.load_config(os.path.join(
      ROOT, "configs", "spec_decode.py")).default_prompt  # the demo's task
  convs = [[{"role": "user", "content": copying}],
           [{"role": "user", "content": "Name three primary colors."}],
           [{"role": "user", "content": "Rewrite in the passive voice: The "
                                        "dog chased the ball across the "
                                        "yard."}]]
  ar = Generator(model, tok, max_new_tokens=32, eos_ids=())
  ref = ar.generate(convs)
  # One case per kind of drafting on real weights: model-free (n-gram), the
  # target's own layers (layer-skip; the draft LM shares its code), and the
  # shipped EAGLE drafter (seqdec/checkpoints/shipped) with a dynamic tree.
  # Every drafter x tree pair runs on the tiny model in float64, exactly
  # (CI time: each SmolLM2 case compiles its own programs, ~40 s).
  cases = [("ngram", {}, "chain4"), ("layerskip", {"layers": "skip:8-23"},
                                     "kary2x2"),
           ("eagle", {}, "dyn16d4k4"),
           # The shipped configuration: a prompt-lookup chain merged in.
           ("eagle", {"lookup": 4}, "dyn6d3k2")]
  small = 0
  for name, opts, tree in cases:
    gen = Generator(model, tok, max_new_tokens=32, eos_ids=(), drafter=name,
                    drafter_options=opts, tree=tree)
    out = gen.generate(convs)
    for r, a, conv in zip(out, ref, convs):
      if r.tokens == a.tokens:
        continue
      i = next(k for k, (x, y) in enumerate(zip(r.tokens, a.tokens)) if x != y)
      seq = jnp.asarray([gen.encode(conv) + a.tokens[:i]])
      logits = np.sort(np.asarray(testing.full_forward(model, seq)[0, -1]))
      margin = logits[-1] - logits[-2]
      assert margin <= 1e-4, (name, tree, i, margin)
      small += 1
    taus = [r.metrics["tau"] for r in out]
    print(f"{name} {tree}: tau {np.round(taus, 2)}")
    if name == "ngram":
      assert taus[0] > 1.5   # the rewrite prompt is accepted in runs
    if name == "eagle":      # the shipped drafter is accepted (its tau on
      assert np.mean(taus) > 1.05, taus  # the bench: benchmarks/results)
    if opts.get("lookup"):   # and the chain copies the rewrite
      assert taus[0] > 1.5, taus
  print(f"SmolLM2: divergences at top-2 margin <= 1e-4: {small}")
