"""The EAGLE drafter: trees grown by `seqdec.models.eagle.EagleNet` on the
target's own features.

Per row, with committed target length L (root x_L at position L), the
network's pair at position t is (e(x_t), f_{t-1}) (`EagleNet`). Its cache
holds the pairs t = 1 .. d of tokens whose feature before them is the
*target's*; pairs with predicted features (tree nodes below the root) are
never committed. Since a round's features arrive only with its verification
(`Outcome.features`), the next round first feeds the pairs they complete:

    behind   pairs t = d+1 .. L-1 (n_b = L-1-d <= D of them), exact
    root     pair  t = L: (e(x_L), f_{L-1}), exact     -> f^_L, root's q
    level k  pairs (e(x_v), f^_parent(v)) at L + depth(v) -> f^_v, v's q

in one window over scratch slots: entries 0 .. D-1 the behind pairs (the
first n_b valid), entry D the root, then the tree's nodes (D = the most a
round can leave behind, c - 1 for c kept tokens: the tree's max depth, or
the depth of a merged prompt-lookup chain if deeper, `keeping`).
After growing the tree the behind pairs and the root pair are committed
(d <- L), all exact, so nothing is ever rolled back. A tree of depth D costs
D calls of the one-layer network plus its head. With a `trees.DynamicTree`
budget the tree is grown EAGLE-2 style instead (`drafters.dynamic`): K
frontier nodes fed per level, the N - 1 best candidates kept; with a
`trees.BeamTree` the same frontier feeding runs a beam search (ReDrafter's
candidates).

Vocabulary trimming (VocabTrim): with `keep_ids` (M token ids, e.g. the M
most frequent in the training responses) the drafter scores only those,
head(f^)[keep_ids] (M x D instead of V x D per node), and puts -inf on every
other token, so its distribution is q = softmax over the kept logits at the
row's temperature, renormalised over the kept set and zero elsewhere: exactly
the law its children are drawn from, which is what the lossless rules need.
Verification is over the full vocabulary.

Histories: the state keeps the target's features f_t and tokens x_t by
position (`[B, C, D]`, `[B, C]`), written by `init` (prompt) and `commit`
(kept path), from which each round's behind pairs are gathered.

EAGLE-3 (a network with feature taps, `seqdec.models.eagle`): the target's
features are the fused F_t (`[B, C, (k+1)D]`, `feature_taps`); the behind
and root pairs read them (the network fuses them), the tree's nodes read
the network's own f^ as before.
"""

from __future__ import annotations

import copy
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from seqdec.decoding.drafters.base import Drafter, DrafterError, Outcome
from seqdec.decoding.drafters.dynamic import grow_frontier_tree
from seqdec.decoding.drafters.grow import (check_proposal, check_keep_ids,
                                           grow_static_tree, head_scores,
                                           prebuilt_head, window_mask)
from seqdec.decoding.trees import FrontierBudget
from seqdec.models import eagle as eagle_lib
from seqdec.models.eagle import EagleNet, eagle_config
from seqdec.models.transformer import Transformer, commit
from seqdec.ops import write_rows


@flax.struct.dataclass
class EagleState:
  """Attributes:
    cache: the network's `KVCache`; `length` = d, committed pairs.
    features: `[B, C, D]` the target's f_t at index t (valid below L).
    tokens: `[B, C]` x_t at index t (valid up to L, the root).
  """
  cache: Any
  features: jax.Array
  tokens: jax.Array


