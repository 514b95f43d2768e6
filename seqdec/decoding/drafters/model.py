"""Drafters that run a transformer: an independent draft LM, and the target's
own layers (self-speculative layer skip).

Both expand the tree one level per forward call
(`grow.grow_static_tree`): level d's nodes are fed together, in a scratch
window that already holds levels < d, with the ancestor mask, so a tree of
depth D costs D drafter calls whatever its width; children are drawn by
the proposal scheme (`grow.PROPOSALS`: 'topk', 'iid' or 'wor').

Caches:

* `draft_lm`: the draft model has its own cache, kept one token *behind* the
  target (committed length L - 1). Each round's first call feeds `prev` and
  the root together (positions L-1, L): this re-computes the K/V of the last
  token of the previous round's path, which the drafter never fed when that
  token was a leaf. After verification the drafter commits `prev` plus the
  first c-1 accepted path nodes, which keeps it at L' - 1.
* `layer_skip`: the target's weights with a subset of its layers (DEL /
  CLaSp / Draft & Verify style, no training). It attends to the *target's*
  committed K/V of the layers it runs (computed by the full model) and writes
  its drafts to the target cache's scratch slots, which verification then
  overwrites: no cache of its own, no prefill, nothing to roll back.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
from flax import nnx

from seqdec.decoding.drafters.base import Drafter, DrafterError, Outcome
from seqdec.decoding.drafters.grow import (check_proposal, grow_static_tree,
                                           window_mask)
from seqdec.models.protocol import run_prompt
from seqdec.models.transformer import Transformer


class ModelDrafter(Drafter):
  """Top-k tree drafting with a `Transformer` (see module docstring).

  Args:
    model: the drafting model (an independent draft LM, or the target).
    layers: indices of the blocks to run (None: all).
    shared_cache: draft against the target's cache (layer skip) instead of
      an own cache.
    name: config name.
    proposal: how children are drawn at temperature > 0: 'topk', 'iid' or
      'wor' (module docstring).
  """

  def __init__(self, model: Transformer, layers: Optional[Sequence[int]] = None,
               shared_cache: bool = False, name: str = "draft",
               proposal: str = "topk"):
    check_proposal(proposal)
    self.proposal = proposal
    self.name = name
    self.config = model.config
    self.graphdef, self.params = nnx.split(model)
    self.vocab_size = model.config.vocab_size
    self.layers = None if layers is None else tuple(int(i) for i in layers)
    if self.layers is not None:
      bad = [i for i in self.layers if not 0 <= i < model.config.num_layers]
      if bad or not self.layers:
        raise DrafterError(f"layer subset {self.layers} is empty or outside "
                           f"0..{model.config.num_layers - 1}")
      if sorted(set(self.layers)) != list(self.layers):
        raise DrafterError(f"layer subset {self.layers} must be increasing "
                           f"without repeats")
    self.shared_cache = shared_cache
    self.lag = 0 if shared_cache else 1

  def check(self, target_config, shape):
    super().check(target_config, shape)
    if self.shared_cache and self.config != target_config:
      raise DrafterError("a shared-cache (layer-skip) drafter must be built "
                         "from the target model itself")

  def init(self, params, tokens, prompt_len, first, capacity, target_cache):
    if self.shared_cache:
      return ()
    model = nnx.merge(self.graphdef, params)
    cache = model.init_cache(tokens.shape[0], capacity + self.lag)
    return run_prompt(model, tokens, cache, prompt_len - self.lag,
                      layers=self.layers)[1]

  def propose(self, params, state, shape, rnd, target_cache, key):
    model = nnx.merge(self.graphdef, params)
    cache = target_cache if self.shared_cache else state
    b, lag = rnd.root.shape[0], self.lag
    parents = jnp.broadcast_to(jnp.asarray(shape.parents, jnp.int32),
                               (b, shape.num_nodes))
    mask = window_mask(parents, lag)                     # [B, lag+N, lag+N]
    # Window entry e holds ext node e: the lag tokens behind the root, then
    # the tree's nodes; positions L - lag + e (e < lag) and L + depth.
    ext_pos = jnp.concatenate([jnp.arange(-lag, 0, dtype=jnp.int32),
                               jnp.asarray(shape.depth, jnp.int32)])
    ext_pos = rnd.length[:, None] + ext_pos[None]                # [B, lag+N]
    behind = rnd.prev[:, None] if lag else jnp.zeros((b, 0), jnp.int32)

    def expand(d, tokens, cache):
      lo, hi = shape.levels[d]
      e_lo, e_hi = (0, lag + hi) if d == 0 else (lag + lo, lag + hi)
      fed = jnp.concatenate([behind, tokens[:, lo:hi]], 1) if d == 0 else (
          tokens[:, lo:hi])
      hidden, cache = model.backbone(fed, ext_pos[:, e_lo:e_hi], cache,
                                     mask[:, e_lo:e_hi, :e_hi],
                                     layers=self.layers)
      return model.logits(hidden[:, -(hi - lo):]), cache

    tree, cache = grow_static_tree(shape, rnd, key, self.proposal,
                                   self.vocab_size, expand, cache)
    if self.shared_cache:
      return tree, state, cache
    return tree, cache, target_cache

  def commit(self, params, state, shape, rnd, outcome: Outcome):
    if self.shared_cache:
      return state
    # Keep window entries [prev, path[0], ..., path[c-2]]: c tokens, which
    # moves the drafter from L - 1 to L + c - 1 = L' - 1.
    keep = jnp.concatenate([jnp.zeros_like(outcome.path[:, :1]),
                            outcome.path[:, :-1] + self.lag], axis=1)
    return nnx.merge(self.graphdef, params).commit(state, outcome.num_kept,
                                                   keep)


def draft_lm(model: Transformer, name: str = "draft",
             proposal: str = "topk") -> ModelDrafter:
  """An independent draft model with its own cache (same tokenizer)."""
  return ModelDrafter(model, name=name, proposal=proposal)


def layer_skip(target: Transformer, layers: Sequence[int],
               name: str = "layerskip", proposal: str = "topk") -> ModelDrafter:
  """The target with only `layers` run, drafting against the target's cache."""
  return ModelDrafter(target, layers=layers, shared_cache=True, name=name,
                      proposal=proposal)


