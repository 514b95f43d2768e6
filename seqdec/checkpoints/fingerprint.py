"""A model's identity by its weights, for files that belong to one model
(drafter checkpoints, drafter training data)."""

from __future__ import annotations

import hashlib

import jax
import numpy as np
from flax import nnx


def fingerprint(model) -> str:
  """SHA-256 over the model's parameters (names, shapes, dtypes, bytes):
  tells apart checkpoints that share every shape (SmolLM2 base/Instruct)."""
  digest = hashlib.sha256()
  for path, leaf in sorted(
      (jax.tree_util.keystr(p), x) for p, x in
      jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))):
    a = np.asarray(leaf)
    digest.update(f"{path}|{a.shape}|{a.dtype}".encode())
    digest.update(np.ascontiguousarray(a).tobytes())
  return digest.hexdigest()
