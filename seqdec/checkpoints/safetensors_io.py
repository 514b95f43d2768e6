"""Lazy safetensors reading: every tensor as a read-only memory-mapped view.

A safetensors file is

    [8 bytes: little-endian u64 N] [N bytes: JSON header] [data]

with the header mapping each tensor name to {"dtype", "shape",
"data_offsets": [begin, end]} (offsets into the data section). `open_lazy`
checks the header against the file's size and returns numpy views into a
`np.memmap` of the file: nothing is read until a view is indexed, and a
slice `w[a:b]` of a view reads only the pages under rows a..b. This is what
lets a sharded load (`seqdec.checkpoints.convert.model_from_hf_tensors` with a
mesh) read each device's block of a parameter and never the whole tensor.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
# A header larger than this is corrupt (real headers are a few hundred KB).
MAX_HEADER_BYTES = 100 << 20


class SafetensorsError(ValueError):
  """The file is not a well-formed safetensors file (the message says how)."""


def open_lazy(path: str) -> dict[str, np.ndarray]:
  """`{name: read-only view}` of every tensor in the file at `path`.

  Raises:
    SafetensorsError: a header that does not parse, an unknown dtype, or a
      tensor whose bytes are not all inside the file (a truncated file).
    OSError: the file cannot be opened.
  """
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise SafetensorsError(f"{size} bytes: shorter than the 8-byte header "
                             f"length")
    (n,) = struct.unpack("<Q", head)
    if n > min(size - 8, MAX_HEADER_BYTES):
      raise SafetensorsError(f"header of {n} bytes does not fit in the "
                             f"file's {size} bytes")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, ValueError) as e:
      raise SafetensorsError(f"header is not JSON: {e}") from None
  if not isinstance(header, dict):
    raise SafetensorsError("header is not a JSON object")
  header.pop("__metadata__", None)
  data_size = size - 8 - n
  if not header:
    return {}
  buf = np.memmap(path, dtype=np.uint8, mode="r")
  base = 8 + n
  out = {}
  for name, info in header.items():
    try:
      dtype = np.dtype(_DTYPES[info["dtype"]])
      shape = tuple(int(d) for d in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise SafetensorsError(f"tensor {name!r} has a malformed header entry "
                             f"{info!r:.200}") from None
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not 0 <= begin <= end <= data_size or end - begin != want:
      raise SafetensorsError(
          f"tensor {name!r} ({info['dtype']} {list(shape)}) needs bytes "
          f"{begin}..{end} of a {data_size}-byte data section")
    out[name] = buf[base + begin:base + end].view(dtype).reshape(shape)
  return out
