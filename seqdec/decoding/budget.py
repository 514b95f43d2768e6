"""Verify budgets: each round verifies only as many tree nodes as pay for
themselves on this hardware (the budget-aware tree of EAGLE-2's dynamic
drafting, sized by measured verify costs as Sequoia sizes its trees).

A `WidthBudget` is a ladder of verify widths w_1 < ... < w_J = N (tokens per
row of the target forward, the root included), each compiled once, with the
measured cost of each in decoding steps,

    c(w) = verify_ms(w) / verify_ms(1) - 1          (c(1) = 0)

(`host_profile.HostProfile.break_even`). The tree's node order is its
priority order: every prefix of the slots is ancestor-closed (parents come
before children), and a dynamic tree numbers its kept nodes best first
(`drafters.dynamic.grow_dynamic_tree`), so verifying the first w slots keeps
the w - 1 drafts the drafter trusts most. With p_i = exp(path log q_i) the
drafter's confidence that node i is accepted (`Tree.expected_accepted`;
1 for a drafter without probabilities) and

    S_b(w) = sum_{1 <= i < w, valid[b, i]} p_{b, i}

the expected drafts row b accepts when the round verifies w slots, a round
emits sum_b (1 + S_b(w)) tokens in t_round(w) ms, where plain decoding
emits one token per live row every verify_ms(1). Charging the round's time
at that rate, speculating at width w gains

    G(w) = sum_{b live} S_b(w) - B_live * c(w)

tokens over plain decoding (the drafting time is the same whatever w is,
so it drops out), and the round verifies the width of the largest gain,
the smallest on ties:

    w* = argmax_j G(w_j);    valid[b, i] &= i < w*

A node thus stays in when its marginal expected accepted length exceeds
its marginal verify cost; with the ladder (1, N) this is the round gate at
the break-even c(N) (`Tree.gated`) for one row. Rows whose children are
drawn at random (i.i.d. or without replacement) keep every node: pruning
them by the drawn tokens' confidence would select draws and bias the
output law (`Tree.gated`), so a batch holding such a row verifies w_J = N.
With deterministic children the tree, and so the width, is a function of
the committed prefix, and every rule stays lossless.

The pruning saves verify compute, not drafting: under static shapes the
drafter grows the whole budget every round. The loop compiles one forward
per width and runs each round at the smallest ladder width holding every
live row's valid nodes (`SpecLoop.verify_widths`, `SpecLoop.decode`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import jax
import jax.numpy as jnp

from seqdec.decoding.trees import DETERMINISTIC, Tree
from seqdec.errors import ConfigError, TreeError

_ITEM = re.compile(r"^(\d+):([0-9.eE+-]+)$")


@dataclasses.dataclass(frozen=True)
class WidthBudget:
  """A ladder of verify widths and their costs (module docstring).

  Attributes:
    widths: ascending verify widths w_j >= 1 (tokens per row, root
      included); the last one is the tree's N once `fitted`.
    costs: c(w_j) >= 0 in decoding steps, one per width.
  """
  widths: tuple[int, ...]
  costs: tuple[float, ...]

  def __post_init__(self):
    w, c = tuple(map(int, self.widths)), tuple(map(float, self.costs))
    if not w or len(w) != len(c):
      raise ConfigError(f"a verify budget needs one cost per width, got "
                        f"widths {w} and costs {c}")
    if w[0] < 1 or any(a >= b for a, b in zip(w, w[1:])):
      raise ConfigError(f"verify budget widths must be ascending and >= 1, "
                        f"got {w}")
    if not all(math.isfinite(x) and x >= 0 for x in c):
      raise ConfigError(f"verify budget costs must be finite and >= 0 "
                        f"(decoding steps), got {c}")
    object.__setattr__(self, "widths", w)
    object.__setattr__(self, "costs", c)

  @classmethod
  def parse(cls, text: str) -> "WidthBudget":
    """From '<w>:<c>+<w>:<c>...', e.g. '1:0+5:0.4+16:1.1' (`__str__`)."""
    items = [s.strip() for s in str(text).split("+")]
    pairs = [_ITEM.match(s) for s in items]
    if not items or not all(pairs):
      raise ConfigError(
          f"bad verify budget {text!r}: expected 'auto' or "
          f"<width>:<cost>+<width>:<cost>..., e.g. 1:0+5:0.4+16:1.1 (cost "
          f"in decoding steps: verify(w) / verify(1) - 1)")
    try:
      costs = tuple(float(m.group(2)) for m in pairs)
    except ValueError:
      raise ConfigError(f"bad verify budget {text!r}: a cost is not a "
                        f"number") from None
    return cls(tuple(int(m.group(1)) for m in pairs), costs)

  def __str__(self) -> str:
    return "+".join(f"{w}:{c:.4g}" for w, c in zip(self.widths, self.costs))

  @classmethod
  def from_costs(cls, num_nodes: int, cost, sizes=(1, 2, 4, 8, 16, 32, 64)
                 ) -> "WidthBudget":
    """The ladder `sizes` below N, then N, priced by `cost(w)` (steps)."""
    widths = sorted({s for s in sizes if 1 <= s < num_nodes} | {num_nodes})
    return cls(tuple(widths), tuple(max(float(cost(w)), 0.0)
                                    for w in widths))

  def fitted(self, num_nodes: int) -> "WidthBudget":
    """This ladder for a tree of N = `num_nodes` nodes: its last width must
    be N (a narrower top would never verify the tree's last nodes; a wider
    one has nothing to verify)."""
    if self.widths[-1] != num_nodes:
      raise TreeError(f"the verify budget {self} must end at the tree's "
                      f"{num_nodes} nodes (its widths are {self.widths})")
    return self

  # -- on device -------------------------------------------------------------

  def gains(self, tree: Tree, live: jax.Array) -> jax.Array:
    """`[J]` G(w_j) (module docstring) of a tree `[B, N]` and live rows
    `[B]`."""
    b, n = tree.valid.shape
    drafts = tree.valid & (jnp.arange(n) > 0)[None]
    p = (drafts.astype(jnp.float32) if tree.path_logq is None
         else jnp.where(drafts, jnp.exp(tree.path_logq), 0.0))
    s = jnp.cumsum(jnp.where(live[:, None], p, 0.0), axis=1).sum(0)  # [N]
    w = jnp.asarray(self.widths, jnp.int32)
    costs = jnp.asarray(self.costs, jnp.float32)
    n_live = jnp.sum(live, dtype=jnp.float32)
    return s[w - 1] - n_live * costs

  def apply(self, tree: Tree, live: jax.Array) -> tuple[Tree, jax.Array]:
    """`(tree, j)`: nodes at slots >= w_{j*} made invalid, j* the width of
    the largest gain (the last when a live row has drawn children)."""
    n = tree.valid.shape[1]
    j = jnp.argmax(self.gains(tree, live)).astype(jnp.int32)
    drawn = jnp.any(live[:, None] & tree.valid & (tree.scheme != DETERMINISTIC))
    j = jnp.where(drawn, len(self.widths) - 1, j)
    width = jnp.asarray(self.widths, jnp.int32)[j]
    keep = (jnp.arange(n) < width)[None]
    return tree.replace(valid=tree.valid & keep), j


def width_index(widths: tuple[int, ...], tree: Tree,
                live: jax.Array) -> jax.Array:
  """`[]` int32: the index of the smallest of `widths` (ascending, the last
  the tree's N) holding every live row's valid nodes,

      j = min { j : w_j >= 1 + max_{b live, valid[b, i]} i }.
  """
  n = tree.valid.shape[1]
  slot = jnp.where(tree.valid & live[:, None], jnp.arange(1, n + 1)[None], 1)
  needed = jnp.max(slot)
  return jnp.searchsorted(jnp.asarray(widths, jnp.int32), needed,
                          side="left").astype(jnp.int32)


def parse_budget(text: str) -> Optional[WidthBudget]:
  """'' -> None (verify the whole tree), '<w>:<c>+...' -> its ladder;
  'auto' must have been resolved against the host profile first
  (`seqdec.app.auto_budget`)."""
  text = str(text or "").strip()
  if not text:
    return None
  if text == "auto":
    raise ConfigError("budget=auto is resolved from this host's profile by "
                      "seqdec.app (make_generator / auto_budget); the Python "
                      "API takes an explicit ladder '<w>:<c>+...'")
  return WidthBudget.parse(text)

