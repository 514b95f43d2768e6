"""The packed small-M matmul kernel and the f32_packed policy (issue 15).

The kernel (`seqdec.kernels.packed_matmul`, a C++ XLA FFI call built for
the host on first use) is held to a float64 matmul, and to batch
invariance: a row's result does not depend on the other rows of the call.
The policy is held to the f32 model's logits (1e-4 on log-softmax, the
whole-model bound) and to greedy speculative == greedy autoregressive.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqdec import Generator, Tokenizer, testing
from seqdec.kernels import packed_matmul as pm
from seqdec.models import transformer as tr

# (M, K, N): one row; a tree's worth with N not a multiple of 16 and an odd
# number of panels; more rows than a register tile (12): two row blocks.
SHAPES = [(1, 64, 48), (5, 96, 40), (13, 32, 64)]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_kernel_matches_a_float64_matmul(m, k, n):
  """|y - x @ W| <= 1e-5 (|x| @ |W|): float32 rounding of K products."""
  rng = np.random.default_rng([m, k, n])
  x = rng.standard_normal((m, k)).astype(np.float32)
  w = rng.standard_normal((k, n)).astype(np.float32)
  pw = pm.PackedWeight.from_matrix(jnp.asarray(w))
  pm.ensure_registered()
  y = np.asarray(jax.jit(lambda x, pw: pw.matmul(x))(jnp.asarray(x), pw))
  ref = x.astype(np.float64) @ w.astype(np.float64)
  scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)
  assert y.shape == (m, n)
  assert np.all(np.abs(y - ref) <= 1e-5 * scale)


def test_rows_do_not_depend_on_the_other_rows():
  """Batch invariance, bit for bit: each row of a 13-row call equals the
  same row alone, and within a 5-row call."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((13, 96)), jnp.float32)
  pw = pm.PackedWeight.from_matrix(
      jnp.asarray(rng.standard_normal((96, 80)), jnp.float32))
  pm.ensure_registered()
  f = jax.jit(lambda x, pw: pw.matmul(x))
  whole = np.asarray(f(x, pw))
  for i in (0, 7, 8, 12):
    np.testing.assert_array_equal(np.asarray(f(x[i:i + 1], pw))[0], whole[i])
  np.testing.assert_array_equal(np.asarray(f(x[3:8], pw)), whole[3:8])


def test_pack_layout_and_columns():
  """panels[p, k, j] = W[k, 16p + j] (zero padded); unpack inverts it;
  `columns(ids)` reads W[:, ids] as rows; shaped matrices keep their
  output shape."""
  w = np.arange(3 * 20, dtype=np.float32).reshape(3, 20)
  panels = pm.pack(w)
  assert panels.shape == (2, 3, 16)
  assert panels[1, 2, 3] == w[2, 19] and panels[1, 2, 4] == 0
  np.testing.assert_array_equal(pm.unpack(panels, 20), w)
  pw = pm.PackedWeight.from_matrix(jnp.asarray(w))
  ids = jnp.asarray([[0, 19], [16, 5]])
  np.testing.assert_array_equal(pw.columns(ids), w.T[np.asarray(ids)])
  shaped = pm.PackedWeight.from_matrix(jnp.asarray(w.reshape(3, 4, 5)))
  assert shaped.out_shape == (4, 5) and shaped.in_dim == 3
  tied = pm.PackedWeight.from_matrix(jnp.asarray(w.T), transposed=True)
  np.testing.assert_array_equal(pm.unpack(tied.panels, 20), w)
  with pytest.raises(TypeError, match="read whole"):
    pw[0]


