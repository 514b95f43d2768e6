"""Hugging Face checkpoint directories -> `Transformer` (+ `Tokenizer`).

A checkpoint directory holds `config.json`, the weights as `model.safetensors`
or as shards listed in `model.safetensors.index.json`, and optionally
`tokenizer.json` (+ `tokenizer_config.json`, `generation_config.json`).
Weights are memory-mapped (`safetensors_io`; bfloat16 arrives as an
`ml_dtypes` array), so a sharded load reads each device's block and never a
whole tensor it does not need; torch and transformers are never imported.

Supported architectures: `LlamaForCausalLM` (and SmolLM2, which is one),
`Qwen2ForCausalLM`, `MistralForCausalLM` and `Gemma3ForCausalLM` (the text
model, `model_type="gemma3_text"`) as `Transformer`s; `Mamba2ForCausalLM`
and `BambaForCausalLM` (Mamba-2 / attention hybrid) as
`seqdec.models.hybrid.HybridLM`s. `config_from_hf` understands
both the transformers 4.x form of RoPE settings (`rope_theta` +
`rope_scaling`) and the transformers 5.x form (`rope_parameters`). Everything
the model cannot represent exactly raises `CheckpointError` instead of being
approximated silently.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import numpy as np

from seqdec.checkpoints import safetensors_io
from seqdec.checkpoints.convert import (CheckpointError, check_dtypes,
                                        model_from_hf_tensors)
from seqdec.models.config import GLOBAL, LOCAL, ROPE_TYPES, TransformerConfig
from seqdec.models.hybrid import HybridConfig
from seqdec.models.transformer import Transformer
from seqdec.tokenizer import Tokenizer, TokenizerError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"

# Architecture name -> (model_type, per-architecture defaults of the HF config
# classes for keys a config.json may omit).
_ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", dict(
        rms_norm_eps=1e-6, max_position_embeddings=2048)),
    "Qwen2ForCausalLM": ("qwen2", dict(
        rms_norm_eps=1e-6, max_position_embeddings=32768)),
    "MistralForCausalLM": ("mistral", dict(
        rms_norm_eps=1e-6, max_position_embeddings=4096 * 32)),
    "Gemma3ForCausalLM": ("gemma3_text", dict(
        rms_norm_eps=1e-6, max_position_embeddings=131072)),
    # Recurrent and hybrid LMs (`seqdec.models.hybrid`); defaults are the
    # HF config classes'.
    "Mamba2ForCausalLM": ("mamba2", dict(
        num_heads=128, head_dim=64, state_size=128, n_groups=8,
        conv_kernel=4, expand=2, chunk_size=256, layer_norm_epsilon=1e-5,
        use_bias=False, use_conv_bias=True, tie_word_embeddings=False,
        time_step_limit=(0.0, float("inf")))),
    "BambaForCausalLM": ("bamba", dict(
        mamba_n_heads=128, mamba_d_head="auto", mamba_n_groups=1,
        mamba_d_state=256, mamba_d_conv=4, mamba_expand=2,
        mamba_chunk_size=256, mamba_conv_bias=True, mamba_proj_bias=False,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        max_position_embeddings=262144, attention_bias=False, mlp_bias=False,
        time_step_limit=(0.0, float("inf")))),
}
HYBRID_ARCHITECTURES = ("Mamba2ForCausalLM", "BambaForCausalLM")
# A recurrent LM has no position limit of its own.
_UNBOUNDED_CONTEXT = 1 << 20
# Gemma3TextConfig's class defaults.
_GEMMA3_DEFAULTS = dict(head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=4096, sliding_window_pattern=6,
                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                        hidden_activation="gelu_pytorch_tanh",
                        tie_word_embeddings=True)
# Near misses that must not load as something else: what each one lacks.
_UNSUPPORTED = {
    "Gemma3ForConditionalGeneration": (
        "Gemma 3 multimodal checkpoints are not supported: seqdec loads the "
        "text model (Gemma3ForCausalLM, model_type 'gemma3_text'), not the "
        "vision tower or the multimodal projector"),
    "gemma3": ("Gemma 3 multimodal configs (model_type 'gemma3') are not "
               "supported: seqdec loads the text model (model_type "
               "'gemma3_text')"),
    "Gemma2ForCausalLM": (
        "Gemma 2 is not supported: seqdec implements neither its attention "
        "and final-logit soft-capping nor its alternating window layout"),
    "gemma2": ("Gemma 2 (model_type 'gemma2') is not supported: seqdec "
               "implements neither its attention and final-logit "
               "soft-capping nor its alternating window layout"),
    "GemmaForCausalLM": ("Gemma 1 is not supported (seqdec loads Gemma 3)"),
}
# HF activation names -> `TransformerConfig.activation`.
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)
_MODEL_TYPES = {mt: arch for arch, (mt, _) in _ARCHITECTURES.items()}

# Keys each supported rope type needs besides `rope_type` (and `rope_theta`).
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}
assert set(_ROPE_KEYS) == set(ROPE_TYPES)

_DEFAULT_ROPE_THETA = 10000.0
# MistralConfig's class default, used when `sliding_window` is absent.
_MISTRAL_DEFAULT_WINDOW = 4096
# Qwen2Config's class default for `max_window_layers`.
_QWEN2_DEFAULT_MAX_WINDOW_LAYERS = 28


def _architecture(cfg: Mapping[str, Any]) -> str:
  """The supported architecture named by `architectures` or `model_type`."""
  archs = cfg.get("architectures") or []
  if isinstance(archs, str):
    archs = [archs]
  for name in list(archs) + [cfg.get("model_type")]:
    if name in _UNSUPPORTED:
      raise CheckpointError(_UNSUPPORTED[name])
  for arch in archs:
    if arch in _ARCHITECTURES:
      return arch
  model_type = cfg.get("model_type")
  if not archs and model_type in _MODEL_TYPES:
    return _MODEL_TYPES[model_type]
  named = f"architectures={list(archs)}" if archs else (
      f"model_type={model_type!r}")
  raise CheckpointError(
      f"unsupported architecture ({named}); seqdec loads "
      f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def _require(cfg: Mapping[str, Any], key: str) -> Any:
  value = cfg.get(key)
  if value is None:
    raise CheckpointError(f"config lacks the required key {key!r}")
  return value


def _rope(cfg: Mapping[str, Any]) -> tuple[float, Optional[dict[str, Any]]]:
  """RoPE base and scaling from either config form.

  transformers 5.x: `rope_parameters = {"rope_type", "rope_theta", "factor",
  ...}` (for hybrid models possibly one such dict per layer type).
  transformers 4.x: top-level `rope_theta` and `rope_scaling = {"type" or
  "rope_type", "factor", ...}` or null.

  Args:
    cfg: the parsed config.json.

  Returns:
    `(rope_theta, scaling)` where `scaling` is None for plain RoPE or a dict
    with `rope_type` and exactly the keys `rope_inv_freq` reads.
  """
  params = cfg.get("rope_parameters")
  if params is not None:
    if not isinstance(params, Mapping):
      raise CheckpointError(f"rope_parameters must be an object, got "
                            f"{params!r}")
    if params and all(isinstance(v, Mapping) for v in params.values()):
      # One set per layer type: usable only if every layer type agrees.
      distinct = {json.dumps(v, sort_keys=True) for v in params.values()}
      if len(distinct) != 1:
        raise CheckpointError(
            f"per-layer-type rope_parameters differ ({sorted(params)}); seqdec "
            f"applies one RoPE to every layer")
      params = next(iter(params.values()))
    scaling = dict(params)
    theta = scaling.pop("rope_theta", None)
    if theta is None:
      theta = cfg.get("rope_theta", _DEFAULT_ROPE_THETA)
  else:
    theta = cfg.get("rope_theta")
    theta = _DEFAULT_ROPE_THETA if theta is None else theta
    scaling = dict(cfg.get("rope_scaling") or {})

  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind not in _ROPE_KEYS:
    raise CheckpointError(
        f"unsupported RoPE type {kind!r}; seqdec implements "
        f"{', '.join(ROPE_TYPES)}")
  partial = scaling.get("partial_rotary_factor",
                        cfg.get("partial_rotary_factor"))
  if partial is not None and float(partial) != 1.0:
    raise CheckpointError(f"partial_rotary_factor={partial} is not supported "
                          f"(seqdec rotates the whole head)")
  if kind == "default":
    return float(theta), None
  out: dict[str, Any] = {"rope_type": kind}
  for key in _ROPE_KEYS[kind]:
    if scaling.get(key) is None:
      raise CheckpointError(f"RoPE type {kind!r} needs {key!r} in the rope "
                            f"settings, got {sorted(scaling)}")
    out[key] = float(scaling[key])
  return float(theta), out


def _qwen2_layer_types(cfg: Mapping[str, Any],
                       num_layers: int) -> Optional[list[str]]:
  """Qwen2's per-layer attention kinds (HF's rule when not stored)."""
  types = cfg.get("layer_types")
  if types is not None:
    return list(types)
  if cfg.get("use_sliding_window"):
    first = cfg.get("max_window_layers")
    first = _QWEN2_DEFAULT_MAX_WINDOW_LAYERS if first is None else int(first)
    # transformers: layer i slides iff i >= max_window_layers.
    return ["sliding_attention" if i >= first else "full_attention"
            for i in range(num_layers)]
  return None


def _sliding_window(cfg: Mapping[str, Any], arch: str,
                    num_layers: int) -> Optional[int]:
  """The window every layer uses, or None; partial windows are rejected."""
  if arch == "LlamaForCausalLM":
    return None
  if arch == "MistralForCausalLM":
    # MistralForCausalLM applies the window to every layer (it ignores any
    # `layer_types`; alternating patterns are Ministral's).
    window = cfg.get("sliding_window", _MISTRAL_DEFAULT_WINDOW)
    types = None
  else:  # Qwen2: `sliding_window` is only live with `use_sliding_window`.
    window = (cfg.get("sliding_window") if cfg.get("use_sliding_window")
              else None)
    types = _qwen2_layer_types(cfg, num_layers)
  if types is not None:
    if len(types) != num_layers:
      raise CheckpointError(f"layer_types has {len(types)} entries for "
                            f"{num_layers} layers")
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
      raise CheckpointError(f"unsupported layer types {unknown}")
    sliding = [t == "sliding_attention" for t in types]
    if window is None or not any(sliding):
      return None
    if not all(sliding):
      n = sum(sliding)
      raise CheckpointError(
          f"sliding-window attention on {n} of {num_layers} layers (e.g. "
          f"max_window_layers={cfg.get('max_window_layers')}) is not "
          f"supported; seqdec applies one window to every layer")
  if window is None:
    return None
  window = int(window)
  if window <= 0:
    raise CheckpointError(f"sliding_window must be positive, got {window}")
  return window


def _gemma3_rope(cfg: Mapping[str, Any]
                 ) -> tuple[float, Optional[dict[str, Any]], float]:
  """Gemma 3's two RoPEs: `(global theta, global scaling, local theta)`.

  transformers 5.x: `rope_parameters = {"full_attention": {...},
  "sliding_attention": {...}}`; 4.x: `rope_theta` + `rope_scaling` (global)
  and `rope_local_base_freq` (local). The local RoPE must be plain.
  """
  params = cfg.get("rope_parameters")
  if params is not None:
    if not (isinstance(params, Mapping)
            and set(params) <= {GLOBAL, LOCAL}
            and all(isinstance(v, Mapping) for v in params.values())):
      raise CheckpointError(
          f"Gemma 3 rope_parameters must map {GLOBAL!r} and {LOCAL!r} to "
          f"RoPE settings, got {params!r}")
    full = dict(params.get(GLOBAL) or {})
    full.setdefault("rope_theta", _GEMMA3_DEFAULTS["rope_theta"])
    local = dict(params.get(LOCAL) or {})
    local.setdefault("rope_theta", _GEMMA3_DEFAULTS["rope_local_base_freq"])
  else:
    full = {"rope_theta": cfg.get("rope_theta")
                          or _GEMMA3_DEFAULTS["rope_theta"],
            "rope_scaling": cfg.get("rope_scaling")}
    local = {"rope_theta": cfg.get("rope_local_base_freq")
                           or _GEMMA3_DEFAULTS["rope_local_base_freq"]}
  theta, scaling = _rope(full if params is None
                         else {"rope_parameters": full})
  local_theta, local_scaling = _rope({"rope_parameters": local})
  if local_scaling is not None:
    raise CheckpointError(f"Gemma 3's local layers must use plain RoPE, got "
                          f"{local_scaling}")
  return theta, scaling, local_theta


def _gemma3_layer_types(cfg: Mapping[str, Any], num_layers: int
                        ) -> tuple[str, ...]:
  """`layer_types`, or Gemma 3's rule: every `sliding_window_pattern`-th
  layer (1-based) is global, the others local."""
  types = cfg.get("layer_types")
  if types is None:
    every = int(cfg.get("sliding_window_pattern")
                or _GEMMA3_DEFAULTS["sliding_window_pattern"])
    types = [GLOBAL if (i + 1) % every == 0 else LOCAL
             for i in range(num_layers)]
  if len(types) != num_layers:
    raise CheckpointError(f"layer_types has {len(types)} entries for "
                          f"{num_layers} layers")
  unknown = sorted(set(types) - {GLOBAL, LOCAL})
  if unknown:
    raise CheckpointError(f"unsupported layer types {unknown}")
  return tuple(types)


def _gemma3_fields(cfg: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """The `TransformerConfig` fields particular to Gemma 3."""
  for key in ("final_logit_softcapping", "attn_logit_softcapping"):
    if cfg.get(key) is not None:
      raise CheckpointError(f"{key}={cfg[key]} is not supported (seqdec "
                            f"implements no logit soft-capping)")
  if cfg.get("use_bidirectional_attention"):
    raise CheckpointError("use_bidirectional_attention=true is not supported "
                          "(seqdec decodes causally)")
  theta, scaling, local_theta = _gemma3_rope(cfg)
  window = cfg.get("sliding_window", _GEMMA3_DEFAULTS["sliding_window"])
  scalar = cfg.get("query_pre_attn_scalar",
                   _GEMMA3_DEFAULTS["query_pre_attn_scalar"])
  return dict(
      rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
      sliding_window=None if window is None else int(window),
      layer_types=_gemma3_layer_types(cfg, num_layers),
      embed_scale=True, norm_offset=1.0, sandwich_norm=True, qk_norm=True,
      query_pre_attn_scalar=float(scalar))


def config_from_hf(cfg: Mapping[str, Any], *, dtype: str = "float32",
                   param_dtype: Optional[str] = None) -> TransformerConfig:
  """Maps a parsed HF `config.json` onto a `TransformerConfig`.

  Args:
    cfg: the config.json contents.
    dtype: activation/compute dtype name of the built model.
    param_dtype: parameter dtype name; None means `dtype`.

  Returns:
    The `TransformerConfig`.

  Raises:
    CheckpointError: for an unsupported architecture or feature (an
      activation other than SiLU / tanh-GELU, a RoPE type other than default
      / linear / llama3, a Llama-family sliding window on only some layers,
      logit soft-capping, bidirectional attention) or an invalid value.
  """
  if not isinstance(cfg, Mapping):
    raise CheckpointError(f"config must be a JSON object, got "
                          f"{type(cfg).__name__}")
  try:
    return _config_from_hf(cfg, dtype, param_dtype)
  except CheckpointError:
    raise
  except (TypeError, ValueError, ZeroDivisionError) as e:  # bad values
    raise CheckpointError(f"invalid model config: {e}") from e


def _config_from_hf(cfg: Mapping[str, Any], dtype: str,
                    param_dtype: Optional[str]) -> TransformerConfig:
  """`config_from_hf` without the error wrapping."""
  arch = _architecture(cfg)
  defaults = _ARCHITECTURES[arch][1]
  if arch in HYBRID_ARCHITECTURES:
    return _hybrid_config(cfg, arch, defaults, dtype, param_dtype)
  gemma = arch == "Gemma3ForCausalLM"

  act = cfg.get("hidden_activation" if gemma else "hidden_act")
  if act is None:
    act = _GEMMA3_DEFAULTS["hidden_activation"] if gemma else "silu"
  if act not in _ACTIVATIONS:
    raise CheckpointError(f"activation {act!r} is not supported (seqdec "
                          f"implements {sorted(_ACTIVATIONS)})")
  if arch == "Qwen2ForCausalLM":
    qkv_bias, o_bias = True, False
  else:  # Llama's attention_bias: q, k, v *and* o_proj
    qkv_bias = o_bias = bool(cfg.get("attention_bias", False))

  hidden = int(_require(cfg, "hidden_size"))
  heads = int(_require(cfg, "num_attention_heads"))
  kv_heads = cfg.get("num_key_value_heads")
  kv_heads = heads if kv_heads is None else int(kv_heads)
  head_dim = cfg.get("head_dim",
                     _GEMMA3_DEFAULTS["head_dim"] if gemma else None)
  if head_dim is None:
    if hidden % heads:
      raise CheckpointError(f"hidden_size {hidden} is not a multiple of "
                            f"num_attention_heads {heads} and no head_dim")
    head_dim = hidden // heads
  num_layers = int(_require(cfg, "num_hidden_layers"))
  if gemma:
    fields = _gemma3_fields(cfg, num_layers)
    tie = cfg.get("tie_word_embeddings",
                  _GEMMA3_DEFAULTS["tie_word_embeddings"])
  else:
    theta, scaling = _rope(cfg)
    fields = dict(rope_theta=theta, rope_scaling=scaling,
                  sliding_window=_sliding_window(cfg, arch, num_layers))
    tie = cfg.get("tie_word_embeddings", False)

  def get(key):
    value = cfg.get(key)
    return defaults[key] if value is None else value

  return TransformerConfig.make(
      vocab_size=int(_require(cfg, "vocab_size")),
      hidden_size=hidden,
      intermediate_size=int(_require(cfg, "intermediate_size")),
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=int(head_dim),
      rms_norm_eps=float(get("rms_norm_eps")),
      max_position_embeddings=int(get("max_position_embeddings")),
      tie_embeddings=bool(tie),
      qkv_bias=qkv_bias,
      o_bias=o_bias,
      mlp_bias=bool(cfg.get("mlp_bias", False)),
      activation=_ACTIVATIONS[act],
      **fields,
      dtype=dtype,
      param_dtype=param_dtype or dtype,
      architecture=arch)


def _hf_float(x: Any) -> float:
  """A float from config.json, where transformers 5 writes non-finite
  values as {"__float__": "Infinity"}."""
  if isinstance(x, Mapping) and "__float__" in x:
    return float(x["__float__"])
  return float(x)


def _hybrid_config(cfg: Mapping[str, Any], arch: str,
                   defaults: Mapping[str, Any], dtype: str,
                   param_dtype: Optional[str]) -> HybridConfig:
  """A `Mamba2ForCausalLM` or `BambaForCausalLM` config.json -> a
  `HybridConfig` (Bamba: attention at `attn_layer_indices`, partial RoPE
  from `rope_parameters`, a SwiGLU MLP after every mixer)."""
  def get(key):
    value = cfg.get(key)
    return defaults[key] if value is None else value

  act = cfg.get("hidden_act", "silu")
  if act != "silu":
    raise CheckpointError(f"activation {act!r} is not supported in a Mamba-2 "
                          f"mixer (seqdec implements 'silu')")
  hidden = int(_require(cfg, "hidden_size"))
  num_layers = int(_require(cfg, "num_hidden_layers"))
  common = dict(vocab_size=int(_require(cfg, "vocab_size")),
                hidden_size=hidden, num_layers=num_layers,
                time_step_limit=tuple(_hf_float(x)
                                      for x in get("time_step_limit")),
                tie_embeddings=bool(get("tie_word_embeddings")),
                dtype=dtype, param_dtype=param_dtype or dtype,
                architecture=arch)
  if arch == "Mamba2ForCausalLM":
    eps = float(get("layer_norm_epsilon"))
    return HybridConfig(
        layer_types=("mamba2",) * num_layers,
        state_size=int(get("state_size")), num_ssm_heads=int(get("num_heads")),
        ssm_head_dim=int(get("head_dim")), n_groups=int(get("n_groups")),
        conv_kernel=int(get("conv_kernel")), expand=int(get("expand")),
        chunk_size=int(get("chunk_size")), use_bias=bool(get("use_bias")),
        use_conv_bias=bool(get("use_conv_bias")), ssm_norm_eps=eps,
        rms_norm_eps=eps, max_position_embeddings=_UNBOUNDED_CONTEXT,
        **common)
  heads = int(_require(cfg, "num_attention_heads"))
  kv_heads = cfg.get("num_key_value_heads") or heads
  attn = set(cfg.get("attn_layer_indices") or ())
  if not attn <= set(range(num_layers)):
    raise CheckpointError(f"attn_layer_indices {sorted(attn)} outside "
                          f"0..{num_layers - 1}")
  expand, ssm_heads = int(get("mamba_expand")), int(get("mamba_n_heads"))
  d_head = get("mamba_d_head")
  d_head = expand * hidden // ssm_heads if d_head == "auto" else int(d_head)
  rope = cfg.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default":
    raise CheckpointError(f"Bamba rope type {rope.get('rope_type')!r} is not "
                          f"supported (seqdec implements 'default')")
  eps = float(get("rms_norm_eps"))
  return HybridConfig(
      layer_types=tuple("attention" if i in attn else "mamba2"
                        for i in range(num_layers)),
      state_size=int(get("mamba_d_state")), num_ssm_heads=ssm_heads,
      ssm_head_dim=d_head, n_groups=int(get("mamba_n_groups")),
      conv_kernel=int(get("mamba_d_conv")), expand=expand,
      chunk_size=int(get("mamba_chunk_size")),
      use_bias=bool(get("mamba_proj_bias")),
      use_conv_bias=bool(get("mamba_conv_bias")), ssm_norm_eps=eps,
      rms_norm_eps=eps, intermediate_size=int(_require(cfg,
                                                       "intermediate_size")),
      num_heads=heads, num_kv_heads=int(kv_heads),
      head_dim=int(cfg.get("head_dim") or hidden // heads),
      rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
      partial_rotary_factor=float(rope.get("partial_rotary_factor", 0.5)),
      attention_bias=bool(get("attention_bias")),
      mlp_bias=bool(get("mlp_bias")),
      max_position_embeddings=int(get("max_position_embeddings")), **common)


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from e
  except (OSError, UnicodeDecodeError) as e:
    raise CheckpointError(f"cannot read {path}: {e}") from e


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of one safetensors file, as lazy read-only views.

  Args:
    path: the `.safetensors` file.

  Returns:
    `{name: array}` in the stored dtype (bfloat16 as an `ml_dtypes` array),
    memory-mapped (`safetensors_io.open_lazy`): a slice reads only its bytes.
  """
  if not os.path.isfile(path):
    raise CheckpointError(f"weights file {path} does not exist")
  try:
    return safetensors_io.open_lazy(path)
  except (safetensors_io.SafetensorsError, OSError, MemoryError) as e:
    msg = " ".join(str(e).split())  # keep the message on one line
    raise CheckpointError(
        f"cannot read {path} (truncated or corrupt safetensors file?): "
        f"{msg}") from e


