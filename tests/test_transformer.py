"""The model's cache and mask contract, checked against full forwards.

Oracle: the same model run over the whole sequence at once (no cache reuse).
Bounds follow CONTRIBUTING.md: whole model f32 1e-4 on log-softmax, float64
1e-10; modules f32 1e-5.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from flax import nnx

from seqdec.models import config as config_lib
from seqdec import testing
from seqdec.decoding import trees as trees_lib
from seqdec.models import transformer as tr

F32_MODEL_TOL = 1e-4
F64_TOL = 1e-10


def make_model(dtype="float32", **overrides):
  return testing.tiny_model(dtype, **overrides)


def logsm(x):
  return jax.nn.log_softmax(jnp.asarray(x), axis=-1)


full_forward = testing.full_forward


def random_tokens(seed, b, t, vocab=260):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)


# Default tier: base (GQA), window and MQA, the variants that change what the
# cache holds or which slots are visible. The rest are slow tier; their
# cached path is also checked against HF in the default tier
# (test_hf_parity.py::test_chunked_prefill_then_extend_matches_hf).
_SLOW = pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {}, pytest.param({"tie_embeddings": False}, marks=_SLOW),
    pytest.param({"qkv_bias": True}, marks=_SLOW),
    {"sliding_window": 5}, {"num_kv_heads": 1},
    pytest.param({"num_kv_heads": 4}, marks=_SLOW),
    pytest.param({"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
                 marks=_SLOW),
], ids=["base", "untied", "qkv_bias", "window", "mqa", "mha", "llama3"])
def test_prefill_then_step_by_step_equals_full_forward(overrides):
  model = make_model(**overrides)
  fwd = testing.jitted(model)
  tokens = random_tokens(0, 2, 14)
  full = full_forward(model, tokens)
  cache = model.init_cache(2, 32)
  pos = jnp.broadcast_to(jnp.arange(14), (2, 14))
  logits, cache = fwd(tokens[:, :6], pos[:, :6], cache)
  cache = testing.commit(cache, jnp.full((2,), 6))
  outs = [logits]
  for i in range(6, 14):
    logits, cache = fwd(tokens[:, i:i + 1], pos[:, i:i + 1], cache)
    cache = testing.commit(cache, jnp.ones((2,), jnp.int32))
    outs.append(logits)
  inc = jnp.concatenate(outs, axis=1)
  err = float(jnp.abs(logsm(inc) - logsm(full)).max())
  assert err <= F32_MODEL_TOL, err
  np.testing.assert_array_equal(cache.length, [14, 14])


def test_float64_step_by_step_is_exact_to_1e10(x64):
  model = make_model("float64")
  fwd = testing.jitted(model)
  tokens = random_tokens(0, 1, 10)
  full = full_forward(model, tokens)
  cache = model.init_cache(1, 16)
  outs = []
  for i in range(10):
    logits, cache = fwd(tokens[:, i:i + 1], jnp.array([[i]]), cache)
    cache = testing.commit(cache, jnp.ones((1,), jnp.int32))
    outs.append(logits)
  inc = jnp.concatenate(outs, axis=1)
  assert inc.dtype == jnp.float64
  assert float(jnp.abs(logsm(inc) - logsm(full)).max()) <= F64_TOL


def test_ragged_batch_rows_equal_solo_runs():
  """Rows with different committed lengths, one call: each equals its solo."""
  model = make_model()
  fwd = testing.jitted(model)
  lengths = [3, 9, 6]
  seqs = [random_tokens(10 + i, 1, n + 4)[0] for i, n in enumerate(lengths)]
  # Batched: prefill right-padded prompts, commit each row's own length.
  p = max(lengths)
  toks = jnp.stack([jnp.pad(s[:n], (0, p - n)) for s, n in zip(seqs, lengths)])
  pos = jnp.broadcast_to(jnp.arange(p), (3, p))
  cache = model.init_cache(3, 32)
  _, cache = fwd(toks, pos, cache)
  cache = testing.commit(cache, jnp.array(lengths))
  new = jnp.stack([s[n:n + 4] for s, n in zip(seqs, lengths)])
  new_pos = jnp.array(lengths)[:, None] + jnp.arange(4)
  batched, _ = fwd(new, new_pos, cache)
  for i, (s, n) in enumerate(zip(seqs, lengths)):
    solo = full_forward(model, s[None, :n + 4])[:, n:]
    err = float(jnp.abs(logsm(batched[i:i + 1]) - logsm(solo)).max())
    assert err <= F32_MODEL_TOL, (i, err)


# A tree over 6 new tokens: node 0 root; 1, 2 children of 0; 3 child of 1;
# 4, 5 children of 3.
TREE_PARENTS = [-1, 0, 0, 1, 3, 3]


def ancestor_mask(parents):
  """`[N, N]` ancestor-or-self mask (the host pointer-walk oracle)."""
  return testing.ancestor_mask_oracle(parents)


def path_to(parents, i):
  path = []
  while i >= 0:
    path.append(i)
    i = parents[i]
  return path[::-1]


@pytest.mark.parametrize("window", [None, 6])
def test_tree_mask_equals_each_root_to_node_path(window):
  model = make_model(sliding_window=window)
  fwd = testing.jitted(model)
  prompt = random_tokens(3, 1, 7)
  tree_tokens = random_tokens(4, 1, len(TREE_PARENTS))
  depth = np.array([len(path_to(TREE_PARENTS, i)) - 1
                    for i in range(len(TREE_PARENTS))])
  cache = model.init_cache(1, 32)
  _, cache = fwd(prompt, jnp.arange(7)[None], cache)
  cache = testing.commit(cache, jnp.array([7]))
  mask = jnp.asarray(ancestor_mask(TREE_PARENTS))[None]
  tree_logits, _ = fwd(tree_tokens, jnp.asarray(7 + depth)[None], cache,
                         mask=mask)
  for node in range(len(TREE_PARENTS)):
    path = path_to(TREE_PARENTS, node)
    seq = jnp.concatenate([prompt, tree_tokens[:, path]], axis=1)
    ref = full_forward(model, seq)[:, -1]
    err = float(jnp.abs(logsm(tree_logits[:, node]) - logsm(ref)).max())
    assert err <= F32_MODEL_TOL, (node, err)


@pytest.mark.parametrize("impl,window", [
    ("xla", 6), pytest.param("pallas", 6, marks=pytest.mark.slow),
    pytest.param("xla", None, marks=pytest.mark.slow),
    pytest.param("pallas", None, marks=pytest.mark.slow)])
def test_deferred_writes_equal_the_writing_call(impl, window, x64):
  """A deferred-write call (the cache only read, the new K/V returned and
  written after it) gives the logits and, once written, the cache of the
  plain call: a tree over a committed prefix, and a single token."""
  model = make_model("float64", sliding_window=window, attention_impl=impl)
  graphdef, state = nnx.split(model)

  @jax.jit
  def both(state, toks, pos, cache, m):
    mdl = nnx.merge(graphdef, state)
    hidden, new = mdl.backbone(toks, pos, cache, m, defer_writes=True)
    return mdl(toks, pos, cache, m), (mdl.logits(hidden), new,
                                      mdl.write_new(cache, new))

  prompt = random_tokens(3, 1, 7)
  cache = model.init_cache(1, 32)
  _, cache = testing.jitted(model)(prompt, jnp.arange(7)[None], cache)
  cache = testing.commit(cache, jnp.array([7]))
  depth = np.array([len(path_to(TREE_PARENTS, i)) - 1
                    for i in range(len(TREE_PARENTS))])
  mask = jnp.asarray(ancestor_mask(TREE_PARENTS))[None]
  tokens = random_tokens(4, 1, len(TREE_PARENTS))
  for toks, pos, m in ((tokens, jnp.asarray(7 + depth)[None], mask),
                       (tokens[:, :1], jnp.array([[7]]), mask[:, :1, :1])):
    (ref_logits, ref_cache), (logits, new, written) = both(state, toks, pos,
                                                           cache, m)
    assert isinstance(new, tr.NewKV)
    assert new.kv[0][0].shape == (1, toks.shape[1], 2, model.config.head_dim)
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=F64_TOL)
    for got, want in zip(jax.tree.leaves(written), jax.tree.leaves(ref_cache)):
      np.testing.assert_allclose(got, want, rtol=0, atol=F64_TOL)
  with pytest.raises(ValueError, match="no scratch window"):
    model.backbone(tokens, jnp.asarray(7 + depth)[None], cache,
                   jnp.ones((1, len(TREE_PARENTS), 9), bool),
                   defer_writes=True)


@pytest.mark.parametrize("window", [None, pytest.param(
    12, marks=pytest.mark.slow)])
def test_tree_level_by_level_in_a_scratch_window_equals_one_call(window):
  """Tree drafting feeds one level per call over a growing scratch window."""
  model = make_model(sliding_window=window)
  fwd = testing.jitted(model)
  shape = trees_lib.kary((2, 2, 1))
  depth = shape.depth
  n = shape.num_nodes
  prompt = random_tokens(3, 2, 7)
  tree_tokens = random_tokens(4, 2, n)
  cache = model.init_cache(2, 32)
  _, cache = fwd(prompt, jnp.broadcast_to(jnp.arange(7), (2, 7)), cache)
  cache = testing.commit(cache, jnp.array([7, 5]))   # ragged rows
  length = np.array([7, 5])
  mask = jnp.broadcast_to(jnp.asarray(ancestor_mask(shape.parents)),
                          (2, n, n))
  pos = jnp.asarray(length[:, None] + depth[None])
  whole, _ = fwd(tree_tokens, pos, cache, mask=mask)
  outs = []
  for d in range(shape.max_depth + 1):
    lo, hi = int(np.searchsorted(depth, d)), int(np.searchsorted(depth, d + 1))
    logits, cache = fwd(tree_tokens[:, lo:hi], pos[:, lo:hi], cache,
                        mask=mask[:, lo:hi, :hi])
    outs.append(logits)
  err = float(jnp.abs(logsm(jnp.concatenate(outs, 1)) - logsm(whole)).max())
  assert err <= F32_MODEL_TOL, err
  assert int(cache.length[0]) == 7   # nothing committed


def test_commit_path_then_continue_equals_decoding_the_path():
  model = make_model()
  fwd = testing.jitted(model)
  b = 2
  prompt = random_tokens(5, b, 5)
  tree_tokens = random_tokens(6, b, len(TREE_PARENTS))
  depth = np.array([len(path_to(TREE_PARENTS, i)) - 1
                    for i in range(len(TREE_PARENTS))])
  cache = model.init_cache(b, 32)
  _, cache = fwd(prompt, jnp.broadcast_to(jnp.arange(5), (b, 5)), cache)
  cache = testing.commit(cache, jnp.full((b,), 5))
  mask = jnp.broadcast_to(jnp.asarray(ancestor_mask(TREE_PARENTS)), (b, 6, 6))
  _, cache = fwd(tree_tokens, jnp.broadcast_to(5 + jnp.asarray(depth),
                                                 (b, 6)), cache, mask=mask)
  # Row 0 keeps the path to node 5 (0, 1, 3, 5); row 1 keeps (0, 2).
  paths = [path_to(TREE_PARENTS, 5), path_to(TREE_PARENTS, 2)]
  keep = np.zeros((b, 6), np.int32)
  for r, p in enumerate(paths):
    keep[r, :len(p)] = p
  cache = testing.commit(cache, jnp.array([len(p) for p in paths]), jnp.asarray(keep))
  np.testing.assert_array_equal(cache.length, [9, 7])
  nxt = random_tokens(7, b, 3)
  pos = cache.length[:, None] + jnp.arange(3)
  cont, _ = fwd(nxt, pos, cache)
  for r, p in enumerate(paths):
    seq = jnp.concatenate([prompt[r:r + 1], tree_tokens[r:r + 1, p],
                           nxt[r:r + 1]], axis=1)
    ref = full_forward(model, seq)[:, -3:]
    err = float(jnp.abs(logsm(cont[r:r + 1]) - logsm(ref)).max())
    assert err <= F32_MODEL_TOL, (r, err)


def test_logit_index_selects_positions():
  model = make_model()
  fwd = testing.jitted(model)
  tokens = random_tokens(8, 2, 9)
  full = full_forward(model, tokens)
  idx = jnp.array([[8, 2], [0, 5]])
  sel, _ = fwd(tokens, jnp.broadcast_to(jnp.arange(9), (2, 9)),
                 model.init_cache(2, 16), logit_index=idx)
  ref = jnp.take_along_axis(full, idx[..., None], axis=1)
  assert float(jnp.abs(sel - ref).max()) <= 1e-5


def test_forward_leaves_length_and_committed_slots_untouched():
  model = make_model()
  fwd = testing.jitted(model)
  cache = model.init_cache(1, 16)
  _, cache = fwd(random_tokens(0, 1, 4), jnp.arange(4)[None], cache)
  cache = testing.commit(cache, jnp.array([4]))
  before = [np.asarray(k[:, :, :4]) for k, _ in cache.kv]
  _, after = fwd(random_tokens(1, 1, 3), jnp.arange(4, 7)[None], cache)
  np.testing.assert_array_equal(after.length, [4])
  for k0, (k1, _) in zip(before, after.kv):
    np.testing.assert_array_equal(k0, np.asarray(k1[:, :, :4]))


def test_rmsnorm_and_rope_modules():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  norm = tr.RMSNorm(8, 1e-6, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  ref = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6)
  assert float(jnp.abs(norm(x) - ref).max()) <= 1e-5
  # RoPE preserves norms and is relative: <R(p)q, R(p+d)k> depends only on d.
  cfg = config_lib.PRESETS["tiny"]
  inv = jnp.asarray(tr.rope_inv_freq(cfg), jnp.float32)
  q = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(2), (1, 1, 1, 16))
  rq = tr.apply_rope(q, jnp.array([[3]]), inv)
  assert abs(float(jnp.linalg.norm(rq) - jnp.linalg.norm(q))) <= 1e-5
  dots = [float(jnp.sum(tr.apply_rope(q, jnp.array([[p]]), inv)
                        * tr.apply_rope(k, jnp.array([[p + 2]]), inv)))
          for p in (0, 5, 11)]
  assert max(dots) - min(dots) <= 1e-5


def test_bfloat16_smoke():
  """bf16 params and activations (f32 softmax/accumulation) track f32.

  Policy (CONTRIBUTING.md): bf16 keeps 8 mantissa bits (2^-8 relative per
  rounding), so logits may move by up to 10% of the f32 logit scale
  max|logits|; the argmax must agree wherever the f32 top-1/top-2 margin
  exceeds twice that bound.
  """
  m32 = make_model()
  cfg16 = m32.config.replace(dtype="bfloat16", param_dtype="bfloat16")
  m16 = tr.Transformer(cfg16, rngs=nnx.Rngs(0))
  nnx.update(m16, jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                               nnx.state(m32, nnx.Param)))
  tokens = random_tokens(9, 1, 12)
  l32 = full_forward(m32, tokens)
  l16 = full_forward(m16, tokens)
  assert l16.dtype == jnp.float32  # logits accumulate in f32
  assert bool(jnp.all(jnp.isfinite(l16)))
  bound = 0.1 * float(jnp.abs(l32).max())
  err = float(jnp.abs(l16 - l32).max())
  assert err <= bound, (err, bound)
  top2 = jnp.sort(l32, axis=-1)[..., -2:]
  clear = (top2[..., 1] - top2[..., 0]) > 2 * bound
  assert bool(jnp.all(jnp.where(clear, l16.argmax(-1) == l32.argmax(-1), True)))


def test_every_parameter_has_logical_axes():
  model = make_model(tie_embeddings=False, qkv_bias=True)
  fwd = testing.jitted(model)
  # Strings, not the module's constants: a constant rebound by a class of
  # the same name (`MLP`) once made the MLP's axes the class itself.
  allowed = {"embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", None}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var.get_value().ndim, path
    assert set(axes) <= allowed, (path, axes)


@pytest.mark.parametrize("name", sorted(config_lib.PRESETS))
def test_presets_build_abstractly(name):
  cfg = config_lib.PRESETS[name]
  model = nnx.eval_shape(lambda: tr.Transformer(cfg, rngs=nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == cfg.num_params()


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    config_lib.PRESETS["tiny"].replace(num_kv_heads=3)
  with pytest.raises(ValueError, match="unsupported rope scaling"):
    config_lib.PRESETS["tiny"].replace(rope_scaling={"rope_type": "yarn",
                                                     "factor": 2.0})


def test_attention_impls_agree():
  """'dot' (accelerators) and 'fused' (XLA:CPU) compute the same function."""
  rng = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(rng[0], (2, 3, 6, 16))
  k = jax.random.normal(rng[1], (2, 3, 20, 16))
  v = jax.random.normal(rng[2], (2, 3, 20, 16))
  vis = jax.random.bernoulli(rng[3], 0.7, (2, 1, 6, 20)).at[..., 0].set(True)
  a = tr.grouped_attention(q, [(k, v, vis)], 0.25, jnp.float32, "dot")
  b = tr.grouped_attention(q, [(k, v, vis)], 0.25, jnp.float32, "fused")
  assert float(jnp.abs(a - b).max()) <= 1e-5
  # Keys split in two segments: one softmax over both, the same function.
  split = [(k[:, :, :13], v[:, :, :13], vis[..., :13]),
           (k[:, :, 13:], v[:, :, 13:], vis[..., 13:])]
  for impl, whole in (("dot", a), ("fused", b)):
    parts = tr.grouped_attention(q, split, 0.25, jnp.float32, impl)
    assert float(jnp.abs(parts - whole).max()) <= 1e-5
  with pytest.raises(ValueError, match="attention_impl"):
    tr.resolve_attention_impl("flash")
  # 'auto' on CPU: the fused form for a single-token step (T*G <= 4), dots
  # for a verify (SmolLM2's G = 3: T = 2 is 6 queries); dots off CPU.
  assert tr.resolve_attention_impl("auto", 3, "cpu") == "fused"
  assert tr.resolve_attention_impl("auto", 6, "cpu") == "dot"
  assert tr.resolve_attention_impl("auto", 3, "tpu") == "dot"


@st.composite
def trees(draw, n=6):
  """Random valid parent arrays: node 0 is the root, parent[i] < i."""
  return [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]


# Wide matrix (slow tier); test_tree_mask_equals_each_root_to_node_path is
# the default tier's representative of the property.
@pytest.mark.slow
@settings(deadline=None, derandomize=True, max_examples=6)
@given(parents=trees())
def test_random_tree_masks_match_paths(parents):
  """Any tree under its ancestor mask == each root-to-node path, batched.

  Shapes are fixed (6 tree nodes; paths right-padded to 12 tokens) so all
  examples share two compiled programs.
  """
  model = _hyp_model()
  fwd = testing.jitted(model)
  prompt = random_tokens(3, 1, 5)
  tree_tokens = random_tokens(4, 1, 6)
  depth = np.array([len(path_to(parents, i)) - 1 for i in range(6)])
  cache = model.init_cache(1, 16)
  _, cache = fwd(prompt, jnp.arange(5)[None], cache)
  cache = testing.commit(cache, jnp.array([5]))
  mask = jnp.asarray(ancestor_mask(parents))[None]
  tree_logits, _ = fwd(tree_tokens, jnp.asarray(5 + depth)[None], cache, mask)
  seqs = np.zeros((6, 12), np.int32)
  for node in range(6):
    seq = np.concatenate([prompt[0], tree_tokens[0, path_to(parents, node)]])
    seqs[node, :len(seq)] = seq
  ref = testing.full_forward(model, jnp.asarray(seqs))
  ref = ref[jnp.arange(6), jnp.asarray(5 + depth)]
  err = float(jnp.abs(logsm(tree_logits[0]) - logsm(ref)).max())
  assert err <= F32_MODEL_TOL, err


@functools.cache
def _hyp_model():
  return testing.tiny_model()
