"""Teacher-forced per-rank acceptance of a model drafter (runs the models).

For every position of a target continuation, the drafter's top-K tokens are
compared with the target's distribution there, in one jitted forward of each
model over the whole sequence (`rank_statistics`); averaging gives the
per-rank acceptance rates p_k of `seqdec.decoding.acceptance_rates`, from
which `seqdec.decoding.sequoia` builds optimal trees. Used by
`launch/measure_acceptance.py`.

This is the only Sequoia-related module that imports models and drafters;
the dynamic program and the acceptance files are host code without them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqdec.decoding.drafters.model import ModelDrafter


def window_mask(num_tokens: int) -> np.ndarray:
  """`[T, 2T]` scratch-window mask of the layer-skip teacher-forced pass.

  Window slots 0..T-1 hold the *full* model's K/V of the T tokens (an earlier
  call's scratch), slots T..2T-1 the layer-skip pass's own. Token i sees the
  full model's K/V of tokens j < i and its own: exactly what the layer-skip
  drafter sees when token i is the root (committed K/V come from the
  target's verification; the root is fed through the kept layers).
  """
  t = num_tokens
  m = np.zeros((t, 2 * t), bool)
  m[:, :t] = np.tril(np.ones((t, t), bool), -1)
  m[np.arange(t), t + np.arange(t)] = True
  return m


def _roots(first_root: jax.Array, num_roots: int, length: int) -> jax.Array:
  """`[B, Nr]` root positions first_root + i, clipped to the sequence."""
  return jnp.clip(first_root[:, None] + jnp.arange(num_roots), 0, length - 1)


def _at(hidden: jax.Array, roots: jax.Array) -> jax.Array:
  """`[B, T, D]` hidden states at `[B, Nr]` positions -> `[B, Nr, D]`."""
  return jnp.take_along_axis(hidden, roots[..., None], axis=1)


@functools.partial(jax.jit, static_argnames=("tdef", "shared", "num_roots"))
def target_pass(tdef, tparams, tokens, first_root, *, shared, num_roots):
  """The target's teacher-forced forward: `(cache, logits [B, Nr, V])`.

  The cache (2T slots when a layer-skip drafter will share it, its first T
  holding the target's K/V of every token) feeds `drafter_top`.
  """
  target = nnx.merge(tdef, tparams)
  b, t = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  cache = target.init_cache(b, 2 * t if shared else t)
  hidden, cache = target.backbone(tokens, pos, cache)
  return cache, target.logits(_at(hidden, _roots(first_root, num_roots, t)))


@functools.partial(jax.jit,
                   static_argnames=("tdef", "ddef", "layers", "shared",
                                    "num_roots", "max_rank"))
def drafter_top(tdef, tparams, ddef, dparams, tokens, cache, first_root, *,
                layers, shared, num_roots, max_rank):
  """`[B, Nr, R]` the drafter's top-R tokens at every root.

  A layer-skip drafter (`shared`) runs `layers` of the target over the
  tokens against the target's K/V in `cache` (`window_mask`); an
  independent draft LM (`ddef`, `dparams`) runs causally with its own cache.
  """
  b, t = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if shared:
    model = nnx.merge(tdef, tparams)
    mask = jnp.broadcast_to(jnp.asarray(window_mask(t)), (b, t, 2 * t))
    hidden, _ = model.backbone(tokens, pos, cache, mask, layers=layers,
                               window_positions=pos)
  else:
    model = nnx.merge(ddef, dparams)
    hidden, _ = model.backbone(tokens, pos, model.init_cache(b, t),
                               layers=layers)
  logits = model.logits(_at(hidden, _roots(first_root, num_roots, t)))
  return jax.lax.top_k(logits, max_rank)[1]


@jax.jit
def _scores(t_logits, top, temperature):
  argmax = jnp.argmax(t_logits, -1)                      # [B, Nr]
  hit = (top == argmax[..., None]).astype(jnp.float32)
  probs = jax.nn.softmax(t_logits / jnp.maximum(temperature, 1e-6), -1)
  sampled = jnp.take_along_axis(probs, top, axis=-1)
  return jnp.where(temperature > 0, sampled, hit), argmax


def rank_statistics(target, drafter, tokens: np.ndarray,
                    first_root: np.ndarray, num_roots: int,
                    temperature: float, max_rank: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Teacher-forced per-rank acceptance of a model drafter, per position.

  For each row b and root position t = first_root[b] + i (i < num_roots),
  with x_k the drafter's k-th most likely token after tokens[b, :t+1] (the
  drafter's view when tokens[b, t] is the root of a round) and p the target's
  distribution there:

      T = 0:  s[b, i, k] = 1[x_k = argmax p]      (greedy verification)
      T > 0:  s[b, i, k] = p_T(x_k),  p_T = softmax(logits / T)
              (deterministic children, lossless rule: accept the child equal
              to y ~ p_T, so rank k is the accepted one with prob. p_T(x_k))

  and the acceptance rates are p_k = mean over (b, i) of s[b, i, k]. The
  layer-skip drafter (`drafter.shared_cache`) attends to the full target's
  K/V of the context, as in decoding (`window_mask`); an independent draft
  LM runs causally over the same tokens with its own cache.

  Args:
    target: the target `Transformer`.
    drafter: a `ModelDrafter` of this target (`layer_skip` or `draft_lm`),
      proposing its top-K deterministically (the 'topk' proposal).
    tokens: `[B, T]` int32 prompt + continuation, right-padded.
    first_root: `[B]` int32 first root position (prompt length - 1).
    num_roots: R, roots per row (positions past T - 1 are clipped: the
      caller keeps only valid ones).
    temperature: T >= 0.
    max_rank: K, ranks measured (the drafter's top-K).

  Returns:
    `(s [B, R, K] float32, target argmax [B, R] int32)`.
  """
  if not isinstance(drafter, ModelDrafter):
    raise ValueError(f"teacher-forced rank statistics need a model drafter "
                     f"(layerskip or draft), got {drafter!r}")
  if not 1 <= max_rank <= target.config.vocab_size:
    raise ValueError(f"max_rank must be in [1, {target.config.vocab_size}], "
                     f"got {max_rank}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature > 0 and getattr(drafter, "proposal", "topk") != "topk":
    raise ValueError(f"rank statistics describe deterministic top-K children;"
                     f" drafter {drafter!r} samples its children "
                     f"({drafter.proposal!r}) at temperature > 0")
  if drafter.shared_cache and drafter.config != target.config:
    raise ValueError("a layer-skip drafter must be built from this target")
  tdef, tparams = nnx.split(target)
  ddef, dparams = ((None, None) if drafter.shared_cache
                   else (drafter.graphdef, drafter.params))
  tokens = np.asarray(tokens, np.int32)
  first_root = np.asarray(first_root, np.int32)
  cache, t_logits = target_pass(tdef, tparams, tokens, first_root,
                                shared=drafter.shared_cache,
                                num_roots=int(num_roots))
  top = drafter_top(tdef, tparams, ddef, dparams, tokens, cache, first_root,
                    layers=drafter.layers, shared=drafter.shared_cache,
                    num_roots=int(num_roots), max_rank=int(max_rank))
  s, argmax = _scores(t_logits, top, np.float32(temperature))
  return np.asarray(s), np.asarray(argmax)
