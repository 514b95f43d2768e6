"""GGUF metadata -> `TransformerConfig` (llama family with RoPE scaling, and
Gemma 3)."""

from __future__ import annotations

from typing import Any

import numpy as np

from seqdec.checkpoints.convert import CheckpointError
from seqdec.checkpoints.gguf.reader import get_field
from seqdec.checkpoints.gguf.tensors import dequantize
from seqdec.models.config import GLOBAL, LOCAL, TransformerConfig
from seqdec.models.transformer import rope_inv_freq

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")

# What llama.cpp's Gemma 3 files leave out, filled with Gemma3TextConfig's
# defaults as transformers' GGUF loader does: every 6th layer global, the
# local layers' RoPE base, the query scale.
GEMMA3_DEFAULTS = dict(sliding_window_pattern=6, rope_local_theta=10_000.0,
                       query_pre_attn_scalar=256.0, sliding_window=4096)


def check_architecture(arch: Any) -> None:
  """Raises CheckpointError unless `arch` is one seqdec's loader reads."""
  if arch not in SUPPORTED_ARCHITECTURES:
    raise CheckpointError(
        f"unsupported architecture {arch!r}; seqdec's GGUF loader reads the "
        f"llama family and Gemma 3 (general.architecture = 'llama' or "
        f"'gemma3')")


