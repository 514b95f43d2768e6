"""Self-distillation data for drafters: the target's responses to the
offline prompts (`drafter_prompts`) and the target's features over them,
stored once as tensorstore (zarr) arrays and read by index.

Layout of a dataset directory:

    meta.json        target fingerprint and shapes, the recipe (prompt seed
                     and range, temperature, budgets), `done` chunk count
    tokens/          zarr int32   [N, S]     prompt + response, right-padded
    lengths/         zarr int32   [N]        tokens per sequence
    prompt_lens/     zarr int32   [N]        prompt tokens (the rest: response)
    features/        zarr bf16    [N, S, D]  target.features(hidden) (the LM
                                             head's input), position by position;
                                             with feature taps (EAGLE-3) the
                                             fused [N, S, (k+1)D] of
                                             `protocol.backbone_features`, the
                                             final features last

Sequences are written in chunks of `chunk` rows; `meta.json`'s `done` counts
the finished chunks, so an interrupted build resumes at the next chunk and a
reader sees only finished rows. Distillation targets are recomputed from the
features with the target's LM head (`softmax(head(f_t))`), never stored
(a 49k-token distribution per token would be 98 KB in bf16).

The responses alone can be kept in a small response store
(`seqdec.data.responses`, `export_responses`) from which a later build
recomputes the features without generating again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from seqdec.checkpoints.fingerprint import fingerprint
from seqdec.errors import UserError
from seqdec.jsonl import write_text_atomic
from seqdec.models.protocol import backbone_features

ARRAYS = ("tokens", "lengths", "prompt_lens", "features")


class DataError(UserError):
  """A missing, corrupt or mismatched drafter dataset."""


def _spec(path: str, dtype: str, shape: Sequence[int],
          chunks: Sequence[int]) -> dict:
  return {"driver": "zarr", "kvstore": {"driver": "file", "path": path},
          "metadata": {"dtype": dtype, "shape": list(shape),
                       "chunks": list(chunks)}}


_DTYPES = dict(tokens="<i4", lengths="<i4", prompt_lens="<i4",
               features="bfloat16")


def _checked_rows(rows, num_rows: int, path: str) -> np.ndarray:
  """`rows` as an array; DataError if any is outside the finished rows."""
  rows = np.asarray(rows)
  if rows.size and (rows.min() < 0 or rows.max() >= num_rows):
    raise DataError(f"rows {rows.min()}..{rows.max()} outside the "
                    f"{num_rows} finished rows of {path!r}")
  return rows


@dataclasses.dataclass
class FeatureDataset:
  """An open dataset (read side); `rows` counts the finished sequences."""
  path: str
  meta: dict
  arrays: dict

  @property
  def rows(self) -> int:
    return min(self.meta["done"] * self.meta["chunk"], self.meta["num_rows"])

  @classmethod
  def open(cls, path: str, target_fingerprint: Optional[str] = None
           ) -> "FeatureDataset":
    """Opens `path`; checks every array and (if given) the target.

    Raises:
      DataError: a missing or unreadable meta.json or array, or a dataset
        built from another target.
    """
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    meta_path = os.path.join(path, "meta.json")
    try:
      with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    except FileNotFoundError:
      raise DataError(f"no drafter dataset at {path!r} (missing meta.json)"
                      ) from None
    except (OSError, ValueError) as e:
      raise DataError(f"corrupt dataset metadata {meta_path!r}: {e}") from None
    if target_fingerprint and meta.get("target_fingerprint") != (
        target_fingerprint):
      raise DataError(f"dataset {path!r} was built from another target "
                      f"(fingerprint {meta.get('target_fingerprint')!r:.20}"
                      f"..., this target {target_fingerprint[:16]}...)")
    arrays = {}
    for name in ARRAYS:
      try:
        arrays[name] = ts.open({"driver": "zarr", "kvstore": {
            "driver": "file", "path": os.path.join(path, name)}},
                               open=True).result()
      except Exception as e:  # pylint: disable=broad-except
        raise DataError(f"cannot open array {os.path.join(path, name)!r}: "
                        f"{str(e).splitlines()[0][:200]}") from None
    return cls(path, meta, arrays)

  def read(self, rows: np.ndarray, names: Sequence[str] = ARRAYS
           ) -> dict[str, np.ndarray]:
    """The arrays `names` at `rows` (int indices < `self.rows`), as numpy.

    Raises:
      DataError: an index past the finished rows or an unreadable chunk.
    """
    rows = _checked_rows(rows, self.rows, self.path)
    out = {}
    for name in names:
      arr = self.arrays[name]
      try:
        x = arr[rows].read().result()
      except Exception as e:  # pylint: disable=broad-except
        raise DataError(f"cannot read {os.path.join(self.path, name)!r} rows"
                        f" {rows.tolist()[:4]}...: "
                        f"{str(e).splitlines()[0][:200]}") from None
      out[name] = np.asarray(x)
    return out


class ConcatDataset:
  """Several datasets of one target read as one (rows in order), e.g. a
  build resumed into a new directory with another chunk size."""

  def __init__(self, parts: Sequence[FeatureDataset]):
    if not parts:
      raise DataError("no dataset given")
    widths = {p.meta["hidden"] for p in parts}
    if len(widths) > 1 or len({p.meta["target_fingerprint"]
                               for p in parts}) > 1:
      raise DataError(f"datasets {[p.path for p in parts]} come from "
                      f"different targets")
    if len({tuple(p.meta.get("taps", ())) for p in parts}) > 1:
      raise DataError(f"datasets {[p.path for p in parts]} hold features "
                      f"of different taps "
                      f"{[p.meta.get('taps', []) for p in parts]}")
    self.parts = list(parts)
    self.path = ",".join(p.path for p in parts)
    self.meta = dict(parts[0].meta, hidden=widths.pop(),
                     seq_len=max(p.meta["seq_len"] for p in parts))
    self.offsets = np.cumsum([0] + [p.rows for p in parts])

  @property
  def rows(self) -> int:
    return int(self.offsets[-1])

  @classmethod
  def open(cls, paths: str, target_fingerprint: Optional[str] = None
           ) -> "ConcatDataset":
    """`paths`: comma-separated dataset directories."""
    return cls([FeatureDataset.open(p.strip(), target_fingerprint)
                for p in paths.split(",") if p.strip()])

  def read(self, rows: np.ndarray, names: Sequence[str] = ARRAYS
           ) -> dict[str, np.ndarray]:
    """As `FeatureDataset.read`, padding sequences to the longest seq_len."""
    rows = _checked_rows(rows, self.rows, self.path)
    part = np.searchsorted(self.offsets, rows, side="right") - 1
    out = {}
    s = self.meta["seq_len"]
    for i, p in enumerate(self.parts):
      sel = np.nonzero(part == i)[0]
      if not len(sel):
        continue
      got = p.read(rows[sel] - self.offsets[i], names)
      for name, x in got.items():
        if name not in out:
          shape = (len(rows),) + ((s,) + x.shape[2:] if x.ndim > 1 else ())
          out[name] = np.zeros(shape, x.dtype)
        if x.ndim > 1:
          out[name][sel, :x.shape[1]] = x
        else:
          out[name][sel] = x
    return out


def create(path: str, meta: dict, num_rows: int, seq_len: int,
           hidden: int, chunk: int) -> None:
  """Creates the empty arrays and meta.json (done = 0); the features are
  (len(meta['taps']) + 1) * hidden wide."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  width = hidden * (len(meta.get("taps", ())) + 1)
  shapes = dict(tokens=((num_rows, seq_len), (chunk, seq_len)),
                lengths=((num_rows,), (chunk,)),
                prompt_lens=((num_rows,), (chunk,)),
                features=((num_rows, seq_len, width), (1, seq_len, width)))
  for name, (shape, chunks) in shapes.items():
    ts.open(_spec(os.path.join(path, name), _DTYPES[name], shape, chunks),
            create=True, delete_existing=True).result()
  write_meta(path, dict(meta, num_rows=num_rows, seq_len=seq_len,
                        hidden=hidden, chunk=chunk, done=0))