def _shard_path(root: str, index_path: str, shard: Any) -> str:
  if (not isinstance(shard, str) or not shard or os.path.isabs(shard)
      or ".." in shard.replace("\\", "/").split("/")):
    raise CheckpointError(f"{index_path} names an invalid shard {shard!r}")
  return os.path.join(root, shard)


def read_hf_tensors(path: str) -> dict[str, np.ndarray]:
  """Reads every tensor of a checkpoint directory, in HF names and layout.

  Args:
    path: the checkpoint directory.

  Returns:
    `{hf_name: array}`; arrays keep their stored dtype.

  Raises:
    CheckpointError: no weights file, a missing or unreadable shard, a tensor
      listed in the index but absent from its shard, or a tensor stored twice.
  """
  single = os.path.join(path, WEIGHTS_FILE)
  if os.path.isfile(single):
    return _read_safetensors(single)
  index_path = os.path.join(path, INDEX_FILE)
  if not os.path.isfile(index_path):
    others = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json",
                          "model.ckpt.index", "flax_model.msgpack")
              if os.path.exists(os.path.join(path, f))]
    hint = (f" (found {others[0]}: only safetensors is supported, re-save it "
            f"with safe_serialization)" if others else "")
    raise CheckpointError(f"no {WEIGHTS_FILE} or {INDEX_FILE} in {path}{hint}")

  index = _read_json(index_path)
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not weight_map:
    raise CheckpointError(f"{index_path} has no 'weight_map' object")
  shards: dict[str, list[str]] = {}
  for name, shard in weight_map.items():
    shards.setdefault(shard, []).append(name)
  shard_paths = {s: _shard_path(path, index_path, s) for s in shards}
  missing = sorted(s for s, p in shard_paths.items() if not os.path.isfile(p))
  if missing:
    raise CheckpointError(
        f"shard {os.path.join(path, missing[0])} listed in {index_path} does "
        f"not exist ({len(missing)} of {len(shards)} shards missing)")

  tensors: dict[str, np.ndarray] = {}
  for shard in sorted(shards):
    shard_path = shard_paths[shard]
    loaded = _read_safetensors(shard_path)
    absent = sorted(set(shards[shard]) - set(loaded))
    if absent:
      raise CheckpointError(
          f"{shard_path} lacks {len(absent)} tensors that {INDEX_FILE} "
          f"assigns to it, e.g. {absent[:3]}")
    twice = sorted(set(loaded) & set(tensors))
    if twice:
      raise CheckpointError(f"{shard_path} repeats tensors of another shard, "
                            f"e.g. {twice[:3]}")
    tensors.update(loaded)
  return tensors


