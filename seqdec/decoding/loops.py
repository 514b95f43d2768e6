"""Decoders as objects: the protocol every decoding loop implements, the
per-run inputs, shape buckets, the compiled programs, and the host-driven
("eager") twin of the jitted loop.

A decoder is a frozen, hashable object (`AutoregressiveLoop`,
`SpecLoop`) holding everything static about a program: the target's graph
definition, the drafter, tree and acceptance rule, the sampler and the
shapes. Its methods are pure functions of pytrees, keyword-only:

    state = loop.prefill(params=..., inputs=...)        prompt -> first token
    state = loop.step(params=..., state=..., inputs=...)   one round
    live  = loop.live(state)                             any row still going
    state = loop.decode(params=..., state=..., inputs=...) while_loop(step)

`params = (target_params, drafter_params)` (the drafter's are `()` for
autoregressive decoding and weightless drafters). `inputs` (`Inputs`) are
the run's arrays: padded prompts, keys, sampling parameters, budgets, stop
ids. Jitting treats the loop as a static argument (`PREFILL`, `DECODE`,
`STEP`: a new loop object compiles, an equal one reuses), and donates the
state by name. `HostLoop` drives the same `prefill` and `step` from Python:
for streaming (tokens reach the host after every round), for debugging
(`jit=False` runs every op eagerly), and for the phase-split benchmark
(`phases=True` times draft / verify / finish one by one).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple, Optional, Protocol, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from seqdec.decoding.sampling import SamplingParams, row_keys
from seqdec.parallel.distributed import to_host


def bucket(n: int, minimum: int = 16, step: int = 128) -> int:
  """Padded size for n: a power of two (>= minimum) up to `step`, then the
  next multiple of `step` (padding at most 2x for short, < step for long)."""
  n = max(n, 1)
  if n <= step:
    return max(minimum, 1 << math.ceil(math.log2(n)))
  return -(-n // step) * step


class DecodeShapes(NamedTuple):
  """Static shapes of one compiled decode program."""
  batch: int          # B, rows (padded to a power of two)
  prompt: int         # P, padded prompt length
  new: int            # NB, output buffer length (>= every row's max_new)
  num_eos: int        # E, padded stop-id list length

  @property
  def cache_len(self) -> int:
    return self.prompt + self.new

  @classmethod
  def for_batch(cls, num_rows: int, max_prompt: int, max_new: int,
                num_eos: int) -> "DecodeShapes":
    """The bucket of a batch: rows to a power of two, prompt and new tokens
    by `bucket`, stop ids to a multiple of 4."""
    return cls(batch=bucket(num_rows, 1), prompt=bucket(max_prompt),
               new=bucket(max_new), num_eos=bucket(max(num_eos, 1), 4))


@flax.struct.dataclass
class Inputs:
  """The arrays of one run (dynamic: new values never recompile).

  Attributes:
    tokens: `[B, P]` int32 right-padded prompts.
    prompt_len: `[B]` int32 true lengths (>= 1; 1 for padding rows).
    keys: `[B]` typed PRNG keys, one per row (`sampling.row_keys`).
    sparams: per-row `SamplingParams`.
    max_new: `[B]` int32 budgets (0 for padding rows).
    eos_ids: `[E]` int32 stop ids, padded with -1.
  """
  tokens: jax.Array
  prompt_len: jax.Array
  keys: jax.Array
  sparams: SamplingParams
  max_new: jax.Array
  eos_ids: jax.Array

  @classmethod
  def make(cls, shapes: DecodeShapes, prompts: Sequence[Sequence[int]],
           max_new: Sequence[int], eos_ids: Sequence[int],
           sparams: SamplingParams, seed: int,
           row_ids: Optional[Sequence[int]] = None) -> "Inputs":
    """Pads a batch of n <= B prompts to `shapes` (host side).

    Padding rows have prompt length 1, budget 0 and greedy sampling; row r's
    key is fold_in(key(seed), row_ids[r]) (default r).
    """
    n, b = len(prompts), shapes.batch
    tokens = np.zeros((b, shapes.prompt), np.int32)
    prompt_len = np.ones((b,), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
      prompt_len[i] = len(p)
    budget = np.zeros((b,), np.int32)
    budget[:n] = max_new
    eos = np.full((shapes.num_eos,), -1, np.int32)
    eos[:len(eos_ids)] = list(eos_ids)
    ids = np.zeros((b,), np.int64)
    ids[:n] = np.arange(n) if row_ids is None else row_ids
    return cls(tokens=jnp.asarray(tokens), prompt_len=jnp.asarray(prompt_len),
               keys=row_keys(seed, ids), sparams=sparams.pad(b),
               max_new=jnp.asarray(budget), eos_ids=jnp.asarray(eos))

  @property
  def prompt_last(self) -> jax.Array:
    """`[B]` each prompt's last token."""
    return jnp.take_along_axis(self.tokens, (self.prompt_len - 1)[:, None],
                               axis=1)[:, 0]


