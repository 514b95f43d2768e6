"""The Medusa drafter: K heads on the root's feature draft depths 1 .. K.

Per row, with committed target length L (root x_L), the target's feature
f_{L-1} (whose LM head output chose x_L) is the only input: head d+1 gives
q_{d+1}(x_{L+d+1} | f_{L-1}) (`seqdec.models.medusa`), and every node at
depth d of the tree takes its children from it by rank, whatever its
ancestors (Medusa's tree: the Cartesian product of the heads' top
candidates, pruned to the static topology). One evaluation of the K heads
per round, no cache; `commit` keeps the feature of the last kept node.
A trimmed head (`keep_ids`) scores only the kept ids and renormalises over
them (`grow.trimmed_logits`).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from seqdec.decoding.drafters.base import Drafter, DrafterError, Outcome
from seqdec.decoding.drafters.grow import (check_proposal, check_keep_ids,
                                           grow_static_tree, prebuilt_head,
                                           trimmed_logits)
from seqdec.models.medusa import MedusaHeads, medusa_config


class HeadsDrafter(Drafter):
  """Drafters of heads on the root's feature f_{L-1} (Medusa, Hydra,
  ReDrafter): the state is that feature; `commit` keeps the last kept
  node's. With `depth_limited` (one head per depth) a tree may be at most
  `num_heads` deep.

  Args:
    heads: the heads module (config `num_heads` at least; checked against
      `want`, the config these heads must have for this target).
    target: the target `Transformer` (its frozen embedding and head).
    name, proposal, keep_ids: as `EagleDrafter`.
  """
  uses_features = True
  depth_limited = True
  commits_by_position = True

  def __init__(self, heads, target, want, name: str, proposal: str = "topk",
               keep_ids=None):
    check_proposal(proposal)
    if heads.config != want:
      raise DrafterError(f"{name} heads were built for another target "
                         f"({heads.config} vs {want})")
    self.name, self.proposal = name, proposal
    self.vocab_size = target.config.vocab_size
    self.num_heads = heads.config.num_heads
    self.heads_def, heads_params = nnx.split(heads)
    self.target_def, target_params = nnx.split(target)
    self.params = (heads_params, target_params) + prebuilt_head(
        target, check_keep_ids(keep_ids, self.vocab_size))

  def check(self, target_config, shape):
    super().check(target_config, shape)
    if self.depth_limited and shape.max_depth > self.num_heads:
      raise DrafterError(f"a tree of depth {shape.max_depth} needs at least "
                         f"{shape.max_depth} {self.name} heads; these have "
                         f"{self.num_heads}")

  def init(self, params, tokens, prompt_len, first, capacity, target_cache,
           features=None):
    if features is None:
      raise DrafterError(f"the {self.name} drafter needs the target's "
                         f"features")
    return jnp.take_along_axis(features, (prompt_len - 1)[:, None, None],
                               axis=1)[:, 0]                      # [B, D]

  def commit(self, params, state, shape, rnd, outcome: Outcome):
    last = jnp.maximum(outcome.num_kept - 1, 0)[:, None, None]
    f = jnp.take_along_axis(outcome.features, last, axis=1)[:, 0]
    return jnp.where((outcome.num_kept > 0)[:, None], f, state)


class MedusaDrafter(HeadsDrafter):
  """Medusa drafting (module docstring)."""

  def __init__(self, heads: MedusaHeads, target, name: str = "medusa",
               proposal: str = "topk", keep_ids=None):
    super().__init__(heads, target, medusa_config(
        target, heads.config.num_heads, heads.config.own_heads), name,
                     proposal, keep_ids)

  def propose(self, params, state, shape, rnd, target_cache, key):
    heads = nnx.merge(self.heads_def, params[0])
    target = nnx.merge(self.target_def, params[1])
    keep_ids = params[2]
    logits = trimmed_logits(heads.logits(state, target, keep_ids, params[3]),
                            keep_ids, self.vocab_size)           # [B, K, V]

    def expand(d, tokens, carry):
      lo, hi = shape.levels[d]
      b, v = logits.shape[0], logits.shape[-1]
      return jnp.broadcast_to(logits[:, d, None], (b, hi - lo, v)), carry

    tree, _ = grow_static_tree(shape, rnd, key, self.proposal,
                               self.vocab_size, expand, None)
    return tree, state, target_cache

