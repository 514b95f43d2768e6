"""Target features reach feature-reading drafters, taken from the forwards
the target runs anyway (prefill, verification), and equal the target's
features recomputed by one full forward over the committed text."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqdec import testing
from seqdec.decoding import drafters as drafters_lib
from seqdec.decoding.drafters.base import Drafter
from seqdec.decoding.loops import DecodeShapes, HostLoop, Inputs
from seqdec.decoding.sampling import SamplingParams
from seqdec.generator import Generator
from seqdec.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureProbe(Drafter):
  """Drafts with `inner`; records every feature it is handed by position:
  state = (inner state, buffer [B, capacity, D])."""
  inner: Drafter
  feature_taps: tuple[int, ...] = ()
  uses_features = True
  name = "probe"

  @property
  def params(self):
    return self.inner.params

  @property
  def vocab_size(self):
    return self.inner.vocab_size

  def init(self, params, tokens, prompt_len, first, capacity, target_cache,
           features=None):
    assert features is not None
    b, p, d = features.shape
    buf = jnp.zeros((b, capacity, d), features.dtype).at[:, :p].set(features)
    return (self.inner.init(params, tokens, prompt_len, first, capacity,
                            target_cache), buf)

  def propose(self, params, state, shape, rnd, target_cache, key):
    tree, inner, cache = self.inner.propose(params, state[0], shape, rnd,
                                            target_cache, key)
    return tree, (inner, state[1]), cache

  def commit(self, params, state, shape, rnd, outcome):
    buf = state[1]
    m = outcome.features.shape[1]
    slot = rnd.length[:, None] + jnp.arange(m)                   # [B, M]
    keep = jnp.arange(m)[None] < outcome.num_kept[:, None]
    slot = jnp.where(keep, slot, buf.shape[1])                    # dropped
    rows = jnp.arange(buf.shape[0])[:, None]
    buf = buf.at[rows, slot].set(outcome.features, mode="drop")
    return (self.inner.commit(params, state[0], shape, rnd, outcome), buf)


@pytest.mark.parametrize("family,taps", [
    ("llama", ()), ("llama", (1,)),
    pytest.param("gemma3", (), marks=pytest.mark.slow)])
def test_features_equal_a_full_forward_over_the_committed_text(x64, family,
                                                               taps):
  """float64: the features handed to `init` (prompt) and `commit` (kept
  paths of a tree with accepted and rejected drafts) equal, at every
  committed position, `features(backbone(...))` of one causal forward over
  prompt + committed tokens (1e-10); rows of different lengths in a batch.
  With feature taps (EAGLE-3) the features are [features(input of each
  tapped block) ; features(output)], the tapped inputs recomputed by a
  forward through the blocks before them alone."""
  model = (testing.tiny_model("float64") if family == "llama"
           else testing.tiny_gemma3("float64"))
  noise = 0.02 if family == "llama" else 0.1     # ~half the drafts accepted
  probe = FeatureProbe(drafters_lib.draft_lm(testing.perturbed(model, noise)),
                       feature_taps=taps)
  gen = Generator(model, Tokenizer.byte_level(), max_new_tokens=14,
                  eos_ids=(), drafter=probe, tree="kary2x2")
  prompts = [[5, 17, 99, 3, 42, 7, 9, 11, 13], [200, 1, 2]]
  shapes = DecodeShapes.for_batch(2, 9, 14, 1)
  loop = gen.loop(shapes, [0.0, 0.0])
  inputs = Inputs.make(shapes, prompts, [14, 14], [-1],
                       SamplingParams.make(2), seed=0)
  state = HostLoop(loop).run(params=gen.loop_params, inputs=inputs)
  ar = Generator(model, Tokenizer.byte_level(), max_new_tokens=14,
                 eos_ids=()).generate_ids(prompts)
  hist = np.asarray(state.accept_hist)
  assert hist[:, 1:].sum() > 0 and hist[:, :-1].sum() > 0  # accepts, rejects
  buf = np.asarray(state.draft[1])
  length = np.asarray(state.cache.length)
  for b, (prompt, r) in enumerate(zip(prompts, ar)):
    assert np.asarray(state.tokens)[b, :14].tolist() == r.tokens
    committed = prompt + r.tokens[:-1]
    assert length[b] == len(committed)
    toks = jnp.asarray([committed])

    def hidden_after(layers, t):
      return model.backbone(t, jnp.arange(t.shape[1])[None],
                            model.init_cache(1, t.shape[1]), layers=layers)[0]
    parts = [jax.jit(functools.partial(hidden_after, list(range(i))))(toks)
             for i in taps] + [jax.jit(functools.partial(hidden_after, None))(
                 toks)]
    want = np.concatenate([np.asarray(model.features(h))[0] for h in parts],
                          -1)
    np.testing.assert_allclose(buf[b, :len(committed)], want, atol=1e-10,
                               rtol=0)
