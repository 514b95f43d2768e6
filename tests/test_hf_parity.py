"""Parity of `load_hf` models against transformers (torch, float32, eager).

Each case builds a tiny random HF model once per module (see `hf_fixtures`),
loads the saved directory with `seqdec.checkpoints.hf.load_hf` and compares
log-softmax of the logits of every position of a [2, 24] batch:

* full: one forward over all 24 tokens from an empty cache;
* chunked: prefill 16 tokens, commit them, then 8 more tokens in one call
  against the cache (Mistral/Qwen2 windows are 8, so both chunks run past
  the window).

Bound (CONTRIBUTING.md, whole model, float32): max |Δ log_softmax| <= 1e-4.

The float32 differences (~1e-5 with these deliberately large random weights)
are rounding only: `test_float64_logits_match_exactly` runs both sides in
float64 (on `FLOAT64_CASES`), with the three places where transformers forces
float32 even in a float64 model (RoPE cos/sin, RMSNorm, eager softmax) patched
to float64, and the logits then agree to ~1e-14 (bound 1e-10).
"""

from typing import Any, NamedTuple

import numpy as np
import pytest

import hf_fixtures
from seqdec.checkpoints.convert import model_from_hf_tensors
from seqdec.checkpoints.convert import model_to_hf_tensors
from seqdec.checkpoints.hf import load_hf
from seqdec.models.transformer import commit
from seqdec.models.transformer import rope_inv_freq

pytestmark = pytest.mark.oracle

BATCH, SEQ, PREFILL = 2, 24, 16
TOL = 1e-4  # absolute, whole model in float32; never loosen to pass.
TOL_F64 = 1e-10  # CONTRIBUTING.md: anything in float64.
# The float64 check costs a second set of compilations; these cases cover
# every mapping feature (GQA, untied/tied heads, head_dim != D/H, llama3 RoPE,
# q/k/v biases, sliding window).
# CI time: two in the default tier, the rest slow.
FLOAT64_CASES = ("llama_rope_llama3", "gemma3_gqa_window") + tuple(
    pytest.param(n, marks=pytest.mark.slow) for n in (
        "llama_head_dim_32", "qwen2_qkv_bias", "mistral_window_8",
        "llama_attn_mlp_bias"))
ALL_CASES = sorted(hf_fixtures.PARITY_CASES)
WINDOW_CASES = ("mistral_window_8", "qwen2_sliding_all_layers",
                "gemma3_gqa_window", "gemma3_mqa_tied")


