"""The Hydra drafter: sequentially dependent heads on the root's feature.

As Medusa (`drafters.medusa`), every node at depth d takes its children
from head d+1 on the target's feature f_{L-1}; unlike Medusa, head d+1 also
reads the embeddings of the node's path, root to node (`models.hydra`), so
siblings' subtrees differ. The paths are static node indices of the tree's
topology; one head evaluation per level, no cache.

Hydra++ heads (`prefix_attention`) also read g_{L-1}, their prefix layer's
output over the committed features: the state then holds that layer's KV
cache, filled by `init` with the prompt's features and by `commit` with the
kept path's (`Outcome.features`, positions L .. L+c-1), so g is always the
layer's output at the last committed position.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqdec.decoding.drafters.grow import grow_static_tree, head_scores
from seqdec.decoding.drafters.medusa import HeadsDrafter
from seqdec.decoding.drafters.base import Outcome
from seqdec.models.hydra import HydraHeads, hydra_config
from seqdec.models.transformer import commit as commit_cache


def path_nodes(parents, lo: int, hi: int, depth: int) -> np.ndarray:
  """`[hi - lo, depth + 1]` node indices root .. node of nodes lo..hi-1 (all
  at `depth`) of a static topology."""
  out = np.zeros((hi - lo, depth + 1), np.int32)
  for i, node in enumerate(range(lo, hi)):
    for d in range(depth, -1, -1):
      out[i, d] = node
      node = parents[node]
  return out


@flax.struct.dataclass
class PrefixState:
  """Hydra++'s drafter state. Attributes: f `[B, D]` the target's feature
  f_{L-1}; g `[B, D]` the prefix layer's output there; cache: the prefix
  layer's `KVCache` over positions 0 .. L-1."""
  f: jax.Array
  g: jax.Array
  cache: Any


class HydraDrafter(HeadsDrafter):
  """Hydra drafting (module docstring); arguments as `MedusaDrafter`."""

  def __init__(self, heads: HydraHeads, target, name: str = "hydra",
               proposal: str = "topk", keep_ids=None):
    c = heads.config
    super().__init__(heads, target, hydra_config(
        target, c.num_heads, c.prefix_attention), name, proposal, keep_ids)
    self.prefix = c.prefix_attention

  def init(self, params, tokens, prompt_len, first, capacity, target_cache,
           features=None):
    f = super().init(params, tokens, prompt_len, first, capacity,
                     target_cache, features)
    if not self.prefix:
      return f
    heads = nnx.merge(self.heads_def, params[0])
    b, p = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    g, cache = heads.context(features[..., -f.shape[-1]:], pos,
                             heads.init_cache(b, capacity + 1))
    last = (prompt_len - 1)[:, None, None]
    return PrefixState(f=f, g=jnp.take_along_axis(g, last, 1)[:, 0],
                       cache=commit_cache(cache, prompt_len))

  def commit(self, params, state, shape, rnd, outcome: Outcome):
    if not self.prefix:
      return super().commit(params, state, shape, rnd, outcome)
    heads = nnx.merge(self.heads_def, params[0])
    feats = outcome.features[..., -state.f.shape[-1]:]           # [B, M, D]
    m = feats.shape[1]
    pos = rnd.length[:, None] + jnp.arange(m, dtype=jnp.int32)[None]
    g, cache = heads.context(feats, pos, state.cache)
    kept = outcome.num_kept
    last = jnp.maximum(kept - 1, 0)[:, None, None]
    moved = (kept > 0)[:, None]
    return PrefixState(
        f=super().commit(params, state.f, shape, rnd, outcome),
        g=jnp.where(moved, jnp.take_along_axis(g, last, 1)[:, 0], state.g),
        cache=commit_cache(cache, kept))

  def propose(self, params, state, shape, rnd, target_cache, key):
    heads = nnx.merge(self.heads_def, params[0])
    target = nnx.merge(self.target_def, params[1])
    keep_ids = params[2]
    f, g = (state.f, state.g) if self.prefix else (state, None)

    def expand(d, tokens, carry):
      lo, hi = shape.levels[d]
      path = jnp.asarray(path_nodes(shape.parents, lo, hi, d))     # [w, d+1]
      emb = target.embed_tokens(tokens[:, path.reshape(-1)])
      emb = emb.reshape(emb.shape[0], hi - lo, d + 1, -1)         # [B,w,d+1,D]
      w = (f.shape[0], hi - lo, f.shape[-1])
      h = heads.features(d + 1, jnp.broadcast_to(f[:, None], w), emb,
                         None if g is None else jnp.broadcast_to(g[:, None],
                                                                 w))
      return head_scores(target, h, keep_ids, params[3],
                         self.vocab_size), carry

    tree, _ = grow_static_tree(shape, rnd, key, self.proposal,
                               self.vocab_size, expand, None)
    return tree, state, target_cache
