"""Tree attention kernel == dense reference; model wiring ('pallas' == 'xla').

Oracles: `tree_attention_reference` (softmax over a materialised
`[B, N, S + N]` mask), itself checked against the model's own
`grouped_attention` over `attention_visibility`; for the model, the XLA
attention path and autoregressive greedy decoding. Bounds (CONTRIBUTING.md):
one attention call in f32 1e-5; whole model f32 1e-4 on log-softmax, and
equal greedy tokens.

Both kernel bodies run in interpret mode: 'gpu' (the CPU default) and 'tpu'
(its grid/scalar-prefetch structure under plain interpretation); the
TPU-semantics simulator (`pltpu.InterpretParams`) runs one small case in
the slow tier. Shapes are bucketed (B=3, N=13, S=128, Dh=16, K=2, G in
{1, 3, 8}) so every hypothesis example reuses the same compiled programs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqdec import testing
from seqdec.decoding import trees
from seqdec.kernels import tree_attention as ta
from seqdec.kernels import tree_mask as tm
from seqdec.models import transformer as tr

MODULE_TOL = 1e-5      # one attention call, float32
MODEL_TOL = 1e-4       # whole model, float32, log-softmax
PLATFORMS = ("gpu", "tpu")
B, K, N, S, DH = 3, 2, 13, 128, 16
BLOCKS = {"gpu": dict(block_kv=32), "tpu": dict(block_kv=32, block_n=8)}


def _tree(kind, n, rng):
  if kind == "chain":
    return [-1] + list(range(n - 1))
  if kind == "star":
    return [-1] + [0] * (n - 1)
  if kind == "deep":
    return [-1] + [i - 1 if i % 5 else max(0, i - 3) for i in range(1, n)]
  if kind == "bushy":
    return [-1] + [(i - 1) // 3 for i in range(1, n)]
  return [-1] + [int(rng.integers(0, i)) for i in range(1, n)]


KINDS = ("chain", "star", "deep", "bushy", "random")


def make_inputs(seed, g, parents, lengths, s=S, dtype=jnp.float32, k=K,
                dh=DH):
  """Random q/k/v (numpy: no per-shape compiles), masks from `tree_mask`."""
  b, n = np.shape(parents)
  rng = np.random.default_rng(seed)

  def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

  q = normal(b, k * g, n, dh)
  kc, vc = normal(b, k, s, dh), normal(b, k, s, dh)
  kt, vt = normal(b, k, n, dh), normal(b, k, n, dh)
  words, depth = tm.tree_mask(np.asarray(parents, np.int32))
  lengths = np.asarray(lengths, np.int32)
  return ((q, kc, vc, jnp.asarray(lengths), kt, vt, words),
          jnp.asarray(lengths[:, None] + np.asarray(depth)))


reference = jax.jit(ta.tree_attention_reference,
                    static_argnames=("sliding_window", "scale"))


def max_err(a, b):
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


@pytest.mark.parametrize("g", [1, 3, 8])
@settings(deadline=None, derandomize=True, max_examples=5)
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=B, max_size=B),
       lengths=st.lists(st.one_of(st.just(0), st.just(S),
                                  st.integers(1, S - 1)),
                        min_size=B, max_size=B),
       seed=st.integers(0, 2**16))
def test_kernel_matches_dense_reference(g, kinds, lengths, seed):
  """Random trees (a different one per row), lengths incl. 0 and S, GQA."""
  rng = np.random.default_rng(seed)
  parents = [_tree(kind, N, rng) for kind in kinds]
  args, _ = make_inputs(seed, g, parents, lengths)
  ref = reference(*args)
  for platform in PLATFORMS:
    out = ta.tree_attention(*args, platform=platform, **BLOCKS[platform])
    err = max_err(out, ref)
    assert err <= MODULE_TOL, (platform, err)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_single_node_and_two_word_trees_with_window(platform):
  """N = 1 (root only); N = 40 (two mask words) under a sliding window."""
  args, _ = make_inputs(1, 3, [[-1], [-1]], [0, 77])
  out = ta.tree_attention(*args, platform=platform, **BLOCKS[platform])
  assert max_err(out, reference(*args)) <= MODULE_TOL
  rng = np.random.default_rng(0)
  parents = [_tree("chain", 40, rng), _tree("random", 40, rng)]
  args, pos = make_inputs(2, 2, parents, [100, 5])
  kw = dict(positions=pos, sliding_window=20)  # hides blocks and ancestors
  out = ta.tree_attention(*args, platform=platform, **kw, **BLOCKS[platform])
  assert max_err(out, reference(*args, **kw)) <= MODULE_TOL


def test_reference_matches_model_attention():
  """The reference computes the model's attention for a tree in scratch."""
  rng = np.random.default_rng(3)
  g, lengths = 3, [0, 50, S - N]
  parents = [_tree(k, N, rng) for k in ("random", "chain", "bushy")]
  (q, kc, vc, ln, kt, vt, words), pos = make_inputs(5, g, parents, lengths)
  for window in (None, 24):
    ref = reference(q, kc, vc, ln, kt, vt, words,
                                      positions=pos, sliding_window=window)
    # Model layout: tree K/V in scratch slots length .., rows t * G + g.
    kbuf = jnp.concatenate([kc, jnp.zeros_like(kt)], axis=2)
    vbuf = jnp.concatenate([vc, jnp.zeros_like(vt)], axis=2)
    for b in range(B):
      kbuf = kbuf.at[b, :, lengths[b]:lengths[b] + N].set(kt[b])
      vbuf = vbuf.at[b, :, lengths[b]:lengths[b] + N].set(vt[b])
    dense = tm.unpack_mask(words, N)
    vis = tr.attention_visibility(ln, pos, dense, S + N, window)
    qm = q.reshape(B, K, g, N, DH).transpose(0, 1, 3, 2, 4).reshape(
        B, K, N * g, DH)
    out = tr.grouped_attention(
        qm, [(kbuf, vbuf, jnp.repeat(vis, g, axis=1)[:, None])],
        DH ** -0.5, jnp.float32, "dot")
    out = out.reshape(B, K, N, g, DH).transpose(0, 1, 3, 2, 4).reshape(
        B, K * g, N, DH)
    assert max_err(out, ref) <= MODULE_TOL


