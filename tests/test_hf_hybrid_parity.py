"""HF parity of the Mamba-2 and Bamba (Mamba-2 + attention) loaders.

Oracle: transformers' `Mamba2ForCausalLM` and `BambaForCausalLM` (torch
reference paths on CPU) on tiny random checkpoints with non-trivial weights.

Bounds. HF's Mamba mixer and gated norm compute in float32 even under
`.double()`, so HF has no float64 oracle. float32 vs float32 is held to the
whole-model policy (1e-4, CONTRIBUTING.md). seqdec's float64 model is exact
(its parallel form equals its step form to 1e-10, test_hybrid.py), so its
distance from HF's `.double()` is HF's own rounding inside the mixer, which
is of the order of HF's float32-vs-`.double()` spread: it is held to twice
that spread, measured in the test.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqdec.checkpoints import hf
from seqdec.checkpoints.convert import CheckpointError
from seqdec.models.protocol import run_prompt

pytestmark = pytest.mark.oracle

CASES = {
    "mamba2": dict(num_heads=4, head_dim=16, vocab_size=260, hidden_size=32,
                   state_size=8, num_hidden_layers=2, n_groups=2,
                   chunk_size=8, expand=2, conv_kernel=4,
                   time_step_limit=(0.0, 5.0), tie_word_embeddings=True),
    "bamba": dict(vocab_size=260, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, attn_layer_indices=[1],
                  mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2,
                  mamba_d_state=8, mamba_chunk_size=8),
}
T = 21


def build(name: str, root: str):
  """Saves a tiny random HF model; returns (dir, ids, f32 logits, f64
  logits) of HF on a batch of two random sequences."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cls, cfg_cls = {"mamba2": (transformers.Mamba2ForCausalLM,
                             transformers.Mamba2Config),
                  "bamba": (transformers.BambaForCausalLM,
                            transformers.BambaConfig)}[name]
  torch.manual_seed(0)
  model = cls(cfg_cls(**CASES[name])).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if "A_log" in pname:                      # decays 0.14 .. 0.98 / token
        p.copy_(torch.log(torch.rand_like(p) * 3.5 + 0.5))
      elif "dt_bias" in pname:
        p.normal_(-1.0, 0.5)
      elif p.ndim > 1:
        p.normal_(0, 0.3)
      elif "norm" in pname:
        p.normal_(1, 0.5)
      else:
        p.normal_(0, 0.3)
  path = os.path.join(root, name)
  model.save_pretrained(path)
  ids = np.random.default_rng(0).integers(0, 260, (2, T))
  with torch.no_grad():
    f32 = model(torch.tensor(ids)).logits.numpy()
    f64 = model.double()(torch.tensor(ids)).logits.numpy()
  return path, ids, f32, f64


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("hf_hybrid"))
  return {name: build(name, root) for name in CASES}


def forward(model, ids):
  b, t = ids.shape
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  return np.asarray(jax.jit(lambda m, x, p: m(x, p, m.init_cache(b, t))[0])(
      model, jnp.asarray(ids), pos))


@pytest.mark.parametrize("name", [
    "bamba", pytest.param("mamba2", marks=pytest.mark.slow)])
def test_float32_logits_match_hf(cases, name):
  path, ids, ref, _ = cases[name]
  model, _ = hf.load_hf(path)
  assert model.config.architecture == {"bamba": "BambaForCausalLM",
                                       "mamba2": "Mamba2ForCausalLM"}[name]
  np.testing.assert_allclose(forward(model, ids), ref, atol=1e-4)
  # Chunked prefill (13 tokens committed in chunks of 8), then the rest
  # against the committed state, also matches.
  small = nnx.eval_shape(lambda: type(model)(
      model.config.replace(scratch_slots=8), rngs=None))
  model = nnx.merge(nnx.graphdef(small), nnx.state(model))

  @jax.jit
  def extend(m, ids):
    b = ids.shape[0]
    _, cache = run_prompt(m, ids[:, :13], m.init_cache(b, 32),
                          jnp.full((b,), 13, jnp.int32))
    pos = jnp.broadcast_to(jnp.arange(13, T), (b, T - 13))
    return m(ids[:, 13:], pos, cache)[0]
  np.testing.assert_allclose(extend(model, jnp.asarray(ids)), ref[:, 13:],
                             atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bamba", "mamba2"])
def test_float64_logits_match_hf_double_within_its_spread(cases, name, x64):
  path, ids, ref32, ref64 = cases[name]
  spread = np.abs(ref32 - ref64).max()
  model, _ = hf.load_hf(path, dtype="float64")
  err = np.abs(forward(model, ids) - ref64).max()
  print(f"{name}: |seqdec f64 - HF .double()| {err:.3g}, HF f32 vs "
        f".double() {spread:.3g}")
  assert 1e-9 < spread < 1e-3      # the bound is informative
  assert err <= 2 * spread


def test_layer_pattern_that_disagrees_with_the_weights_is_refused(cases,
                                                                  tmp_path):
  path, *_ = cases["bamba"]
  bad = tmp_path / "bad"
  bad.mkdir()
  for f in os.listdir(path):
    if f != "config.json":
      os.symlink(os.path.join(path, f), bad / f)
  cfg = json.load(open(os.path.join(path, "config.json")))
  cfg["attn_layer_indices"] = [2]
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError,
                     match=r"layer 1 holds attention weights but the "
                           r"config's layer pattern says mamba2"):
    hf.load_hf(str(bad))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-hybrid", "tiny-mamba2"])
def test_exported_checkpoint_loads_in_transformers(tmp_path, preset):
  """`save_hf` writes what transformers reads: its Bamba / Mamba2 model on
  the exported directory gives seqdec's logits (whole-model policy, 1e-4),
  on `testing.tiny_hybrid`'s weights (every part non-trivial)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from seqdec import testing  # pylint: disable=g-import-not-at-top
  m = testing.tiny_hybrid(preset, "float32")
  path = hf.save_hf(m, tmp_path / preset)
  ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  assert type(ref).__name__ == m.config.architecture
  ids = np.random.default_rng(0).integers(0, 260, (2, T))
  with torch.no_grad():
    want = ref(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(forward(m, ids), want, atol=1e-4)
