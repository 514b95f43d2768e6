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
* Drafters that read several layers (EAGLE-3's low, middle and final
  features) need `backbone(..., taps=(i, j, ...))` -> `(hidden, cache,
  tapped)`, tapped[k] the input of block taps[k] (`backbone_features`);
  the transformer target has it, other targets may not.
* Optional, deferred writes: `backbone(..., defer_writes=True)` reads the
  cache only and returns, in the cache's place, the new tokens' state (a
  pytree whose leaves have the new tokens on axis 1); `write_new(cache,
  new)` puts it in scratch, giving the cache the call without deferral
  returns. A `lax.cond` between forwards of different T (a verify that
  falls back to the roots alone) then leaves the cache out of its
  branches: XLA:CPU copies every buffer a branch updates, which costs as
  much as the forward saved. `defers_writes(model)` tells.
* `config` has at least `vocab_size` and `max_position_embeddings`.
* Optional: `max_call_tokens`, the most new tokens a call may feed and
  still commit (a recurrent target's scratch; `run_prompt` chunks prompts
  to it), and `check_window(n)`, which raises ValueError when a scratch
  window of n tokens does not fit.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp


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

  def head(self, features: jax.Array, ids: Optional[jax.Array] = None,
           weight: Any = None) -> jax.Array:
    ...

  def head_weight(self, ids: jax.Array) -> Any:
    ...


def defers_writes(model: Target) -> bool:
  """Whether `model` has deferred-write calls (module docstring)."""
  return callable(getattr(model, "write_new", None))


def backbone_features(model: Target, tokens: jax.Array, positions: jax.Array,
                      cache: Any, mask: Optional[jax.Array] = None,
                      taps: Sequence[int] = (), **kw) -> tuple[jax.Array, Any]:
  """The target's features of new tokens for a feature-reading drafter:
  `(F [B, T, (len(taps) + 1) * D], cache)` with

      F = [features(h_taps[0]) ; ... ; features(h_final)]

  the final norm applied to the input of each tapped block and to the last
  block's output (`features`: the LM head's input), so `F[..., -D:]` is the
  feature the LM head reads and `taps=()` gives that alone. `kw` goes to
  `backbone` (e.g. `defer_writes=True`: the new state in the cache's
  place)."""
  if not taps:
    hidden, cache = model.backbone(tokens, positions, cache, mask, **kw)
    return model.features(hidden), cache
  hidden, cache, tapped = model.backbone(tokens, positions, cache, mask,
                                         taps=taps, **kw)
  return jnp.concatenate([model.features(h) for h in tapped]
                         + [model.features(hidden)], axis=-1), cache


def head_input(features: jax.Array, taps: Sequence[int] = ()) -> jax.Array:
  """The LM head's input f from `backbone_features`' output: its last
  D = width / (len(taps) + 1) features."""
  return features[..., -(features.shape[-1] // (len(taps) + 1)):]


def run_prompt(model: Target, tokens: jax.Array, cache: Any,
               n_commit: jax.Array,
               layers: Optional[Sequence[int]] = None,
               feature_taps: Optional[Sequence[int]] = None
               ) -> tuple[jax.Array, Any]:
  """Feeds right-padded prompts `[B, P]` from position 0 and commits the
  first `n_commit[b]` tokens of each row: `(hidden [B, P, D], cache)`, or
  with `feature_taps` (a tuple, possibly empty) the features
  `backbone_features` gives instead of the hidden states.

  A target whose calls may commit at most `model.max_call_tokens` tokens (a
  recurrent state keeps only that many tokens' inputs in scratch,
  `seqdec.models.hybrid`) is fed in chunks of that size, each committed
  before the next (chunked prefill: `lax.scan` over the full chunks, one
  call for the remainder). Other targets take one call.
  """
  b, p = tokens.shape
  step = getattr(model, "max_call_tokens", None)

  def call(cache, toks, start):
    t = toks.shape[1]
    pos = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    if feature_taps is not None:
      hidden, cache = backbone_features(model, toks, pos, cache,
                                        taps=feature_taps)
    else:
      hidden, cache = model.backbone(toks, pos, cache, layers=layers)
    return hidden, model.commit(cache, jnp.clip(n_commit - start, 0, t))

  if step is None or p <= step:
    return call(cache, tokens, jnp.int32(0))
  n_full, rest = divmod(p, step)
  chunks = jnp.moveaxis(tokens[:, :n_full * step].reshape(b, n_full, step),
                        1, 0)
  starts = jnp.arange(n_full, dtype=jnp.int32) * step

  def body(cache, xs):
    hidden, cache = call(cache, *xs)
    return cache, hidden

  cache, hidden = jax.lax.scan(body, cache, (chunks, starts))
  hidden = jnp.moveaxis(hidden, 0, 1).reshape(b, n_full * step, -1)
  if rest:
    last, cache = call(cache, tokens[:, n_full * step:],
                       jnp.int32(n_full * step))
    hidden = jnp.concatenate([hidden, last], axis=1)
  return hidden, cache
