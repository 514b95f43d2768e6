"""Speculative decoding as a decoder object: draft a token tree, verify it,
commit the accepted path, batched, every row at its own pace.

One round (`SpecLoop.step`), per row b with committed target length L_b and
root r_b (the last accepted token, position L_b, K/V not yet cached):

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
(their compute is wasted, as in any static-shape batch). Greedy
verification makes the output identical to greedy autoregressive decoding.

The round's three phases are methods (`draft`, `verify`, `finish`) so that
`loops.HostLoop(phases=True)` can time them one by one; `step` composes
them and `decode` runs `step` in a `lax.while_loop` (`loops.LoopMixin`).
The target is reached only through the target protocol
(`seqdec.models.protocol.Target`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from seqdec.decoding import budget as budget_lib
from seqdec.decoding.autoregressive import prefill, prefill_features
from seqdec.decoding.autoregressive import top2_margin
from seqdec.ops import write_rows
from seqdec.decoding.drafters.base import Drafter, Outcome, Round
from seqdec.decoding.loops import DecodeShapes, Inputs, LoopMixin
from seqdec.decoding.sampling import Sampler, step_keys
from seqdec.decoding.trees import Tree, TreeShape
from seqdec.decoding.verify import Greedy, along_path
from seqdec.errors import TreeError
from seqdec.models.protocol import (backbone_features, defers_writes,
                                    head_input)
from seqdec.models.transformer import KVCache


@flax.struct.dataclass
class SpecState:
  """Loop state (M = max tree depth + 1, NB = output buffer length).

  Attributes:
    step: scalar int32, rounds run so far (target calls of the batch).
    root: `[B]` last emitted token (not in the target cache).
    prev: `[B]` token before it (the last committed one).
    tokens: `[B, NB + M]` generated ids (valid up to `num_new`).
    logprobs: `[B, NB + M]` their log-probabilities under the target.
    margins: `[B, NB + M]` the target's top-1 minus top-2 logit where each
      was chosen (`autoregressive.top2_margin`).
    num_new: `[B]` tokens generated so far.
    done: `[B]` row stopped.
    cache: the target cache.
    draft: the drafter's state.
    accept_hist: `[B, M]` rounds in which the row was live, by number of
      accepted drafts D (0 .. M-1); its row sums are the rows' target calls.
    drafted: `[B]` rounds in which the row was live and had a draft node to
      verify (not an n-gram miss, not gated off: `SpecLoop.gate`).
    width_rounds: `[J]` rounds of the batch verified at each of
      `SpecLoop.verify_widths`.
  """
  step: jax.Array
  root: jax.Array
  prev: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  margins: jax.Array
  num_new: jax.Array
  done: jax.Array
  cache: Any
  draft: Any
  accept_hist: jax.Array
  drafted: jax.Array
  width_rounds: jax.Array


@flax.struct.dataclass
class Drafted:
  """Phase 1's output: the tree, the round's view, the drafter's state and
  the target cache (whose scratch slots a self-drafter may have written)."""
  tree: Tree
  rnd: Round
  dstate: Any
  cache: Any


@flax.struct.dataclass
class Verified:
  """Phase 2's output: the rule's verdict, the target's top-2 margins at
  the accepted path's nodes `[B, M]`, the cache holding the tree's K/V
  in scratch, and the target's features at the tree nodes `[B, N, D]` (None
  unless the drafter `uses_features`)."""
  verdict: Any
  margins: jax.Array
  cache: Any
  features: Any = None


def check_fits(tree: TreeShape, prompt_len: int, max_new: int,
               context: int) -> None:
  """Raises `TreeError` if the tree's deepest position can pass `context`.

  The last round starts at length <= prompt_len + max_new - 2 and reaches
  max_depth beyond it.
  """
  deepest = prompt_len + max_new - 2 + tree.max_depth
  if deepest >= context:
    raise TreeError(
        f"a tree of depth {tree.max_depth} after a {prompt_len}-token "
        f"prompt and max_new_tokens={max_new} reaches position {deepest}, "
        f"beyond the context of {context} tokens; shorten the prompt, "
        f"lower max_new_tokens or use a shallower tree")


def check_window(model, shape: TreeShape) -> None:
  """Raises `TreeError` if the target cannot hold a tree of `shape`'s nodes
  in one scratch window (a recurrent target's state buffer,
  `protocol.Target.check_window`)."""
  check = getattr(model, "check_window", None)
  if check is None:
    return
  try:
    check(shape.num_nodes)
  except ValueError as e:
    raise TreeError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class SpecLoop(LoopMixin):
  """Speculative decoding (`loops.Decoder` protocol).

  Attributes:
    target: the target's `nnx.GraphDef` (params in `params[0]`).
    drafter: a `Drafter` (weights in `params[1]`).
    tree: the static `TreeShape` drafted every round.
    rule: the acceptance rule (`verify.make_rule`).
    sampler: the sampler of the first token (from the prefill logits).
    shapes: the shape bucket.
    gate: speculate only when it pays: a row whose drafts the drafter expects
      to accept fewer than `gate` of (`Tree.gated`: rows with deterministic
      children only, which keeps every rule lossless) verifies its root alone
      that round, and when no row speculates the verify is one decoding step
      (`verify`, with `root_fallback`); 0 never gates. A threshold of verify(N) / verify(1) - 1
      is the break-even of an N-node tree
      (`host_profile.HostProfile.break_even`).
    root_fallback: when no row has a draft node, verify the roots alone
      (a T = 1 forward, an autoregressive step's cost); compiled only when
      that can happen (`roots_only_rounds`).
    budget: a `budget.WidthBudget` ladder ending at the tree's N, or None:
      each round verifies only the tree's first w* slots, the width whose
      expected accepted drafts best repay its measured cost
      (`seqdec.decoding.budget`).

  Verify widths (`verify_widths`): the tree's N, 1 for root-only rounds,
  the budget's ladder and the tree's own (`trees.WithLookup`: the base
  tree's slots); each round runs the forward of the smallest one
  holding every live row's valid nodes (`budget.width_index`). In `decode`
  the rounds of each width run in their own nested loop (`decode`), so each
  forward writes the cache in place. A lone `step` (the host loop) chooses
  with a `lax.switch` among the widths' forwards; a target with deferred
  writes (`protocol.defers_writes`: the transformer) runs the branches
  reading the cache only and writes the new K/V after the switch, in place;
  otherwise each branch copies every cache buffer (XLA:CPU does not update
  a conditional's operands in place), which costs about what a narrower
  forward saves.
  """
  target: Any
  drafter: Drafter
  tree: TreeShape
  rule: Any
  sampler: Sampler
  shapes: DecodeShapes
  gate: float = 0.0
  root_fallback: bool = True
  budget: Optional[budget_lib.WidthBudget] = None

  def __post_init__(self):
    if self.budget is not None:
      self.budget.fitted(self.tree.num_nodes)

  @property
  def roots_only_rounds(self) -> bool:
    """Whether a round can have no draft node in any row (`root_fallback`
    on, a tree with drafts, and a gate, a budget or a drafter that may
    propose nothing): only then does the loop compile root-only rounds."""
    return (self.root_fallback and self.tree.num_nodes > 1
            and (self.gate > 0 or self.budget is not None
                 or self.drafter.may_propose_nothing))

  @property
  def verify_widths(self) -> tuple[int, ...]:
    """The ascending forward widths a round may verify at (class
    docstring), the last the tree's N."""
    n = self.tree.num_nodes
    widths = {n} | set(self.budget.widths if self.budget else ())
    widths |= set(getattr(self.tree, "verify_widths", ()))   # `WithLookup`
    if self.roots_only_rounds:
      widths.add(1)
    elif n > 1 and not self.root_fallback:
      widths.discard(1)
    return tuple(sorted(widths))

  def width_index(self, tree: Tree, done: jax.Array) -> jax.Array:
    """`[]` int32: which of `verify_widths` a round of `tree` runs."""
    return budget_lib.width_index(self.verify_widths, tree, ~done)

  @property
  def capacity(self) -> int:
    """Slots a row may touch: prompt, new tokens, a tree's scratch, one lag."""
    return self.shapes.cache_len + self.tree.num_nodes + 1

  @property
  def max_depth(self) -> int:
    return self.tree.max_depth

  def prefill(self, *, params, inputs: Inputs) -> SpecState:
    """Target prefill, the first token, the drafter's initial state."""
    model = nnx.merge(self.target, params[0])
    extra = {}
    if self.drafter.uses_features:
      logits, extra["features"], cache = prefill_features(
          model, inputs.tokens, inputs.prompt_len, self.capacity,
          self.drafter.feature_taps)
    else:
      logits, cache = prefill(model, inputs.tokens, inputs.prompt_len,
                              self.capacity)
    first, first_logp = self.sampler(logits, step_keys(inputs.keys, 0),
                                     inputs.sparams)
    dstate = self.drafter.init(
        params[1], inputs.tokens, inputs.prompt_len, first,
        self.capacity + self.drafter.window_slots(self.tree), cache, **extra)
    b, m, nb = first.shape[0], self.max_depth + 1, self.shapes.new
    live = inputs.max_new > 0
    tokens = jnp.zeros((b, nb + m), jnp.int32).at[:, 0].set(first)
    logprobs = jnp.zeros((b, nb + m), first_logp.dtype)
    logprobs = logprobs.at[:, 0].set(first_logp)
    margins = jnp.zeros((b, nb + m), first_logp.dtype).at[:, 0].set(
        top2_margin(logits))
    num_new = live.astype(jnp.int32)
    done = (~live | jnp.isin(first, inputs.eos_ids)
            | (num_new >= inputs.max_new))
    return SpecState(step=jnp.array(0, jnp.int32), root=first,
                     prev=inputs.prompt_last, tokens=tokens,
                     logprobs=logprobs, margins=margins, num_new=num_new,
                     done=done,
                     cache=cache, draft=dstate,
                     accept_hist=jnp.zeros((b, m), jnp.int32),
                     drafted=jnp.zeros((b,), jnp.int32),
                     width_rounds=jnp.zeros((len(self.verify_widths),),
                                            jnp.int32))

  def draft(self, *, params, state: SpecState, inputs: Inputs) -> Drafted:
    """Phase 1: the drafter proposes a tree under each row's root.

    Under greedy verification (temperature 0 only) the drafter sees no
    temperatures and proposes deterministically. The drafter gets the
    round's step key; the rule folds its own tag into the same key
    (`verify._VERIFY_TAG`), so the draws that built the tree and the ones
    that verify it are independent.
    """
    temperature = (None if isinstance(self.rule, Greedy)
                   else inputs.sparams.temperature)
    rnd = Round(root=state.root, prev=state.prev, length=state.cache.length,
                live=~state.done, temperature=temperature)
    tree, dstate, cache = self.drafter.propose(
        params[1], state.draft, self.tree, rnd, state.cache,
        step_keys(inputs.keys, state.step + 1))
    if self.gate > 0:
      tree, _ = tree.gated(self.gate)
    if self.budget is not None:
      tree, _ = self.budget.apply(tree, rnd.live, rnd.length)
    return Drafted(tree=tree, rnd=rnd, dstate=dstate, cache=cache)

  def verify(self, *, params, state: SpecState, inputs: Inputs,
             draft: Drafted, width: Any = "auto") -> Verified:
    """Phase 2: one target forward over the tree; the rule accepts a path.

    `width` says which forward runs: an int w of `verify_widths` runs it
    over the tree's first w slots and the rule sees that w-node tree (the
    caller knows no live row has a valid node beyond them: `width_index`);
    'auto' chooses on device among `verify_widths` (`lax.switch`; the
    slots beyond the chosen width get zero logits, which no rule reads
    since they are invalid); 'tree' is N and 'root' is 1. With no valid
    draft node in any row (e.g. prompt lookup found nothing, or gated off)
    the forward runs over the roots alone (T = 1, an autoregressive step's
    cost).
    """
    n = draft.tree.tokens.shape[1]
    width = {"tree": n, "root": 1}.get(width, width)
    if width != "auto" and not (isinstance(width, int) and 1 <= width <= n):
      raise ValueError(f"unknown verify width {width!r}: 'auto', 'tree', "
                       f"'root' or an int in [1, {n}]")
    model = nnx.merge(self.target, params[0])
    tree = draft.tree if width in ("auto", n) else draft.tree.truncated(width)
    positions = draft.cache.length[:, None] + tree.depth
    with_features = self.drafter.uses_features
    taps = self.drafter.feature_taps
    widths = self.verify_widths
    switch = width == "auto" and len(widths) > 1
    # Under the switch the branches only read the cache and the new K/V are
    # written after it (no copy of the cache per branch).
    defer = switch and defers_writes(model)
    kw = dict(defer_writes=True) if defer else {}

    def forward(tokens, pos, cache, mask):
      """`(logits, features or None, cache)` of the target over tokens
      (with `defer`, the new state in the cache's place)."""
      if with_features:
        features, cache = backbone_features(model, tokens, pos, cache, mask,
                                            taps, **kw)
        return model.head(head_input(features, taps)), features, cache
      if not defer:
        logits, cache = model(tokens, pos, cache, mask)
        return logits, None, cache
      hidden, new = model.backbone(tokens, pos, cache, mask, **kw)
      return model.logits(hidden), None, new

    n_rule = tree.tokens.shape[1]          # the nodes the rule sees

    def first(w):
      """The forward over the first w slots, its outputs padded to the
      rule's tree (every leaf that has the new tokens on axis 1; the
      others are caches): to N under the switch, none at a fixed width,
      where the rule sees the tree truncated to w."""
      def run(cache):
        out = forward(tree.tokens[:, :w], positions[:, :w], cache,
                      tree.mask[:, :w, :w])
        if w == n_rule:
          return out
        logits, features, cache = out
        pad = lambda x: jnp.pad(x, [(0, 0), (0, n_rule - w)]  # noqa: E731
                                + [(0, 0)] * (x.ndim - 2))
        return (pad(logits), None if features is None else pad(features),
                jax.tree.map(pad, cache) if defer else cache)
      return run

    if not switch:
      logits, features, cache = first(n_rule)(draft.cache)
    else:
      logits, features, cache = jax.lax.switch(
          self.width_index(tree, state.done), [first(w) for w in widths],
          draft.cache)
    if defer:
      cache = model.write_new(draft.cache, cache)
    verdict = self.rule(tree, logits, step_keys(inputs.keys, state.step + 1),
                        inputs.sparams, self.max_depth)
    margins = along_path(top2_margin, logits, verdict.path)          # [B, M]
    return Verified(verdict=verdict, margins=margins, cache=cache,
                    features=features)

  def finish(self, *, params, state: SpecState, inputs: Inputs,
             draft: Drafted, verdict: Verified) -> SpecState:
    """Phase 3: truncate at stop ids and budgets, record, commit both caches.

        c = min(D + 1, (index of the first stop id among the emitted) + 1,
                max_new - num_new)          (0 for rows already done)
    """
    model = nnx.merge(self.target, params[0])
    acc, s = verdict.verdict, state
    m = acc.tokens.shape[1]
    live = ~s.done
    j = jnp.arange(m, dtype=jnp.int32)
    emitted = j[None] <= acc.num_accepted[:, None]
    stop = emitted & jnp.isin(acc.tokens, inputs.eos_ids)
    first_stop = jnp.where(stop.any(1), jnp.argmax(stop, 1), m)
    c = jnp.minimum(jnp.minimum(acc.num_accepted + 1, first_stop + 1),
                    inputs.max_new - s.num_new)
    c = jnp.where(live, jnp.maximum(c, 0), 0).astype(jnp.int32)
    keep = j[None] < c[:, None]
    tokens = write_rows(s.tokens, jnp.where(keep, acc.tokens, 0), s.num_new)
    logprobs = write_rows(s.logprobs, jnp.where(keep, acc.logprobs, 0.0),
                          s.num_new)
    margins = write_rows(s.margins, jnp.where(keep, verdict.margins, 0.0),
                         s.num_new)
    num_new = s.num_new + c
    done = s.done | (live & (stop & keep).any(1)) | (num_new >= inputs.max_new)
    # On a chain the kept nodes are a prefix: a KV cache has them in place
    # already (no gather and write per layer; a recurrent state still
    # replays the path).
    prefix = self.tree.is_chain and isinstance(verdict.cache, KVCache)
    cache = model.commit(verdict.cache, c, None if prefix else acc.path)
    outcome = Outcome(path=acc.path, num_kept=c, tokens=acc.tokens,
                      features=None if verdict.features is None else
                      jnp.take_along_axis(verdict.features,
                                          acc.path[:, :, None], axis=1))
    dstate = self.drafter.commit(params[1], draft.dstate, self.tree, draft.rnd,
                                 outcome)
    last = jnp.maximum(c - 1, 0)[:, None]
    root = jnp.where(c > 0, jnp.take_along_axis(acc.tokens, last, 1)[:, 0],
                     s.root)
    last_node = jnp.take_along_axis(acc.path, last, 1)
    prev = jnp.where(c > 0,
                     jnp.take_along_axis(draft.tree.tokens, last_node, 1)[:, 0],
                     s.prev)
    hist = s.accept_hist + (live[:, None]
                            & (j[None] == acc.num_accepted[:, None]))
    drafted = s.drafted + (live & jnp.any(draft.tree.valid[:, 1:], axis=1))
    width_rounds = s.width_rounds.at[self.width_index(draft.tree,
                                                      s.done)].add(1)
    return s.replace(step=s.step + 1, root=root, prev=prev, tokens=tokens,
                     logprobs=logprobs, margins=margins, num_new=num_new,
                     done=done,
                     cache=cache, draft=dstate, accept_hist=hist,
                     drafted=drafted, width_rounds=width_rounds)

  def step(self, *, params, state: SpecState, inputs: Inputs) -> SpecState:
    """One round: `finish(verify(draft(state)))`."""
    drafted = self.draft(params=params, state=state, inputs=inputs)
    verified = self.verify(params=params, state=state, inputs=inputs,
                           draft=drafted)
    return self.finish(params=params, state=state, inputs=inputs,
                       draft=drafted, verdict=verified)

  def decode(self, *, params, state: SpecState, inputs: Inputs) -> SpecState:
    """Rounds until no row is live, in one compiled program.

    With one verify width (every row drafts every round, no budget), a
    `lax.while_loop` over `step`. With several (`verify_widths` w_1 < ... <
    w_J), the round's forward width is chosen by the loop that runs it
    rather than by a `lax.switch` inside it:

        d = draft(state)
        while live:
          for j in 1 .. J:
            while live and width_index(d) == j:
              state = finish(verify(d, width=w_j)); d = draft(state)

    Each forward writes the cache in place (no conditional, so no copy of
    its buffers and no deferred writes); a root-only round is an
    autoregressive step plus the drafter's proposal. The rounds, keys and
    outputs are those of `step` (the proposal for a round is made right
    after the previous round's commit, from the same state); the last
    proposal, made when no row is live any more, is discarded.
    """
    widths = self.verify_widths
    if len(widths) == 1:
      return super().decode(params=params, state=state, inputs=inputs)

    def pending(s: SpecState) -> tuple[SpecState, Tree, Round]:
      d = self.draft(params=params, state=s, inputs=inputs)
      return s.replace(cache=d.cache, draft=d.dstate), d.tree, d.rnd

    def round_(width):
      def body(carry):
        s, tree, rnd = carry
        drafted = Drafted(tree=tree, rnd=rnd, dstate=s.draft, cache=s.cache)
        verified = self.verify(params=params, state=s, inputs=inputs,
                               draft=drafted, width=width)
        return pending(self.finish(params=params, state=s, inputs=inputs,
                                   draft=drafted, verdict=verified))
      return body

    def runs_at(j):
      def cond(carry) -> jax.Array:
        s, tree, _ = carry
        return self.live(s) & (self.width_index(tree, s.done) == j)
      return cond

    def burst(carry):
      for j, w in enumerate(widths):
        carry = jax.lax.while_loop(runs_at(j), round_(w), carry)
      return carry

    s, _, _ = jax.lax.while_loop(lambda c: self.live(c[0]), burst,
                                 pending(state))
    return s

  def live(self, state: SpecState) -> jax.Array:
    """Rounds remain (at most NB) and some row is not done."""
    return (state.step < self.shapes.new) & ~jnp.all(state.done)