def write_meta(path: str, meta: dict) -> None:
  write_text_atomic(os.path.join(path, "meta.json"),
                    json.dumps(meta, indent=1, sort_keys=True))


@functools.partial(jax.jit, static_argnums=(3,))
def _features(graphdef, state, tokens, taps=()):
  model = nnx.merge(graphdef, state)
  b, t = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  feats, _ = backbone_features(model, tokens, pos, model.init_cache(b, t),
                               taps=taps)
  return feats.astype(jnp.bfloat16)


def target_features(model, tokens: np.ndarray, taps: Sequence[int] = ()
                    ) -> np.ndarray:
  """`[B, S]` right-padded ids -> `[B, S, D]` bf16 features (causal, so
  padding never reaches real positions); with `taps` the fused
  `[B, S, (k+1)D]` (`protocol.backbone_features`)."""
  graphdef, state = nnx.split(model)
  return np.asarray(_features(graphdef, state, jnp.asarray(tokens),
                              tuple(taps)))


def features_by_length(model, tokens: np.ndarray, lengths: np.ndarray,
                       batch: int = 16, taps: Sequence[int] = ()
                       ) -> np.ndarray:
  """`target_features` of `[N, S]` rows, computed `batch` rows at a time in
  order of length, each group padded only to its own longest row
  (bucketed): the work follows the real tokens, not N x S. Positions past a
  row's length are zero."""
  from seqdec.decoding.loops import bucket  # pylint: disable=g-import-not-at-top
  n, s = tokens.shape
  out = np.zeros((n, s, model.config.hidden_size * (len(taps) + 1)),
                 ml_dtypes.bfloat16)
  order = np.argsort(lengths, kind="stable")
  for i in range(0, n, batch):
    rows = order[i:i + batch]
    width = min(s, bucket(int(lengths[rows].max())))
    group = np.zeros((batch, width), np.int32)   # one batch shape per width
    group[:len(rows)] = tokens[rows, :width]
    out[rows, :width] = target_features(model, group, taps)[:len(rows)]
  for r in range(n):
    out[r, lengths[r]:] = 0
  return out


