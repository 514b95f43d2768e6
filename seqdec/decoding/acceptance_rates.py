"""Per-rank acceptance rates: validation and the acceptance files.

The rates p_1, p_2, ..., p_K of the positional acceptance model (see
`seqdec.decoding.sequoia`): p_k is the probability that the accepted token at
a reached tree node is its rank-k child. They are marginal and exclusive, so
sum_k p_k <= 1.

Acceptance files (written by `launch/measure_acceptance.py`, read by the
tree spec 'sequoia<n>[d<D>]:<path.json>' of `tree_specs.parse`) are JSON
objects:

    {
      "probs": [p_1, p_2, ..., p_K],   # required: numbers in [0, 1],
                                       # sum <= 1 (+1e-6 rounding slack)
      "drafter": "layerskip@skip:4-15",   # what was measured (free text)
      "target": "smollm2-135m-instruct",
      "temperature": 0.0,
      "rule": "greedy",                # or "lossless-deterministic" (T > 0)
      "trials": 3072,                  # positions the rates are averaged over
      "command": "python launch/measure_acceptance.py ...",
      ...                              # further keys are kept, not checked
    }

Only "probs" is required; the other keys document the measurement (when
present, "temperature" must be a number >= 0 and "trials" an integer >= 1).

A chain drafter (n-gram prompt lookup, whose drafts follow one match's
continuation: per-rank rates that hold at every depth do not describe it)
adds its chain acceptance curves, which 'auto' trees and the n-gram's
confidence read:

      "chain": [c_1, c_2, ...],        # c_d = P(the first d drafts of a
                                       # round are accepted), non-increasing
      "chain_by_match": {"1": [...], "2": [...]},   # the same per match
                                       # length n of the round's lookup
      "match_share": {"0": s_0, "1": s_1, ...},     # share of rounds by n
                                       # (0: no match), summing to 1

Host code only (numpy, json): no model, no drafter, no jax.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from seqdec.errors import UserError
from seqdec.jsonl import write_text_atomic

# Rounding slack allowed on sum(p) <= 1 (measured rates are float sums).
SUM_TOLERANCE = 1e-6


class AcceptanceError(UserError):
  """A missing or malformed acceptance file, or bad acceptance rates."""


def check_probs(probs: Sequence[float], what: str = "probs") -> np.ndarray:
  """Validates per-rank acceptance rates; returns them as float64 `[K]`.

  Valid means: a non-empty flat sequence of real numbers (no bools), each
  finite and in [0, 1], with sum <= 1 + `SUM_TOLERANCE`. They need not be
  sorted (measured rates can be out of order by noise); the dynamic program
  handles any order.

  Raises:
    AcceptanceError: naming the first offending entry.
  """
  if isinstance(probs, (str, bytes, Mapping)) or not hasattr(probs, "__len__"):
    raise AcceptanceError(f"{what} must be a list of numbers, got "
                          f"{type(probs).__name__}")
  items = list(probs)
  if not items:
    raise AcceptanceError(f"{what} is empty; need at least p_1")
  for k, x in enumerate(items, 1):
    if isinstance(x, (bool, np.bool_)) or not isinstance(
        x, (int, float, np.integer, np.floating)):
      raise AcceptanceError(f"{what}: p_{k} = {x!r} is not a number")
    if not math.isfinite(float(x)) or not 0.0 <= float(x) <= 1.0:
      raise AcceptanceError(f"{what}: p_{k} = {x!r} is outside [0, 1]")
  p = np.asarray(items, np.float64)
  if p.sum() > 1.0 + SUM_TOLERANCE:
    raise AcceptanceError(
        f"{what} sum to {p.sum():.6g} > 1: p_k is the probability that the "
        f"k-th ranked child is *the* accepted one, so the p_k of one node's "
        f"children are exclusive events")
  return p


@dataclasses.dataclass(frozen=True)
class AcceptanceRates:
  """A validated acceptance file.

  Attributes:
    probs: `(K,)` per-rank acceptance rates p_1..p_K.
    meta: every other key of the file (drafter, target, temperature, ...).
    path: where it was read from ('' if built in memory).
  """
  probs: tuple[float, ...]
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  path: str = ""

  @property
  def chain(self) -> Optional[tuple[float, ...]]:
    """c_1, c_2, ... of a chain drafter's file, or None."""
    c = self.meta.get("chain")
    return None if c is None else tuple(float(x) for x in c)

  @property
  def chain_by_match(self) -> Optional[dict[int, tuple[float, ...]]]:
    """{n: c_n} of a chain drafter's file, or None."""
    c = self.meta.get("chain_by_match")
    return None if c is None else {int(n): tuple(float(x) for x in v)
                                   for n, v in c.items()}

  @property
  def match_share(self) -> Optional[dict[int, float]]:
    """{n: share of rounds} (n = 0: no match), or None."""
    c = self.meta.get("match_share")
    return None if c is None else {int(n): float(v) for n, v in c.items()}


