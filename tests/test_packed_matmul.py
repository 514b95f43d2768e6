"""The packed small-M matmul kernel and the f32_packed and bf16_packed
policies (issue 15; bf16 panels: issue 14's cheap verify).

The kernel (`seqdec.kernels.packed_matmul`, a C++ XLA FFI call built for
the host on first use) is held to a float64 matmul (of the bf16-rounded
operands for bf16 panels), and to batch invariance: a row's result does
not depend on the other rows of the call. Its bf16 code paths (AMX tiles,
VDPBF16PS, widened pairs) are each built and checked in a subprocess
(slow tier). The policies are held to their XLA twins' logits (1e-4 on
log-softmax, the whole-model bound) and to greedy speculative == greedy
autoregressive.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqdec import Generator, Tokenizer, testing
from seqdec.bench import first_divergence
from seqdec.kernels import packed_matmul as pm
from seqdec.models import transformer as tr

# (M, K, N): one row; a tree's worth with N not a multiple of 16 and an odd
# number of panels; more rows than a register tile (12): two row blocks;
# (bf16) K not a multiple of 32 (zero-padded pairs) and more rows than an
# AMX tile (16).
SHAPES = [(1, 64, 48), (5, 96, 40), (13, 32, 64), (18, 37, 20)]
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def check_against_float64(m, k, n, dtype):
  """|y - x @ W| <= 1e-5 (|x| @ |W|): float32 rounding of K products (for
  bf16 panels x and W rounded to bf16 first, whose products are exact)."""
  rng = np.random.default_rng([m, k, n])
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, n)), dtype)
  pw = pm.PackedWeight.from_matrix(w)
  pm.ensure_registered()
  y = np.asarray(jax.jit(lambda x, pw: pw.matmul(x))(x, pw))
  x64 = np.asarray(x.astype(dtype), np.float64)
  w64 = np.asarray(w, np.float64)
  ref, scale = x64 @ w64, np.abs(x64) @ np.abs(w64)
  assert y.shape == (m, n) and y.dtype == np.float32
  assert np.all(np.abs(y - ref) <= 1e-5 * scale)
  return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_kernel_matches_a_float64_matmul(m, k, n, dtype):
  check_against_float64(m, k, n, DTYPES[dtype])


def check_rows_alone(dtype, rows=18):
  """Batch invariance, bit for bit: each row of an 18-row call (two row
  blocks of either path) equals the same row alone, and within a 5-row
  call."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((rows, 96)), jnp.float32)
  pw = pm.PackedWeight.from_matrix(
      jnp.asarray(rng.standard_normal((96, 80)), dtype))
  pm.ensure_registered()
  f = jax.jit(lambda x, pw: pw.matmul(x))
  whole = np.asarray(f(x, pw))
  for i in (0, 7, 8, 12, 16, 17):
    np.testing.assert_array_equal(np.asarray(f(x[i:i + 1], pw))[0], whole[i])
  np.testing.assert_array_equal(np.asarray(f(x[3:8], pw)), whole[3:8])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_do_not_depend_on_the_other_rows(dtype):
  check_rows_alone(DTYPES[dtype])


_PATH_SCRIPT = """
import json, sys
import numpy as np
import jax.numpy as jnp
sys.path.insert(0, {tests!r})
from test_packed_matmul import SHAPES, check_against_float64, check_rows_alone
out = {{}}
for m, k, n in SHAPES:
  out[f"{{m}},{{k}},{{n}}"] = check_against_float64(m, k, n, jnp.bfloat16).tolist()
check_rows_alone(jnp.bfloat16)
print("RESULT", json.dumps(out))
"""

# The bf16 kernel's code paths, by what the build is told the host lacks.
BF16_PATHS = {"dpbf16": "-mno-amx-tile -mno-amx-bf16",
              "portable": "-mno-amx-tile -mno-amx-bf16 -mno-avx512bf16"}


