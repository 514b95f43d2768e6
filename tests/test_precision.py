"""Precision policies (issue 15): f32, bf16_weights and f32_packed (its
kernel's own tests: test_packed_matmul.py).

bf16_weights keeps the weight matrices in bfloat16 and runs their matmuls
as bf16 x bf16 -> f32; the rest stays float32. A forward over one token
and over a tree of 16 runs different kernels, so speculative and
autoregressive output agree under a margin rule: wherever the reference's
top-1/top-2 margin exceeds twice the max |delta logit| measured between
the T=1 and T=16 forwards of the same positions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqdec
from seqdec import Generator, Tokenizer, host_profile, testing
from seqdec.bench import first_divergence
from seqdec.checkpoints.convert import CheckpointError
from seqdec.models import transformer as tr


def stepwise_vs_tree_delta(model, tokens):
  """max |logits(one token at a time) - logits(all T at once)|."""
  whole = np.asarray(testing.full_forward(model, jnp.asarray([tokens])))[0]
  f = testing.jitted(model)
  cache = model.init_cache(1, len(tokens))
  steps = []
  for i, t in enumerate(tokens):
    logits, cache = f(jnp.asarray([[t]]), jnp.asarray([[i]]), cache)
    cache = testing.commit(cache, jnp.asarray([1]))
    steps.append(np.asarray(logits)[0, -1])
  return float(np.abs(np.stack(steps) - whole).max())


def test_bf16_weights_policy_layout():
  """Weights (rank >= 2) in bf16, norm scales and buffers f32, the matmul
  operand dtype set; back to f32 restores the f32 layout."""
  m = tr.with_precision(testing.tiny_model(), "bf16_weights")
  assert (m.config.param_dtype, m.config.matmul_dtype, m.config.dtype) == (
      "bfloat16", "bfloat16", "float32")
  params = jax.tree.leaves(nnx_params(m))
  assert {str(x.dtype) for x in params if x.ndim >= 2} == {"bfloat16"}
  assert {str(x.dtype) for x in params if x.ndim < 2} == {"float32"}
  back = tr.with_precision(m, "f32")
  assert {str(x.dtype) for x in jax.tree.leaves(nnx_params(back))} == {
      "float32"}
  with pytest.raises(ValueError, match="unknown precision policy"):
    tr.with_precision(m, "int4")


def nnx_params(model):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx.state(model, nnx.Param)


def test_speculative_equals_autoregressive_under_bf16_weights():
  """Under bf16_weights, greedy speculative (layer skip, a 4-chain: T=5
  verifies) == greedy AR (T=1 steps) wherever the AR margin exceeds twice
  the measured T=1 vs T=16 logit difference; the rule must be exercised
  (most positions are above the threshold)."""
  model = tr.with_precision(testing.tiny_model(), "bf16_weights")
  rng = np.random.default_rng(0)
  delta = stepwise_vs_tree_delta(model, rng.integers(
      0, model.config.vocab_size, 16).tolist())
  threshold = 2 * delta
  print(f"bf16_weights tiny: max |dlogit| T=1 vs T=16 = {delta:.3g}")
  tok = Tokenizer.byte_level()
  prompts = ["abcabcabc", "hello there"]
  kw = dict(max_new_tokens=12, eos_ids=())
  ar = Generator(model, tok, **kw).generate(prompts)
  spec = Generator(model, tok, "layerskip@layers=first:1/chain4",
                   **kw).generate(prompts)
  checked = 0
  for a, s in zip(ar, spec):
    d = first_divergence(a.tokens, s.tokens)
    checked += len(a.tokens) if d is None else d
    if d is not None:
      assert a.margins[d] <= threshold, (d, a.margins[d], threshold)
  assert checked >= 0.75 * sum(len(a.tokens) for a in ar)


def test_load_pretrained_takes_a_policy():
  m, _ = seqdec.load_pretrained("tiny", precision="bf16_weights")
  assert m.config.matmul_dtype == "bfloat16"
  with pytest.raises(CheckpointError, match="unknown precision policy"):
    seqdec.load_pretrained("tiny", precision="fp8")


def test_auto_precision_follows_the_host_profile(tmp_path, monkeypatch):
  """'auto': the profiled policy with the smallest cost over a step and
  two verify sizes, among those the host can run (a packed policy only
  with a compiler for its kernel); without a profile, f32 and a
  warning."""
  def curve(step, per):
    return {128: {t: step + per * (t - 1) for t in (1, 8, 16)}}
  prof = host_profile.HostProfile(
      host_profile.host_info(), "tiny",
      verify_ms={"f32": curve(10, 2.0), "bf16_weights": curve(14, 0.2),
                 "bf16_packed": curve(6, 0.2)})
  path = str(tmp_path / "p.json")
  host_profile.write_profile(path, prof)
  assert host_profile.choose_precision("tiny", path) == "bf16_packed"
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  assert host_profile.choose_precision("tiny", path) == "bf16_weights"
  monkeypatch.delenv("CXX")
  with pytest.warns(RuntimeWarning, match="no host profile"):
    assert host_profile.choose_precision(
        "tiny", str(tmp_path / "none.json")) == "f32"


@pytest.mark.slow
@pytest.mark.realmodel
@pytest.mark.parametrize("policy", ["bf16_weights", "f32_packed",
                                    "bf16_packed"])
def test_smollm2_speculation_equals_autoregression_under_policy(policy):
  """SmolLM2 under a policy: the T=1 vs T=16 logit difference is
  measured on a real prompt, and greedy speculative (n-gram, 4-chains)
  equals greedy AR wherever the AR margin exceeds twice it."""
  model, tok = seqdec.load_pretrained("smollm2-135m-instruct",
                                      precision=policy)
  text = ("The capital of France is Paris. The capital of Germany is Berlin. "
          "The capital of Italy is")
  delta = stepwise_vs_tree_delta(model, tok.encode(text)[:16])
  threshold = 2 * delta
  print(f"{policy} SmolLM2: max |dlogit| T=1 vs T=16 = {delta:.3g}")
  prompts = ["List the days of the week, then list them again."]
  kw = dict(max_new_tokens=32)
  ar = Generator(model, tok, **kw).generate(prompts)
  spec = Generator(model, tok, "ngram/chain4", **kw).generate(prompts)
  ties = 0
  for a, s in zip(ar, spec):
    d = first_divergence(a.tokens, s.tokens)   # a length difference too
    if d is not None:
      assert d < len(a.tokens), "speculative output runs past AR's end"
      assert a.margins[d] <= threshold, (d, a.margins[d], threshold)
      ties += 1
  print(f"divergences at margins <= {threshold:.3g}: {ties}")
  assert np.mean([r.metrics["tau"] for r in spec]) > 1.0   # drafts accepted


def test_a_converted_model_keeps_its_source_fingerprint():
  """A drafter made for the f32 weights serves the bf16_weights model made
  from them (`fingerprint.derived`, applied by `load_pretrained`); the bf16
  weights alone hash differently, and another model still differs."""
  from seqdec.checkpoints import fingerprint as fp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  source = testing.tiny_model()
  plain = tr.with_precision(source, "bf16_weights")
  assert fp.fingerprint(plain) != fp.fingerprint(source)
  marked = fp.derived(tr.with_precision(source, "bf16_weights"), source)
  assert fp.fingerprint(marked) == fp.fingerprint(source)
  # The mark survives split / merge (it is what jit-ed code rebuilds).
  assert fp.fingerprint(nnx.merge(*nnx.split(marked))) == fp.fingerprint(
      source)
  assert fp.fingerprint(testing.tiny_model(seed=1)) != fp.fingerprint(source)