def config_from_gguf(reader) -> TransformerConfig:
  """Builds the `TransformerConfig` from a llama-architecture GGUF.

  Keys read (prefix `llama.`): block_count (L), embedding_length (D),
  feed_forward_length (F), attention.head_count (H), attention.head_count_kv
  (Hkv, default H), attention.key_length (Dh, default D / H; must equal
  rope.dimension_count: seqdec rotates the whole head), rope.freq_base,
  attention.layer_norm_rms_epsilon, context_length, and RoPE scaling.

  The vocabulary size V is the row count of `token_embd.weight`; the GGUF
  token list must not be longer (else the tokenizer could emit ids the model
  cannot embed). Embeddings are tied iff there is no `output.weight`.

  RoPE scaling: `rope.scaling.type` 'linear' (or the old `rope.scale_linear`)
  maps to HF linear scaling; llama.cpp stores Llama-3 scaling as a
  `rope_freqs.weight` tensor of per-frequency divisors r_i
  (inv_freq'_i = inv_freq_i / r_i), which is accepted only when it equals
  HF's 'llama3' rule for factor = max_i r_i, low_freq_factor 1,
  high_freq_factor 4 and original context 8192 (every Llama 3.x); any other
  scaling raises.

  Args:
    reader: a `gguf.GGUFReader` (see `read_gguf`).

  Returns:
    The config (float32 compute and parameters).

  Raises:
    CheckpointError: unsupported architecture, missing keys or unsupported
      features (mixture of experts, partial rotary, unknown RoPE scaling).
  """
  arch = get_field(reader, "general.architecture")
  check_architecture(arch)
  if arch == "gemma3" and (get_field(reader, "gemma3.vision.block_count")
                           or get_field(reader, "clip.has_vision_encoder")):
    raise CheckpointError("this Gemma 3 GGUF carries a vision encoder; seqdec "
                          "loads the text model only")

  def get(key, default=None, required=False):
    value = get_field(reader, f"{arch}.{key}", default)
    if value is None and required:
      raise CheckpointError(f"GGUF metadata lacks {arch}.{key}")
    return value

  if get("expert_count", 0):
    raise CheckpointError(
        f"this GGUF is a mixture of experts ({get('expert_count')} experts); "
        f"seqdec's Transformer is dense")
  num_layers = int(get("block_count", required=True))
  hidden = int(get("embedding_length", required=True))
  ffn = int(get("feed_forward_length", required=True))
  num_heads = int(get("attention.head_count", required=True))
  num_kv = int(get("attention.head_count_kv", num_heads))
  head_dim = int(get("attention.key_length", hidden // num_heads))
  value_dim = int(get("attention.value_length", head_dim))
  rope_dim = int(get("rope.dimension_count", head_dim))
  if value_dim != head_dim:
    raise CheckpointError(f"key_length {head_dim} != value_length "
                          f"{value_dim}; seqdec needs equal q/k/v head sizes")
  if rope_dim != head_dim:
    raise CheckpointError(f"rope.dimension_count {rope_dim} != head size "
                          f"{head_dim}; seqdec rotates whole heads")
  tensors = {t.name: t for t in reader.tensors}
  if "token_embd.weight" not in tensors:
    raise CheckpointError("GGUF has no token_embd.weight tensor")
  vocab = int(tensors["token_embd.weight"].shape[1])
  field = reader.fields.get("tokenizer.ggml.tokens")
  n_tokens = len(field.data) if field is not None else vocab
  if n_tokens > vocab:
    raise CheckpointError(f"the GGUF tokenizer has {n_tokens} tokens but "
                          f"token_embd.weight only {vocab} rows")
  theta = float(get("rope.freq_base", 10000.0))
  rope_scaling = _rope_scaling(reader, arch, tensors, theta, head_dim)
  qkv_bias = "blk.0.attn_q.bias" in tensors
  family: dict[str, Any] = dict(architecture="LlamaForCausalLM")
  if arch == "gemma3":
    family = gemma3_fields(get, num_layers)
  return TransformerConfig.make(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
      num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv,
      head_dim=head_dim,
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=theta, rope_scaling=rope_scaling,
      max_position_embeddings=int(get("context_length", 2048)),
      tie_embeddings="output.weight" not in tensors, qkv_bias=qkv_bias,
      **family)


def gemma3_fields(get, num_layers: int) -> dict[str, Any]:
  """The Gemma 3 fields of the config from `gemma3.*` keys and defaults.

  Read: attention.sliding_window; rope.scaling.* (the global layers', via
  `_rope_scaling`). Not stored by llama.cpp, so Gemma3TextConfig's defaults
  (`GEMMA3_DEFAULTS`): the layer pattern (layer i is global iff (i + 1) % 6
  == 0), the local RoPE base 10,000 and query_pre_attn_scalar 256 (every
  released Gemma 3 text model uses these).
  """
  d = GEMMA3_DEFAULTS
  every = int(d["sliding_window_pattern"])
  return dict(
      sliding_window=int(get("attention.sliding_window",
                             d["sliding_window"])),
      layer_types=tuple(GLOBAL if (i + 1) % every == 0 else LOCAL
                        for i in range(num_layers)),
      rope_local_theta=d["rope_local_theta"], activation="gelu_tanh",
      embed_scale=True, norm_offset=1.0, sandwich_norm=True, qk_norm=True,
      query_pre_attn_scalar=d["query_pre_attn_scalar"],
      architecture="Gemma3ForCausalLM")


def _rope_scaling(reader, arch, tensors, theta, head_dim):
  """HF `rope_scaling` dict (or None) from GGUF keys / `rope_freqs.weight`."""
  kind = get_field(reader, f"{arch}.rope.scaling.type")
  factor = get_field(reader, f"{arch}.rope.scaling.factor")
  old_linear = get_field(reader, f"{arch}.rope.scale_linear")
  if kind is None and old_linear not in (None, 1.0):
    kind, factor = "linear", old_linear
  scaling = None
  if kind in (None, "none"):
    scaling = None
  elif kind == "linear":
    if factor is None or float(factor) <= 0:
      raise CheckpointError(f"linear RoPE scaling needs a positive "
                            f"{arch}.rope.scaling.factor, got {factor!r}")
    scaling = None if float(factor) == 1.0 else {
        "rope_type": "linear", "factor": float(factor)}
  else:
    raise CheckpointError(f"unsupported RoPE scaling type {kind!r}; seqdec "
                          f"reads none, linear and Llama-3 rope_freqs")
  if "rope_freqs.weight" not in tensors:
    return scaling
  if scaling is not None:
    raise CheckpointError("GGUF has both rope.scaling and rope_freqs.weight")
  t = tensors["rope_freqs.weight"]
  divisors = dequantize(t.data, t.tensor_type, t.shape).reshape(-1)
  divisors = divisors.astype(np.float64)
  if divisors.shape != (head_dim // 2,):
    raise CheckpointError(f"rope_freqs.weight has {divisors.size} entries, "
                          f"expected {head_dim // 2}")
  if np.allclose(divisors, 1.0):
    return None
  guess = {"rope_type": "llama3", "factor": float(divisors.max()),
           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
  base = TransformerConfig(vocab_size=1, hidden_size=1, intermediate_size=1,
                           num_layers=1, num_heads=1, num_kv_heads=1,
                           head_dim=head_dim, rope_theta=theta)
  want = rope_inv_freq(base) / divisors
  got = rope_inv_freq(base.replace(rope_scaling=guess))
  if not np.allclose(got, want, rtol=1e-5, atol=0):
    raise CheckpointError(
        "rope_freqs.weight does not match Llama-3 RoPE scaling (factor "
        f"{guess['factor']}, low 1, high 4, original context 8192); seqdec "
        "cannot represent these per-frequency factors")
  return guess
