"""Which layers should a layer-skip (self-speculative) drafter keep?

The layer-skip drafter runs a subset S of the target's L blocks against the
target's own K/V (`seqdec.decoding.drafters.model.layer_skip`). Its top-1
agreement with the target, a(S), falls as blocks are dropped, while its cost
per drafted level falls with |S| / L. Draft & Verify (Zhang et al., 2023)
searches S by Bayesian optimisation; `greedy_search` walks one path of
nested subsets instead, dropping at every step the block whose removal keeps
a(S) highest (teacher-forced, `rank_statistics.drafter_top` with R = 1), and
`best_chain` picks the point of that path and the chain length g that
maximise a cost model's predicted speedup:

    tau(g, a)   = sum_{i=0}^{g} a^i          (expected tokens per round of a
                                              chain of g drafts, i.i.d. depths)
    cost(g, S)  = verify_cost + g * |S| / L  (in target decoding steps)
    speedup     = tau(g, a(S)) / cost(g, S)

`verify_cost` is what verifying g + 1 tokens costs in decoding steps: 1 on
an accelerator (the papers' assumption); measure it on a CPU host (the
bench's phase split). The path costs sum_{k} k evaluations of the drafter
(one compile each, since S is static); the target pass runs once.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np
from flax import nnx

from seqdec.decoding import rank_statistics


@dataclasses.dataclass(frozen=True)
class SearchStep:
  """One point of the greedy path: the kept blocks and their agreement."""
  keep: tuple[int, ...]
  agreement: float        # a(S): fraction of roots where top-1 == target's


def chain_tau(agreement: float, drafts: int) -> float:
  """sum_{i=0}^{g} a^i: expected tokens per round of a chain of g drafts."""
  return float(sum(agreement ** i for i in range(drafts + 1)))


def agreement_fn(target, tokens: np.ndarray, first_root: np.ndarray,
                 num_roots: int, valid: np.ndarray
                 ) -> Callable[[Sequence[int]], float]:
  """`keep -> a(keep)` over fixed teacher-forced data (target run once).

  Args:
    target: the target `Transformer`.
    tokens: `[B, T]` int32 prompt + target continuation, right-padded.
    first_root: `[B]` int32 first root (prompt length - 1).
    num_roots: roots per row.
    valid: `[B, num_roots]` bool, which roots count (real continuation).
  """
  tdef, tparams = nnx.split(target)
  tokens = np.asarray(tokens, np.int32)
  first_root = np.asarray(first_root, np.int32)
  cache, t_logits = rank_statistics.target_pass(
      tdef, tparams, tokens, first_root, shared=True, num_roots=num_roots)
  argmax = np.asarray(t_logits.argmax(-1))                # [B, Nr]
  del t_logits
  valid = np.asarray(valid, bool)

  def agreement(keep: Sequence[int]) -> float:
    top = rank_statistics.drafter_top(
        tdef, tparams, None, None, tokens, cache, first_root,
        layers=tuple(sorted(keep)), shared=True, num_roots=num_roots,
        max_rank=1)
    hit = np.asarray(top)[..., 0] == argmax
    return float(hit[valid].mean())

  return agreement


def greedy_search(agreement: Callable[[Sequence[int]], float],
                  num_layers: int, min_keep: int = 1,
                  log: Optional[Callable[[str], None]] = None
                  ) -> list[SearchStep]:
  """Nested subsets from all `num_layers` blocks down to `min_keep`.

  Step k drops, from the current subset, the block whose removal leaves the
  highest agreement (ties: the lower index). Returns the path, starting with
  the full model (agreement 1 up to ties in the target's own argmax).
  """
  if not 1 <= min_keep <= num_layers:
    raise ValueError(f"min_keep must be in [1, {num_layers}], got {min_keep}")
  keep = tuple(range(num_layers))
  path = [SearchStep(keep, agreement(keep))]
  while len(keep) > min_keep:
    scored = [(agreement(tuple(x for x in keep if x != drop)), -drop)
              for drop in keep]
    best, neg = max(scored)
    keep = tuple(x for x in keep if x != -neg)
    path.append(SearchStep(keep, best))
    if log:
      log(f"  keep {len(keep):2d}: drop {-neg:2d} -> agreement {best:.3f}")
  return path


def best_chain(path: Sequence[SearchStep], num_layers: int,
               verify_cost: float = 1.0, max_drafts: int = 8
               ) -> tuple[SearchStep, int, float]:
  """`(step, g, predicted speedup)` maximising the module's cost model."""
  if verify_cost <= 0:
    raise ValueError(f"verify_cost must be > 0, got {verify_cost}")
  best = None
  for step in path:
    if len(step.keep) == num_layers:
      continue                      # the target itself: no speedup possible
    for g in range(1, max_drafts + 1):
      speed = chain_tau(step.agreement, g) / (
          verify_cost + g * len(step.keep) / num_layers)
      if best is None or speed > best[2]:
        best = (step, g, speed)
  if best is None:
    raise ValueError("the path holds no proper subset of the layers")
  return best


def as_spec(keep: Sequence[int]) -> str:
  """The `keep:a-b+c-d` layer spec (`parse_layers`) of a subset."""
  runs, keep = [], sorted(keep)
  for x in keep:
    if runs and x == runs[-1][1] + 1:
      runs[-1][1] = x
    else:
      runs.append([x, x])
  return "keep:" + "+".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)
