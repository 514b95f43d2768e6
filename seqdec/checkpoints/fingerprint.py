"""A model's identity by its weights, for files that belong to one model
(drafter checkpoints, drafter training data)."""

from __future__ import annotations

import hashlib

import jax
import numpy as np
from flax import nnx


SOURCE_ATTR = "source_fingerprint"


def derived(model, source):
  """`model`, marked as a conversion of `source` (same weights in another
  form): `fingerprint(model) == fingerprint(source)` from now on."""
  setattr(model, SOURCE_ATTR, fingerprint(source))
  return model


def fingerprint(model) -> str:
  """SHA-256 over the model's parameters (names, shapes, dtypes, bytes):
  tells apart checkpoints that share every shape (SmolLM2 base/Instruct).

  A model converted from another (`derived`: e.g. its weights rounded to
  bf16 by a precision policy) answers with its source's fingerprint, so the
  drafters and data made for the source serve it too.
  """
  source = getattr(model, SOURCE_ATTR, None)
  if source:
    return source
  digest = hashlib.sha256()
  for path, leaf in sorted(
      (jax.tree_util.keystr(p), x) for p, x in
      jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))):
    a = np.asarray(leaf)
    digest.update(f"{path}|{a.shape}|{a.dtype}".encode())
    digest.update(np.ascontiguousarray(a).tobytes())
  return digest.hexdigest()
