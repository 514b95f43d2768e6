"""Autoregressive decoding as a decoder object (`seqdec.decoding.loops`).

    prefill:  run the padded prompts, commit them, sample token 0
    step:     feed each row's last token at position length[b] (T = 1),
              commit it, sample the next

`prefill` is shared with the speculative loop. The target is reached only
through the target protocol (`seqdec.models.protocol.Target`): `init_cache`,
`__call__` and `commit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from seqdec.decoding.loops import DecodeShapes, Inputs, LoopMixin
from seqdec.decoding.sampling import Sampler, step_keys
from seqdec.models.protocol import head_input, run_prompt


def prefill(model, tokens: jax.Array, prompt_len: jax.Array,
            capacity: int) -> tuple[jax.Array, Any]:
  """Runs the padded prompts into a fresh cache and commits them.

  Args:
    model: the target (target protocol).
    tokens: `[B, P]` right-padded prompts.
    prompt_len: `[B]` true lengths (>= 1).
    capacity: S, cache slots per row.

  Returns:
    `(logits [B, V] at each row's last prompt token, committed cache)`.
    Padding tokens are written to scratch slots and never committed; a
    recurrent target is fed in chunks (`protocol.run_prompt`).
  """
  hidden, cache = run_prompt(model, tokens,
                             model.init_cache(tokens.shape[0], capacity),
                             prompt_len)
  last = jnp.take_along_axis(hidden, (prompt_len - 1)[:, None, None], 1)
  return model.logits(last[:, 0]), cache


def prefill_features(model, tokens: jax.Array, prompt_len: jax.Array,
                     capacity: int, taps: Sequence[int] = ()
                     ) -> tuple[jax.Array, jax.Array, Any]:
  """`prefill` that also returns the prompt's features `[B, P, D]`
  (`model.features`, the LM head's input), or with `taps` the fused
  `[B, P, (len(taps) + 1) D]` (`protocol.backbone_features`), for
  feature-reading drafters: `(logits [B, V], features, committed cache)`."""
  features, cache = run_prompt(model, tokens,
                               model.init_cache(tokens.shape[0], capacity),
                               prompt_len, feature_taps=tuple(taps))
  last = jnp.take_along_axis(head_input(features, taps),
                             (prompt_len - 1)[:, None, None], 1)
  return model.head(last[:, 0]), features, cache


def top2_margin(logits: jax.Array) -> jax.Array:
  """`[..., V] -> [...]`: logits[top-1] - logits[top-2], the distance of the
  greedy choice from a tie (float32 token-equality checks skip positions
  where it is tiny, CONTRIBUTING.md)."""
  x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  # Plain max-reductions, not lax.top_k (XLA:CPU lowers top_k inside a loop
  # to a full sort of the V logits, milliseconds per row at V = 49k) nor
  # argmax (a pair reduction it does not vectorise): the runner-up is the
  # max over the other entries, or the max itself when it is tied.
  first = jnp.max(x, axis=-1)
  at_max = x == first[..., None]
  second = jnp.max(jnp.where(at_max, -jnp.inf, x), axis=-1)
  tied = jnp.sum(at_max, axis=-1) > 1
  return first - jnp.where(tied, first, second)


@flax.struct.dataclass
class DecodeState:
  """Loop state of the autoregressive decoder.

  Attributes:
    step: scalar int32, index in `tokens` of the last token written.
    last: `[B]` the last sampled token of each row (fed next).
    tokens: `[B, NB]` generated ids (valid up to `num_new`).
    logprobs: `[B, NB]` their log-probabilities under the model.
    margins: `[B, NB]` top-1 minus top-2 raw logit where each was chosen
      (`top2_margin`).
    num_new: `[B]` tokens generated so far per row.
    done: `[B]` row stopped (EOS, max_new reached, or padding row).
    cache: the committed target cache.
  """
  step: jax.Array
  last: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  margins: jax.Array
  num_new: jax.Array
  done: jax.Array
  cache: Any


@dataclasses.dataclass(frozen=True)
class AutoregressiveLoop(LoopMixin):
  """Autoregressive decoding (`Decoder` protocol).

  Attributes:
    target: the target's `nnx.GraphDef` (params come in `params[0]`).
    sampler: the static sampling chain.
    shapes: the shape bucket.
  """
  target: Any
  sampler: Sampler
  shapes: DecodeShapes

  def _record(self, state: DecodeState, logits: jax.Array,
              inputs: Inputs) -> DecodeState:
    """Samples the next token of every live row and records it at step+1."""
    step = state.step + 1
    tok, logp = self.sampler(logits, step_keys(inputs.keys, step),
                             inputs.sparams)
    live = ~state.done
    tok = jnp.where(live, tok, 0)
    tokens = state.tokens.at[:, step].set(
        jnp.where(live, tok, state.tokens[:, step]))
    logprobs = state.logprobs.at[:, step].set(
        jnp.where(live, logp, state.logprobs[:, step]))
    margins = state.margins.at[:, step].set(
        jnp.where(live, top2_margin(logits), state.margins[:, step]))
    num_new = state.num_new + live.astype(jnp.int32)
    # A row stops when it emits any stop id or reaches its own max_new.
    done = (state.done | (live & jnp.isin(tok, inputs.eos_ids))
            | (num_new >= inputs.max_new))
    return state.replace(step=step, last=tok, tokens=tokens, logprobs=logprobs,
                         margins=margins, num_new=num_new, done=done)

  def prefill(self, *, params, inputs: Inputs) -> DecodeState:
    """Prompt prefill and the first token (step 0)."""
    model = nnx.merge(self.target, params[0])
    logits, cache = prefill(model, inputs.tokens, inputs.prompt_len,
                            self.shapes.cache_len)
    b, nb = logits.shape[0], self.shapes.new
    acc = jnp.promote_types(logits.dtype, jnp.float32)
    state = DecodeState(
        step=jnp.array(-1, jnp.int32), last=jnp.zeros((b,), jnp.int32),
        tokens=jnp.zeros((b, nb), jnp.int32),
        logprobs=jnp.zeros((b, nb), acc), margins=jnp.zeros((b, nb), acc),
        num_new=jnp.zeros((b,), jnp.int32), done=inputs.max_new <= 0,
        cache=cache)
    return self._record(state, logits, inputs)

  def step(self, *, params, state: DecodeState,
           inputs: Inputs) -> DecodeState:
    """Feeds the last tokens (T = 1), commits them, samples the next."""
    model = nnx.merge(self.target, params[0])
    positions = state.cache.length[:, None]
    logits, cache = model(state.last[:, None], positions, state.cache)
    # Done rows commit too (harmless: their slots are never read again, and
    # the cache has room for NB new tokens per row).
    state = state.replace(cache=model.commit(
        cache, jnp.ones_like(state.cache.length)))
    return self._record(state, logits[:, 0], inputs)

  def live(self, state: DecodeState) -> jax.Array:
    """The buffer has room and some row is not done."""
    return (state.step < self.shapes.new - 1) & ~jnp.all(state.done)
