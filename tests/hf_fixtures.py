"""Helpers that write tiny Hugging Face checkpoint directories for tests.

Two kinds:

* `build_hf_model` (needs torch + transformers): a tiny random
  `LlamaForCausalLM` / `Qwen2ForCausalLM` / `MistralForCausalLM` /
  `Gemma3ForCausalLM` saved with `save_pretrained`, for parity against the
  HF implementation. Every parameter is non-trivial: weights use
  `initializer_range=0.2`, RMSNorm scales are 1 + N(0, 0.1^2) (Gemma's
  stored w, used as 1 + w, is N(0, 0.3^2)) and biases N(0, 0.2^2), so a
  mapping error (swapped norms, a dropped bias) shows up in the logits.
* `write_checkpoint` (numpy + safetensors only): HF-named tensors and a
  hand-written `config.json`, for loader tests that must not need torch.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Mapping, Optional

import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from seqdec.checkpoints.convert import model_to_hf_tensors
from seqdec.models.config import TransformerConfig
from seqdec.models.transformer import Transformer
from seqdec.tokenizer import Tokenizer

# Shared by every parity case: V=256, D=64, F=128.
_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-5,
             initializer_range=0.2, tie_word_embeddings=False)

# name -> (HF architecture, config overrides, save_pretrained kwargs).
PARITY_CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "llama_gqa_untied": ("llama", {}, {}),
    "llama_tied_mha": ("llama", dict(num_key_value_heads=4,
                                     tie_word_embeddings=True), {}),
    "llama_rope_llama3": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0,
        low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)), {}),
    "llama_rope_linear": ("llama", dict(rope_parameters=dict(
        rope_type="linear", rope_theta=5000.0, factor=4.0)), {}),
    "llama_head_dim_32": ("llama", dict(head_dim=32), {}),
    "qwen2_qkv_bias": ("qwen2", dict(tie_word_embeddings=True,
                                     rope_parameters=dict(
                                         rope_type="default",
                                         rope_theta=1e6)), {}),
    "qwen2_sliding_all_layers": ("qwen2", dict(use_sliding_window=True,
                                               sliding_window=8,
                                               max_window_layers=0), {}),
    "mistral_window_8": ("mistral", dict(sliding_window=8), {}),
    # Llama's attention_bias (q, k, v and o_proj) and mlp_bias.
    "llama_attn_mlp_bias": ("llama", dict(attention_bias=True, mlp_bias=True),
                            {}),
    # Gemma 3: GQA, local window 8 < 24 tokens on layers 0 and 2, a global
    # layer 1 with linear RoPE scaling; both RoPE bases differ from the
    # defaults, and query_pre_attn_scalar from head_dim.
    "gemma3_gqa_window": ("gemma3", dict(
        num_hidden_layers=3, head_dim=16, sliding_window=8,
        query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention",
                     "sliding_attention"],
        rope_parameters={
            "full_attention": dict(rope_type="linear", factor=2.0,
                                   rope_theta=100000.0),
            "sliding_attention": dict(rope_type="default",
                                      rope_theta=1000.0)}), {}),
    # Gemma 3: MQA, tied embeddings, the default layer pattern (global
    # every 6th layer: here only local layers) and window 5.
    "gemma3_mqa_tied": ("gemma3", dict(num_key_value_heads=1, head_dim=32,
                                       sliding_window=5,
                                       tie_word_embeddings=True), {}),
    "llama_sharded_3l": ("llama", dict(num_hidden_layers=3),
                         dict(max_shard_size="50KB")),
}


def build_hf_model(case: str, path: str, seed: int = 0):
  """Builds, randomises and saves one `PARITY_CASES` model.

  Args:
    case: a key of `PARITY_CASES`.
    path: an empty directory to save into.
    seed: torch seed.

  Returns:
    The HF model reloaded from `path` in float32 with eager attention, in
    eval mode.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  kind, overrides, save_kwargs = PARITY_CASES[case]
  config_cls, model_cls = {
      "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
      "mistral": (transformers.MistralConfig,
                  transformers.MistralForCausalLM),
      "gemma3": (transformers.Gemma3TextConfig,
                 transformers.Gemma3ForCausalLM),
  }[kind]
  config = config_cls(**{**_BASE, **overrides})
  torch.manual_seed(seed)
  model = model_cls(config).to(torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        if kind == "gemma3":   # used as 1 + w
          p.copy_(0.3 * torch.randn_like(p))
        else:
          p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.normal_(0.0, 0.2)
  model.save_pretrained(path, **save_kwargs)
  reloaded = model_cls.from_pretrained(path, dtype=torch.float32,
                                       attn_implementation="eager")
  return reloaded.eval()


def hf_config_dict(config: TransformerConfig,
                   rope_form: str = "new") -> dict[str, Any]:
  """A `config.json` dict for a seqdec config, as transformers would write.

  Args:
    config: the seqdec config.
    rope_form: 'new' (transformers 5 `rope_parameters`) or 'old'
      (`rope_theta` + `rope_scaling`).

  Returns:
    The dict.
  """
  model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                "MistralForCausalLM": "mistral"}[config.architecture]
  out: dict[str, Any] = dict(
      architectures=[config.architecture], model_type=model_type,
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
      hidden_act="silu", rms_norm_eps=config.rms_norm_eps,
      max_position_embeddings=config.max_position_embeddings,
      tie_word_embeddings=config.tie_embeddings)
  scaling = config.rope_scaling_dict
  if rope_form == "new":
    out["rope_parameters"] = dict(scaling or {"rope_type": "default"},
                                  rope_theta=config.rope_theta)
  else:
    out["rope_theta"] = config.rope_theta
    out["rope_scaling"] = scaling
  if model_type == "mistral":
    out["sliding_window"] = config.sliding_window
  elif model_type == "qwen2":
    out["use_sliding_window"] = config.sliding_window is not None
    out["sliding_window"] = config.sliding_window
    out["max_window_layers"] = 0
  elif model_type == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  return out