def truncated(target: Transformer, num_layers: int) -> Transformer:
  """The target's first `num_layers` blocks + its final norm and head, as an
  independent model (weights shared, not copied)."""
  cfg = target.config
  if not 1 <= num_layers <= cfg.num_layers:
    raise DrafterError(f"cannot truncate a {cfg.num_layers}-layer model to "
                       f"{num_layers} layers")
  return layer_subset(target, range(num_layers))


def layer_subset(target: Transformer, layers: Sequence[int]) -> Transformer:
  """The target with only the blocks `layers` (increasing), + its final
  norm and head, as an independent model (weights shared, not copied): what
  a layer-skip draft level computes."""
  cfg = target.config
  layers = [int(i) for i in layers]
  if not layers or sorted(set(layers)) != layers or not (
      0 <= layers[0] and layers[-1] < cfg.num_layers):
    raise DrafterError(f"layer subset {layers} is empty, unsorted or outside "
                       f"0..{cfg.num_layers - 1}")
  graphdef, state = nnx.split(target)
  small_cfg = cfg.replace(
      num_layers=len(layers),
      layer_types=None if cfg.layer_types is None else tuple(
          cfg.layer_types[i] for i in layers))
  # The target's own class: a `Transformer`, or a `HybridLM` (whose subset
  # keeps each block's kind: Mamba-2 or attention).
  abstract = nnx.eval_shape(lambda: type(target)(small_cfg, rngs=None))
  small_def, small_state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  small_flat = {}
  for path, _ in nnx.to_flat_state(small_state):
    if path[0] == "layers":          # block j of the subset is block layers[j]
      path_in = (path[0], layers[int(path[1])]) + tuple(path[2:])
    else:
      path_in = path
    small_flat[path] = flat[path_in]
  return nnx.merge(small_def, nnx.from_flat_state(small_flat))


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
  """Layer subsets from config strings, for a model of `num_layers` blocks.

  'first:K'   the first K blocks (early exit);
  'skip:a-b'  all blocks but a..b (inclusive); several ranges joined by '+',
              e.g. 'skip:10-14+20-24';
  'keep:a-b'  only blocks a..b ('+'-joined ranges as above);
  'every:K'   blocks 0, K, 2K, ... plus the last block.
  """
  kind, _, arg = spec.partition(":")

  def ranges(text):
    out = set()
    for part in text.split("+"):
      lo, _, hi = part.partition("-")
      lo, hi = int(lo), int(hi or lo)
      if not 0 <= lo <= hi < num_layers:
        raise DrafterError(f"layer range {part!r} outside 0..{num_layers - 1}")
      out.update(range(lo, hi + 1))
    return out

  try:
    if kind == "first":
      k = int(arg)
      if not 1 <= k <= num_layers:
        raise DrafterError(f"first:{k} needs 1 <= K <= {num_layers}")
      keep = set(range(k))
    elif kind == "skip":
      keep = set(range(num_layers)) - ranges(arg)
    elif kind == "keep":
      keep = ranges(arg)
    elif kind == "every":
      k = int(arg)
      if k < 1:
        raise DrafterError(f"every:{k} needs K >= 1")
      keep = set(range(0, num_layers, k)) | {num_layers - 1}
    else:
      raise DrafterError(f"unknown layer spec {spec!r}; expected first:K, "
                         f"skip:a-b, keep:a-b or every:K")
  except ValueError as e:
    if isinstance(e, DrafterError):
      raise
    raise DrafterError(f"bad layer spec {spec!r}: {e}") from None
  if not keep:
    raise DrafterError(f"layer spec {spec!r} keeps no layer")
  return tuple(sorted(keep))
