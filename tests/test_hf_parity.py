"""Parity of `load_hf` models against transformers (torch, float32, eager).

Each case builds a tiny random HF model once per module (see `hf_fixtures`),
loads the saved directory with `seqdec.checkpoints.hf.load_hf` and compares
log-softmax of the logits of every position of a [2, 24] batch:

* full: one forward over all 24 tokens from an empty cache;
* chunked: prefill 16 tokens, commit them, then 8 more tokens in one call
  against the cache (Mistral/Qwen2 windows are 8, so both chunks run past
  the window).

Bound (CONTRIBUTING.md, whole model, float32): max |Δ log_softmax| <= 1e-4.
"""

import numpy as np
import pytest

import hf_fixtures
from seqdec.checkpoints.hf import load_hf
from seqdec.models.transformer import commit

pytestmark = pytest.mark.oracle

BATCH, SEQ, PREFILL = 2, 24, 16
TOL = 1e-4  # absolute, whole model in float32; never loosen to pass.


def _log_softmax(x: np.ndarray) -> np.ndarray:
  """Row-wise log-softmax over the last axis, in float64."""
  x = np.asarray(x, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@pytest.fixture(scope="module", params=sorted(hf_fixtures.PARITY_CASES))
def case(request, tmp_path_factory):
  """(name, HF log-probs [B, T, V], seqdec model, tokens [B, T]) per case."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  name = request.param
  path = str(tmp_path_factory.mktemp(name))
  hf_model = hf_fixtures.build_hf_model(name, path)
  tokens = np.random.default_rng(1).integers(
      0, hf_model.config.vocab_size, (BATCH, SEQ)).astype(np.int32)
  with torch.no_grad():
    logits = hf_model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                      use_cache=False).logits
  ref = _log_softmax(logits.float().numpy())
  model, tokenizer = load_hf(path)
  assert tokenizer is None  # save_pretrained of a model writes none
  return name, ref, model, tokens


def _positions(start: int, stop: int) -> np.ndarray:
  return np.broadcast_to(np.arange(start, stop, dtype=np.int32),
                         (BATCH, stop - start))


def _report(name: str, kind: str, ref: np.ndarray, got: np.ndarray) -> float:
  assert got.shape == ref.shape
  delta = float(np.max(np.abs(_log_softmax(got) - ref)))
  print(f"\n{name} [{kind}] max|dlog_softmax| = {delta:.3e}")
  # Non-flat logits, or the comparison would prove little.
  assert float(np.std(ref)) > 0.5, "reference logits are too flat"
  return delta


def test_full_sequence_matches_hf(case):
  name, ref, model, tokens = case
  cache = model.init_cache(BATCH, SEQ)
  logits, _ = model(tokens, _positions(0, SEQ), cache, logit_index=None)
  assert _report(name, "full", ref, np.asarray(logits)) <= TOL


def test_chunked_prefill_then_extend_matches_hf(case):
  name, ref, model, tokens = case
  cache = model.init_cache(BATCH, SEQ)
  first, cache = model(tokens[:, :PREFILL], _positions(0, PREFILL), cache)
  cache = commit(cache, np.full((BATCH,), PREFILL, np.int32))
  second, cache = model(tokens[:, PREFILL:], _positions(PREFILL, SEQ), cache)
  assert np.all(np.asarray(cache.length) == PREFILL)
  got = np.concatenate([np.asarray(first), np.asarray(second)], axis=1)
  assert _report(name, "chunked 16+8", ref, got) <= TOL


def test_config_mapping(case):
  """The features each case exists to exercise really reach the model."""
  name, _, model, _ = case
  c = model.config
  expected = {
      "llama_gqa_untied": dict(num_heads=4, num_kv_heads=2,
                               tie_embeddings=False),
      "llama_tied_mha": dict(num_kv_heads=4, tie_embeddings=True),
      "llama_rope_llama3": dict(rope_scaling_dict=dict(
          rope_type="llama3", factor=8.0, low_freq_factor=1.0,
          high_freq_factor=4.0, original_max_position_embeddings=64.0)),
      "llama_rope_linear": dict(rope_theta=5000.0, rope_scaling_dict=dict(
          rope_type="linear", factor=4.0)),
      "llama_head_dim_32": dict(head_dim=32),
      "qwen2_qkv_bias": dict(qkv_bias=True, tie_embeddings=True,
                             rope_theta=1e6, sliding_window=None),
      "qwen2_sliding_all_layers": dict(qkv_bias=True, sliding_window=8),
      "mistral_window_8": dict(sliding_window=8, qkv_bias=False),
      "llama_sharded_3l": dict(num_layers=3),
  }[name]
  for attr, value in expected.items():
    assert getattr(c, attr) == value, (name, attr)
