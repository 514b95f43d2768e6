"""A byte-level corpus from the Python standard library's own source.

Every machine with Python has it, so training needs no download. Files are the
`*.py` files under `sysconfig.get_paths()['stdlib']`, excluding any
`site-packages` tree, in sorted path order; each file's bytes are followed by
one NUL byte (token 0, never in source text) as a document separator. Tokens
are bytes (V = 256). The last `valid_fraction` of the bytes is the validation
split.

Batches are a pure function of (seed, step): the window starts of step s come
from `numpy.random.default_rng([seed, s])`, so the data order is deterministic
and a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sysconfig

import numpy as np

VOCAB_SIZE = 256
SEPARATOR = 0


def stdlib_files(max_files: int = 0) -> list[pathlib.Path]:
  """The stdlib's .py files in sorted order (the first `max_files` if > 0)."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in root.rglob("*.py")
                 if "site-packages" not in p.parts and p.is_file())
  if not files:
    raise FileNotFoundError(f"no .py files under {root}")
  return files[:max_files] if max_files > 0 else files


def read_corpus(max_files: int = 0) -> np.ndarray:
  """uint8 [N]: the files' bytes, each followed by a NUL separator."""
  parts = []
  for path in stdlib_files(max_files):
    parts.append(np.frombuffer(path.read_bytes(), np.uint8))
    parts.append(np.array([SEPARATOR], np.uint8))
  return np.concatenate(parts)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Train / validation byte arrays and deterministic windows over them."""
  train: np.ndarray
  valid: np.ndarray

  @classmethod
  def load(cls, max_files: int = 0, valid_fraction: float = 0.01,
           min_split: int = 4096) -> "Corpus":
    if not 0 < valid_fraction < 1:
      raise ValueError(f"valid_fraction must be in (0, 1), got "
                       f"{valid_fraction}")
    data = read_corpus(max_files)
    n_valid = max(min_split, int(len(data) * valid_fraction))
    if len(data) < n_valid + min_split:
      raise ValueError(f"corpus too small: {len(data)} bytes")
    return cls(train=data[:-n_valid], valid=data[-n_valid:])

  def train_batch(self, seed: int, step: int, batch: int,
                  length: int, rows: slice = slice(None)) -> np.ndarray:
    """int32 [batch, length + 1]: windows of step `step` (inputs + targets);
    only the `rows` of it (a process's share of a sharded batch)."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(self.train) - length - 1, size=batch)
    return _windows(self.train, starts[rows], length + 1)

  def valid_batches(self, n_batches: int, batch: int,
                    length: int) -> np.ndarray:
    """int32 [n_batches, batch, length + 1]: evenly spaced, always the same."""
    n = n_batches * batch
    starts = np.linspace(0, len(self.valid) - length - 1, n).astype(np.int64)
    return _windows(self.valid, starts, length + 1).reshape(
        n_batches, batch, length + 1)


def _windows(data: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
  idx = starts[:, None] + np.arange(width)[None, :]
  return data[idx].astype(np.int32)