@pytest.mark.parametrize("tied", [True, False])
def test_f32_packed_model_equals_the_f32_model(tied):
  """The policy packs every weight matmul's matrix (a tied embedding as the
  head); its logits equal the f32 model's within the whole-model bound
  (1e-4 on log-softmax) over a prompt and over a cached continuation; back
  to f32, the weights are the original ones bit for bit."""
  src = testing.tiny_model(tie_embeddings=tied)
  model = tr.with_precision(src, "f32_packed")
  assert model.config.matmul_impl == "packed"
  packed = (model.layers[0].attn.qkv_proj, model.layers[1].mlp.down_proj,
            model.embed if tied else model.lm_head)
  assert all(isinstance(p[...], pm.PackedWeight) for p in packed)
  if not tied:
    assert not isinstance(model.embed[...], pm.PackedWeight)
  tokens = jnp.asarray([[3, 17, 250, 9, 44, 101, 7, 7]])
  ls = lambda m: jax.nn.log_softmax(testing.full_forward(m, tokens), -1)
  graphdef, state = nnx.split(model)
  hlo = jax.jit(lambda s: nnx.merge(graphdef, s).head(
      jnp.ones((2, 64)))).lower(state).as_text()
  assert pm.TARGET in hlo     # the head runs the kernel, not XLA's dot
  delta = float(jnp.abs(ls(model) - ls(src)).max())
  print(f"f32_packed vs f32 (tiny, tied={tied}): max |Δ log_softmax| "
        f"{delta:.3g}")
  assert delta <= 1e-4
  back = tr.with_precision(model, "f32")
  for a, b in zip(jax.tree.leaves(nnx.state(back)),
                  jax.tree.leaves(nnx.state(src))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("policy", ["f32", "f32_packed"])
@pytest.mark.parametrize("tied", [True, False])
def test_a_prebuilt_trimmed_head_equals_the_gathering_one(policy, tied):
  """`head_weight(ids)` (built once by a trimmed drafter head, packed under
  f32_packed) gives `head(f, ids)`'s logits, tied and untied: the same
  kept columns, a kernel or XLA dot over them."""
  model = tr.with_precision(testing.tiny_model(tie_embeddings=tied), policy)
  ids = jnp.asarray([5, 0, 200, 17, 99, 255, 1, 42, 7])
  f = jax.random.normal(jax.random.key(2), (2, 3, 64))
  w = model.head_weight(ids)
  assert isinstance(w, pm.PackedWeight) == (policy == "f32_packed")
  np.testing.assert_allclose(model.head(f, ids, w), model.head(f, ids),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.head(f, weight=w),
                             model.head(f)[..., ids], rtol=1e-5, atol=1e-5)


def test_speculative_equals_autoregressive_under_f32_packed():
  """Greedy speculative (layer skip, 4-chains: 5-token verifies) == greedy
  AR (1-token steps) under f32_packed. The matmuls are batch-invariant, so
  only attention's contraction differs between the two call shapes: equal
  tokens wherever the AR margin exceeds 1e-4 (the float32 token rule)."""
  model = tr.with_precision(testing.tiny_model(), "f32_packed")
  tok = Tokenizer.byte_level()
  prompts = ["abcabcabc", "hello there"]
  kw = dict(max_new_tokens=12, eos_ids=())
  ar = Generator(model, tok, **kw).generate(prompts)
  spec = Generator(model, tok, "layerskip@layers=first:1/chain4",
                   **kw).generate(prompts)
  for a, s in zip(ar, spec):
    d = next((i for i, (x, y) in enumerate(zip(a.tokens, s.tokens))
              if x != y), None)
    if d is not None:
      assert a.margins[d] <= 1e-4, (d, a.margins[d])
  assert sum(r.metrics["tau"] for r in spec) / len(spec) > 1.0


def test_a_host_without_a_compiler_gets_a_clear_error(tmp_path, monkeypatch):
  """No usable compiler and nothing built yet: KernelBuildError naming the
  way out (precision=f32), not a crash inside XLA."""
  monkeypatch.setenv("SEQDEC_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises(pm.KernelBuildError, match="failed"):
    pm.library_path()
  monkeypatch.delenv("CXX")
  monkeypatch.setenv("PATH", str(tmp_path))
  with pytest.raises(pm.KernelBuildError, match="precision=f32"):
    pm.library_path()
  assert not os.listdir(tmp_path) or os.listdir(tmp_path) == ["kernels"]
