"""The target protocol: all that decoding loops and drafters ask of a model.

The loops (`seqdec.decoding.autoregressive`, `seqdec.decoding.speculative`)
and the model drafters reach a target only through these methods, never
through a model module's free functions or its cache type, so a target with
another cache (an SSM's recurrent state, local/global attention layers)
plugs in without touching the loops.

The cache is any pytree with a `length` field `[B]` int32: the number of
committed tokens of each row. The contract (`seqdec.models.transformer`
documents it for the KV cache):

* `__call__(tokens [B, T], positions [B, T], cache, mask, logit_index)`
  runs T new tokens that see the committed prefix and each other under
  `mask` (`[B, T, T]` bool, None = causal; `[B, T, W]` over a scratch
  window of W >= T slots); their state goes to scratch; `cache.length` is
  unchanged. Returns `(logits [B, T or N, V], cache)`; `logit_index`
  `[B, N]` selects the positions whose logits are returned.
* `commit(cache, n_keep [B], keep_index [B, T] | None)` keeps the first
  `n_keep[b]` of the new tokens (or those `keep_index` lists, in order) and
  advances `length`. Rejected tokens cost nothing to roll back.
* `init_cache(batch_size, max_len)`: an empty cache.
* Self-drafting (layer skip) and drafters that read the target's features
  use `backbone(tokens, positions, cache, mask, layers)` -> `(hidden
  [B, T, D], cache)`, the blocks of the static subset `layers` only (None:
  all), and `logits(hidden)` = `head(features(hidden))`: `features` applies
  the final norm (its output, the LM head's input, is the feature that
  feature-reading drafters such as EAGLE and Medusa consume) and `head`
  maps features to logits (of the vocabulary entries `ids` only, for a
  trimmed drafter head).
* `config` has at least `vocab_size` and `max_position_embeddings`.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import jax


@runtime_checkable
class Target(Protocol):
  """A causal LM with an explicit cache (module docstring)."""
  config: Any

  def init_cache(self, batch_size: int, max_len: int) -> Any:
    ...

  def __call__(self, tokens: jax.Array, positions: jax.Array, cache: Any,
               mask: Optional[jax.Array] = None,
               logit_index: Optional[jax.Array] = None
               ) -> tuple[jax.Array, Any]:
    ...

  def commit(self, cache: Any, n_keep: jax.Array,
             keep_index: Optional[jax.Array] = None) -> Any:
    ...

  def backbone(self, tokens: jax.Array, positions: jax.Array, cache: Any,
               mask: Optional[jax.Array] = None,
               layers: Optional[Sequence[int]] = None
               ) -> tuple[jax.Array, Any]:
    ...

  def logits(self, hidden: jax.Array) -> jax.Array:
    ...

  def features(self, hidden: jax.Array) -> jax.Array:
    ...

  def head(self, features: jax.Array,
           ids: Optional[jax.Array] = None) -> jax.Array:
    ...
