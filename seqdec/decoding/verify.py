"""Tree verification: which drafted path the target accepts, and the bonus.

An acceptance rule reads the drafted `Tree` and the target's logits at every
node (one forward over the tree with the ancestor mask) and returns an
`Acceptance`: the accepted root-to-node path and the tokens to emit (the
accepted drafts, then one token from the target at the path's end: the
"bonus"). Every rule emits between 1 and max_depth + 1 tokens per row and
call, so a speculative step never does worse than an autoregressive one in
tokens per target call.

Rules are small static objects chosen by name (`make_rule`). This module has
the greedy rule; lossless sampling rules (matched to `Tree.scheme`) plug into
the same interface.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from seqdec.decoding.sampling import SamplingParams
from seqdec.decoding.trees import Tree


@flax.struct.dataclass
class Acceptance:
  """What a rule accepted, per row (M = max tree depth + 1).

  Attributes:
    path: `[B, M]` node indices from the root along the accepted path; entries
      past `num_accepted` repeat the last accepted node.
    num_accepted: `[B]` int32 D, accepted draft nodes (0 .. M-1).
    tokens: `[B, M]` emitted tokens: the D accepted drafts, then the bonus at
      index D (entries past D are meaningless).
    logprobs: `[B, M]` log p_target of each emitted token at its parent node
      (temperature 1).
  """
  path: jax.Array
  num_accepted: jax.Array
  tokens: jax.Array
  logprobs: jax.Array


def deepest_accepted_path(tree: Tree, node_ok: jax.Array,
                          max_depth: int) -> tuple[jax.Array, jax.Array]:
  """The deepest node whose whole root path is accepted, and that path.

      accepted[i] = AND_{j ancestor-or-self of i} node_ok[j]   (node_ok[0] := 1)
      best = argmax_i (accepted[i], depth[i], -i)      (deepest, then first)
      path[d] = the ancestor of best at depth d        (d <= depth[best])

  Args:
    tree: the drafted `Tree`.
    node_ok: `[B, N]` bool, node i's own token passes the rule given that its
      parent was reached.
    max_depth: static maximum depth of the tree.

  Returns:
    `(path [B, max_depth + 1], num_accepted [B])`.
  """
  b, n = node_ok.shape
  ok = node_ok.at[:, 0].set(True)
  accepted = jnp.all(~tree.mask | ok[:, None, :], axis=-1)          # [B, N]
  index = jnp.arange(n, dtype=jnp.int32)
  score = jnp.where(accepted, tree.depth * n + (n - 1 - index), -1)
  best = jnp.argmax(score, axis=-1).astype(jnp.int32)               # [B]
  num_accepted = jnp.take_along_axis(tree.depth, best[:, None], 1)[:, 0]
  on_path = jnp.take_along_axis(tree.mask, best[:, None, None], 1)[:, 0]
  d = jnp.arange(max_depth + 1, dtype=jnp.int32)
  at_depth = on_path[:, None, :] & (tree.depth[:, None, :] == d[None, :, None])
  path = jnp.where(d[None] <= num_accepted[:, None],
                   jnp.argmax(at_depth, axis=-1).astype(jnp.int32),
                   best[:, None])
  return path, num_accepted


def path_logprobs(logits: jax.Array, path: jax.Array,
                  tokens: jax.Array) -> jax.Array:
  """log softmax(logits[b, path[b, d]])[tokens[b, d]], `[B, M]`."""
  rows = jnp.take_along_axis(logits, path[:, :, None], axis=1)       # [B,M,V]
  rows = rows.astype(jnp.promote_types(rows.dtype, jnp.float32))
  logp = jax.nn.log_softmax(rows, axis=-1)
  return jnp.take_along_axis(logp, tokens[:, :, None], axis=2)[:, :, 0]


class Rule:
  """`rule(tree, logits [B, N, V], keys [B], sparams, max_depth) -> Acceptance`.

  `keys` are the rows' keys for this step (sampling rules draw from them).
  """
  name = "rule"

  def __call__(self, tree: Tree, logits: jax.Array, keys: jax.Array,
               sparams: SamplingParams, max_depth: int) -> Acceptance:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Greedy(Rule):
  """Greedy verification: a drafted token is accepted iff it is the target's
  argmax at its parent; the bonus is the argmax at the deepest accepted node.

      y[i]     = argmax_v logits[i, v]
      ok[i]    = valid[i] and tokens[i] == y[parent[i]]
      emit[d]  = y[path[d]],  d = 0 .. D   (= the accepted drafts, then bonus)

  The emitted sequence is exactly what greedy autoregressive decoding would
  produce, whatever the drafter proposed (lossless for temperature 0).
  """
  name = "greedy"

  def __call__(self, tree, logits, keys=None, sparams=None, max_depth=None):
    if max_depth is None:
      raise ValueError("max_depth (static) is required")
    y = jnp.argmax(logits, axis=-1).astype(jnp.int32)                # [B, N]
    parent_y = jnp.take_along_axis(y, jnp.maximum(tree.parents, 0), axis=1)
    ok = tree.valid & (tree.tokens == parent_y)
    path, num_accepted = deepest_accepted_path(tree, ok, max_depth)
    tokens = jnp.take_along_axis(y, path, axis=1)
    return Acceptance(path=path, num_accepted=num_accepted, tokens=tokens,
                      logprobs=path_logprobs(logits, path, tokens))


RULES = {"greedy": Greedy}


def make_rule(name: str) -> Rule:
  """A rule by config name."""
  if name not in RULES:
    raise ValueError(f"unknown acceptance rule {name!r}; known: "
                     f"{sorted(RULES)}")
  return RULES[name]()


def needs_greedy(rule: Rule, temperature) -> Optional[str]:
  """An error message if `rule` cannot serve these temperatures, else None."""
  if isinstance(rule, Greedy) and (jnp.asarray(temperature) > 0).any():
    return ("greedy verification serves temperature 0 only; speculative "
            "sampling at temperature > 0 needs a lossless sampling rule")
  return None