def random_hf_tensors(config: TransformerConfig, seed: int = 0,
                      dtype=np.float32) -> dict[str, np.ndarray]:
  """Random HF-named tensors (HF layout) with the shapes `config` implies."""
  model = Transformer(config, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  return {name: rng.normal(0.0, 0.2, a.shape).astype(dtype)
          for name, a in model_to_hf_tensors(model).items()}


def write_checkpoint(path: str, config: Mapping[str, Any] | TransformerConfig,
                     tensors: Mapping[str, np.ndarray], *,
                     num_shards: Optional[int] = None,
                     tokenizer: bool = False) -> str:
  """Writes config.json + safetensors (+ a byte-level tokenizer) to `path`.

  Args:
    path: the directory (created if needed).
    config: a config.json dict, or a seqdec config converted with
      `hf_config_dict`.
    tensors: HF-named arrays.
    num_shards: None writes `model.safetensors`; n writes n shards plus
      `model.safetensors.index.json` in HF's naming.
    tokenizer: also write `tokenizer.json` / `tokenizer_config.json`.

  Returns:
    `path`.
  """
  os.makedirs(path, exist_ok=True)
  if isinstance(config, TransformerConfig):
    config = hf_config_dict(config)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  names = sorted(tensors)
  if num_shards is None:
    safetensors.numpy.save_file({n: tensors[n] for n in names},
                                os.path.join(path, "model.safetensors"))
  else:
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.array(names), num_shards)):
      shard = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
      safetensors.numpy.save_file({str(n): tensors[str(n)] for n in chunk},
                                  os.path.join(path, shard))
      weight_map.update({str(n): shard for n in chunk})
    index = dict(metadata=dict(total_size=int(sum(
        a.nbytes for a in tensors.values()))), weight_map=weight_map)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
  if tokenizer:
    tok = Tokenizer.byte_level()
    tok.backend.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump(dict(bos_token="<|bos|>", eos_token="<|eos|>",
                     add_bos_token=True, chat_template=tok.chat_template), f)
  return path


@contextlib.contextmanager
def float64_forward(hf_model, inv_freq: np.ndarray,
                    inv_freq_local: Optional[np.ndarray] = None):
  """Runs an HF Llama-family or Gemma 3 model in float64 inside the block.

  `model.double()` is not enough: transformers computes the rotary angles,
  RMSNorm and the attention softmax in float32 whatever the model dtype. This
  patches those three places (rotary from `inv_freq`, float64). The model is
  converted in place and stays float64 afterwards.

  Args:
    hf_model: a `*ForCausalLM` from transformers.
    inv_freq: `[Dh/2]` float64 RoPE inverse frequencies (seqdec's
      `rope_inv_freq`, which follows HF's scaling rules); Gemma 3: the
      global layers'.
    inv_freq_local: Gemma 3's local layers' frequencies.

  Yields:
    The float64 model.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  hf64 = hf_model.double()
  inv = {None: torch.from_numpy(np.asarray(inv_freq, np.float64))}
  inv["full_attention"] = inv[None]
  if inv_freq_local is not None:
    inv["sliding_attention"] = torch.from_numpy(
        np.asarray(inv_freq_local, np.float64))

  def rotary(x, position_ids, layer_type=None, *unused_args,
             **unused_kwargs):
    angle = position_ids.double()[..., None] * inv[layer_type]
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos().to(x.dtype), angle.sin().to(x.dtype)

  def rms_norm(self, h):
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True)
                             + getattr(self, "variance_epsilon",
                                       getattr(self, "eps", None)))
    if type(self).__name__.startswith("Gemma"):
      return (1.0 + self.weight) * normed
    return self.weight * normed

  softmax = F.softmax

  def softmax64(x, dim=None, dtype=None, **kwargs):
    return softmax(x, dim=dim,
                   dtype=None if x.dtype == torch.float64 else dtype, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(F, "softmax", softmax64)
    mp.setattr(hf64.model.rotary_emb, "forward", rotary)
    for module in hf64.modules():
      if type(module).__name__.endswith("RMSNorm"):
        mp.setattr(module, "forward", rms_norm.__get__(module))
    yield hf64
