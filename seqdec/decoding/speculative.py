"""Speculative decoding: draft a token tree, verify it, commit the accepted
path, in one jitted `lax.while_loop`, batched, every row at its own pace.

One round, per row b with committed target length L_b and root r_b (the last
accepted token, position L_b, K/V not yet cached):

    tree   = drafter.propose(...)                  N nodes, node 0 = r_b
    logits = target(tree.tokens, L_b + depth, cache, ancestor mask)
    acc    = rule(tree, logits)                    path root..node, D_b drafts
    emit     the D_b accepted drafts + 1 bonus token, cut after the first
             stop id and at the row's budget: c_b tokens (c_b >= 1)
    commit   path[0 .. c_b - 1] to the target cache (a gather of their K/V),
             so L_b += c_b; the drafter commits or rolls back likewise;
             the new root is the last emitted token.

Each row commits its own c_b: a row that accepts 4 drafts is not held back
by a row that accepted none. Rows that are done stop writing and committing
(their compute is wasted, as in any static-shape batch). Greedy verification
makes the output identical to greedy autoregressive decoding.

Programs: `prefill` (target prefill, first token, drafter init) and `loop`
are compiled ahead of time per (shape bucket, drafter, tree, rule) and reuse
`AutoregressiveDecoder`'s cache of executables; caches and drafter state are
donated. The round's three phases (`draft`, `verify`, `finish`) are separate
functions so that `PhaseTimer` can time them one by one for benchmarks.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from seqdec.decoding import tree_specs
from seqdec.decoding.autoregressive import (AutoregressiveDecoder,
                                            DecodeShapes, prefill)
from seqdec.decoding.drafters.base import Drafter, Outcome, Round
from seqdec.decoding.sampling import Sampler, SamplingParams, step_keys
from seqdec.decoding.trees import Tree, TreeError, TreeShape
from seqdec.decoding.verify import (Acceptance, Greedy, Rule, make_rule,
                                    needs_greedy)
from seqdec.models.transformer import KVCache, commit, init_cache
from seqdec.ops import write_rows


@flax.struct.dataclass
class SpecState:
  """Loop state (M = max tree depth + 1, NB = output buffer length).

  Attributes:
    step: scalar int32, rounds run so far (target calls of the batch).
    root: `[B]` last emitted token (not in the target cache).
    prev: `[B]` token before it (the last committed one).
    tokens: `[B, NB + M]` generated ids (valid up to `num_new`).
    logprobs: `[B, NB + M]` their log-probabilities under the target.
    num_new: `[B]` tokens generated so far.
    done: `[B]` row stopped.
    cache: the target `KVCache`.
    draft: the drafter's state.
    accept_hist: `[B, M]` rounds in which the row was live, by number of
      accepted drafts D (0 .. M-1); its row sums are the rows' target calls.
  """
  step: jax.Array
  root: jax.Array
  prev: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  num_new: jax.Array
  done: jax.Array
  cache: KVCache
  draft: Any
  accept_hist: jax.Array


def spec_prefill(graphdef, drafter: Drafter, sampler: Sampler, capacity: int,
                 params, draft_params, tokens, prompt_len, cache, keys,
                 sparams):
  """Target prefill, the first token, and the drafter's initial state.

  Returns `(first [B], first_logprob [B], cache, draft_state)`.
  """
  logits, cache = prefill(graphdef, params, tokens, prompt_len, cache)
  first, logp = sampler(logits, step_keys(keys, 0), sparams)
  draft = drafter.init(draft_params, tokens, prompt_len, first, capacity,
                       cache)
  return first, logp, cache, draft


def draft_temperature(rule: Rule, sparams: SamplingParams):
  """Rows' temperatures as drafters see them: None under greedy verification
  (which serves temperature 0 only), so drafters propose deterministically."""
  return None if isinstance(rule, Greedy) else sparams.temperature


def draft(drafter: Drafter, shape: TreeShape, draft_params, s: SpecState,
          keys, temperature=None) -> tuple[Tree, Round, Any, KVCache]:
  """Phase 1: the drafter proposes a tree under each row's root.

  `temperature` `[B]` (None: all rows greedy) tells sampling drafters which
  rows draw their children from q. The drafter gets the round's step key;
  the rule folds its own tag into the same key (`verify._VERIFY_TAG`), so
  the draws that built the tree and the ones that verify it are independent.
  """
  rnd = Round(root=s.root, prev=s.prev, length=s.cache.length, live=~s.done,
              temperature=temperature)
  tree, dstate, cache = drafter.propose(
      draft_params, s.draft, shape, rnd, s.cache,
      step_keys(keys, s.step + 1))
  return tree, rnd, dstate, cache


def verify(graphdef, rule: Rule, max_depth: int, params, tree: Tree,
           cache: KVCache, keys, sparams, step) -> tuple[Acceptance, KVCache]:
  """Phase 2: one target forward over the tree; the rule accepts a path.

  When no row has a valid draft node (e.g. prompt lookup found nothing), the
  forward runs over the roots alone (T = 1, an autoregressive step's cost)
  instead of the whole tree; the other nodes get zero logits, which no rule
  reads since invalid nodes are never accepted.
  """
  model = nnx.merge(graphdef, params)
  positions = cache.length[:, None] + tree.depth

  def whole_tree(cache):
    return model(tree.tokens, positions, cache, tree.mask)

  def roots_only(cache):
    logits, cache = model(tree.tokens[:, :1], positions[:, :1], cache,
                          tree.mask[:, :1, :1])
    pad = jnp.zeros((logits.shape[0], tree.tokens.shape[1] - 1,
                     logits.shape[2]), logits.dtype)
    return jnp.concatenate([logits, pad], axis=1), cache

  if tree.tokens.shape[1] == 1:
    logits, cache = roots_only(cache)
  else:
    logits, cache = jax.lax.cond(jnp.any(tree.valid[:, 1:]), whole_tree,
                                 roots_only, cache)
  acc = rule(tree, logits, step_keys(keys, step + 1), sparams, max_depth)
  return acc, cache


def finish(drafter: Drafter, shape: TreeShape, draft_params, s: SpecState,
           tree: Tree, rnd: Round, acc: Acceptance, dstate, cache: KVCache,
           max_new, eos_ids, stream) -> SpecState:
  """Phase 3: truncate at stop ids and budgets, record, commit both caches.

      c = min(D + 1, (index of the first stop id among the emitted) + 1,
              max_new - num_new)          (0 for rows already done)
  """
  m = acc.tokens.shape[1]
  live = ~s.done
  j = jnp.arange(m, dtype=jnp.int32)
  emitted = j[None] <= acc.num_accepted[:, None]
  stop = emitted & jnp.isin(acc.tokens, eos_ids)
  first_stop = jnp.where(stop.any(1), jnp.argmax(stop, 1), m)
  c = jnp.minimum(jnp.minimum(acc.num_accepted + 1, first_stop + 1),
                  max_new - s.num_new)
  c = jnp.where(live, jnp.maximum(c, 0), 0).astype(jnp.int32)
  keep = j[None] < c[:, None]
  if stream is not None:
    io_callback(stream, None, acc.tokens, c, ordered=True)
  tokens = write_rows(s.tokens, jnp.where(keep, acc.tokens, 0), s.num_new)
  logprobs = write_rows(s.logprobs, jnp.where(keep, acc.logprobs, 0.0),
                        s.num_new)
  num_new = s.num_new + c
  done = s.done | (live & (stop & keep).any(1)) | (num_new >= max_new)
  cache = commit(cache, c, acc.path)
  outcome = Outcome(path=acc.path, num_kept=c, tokens=acc.tokens)
  dstate = drafter.commit(draft_params, dstate, shape, rnd, outcome)
  last = jnp.maximum(c - 1, 0)[:, None]
  root = jnp.where(c > 0, jnp.take_along_axis(acc.tokens, last, 1)[:, 0],
                   s.root)
  last_node = jnp.take_along_axis(acc.path, last, 1)
  prev = jnp.where(c > 0, jnp.take_along_axis(tree.tokens, last_node, 1)[:, 0],
                   s.prev)
  hist = s.accept_hist + (live[:, None] & (j[None] == acc.num_accepted[:, None]))
  return s.replace(step=s.step + 1, root=root, prev=prev, tokens=tokens,
                   logprobs=logprobs, num_new=num_new, done=done, cache=cache,
                   draft=dstate, accept_hist=hist)


def initial_state(first, first_logp, prompt_last, cache, dstate, max_new,
                  eos_ids, num_new_buffer: int, max_depth: int) -> SpecState:
  """The state after the first token (sampled from the prefill logits)."""
  b, m = first.shape[0], max_depth + 1
  live = max_new > 0
  tokens = jnp.zeros((b, num_new_buffer + m), jnp.int32).at[:, 0].set(first)
  logprobs = jnp.zeros((b, num_new_buffer + m), first_logp.dtype)
  logprobs = logprobs.at[:, 0].set(first_logp)
  num_new = live.astype(jnp.int32)
  done = ~live | jnp.isin(first, eos_ids) | (num_new >= max_new)
  return SpecState(step=jnp.array(0, jnp.int32), root=first, prev=prompt_last,
                   tokens=tokens, logprobs=logprobs, num_new=num_new,
                   done=done, cache=cache, draft=dstate,
                   accept_hist=jnp.zeros((b, m), jnp.int32))


def spec_loop(graphdef, drafter: Drafter, rule: Rule, shape: TreeShape,
              stream: Optional[Callable], num_new_buffer: int, params,
              draft_params, first, first_logp, prompt_last, cache, dstate,
              keys, sparams: SamplingParams, max_new, eos_ids) -> SpecState:
  """Rounds until every row is done, in one `lax.while_loop`.

  Args:
    first, first_logp: `[B]` from `spec_prefill`.
    prompt_last: `[B]` each prompt's last token.
    cache, dstate: target cache and drafter state (donated by the caller).
    keys: `[B]` per-row keys; sparams: per-row sampling parameters.
    max_new: `[B]` budgets (0 for padding rows); eos_ids: `[E]` (-1 padded).
    num_new_buffer: NB (static).
  """
  s = initial_state(first, first_logp, prompt_last, cache, dstate, max_new,
                    eos_ids, num_new_buffer, shape.max_depth)
  if stream is not None:
    io_callback(stream, None, first[:, None], s.num_new, ordered=True)
  temperature = draft_temperature(rule, sparams)

  def cond(s: SpecState):
    return (s.step < num_new_buffer) & ~jnp.all(s.done)

  def body(s: SpecState):
    tree, rnd, dstate, cache = draft(drafter, shape, draft_params, s, keys,
                                     temperature)
    acc, cache = verify(graphdef, rule, shape.max_depth, params, tree, cache,
                        keys, sparams, s.step)
    return finish(drafter, shape, draft_params, s, tree, rnd, acc, dstate,
                  cache, max_new, eos_ids, stream)

  return jax.lax.while_loop(cond, body, s)


class SpeculativeDecoder(AutoregressiveDecoder):
  """Compiles and runs speculative prefill + loop per shape bucket.

  Same `run` interface as `AutoregressiveDecoder`, so `Generator` drives
  either. The returned `SpecState` adds the per-row `accept_hist`.

  Args:
    model: the target `Transformer`.
    drafter: a `Drafter` (see `seqdec.decoding.drafters`).
    tree: a `TreeShape` or a spec string ('chain4', 'kary2x2', 'static10').
    rule: acceptance rule name or `Rule` ('greedy').
  """

  def __init__(self, model, drafter: Drafter, tree="chain4", rule="greedy"):
    super().__init__(model)
    self.shape = tree_specs.parse(tree) if isinstance(tree, str) else tree
    self.rule = make_rule(rule) if isinstance(rule, str) else rule
    self.drafter = drafter
    drafter.check(model.config, self.shape)

  def capacity(self, shapes: DecodeShapes) -> int:
    """Slots a row may touch: prompt, new tokens, a tree's scratch, one lag."""
    return shapes.cache_len + self.shape.num_nodes + 1

  def check_fits(self, prompt_len: int, max_new: int, context: int) -> None:
    """Raises `TreeError` if the tree's deepest position can pass `context`.

    The last round starts at length <= prompt_len + max_new - 2 and reaches
    max_depth beyond it.
    """
    deepest = prompt_len + max_new - 2 + self.shape.max_depth
    if deepest >= context:
      raise TreeError(
          f"a tree of depth {self.shape.max_depth} after a {prompt_len}-token "
          f"prompt and max_new_tokens={max_new} reaches position {deepest}, "
          f"beyond the context of {context} tokens; shorten the prompt, "
          f"lower max_new_tokens or use a shallower tree")

  def programs(self, shapes: DecodeShapes, sampler: Sampler, streaming: bool):
    """`(prefill_fn, loop_fn)` partials (static arguments bound)."""
    pre = functools.partial(spec_prefill, self.graphdef, self.drafter, sampler,
                            self.capacity(shapes))
    loop = functools.partial(
        spec_loop, self.graphdef, self.drafter, self.rule, self.shape,
        self._dispatch_stream if streaming else None, shapes.new)
    return pre, loop

  def run(self, shapes: DecodeShapes, tokens: np.ndarray,
          prompt_len: np.ndarray, keys: jax.Array, sparams: SamplingParams,
          max_new: np.ndarray, eos_ids: np.ndarray, sampler: Sampler,
          stream: Optional[Callable] = None, timer=None) -> SpecState:
    """Runs one bucketed batch (all arrays already padded to `shapes`)."""
    error = needs_greedy(self.rule, sparams.temperature)
    if error:
      raise ValueError(error)
    cache = init_cache(self.config, shapes.batch, self.capacity(shapes))
    dparams = self.drafter.params
    prompt_last = jnp.asarray(np.take_along_axis(
        np.asarray(tokens), np.asarray(prompt_len)[:, None] - 1, 1)[:, 0])
    pre_fn, loop_fn = self.programs(shapes, sampler, stream is not None)
    key = (self.drafter, self.shape, self.rule)
    pre = self._compile(("spec_prefill", shapes, sampler) + key, pre_fn,
                        self.params, dparams, tokens, prompt_len, cache, keys,
                        sparams, donate_argnums=(4,))
    loop_key = ("spec_loop", shapes, sampler, stream is not None) + key
    if loop_key not in self.compiled:
      out = jax.eval_shape(pre_fn, self.params, dparams, tokens, prompt_len,
                           cache, keys, sparams)
      self._compile(loop_key, loop_fn, self.params, dparams, out[0], out[1],
                    prompt_last, out[2], out[3], keys, sparams, max_new,
                    eos_ids, donate_argnums=(5, 6))
    loop = self.compiled[loop_key]
    self._stream_target = stream
    if timer:
      timer("prefill_start")
    first, logp, cache, dstate = pre(self.params, dparams, tokens, prompt_len,
                                     cache, keys, sparams)
    if timer:
      jax.block_until_ready(first)
      timer("prefill_end")
    state = loop(self.params, dparams, first, logp, prompt_last, cache, dstate,
                 keys, sparams, max_new, eos_ids)
    if timer:
      jax.block_until_ready(state.tokens)
      timer("decode_end")
    return state


class PhaseTimer:
  """Runs the speculative loop from the host, one jitted phase at a time, to
  split wall-clock into draft / verify / finish (benchmarks only: the real
  loop is one program and has no host round trips).

  `run(...)` takes the arguments of `SpeculativeDecoder.run` (without
  stream/timer) and returns `(state, seconds dict)`.
  """

  def __init__(self, decoder: SpeculativeDecoder):
    self.d = decoder
    d = decoder
    self._draft = jax.jit(functools.partial(draft, d.drafter, d.shape))
    self._verify = jax.jit(functools.partial(verify, d.graphdef, d.rule,
                                             d.shape.max_depth))
    self._finish = jax.jit(functools.partial(finish, d.drafter, d.shape,
                                             stream=None))
    self._initial = jax.jit(initial_state, static_argnums=(7, 8))
    self._prefill = {}   # (shapes, sampler) -> jitted prefill

  def run(self, shapes, tokens, prompt_len, keys, sparams, max_new, eos_ids,
          sampler):
    d = self.d
    cache = init_cache(d.config, shapes.batch, d.capacity(shapes))
    if (shapes, sampler) not in self._prefill:
      self._prefill[shapes, sampler] = jax.jit(
          d.programs(shapes, sampler, False)[0])
    first, logp, cache, dstate = self._prefill[shapes, sampler](
        d.params, d.drafter.params, tokens, prompt_len, cache, keys, sparams)
    prompt_last = jnp.asarray(np.take_along_axis(
        np.asarray(tokens), np.asarray(prompt_len)[:, None] - 1, 1)[:, 0])
    s = self._initial(
        first, logp, prompt_last, cache, dstate, jnp.asarray(max_new),
        jnp.asarray(eos_ids), shapes.new, d.shape.max_depth)
    seconds = {"draft": 0.0, "verify": 0.0, "finish": 0.0}
    timed_rounds = 0
    while int(s.step) < shapes.new and not bool(jnp.all(s.done)):
      warm = int(s.step) > 0  # the first round compiles
      t0 = time.perf_counter()
      tree, rnd, dstate, cache = jax.block_until_ready(
          self._draft(d.drafter.params, s, keys,
                      draft_temperature(d.rule, sparams)))
      t1 = time.perf_counter()
      acc, cache = jax.block_until_ready(self._verify(
          d.params, tree, cache, keys, sparams, s.step))
      t2 = time.perf_counter()
      s = jax.block_until_ready(self._finish(
          d.drafter.params, s, tree, rnd, acc, dstate, cache,
          jnp.asarray(max_new), jnp.asarray(eos_ids)))
      t3 = time.perf_counter()
      if warm:
        timed_rounds += 1
        seconds["draft"] += t1 - t0
        seconds["verify"] += t2 - t1
        seconds["finish"] += t3 - t2
    seconds["rounds"] = timed_rounds
    return s, seconds
