"""GGUF tensors -> HF-named float32 arrays in HF layout.

Dequantisation (`gguf.quants`), llama.cpp's q/k row permutation undone, and
GGUF tensor names mapped to Hugging Face ones, ready for
`seqdec.checkpoints.convert.model_from_hf_tensors`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import gguf
import numpy as np

from seqdec.checkpoints.convert import CheckpointError
from seqdec.models.config import TransformerConfig


def dequantize(data: np.ndarray, ggml_type: int,
               ne: Sequence[int]) -> np.ndarray:
  """Dequantises one tensor's raw data to a float32 row-major array.

  Block formats follow GGML (e.g. Q8_0: 32 values per block, x = d * q with an
  f16 scale d and int8 q; Q4_1: x = d * q + m with 4-bit q); the arithmetic is
  `gguf.quants.dequantize`'s.

  Args:
    data: the tensor's bytes (any dtype view of them, any shape).
    ggml_type: a `gguf.GGMLQuantizationType`.
    ne: GGML dimensions (fastest first), e.g. `ReaderTensor.shape`.

  Returns:
    float32 array of shape `reversed(ne)`.

  Raises:
    CheckpointError: the type cannot be dequantised, or the data has the
      wrong size.
  """
  qtype = gguf.GGMLQuantizationType(int(ggml_type))
  shape = tuple(int(n) for n in reversed(list(ne)))
  block, type_size = gguf.GGML_QUANT_SIZES[qtype]
  n_elem = int(np.prod(shape, dtype=np.int64))
  raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
  if raw.size != n_elem // block * type_size:
    raise CheckpointError(f"a {qtype.name} tensor of shape {shape} needs "
                          f"{n_elem // block * type_size} bytes, got "
                          f"{raw.size}")
  if qtype == gguf.GGMLQuantizationType.F64:
    return raw.view(np.float64).astype(np.float32).reshape(shape)
  rows = raw.reshape(-1, shape[-1] // block * type_size)
  try:
    out = gguf.quants.dequantize(rows, qtype)
  except NotImplementedError:
    raise CheckpointError(
        f"unsupported GGUF tensor type {qtype.name}: the gguf package cannot "
        f"dequantise it") from None
  return np.asarray(out, dtype=np.float32).reshape(shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (weights `[N*Dh, D]` or biases).

  HF rotates the split halves of a head (element i pairs with i + Dh/2);
  llama.cpp rotates adjacent pairs (2i, 2i+1). Its converter therefore stores
  HF row (head h, half c, index i) at row h*Dh + 2*i + c. Reading the GGUF
  rows as [h, i, c] and swapping the last two axes gives back [h, c, i]:

      W_hf[h*Dh + c*Dh/2 + i] = W_gguf[h*Dh + 2*i + c]

  Args:
    w: `[n_heads * Dh, ...]` as stored in the GGUF.
    n_heads: query heads for q, key/value heads for k.

  Returns:
    The HF-layout array, same shape.
  """
  rows = w.shape[0]
  if rows % (2 * n_heads):
    raise CheckpointError(f"cannot unpermute {w.shape} over {n_heads} heads")
  half = rows // n_heads // 2
  return (w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


_GGUF_TO_HF_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 3 (sandwich norms, QK-norm): llama.cpp's `ffn_norm` is the norm
# before the MLP, HF's `pre_feedforward_layernorm`.
_GGUF_TO_HF_LAYER_GEMMA3 = dict(
    _GGUF_TO_HF_LAYER, ffn_norm="pre_feedforward_layernorm",
    post_attention_norm="post_attention_layernorm",
    post_ffw_norm="post_feedforward_layernorm",
    attn_q_norm="self_attn.q_norm", attn_k_norm="self_attn.k_norm")
_GGUF_TO_HF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Consumed by `config_from_gguf`, not parameters.
_GGUF_NON_PARAMS = ("rope_freqs.weight",)


def gguf_name_to_hf(name: str, sandwich: bool = False) -> Optional[str]:
  """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'
  (`sandwich`: Gemma 3's block norms and QK-norms)."""
  if name in _GGUF_TO_HF_TOP:
    return _GGUF_TO_HF_TOP[name]
  table = _GGUF_TO_HF_LAYER_GEMMA3 if sandwich else _GGUF_TO_HF_LAYER
  parts = name.split(".")
  if (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit()
      and parts[2] in table and parts[3] in ("weight", "bias")):
    return f"model.layers.{parts[1]}.{table[parts[2]]}.{parts[3]}"
  return None


def hf_tensors_from_gguf(reader,
                         config: TransformerConfig) -> dict[str, np.ndarray]:
  """All parameters as HF-named float32 numpy arrays in HF layout.

  Args:
    reader: a `gguf.GGUFReader`.
    config: from `config_from_gguf(reader)` (gives the head counts for the
      q/k unpermute).

  Returns:
    name -> float32 array, e.g. 'model.layers.0.self_attn.q_proj.weight' of
    shape `[H*Dh, D]`.

  Gemma 3 (`config.norm_offset` = 1): llama.cpp stores every RMSNorm weight
  (QK-norms included) as 1 + w; w = stored - 1 in float32, as transformers
  computes it. Its q/k rows are not permuted (NeoX-style RoPE in llama.cpp).

  Raises:
    CheckpointError: unknown tensor names or unsupported tensor types.
  """
  out: dict[str, np.ndarray] = {}
  unknown = []
  gemma = config.norm_offset != 0
  for t in reader.tensors:
    if t.name in _GGUF_NON_PARAMS:
      continue
    hf = gguf_name_to_hf(t.name, sandwich=config.sandwich_norm)
    if hf is None:
      unknown.append(t.name)
      continue
    try:
      w = dequantize(t.data, t.tensor_type, t.shape)
    except CheckpointError as e:
      raise CheckpointError(f"tensor {t.name!r}: {e}") from None
    if gemma:
      if hf.endswith("norm.weight"):
        w = w - np.float32(config.norm_offset)
    elif ".self_attn.q_proj." in hf:
      w = unpermute_qk(w, config.num_heads)
    elif ".self_attn.k_proj." in hf:
      w = unpermute_qk(w, config.num_kv_heads)
    out[hf] = np.ascontiguousarray(w)
  if unknown:
    raise CheckpointError(
        f"GGUF has {len(unknown)} tensors seqdec does not map, e.g. "
        f"{sorted(unknown)[:3]}")
  return out