class Decoder(Protocol):
  """What `Generator`, the benchmarks and `HostLoop` ask of a loop.

  The state (a pytree) has at least `step` (scalar), `tokens` `[B, NB + M]`,
  `logprobs`, `num_new` `[B]` and `done` `[B]`.
  """
  shapes: DecodeShapes

  def prefill(self, *, params, inputs: Inputs) -> Any:
    ...

  def step(self, *, params, state, inputs: Inputs) -> Any:
    ...

  def live(self, state) -> jax.Array:
    ...

  def decode(self, *, params, state, inputs: Inputs) -> Any:
    ...


class LoopMixin:
  """`decode` and `run` from `prefill`, `step` and `live`."""

  def decode(self, *, params, state, inputs: Inputs):
    """Rounds until no row is live, in one `lax.while_loop`."""
    return jax.lax.while_loop(
        self.live, lambda s: self.step(params=params, state=s, inputs=inputs),
        state)

  def run(self, *, params, inputs: Inputs):
    """`prefill` then `decode` (one program when jitted)."""
    return self.decode(params=params, inputs=inputs,
                       state=self.prefill(params=params, inputs=inputs))


def _prefill(loop, *, params, inputs):
  return loop.prefill(params=params, inputs=inputs)


def _decode(loop, *, params, state, inputs):
  return loop.decode(params=params, state=state, inputs=inputs)


def _step(loop, *, params, state, inputs):
  return loop.step(params=params, state=state, inputs=inputs)


def _live(loop, *, state):
  return loop.live(state)


# The jitted programs: the loop is static, the state is donated by name.
PREFILL = jax.jit(_prefill, static_argnums=0)
DECODE = jax.jit(_decode, static_argnums=0, donate_argnames=("state",))
STEP = jax.jit(_step, static_argnums=0, donate_argnames=("state",))
LIVE = jax.jit(_live, static_argnums=0)


def _phase(name: str):
  def call(loop, **kw):
    return getattr(loop, name)(**kw)
  call.__name__ = f"_{name}"
  return call


# The speculative round's phases, each its own program (`HostLoop(phases=
# True)`); module-level so that every HostLoop shares their compile cache.
PHASES = {name: jax.jit(_phase(name), static_argnums=0)
          for name in ("draft", "verify", "finish")}


KINDS = ("prefill", "decode", "step", "live")


def program(kind: str, loop, params, inputs: Inputs,
            state_shardings: Any = None
            ) -> tuple[Callable[..., Any], dict[str, Any]]:
  """`(jitted function, keyword arguments)` of program `kind` of `loop`:
  `fn.lower(loop, **kwargs)` compiles it, `jax.export.export(fn)(loop,
  **kwargs)` exports it. The state argument of 'decode' / 'step' / 'live'
  is abstract (`jax.eval_shape` of prefill), laid out as
  `state_shardings` (the compiled prefill's output shardings) when given;
  params and inputs may be concrete or `jax.ShapeDtypeStruct`s."""
  if kind == "prefill":
    return PREFILL, dict(params=params, inputs=inputs)
  if kind not in KINDS:
    raise ValueError(f"unknown program {kind!r}; expected one of {KINDS}")
  state = jax.eval_shape(lambda p, i: loop.prefill(params=p, inputs=i),
                         params, inputs)
  if state_shardings is not None:
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        state, state_shardings)
  if kind == "live":
    return LIVE, dict(state=state)
  return ({"decode": DECODE, "step": STEP}[kind],
          dict(params=params, state=state, inputs=inputs))


