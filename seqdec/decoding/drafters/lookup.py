"""A drafter's tree with a prompt-lookup chain merged into it.

A trained drafter guesses well where the answer is new text; prompt lookup
(`drafters.ngram`) where it copies (summaries, rewrites, code that repeats
names). `WithLookupChain` runs both each round and verifies one tree: the
base drafter's tree of N_b nodes, and the lookup's chain c_1 .. c_L (the
continuation of the best earlier match of the history's last n-gram)
merged into it as a prefix tree:

    m     = the longest prefix c_1 .. c_m that is a path of the base tree
            from the root (a valid node per token), ending at node a
    slots N_b .. N_b + L - m - 1 hold c_{m+1} .. c_L, the first a child
            of a, each next one a child of the one before
            (depth of c_j = j); the last m slots are invalid (children of
            the root)

so no two valid siblings hold the same token (each path of tokens is in
the tree once, as ReDrafter's beams are) and the chain costs only its new
tokens. Slots past the base tree come after it, so parents still precede
children, and a round whose chain adds no valid node (no match, or all of
it already drafted) verifies the base tree's N_b slots alone
(`trees.WithLookup.verify_widths`).

The chain's nodes are deterministic proposals (q = delta), so the base
tree's children must be too ('topk' proposals; dynamic and beam trees
always are): the lossless rule then treats every node's children as an
ordered list of distinct candidates, whichever drafter proposed them
(`verify.deterministic_step`). A chain node's `path_logq` is the lookup's
confidence in it (`NgramDrafter`'s curves), else 0 (counted as certain,
as the lookup's own trees are).

The base drafter must commit by position (`Drafter.commits_by_position`:
EAGLE, Medusa, Hydra, ReDrafter), since a kept path may end in chain nodes
it never drafted; EAGLE widens its window of behind pairs to the chain's
depth (`Drafter.keeping`).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from seqdec.decoding import trees as trees_lib
from seqdec.decoding.drafters.base import Drafter, DrafterError, Outcome
from seqdec.decoding.drafters.ngram import NgramDrafter
from seqdec.decoding.trees import Tree, WithLookup


def merge_chain(tree: Tree, chain: jax.Array, chain_valid: jax.Array,
                chain_logq: Optional[jax.Array] = None) -> Tree:
  """The module docstring's merge of a chain into each row's tree.

  Args:
    tree: `[B, N_b]` the base tree; its valid siblings hold distinct tokens.
    chain: `[B, L]` int chain tokens c_1 .. c_L (depths 1 .. L).
    chain_valid: `[B, L]` bool, a prefix of each row's chain (a node is
      proposed only if its predecessors are).
    chain_logq: `[B, L]` the chain nodes' path log-confidence, or None.

  Returns:
    `[B, N_b + L]`: the base tree's slots unchanged, then the chain's new
    nodes (deterministic scheme; q, where the base tree has one, zero).
  """
  b, n = tree.tokens.shape
  length = chain.shape[1]
  chain = chain.astype(jnp.int32)
  chain_valid = jnp.cumprod(chain_valid.astype(jnp.int32), axis=1) > 0
  # Walk down the base tree along the chain: at = the node holding the
  # matched prefix (root 0), matched = m.
  at = jnp.zeros((b,), jnp.int32)
  matched = jnp.zeros((b,), jnp.int32)
  going = jnp.ones((b,), jnp.bool_)
  for j in range(length):
    hit = (tree.valid & (tree.parents == at[:, None])
           & (tree.tokens == chain[:, j:j + 1]))                     # [B, N]
    found = going & chain_valid[:, j] & hit.any(axis=1)
    at = jnp.where(found, jnp.argmax(hit, axis=1).astype(jnp.int32), at)
    matched = matched + found
    going = found
  slot = jnp.arange(length, dtype=jnp.int32)
  src = matched[:, None] + slot[None]                               # [B, L]
  take = lambda x: jnp.take_along_axis(  # noqa: E731
      x, jnp.minimum(src, length - 1), axis=1)
  new_valid = (src < length) & take(chain_valid)
  # The last m slots (past the chain) hang invalid from the root, within
  # the tree's depth.
  parents = jnp.where(slot[None] == 0, at[:, None], n + slot[None] - 1)
  parents = jnp.where(src < length, parents, 0)
  path_logq = None
  if tree.path_logq is not None or chain_logq is not None:
    base = (jnp.zeros((b, n), jnp.float32) if tree.path_logq is None
            else tree.path_logq)
    new = (jnp.zeros((b, length), jnp.float32) if chain_logq is None
           else take(chain_logq.astype(jnp.float32)))
    path_logq = jnp.concatenate([base, new], 1)
  q = tree.q
  if q is not None:
    q = jnp.concatenate([q, jnp.zeros((b, length) + q.shape[2:], q.dtype)], 1)
  scheme = jnp.concatenate(
      [tree.scheme, jnp.full((b, length), trees_lib.DETERMINISTIC, jnp.int32)],
      1)
  return Tree.from_parents(
      jnp.concatenate([tree.tokens, jnp.where(new_valid, take(chain), 0)], 1),
      jnp.concatenate([tree.parents, parents], 1),
      valid=jnp.concatenate([tree.valid, new_valid], 1),
      scheme=scheme, q=q, path_logq=path_logq)


class WithLookupChain(Drafter):
  """`base`'s trees with a prompt-lookup chain of `chain` tokens merged in
  (module docstring); the verified tree is `trees.WithLookup(shape,
  chain)`.

  Args:
    base: a drafter that commits by position and proposes deterministically.
    chain: L, the chain's tokens.
    min_ngram, max_ngram: the lookup's match lengths (`NgramDrafter`).
    confidence, adapt: the lookup's per-match-length acceptance curves and
      their prior weight (`NgramDrafter`), or None.
  """

  def __init__(self, base: Drafter, chain: int, min_ngram: int = 2,
               max_ngram: int = 3, confidence=None, adapt: float = 0.0):
    if isinstance(base, WithLookupChain):
      raise DrafterError("a drafter takes one prompt-lookup chain")
    if not base.commits_by_position:
      raise DrafterError(f"drafter {base.name!r} caches its own tree nodes' "
                         f"states, so it cannot verify a tree holding "
                         f"nodes it did not draft; a prompt-lookup chain "
                         f"merges into eagle, medusa, hydra or redrafter "
                         f"trees")
    if getattr(base, "proposal", "topk") != "topk":
      raise DrafterError(f"a prompt-lookup chain's nodes are deterministic, "
                         f"so the tree's other children must be too: "
                         f"proposal='topk', not {base.proposal!r}")
    if chain < 1:
      raise DrafterError(f"a prompt-lookup chain needs >= 1 token, got "
                         f"{chain}")
    self.lookup = NgramDrafter(max(max_ngram, min_ngram), min_ngram,
                               name="lookup", confidence=confidence,
                               adapt=adapt)
    self.chain = chain
    self.chain_shape = trees_lib.chain(chain)
    self.base = base.keeping(chain)
    self.name = f"{base.name}+lookup"

  # The base drafter's weights and traits (the lookup has neither).
  params = property(lambda self: self.base.params)
  vocab_size = property(lambda self: self.base.vocab_size)
  uses_features = property(lambda self: self.base.uses_features)
  feature_taps = property(lambda self: self.base.feature_taps)
  grows_dynamic_trees = property(lambda self: self.base.grows_dynamic_trees)
  may_propose_nothing = property(lambda self: self.base.may_propose_nothing)
  commits_by_position = True

  def verified_shape(self, shape) -> WithLookup:
    """The tree the loop verifies for the base drafter's `shape`."""
    return shape if isinstance(shape, WithLookup) else WithLookup(
        shape, self.chain)

  def check(self, target_config, shape) -> None:
    if not isinstance(shape, WithLookup) or shape.chain != self.chain:
      raise DrafterError(f"drafter {self.name!r} verifies its base tree "
                         f"with a {self.chain}-token lookup chain merged in "
                         f"(verified_shape), got {shape}")
    self.base.check(target_config, shape.base)

  def window_slots(self, shape: WithLookup) -> int:
    return self.base.window_slots(shape.base)

  def init(self, params, tokens, prompt_len, first, capacity, target_cache,
           features=None):
    extra = dict(features=features) if self.uses_features else {}
    return (self.base.init(params, tokens, prompt_len, first, capacity,
                           target_cache, **extra),
            self.lookup.init((), tokens, prompt_len, first, capacity,
                             target_cache))

  def propose(self, params, state, shape: WithLookup, rnd, target_cache,
              key) -> tuple[Tree, Any, Any]:
    tree, base_state, target_cache = self.base.propose(
        params, state[0], shape.base, rnd, target_cache, key)
    chain, lookup_state, target_cache = self.lookup.propose(
        (), state[1], self.chain_shape, rnd, target_cache, key)
    logq = None if chain.path_logq is None else chain.path_logq[:, 1:]
    merged = merge_chain(tree, chain.tokens[:, 1:], chain.valid[:, 1:], logq)
    return merged, (base_state, lookup_state), target_cache

  def commit(self, params, state, shape: WithLookup, rnd,
             outcome: Outcome) -> Any:
    return (self.base.commit(params, state[0], shape.base, rnd, outcome),
            self.lookup.commit((), state[1], self.chain_shape, rnd, outcome))