def check_chain(curve: Any, what: str) -> np.ndarray:
  """Validates a chain acceptance curve c_1 >= c_2 >= ... in [0, 1]."""
  if isinstance(curve, (str, bytes, Mapping)) or not hasattr(curve, "__len__"):
    raise AcceptanceError(f"{what} must be a list of numbers")
  c = np.asarray([float(x) if isinstance(x, (int, float)) and not isinstance(
      x, bool) else np.nan for x in curve], np.float64)
  if not len(c) or not np.all((c >= 0) & (c <= 1)):
    raise AcceptanceError(f"{what} must be a non-empty list of numbers in "
                          f"[0, 1], got {list(curve)!r}")
  if np.any(np.diff(c) > SUM_TOLERANCE):
    raise AcceptanceError(f"{what} must be non-increasing (c_d is the "
                          f"probability that the first d drafts are "
                          f"accepted), got {list(curve)!r}")
  return c


def _check_chains(meta: Mapping[str, Any], where: str) -> None:
  """Validates the optional chain fields (module docstring)."""
  if "chain" in meta:
    check_chain(meta["chain"], f"{where}: 'chain'")
  for key in ("chain_by_match", "match_share"):
    if key not in meta:
      continue
    value = meta[key]
    if not isinstance(value, Mapping) or not value:
      raise AcceptanceError(f"{where}: {key!r} must be a non-empty object "
                            f"keyed by match length")
    for n, v in value.items():
      if not str(n).isdigit():
        raise AcceptanceError(f"{where}: {key!r} key {n!r} is not a match "
                              f"length")
      if key == "chain_by_match":
        check_chain(v, f"{where}: 'chain_by_match'[{n}]")
      elif isinstance(v, bool) or not isinstance(v, (int, float)) or not (
          0 <= v <= 1):
        raise AcceptanceError(f"{where}: 'match_share'[{n}] = {v!r} is not "
                              f"in [0, 1]")
    if key == "match_share" and abs(sum(value.values()) - 1) > 1e-6:
      raise AcceptanceError(f"{where}: 'match_share' sums to "
                            f"{sum(value.values()):.6g}, not 1")


def _repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))


def resolve_path(path: str) -> str:
  """`path` as given if it exists, else relative to the source tree (so
  'configs/acceptance/x.json' works from any directory).

  Raises:
    AcceptanceError: neither exists.
  """
  if not isinstance(path, str) or not path:
    raise AcceptanceError(f"acceptance file path must be a non-empty string, "
                          f"got {path!r}")
  if os.path.isfile(path):
    return path
  alt = os.path.join(_repo_root(), path)
  if not os.path.isabs(path) and os.path.isfile(alt):
    return alt
  tried = path if os.path.isabs(path) else f"{path} (nor {alt})"
  raise AcceptanceError(f"acceptance file {tried} does not exist; measure "
                        f"one with launch/measure_acceptance.py")


def parse_acceptance(obj: Any, where: str = "acceptance") -> AcceptanceRates:
  """Validates a decoded acceptance JSON object (module docstring)."""
  if not isinstance(obj, dict):
    raise AcceptanceError(f"{where}: expected a JSON object with a 'probs' "
                          f"list, got {type(obj).__name__}")
  if "probs" not in obj:
    raise AcceptanceError(f"{where}: missing 'probs' (the per-rank acceptance "
                          f"rates p_1, p_2, ...)")
  p = check_probs(obj["probs"], f"{where}: 'probs'")
  meta = {k: v for k, v in obj.items() if k != "probs"}
  t = meta.get("temperature")
  if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))
                        or not math.isfinite(t) or t < 0):
    raise AcceptanceError(f"{where}: 'temperature' must be a number >= 0, "
                          f"got {t!r}")
  n = meta.get("trials")
  if n is not None and (isinstance(n, bool) or not isinstance(n, int)
                        or n < 1):
    raise AcceptanceError(f"{where}: 'trials' must be an integer >= 1, got "
                          f"{n!r}")
  _check_chains(meta, where)
  return AcceptanceRates(tuple(float(x) for x in p), meta)


def load_acceptance(path: str) -> AcceptanceRates:
  """Reads and validates an acceptance file (format: module docstring).

  Raises:
    AcceptanceError: a missing file, invalid JSON, or bad contents; the
      message names the file.
  """
  full = resolve_path(path)
  try:
    with open(full, encoding="utf-8") as f:
      obj = json.load(f)
  except json.JSONDecodeError as e:
    raise AcceptanceError(f"{path}: not valid JSON ({e.msg} at line "
                          f"{e.lineno} column {e.colno})") from None
  except (OSError, UnicodeDecodeError) as e:
    raise AcceptanceError(f"{path}: cannot be read ({e})") from None
  return dataclasses.replace(parse_acceptance(obj, path), path=full)


def write_acceptance(path: str, probs: Sequence[float], **meta: Any) -> None:
  """Validates and writes an acceptance file atomically (creates the
  directory); `meta` holds drafter, target, temperature, rule, trials,
  command and any extra keys."""
  acc = parse_acceptance({"probs": [float(x) for x in probs], **meta}, path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write_text_atomic(path, json.dumps({"probs": list(acc.probs), **meta},
                                     indent=2, allow_nan=False) + "\n")