def build(path: str, model, tokenizer, prompts: Sequence[tuple[str, str]],
          *, meta: dict, max_prompt: int, max_new: int, temperature: float,
          seed: int, chunk: int = 16, group: int = 1, generator_model=None,
          responses=None, taps: Sequence[int] = (),
          log: Callable[[str], None] = lambda _: None) -> FeatureDataset:
  """Generates responses and features for `prompts` into `path` (resumes a
  partial build with the same recipe).

  Prompts are rendered with the chat template when the tokenizer has one,
  cut to their first `max_prompt` tokens; responses are the target's own
  (greedy at temperature 0, seeded sampling otherwise), at most `max_new`
  tokens, stopped at the tokenizer's stop ids.

  Work is done a block of `group` chunks at a time: the block's prompts are
  generated `chunk` at a time in order of prompt length (a batch pads to
  its longest prompt and runs until its longest response ends, so like
  lengths together waste least), the features are computed by length
  (`features_by_length`), and the block is written in prompt order, so row
  i is always prompt i. `generator_model` (default `model`) writes the
  responses, e.g. the target under the bf16_weights policy on a host where
  its batched matmuls are faster; the features and the distillation targets
  always come from `model`.

  `responses` (a `seqdec.data.responses.ResponseStore` of this recipe and
  target) supplies the responses it holds (prompt index = `meta`'s
  `first_prompt` + row); only the other rows are generated. With `taps`
  (target block indices) the stored features are EAGLE-3's fused ones.
  """
  # pylint: disable=g-import-not-at-top
  from seqdec.generator import Generator
  # pylint: enable=g-import-not-at-top
  seq_len = max_prompt + max_new
  hidden = model.config.hidden_size
  meta = dict(meta, target_fingerprint=fingerprint(model),
              max_prompt=max_prompt, max_new=max_new,
              temperature=temperature, seed=seed)
  if taps:                      # (datasets without taps keep their recipe)
    meta["taps"] = list(taps)
  n = len(prompts)
  first = int(meta.get("first_prompt", 0))
  if responses is not None:
    responses.check_recipe(meta)
  existing = None
  if os.path.exists(os.path.join(path, "meta.json")):
    existing = FeatureDataset.open(path).meta
    recipe = {k: v for k, v in meta.items() if k != "command"}
    same = {k: existing.get(k) for k in recipe} == recipe and (
        existing["num_rows"] == n)
    if not same:
      raise DataError(f"{path!r} holds a dataset with another recipe; "
                      f"choose a new --out or delete it")
  if existing is None:
    create(path, meta, n, seq_len, hidden, chunk)
  ds = FeatureDataset.open(path)
  chunk = ds.meta["chunk"]            # a resumed build keeps its chunking
  gen = Generator(generator_model or model, tokenizer, max_new_tokens=max_new,
                  temperature=temperature, seed=seed, max_batch=chunk)
  num_chunks = -(-n // chunk)
  c = ds.meta["done"]
  while c < num_chunks:
    c_end = min(num_chunks, c + group)
    lo, hi = c * chunk, min(n, c_end * chunk)
    ids = []
    for _, text in prompts[lo:hi]:
      msg = [{"role": "user", "content": text}]
      ids.append((gen.encode(msg) if tokenizer.chat_template
                  else gen.encode(text))[:max_prompt])
    prompt_lens = np.array([len(p) for p in ids], np.int32)
    t_gen = time.perf_counter()
    written = [None if responses is None else
               responses.lookup(first + lo + i, p) for i, p in enumerate(ids)]
    todo = np.array([i for i, r in enumerate(written) if r is None], np.int64)
    order = todo[np.argsort(prompt_lens[todo], kind="stable")]
    for i in range(0, len(order), chunk):
      rows = order[i:i + chunk]
      for r, result in zip(rows, gen.generate_ids(
          [ids[r] for r in rows], row_ids=[lo + int(r) for r in rows])):
        written[r] = result.tokens
    t_feat = time.perf_counter()
    tokens = np.zeros((hi - lo, seq_len), np.int32)
    lengths = np.zeros((hi - lo,), np.int32)
    for i, (p, r) in enumerate(zip(ids, written)):
      seq = list(p) + list(r)
      tokens[i, :len(seq)] = seq
      lengths[i] = len(seq)
    feats = features_by_length(model, tokens, lengths, taps=taps)
    t_write = time.perf_counter()
    a = ds.arrays
    a["tokens"][lo:hi].write(tokens).result()
    a["lengths"][lo:hi].write(lengths).result()
    a["prompt_lens"][lo:hi].write(prompt_lens).result()
    a["features"][lo:hi].write(feats).result()
    ds.meta["done"] = c = c_end
    write_meta(path, ds.meta)
    log(f"chunks {c}/{num_chunks}: rows {lo}..{hi - 1}, "
        f"{int((lengths - prompt_lens).sum())} response tokens "
        f"({len(ids) - len(todo)} rows from the response store; generate "
        f"{t_feat - t_gen:.0f} s, features {t_write - t_feat:.0f} s, write "
        f"{time.perf_counter() - t_write:.0f} s)")
  return FeatureDataset.open(path)


def export_responses(ds: FeatureDataset, path: str) -> int:
  """Saves the responses of `ds`'s finished rows as a response store
  (`seqdec.data.responses`) at `path`; returns the rows saved."""
  from seqdec.data import responses  # pylint: disable=g-import-not-at-top
  data = ds.read(np.arange(ds.rows), ("tokens", "lengths", "prompt_lens"))
  prompts, answers = [], []
  for toks, n, p in zip(data["tokens"], data["lengths"], data["prompt_lens"]):
    prompts.append(toks[:p])
    answers.append(toks[p:n])
  responses.save(path, ds.meta, int(ds.meta.get("first_prompt", 0)), prompts,
                 answers)
  return ds.rows