class Programs:
  """Ahead-of-time compiled programs, one per (kind, loop), with the time
  spent compiling (so that a harness can warm up, then time).

  `get(kind, loop, params, inputs)` compiles `PREFILL` ('prefill'), `DECODE`
  ('decode'), `STEP` ('step') or `LIVE` ('live') for that loop on first
  use; the state's shape comes from `jax.eval_shape` of the prefill
  (nothing runs).
  """

  def __init__(self):
    self.compiled: dict[Any, Any] = {}
    self.compile_seconds = 0.0

  def get(self, kind: str, loop, params, inputs: Inputs):
    key = (kind, loop)
    if key not in self.compiled:
      # Later programs take the state as prefill lays it out (sharded
      # over a mesh's data axis, or on the one device).
      layout = (None if kind == "prefill" else
                self.get("prefill", loop, params, inputs).output_shardings)
      t0 = time.perf_counter()
      fn, kwargs = program(kind, loop, params, inputs, layout)
      self.compiled[key] = fn.lower(loop, **kwargs).compile()
      self.compile_seconds += time.perf_counter() - t0
    return self.compiled[key]

  def __len__(self) -> int:
    return len(self.compiled)


class HostLoop:
  """The eager twin: `prefill`, then `step` from a Python loop while any row
  is live (`step` here is exactly the jitted loop's body).

  Args:
    loop: a decoder (`AutoregressiveLoop`, `SpecLoop`).
    jit: jit prefill and step (False: every op runs eagerly, for debugging
      with prints and breakpoints; slow).
    phases: time the speculative round's phases (`draft`, `verify`,
      `finish`, each jitted on its own, blocking after each) into
      `self.seconds`; the first round (which compiles) is not counted.
    programs: a `Programs` to take compiled prefill/step from (jit only).
  """

  def __init__(self, loop, *, jit: bool = True, phases: bool = False,
               programs: Optional[Programs] = None):
    self.loop = loop
    self.jit = jit
    self.phases = phases
    self.programs = programs
    self.seconds: dict[str, float] = {}
    if phases:
      self._phase_fns = PHASES if jit else {
          name: _phase(name) for name in PHASES}

  def _call(self, kind: str, params, inputs, **kw):
    if not self.jit:
      fn = getattr(self.loop, kind)
      return fn(params=params, inputs=inputs, **kw)
    if self.programs is not None:
      return self.programs.get(kind, self.loop, params, inputs)(
          params=params, inputs=inputs, **kw)
    fn = {"prefill": PREFILL, "step": STEP}[kind]
    return fn(self.loop, params=params, inputs=inputs, **kw)

  def prefill(self, *, params, inputs: Inputs):
    return self._call("prefill", params, inputs)

  def live(self, state, params, inputs: Inputs) -> bool:
    if not self.jit:
      return bool(self.loop.live(state))
    if self.programs is not None:
      live = self.programs.get("live", self.loop, params, inputs)(state=state)
    else:
      live = LIVE(self.loop, state=state)
    return bool(to_host(live))

  def step(self, *, params, state, inputs: Inputs):
    if not self.phases:
      return self._call("step", params, inputs, state=state)
    f = self._phase_fns
    t0 = time.perf_counter()
    draft = jax.block_until_ready(
        f["draft"](self.loop, params=params, state=state, inputs=inputs))
    t1 = time.perf_counter()
    verdict = jax.block_until_ready(f["verify"](
        self.loop, params=params, state=state, inputs=inputs, draft=draft))
    t2 = time.perf_counter()
    state = jax.block_until_ready(f["finish"](
        self.loop, params=params, state=state, inputs=inputs, draft=draft,
        verdict=verdict))
    t3 = time.perf_counter()
    if self._warm:
      for name, dt in (("draft", t1 - t0), ("verify", t2 - t1),
                       ("finish", t3 - t2)):
        self.seconds[name] = self.seconds.get(name, 0.0) + dt
      self.seconds["rounds"] = self.seconds.get("rounds", 0) + 1
    self._warm = True
    return state

  def run(self, *, params, inputs: Inputs,
          on_step: Optional[Callable[[Any], None]] = None):
    """Runs to the end; `on_step(state)` after the prefill and every round."""
    self.seconds = {}
    self._warm = False
    state = self.prefill(params=params, inputs=inputs)
    if on_step is not None:
      on_step(state)
    while self.live(state, params, inputs):
      state = self.step(params=params, state=state, inputs=inputs)
      if on_step is not None:
        on_step(state)
    return state