def load_hf(path: str | os.PathLike, *, dtype: str = "float32",
            param_dtype: Optional[str] = None, mesh=None
            ) -> tuple[Transformer, Optional[Tokenizer]]:
  """Loads an HF checkpoint directory without torch.

  Args:
    path: a directory with `config.json` and safetensors weights.
    dtype: compute dtype name of the model ('float32' on CPU).
    param_dtype: parameter dtype name; None means `dtype`. bfloat16 and
      float16 checkpoints are cast to it. float64 (either dtype) needs
      `jax.config.update("jax_enable_x64", True)` first.
    mesh: None, or a device mesh: each device receives only its block of
      each parameter (`seqdec.parallel.sharding` rules).

  Returns:
    `(model, tokenizer)`; the tokenizer is None when the directory has no
    `tokenizer.json`.

  Raises:
    CheckpointError: with a one-line message naming the offending file when
      the directory, config or weights are missing, unreadable, unsupported or
      do not match each other; an unknown dtype, or float64 without
      `jax_enable_x64`.
  """
  check_dtypes(dtype, param_dtype)
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint directory {path} does not exist")
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint path {path} is not a directory")
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise CheckpointError(f"no {CONFIG_FILE} in {path}")
  try:
    config = config_from_hf(_read_json(config_path), dtype=dtype,
                            param_dtype=param_dtype)
  except CheckpointError as e:
    if config_path in str(e):
      raise
    raise CheckpointError(f"{config_path}: {e}") from e

  tensors = read_hf_tensors(path)
  try:
    model = model_from_hf_tensors(config, tensors, mesh)
  except CheckpointError as e:
    weights = (WEIGHTS_FILE if os.path.isfile(os.path.join(path, WEIGHTS_FILE))
               else INDEX_FILE)
    raise CheckpointError(
        f"{os.path.join(path, weights)} does not match {CONFIG_FILE}: "
        f"{e}") from e
  del tensors

  tokenizer = None
  if os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
    try:
      tokenizer = Tokenizer.from_hf_dir(path)
    except TokenizerError as e:
      raise CheckpointError(" ".join(str(e).split())) from e
  return model, tokenizer


