"""One spec, one grammar: `SpecConfig` parsing, the config block, the rule
resolution shared by every entry point, and the bugs issue 13 fixed."""

import os

import numpy as np
import pytest

from seqdec import config_utils
from seqdec import testing
from seqdec.decoding import spec as spec_lib
from seqdec.decoding import verify
from seqdec.decoding.loops import DecodeShapes
from seqdec.decoding.spec import SpecConfig
from seqdec.errors import ConfigError, TreeError
from seqdec.generator import Generator
from seqdec.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC_CONFIG = os.path.join(ROOT, "configs", "spec_decode.py")


@pytest.mark.parametrize("method", [
    "ar", "ngram/chain4", "ngram@min_ngram=2/chain4",
    "layerskip@layers=skip:4-15@proposal=wor/kary2x1",
    "draft@draft_layers=10@rule=typical_lossy/static6",
    "eagle@gate=1.25/dyn16d4k4",
    "layerskip@layers=first:1/sequoia16:configs/acceptance/"
    "smollm2_layerskip-skip4-15_t0.json",
])
def test_method_strings_round_trip(method):
  spec = SpecConfig.parse(method)
  assert SpecConfig.parse(str(spec)) == spec
  assert str(spec) == method


def test_a_gate_of_any_precision_round_trips():
  """The host's break-even (`gate=auto`) has many digits: the method string
  and the config block keep them all."""
  spec = SpecConfig.parse("ngram/chain4").replace(gate=1.3812345678)
  assert SpecConfig.parse(str(spec)) == spec
  assert SpecConfig.from_config(spec.to_config()) == spec


def test_parse_types_options_and_applies_defaults():
  spec = SpecConfig.parse("ngram@max_ngram=4/chain2")
  assert spec.option("max_ngram") == 4 and spec.option("min_ngram") == 1
  # Defaults (the bench's --layers) fill what the string does not set, and
  # are ignored by drafters that lack the option.
  assert SpecConfig.parse("layerskip/chain2", layers="skip:1-2",
                          draft_layers=3).option("layers") == "skip:1-2"
  assert SpecConfig.parse("ngram/chain2", layers="skip:1-2").options == ()
  # Options equal to their default are not kept: one spec, one name.
  assert SpecConfig.parse("ngram@max_ngram=3/chain2") == SpecConfig.parse(
      "ngram/chain2")


@pytest.mark.parametrize("method,fragment", [
    ("lookahead/chain2", "unknown drafter 'lookahead'"),
    ("ngram@max_n=2/chain2", "unknown option 'max_n'"),
    ("ngram@max_ngram=x/chain2", "expects an int"),
    ("ngram@proposal=iid/chain2", "proposes deterministically"),
    ("layerskip@rule=best/chain2", "unknown acceptance rule 'best'"),
    ("ngram", "expected 'ar' or"),
    ("ngram@max_ngram/chain2", "expected @key=value"),
    ("ngram@gate=often/chain2", "gate expects a number"),
    ("ngram@gate=-1/chain2", "gate must be a finite number >= 0"),
    ("ngram@gate=soon/chain2", "gate expects a number >= 0"),
])
def test_bad_methods_are_config_errors(method, fragment):
  with pytest.raises(ConfigError, match=fragment):
    SpecConfig.parse(method)


def test_config_file_block_is_the_parsed_spec():
  """configs/spec_decode.py's `spec=` argument fills `config.spec`, which
  reads back as the same SpecConfig; `--config.spec.*` overrides apply."""
  method = "layerskip@layers=skip:4-15@proposal=wor/kary2x1"
  config = config_utils.load_config(f"{SPEC_CONFIG}:spec={method}")
  assert SpecConfig.from_config(config.spec) == SpecConfig.parse(method)
  config.spec.tree = "chain3"
  config.spec.options.max_ngram = 5       # another drafter's: ignored
  assert str(SpecConfig.from_config(config.spec)) == (
      "layerskip@layers=skip:4-15@proposal=wor/chain3")
  with pytest.raises(ConfigError, match="unknown spec keys"):
    SpecConfig.from_config({**config.spec.to_dict(), "tree_size": 3})
  config.spec.gate = "0.5"               # a string there: 'auto' fits too
  assert SpecConfig.from_config(config.spec).gate == 0.5
  config.spec.gate = "auto"
  auto = SpecConfig.from_config(config.spec)
  assert auto.gate == "auto" and str(auto).endswith("@gate=auto/chain3")
  assert SpecConfig.from_config(auto.to_config()) == auto


def test_an_unresolved_gate_is_refused_by_the_generator():
  """`gate=auto` is priced by the app (`seqdec.app.resolve_auto`); a
  Generator given it unresolved says so instead of comparing a string."""
  model = testing.tiny_model()
  with pytest.raises(ConfigError, match="gate=auto must be resolved"):
    Generator(model, Tokenizer.byte_level(), "ngram@gate=auto/chain2")


def test_resolve_rule_is_per_batch():
  assert spec_lib.resolve_rule("auto", [0.0, 0.0]) == "greedy"
  assert spec_lib.resolve_rule("auto", [0.0, 0.7]) == "sample"
  assert spec_lib.resolve_rule("typical_lossy", 1.0) == "typical_lossy"
  with pytest.raises(ConfigError, match="temperature 0 only"):
    spec_lib.resolve_rule("greedy", [0.0, 0.7])


