"""The one configuration dataclass of the Llama-family target.

Llama, Qwen2 (qkv bias), Mistral (sliding window) and SmolLM2 are all points of
this one dataclass; `seqdec.checkpoints` maps Hugging Face `config.json` files
and GGUF metadata onto it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax.numpy as jnp

# RoPE scaling types the model implements (HF `rope_type` names).
ROPE_TYPES = ("default", "linear", "llama3")

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "float64": jnp.float64,
}


def as_dtype(name_or_dtype: Any) -> jnp.dtype:
  """Returns a numpy dtype from a name such as 'float32' or a dtype object."""
  if isinstance(name_or_dtype, str):
    if name_or_dtype not in _DTYPES:
      raise ValueError(
          f"unknown dtype {name_or_dtype!r}; expected one of {sorted(_DTYPES)}")
    return jnp.dtype(_DTYPES[name_or_dtype])
  return jnp.dtype(name_or_dtype)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of a Llama-family decoder.

  Attributes:
    vocab_size: V, rows of the embedding and of the LM head.
    hidden_size: D, the residual width.
    intermediate_size: F, the SwiGLU width.
    num_layers: L.
    num_heads: H query heads.
    num_kv_heads: Hkv key/value heads (H % Hkv == 0; Hkv == H is MHA, 1 is MQA).
    head_dim: Dh; need not equal D / H.
    rms_norm_eps: epsilon inside RMSNorm.
    rope_theta: RoPE base.
    rope_scaling: None, or a tuple of (key, value) pairs in HF's
      `rope_scaling` vocabulary (`rope_type` in ROPE_TYPES, `factor`, ...).
      Stored as a tuple so that the config stays hashable.
    max_position_embeddings: the context length; prompts plus new tokens must
      fit in it.
    tie_embeddings: the LM head reuses the embedding matrix.
    qkv_bias: q/k/v projections carry a bias (Qwen2).
    sliding_window: None, or W: a query at position p sees keys at positions
      k with p - k < W (Mistral).
    dtype: activation/compute dtype name ('float32' on CPU, 'bfloat16' on
      accelerators; softmax, norms and matmul accumulation stay float32).
    param_dtype: parameter storage dtype name.
    architecture: the source architecture, for the record only.
    attention_impl: 'auto' (by backend; alias 'xla'), 'dot' or 'fused'; see
      `transformer.grouped_attention`; or 'pallas': tree/chain verification
      calls use the Pallas tree-attention kernel (`seqdec.kernels`), other
      calls 'auto'. Not a hyper-parameter: every choice computes the same
      function.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: Optional[tuple[tuple[str, Any], ...]] = None
  max_position_embeddings: int = 2048
  tie_embeddings: bool = False
  qkv_bias: bool = False
  sliding_window: Optional[int] = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  architecture: str = "LlamaForCausalLM"
  attention_impl: str = "auto"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "head_dim",
                 "max_position_embeddings"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ValueError(f"sliding_window must be positive, got "
                       f"{self.sliding_window}")
    rope = self.rope_scaling_dict
    if rope is not None:
      kind = rope.get("rope_type", rope.get("type", "default"))
      if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {kind!r}; seqdec "
                         f"implements {ROPE_TYPES}")
    as_dtype(self.dtype)
    as_dtype(self.param_dtype)

  @property
  def rope_scaling_dict(self) -> Optional[dict[str, Any]]:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def num_groups(self) -> int:
    """Query heads per key/value head."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes) -> "TransformerConfig":
    if "rope_scaling" in changes and isinstance(changes["rope_scaling"],
                                                Mapping):
      changes["rope_scaling"] = _freeze(changes["rope_scaling"])
    return dataclasses.replace(self, **changes)

  @classmethod
  def make(cls, **kwargs) -> "TransformerConfig":
    """Builds a config; `rope_scaling` may be given as a dict."""
    if isinstance(kwargs.get("rope_scaling"), Mapping):
      kwargs["rope_scaling"] = _freeze(kwargs["rope_scaling"])
    return cls(**kwargs)

  def num_params(self) -> int:
    """Parameter count (the tied head counted once)."""
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q = self.num_heads * self.head_dim
    kv = self.num_kv_heads * self.head_dim
    attn = d * q + 2 * d * kv + q * d
    if self.qkv_bias:
      attn += q + 2 * kv
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else v * d
    return v * d + self.num_layers * per_layer + d + head


def _freeze(mapping: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
  items = []
  for k, v in sorted(mapping.items()):
    if isinstance(v, list):
      v = tuple(v)
    items.append((k, v))
  return tuple(items)


# Named configurations. Full-size ones are built with `jax.eval_shape` in tests.
PRESETS: dict[str, TransformerConfig] = {
    # A tiny random model for `runlocal` arms and tests (byte-level vocab).
    "tiny": TransformerConfig(
        vocab_size=260, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024,
        tie_embeddings=True),
    "smollm2-135m": TransformerConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
        rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
        tie_embeddings=True),
    "llama-3.2-1b": TransformerConfig.make(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
        rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=32.0,
                          low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_embeddings=True),
    "qwen2.5-0.5b": TransformerConfig(
        vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
        rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, tie_embeddings=True, qkv_bias=True,
        architecture="Qwen2ForCausalLM"),
    "mistral-7b": TransformerConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=32768,
        sliding_window=4096, architecture="MistralForCausalLM"),
}
