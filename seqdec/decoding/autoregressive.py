"""Autoregressive decoding: a jitted prefill, then a jitted `lax.while_loop`.

Both programs are pure functions of (model state, cache, ...) with the cache
donated; they are compiled ahead of time once per shape bucket
(`DecodeShapes`) and reused, so a new prompt of a known bucket never
recompiles. Prefill and the loop are two executables (not one) so that prefill
time and decode throughput can be measured separately; the cache moves between
them without a copy (donation).

Streaming: when a stream callback is installed, the loop calls it through
`jax.experimental.io_callback(ordered=True)` once per step as
`stream(tokens [B, M], counts [B])` with the tokens just produced (row b's
first counts[b]; M = 1 here, more per step for speculative decoding); the
host turns them into text with `StreamDecoder`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from seqdec.decoding.sampling import Sampler, SamplingParams, step_keys
from seqdec.models.transformer import KVCache, commit, init_cache


def bucket(n: int, minimum: int = 16, step: int = 128) -> int:
  """Padded size for n: a power of two (>= minimum) up to `step`, then the
  next multiple of `step` (padding at most 2x for short, < step for long)."""
  n = max(n, 1)
  if n <= step:
    return max(minimum, 1 << math.ceil(math.log2(n)))
  return -(-n // step) * step


class DecodeShapes(NamedTuple):
  """Static shapes of one compiled decode program (the compile-cache key)."""
  batch: int          # B, rows (padded to a power of two)
  prompt: int         # P, padded prompt length
  new: int            # N, output buffer length (>= every row's max_new)
  num_eos: int        # E, padded stop-id list length

  @property
  def cache_len(self) -> int:
    return self.prompt + self.new


@flax.struct.dataclass
class DecodeState:
  """Loop state of the autoregressive decoder.

  Attributes:
    step: scalar int32, index in `tokens` of the last token written.
    last: `[B]` the last sampled token of each row (fed next).
    tokens: `[B, N]` generated ids (valid up to `num_new`).
    logprobs: `[B, N]` their log-probabilities under the model.
    num_new: `[B]` tokens generated so far per row.
    done: `[B]` row stopped (EOS, max_new reached, or padding row).
    cache: the committed `KVCache`.
  """
  step: jax.Array
  last: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  num_new: jax.Array
  done: jax.Array
  cache: KVCache


def prefill(graphdef, params, tokens: jax.Array, prompt_len: jax.Array,
            cache: KVCache):
  """Runs the padded prompts and commits them.

  Args:
    tokens: `[B, P]` right-padded prompts.
    prompt_len: `[B]` true lengths (>= 1).
    cache: an empty cache with `length == 0`.

  Returns:
    `(logits [B, V] at each row's last prompt token, committed cache)`.
    Padding tokens are written to scratch slots and never committed.
  """
  model = nnx.merge(graphdef, params)
  b, p = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  logits, cache = model(tokens, positions, cache,
                        logit_index=(prompt_len - 1)[:, None])
  return logits[:, 0], commit(cache, prompt_len)


def _record(state: DecodeState, logits, keys, sparams, sampler, max_new,
            eos_ids, stream) -> DecodeState:
  """Samples the next token of every live row and records it at step+1."""
  step = state.step + 1
  tok, logp = sampler(logits, step_keys(keys, step), sparams)
  live = ~state.done
  tok = jnp.where(live, tok, 0)
  if stream is not None:
    io_callback(stream, None, tok[:, None], live.astype(jnp.int32),
                ordered=True)
  tokens = state.tokens.at[:, step].set(jnp.where(live, tok,
                                                  state.tokens[:, step]))
  logprobs = state.logprobs.at[:, step].set(
      jnp.where(live, logp, state.logprobs[:, step]))
  num_new = state.num_new + live.astype(jnp.int32)
  # A row stops when it emits any stop id or reaches its own max_new.
  done = state.done | (live & jnp.isin(tok, eos_ids)) | (num_new >= max_new)
  return state.replace(step=step, last=tok, tokens=tokens, logprobs=logprobs,
                       num_new=num_new, done=done)


def decode_loop(graphdef, sampler: Sampler, stream: Optional[Callable], params,
                first_logits: jax.Array, cache: KVCache, keys: jax.Array,
                sparams: SamplingParams, max_new: jax.Array,
                eos_ids: jax.Array, num_new_buffer: int) -> DecodeState:
  """Samples up to `max_new[b]` tokens per row in one `lax.while_loop`.

  Step 0 samples from the prefill logits; every later step feeds the last
  token at position `cache.length[b]` (T=1), commits it and samples again.

  Args:
    first_logits: `[B, V]` from `prefill`.
    cache: committed prompt cache (donated by the caller's jit).
    keys: `[B]` per-row keys (`sampling.row_keys`).
    sparams: per-row `SamplingParams`.
    max_new: `[B]` int32 per-row budget (0 for padding rows).
    eos_ids: `[E]` stop ids, padded with -1.
    num_new_buffer: N (static), the output buffer length.
  """
  model = nnx.merge(graphdef, params)
  b = first_logits.shape[0]
  state = DecodeState(
      step=jnp.array(-1, jnp.int32), last=jnp.zeros((b,), jnp.int32),
      tokens=jnp.zeros((b, num_new_buffer), jnp.int32),
      logprobs=jnp.zeros((b, num_new_buffer),
                         jnp.promote_types(first_logits.dtype, jnp.float32)),
      num_new=jnp.zeros((b,), jnp.int32), done=max_new <= 0, cache=cache)
  record = functools.partial(_record, keys=keys, sparams=sparams,
                             sampler=sampler, max_new=max_new,
                             eos_ids=eos_ids, stream=stream)
  state = record(state, first_logits)

  def cond(s: DecodeState):
    # Stop when the buffer is full or every row is done.
    return (s.step < num_new_buffer - 1) & ~jnp.all(s.done)

  def body(s: DecodeState):
    positions = s.cache.length[:, None]
    logits, cache = model(s.last[:, None], positions, s.cache)
    # Done rows commit too (harmless: their slots are never read again, and
    # the cache has room for N new tokens per row).
    s = s.replace(cache=commit(cache, jnp.ones_like(s.cache.length)))
    return record(s, logits[:, 0])

  return jax.lax.while_loop(cond, body, state)


class AutoregressiveDecoder:
  """Compiles and runs prefill + decode loop per shape bucket.

  Attributes:
    graphdef, params: the split model (params are never donated).
    compiled: `{(kind, shapes, sampler, streaming): executable}`; its size
      is the number of compilations so far (tests count it).
  """

  def __init__(self, model):
    self.config = model.config
    self.graphdef, self.params = nnx.split(model)
    self.compiled: dict[Any, Any] = {}
    self.compile_seconds = 0.0
    self._stream_target: Optional[Callable] = None

  def _dispatch_stream(self, tokens, counts):
    # A stable callable is traced into the loop; the target changes per run.
    if self._stream_target is not None:
      self._stream_target(np.asarray(tokens), np.asarray(counts))

  def _compile(self, key, fn, *args, donate_argnums=()):
    if key not in self.compiled:
      t0 = time.perf_counter()
      self.compiled[key] = jax.jit(fn, donate_argnums=donate_argnums).lower(
          *args).compile()
      self.compile_seconds += time.perf_counter() - t0
    return self.compiled[key]

  def run(self, shapes: DecodeShapes, tokens: np.ndarray,
          prompt_len: np.ndarray, keys: jax.Array, sparams: SamplingParams,
          max_new: np.ndarray, eos_ids: np.ndarray, sampler: Sampler,
          stream: Optional[Callable] = None, timer=None) -> DecodeState:
    """Runs one bucketed batch (all arrays already padded to `shapes`)."""
    cache = init_cache(self.config, shapes.batch, shapes.cache_len)
    prefill_fn = functools.partial(prefill, self.graphdef)
    pre = self._compile(("prefill", shapes), prefill_fn, self.params, tokens,
                        prompt_len, cache, donate_argnums=(3,))
    self._stream_target = stream
    loop_fn = functools.partial(
        decode_loop, self.graphdef, sampler,
        self._dispatch_stream if stream else None, num_new_buffer=shapes.new)
    key = ("loop", shapes, sampler, stream is not None)
    if key not in self.compiled:
      logits_shape, cache_shape = jax.eval_shape(prefill_fn, self.params,
                                                 tokens, prompt_len, cache)
      self._compile(key, loop_fn, self.params, logits_shape, cache_shape,
                    keys, sparams, max_new, eos_ids, donate_argnums=(2,))
    loop = self.compiled[key]
    # Both programs are compiled before the clock starts.
    if timer:
      timer("prefill_start")
    logits, cache = pre(self.params, tokens, prompt_len, cache)
    if timer:
      jax.block_until_ready(logits)
      timer("prefill_end")
    state = loop(self.params, logits, cache, keys, sparams, max_new, eos_ids)
    if timer:
      jax.block_until_ready(state.tokens)
      timer("decode_end")
    return state
