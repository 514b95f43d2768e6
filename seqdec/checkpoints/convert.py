"""Hugging Face tensor names -> the NNX `Transformer`, shared by every loader.

Every checkpoint format seqdec reads (HF safetensors, GGUF) is first expressed
as a dict of HF Llama-style tensor names to numpy arrays in HF layout
(`Linear.weight` is `[out, in]`); this module checks it strictly and builds the
model from it without a random initialisation.
"""

from __future__ import annotations

import functools
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqdec.models.config import TransformerConfig, as_dtype
from seqdec.models.transformer import Transformer, inv_freq_array


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt, or does not match the model."""


# HF name pattern -> (seqdec path template, transpose?)
_LAYER_MAP = {
    "self_attn.q_proj.weight": ("attn.q_proj", True),
    "self_attn.k_proj.weight": ("attn.k_proj", True),
    "self_attn.v_proj.weight": ("attn.v_proj", True),
    "self_attn.o_proj.weight": ("attn.o_proj", True),
    "self_attn.q_proj.bias": ("attn.q_bias", False),
    "self_attn.k_proj.bias": ("attn.k_bias", False),
    "self_attn.v_proj.bias": ("attn.v_bias", False),
    "mlp.gate_proj.weight": ("mlp.gate_proj", True),
    "mlp.up_proj.weight": ("mlp.up_proj", True),
    "mlp.down_proj.weight": ("mlp.down_proj", True),
    "input_layernorm.weight": ("input_norm.scale", False),
    "post_attention_layernorm.weight": ("post_attn_norm.scale", False),
}
_TOP_MAP = {
    "model.embed_tokens.weight": ("embed", False),
    "model.norm.weight": ("final_norm.scale", False),
    "lm_head.weight": ("lm_head", True),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Buffers some exporters save that carry no parameters.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def hf_name_to_path(name: str) -> tuple[str, bool] | None:
  """Maps an HF tensor name to (seqdec state path, needs transpose)."""
  if name in _TOP_MAP:
    return _TOP_MAP[name]
  m = _LAYER_RE.match(name)
  if m and m.group(2) in _LAYER_MAP:
    path, transpose = _LAYER_MAP[m.group(2)]
    return f"layers.{m.group(1)}.{path}", transpose
  return None


def _path_str(path) -> str:
  return ".".join(str(p) for p in path)


@functools.lru_cache(maxsize=8)
def _abstract_split(config: TransformerConfig):
  """(graphdef, abstract state) of a config, computed once per config."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(config,
                                                      rngs=nnx.Rngs(0))))


def model_from_hf_tensors(config: TransformerConfig,
                          tensors: Mapping[str, np.ndarray]) -> Transformer:
  """Builds a `Transformer` from HF-named tensors, checking names and shapes.

  A tied model (`config.tie_embeddings`) may carry an `lm_head.weight` equal to
  the embedding (some exporters save it); it is then ignored. Unknown tensors,
  missing tensors and shape mismatches raise `CheckpointError` naming them.
  """
  graphdef, state = _abstract_split(config)
  expected = {}
  for path, var in nnx.to_flat_state(state):
    expected[_path_str(path)] = var
  pdt = as_dtype(config.param_dtype)

  values: dict[str, jax.Array] = {}
  unknown = []
  for name, array in tensors.items():
    if _IGNORED.match(name):
      continue
    if name == "lm_head.weight" and config.tie_embeddings:
      continue
    mapped = hf_name_to_path(name)
    if mapped is None or mapped[0] not in expected:
      unknown.append(name)
      continue
    path, transpose = mapped
    array = np.asarray(array)
    if transpose:
      array = array.T
    want = tuple(expected[path].shape)
    if tuple(array.shape) != want:
      raise CheckpointError(
          f"tensor {name!r} has shape {tuple(array.shape)} "
          f"(after layout change), the model expects {want}")
    values[path] = jnp.asarray(array, dtype=pdt)
  if unknown:
    raise CheckpointError(
        f"checkpoint has {len(unknown)} tensors this model does not use, e.g. "
        f"{sorted(unknown)[:3]} (wrong architecture or config?)")
  values["inv_freq"] = inv_freq_array(config)
  missing = sorted(set(expected) - set(values))
  if missing:
    raise CheckpointError(
        f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

  flat = []
  for path, var in nnx.to_flat_state(state):
    flat.append((path, var.replace(values[_path_str(path)])))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def model_to_hf_tensors(model: Transformer) -> dict[str, np.ndarray]:
  """The inverse mapping (used to write safetensors caches and in tests)."""
  state = nnx.state(model, nnx.Param)
  by_path = {_path_str(p): np.asarray(v.get_value())
             for p, v in nnx.to_flat_state(state)}
  out = {}
  names = list(_TOP_MAP)
  for i in range(model.config.num_layers):
    names += [f"model.layers.{i}.{k}" for k in _LAYER_MAP]
  for name in names:
    path, transpose = hf_name_to_path(name)
    if path in by_path:
      out[name] = by_path[path].T if transpose else by_path[path]
  return out