def _bf16_path_results(flags: str) -> dict:
  env = dict(os.environ, **{pm.FLAGS_ENV: flags})
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  done = subprocess.run(
      [sys.executable, "-c",
       _PATH_SCRIPT.format(tests=os.path.dirname(__file__))],
      env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT"))
  return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_each_bf16_code_path_matches_float64_and_the_two_vector_paths_agree():
  """Built without AMX (VDPBF16PS where the host has it) and without
  either (pairs widened to float32): each path within the float64 bound
  and batch-invariant, and the two vector paths bit for bit equal (both
  add a pair's odd product, then its even one, in k order). On a host
  without AVX512-BF16 both builds are the portable path."""
  results = {name: _bf16_path_results(flags)
             for name, flags in BF16_PATHS.items()}
  for key in results["dpbf16"]:
    np.testing.assert_array_equal(np.asarray(results["dpbf16"][key]),
                                  np.asarray(results["portable"][key]),
                                  err_msg=key)


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


def test_bf16_pack_layout_and_columns():
  """bf16 panels hold k pairs: panels[p, k2, 2j + e] = W[2 k2 + e, 16p + j],
  K zero-padded to a multiple of 32 (whole AMX tiles); unpack and
  `columns(ids)` give W back exactly, odd K included."""
  w = np.arange(3 * 20, dtype=np.float32).reshape(3, 20).astype(jnp.bfloat16)
  panels = pm.pack(w)
  assert panels.shape == (2, 16, 32) and panels.dtype == w.dtype
  assert panels[1, 1, 2 * 3 + 0] == w[2, 19]
  assert panels[1, 0, 2 * 3 + 1] == w[1, 19]
  assert panels[1, 1, 2 * 3 + 1] == 0 and panels[1, 1, 2 * 4] == 0
  np.testing.assert_array_equal(pm.unpack(panels, 20, 3), w)
  pw = pm.PackedWeight.from_matrix(jnp.asarray(w))
  assert pw.in_dim == 3 and pw.shape == w.shape
  np.testing.assert_array_equal(pw.to_array(), w)
  assert pm.PackedWeight.from_matrix(jnp.asarray(w.T),
                                     transposed=True).shape == w.T.shape
  ids = jnp.asarray([[0, 19], [16, 5]])
  np.testing.assert_array_equal(pw.columns(ids), w.T[np.asarray(ids)])


# Each packed policy and its XLA twin: the same function.
TWINS = {"f32_packed": "f32", "bf16_packed": "bf16_weights"}


@pytest.mark.parametrize("policy", TWINS)
@pytest.mark.parametrize("tied", [True, False])
def test_a_packed_model_equals_its_xla_twin(policy, tied):
  """The policy packs every weight matmul's matrix (a tied embedding as the
  head); its logits equal its XLA twin's (f32, bf16_weights) within the
  whole-model bound (1e-4 on log-softmax) over a prompt and over a cached
  continuation; back to the twin, the weights are the twin's bit for
  bit."""
  src = testing.tiny_model(tie_embeddings=tied)
  twin = tr.with_precision(src, TWINS[policy])
  model = tr.with_precision(src, policy)
  assert model.config.matmul_impl == "packed"
  packed = (model.layers[0].attn.qkv_proj, model.layers[1].mlp.down_proj,
            model.embed if tied else model.lm_head)
  assert all(isinstance(p[...], pm.PackedWeight) for p in packed)
  assert packed[0][...].dtype == twin.layers[0].attn.qkv_proj[...].dtype
  if not tied:
    assert not isinstance(model.embed[...], pm.PackedWeight)
  tokens = jnp.asarray([[3, 17, 250, 9, 44, 101, 7, 7]])
  ls = lambda m: jax.nn.log_softmax(testing.full_forward(m, tokens), -1)
  graphdef, state = nnx.split(model)
  hlo = jax.jit(lambda s: nnx.merge(graphdef, s).head(
      jnp.ones((2, 64)))).lower(state).as_text()
  target = pm.TARGET_BF16 if policy == "bf16_packed" else pm.TARGET
  assert f"@{target}(" in hlo   # the head runs the kernel, not XLA's dot
  delta = float(jnp.abs(ls(model) - ls(twin)).max())
  print(f"{policy} vs {TWINS[policy]} (tiny, tied={tied}): max |Δ "
        f"log_softmax| {delta:.3g}")
  assert delta <= 1e-4
  back = tr.with_precision(model, TWINS[policy])
  for a, b in zip(jax.tree.leaves(nnx.state(back)),
                  jax.tree.leaves(nnx.state(twin))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("policy", ["f32", "f32_packed", "bf16_packed"])
@pytest.mark.parametrize("tied", [True, False])
def test_a_prebuilt_trimmed_head_equals_the_gathering_one(policy, tied):
  """`head_weight(ids)` (built once by a trimmed drafter head, packed under
  f32_packed) gives `head(f, ids)`'s logits, tied and untied: the same
  kept columns, a kernel or XLA dot over them."""
  model = tr.with_precision(testing.tiny_model(tie_embeddings=tied), policy)
  ids = jnp.asarray([5, 0, 200, 17, 99, 255, 1, 42, 7])
  f = jax.random.normal(jax.random.key(2), (2, 3, 64))
  w = model.head_weight(ids)
  assert isinstance(w, pm.PackedWeight) == policy.endswith("_packed")
  np.testing.assert_allclose(model.head(f, ids, w), model.head(f, ids),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.head(f, weight=w),
                             model.head(f)[..., ids], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", TWINS)
def test_speculative_equals_autoregressive_under_a_packed_policy(policy):
  """Greedy speculative (layer skip, 4-chains: 5-token verifies) == greedy
  AR (1-token steps) under f32_packed and bf16_packed. The matmuls are
  batch-invariant, so only attention's contraction differs between the
  two call shapes: equal tokens wherever the AR margin exceeds 1e-4 (the
  float32 token rule)."""
  model = tr.with_precision(testing.tiny_model(), policy)
  tok = Tokenizer.byte_level()
  prompts = ["abcabcabc", "hello there"]
  kw = dict(max_new_tokens=12, eos_ids=())
  ar = Generator(model, tok, **kw).generate(prompts)
  spec = Generator(model, tok, "layerskip@layers=first:1/chain4",
                   **kw).generate(prompts)
  for a, s in zip(ar, spec):
    d = first_divergence(a.tokens, s.tokens)
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