@pytest.mark.parametrize("platform", PLATFORMS)
def test_blocks_past_length_are_skipped_not_masked(platform):
  """NaN in whole blocks past a row's length never reaches the output.

  A masked block would still multiply its values by p = 0, and 0 * NaN is
  NaN; only the boundary block (finite garbage past the length) is read.
  """
  rng = np.random.default_rng(1)
  parents = [_tree("random", N, rng) for _ in range(B)]
  lengths = [0, 40, 100]
  (q, kc, vc, ln, kt, vt, words), _ = make_inputs(7, 3, parents, lengths)
  slot = jnp.arange(S)[None, None, :, None]
  block_end = ((ln + 31) // 32 * 32)[:, None, None, None]
  garbage = (slot >= ln[:, None, None, None]) & (slot < block_end)
  kc_bad = jnp.where(slot >= block_end, jnp.nan, jnp.where(garbage, 1e4, kc))
  vc_bad = jnp.where(slot >= block_end, jnp.nan, jnp.where(garbage, 1e4, vc))
  ref = reference(q, kc, vc, ln, kt, vt, words)
  out = ta.tree_attention(q, kc_bad, vc_bad, ln, kt, vt, words,
                          platform=platform, **BLOCKS[platform])
  assert max_err(out, ref) <= MODULE_TOL


def test_bfloat16_inputs_accumulate_in_float32():
  """bf16 q/k/v: probabilities enter the PV matmul as bf16 (8 bits).

  Bound: each p is rounded once (relative 2^-9) and the output once more
  (2^-9 of |out| <= max|v|), so |out - ref| <= 2^-8 max|v| with ref the f32
  reference on the same bf16 inputs.
  """
  rng = np.random.default_rng(2)
  parents = [_tree(k, N, rng) for k in ("random", "deep", "star")]
  args, _ = make_inputs(9, 3, parents, [0, 64, S], dtype=jnp.bfloat16)
  ref = reference(*[a.astype(jnp.float32)
                                      if a.dtype == jnp.bfloat16 else a
                                      for a in args])
  bound = 2.0 ** -8 * float(jnp.max(jnp.abs(
      jnp.concatenate([args[2], args[5]], axis=2).astype(jnp.float32))))
  out = ta.tree_attention(*args, **BLOCKS["gpu"])
  assert out.dtype == jnp.bfloat16
  assert max_err(out, ref) <= bound, (max_err(out, ref), bound)


def test_bad_input():
  args, pos = make_inputs(0, 1, [[-1, 0]], [3])
  q, kc, vc, ln, kt, vt, words = args
  with pytest.raises(ValueError, match="mask_words"):
    ta.tree_attention(q, kc, vc, ln, kt, vt, words[:, :1])
  with pytest.raises(ValueError, match="k_tree"):
    ta.tree_attention(q, kc, vc, ln, kt[:, :, :1], vt, words)
  with pytest.raises(ValueError, match="sliding window needs positions"):
    ta.tree_attention(*args, sliding_window=4)
  with pytest.raises(ValueError, match="must divide"):
    ta.tree_attention(*args, block_kv=48, platform="tpu")
  with pytest.raises(ValueError, match="share a dtype"):
    ta.tree_attention(q.astype(jnp.bfloat16), kc, vc, ln, kt, vt, words)
  with pytest.raises(ValueError, match="platform"):
    ta.tree_attention(*args, platform="npu")


@pytest.mark.slow
def test_tpu_interpret_mode():
  """TPU semantics (`pltpu.InterpretParams`: VMEM/SMEM, DMA, grid order)."""
  from jax.experimental.pallas import tpu as pltpu
  rng = np.random.default_rng(4)
  parents = [_tree(k, 16, rng) for k in ("random", "chain")]
  args, pos = make_inputs(11, 3, parents, [0, 200], s=256)
  for window in (None, 40):
    kw = dict(positions=pos, sliding_window=window)
    ref = reference(*args, **kw)
    out = ta.tree_attention(*args, platform="tpu", block_kv=128, block_n=8,
                            interpret=pltpu.InterpretParams(), **kw)
    err = max_err(out, ref)
    print(f"TPU interpret mode, window {window}: max |d| = {err:.2e}")
    assert err <= MODULE_TOL
  words, depth = tm.tree_mask(np.array(parents), platform="tpu",
                              interpret=pltpu.InterpretParams())
  ref_w, ref_d = tm.tree_mask_reference(jnp.asarray(parents, jnp.int32))
  np.testing.assert_array_equal(np.asarray(words), np.asarray(ref_w))
  np.testing.assert_array_equal(np.asarray(depth), np.asarray(ref_d))


# ---------------------------------------------------------------------------
# The model with attention_impl='pallas' (verify calls through the kernel).

def with_impl(model, impl):
  """The same weights with another attention_impl (no second init)."""
  return tr.reconfigured(model, attention_impl=impl)


@functools.cache
def _model(dtype, **overrides):
  return testing.tiny_model(dtype, attention_impl="xla", **overrides)


def _model_pair(dtype, **overrides):
  model = _model(dtype, **overrides)
  return model, with_impl(model, "pallas")


def _prefill_then_tree(model, tokens, lengths):
  """Prompt prefill, ragged commit, then one 10-node tree forward."""
  fwd = testing.jitted(model)
  b = tokens.shape[0]
  pos = jnp.broadcast_to(jnp.arange(9), (b, 9))
  prompt_logits, cache = fwd(tokens[:, :9], pos, model.init_cache(b, 48))
  cache = testing.commit(cache, jnp.asarray(lengths))
  shape = trees.kary((3, 2))
  mask = tm.ancestor_mask(jnp.asarray([shape.parents] * b))
  tree_pos = cache.length[:, None] + jnp.asarray(shape.depth)[None]
  tree_logits, _ = fwd(tokens[:, 9:19], tree_pos, cache, mask)
  return prompt_logits, tree_logits


# Model-level tests build tiny models (~10-30 s of compiles each on the
# shared 2-core machine): slow tier. The default tier keeps the kernel ==
# model-attention check (test_reference_matches_model_attention).
@pytest.mark.slow
def test_model_pallas_equals_xla_float64(x64):
  """Same model, kernel vs XLA attention: equal to float64 rounding."""
  tokens = jax.random.randint(jax.random.key(0), (2, 19), 0, 260)
  xla, pallas = _model_pair("float64")
  for a, b in zip(_prefill_then_tree(xla, tokens, [9, 6]),
                  _prefill_then_tree(pallas, tokens, [9, 6])):
    assert b.dtype == jnp.float64
    assert max_err(a, b) <= 1e-10, max_err(a, b)


@pytest.mark.slow
def test_model_pallas_equals_xla_float32_window_mqa():
  """Whole model in f32, sliding window 6 and one kv head (G = 4):
  log-softmax within 1e-4 (measured ~1e-5 on logits of magnitude ~15: the
  two paths sum in different orders)."""
  tokens = jax.random.randint(jax.random.key(1), (2, 19), 0, 260)
  xla, pallas = _model_pair("float32", sliding_window=6, num_kv_heads=1)
  for a, b in zip(_prefill_then_tree(xla, tokens, [9, 4]),
                  _prefill_then_tree(pallas, tokens, [9, 4])):
    err = max_err(jax.nn.log_softmax(a), jax.nn.log_softmax(b))
    assert err <= MODEL_TOL, err


SPEC_PROMPTS = [[1, 2, 3, 4, 0, 1, 2], [7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 100],
                [33, 34, 200, 1]]


@functools.cache
def _generate(impl, tree=None, max_new=16):
  """Greedy float64 generation for SPEC_PROMPTS (call under x64)."""
  from seqdec.decoding import drafters
  from seqdec.generator import Generator
  from seqdec.tokenizer import Tokenizer
  model = with_impl(_model("float64"), impl)
  drafter = (None if tree is None
             else drafters.draft_lm(testing.perturbed(model, 0.02)))
  gen = Generator(model, Tokenizer.byte_level(), max_new_tokens=max_new,
                  eos_ids=(), drafter=drafter, tree=tree or "chain4")
  return gen.generate_ids(SPEC_PROMPTS)


def _assert_same(out, ref):
  for r, e in zip(out, ref):
    assert r.tokens == e.tokens
    np.testing.assert_allclose(r.logprobs, e.logprobs, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("tree", ["kary2x2"])
def test_speculative_pallas_equals_autoregressive(x64, no_compile_cache,
                                                  tree):
  """Greedy speculative decoding (SpecLoop through Generator; a
  perturbed draft LM, so some drafts are rejected), float64, ragged batch of
  3: with 'pallas' the tokens equal autoregressive decoding and 'xla'
  speculative decoding exactly; logprobs within 1e-10. Autoregressive decoding
  with 'pallas' (prompt prefill through the kernel) is unchanged too."""
  ar = _generate("xla")
  _assert_same(_generate("pallas"), ar)
  spec = _generate("pallas", tree)
  _assert_same(spec, ar)
  if tree == "kary2x2":                  # and == 'xla', directly, once
    _assert_same(_generate("xla", tree), spec)
  assert np.mean([r.metrics["mean_accepted"] for r in spec]) > 1.0


@pytest.mark.parametrize("platform", PLATFORMS)
def test_parents_entry_point_equals_words_entry_point(platform):
  """`tree_attention_from_parents` (words built by `tree_mask`) gives the
  words entry point's output bit for bit: trees, a forest row, a sliding
  window with default positions (length + depth), and inside jit."""
  rng = np.random.default_rng(3)
  forest = [-1, 0, -1, 2, 2, -1] + [5] * (N - 6)
  parents = np.array([_tree("deep", N, rng), _tree("random", N, rng), forest],
                     np.int32)
  args, pos = make_inputs(4, 3, parents, [0, 50, S])
  blocks = BLOCKS[platform]
  want = ta.tree_attention(*args, platform=platform, **blocks)
  got = ta.tree_attention_from_parents(*args[:6], parents, platform=platform,
                                       **blocks)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  kw = dict(sliding_window=20, platform=platform, **blocks)
  want = ta.tree_attention(*args, positions=pos, **kw)
  got = ta.tree_attention_from_parents(*args[:6], parents, **kw)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  jitted = jax.jit(lambda *a: ta.tree_attention_from_parents(
      *a, validate=False, **kw))
  got = jitted(*args[:6], jnp.asarray(parents))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  bad = parents.copy()
  bad[0, 1], bad[0, 2] = 2, 0           # node 1's parent listed after it
  with pytest.raises(trees.TreeError, match="row 0: node 1 has parent 2 "
                     "listed after it"):
    ta.tree_attention_from_parents(*args[:6], bad, **kw)