def test_speculative_generator_samples_with_its_default_rule():
  """Issue 13 bug: `Generator(drafter=...)` defaulted to rule='greedy', so
  generate(temperature=0.7) raised. The default is 'auto', resolved per
  batch: greedy rows verify greedily, sampled batches losslessly."""
  model = testing.tiny_model()
  gen = Generator(model, Tokenizer.byte_level(), max_new_tokens=4,
                  eos_ids=(), drafter="ngram", tree="chain2")
  assert gen.spec.rule == "auto"
  shapes = DecodeShapes.for_batch(1, 4, 4, 1)
  assert isinstance(gen.loop(shapes, [0.0]).rule, verify.Greedy)
  assert isinstance(gen.loop(shapes, [0.7]).rule, verify.Sample)
  [r] = gen.generate_ids([[1, 2, 3, 1, 2]], temperature=0.7, seed=3)
  assert len(r.tokens) == 4


def test_rule_takes_the_generators_top_k_cap():
  """Issue 13 bug: the rule built `Sample()` with its own max_top_k=64;
  it must get the sampler's cap (the chi-squared case with top_k=100 under
  max_top_k=128 is in test_spec_sampling.py)."""
  model = testing.tiny_model()
  gen = Generator(model, Tokenizer.byte_level(), "ngram/chain2",
                  max_top_k=128)
  loop = gen.loop(DecodeShapes.for_batch(1, 4, 4, 1), [1.0], [100], [1.0])
  assert loop.rule.max_top_k == 128
  assert any(getattr(t, "max_k", None) == 128 for t in loop.sampler.rules)
  with pytest.raises(TypeError):
    verify.make_rule("sample")          # the cap is a required argument


def test_tree_objects_and_strings_build_the_same_loop():
  from seqdec.decoding import trees  # pylint: disable=g-import-not-at-top
  model = testing.tiny_model()
  tok = Tokenizer.byte_level()
  a = Generator(model, tok, drafter="ngram", tree=trees.kary((2, 1)))
  b = Generator(model, tok, "ngram/kary2x1")
  assert a.tree == b.tree
  with pytest.raises(TreeError, match="unknown tree spec"):
    Generator(model, tok, "ngram/bush3")
  with pytest.raises(ConfigError, match="not both"):
    Generator(model, tok, "ngram/chain2", tree="chain3")
  assert np.array_equal(a.tree.depth, b.tree.depth)


def test_results_carry_top2_margins():
  """Per-token top-1 minus top-2 logits: the autoregressive ones equal a
  full forward's (whole-model f32 bound 1e-4), the speculative ones the
  autoregressive ones (the same positions, verified in a tree)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  model = testing.tiny_model()
  tok = Tokenizer.byte_level()
  prompt = [1, 2, 3, 1, 2, 3, 1]
  [ar] = Generator(model, tok, max_new_tokens=6, eos_ids=()).generate_ids(
      [prompt])
  [sp] = Generator(model, tok, "ngram/chain2", max_new_tokens=6,
                   eos_ids=()).generate_ids([prompt])
  assert sp.tokens == ar.tokens
  seq = jnp.asarray([prompt + ar.tokens[:-1]])
  logits = np.sort(np.asarray(testing.full_forward(model, seq))[0], -1)
  ref = (logits[:, -1] - logits[:, -2])[len(prompt) - 1:]
  np.testing.assert_allclose(ar.margins, ref, atol=1e-4)
  np.testing.assert_allclose(sp.margins, ar.margins, atol=1e-4)


@pytest.mark.parametrize("jit", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_warmup_compiles_ahead_and_the_eager_twin_equals_the_loop(jit):
  """`warmup` compiles the bucket's programs (a timed run then compiles
  nothing); `HostLoop` (the same step from Python: jitted per step, or op
  by op with jit=False, ~25 s of eager dispatch, slow tier) gives the
  jitted while_loop's tokens and acceptance."""
  from seqdec.decoding.loops import HostLoop, Inputs  # pylint: disable=g-import-not-at-top
  from seqdec.decoding.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  model = testing.tiny_model()
  gen = Generator(model, Tokenizer.byte_level(), "ngram/chain2",
                  max_new_tokens=5, eos_ids=())
  assert gen.warmup(prompt_lengths=[7], batch_sizes=[1]) > 0
  prompt = [1, 2, 3, 1, 2, 3, 1]
  [r] = gen.generate_ids([prompt])
  assert r.metrics["compile_s"] == 0
  assert gen.warmup(prompt_lengths=[7], batch_sizes=[1]) == 0
  shapes = DecodeShapes.for_batch(1, len(prompt), 5, 1)
  loop = gen.loop(shapes, [0.0])
  inputs = Inputs.make(shapes, [prompt], [5], [-1], SamplingParams.make(1),
                       seed=0)
  state = HostLoop(loop, jit=jit).run(params=gen.loop_params, inputs=inputs)
  assert np.asarray(state.tokens)[0, :5].tolist() == r.tokens
  assert np.asarray(state.accept_hist).sum() + 1 == r.metrics["target_calls"]
