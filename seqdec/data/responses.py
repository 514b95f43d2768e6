"""A compact store of the target's responses to the drafter prompts, so a
feature dataset can be rebuilt without generating again.

Generating the responses is most of a drafter dataset's cost (about two
thirds of `features.build`'s time on a 2-core CPU); the features are one
teacher-forced pass over the finished sequences. The responses are small
(two bytes a token), so a build can save them (`save`) and a later build,
on another machine, reuse them (`ResponseStore.lookup` in `features.build`)
and generate only the rows the store does not hold. The features are
recomputed from the target either way, never stored here.

File: one `.npz` holding

    meta            JSON: the target's weights fingerprint and the recipe
                    that decides the responses (`RECIPE_KEYS`)
    first           the prompt index of row 0
    prompt_crc      [N] uint32  CRC-32 of each row's prompt token ids
    offsets         [N + 1] int64  row i's response is ids[offsets[i]:
                    offsets[i + 1]]
    ids             [sum] uint16 (int32 for vocabularies over 65,536)

A row is reused only when its prompt, tokenized now, has the stored CRC:
a changed prompt builder or tokenizer is an error naming the row, not a
silent mix of responses to other prompts.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from typing import Optional, Sequence

import numpy as np

from seqdec.errors import UserError

# The dataset recipe keys that decide what the target writes (together with
# its weights): two stores or a store and a build agree on all of them.
RECIPE_KEYS = ("target_fingerprint", "model", "prompt_seed", "text_sources",
               "gen_precision", "max_prompt", "max_new", "temperature",
               "seed")


class ResponseStoreError(UserError):
  """A missing, corrupt or mismatched response store."""


def prompt_crc(ids: Sequence[int]) -> int:
  """CRC-32 of a prompt's token ids (as little-endian int32)."""
  return zlib.crc32(np.asarray(ids, "<i4").tobytes())


def recipe(meta: dict) -> dict:
  """The `RECIPE_KEYS` of a dataset's or store's meta."""
  return {k: meta.get(k) for k in RECIPE_KEYS}


class ResponseStore:
  """Responses to prompts `first .. first + N - 1` (module docstring)."""

  def __init__(self, path: str, meta: dict, first: int,
               crc: np.ndarray, offsets: np.ndarray, ids: np.ndarray):
    self.path, self.meta, self.first = path, meta, first
    self.crc, self.offsets, self.ids = crc, offsets, ids

  @property
  def rows(self) -> int:
    return len(self.crc)

  @classmethod
  def open(cls, path: str) -> "ResponseStore":
    """Reads and checks a store.

    Raises:
      ResponseStoreError: the file is missing, unreadable or inconsistent.
    """
    if not os.path.isfile(path):
      raise ResponseStoreError(f"response store {path!r} does not exist")
    try:
      with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        first = int(z["first"])
        crc, offsets, ids = z["prompt_crc"], z["offsets"], z["ids"]
    except (OSError, ValueError, KeyError, zlib.error, zipfile.BadZipFile,
            json.JSONDecodeError) as e:
      raise ResponseStoreError(f"response store {path!r} is unreadable or "
                               f"corrupt: {e}") from e
    ok = (isinstance(meta, dict) and offsets.ndim == 1 and crc.ndim == 1
          and len(offsets) == len(crc) + 1 and offsets[0] == 0
          and np.all(np.diff(offsets) >= 0) and offsets[-1] == len(ids)
          and first >= 0)
    if not ok:
      raise ResponseStoreError(f"response store {path!r} is corrupt "
                               f"(inconsistent offsets, CRCs or ids)")
    return cls(path, meta, first, crc.astype(np.uint32),
               offsets.astype(np.int64), ids)

  def check_recipe(self, meta: dict) -> None:
    """Raises ResponseStoreError unless `meta` (a build's) has this store's
    recipe: the same target weights and generation settings."""
    want, got = recipe(meta), recipe(self.meta)
    diff = sorted(k for k in RECIPE_KEYS if want[k] != got[k])
    if diff:
      raise ResponseStoreError(
          f"response store {self.path!r} was written with another recipe "
          f"or target (differs in {diff}: store "
          f"{ {k: got[k] for k in diff} }, this build "
          f"{ {k: want[k] for k in diff} })")

  def lookup(self, index: int, prompt_ids: Sequence[int]
             ) -> Optional[list[int]]:
    """The stored response to prompt `index`, None if the store does not
    hold it.

    Raises:
      ResponseStoreError: the store holds the row but for another prompt.
    """
    r = index - self.first
    if not 0 <= r < self.rows:
      return None
    if prompt_crc(prompt_ids) != int(self.crc[r]):
      raise ResponseStoreError(
          f"response store {self.path!r}: prompt {index} differs from the "
          f"one its response was written for (prompt builder or tokenizer "
          f"changed); rebuild without --responses")
    return self.ids[self.offsets[r]:self.offsets[r + 1]].astype(
        np.int32).tolist()


def save(path: str, meta: dict, first: int,
         prompts: Sequence[Sequence[int]],
         responses: Sequence[Sequence[int]]) -> None:
  """Writes a store of `responses[i]` to `prompts[i]` (prompt index
  `first + i`), atomically (a temporary file renamed into place)."""
  if len(prompts) != len(responses):
    raise ValueError("one response per prompt")
  lens = np.array([len(r) for r in responses], np.int64)
  flat = np.concatenate([np.asarray(r, np.int64) for r in responses]
                        ) if len(responses) else np.zeros((0,), np.int64)
  wide = flat.size and (flat.max() >= 2 ** 16 or flat.min() < 0)
  arrays = dict(
      meta=np.array(json.dumps(recipe(meta), sort_keys=True)),
      first=np.array(first, np.int64),
      prompt_crc=np.array([prompt_crc(p) for p in prompts], np.uint32),
      offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
      ids=flat.astype(np.int32 if wide else np.uint16))
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez_compressed(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
