"""Verify budgets: each round verifies only as many tree nodes as pay for
themselves on this hardware (the budget-aware tree of EAGLE-2's dynamic
drafting, sized by measured verify costs as Sequoia sizes its trees).

A `WidthBudget` is a ladder of verify widths w_1 < ... < w_J = N (tokens per
row of the target forward, the root included), each compiled once, with the
measured cost of each in decoding steps,

    c(w) = verify_ms(w) / verify_ms(1) - 1          (c(1) = 0)

(`host_profile.HostProfile.break_even`). A verify's cost grows with the
cache it attends to, so a ladder may be priced at several cache lengths
S_1 < ... < S_L ('<S>=<w>:<c>+...;<S>=...'): a row whose committed length is
s pays c_b(w), the costs interpolated linearly in s between the two nearest
S_l (clamped outside), and B_live * c(w) below reads sum_{b live} c_b(w).
The tree's node order is its
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

The pruning saves verify compute, not drafting; a dynamic tree's growing
stops on its own rule (`DynamicTree.stop`, `drafters.dynamic`). The loop compiles one forward
per width and runs each round at the smallest ladder width holding every
live row's valid nodes (`SpecLoop.verify_widths`, `SpecLoop.decode`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Optional

import jax
import jax.numpy as jnp

from seqdec.decoding.trees import DETERMINISTIC, Tree
from seqdec.errors import ConfigError, TreeError

_ITEM = re.compile(r"^(\d+):([0-9.eE+-]+)$")
_PRICED_AT = re.compile(r"^(\d+)=(.*)$")


@dataclasses.dataclass(frozen=True)
class WidthBudget:
  """A ladder of verify widths and their costs (module docstring).

  Attributes:
    widths: ascending verify widths w_j >= 1 (tokens per row, root
      included); the last one is the tree's N once `fitted`.
    costs: c(w_j) >= 0 in decoding steps, one per width; with `lengths`,
      one such tuple per cache length.
    lengths: () (one ladder for every cache length), or the ascending
      cache lengths S_l the rows of `costs` were measured at.
  """
  widths: tuple[int, ...]
  costs: tuple
  lengths: tuple[int, ...] = ()

  def __post_init__(self):
    w, s = tuple(map(int, self.widths)), tuple(map(int, self.lengths))
    rows = [self.costs] if not s else list(self.costs)
    c = tuple(tuple(map(float, r)) for r in rows)
    if not w or not c or any(len(r) != len(w) for r in c) or (
        s and len(c) != len(s)):
      raise ConfigError(f"a verify budget needs one cost per width (per "
                        f"cache length), got widths {w}, lengths {s} and "
                        f"costs {self.costs}")
    if w[0] < 1 or any(a >= b for a, b in zip(w, w[1:])):
      raise ConfigError(f"verify budget widths must be ascending and >= 1, "
                        f"got {w}")
    if s and (s[0] < 0 or any(a >= b for a, b in zip(s, s[1:]))):
      raise ConfigError(f"verify budget cache lengths must be ascending and "
                        f">= 0, got {s}")
    if not all(math.isfinite(x) and x >= 0 for r in c for x in r):
      raise ConfigError(f"verify budget costs must be finite and >= 0 "
                        f"(decoding steps), got {self.costs}")
    object.__setattr__(self, "widths", w)
    object.__setattr__(self, "costs", c if s else c[0])
    object.__setattr__(self, "lengths", s)

  @property
  def cost_table(self) -> tuple[tuple[float, ...], ...]:
    """`[L, J]` costs, one row per cache length (L = 1 without lengths)."""
    return self.costs if self.lengths else (self.costs,)

  @classmethod
  def parse(cls, text: str) -> "WidthBudget":
    """From '<w>:<c>+<w>:<c>...', e.g. '1:0+5:0.4+16:1.1', or priced per
    cache length, '128=1:0+16:0.13;512=1:0+16:0.32' (`__str__`)."""
    parts = [p.strip() for p in str(text).split(";")]
    priced = [_PRICED_AT.match(p) for p in parts]
    if len(parts) > 1 or priced[0]:
      if not all(priced):
        raise ConfigError(
            f"bad verify budget {text!r}: priced per cache length, every "
            f"part is <length>=<width>:<cost>+..., e.g. "
            f"128=1:0+16:0.13;512=1:0+16:0.32")
      ladders = [cls.parse(m.group(2)) for m in priced]
      if any(lad.widths != ladders[0].widths for lad in ladders):
        raise ConfigError(f"bad verify budget {text!r}: every cache length "
                          f"must price the same widths")
      return cls(ladders[0].widths, tuple(lad.costs for lad in ladders),
                 tuple(int(m.group(1)) for m in priced))
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
    ladder = lambda c: "+".join(f"{w}:{x:.4g}"   # noqa: E731
                                for w, x in zip(self.widths, c))
    if not self.lengths:
      return ladder(self.costs)
    return ";".join(f"{s}={ladder(c)}"
                    for s, c in zip(self.lengths, self.costs))

  @classmethod
  def from_costs(cls, num_nodes: int, cost, sizes=(1, 2, 4, 8, 16, 32, 64),
                 lengths: tuple[int, ...] = ()) -> "WidthBudget":
    """The ladder `sizes` below N, then N, priced by `cost(w)` (steps), or
    by `cost(w, S)` at each of `lengths`."""
    widths = sorted({s for s in sizes if 1 <= s < num_nodes} | {num_nodes})
    if not lengths:
      return cls(tuple(widths), tuple(max(float(cost(w)), 0.0)
                                      for w in widths))
    return cls(tuple(widths), tuple(
        tuple(max(float(cost(w, s)), 0.0) for w in widths)
        for s in lengths), tuple(lengths))

  def fitted(self, num_nodes: int) -> "WidthBudget":
    """This ladder for a tree of N = `num_nodes` nodes: its last width must
    be N (a narrower top would never verify the tree's last nodes; a wider
    one has nothing to verify)."""
    if self.widths[-1] != num_nodes:
      raise TreeError(f"the verify budget {self} must end at the tree's "
                      f"{num_nodes} nodes (its widths are {self.widths})")
    return self

  # -- on device -------------------------------------------------------------

  def row_costs(self, length: Optional[jax.Array], batch: int
                ) -> jax.Array:
    """`[B, J]` c_b(w_j): each row's ladder at its committed `length` `[B]`
    (interpolated between the priced cache lengths, clamped outside); the
    ladder of the largest priced length for every row without `length`."""
    table = jnp.asarray(self.cost_table, jnp.float32)             # [L, J]
    if len(self.lengths) < 2 or length is None:
      return jnp.broadcast_to(table[-1], (batch, len(self.widths)))
    at = functools.partial(jnp.interp, length.astype(jnp.float32),
                           jnp.asarray(self.lengths, jnp.float32))
    return jax.vmap(at, in_axes=1, out_axes=1)(table)   # clamped outside

  def gains(self, tree: Tree, live: jax.Array,
            length: Optional[jax.Array] = None) -> jax.Array:
    """`[J]` G(w_j) (module docstring) of a tree `[B, N]`, live rows `[B]`
    and their committed lengths `[B]` (for a ladder priced per cache
    length)."""
    b, n = tree.valid.shape
    drafts = tree.valid & (jnp.arange(n) > 0)[None]
    p = (drafts.astype(jnp.float32) if tree.path_logq is None
         else jnp.where(drafts, jnp.exp(tree.path_logq), 0.0))
    s = jnp.cumsum(jnp.where(live[:, None], p, 0.0), axis=1).sum(0)  # [N]
    w = jnp.asarray(self.widths, jnp.int32)
    costs = jnp.where(live[:, None], self.row_costs(length, b), 0.0).sum(0)
    return s[w - 1] - costs

  def apply(self, tree: Tree, live: jax.Array,
            length: Optional[jax.Array] = None) -> tuple[Tree, jax.Array]:
    """`(tree, j)`: nodes at slots >= w_{j*} made invalid, j* the width of
    the largest gain (the last when a live row has drawn children)."""
    n = tree.valid.shape[1]
    j = jnp.argmax(self.gains(tree, live, length)).astype(jnp.int32)
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

