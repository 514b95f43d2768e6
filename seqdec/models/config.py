"""The one configuration dataclass of the decoder-only transformer target.

Llama, Qwen2 (qkv bias), Mistral (sliding window), SmolLM2 and Gemma 3
(scaled embeddings, (1 + w) norms around both sub-blocks, QK-norm, GeGLU,
local/global layers with their own RoPE) are all points of this one
dataclass; `seqdec.checkpoints` maps Hugging Face `config.json` files and GGUF
metadata onto it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax.numpy as jnp

# RoPE scaling types the model implements (HF `rope_type` names).
ROPE_TYPES = ("default", "linear", "llama3")
# MLP gate activations: SiLU (SwiGLU: Llama) and tanh-approximated GELU
# (GeGLU: Gemma, HF's "gelu_pytorch_tanh").
ACTIVATIONS = ("silu", "gelu_tanh")
# `TransformerConfig.platform`: None is the default backend.
PLATFORMS = (None, "cpu", "tpu", "gpu")

# Precision policies: the config fields each sets. bf16_weights stores the
# weight matrices and the embedding in bfloat16 and runs every weight
# matmul as bf16 x bf16 with float32 accumulation (the activation is
# rounded to bf16 at the matmul); the residual stream, norms and their
# scales, RoPE, attention, softmax and logits stay float32
# (`seqdec.models.transformer.with_precision`).
# f32_packed is f32 with every weight matmul run by the CPU kernel of
# `seqdec.kernels.packed_matmul` on weights stored in its panel layout:
# a 2-16-token call reads the weights once, as a 1-token step does.
# bf16_packed is bf16_weights' function (bf16 x bf16 -> f32 weight matmuls)
# run by the same kernel on bf16 panels: half the bytes of f32_packed.
PRECISIONS = {
    "f32": dict(dtype="float32", param_dtype="float32", matmul_dtype=None,
                matmul_impl="xla"),
    "bf16_weights": dict(dtype="float32", param_dtype="bfloat16",
                         matmul_dtype="bfloat16", matmul_impl="xla"),
    "f32_packed": dict(dtype="float32", param_dtype="float32",
                       matmul_dtype=None, matmul_impl="packed"),
    "bf16_packed": dict(dtype="float32", param_dtype="bfloat16",
                        matmul_dtype="bfloat16", matmul_impl="packed"),
}
# `TransformerConfig.matmul_impl`: XLA's dot, or the packed CPU kernel.
MATMUL_IMPLS = ("xla", "packed")
# Per-layer attention kinds (HF `layer_types` names).
LOCAL, GLOBAL = "sliding_attention", "full_attention"

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "float64": jnp.float64,
}


def precision_of(config) -> str:
  """The `PRECISIONS` policy a config follows ('f32' for any other mix,
  e.g. float64 or bfloat16 compute)."""
  for name, fields in PRECISIONS.items():
    if all(getattr(config, k) == v for k, v in fields.items()):
      return name
  return "f32"


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
    qkv_bias: q/k/v projections carry a bias (Qwen2; Llama attention_bias).
    o_bias: the attention output projection carries a bias (Llama
      attention_bias).
    mlp_bias: gate, up and down projections carry biases (Llama mlp_bias).
    sliding_window: None, or W: a query at position p sees keys at positions
      k with p - k < W, on every layer (Mistral) or on the local layers of
      `layer_types` (Gemma 3).
    layer_types: None (every layer alike), or one of LOCAL
      ("sliding_attention") / GLOBAL ("full_attention") per layer.
    rope_local_theta: None, or the RoPE base of the LOCAL layers (Gemma 3:
      10,000), which then use plain RoPE; `rope_theta` and `rope_scaling`
      are the GLOBAL layers'. None: every layer uses `rope_theta` and
      `rope_scaling`.
    activation: the MLP's gate activation, one of ACTIVATIONS.
    embed_scale: embeddings are multiplied by sqrt(D) (in the parameter
      dtype, as Gemma does).
    norm_offset: RMSNorm multiplies by (norm_offset + w): 0 for Llama, 1 for
      Gemma, whose checkpoints store w around 0.
    sandwich_norm: RMSNorms also on the attention and MLP outputs, before
      each residual add (Gemma 2/3).
    qk_norm: RMSNorm over Dh on each query and key head before RoPE (Gemma 3).
    query_pre_attn_scalar: None, or s: attention scores are scaled by
      s^-1/2 instead of Dh^-1/2 (Gemma).
    dtype: activation/compute dtype name ('float32' on CPU, 'bfloat16' on
      accelerators; softmax, norms and matmul accumulation stay float32).
    param_dtype: parameter storage dtype name.
    matmul_dtype: dtype of the weight matmuls' operands (None: `dtype`);
      'bfloat16' with a float32 `dtype` is the bf16_weights policy
      (`PRECISIONS`).
    partial_rotary_factor: RoPE rotates the first
      `rotary_dim` = int(Dh * factor) entries of each head (Bamba: 0.5).
    architecture: the source architecture, for the record only.
    attention_impl: 'auto' (by backend; alias 'xla'), 'dot' or 'fused'; see
      `transformer.grouped_attention`; or 'pallas': tree/chain verification
      calls use the Pallas tree-attention kernel (`seqdec.kernels`), other
      calls 'auto'. Not a hyper-parameter: every choice computes the same
      function.
    platform: the platform the programs are built for: None (the default
      backend: on CPU the Pallas kernels run in interpret mode), 'cpu',
      'tpu' or 'gpu'. A named accelerator compiles the kernels for it
      (Mosaic on 'tpu', Triton on 'gpu'), which is what `seqdec.export`
      needs to lower TPU/GPU programs on a CPU host; it also picks the
      XLA attention contraction for that platform. Not a hyper-parameter.
    matmul_impl: 'xla', or 'packed': the weight matrices are stored as
      `seqdec.kernels.packed_matmul.PackedWeight` panels and multiplied by
      its CPU kernel (the f32_packed policy, set by
      `transformer.with_precision`, which also packs the weights).
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
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_window: Optional[int] = None
  layer_types: Optional[tuple[str, ...]] = None
  rope_local_theta: Optional[float] = None
  activation: str = "silu"
  embed_scale: bool = False
  norm_offset: float = 0.0
  sandwich_norm: bool = False
  qk_norm: bool = False
  query_pre_attn_scalar: Optional[float] = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  matmul_dtype: Optional[str] = None
  partial_rotary_factor: float = 1.0
  architecture: str = "LlamaForCausalLM"
  attention_impl: str = "auto"
  platform: Optional[str] = None
  matmul_impl: str = "xla"

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
    if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
      raise ValueError(f"RoPE needs an even rotary dim in (0, head_dim]; got "
                       f"head_dim {self.head_dim} x partial_rotary_factor "
                       f"{self.partial_rotary_factor}")
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ValueError(f"sliding_window must be positive, got "
                       f"{self.sliding_window}")
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers:
        raise ValueError(f"layer_types has {len(self.layer_types)} entries "
                         f"for {self.num_layers} layers")
      unknown = sorted(set(self.layer_types) - {LOCAL, GLOBAL})
      if unknown:
        raise ValueError(f"unknown layer types {unknown}; expected {LOCAL!r} "
                         f"or {GLOBAL!r}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {self.activation!r}; expected one "
                       f"of {ACTIVATIONS}")
    if self.query_pre_attn_scalar is not None and not (
        self.query_pre_attn_scalar > 0):
      raise ValueError(f"query_pre_attn_scalar must be positive, got "
                       f"{self.query_pre_attn_scalar}")
    rope = self.rope_scaling_dict
    if rope is not None:
      kind = rope.get("rope_type", rope.get("type", "default"))
      if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {kind!r}; seqdec "
                         f"implements {ROPE_TYPES}")
    if self.platform not in PLATFORMS:
      raise ValueError(f"unknown platform {self.platform!r}; expected one of "
                       f"{PLATFORMS}")
    if self.matmul_impl not in MATMUL_IMPLS:
      raise ValueError(f"unknown matmul_impl {self.matmul_impl!r}; expected "
                       f"one of {MATMUL_IMPLS}")
    as_dtype(self.dtype)
    as_dtype(self.param_dtype)
    if self.matmul_dtype is not None:
      as_dtype(self.matmul_dtype)

  @property
  def rotary_dim(self) -> int:
    """Entries of each head that RoPE rotates (HF: int(Dh * factor))."""
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def rope_scaling_dict(self) -> Optional[dict[str, Any]]:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  def is_local(self, layer: int) -> bool:
    """Whether `layer` attends through the sliding window."""
    if self.sliding_window is None:
      return False
    return self.layer_types is None or self.layer_types[layer] == LOCAL

  def layer_window(self, layer: int) -> Optional[int]:
    """The sliding window of `layer`, or None for full attention."""
    return self.sliding_window if self.is_local(layer) else None

  def local_rope(self, layer: int) -> bool:
    """Whether `layer` uses the local RoPE (`rope_local_theta`, no scaling)."""
    return self.rope_local_theta is not None and (
        self.layer_types is not None and self.layer_types[layer] == LOCAL)

  @property
  def attention_scale(self) -> float:
    """The factor on q.k: query_pre_attn_scalar^-1/2, else Dh^-1/2."""
    return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @property
  def num_groups(self) -> int:
    """Query heads per key/value head."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes) -> "TransformerConfig":
    if "rope_scaling" in changes and isinstance(changes["rope_scaling"],
                                                Mapping):
      changes["rope_scaling"] = _freeze(changes["rope_scaling"])
    if changes.get("layer_types") is not None:
      changes["layer_types"] = tuple(changes["layer_types"])
    return dataclasses.replace(self, **changes)

  @classmethod
  def make(cls, **kwargs) -> "TransformerConfig":
    """Builds a config; `rope_scaling` may be given as a dict."""
    if isinstance(kwargs.get("rope_scaling"), Mapping):
      kwargs["rope_scaling"] = _freeze(kwargs["rope_scaling"])
    if kwargs.get("layer_types") is not None:
      kwargs["layer_types"] = tuple(kwargs["layer_types"])
    return cls(**kwargs)

  def num_params(self) -> int:
    """Parameter count (the tied head counted once)."""
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    q = self.num_heads * self.head_dim
    kv = self.num_kv_heads * self.head_dim
    attn = d * q + 2 * d * kv + q * d
    if self.qkv_bias:
      attn += q + 2 * kv
    attn += d * self.o_bias + 2 * self.head_dim * self.qk_norm
    mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
    per_layer = attn + mlp + (4 if self.sandwich_norm else 2) * d
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
    "gemma3-270m": TransformerConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048,
        num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256,
        rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
        max_position_embeddings=32768, tie_embeddings=True,
        sliding_window=512,
        layer_types=tuple(GLOBAL if (i + 1) % 6 == 0 else LOCAL
                          for i in range(18)),
        activation="gelu_tanh", embed_scale=True, norm_offset=1.0,
        sandwich_norm=True, qk_norm=True, query_pre_attn_scalar=256.0,
        architecture="Gemma3ForCausalLM"),
    "llama-2-7b": TransformerConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008,
        num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096),
    "mistral-7b": TransformerConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=32768,
        sliding_window=4096, architecture="MistralForCausalLM"),
}
# A tiny random Gemma 3 (runlocal arms, tests): six layers, five local with a
# sliding window of 8 and one global, the byte-level vocabulary.
PRESETS["tiny-gemma3"] = PRESETS["gemma3-270m"].replace(
    vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=6,
    num_heads=2, num_kv_heads=1, head_dim=16, sliding_window=8,
    max_position_embeddings=1024, layer_types=(LOCAL,) * 5 + (GLOBAL,))
