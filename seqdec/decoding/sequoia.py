"""Sequoia-optimal token trees from per-rank (positional) acceptance rates.

The positional acceptance model (Sequoia, Chen et al. 2024): a drafter
proposes the children of every tree node as its ranked candidates there
(rank 1 = its top token, rank 2 = the runner-up, ...), and

    p_k = P(the accepted token at a reached node is its rank-k child),

the same at every node, independently of depth and of the path that led
there. The p_k are *marginal* ("the k-th child is the one"), so they add up:
sum_k p_k = P(some child is accepted) <= 1. Under greedy verification p_k is
the probability that the target's argmax is the drafter's k-th token; under
the lossless rule for deterministic children at temperature T (accept the
child equal to a sample y ~ p_target) it is E[p_target(x_k)], x_k the
drafter's k-th token.

A draft node v is accepted iff every node on its path is, so with the root
always "accepted" (it is the last committed token) the expected number of
tokens a round emits, accepted drafts plus the bonus token, is

    tau(tree) = 1 + sum_{draft nodes v} prod_{u on root -> v, u != root}
                                          p_{rank(u)}.                  (1)

`optimal_tree` maximises (1) over all trees of at most n draft nodes (and
optionally depth <= D) by dynamic programming (the recursion is in its
docstring); `expected_accepted` evaluates (1) for any `TreeShape`.

Acceptance files (written by `launch/measure_acceptance.py`, read by the
tree spec 'sequoia<n>[d<D>]:<path.json>' of `trees.parse`) are JSON objects:

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
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqdec.errors import UserError
from seqdec.decoding import trees
from seqdec.decoding.drafters.model import ModelDrafter
from seqdec.jsonl import write_text_atomic
from seqdec.models.transformer import init_cache

# Rounding slack allowed on sum(p) <= 1 (measured rates are float sums).
SUM_TOLERANCE = 1e-6
# Relative slack under which a smaller tree counts as equally good.
_TIE = 1e-12


class AcceptanceError(UserError):
  """A missing or malformed acceptance file, or bad acceptance rates."""


# ----------------------------------------------------------------- validation


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


def _check_budget(budget: int) -> int:
  if isinstance(budget, (bool, np.bool_)) or not isinstance(
      budget, (int, np.integer)):
    raise ValueError(f"node budget must be an integer, got {budget!r}")
  if budget < 0:
    raise ValueError(f"node budget must be >= 0 (draft nodes, the root "
                     f"excluded), got {budget}")
  return int(budget)


def _check_depth(max_depth: Optional[int]) -> Optional[int]:
  if max_depth is None:
    return None
  if isinstance(max_depth, (bool, np.bool_)) or not isinstance(
      max_depth, (int, np.integer)):
    raise ValueError(f"max_depth must be an integer or None, got "
                     f"{max_depth!r}")
  if max_depth < 1:
    raise ValueError(f"max_depth must be >= 1 (or None for no limit), got "
                     f"{max_depth}")
  return int(max_depth)


# ------------------------------------------------------------------ the model


def expected_accepted(shape: trees.TreeShape, probs: Sequence[float]) -> float:
  """Expected tokens per round, eq. (1) of the module docstring.

      tau = 1 + sum_{v >= 1} w(v),   w(root) = 1,
      w(v) = w(parent(v)) * p_{rank(v) + 1}

  (`TreeShape.ranks` are 0-based; a rank >= K = len(probs) has p = 0).
  Chain of gamma nodes with p_1 = a: tau = (1 - a^(gamma+1)) / (1 - a).

  Args:
    shape: any `TreeShape` (parents precede children, so one pass in index
      order computes every w).
    probs: `[K]` per-rank acceptance rates (`check_probs`).

  Returns:
    tau >= 1.
  """
  if not isinstance(shape, trees.TreeShape):
    raise TypeError(f"expected a trees.TreeShape, got {type(shape).__name__}")
  p = check_probs(probs)
  w = np.zeros(shape.num_nodes)
  w[0] = 1.0
  for i in range(1, shape.num_nodes):
    r = shape.ranks[i]
    w[i] = w[shape.parents[i]] * (p[r] if r < len(p) else 0.0)
  return float(w.sum())


@dataclasses.dataclass(frozen=True)
class _Tables:
  """DP tables: `value[d][m]` best subtree value with m nodes (root
  included) and depth <= d; `choice[d][k][m]` the nodes given to the rank-k
  child (0: none) when m descendants go to ranks k..K (k 0-based here)."""
  value: np.ndarray     # [D + 1, M + 1] float64, -inf where infeasible
  choice: np.ndarray    # [D + 1, K, M] int32


@functools.lru_cache(maxsize=64)
def _solve(probs: tuple[float, ...], max_nodes: int, depth: int) -> _Tables:
  """Fills the tables of `optimal_tree` for subtrees of <= max_nodes nodes
  and depth <= depth (all arguments hashable, so repeated specs are free)."""
  p = np.asarray(probs, np.float64)
  k_max, m_len = len(p), max_nodes + 1
  value = np.full((depth + 1, m_len + 1), -np.inf)
  value[:, 1] = 1.0                 # a lone node: itself
  choice = np.zeros((depth + 1, k_max, m_len), np.int32)
  # Max-plus convolution indices: c[m, j] = a[j] + b[m - j], 0 <= j <= m.
  m_idx = np.arange(m_len)[:, None]
  j_idx = np.arange(m_len)[None, :]
  lower = (m_idx - j_idx) >= 0
  b_idx = np.where(lower, m_idx - j_idx, 0)
  for d in range(1, depth + 1):
    child = value[d - 1, :m_len]                     # V(j, d - 1), j < M
    w = np.full(m_len, -np.inf)                      # W(., K + 1, d)
    w[0] = 0.0
    for k in range(k_max - 1, -1, -1):
      a = np.full(m_len, -np.inf)                    # p_k V(j, d - 1)
      a[np.isfinite(child)] = p[k] * child[np.isfinite(child)]
      c = np.where(lower, a[None, :] + w[b_idx], -np.inf)   # [M, M]
      c[:, 0] = w                                    # j = 0: skip rank k
      choice[d, k] = np.argmax(c, axis=1)
      w = c[np.arange(m_len), choice[d, k]]
    value[d, 1:] = 1.0 + w                           # V(m, d) = 1 + W(m-1, 1, d)
  return _Tables(value, choice)


def optimal_tree(probs: Sequence[float], budget: int,
                 max_depth: Optional[int] = None
                 ) -> tuple[trees.TreeShape, float]:
  """The tree of at most `budget` draft nodes maximising tau, eq. (1).

  Dynamic program. Let V(m, d) be the best value sum_{v in subtree}
  prod_{u on the path below the subtree's root} p_{rank(u)} (the root
  counting 1) of a subtree of exactly m nodes (root included) and depth
  <= d, and W(m, k, d) the best total over the children of ranks k..K of a
  node whose m descendants (depth <= d below it) are split among them:

      V(1, d) = 1;   V(m, 0) = -inf for m > 1
      V(m, d) = 1 + W(m - 1, 1, d)                                 (d >= 1)
      W(0, k, d) = 0;   W(m, K + 1, d) = -inf for m > 0
      W(m, k, d) = max( W(m, k + 1, d),                       rank k unused
                        max_{1 <= j <= m} p_k V(j, d - 1) + W(m - j, k + 1, d) )

  A child subtree's value enters weighted by its own p_k because every path
  through it starts with that child (eq. (1) factorises over subtrees). The
  answer is tau* = max_{m <= n + 1} V(m, min(D, n)), taking the smallest such
  m (a node can only add p >= 0, so fewer nodes than n means the rest would
  add nothing: every rank of every reachable node is used, or p has zeros).
  Ranks may be skipped, so unsorted p is handled exactly; with
  p_1 >= p_2 >= ... the best tree uses ranks 1..c under each node and gives
  larger subtrees to better ranks.

  Cost: O(D K n^2) with numpy max-plus convolutions, D = min(max_depth, n)
  (n = 64, K = 16: a few tens of ms); tables are cached per (p, n, D).

  Args:
    probs: `[K]` per-rank acceptance rates (`check_probs`); K caps the
      number of children of any node.
    budget: n >= 0, draft nodes (the root excluded).
    max_depth: D >= 1, deepest draft node's depth, or None (no limit).

  Returns:
    `(shape, tau)`: the tree (`trees.from_paths`, nodes numbered level by
    level, ranks 0-based) and its expected accepted length.
  """
  p = check_probs(probs)
  n = _check_budget(budget)
  limit = _check_depth(max_depth)
  depth = n if limit is None else min(limit, n)
  tables = _solve(tuple(float(x) for x in p), n + 1, depth)
  values = tables.value[depth, 1:n + 2]            # V(m, depth), m = 1..n+1
  best = float(values.max())
  m = int(np.argmax(values >= best - _TIE * best)) + 1
  paths: list[tuple[int, ...]] = []

  def build(path: tuple[int, ...], size: int, d: int) -> None:
    rest, k = size - 1, 0
    while rest > 0:
      j = int(tables.choice[d, k, rest])
      if j:
        child = path + (k,)
        paths.append(child)
        build(child, j, d - 1)
        rest -= j
      k += 1

  build((), m, depth)
  shape = trees.from_paths(paths) if paths else trees.chain(0)
  return shape, float(tables.value[depth, m])


def optimal_taus(probs: Sequence[float], max_budget: int,
                 max_depth: Optional[int] = None) -> np.ndarray:
  """`[max_budget + 1]` optimal tau for every budget 0..max_budget.

  tau*(n) = max_{m <= n + 1} V(m, D) of `optimal_tree`'s recursion, from one
  set of tables (the curve of tau against node budget).
  """
  p = check_probs(probs)
  n = _check_budget(max_budget)
  limit = _check_depth(max_depth)
  depth = n if limit is None else min(limit, n)
  tables = _solve(tuple(float(x) for x in p), n + 1, depth)
  return np.maximum.accumulate(tables.value[depth, 1:n + 2])


# ---------------------------------------------------------- acceptance files


@dataclasses.dataclass(frozen=True)
class Acceptance:
  """A validated acceptance file.

  Attributes:
    probs: `(K,)` per-rank acceptance rates p_1..p_K.
    meta: every other key of the file (drafter, target, temperature, ...).
    path: where it was read from ('' if built in memory).
  """
  probs: tuple[float, ...]
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  path: str = ""


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


def parse_acceptance(obj: Any, where: str = "acceptance") -> Acceptance:
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
  return Acceptance(tuple(float(x) for x in p), meta)


def load_acceptance(path: str) -> Acceptance:
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


_SPEC = re.compile(r"^(\d+)(?:d(\d+))?:(.+)$", re.DOTALL)


def from_spec(arg: str) -> trees.TreeShape:
  """The tree of a 'sequoia' spec's argument: '<n>:<path>' or
  '<n>d<D>:<path>' (n draft nodes, depth <= D, rates from the acceptance
  file at path); see `optimal_tree` and `load_acceptance`."""
  match = _SPEC.match(arg)
  if not match:
    raise trees.TreeError(
        f"bad sequoia spec {'sequoia' + arg!r}; expected sequoia<n>:<file.json>"
        f" or sequoia<n>d<depth>:<file.json>, e.g. "
        f"sequoia16:configs/acceptance/smollm2_layerskip_t0.json")
  n, d, path = match.groups()
  acc = load_acceptance(path)
  shape, _ = optimal_tree(acc.probs, int(n), None if d is None else int(d))
  return shape


# --------------------------------------------------------------- measurement


def window_mask(num_tokens: int) -> np.ndarray:
  """`[T, 2T]` scratch-window mask of the layer-skip teacher-forced pass.

  Window slots 0..T-1 hold the *full* model's K/V of the T tokens (an earlier
  call's scratch), slots T..2T-1 the layer-skip pass's own. Token i sees the
  full model's K/V of tokens j < i and its own: exactly what the layer-skip
  drafter sees when token i is the root (committed K/V come from the
  target's verification; the root is fed through the kept layers).
  """
  t = num_tokens
  m = np.zeros((t, 2 * t), bool)
  m[:, :t] = np.tril(np.ones((t, t), bool), -1)
  m[np.arange(t), t + np.arange(t)] = True
  return m


@functools.partial(jax.jit,
                   static_argnames=("tdef", "ddef", "layers", "shared",
                                    "num_roots", "max_rank"))
def _rank_stats(tdef, tparams, ddef, dparams, tokens, first_root, temperature,
                *, layers, shared, num_roots, max_rank):
  target = nnx.merge(tdef, tparams)
  b, t = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  roots = jnp.clip(first_root[:, None] + jnp.arange(num_roots), 0, t - 1)

  def at_roots(hidden):                                  # [B, T, D] -> [B, R, D]
    return jnp.take_along_axis(hidden, roots[..., None], axis=1)

  cache = init_cache(target.config, b, 2 * t if shared else t)
  hidden, cache = target.backbone(tokens, pos, cache)
  t_logits = target.logits(at_roots(hidden))            # [B, R, V]
  if shared:
    mask = jnp.broadcast_to(jnp.asarray(window_mask(t)), (b, t, 2 * t))
    d_hidden, _ = target.backbone(tokens, pos, cache, mask, layers=layers)
    d_logits = target.logits(at_roots(d_hidden))
  else:
    draft = nnx.merge(ddef, dparams)
    d_cache = init_cache(draft.config, b, t)
    d_hidden, _ = draft.backbone(tokens, pos, d_cache, layers=layers)
    d_logits = draft.logits(at_roots(d_hidden))
  top = jax.lax.top_k(d_logits, max_rank)[1]             # [B, R, K]
  argmax = jnp.argmax(t_logits, -1)                      # [B, R]
  hit = (top == argmax[..., None]).astype(jnp.float32)
  probs = jax.nn.softmax(t_logits / jnp.maximum(temperature, 1e-6), -1)
  sampled = jnp.take_along_axis(probs, top, axis=-1)
  return jnp.where(temperature > 0, sampled, hit), argmax


def rank_statistics(target, drafter, tokens: np.ndarray,
                    first_root: np.ndarray, num_roots: int,
                    temperature: float, max_rank: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Teacher-forced per-rank acceptance of a model drafter, per position.

  For each row b and root position t = first_root[b] + i (i < num_roots),
  with x_k the drafter's k-th most likely token after tokens[b, :t+1] (the
  drafter's view when tokens[b, t] is the root of a round) and p the target's
  distribution there:

      T = 0:  s[b, i, k] = 1[x_k = argmax p]      (greedy verification)
      T > 0:  s[b, i, k] = p_T(x_k),  p_T = softmax(logits / T)
              (deterministic children, lossless rule: accept the child equal
              to y ~ p_T, so rank k is the accepted one with prob. p_T(x_k))

  and the acceptance rates are p_k = mean over (b, i) of s[b, i, k]. The
  layer-skip drafter (`drafter.shared_cache`) attends to the full target's
  K/V of the context, as in decoding (`window_mask`); an independent draft
  LM runs causally over the same tokens with its own cache.

  Args:
    target: the target `Transformer`.
    drafter: a `ModelDrafter` of this target (`layer_skip` or `draft_lm`),
      proposing its top-K deterministically (the 'topk' proposal).
    tokens: `[B, T]` int32 prompt + continuation, right-padded.
    first_root: `[B]` int32 first root position (prompt length - 1).
    num_roots: R, roots per row (positions past T - 1 are clipped: the
      caller keeps only valid ones).
    temperature: T >= 0.
    max_rank: K, ranks measured (the drafter's top-K).

  Returns:
    `(s [B, R, K] float32, target argmax [B, R] int32)`.
  """
  if not isinstance(drafter, ModelDrafter):
    raise ValueError(f"teacher-forced rank statistics need a model drafter "
                     f"(layerskip or draft), got {drafter!r}")
  if not 1 <= max_rank <= target.config.vocab_size:
    raise ValueError(f"max_rank must be in [1, {target.config.vocab_size}], "
                     f"got {max_rank}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature > 0 and getattr(drafter, "proposal", "topk") != "topk":
    raise ValueError(f"rank statistics describe deterministic top-K children;"
                     f" drafter {drafter!r} samples its children "
                     f"({drafter.proposal!r}) at temperature > 0")
  if drafter.shared_cache and drafter.config != target.config:
    raise ValueError("a layer-skip drafter must be built from this target")
  tdef, tparams = nnx.split(target)
  ddef, dparams = ((None, None) if drafter.shared_cache
                   else (drafter.graphdef, drafter.params))
  s, argmax = _rank_stats(
      tdef, tparams, ddef, dparams,
      np.asarray(tokens, np.int32), np.asarray(first_root, np.int32),
      np.float32(temperature), layers=drafter.layers,
      shared=drafter.shared_cache, num_roots=int(num_roots),
      max_rank=int(max_rank))
  return np.asarray(s), np.asarray(argmax)
