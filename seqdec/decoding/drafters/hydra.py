"""The Hydra drafter: sequentially dependent heads on the root's feature.

As Medusa (`drafters.medusa`), every node at depth d takes its children
from head d+1 on the target's feature f_{L-1}; unlike Medusa, head d+1 also
reads the embeddings of the node's path, root to node (`models.hydra`), so
siblings' subtrees differ. The paths are static node indices of the tree's
topology; one head evaluation per level, no cache.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqdec.decoding.drafters.grow import grow_static_tree, head_scores
from seqdec.decoding.drafters.medusa import HeadsDrafter
from seqdec.models.hydra import HydraHeads, hydra_config


def path_nodes(parents, lo: int, hi: int, depth: int) -> np.ndarray:
  """`[hi - lo, depth + 1]` node indices root .. node of nodes lo..hi-1 (all
  at `depth`) of a static topology."""
  out = np.zeros((hi - lo, depth + 1), np.int32)
  for i, node in enumerate(range(lo, hi)):
    for d in range(depth, -1, -1):
      out[i, d] = node
      node = parents[node]
  return out


class HydraDrafter(HeadsDrafter):
  """Hydra drafting (module docstring); arguments as `MedusaDrafter`."""

  def __init__(self, heads: HydraHeads, target, name: str = "hydra",
               proposal: str = "topk", keep_ids=None):
    super().__init__(heads, target, hydra_config(
        target, heads.config.num_heads), name, proposal, keep_ids)

  def propose(self, params, state, shape, rnd, target_cache, key):
    heads = nnx.merge(self.heads_def, params[0])
    target = nnx.merge(self.target_def, params[1])
    keep_ids = params[2]

    def expand(d, tokens, carry):
      lo, hi = shape.levels[d]
      path = jnp.asarray(path_nodes(shape.parents, lo, hi, d))     # [w, d+1]
      emb = target.embed_tokens(tokens[:, path.reshape(-1)])
      emb = emb.reshape(emb.shape[0], hi - lo, d + 1, -1)         # [B,w,d+1,D]
      f = jnp.broadcast_to(state[:, None], (state.shape[0], hi - lo,
                                            state.shape[-1]))
      h = heads.features(d + 1, f, emb)
      return head_scores(target, h, keep_ids, params[3],
                         self.vocab_size), carry

    tree, _ = grow_static_tree(shape, rnd, key, self.proposal,
                               self.vocab_size, expand, None)
    return tree, state, target_cache