def _json_float(x: float) -> Any:
  """A float as transformers 5 writes it into config.json (non-finite
  values as {"__float__": "Infinity"})."""
  x = float(x)
  if np.isfinite(x):
    return x
  return {"__float__": "Infinity" if x > 0 else "-Infinity"}


def hybrid_config_to_hf(c: HybridConfig) -> dict[str, Any]:
  """The `config.json` of a `HybridConfig`: `Mamba2ForCausalLM` when every
  layer is Mamba-2 without an MLP, else `BambaForCausalLM`.

  The inverse of `config_from_hf` on these architectures: for every config
  either architecture can hold, `config_from_hf(hybrid_config_to_hf(c))`
  equals `c` up to execution options (ssd_impl, scan_impl, scratch_slots,
  attention_impl, platform, dtypes) and, for Mamba2 (no position limit),
  `max_position_embeddings`.

  Raises:
    CheckpointError: what neither architecture can represent (a Mamba-2
      stack with an MLP, or a hybrid without one; different mixer and block
      norm eps; an attention-only stack; a rotary fraction other than
      Bamba's fixed 0.5).
  """
  common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                num_hidden_layers=c.num_layers,
                tie_word_embeddings=c.tie_embeddings,
                time_step_limit=[_json_float(x) for x in c.time_step_limit],
                hidden_act="silu", torch_dtype=c.param_dtype)
  if c.ssm_norm_eps != c.rms_norm_eps:
    raise CheckpointError(f"ssm_norm_eps {c.ssm_norm_eps} != rms_norm_eps "
                          f"{c.rms_norm_eps}: Mamba2 and Bamba configs hold "
                          f"one eps")
  if "mamba2" not in c.layer_types:
    raise CheckpointError("a stack without Mamba-2 layers is a Transformer, "
                          "not a hybrid")
  if all(t == "mamba2" for t in c.layer_types) and not c.intermediate_size:
    return dict(
        architectures=["Mamba2ForCausalLM"], model_type="mamba2",
        num_heads=c.num_ssm_heads, head_dim=c.ssm_head_dim,
        state_size=c.state_size, n_groups=c.n_groups,
        conv_kernel=c.conv_kernel, expand=c.expand,
        chunk_size=c.chunk_size, use_bias=c.use_bias,
        use_conv_bias=c.use_conv_bias, layer_norm_epsilon=c.rms_norm_eps,
        rms_norm=True, residual_in_fp32=True, norm_before_gate=False,
        **common)
  if not c.intermediate_size:
    raise CheckpointError("BambaForCausalLM has an MLP after every mixer; "
                          "this hybrid has intermediate_size 0")
  if c.partial_rotary_factor != 0.5:
    raise CheckpointError(f"BambaForCausalLM rotates half of each head "
                          f"(transformers fixes partial_rotary_factor at "
                          f"0.5); this hybrid has {c.partial_rotary_factor}")
  return dict(
      architectures=["BambaForCausalLM"], model_type="bamba",
      attn_layer_indices=[i for i, t in enumerate(c.layer_types)
                          if t == "attention"],
      mamba_n_heads=c.num_ssm_heads, mamba_d_head=c.ssm_head_dim,
      mamba_n_groups=c.n_groups, mamba_d_state=c.state_size,
      mamba_d_conv=c.conv_kernel, mamba_expand=c.expand,
      mamba_chunk_size=c.chunk_size, mamba_conv_bias=c.use_conv_bias,
      mamba_proj_bias=c.use_bias, rms_norm_eps=c.rms_norm_eps,
      intermediate_size=c.intermediate_size,
      num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
      head_dim=c.head_dim, attention_bias=c.attention_bias,
      mlp_bias=c.mlp_bias,
      max_position_embeddings=c.max_position_embeddings,
      rope_parameters=dict(rope_type="default", rope_theta=c.rope_theta,
                           partial_rotary_factor=c.partial_rotary_factor),
      **common)


def save_hf(model, path: str | os.PathLike,
            tokenizer: Optional[Tokenizer] = None) -> str:
  """Writes `model` (a `HybridLM`) as an HF checkpoint directory that
  `load_hf` and transformers both read: config.json, model.safetensors
  (HF tensor names, `model_to_hf_tensors`) and, given a tokenizer, its
  files (`Tokenizer.save_hf_dir`). Files are written to a temporary
  directory renamed into place, so a failure leaves no partial checkpoint;
  an existing `path` is an error (nothing is overwritten).

  Returns:
    `path`.
  """
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from seqdec.checkpoints.convert import model_to_hf_tensors  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not isinstance(model.config, HybridConfig):
    raise CheckpointError("save_hf writes hybrid (Mamba-2 / Bamba) models; "
                          "Transformers are loaded from HF or GGUF files")
  if os.path.exists(path):
    raise CheckpointError(f"{path} exists; not overwriting it")
  config = hybrid_config_to_hf(model.config)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".save_hf-", dir=parent)
  try:
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2)
    save_file(model_to_hf_tensors(model), os.path.join(tmp, WEIGHTS_FILE),
              metadata={"format": "pt"})
    if tokenizer is not None:
      tokenizer.save_hf_dir(tmp)
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path