def _log_softmax(x: np.ndarray) -> np.ndarray:
  """Row-wise log-softmax over the last axis, in float64."""
  x = np.asarray(x, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class _Case(NamedTuple):
  """One built parity case."""
  name: str
  ref: np.ndarray  # [B, T, V] float64 HF log-probs (float32 forward)
  model: Any  # the seqdec Transformer, float32
  tokens: np.ndarray  # [B, T] int32
  path: str  # the checkpoint directory
  hf_model: Any  # the HF model, float32, eager attention


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  """`name -> _Case`, each case built on first use, once per module."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  built: dict[str, _Case] = {}

  def get(name: str) -> _Case:
    if name not in built:
      path = str(tmp_path_factory.mktemp(name))
      hf_model = hf_fixtures.build_hf_model(name, path)
      tokens = np.random.default_rng(1).integers(
          0, hf_model.config.vocab_size, (BATCH, SEQ)).astype(np.int32)
      with torch.no_grad():
        logits = hf_model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                          use_cache=False).logits
      model, tokenizer = load_hf(path, dtype="float32")
      assert tokenizer is None  # save_pretrained of a model writes none
      built[name] = _Case(name, _log_softmax(logits.float().numpy()), model,
                          tokens, path, hf_model)
    return built[name]

  return get


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


@pytest.mark.parametrize("name", ALL_CASES)
def test_full_sequence_matches_hf(cases, name):
  _, ref, model, tokens = cases(name)[:4]
  cache = model.init_cache(BATCH, SEQ)
  logits, _ = model(tokens, _positions(0, SEQ), cache, logit_index=None)
  assert _report(name, "full", ref, np.asarray(logits)) <= TOL


# CI time: the default tier prefills then extends the cases that stand for
# the transformer's cache-contract variants run only in the slow tier
# (tests/TIERS.md: untied, MHA, q/k/v bias, llama3 RoPE) and Gemma's tied MQA
# with its local/global layers; every case runs in the slow tier, and every
# case's full-sequence parity in the default one.
DEFAULT_CHUNKED = ("llama_gqa_untied", "llama_tied_mha", "qwen2_qkv_bias",
                   "llama_rope_llama3", "gemma3_mqa_tied")
CHUNKED_CASES = [n if n in DEFAULT_CHUNKED else
                 pytest.param(n, marks=pytest.mark.slow) for n in ALL_CASES]


@pytest.mark.parametrize("name", CHUNKED_CASES)
def test_chunked_prefill_then_extend_matches_hf(cases, name):
  _, ref, model, tokens = cases(name)[:4]
  cache = model.init_cache(BATCH, SEQ)
  first, cache = model(tokens[:, :PREFILL], _positions(0, PREFILL), cache)
  cache = commit(cache, np.full((BATCH,), PREFILL, np.int32))
  second, cache = model(tokens[:, PREFILL:], _positions(PREFILL, SEQ), cache)
  assert np.all(np.asarray(cache.length) == PREFILL)
  got = np.concatenate([np.asarray(first), np.asarray(second)], axis=1)
  assert _report(name, "chunked 16+8", ref, got) <= TOL


@pytest.mark.parametrize("name", ALL_CASES)
def test_config_mapping(cases, name):
  """The features each case exists to exercise really reach the model."""
  c = cases(name).model.config
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
      "llama_attn_mlp_bias": dict(qkv_bias=True, o_bias=True, mlp_bias=True),
      "gemma3_gqa_window": dict(
          num_kv_heads=2, sliding_window=8, query_pre_attn_scalar=24.0,
          layer_types=("sliding_attention", "full_attention",
                       "sliding_attention"),
          rope_theta=100000.0, rope_local_theta=1000.0,
          rope_scaling_dict=dict(rope_type="linear", factor=2.0),
          activation="gelu_tanh", embed_scale=True, norm_offset=1.0,
          sandwich_norm=True, qk_norm=True, tie_embeddings=False),
      "gemma3_mqa_tied": dict(num_kv_heads=1, sliding_window=5,
                              tie_embeddings=True,
                              layer_types=("sliding_attention",) * 2,
                              rope_theta=1e6, rope_local_theta=1e4),
  }[name]
  for attr, value in expected.items():
    assert getattr(c, attr) == value, (name, attr)


@pytest.mark.parametrize("name", WINDOW_CASES)
def test_window_cases_depend_on_the_window(cases, name):
  """Without its sliding window the model must diverge from HF.

  Otherwise a window case would test nothing about the window.
  """
  _, ref, model, tokens = cases(name)[:4]
  assert model.config.sliding_window < SEQ
  windowless = model_from_hf_tensors(model.config.replace(sliding_window=None),
                                     model_to_hf_tensors(model))
  logits, _ = windowless(tokens, _positions(0, SEQ),
                         windowless.init_cache(BATCH, SEQ))
  delta = np.max(np.abs(_log_softmax(np.asarray(logits)) - ref))
  assert delta > 100 * TOL, f"{name}: the window has no effect ({delta:.1e})"


@pytest.mark.parametrize("name", FLOAT64_CASES)
def test_float64_logits_match_exactly(cases, name, x64):
  """Both sides in float64: any mapping error shows far above rounding."""
  import torch  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  _, _, _, tokens, path, hf_model = cases(name)
  model, _ = load_hf(path, dtype="float64")
  inv = rope_inv_freq(model.config)  # float64, HF's scaling rules
  inv_local = (rope_inv_freq(model.config, local=True)
               if model.config.rope_local_theta is not None else None)
  assert model.inv_freq.get_value().dtype == jnp.float64

  try:
    with hf_fixtures.float64_forward(hf_model, inv, inv_local) as hf64, \
        torch.no_grad():
      ref = hf64(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                 use_cache=False).logits.numpy()
  finally:
    hf_model.float()
  logits, _ = model(tokens, _positions(0, SEQ), model.init_cache(BATCH, SEQ))
  logits = np.asarray(logits)
  assert logits.dtype == np.float64
  delta = float(np.max(np.abs(logits - ref)))
  print(f"\n{name} [float64] max|dlogits| = {delta:.3e}")
  assert delta <= TOL_F64
