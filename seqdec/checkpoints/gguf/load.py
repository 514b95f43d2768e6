"""`load_gguf`: a GGUF file -> (model, tokenizer), through a float32 cache.

The first load of a file converts it (metadata parse, dequantisation, q/k
unpermute, tokenizer rebuild) and stores the float32 tensors and the
tokenizer as an entry of `seqdec.checkpoints.cache`; later loads read the
entry. See `load_gguf` for the cache keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from typing import Any, Optional

import numpy as np
import tokenizers

from seqdec.checkpoints import cache, safetensors_io
from seqdec.checkpoints.convert import (CheckpointError, check_dtypes,
                                        model_from_hf_tensors)
from seqdec.checkpoints.gguf.config import check_architecture, config_from_gguf
from seqdec.checkpoints.gguf.reader import GGUFHeader, read_gguf, scan_gguf
from seqdec.checkpoints.gguf.installed import (  # re-exported
    SMOLLM2_FILE, SMOLLM2_INSTALL, SMOLLM2_PACKAGE, find_smollm2_gguf)
from seqdec.checkpoints.gguf.tensors import hf_tensors_from_gguf
from seqdec.checkpoints.gguf.tokenizer import (GGUFTokenizer,
                                               tokenizer_from_gguf)
from seqdec.models.config import TransformerConfig
from seqdec.models.transformer import Transformer

# Bump when the cache layout or the conversion changes: older entries are then
# rebuilt instead of loaded. (2: generic `seqdec.checkpoints.cache` entries.)
CACHE_FORMAT_VERSION = 2
CACHE_KIND = "gguf"
_MODEL_FILE = "model.safetensors"
_TOKENIZER_FILE = "tokenizer.json"


def model_from_gguf(reader, dtype: str = "float32") -> Transformer:
  """Builds the model from an open reader (no cache)."""
  check_dtypes(dtype)
  config = config_from_gguf(reader)
  config = config.replace(dtype=dtype, param_dtype=dtype)
  return model_from_hf_tensors(config, hf_tensors_from_gguf(reader, config))


# ------------------------------------------------------------ cache keys


def _stat_signature(st: os.stat_result) -> tuple[int, ...]:
  return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def fast_key(path: str, header: GGUFHeader, st: os.stat_result) -> str:
  """The cheap cache key of a GGUF file: its stat data and header digest.

      fast = SHA-256(json([dev, inode, size, mtime_ns, ctime_ns,
                           SHA-256(bytes [0, data_offset))]))

  The header region (metadata + tensor table, up to the tensor data) is a
  few kB to a few MB, against GBs of tensor data. A rewrite of the file
  changes its mtime and ctime (even when the mtime is then restored, e.g. by
  `touch -r`, the ctime moves), a replacement (rename onto the path) its
  inode, so a changed file does not match; an identical file that merely
  changed stat data (touched, copied, moved to another disk) misses this key
  and is identified by the full SHA-256 instead (`load_gguf`).

  Args:
    path: the file.
    header: its `scan_gguf` header.
    st: `os.stat(path)`, taken before the header is read.

  Returns:
    A hex digest.
  """
  with open(path, "rb") as f:
    head = f.read(header.data_offset)
  parts = list(_stat_signature(st)) + [hashlib.sha256(head).hexdigest()]
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


# ----------------------------------------------------------- cache entry


def _config_to_json(config: TransformerConfig) -> dict[str, Any]:
  d = dataclasses.asdict(config)
  if config.rope_scaling is not None:
    d["rope_scaling"] = dict(config.rope_scaling)
  return d


def _tokenizer_meta(tok: GGUFTokenizer) -> dict[str, Any]:
  return {"bos_id": tok.bos_id, "eos_ids": list(tok.eos_ids),
          "add_bos": tok.add_bos, "chat_template": tok.chat_template,
          "bos_token": tok.bos_token, "eos_token": tok.eos_token,
          "pad_id": tok.pad_id, "unk_id": tok.unk_id,
          "pre_tokenizer_type": tok.pre_tokenizer_type}


def _write_entry(store: cache.Cache, key: str, source: str,
                 config: TransformerConfig, tensors: dict[str, np.ndarray],
                 tokenizer: GGUFTokenizer) -> None:
  """Stores the converted tensors and tokenizer under `key` (atomically)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  def write_model(file):
    safetensors.numpy.save_file(
        {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
        file, metadata={"format": "pt", "source_sha256": key})

  tok_text = tokenizer.backend.to_str()

  def write_tokenizer(file):
    with open(file, "w", encoding="utf-8") as f:
      f.write(tok_text)

  info = {"source_sha256": key, "source_path": os.path.abspath(source),
          "source_size": os.path.getsize(source),
          "config": _config_to_json(config), "tensor_names": sorted(tensors),
          "tokenizer": _tokenizer_meta(tokenizer)}
  store.write(key, {_MODEL_FILE: write_model,
                    _TOKENIZER_FILE: write_tokenizer}, info)


def _load_entry(entry: cache.Entry):
  """(config, tensors, tokenizer) of a verified entry.

  Raises:
    cache.BadEntry: the files do not parse or do not match the meta file.
  """
  info = entry.info
  if info.get("source_sha256") != entry.key:
    raise cache.BadEntry("the entry belongs to another source file")
  try:
    tensors = safetensors_io.open_lazy(entry.file(_MODEL_FILE))
    if sorted(tensors) != info["tensor_names"]:
      raise cache.BadEntry("tensor names differ from the recorded ones")
    with open(entry.file(_TOKENIZER_FILE), encoding="utf-8") as f:
      backend = tokenizers.Tokenizer.from_str(f.read())
    config = TransformerConfig.make(**info["config"])
    tokenizer = GGUFTokenizer(backend, **info["tokenizer"])
  except cache.BadEntry:
    raise
  except Exception as e:  # OSError, KeyError, safetensors/tokenizers errors
    raise cache.BadEntry(f"{type(e).__name__}: {e}") from e
  return config, tensors, tokenizer


def _read_entry(store: cache.Cache, key: str, source: str):
  """`_load_entry` of the entry for `key`; None (with a warning if bad)."""
  try:
    entry = store.read(key)
    return None if entry is None else _load_entry(entry)
  except cache.BadEntry as e:
    warnings.warn(f"seqdec: the GGUF cache entry {store.entry_path(key)} is "
                  f"unusable ({e}); rebuilding it from {source}",
                  RuntimeWarning, stacklevel=3)
    return None


def _add_alias(store: cache.Cache, fast: str, key: str, source: str,
               st: os.stat_result) -> None:
  """Records fast -> key unless the file changed since `st` (best effort)."""
  try:
    if _stat_signature(os.stat(source)) != _stat_signature(st):
      return
    store.add_alias(fast, key, {"source_path": os.path.abspath(source),
                                "source_size": st.st_size,
                                "source_mtime_ns": st.st_mtime_ns})
  except OSError:
    pass  # a read-only cache: the next load hashes the file again


# ------------------------------------------------------------------ load


def load_gguf(path: str, *, dtype: str = "float32",
              cache_dir: Optional[str] = None, mesh=None
              ) -> tuple[Transformer, GGUFTokenizer]:
  """Loads a llama-family or Gemma 3 GGUF as (model, tokenizer), via a
  float32 cache.

  The entry `<cache_dir>/<sha256>/` (a `seqdec.checkpoints.cache` entry of
  kind 'gguf', keyed by the SHA-256 of the GGUF's bytes) holds
  `model.safetensors` (HF-named float32 tensors in HF layout),
  `tokenizer.json` and `seqdec.json` (format version, the full SHA-256,
  config, tokenizer ids and template, every file's size and CRC-32).

  Finding it without hashing the whole file (seconds for a 7B model): the
  cheap `fast_key` (stat data + a digest of the header region) is looked up
  in the cache's aliases. On a hit the entry is read and verified (sizes,
  CRC-32s, recorded SHA-256 = alias target); the GGUF's tensor data is not
  read. On a miss (new file, or one touched, copied or rewritten) the full
  SHA-256 is computed: if an entry exists under it (an identical file with
  new stat data) it is used, else the file is converted and the entry
  written; either way the alias fast key -> SHA-256 is recorded, so the next
  load of the unchanged file is a hit again. An entry that fails any check
  is rebuilt from the GGUF with a warning; a file that changes while it is
  being loaded is not cached. When the cache dir is not writable the model
  still loads (with a warning).

  Args:
    path: the GGUF file.
    dtype: compute and parameter dtype of the returned model; 'float64'
      needs `jax.config.update("jax_enable_x64", True)` first.
    cache_dir: cache root; default `$SEQDEC_CACHE` or `~/.cache/seqdec`.
    mesh: None, or a device mesh: each device receives only its block of
      each parameter (`seqdec.parallel.sharding` rules).

  Returns:
    `(Transformer, GGUFTokenizer)`.

  Raises:
    CheckpointError: missing/invalid/truncated file, unsupported architecture,
      tensor type or tokenizer; an unknown dtype, or float64 without
      `jax_enable_x64`.
  """
  check_dtypes(dtype)
  path = os.fspath(path)
  header = scan_gguf(path)  # fast: rejects bad files before any hashing
  check_architecture(header.metadata.get("general.architecture"))
  store = cache.Cache(cache_dir, kind=CACHE_KIND,
                      format_version=CACHE_FORMAT_VERSION)
  store.clean()
  st = os.stat(path)
  fast = fast_key(path, header, st)
  key = store.resolve(fast)
  loaded = _read_entry(store, key, path) if key else None
  if loaded is None:
    full = cache.sha256_file(path)
    if full != key:
      loaded = _read_entry(store, full, path)
    key = full
    if loaded is not None:
      _add_alias(store, fast, key, path, st)

  if loaded is not None:
    config, tensors, tokenizer = loaded
  else:
    reader = read_gguf(path)
    config = config_from_gguf(reader)
    tokenizer = tokenizer_from_gguf(reader)
    tensors = hf_tensors_from_gguf(reader, config)
    del reader
    if _stat_signature(os.stat(path)) != _stat_signature(st):
      warnings.warn(f"seqdec: {path} changed while it was being loaded; not "
                    f"caching it", RuntimeWarning, stacklevel=2)
    else:
      try:
        _write_entry(store, key, path, config, tensors, tokenizer)
      except OSError as e:
        warnings.warn(f"seqdec: could not write the GGUF cache under "
                      f"{store.root} ({e}); loading without it",
                      RuntimeWarning, stacklevel=2)
      else:
        _add_alias(store, fast, key, path, st)
  config = config.replace(dtype=dtype, param_dtype=dtype)
  return model_from_hf_tensors(config, tensors, mesh), tokenizer
