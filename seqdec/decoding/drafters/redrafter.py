"""The ReDrafter drafter: a recurrent head on the root's feature.

Per row, with committed target length L (root x_L) and the target's feature
f = f_{L-1}, every node v at depth d has an RNN state s_v (`models.redrafter`:
s_root = step(0, e(x_L)), s_v = step(s_parent, e(x_v))) and its children
come from q(. | f, path) = softmax(head(output(f, s_v))). Any tree:

* static topology: one RNN step and one head evaluation per level for the
  level's nodes (`grow.grow_static_tree`; i.i.d. / without-replacement
  children at T > 0);
* `trees.BeamTree`: ReDrafter's beam search, its final beams merged into a
  prefix tree (`dynamic.grow_beam_tree`);
* `trees.DynamicTree`: EAGLE-2's re-ranked tree (`dynamic.grow_dynamic_tree`).

The state is f_{L-1} only (`HeadsDrafter`): the RNN runs over drafted
tokens within a round, so nothing is cached and nothing rolls back.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqdec.decoding.drafters.dynamic import grow_frontier_tree
from seqdec.decoding.drafters.grow import grow_static_tree, head_scores
from seqdec.decoding.drafters.medusa import HeadsDrafter
from seqdec.decoding.trees import FrontierBudget
from seqdec.models.redrafter import ReDrafterHead, redrafter_config


class ReDrafterDrafter(HeadsDrafter):
  """ReDrafter drafting (module docstring); arguments as `MedusaDrafter`."""
  grows_dynamic_trees = True
  depth_limited = False            # an RNN drafts any depth

  def __init__(self, head: ReDrafterHead, target, name: str = "redrafter",
               proposal: str = "topk", keep_ids=None):
    c = head.config
    super().__init__(head, target, redrafter_config(
        target, c.num_layers, c.train_depth), name, proposal, keep_ids)

  def propose(self, params, state, shape, rnd, target_cache, key):
    head = nnx.merge(self.heads_def, params[0])
    target = nnx.merge(self.target_def, params[1])
    f = state[:, None]                                           # [B, 1, D]

    def scores(s):                                        # [B, w, D] -> V
      return head_scores(target, head.output(f, s), params[2], params[3],
                         self.vocab_size)

    s_root = head.step(None, target.embed_tokens(rnd.root[:, None]))
    if isinstance(shape, FrontierBudget):
      def expand_frontier(d, tokens, parent_pos, s_prev):
        s = head.step(jnp.take_along_axis(s_prev, parent_pos[..., None], 1),
                      target.embed_tokens(tokens))
        return scores(s), s

      tree, _ = grow_frontier_tree(shape, rnd.root, scores(s_root)[:, 0],
                                   expand_frontier, s_root, rnd.live)
      return tree, state, target_cache

    def expand(d, tokens, s_prev):
      if d == 0:
        return scores(s_root), s_root
      lo, hi = shape.levels[d]
      parent = np.asarray(shape.parents[lo:hi]) - shape.levels[d - 1][0]
      s = head.step(s_prev[:, parent], target.embed_tokens(tokens[:, lo:hi]))
      return scores(s), s

    tree, _ = grow_static_tree(shape, rnd, key, self.proposal,
                               self.vocab_size, expand, None)
    return tree, state, target_cache
