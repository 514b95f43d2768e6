"""Reading a GGUF file: a validating header scan and the full reader.

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
import mmap
import os
import struct
from typing import Any, Sequence

import gguf
import numpy as np

from seqdec.checkpoints.convert import CheckpointError

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32


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


def get_field(reader, key: str, default: Any = None) -> Any:
  """A metadata value from a GGUFReader (lists for arrays), or `default`."""
  field = reader.fields.get(key)
  if field is None:
    return default
  return field.contents()
