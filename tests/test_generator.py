"""Autoregressive decoding through the Generator API.

Oracles: a plain token-by-token argmax loop over full forwards (no cache); the
same prompt decoded alone; numpy references for the sampling rules.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqdec import testing
from seqdec.decoding import sampling
from seqdec.generator import Generator, PromptError
from seqdec.tokenizer import Tokenizer

MARGIN = 1e-4  # f32 token equality is demanded where the top-2 margin exceeds it


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.byte_level()


@pytest.fixture(scope="module")
def gen32(tok):
  return Generator(testing.tiny_model(), tok, max_new_tokens=12, eos_ids=())


def reference_greedy(model, prompt, n, pad_to=32):
  """Argmax continuation by full forwards; returns tokens and top-2 margins.

  Sequences are right-padded to `pad_to` (one compiled shape): with a causal
  mask, padding after position i does not change the logits at i.
  """
  seq = list(prompt)
  margins = []
  for _ in range(n):
    padded = jnp.asarray([seq + [0] * (pad_to - len(seq))])
    logits = testing.full_forward(model, padded)[0, len(seq) - 1]
    top2 = np.sort(np.asarray(logits))[-2:]
    margins.append(top2[1] - top2[0])
    seq.append(int(jnp.argmax(logits)))
  return seq[len(prompt):], np.asarray(margins)


PROMPTS = ["hi", "the quick brown fox", "0123456789abcdefghij"]


def test_greedy_equals_full_forward_argmax_f32(gen32, tok):
  results = gen32.generate(PROMPTS, max_new_tokens=10)
  small = 0
  for p, r in zip(PROMPTS, results):
    ref, margins = reference_greedy(gen32.model, tok.encode(p), 10)
    for i, (a, b) in enumerate(zip(r.tokens, ref)):
      if margins[i] <= MARGIN:
        small += 1
        break  # the continuation may legitimately diverge from here
      assert a == b, (p, i)
    assert r.finish_reason == "length" and len(r.tokens) == 10
  print(f"positions with top-2 margin <= {MARGIN}: {small}")


def test_greedy_exact_in_float64_and_rows_equal_solo(x64, tok):
  gen = Generator(testing.tiny_model("float64"), tok, max_new_tokens=8,
                  eos_ids=())
  batch = gen.generate(PROMPTS)
  for p, r in zip(PROMPTS, batch):
    ref, _ = reference_greedy(gen.model, tok.encode(p), 8)
    assert r.tokens == ref
    [solo] = gen.generate([p])
    assert solo.tokens == r.tokens
    np.testing.assert_allclose(solo.logprobs, r.logprobs, atol=1e-10)


def test_logprobs_are_model_log_probabilities(gen32, tok):
  [r] = gen32.generate(["abc"], max_new_tokens=5)
  seq = tok.encode("abc") + r.tokens
  logits = testing.full_forward(gen32.model, jnp.asarray([seq]))[0]
  logp = jax.nn.log_softmax(logits, axis=-1)
  n = len(tok.encode("abc"))
  ref = [float(logp[n - 1 + i, t]) for i, t in enumerate(r.tokens)]
  np.testing.assert_allclose(r.logprobs, ref, atol=1e-4)


def test_per_row_stop_on_any_eos_and_max_new(tok):
  model = testing.tiny_model()
  free = Generator(model, tok, max_new_tokens=10, eos_ids=())
  rows = free.generate(PROMPTS)
  # Stop ids: the 4th token of row 0 and the 2nd token of row 2.
  eos = (rows[0].tokens[3], rows[2].tokens[1])
  gen = Generator(model, tok, max_new_tokens=10, eos_ids=eos)
  out = gen.generate(PROMPTS, max_new_tokens=[10, 3, 10])
  for r, free_r, budget in zip(out, rows, [10, 3, 10]):
    stops = [i for i, t in enumerate(free_r.tokens[:budget]) if t in eos]
    n = stops[0] + 1 if stops else budget
    assert r.tokens == free_r.tokens[:n]
    assert r.finish_reason == ("stop" if stops else "length")
  assert out[1].finish_reason == "length" and len(out[1].tokens) == 3


def test_bucketing_avoids_recompiles(tok):
  gen = Generator(testing.tiny_model(), tok, max_new_tokens=5, eos_ids=())
  gen.generate(["abc", "de"])
  n = len(gen.programs)
  assert n == 2  # prefill + decode
  gen.generate(["a longer prompt", "x"], max_new_tokens=7)  # same buckets
  gen.generate(["other", "prompts", "three"][:2], max_new_tokens=3)
  assert len(gen.programs) == n
  gen.generate(["y" * 40])  # a new prompt bucket and batch size
  assert len(gen.programs) == n + 2


def test_sampled_row_independent_of_batch_position(tok):
  gen = Generator(testing.tiny_model(scale=0.1), tok, max_new_tokens=8,
                  eos_ids=(), temperature=1.0, seed=3)
  a = gen.generate(["same prompt!", "filler one!!"], row_ids=[7, 1])
  b = gen.generate(["filler two!!", "same prompt!"], row_ids=[2, 7])
  assert a[0].tokens == b[1].tokens
  c = gen.generate(["same prompt!", "filler one!!"], row_ids=[8, 1])
  assert c[0].tokens != a[0].tokens  # another row id draws another stream


def test_streaming_text_equals_final_text(gen32):
  deltas = {}
  res = gen32.generate(PROMPTS[:2], stream=lambda r, d: deltas.setdefault(
      r, []).append(d))
  for i, r in enumerate(res):
    assert "".join(deltas.get(i, [])) == r.text


def test_stream_decoder_never_splits_utf8(tok):
  text = "naïve 世界 🙂 ok"
  ids = tok.encode(text, add_bos=False)
  dec = tok.stream_decoder()
  pieces = [dec.push(i) for i in ids] + [dec.flush()]
  assert "".join(pieces) == text
  assert all("\ufffd" not in p for p in pieces)
  assert sum(1 for p in pieces if p == "") >= 5  # multi-byte chars waited


def test_stream_decoder_skips_special_tokens_like_the_final_text(tok):
  """A special token that is not a stop id (e.g. <|eos|> when eos_ids is
  empty) is in the tokens but not in `GenerationResult.text`; the streamed
  pieces must join to that same text."""
  ids = tok.encode("ab", add_bos=False) + [257, 258] + tok.encode(
      "é!", add_bos=False)
  dec = tok.stream_decoder(skip_special_tokens=True)
  pieces = [dec.push(i) for i in ids] + [dec.flush()]
  assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == "abé!"


def test_bad_prompts_raise(gen32):
  with pytest.raises(PromptError, match="empty"):
    gen32.generate(["ok", ""])
  with pytest.raises(PromptError, match="context"):
    gen32.generate(["x" * 1020], max_new_tokens=10)
  with pytest.raises(PromptError, match="max_new_tokens"):
    gen32.generate(["x"], max_new_tokens=0)
  with pytest.raises(TypeError, match="unknown generation options"):
    gen32.generate(["x"], temprature=0.5)


# ----------------------------------------------------------- sampling rules

def test_top_k_and_top_p_match_numpy_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 50)).astype(np.float32) * 2
  params = sampling.SamplingParams.make(3, temperature=1.0, top_k=[0, 5, 1],
                                        top_p=[0.5, 1.0, 0.9])
  topk = np.asarray(sampling.TopK(max_k=8)(jnp.asarray(logits), params))
  topp = np.asarray(sampling.TopP()(jnp.asarray(logits), params))
  for r, k in enumerate([0, 5, 1]):
    kept = np.isfinite(topk[r])
    assert kept.sum() == (50 if k == 0 else k)
    if k:
      assert set(np.flatnonzero(kept)) == set(np.argsort(-logits[r])[:k])
  for r, p in enumerate([0.5, 1.0, 0.9]):
    order = np.argsort(-logits[r])
    probs = np.exp(logits[r] - logits[r].max())
    probs /= probs.sum()
    before = np.cumsum(probs[order]) - probs[order]
    ref = set(order[before < p])
    assert set(np.flatnonzero(np.isfinite(topp[r]))) == ref


def test_top_p_candidates_equal_the_full_sort():
  """TopP reading K candidates (falling back to a full sort when a nucleus
  is larger) keeps bitwise the same tokens as with K = V (always the full
  sort), on rows whose nucleus fits in K and rows where it does not; and
  the kept sets equal a float64 numpy reference away from the boundary."""
  rng = np.random.default_rng(1)
  v = 300
  logits = rng.normal(size=(6, v)) * np.array([[4], [0.5], [2], [1], [3],
                                               [0.2]])
  logits = jnp.asarray(logits, jnp.float32)
  for top_p, fits in (([0.9, 0.5, 0.3, 0.95, 0.6, 0.1], False),
                      ([0.2, 0.01, 0.1, 0.05, 0.3, 0.001], True)):
    params = sampling.SamplingParams.make(6, temperature=1.0, top_p=top_p)
    full = np.asarray(jax.jit(sampling.TopP(max_k=v))(logits, params))
    fast = np.asarray(jax.jit(sampling.TopP(max_k=8))(logits, params))
    np.testing.assert_array_equal(fast, full)
    assert (np.isfinite(full).sum(-1).max() < 8) == fits   # both branches
    x = np.asarray(logits, np.float64)
    for r, p in enumerate(top_p):
      order = np.argsort(-x[r])
      probs = np.exp(x[r] - x[r].max())
      probs /= probs.sum()
      before = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
      if np.min(np.abs(before - p)) > 1e-6:     # not at the boundary
        assert set(np.flatnonzero(np.isfinite(fast[r]))) == set(
            order[before < p])


def test_temperature_sampling_matches_softmax_chi2():
  """20k draws from softmax(logits / T) pass a chi-square test."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  logits = jnp.asarray([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
  t = 0.7
  n = 20000
  sampler = sampling.make_sampler(temperature=t)
  params = sampling.SamplingParams.make(n, temperature=t)
  keys = sampling.row_keys(0, np.arange(n))
  toks, _ = jax.jit(sampler)(jnp.broadcast_to(logits, (n, 6)), keys, params)
  counts = np.bincount(np.asarray(toks), minlength=6)
  def expect(temp):
    p = np.exp(np.asarray(logits, np.float64) / temp)
    return p / p.sum() * n
  expected = expect(t)
  p = stats.chisquare(counts, expected).pvalue
  assert p > 1e-3, (counts, expected)
  # The same test rejects the wrong temperature.
  wrong = expect(1.0)
  assert stats.chisquare(counts, wrong).pvalue < 1e-6


@pytest.mark.slow
@pytest.mark.realmodel
def test_smollm2_batched_greedy_equals_solo_and_full_forward(smollm2_model):
  """The real model: a ragged chat batch == each row alone == argmax of full
  forwards, wherever the reference top-1/top-2 margin exceeds 1e-4."""
  model, tok = smollm2_model    # conftest: loaded once per session
  gen = Generator(model, tok, max_new_tokens=16, eos_ids=())
  convs = [[{"role": "user", "content": "Name three primary colors."}],
           [{"role": "user", "content": "Write a haiku about autumn leaves "
                                        "falling on a quiet pond at dusk."}]]
  batch = gen.generate(convs)
  small = 0
  for conv, r in zip(convs, batch):
    [solo] = gen.generate([conv])
    ref, margins = reference_greedy(model, gen.encode(conv), 16, pad_to=128)
    for i in range(16):
      if margins[i] <= MARGIN:
        small += 1
        break
      assert r.tokens[i] == ref[i] == solo.tokens[i], (i, r.tokens, ref)
  print(f"SmolLM2: positions with top-2 margin <= {MARGIN}: {small}")