class EagleDrafter(Drafter):
  """EAGLE-1 drafting (module docstring) for one target.

  Args:
    net: an `EagleNet` built for this target (`eagle_config`).
    target: the target `Transformer` (its embedding and LM head are the
      drafter's, frozen and shared, not copied).
    name: config name.
    proposal: children at temperature > 0: 'topk', 'iid' or 'wor'.
    keep_ids: `[M]` int token ids the head scores (trimmed), or None (all).
  """
  uses_features = True
  grows_dynamic_trees = True
  commits_by_position = True
  min_lag = 0        # `keeping`: behind pairs beyond the tree's own depth

  def __init__(self, net: EagleNet, target, name: str = "eagle",
               proposal: str = "topk", keep_ids=None):
    check_proposal(proposal)
    want = eagle_config(target.config)
    if net.config != want:
      diff = sorted(k for k in want.__dataclass_fields__
                    if getattr(want, k) != getattr(net.config, k))
      raise DrafterError(f"EAGLE network was built for another target "
                         f"(config fields differ: {diff})")
    self.feature_taps = tuple(net.taps)
    if self.feature_taps and not isinstance(target, Transformer):
      raise DrafterError(f"an EAGLE-3 network reads the inputs of target "
                         f"blocks {list(self.feature_taps)}, which a "
                         f"{type(target).__name__} target does not expose")
    self.name, self.proposal = name, proposal
    self.vocab_size = target.config.vocab_size
    if getattr(target.config, "matmul_impl", "xla") == "packed":
      net = eagle_lib.packed(net)     # its matmuls on the target's kernel
    self.net_def, net_params = nnx.split(net)
    self.target_def, target_params = nnx.split(target)
    keep_ids = check_keep_ids(keep_ids, self.vocab_size)
    self.trimmed = keep_ids is not None
    self.params = (net_params, target_params) + prebuilt_head(target,
                                                              keep_ids)
    self.feature_width = net.config.hidden_size    # f^, the predictions

  def scores(self, target, params, f_hat: jax.Array,
             compact: bool = False) -> jax.Array:
    """`[..., V]` drafter logits: head(f^), or with a trimmed head the kept
    ids' logits and -inf elsewhere (module docstring); `compact`: a trimmed
    head's `[..., M]` kept logits alone (over the ids `params[2]`)."""
    if compact and self.trimmed:
      return target.head(f_hat, params[2], params[3])
    return head_scores(target, f_hat, params[2], params[3], self.vocab_size)

  def keeping(self, depth: int) -> "EagleDrafter":
    """A copy whose window holds `depth` behind pairs at least: a round
    keeping c tokens leaves c - 1 pairs behind."""
    out = copy.copy(self)
    out.min_lag = max(self.min_lag, depth)
    return out

  def lag(self, shape) -> int:
    """Behind pairs a round may find: the tree's depth, or `keeping`'s."""
    return max(shape.max_depth, self.min_lag)

  def window_slots(self, shape) -> int:
    """The round's window: the behind pairs (`lag`), then the tree's N
    nodes (static) or the root and K frontier nodes per level 1 .. D-1
    (dynamic)."""
    if isinstance(shape, FrontierBudget):
      return self.lag(shape) + 1 + (shape.max_depth - 1) * shape.top_k
    return self.lag(shape) + shape.num_nodes

  def init(self, params, tokens, prompt_len, first, capacity, target_cache,
           features=None):
    if features is None:
      raise DrafterError("the EAGLE drafter needs the target's features")
    net = nnx.merge(self.net_def, params[0])
    target = nnx.merge(self.target_def, params[1])
    b, p = tokens.shape
    size = capacity + 1
    hist_f = jnp.zeros((b, size, features.shape[-1]), features.dtype)
    hist_f = hist_f.at[:, :p].set(features)
    hist_t = jnp.zeros((b, size), jnp.int32).at[:, :p].set(tokens)
    hist_t = write_rows(hist_t, first[:, None], prompt_len)
    cache = net.init_cache(b, size)
    if p > 1:   # pairs t = 1 .. P-1: (e(x_t), f_{t-1})
      pos = jnp.broadcast_to(jnp.arange(1, p, dtype=jnp.int32), (b, p - 1))
      _, cache = net(target.embed_tokens(tokens[:, 1:]), features[:, :-1],
                     pos, cache)
    cache = commit(cache, prompt_len - 1) if p > 1 else cache
    return EagleState(cache=cache, features=hist_f, tokens=hist_t)

  def propose(self, params, state, shape, rnd, target_cache, key):
    net = nnx.merge(self.net_def, params[0])
    target = nnx.merge(self.target_def, params[1])
    b, lag = rnd.root.shape[0], self.lag(shape)
    d = state.cache.length
    n_behind = jnp.clip(rnd.length - 1 - d, 0, lag)                  # [B]
    # Behind pair e: t = d + 1 + e (clipped for the invalid ones).
    t_behind = jnp.minimum(d[:, None] + 1 + jnp.arange(lag),
                           rnd.length[:, None])
    first = dict(                         # the behind pairs, then the root
        tokens=jnp.concatenate([
            jnp.take_along_axis(state.tokens, t_behind, axis=1),
            rnd.root[:, None]], 1),
        features=jnp.concatenate([
            jnp.take_along_axis(state.features,
                                jnp.maximum(t_behind - 1, 0)[..., None], 1),
            jnp.take_along_axis(state.features, jnp.maximum(
                rnd.length - 1, 0)[:, None, None], 1)], 1),
        positions=jnp.concatenate([t_behind, rnd.length[:, None]], 1),
        n_behind=n_behind)

    frontier = isinstance(shape, FrontierBudget)

    def feed(tokens, feats, positions, cache, mask, scored):
      """f^ of new window entries, and the drafter logits of the last
      `scored` of them (the others are behind pairs, never expanded); a
      frontier tree takes a trimmed head's kept logits alone."""
      out, cache = net(target.embed_tokens(tokens), feats, positions, cache,
                       mask)
      return out, self.scores(target, params, out[:, -scored:],
                              compact=frontier), cache

    if frontier:
      tree, cache = self._grow_dynamic(shape, lag, rnd, first, feed,
                                       state.cache, params[2])
    else:
      tree, cache = self._grow_static(shape, lag, rnd, key, first, feed,
                                      state.cache)
    # Commit the exact pairs: the n_b behind ones and the root's.
    keep = jnp.where(jnp.arange(lag + 1) < n_behind[:, None],
                     jnp.arange(lag + 1), lag)
    cache = commit(cache, jnp.where(rnd.live, n_behind + 1, 0), keep)
    return tree, state.replace(cache=cache), target_cache

  @staticmethod
  def _first_mask(parents: jax.Array, lag: int, n_behind: jax.Array):
    """`window_mask` with the invalid behind entries (e >= n_b) hidden."""
    m = window_mask(parents, lag)
    entry = jnp.arange(m.shape[-1], dtype=jnp.int32)
    valid = (entry[None] >= lag) | (entry[None] < n_behind[:, None])
    return m & valid[:, None, :]

  def _grow_static(self, shape, lag, rnd, key, first, feed, cache):
    b, n = rnd.root.shape[0], shape.num_nodes
    parents = jnp.broadcast_to(jnp.asarray(shape.parents, jnp.int32), (b, n))
    mask = self._first_mask(parents, lag, first["n_behind"])
    depth = jnp.asarray(shape.depth, jnp.int32)
    pos = jnp.concatenate([first["positions"][:, :lag],
                           rnd.length[:, None] + depth[None]], 1)

    def expand(level, tokens, carry):
      cache, pred = carry                                   # pred: [B, N, D]
      lo, hi = shape.levels[level]
      if level == 0:
        e_lo, e_hi = 0, lag + hi
        toks, feats = first["tokens"], first["features"]
      else:
        e_lo, e_hi = lag + lo, lag + hi
        toks = tokens[:, lo:hi]
        feats = jnp.take_along_axis(pred, parents[:, lo:hi, None], axis=1)
      out, logits, cache = feed(toks, feats, pos[:, e_lo:e_hi], cache,
                                mask[:, e_lo:e_hi, :e_hi], hi - lo)
      out = out[:, -(hi - lo):]
      pred = pred.at[:, lo:hi].set(out.astype(pred.dtype))
      return logits, (cache, pred)

    pred0 = jnp.zeros((b, n, self.feature_width), first["features"].dtype)
    tree, (cache, _) = grow_static_tree(shape, rnd, key, self.proposal,
                                        self.vocab_size, expand,
                                        (cache, pred0))
    return tree, cache

  def _grow_dynamic(self, shape, lag, rnd, first, feed, cache, vocab_ids):
    """EAGLE-2 or beam search (`drafters.dynamic`): window entries are the
    `lag` behind pairs, the root, then K frontier nodes per level 1 ..
    D-1, with an ancestor relation over them built level by level; the
    logits are over `vocab_ids` (a trimmed head) or V (None)."""
    b, k = rnd.root.shape[0], shape.top_k
    width = lag + 1 + (shape.max_depth - 1) * k
    root_only = jnp.full((b, 1), -1, jnp.int32)
    first_mask = self._first_mask(root_only, lag, first["n_behind"])
    anc = jnp.zeros((b, width, width), jnp.bool_)
    anc = anc.at[:, :lag + 1, :lag + 1].set(first_mask)
    out, logits, cache = feed(first["tokens"], first["features"],
                              first["positions"], cache, first_mask, 1)
    prev_pred = out[:, -1:]                                  # root's f^
    prev_entry = jnp.full((b, 1), lag, jnp.int32)

    def expand(level, tokens, parent_pos, carry):
      cache, anc, prev_pred, prev_entry = carry
      e0 = lag + 1 + (level - 1) * k
      entries = e0 + jnp.arange(k, dtype=jnp.int32)
      feats = jnp.take_along_axis(prev_pred, parent_pos[..., None], 1)
      parent_entry = jnp.take_along_axis(prev_entry, parent_pos, 1)
      rows = jnp.take_along_axis(anc, parent_entry[..., None], 1)  # [B,K,W]
      rows = rows | (jnp.arange(width)[None, None] == entries[None, :, None])
      anc = anc.at[:, e0:e0 + k].set(rows)
      pos = jnp.broadcast_to(rnd.length[:, None] + level, (b, k))
      out, logits, cache = feed(tokens, feats, pos, cache,
                                anc[:, e0:e0 + k, :e0 + k], k)
      return logits, (cache, anc, out,
                      jnp.broadcast_to(entries, (b, k)))

    tree, (cache, *_) = grow_frontier_tree(
        shape, rnd.root, logits[:, -1], expand,
        (cache, anc, prev_pred, prev_entry), rnd.live, vocab_ids)
    return tree, cache

  def commit(self, params, state, shape, rnd, outcome: Outcome):
    """Records the kept path: f at L .. L+c-1, x at L+1 .. L+c (entries
    past c are overwritten before they are read)."""
    return state.replace(
        features=write_rows(state.features, outcome.features, rnd.length),
        tokens=write_rows(state.tokens, outcome.tokens, rnd.length + 1))
