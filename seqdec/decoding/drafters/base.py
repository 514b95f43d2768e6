"""The drafter interface: what the speculative loop asks of any drafter.

A round of speculative decoding, per row, with committed target length L:

    root  = the last accepted token, at position L (its K/V not yet cached)
    prev  = the token at position L - 1 (committed)
    tree  = drafter.propose(...)      a token tree hanging from the root
    ...     the target verifies the tree and accepts a path
    drafter.commit(..., outcome)      told which path (and how many tokens)
                                      were kept, it commits or rolls back

A drafter owns its state (a pytree: its cache, its token history, ...),
created by `init` after the target's prefill and threaded through the jitted
loop (donated with the rest of the loop state). Drafters are static
(hashable) objects; their weights are `params`, passed to jit as an argument.
A drafter may also read and write the *scratch* slots of the target cache
(slots >= L): the self-speculative drafters attend to the target's committed
K/V directly and leave nothing to roll back.

Target features. A drafter with `uses_features = True` (EAGLE, Medusa,
Hydra) reads the target's features f_t = target.features(hidden_t), the LM
head's input at position t: `init` gets those of the prompt and `commit`
those of the kept path (`Outcome.features`), both taken from forwards the
target runs anyway (prefill, verification); nothing is recomputed. For the
other drafters the loops neither compute nor carry them.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

from seqdec.errors import UserError
from seqdec.decoding.trees import FrontierBudget, Tree, TreeShape


class DrafterError(UserError):
  """A drafter cannot serve this target or tree (e.g. vocabulary mismatch)."""


@flax.struct.dataclass
class Round:
  """The engine's view at the start of a round.

  Attributes:
    root: `[B]` int32 last accepted token (position `length`).
    prev: `[B]` int32 token at position `length - 1`.
    length: `[B]` int32 committed target length.
    live: `[B]` bool rows still decoding.
    temperature: `[B]` float32 sampling temperature of each row (0: greedy),
      or None (all greedy). Sampling drafters draw a row's children from
      q = softmax(draft logits / temperature) and fall back to deterministic
      top-k for greedy rows.
  """
  root: jax.Array
  prev: jax.Array
  length: jax.Array
  live: jax.Array
  temperature: Optional[jax.Array] = None


@flax.struct.dataclass
class Outcome:
  """What the target kept this round (M = max depth + 1).

  Attributes:
    path: `[B, M]` accepted node indices from the root.
    num_kept: `[B]` int32 c: the path nodes committed to the target cache
      (path[0 .. c-1]) = the tokens emitted this round, after EOS and budget
      truncation; 0 for rows that were already done.
    tokens: `[B, M]` emitted tokens (valid up to `num_kept`); the last one is
      the next root.
    features: `[B, M, D]` the target's features at the path nodes (node
      path[j] sits at position length + j), or None unless the drafter
      `uses_features`.
  """
  path: jax.Array
  num_kept: jax.Array
  tokens: jax.Array
  features: Optional[jax.Array] = None


class Drafter:
  """Base class. Subclasses implement `init`, `propose` and `commit`.

  Attributes:
    name: config name.
    params: pytree of weights (an empty tuple for weightless drafters).
    vocab_size: the drafter's vocabulary (checked against the target's), or
      None if it proposes only tokens it has seen (n-gram).
    uses_features: reads the target's features (module docstring).
    feature_taps: with `uses_features`, the target blocks whose inputs it
      reads too (EAGLE-3's fused features,
      `seqdec.models.protocol.backbone_features`): features are then
      `[..., (len(feature_taps) + 1) * D]`, the final features last.
    grows_dynamic_trees: accepts a budget grown on device
      (`trees.FrontierBudget`: EAGLE-2's `DynamicTree`, ReDrafter's
      `BeamTree`).
    may_propose_nothing: a row's tree can have no valid draft node (an
      n-gram miss), so the loop runs root-only rounds
      (`SpecLoop.root_fallback`) without a gate too.
    commits_by_position: `commit` reads the kept path by position (its
      tokens and features), never by node index, so the tree it verifies
      may hold nodes it did not draft (a merged prompt-lookup chain,
      `drafters.lookup`); False for drafters that cache their tree nodes'
      own states (`ModelDrafter`).
  """
  name = "drafter"
  params: Any = ()
  vocab_size: int | None = None
  uses_features: bool = False
  feature_taps: tuple[int, ...] = ()
  grows_dynamic_trees: bool = False
  may_propose_nothing: bool = False
  commits_by_position: bool = False

  def check(self, target_config, shape: TreeShape) -> None:
    """Raises `DrafterError` if this drafter cannot serve the target/tree."""
    if self.vocab_size is not None and self.vocab_size != target_config.vocab_size:
      raise DrafterError(
          f"drafter {self.name!r} has a vocabulary of {self.vocab_size} tokens "
          f"but the target has {target_config.vocab_size}: drafter and target "
          f"must share one tokenizer")
    if isinstance(shape, FrontierBudget):
      if not self.grows_dynamic_trees:
        raise DrafterError(f"drafter {self.name!r} grows static trees only; "
                           f"a dynamic or beam tree budget needs a drafter "
                           f"that scores its own candidates (eagle, "
                           f"redrafter)")
      return
    shape.levels  # raises TreeError unless nodes are numbered level by level

  def window_slots(self, shape) -> int:
    """Scratch slots this drafter's own cache needs beyond the committed
    ones in a round (added to `init`'s capacity by the loop); 0 for
    drafters without a cache or whose window fits the tree's nodes."""
    return 0

  def verified_shape(self, shape):
    """The tree the loop verifies when this drafter grows `shape`: the
    shape itself, or more for a drafter that merges another's proposals
    in (`drafters.lookup`)."""
    return shape

  def keeping(self, depth: int) -> "Drafter":
    """This drafter for rounds that may keep paths up to `depth` drafts
    deep, deeper than the trees it grows (a merged prompt-lookup chain):
    a drafter whose per-round window is sized by the tree's depth (EAGLE's
    behind pairs) returns a copy sized for `depth`; the others, itself."""
    return self

  def init(self, params, tokens: jax.Array, prompt_len: jax.Array,
           first: jax.Array, capacity: int, target_cache: Any,
           features: Optional[jax.Array] = None) -> Any:
    """State after the prompt.

    Args:
      tokens: `[B, P]` right-padded prompts.
      prompt_len: `[B]` true lengths.
      first: `[B]` the first generated token (the first root).
      capacity: static, tokens a row may hold in total (prompt + new + tree).
      target_cache: the target cache after prefill (read only here).
      features: `[B, P, D]` the target's features of the prompt tokens
        (valid up to prompt_len) if `uses_features`, else None.
    """
    raise NotImplementedError

  def propose(self, params, state, shape: TreeShape, rnd: Round,
              target_cache: Any, key: jax.Array
              ) -> tuple[Tree, Any, Any]:
    """Drafts a tree of topology `shape` under each row's root.

    Returns `(tree, state, target_cache)`; only scratch slots (>= length) of
    the target cache may be written.
    """
    raise NotImplementedError

  def commit(self, params, state, shape: TreeShape, rnd: Round,
             outcome: Outcome) -> Any:
    """State after the target kept `outcome` (must cope with num_kept == 0)."""
    return state

  def __repr__(self):
    return f"{type(self).__name__}({self.name!r})"


def static_children(shape: TreeShape, level: int):
  """Index arrays to place ranked candidates of level `level` as children.

  Returns `(lo, hi, parent_offset, rank)`: the children are nodes
  `lo .. hi-1` (the next level); child c takes candidate `rank[c - lo]` of
  level node `parent_offset[c - lo]` (an index into that level's nodes).
  """
  levels = shape.levels
  p_lo = levels[level][0]
  lo, hi = levels[level + 1]
  parent_offset = jnp.asarray([shape.parents[c] - p_lo for c in range(lo, hi)],
                              jnp.int32)
  rank = jnp.asarray([shape.ranks[c] for c in range(lo, hi)], jnp.int32)
  return lo, hi, parent_offset, rank
