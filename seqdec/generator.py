"""`Generator`: the Python API a notebook imports (the CLI is a thin layer).

    model, tok = seqdec.load_pretrained("smollm2-135m-instruct")
    gen = seqdec.Generator(model, tok, max_new_tokens=64)
    [r] = gen.generate([[{"role": "user", "content": "Hi!"}]])
    print(r.text, r.metrics)

Prompts are plain strings or chat conversations (lists of
`{"role", "content"}` messages rendered with the tokenizer's chat template).
Shapes are bucketed (batch, prompt length, new tokens) so a new prompt of a
known bucket reuses the compiled programs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence, Union

import jax
import numpy as np
from flax import nnx

from seqdec.checkpoints import load_pretrained
from seqdec.decoding import spec as spec_lib
from seqdec.decoding import tree_specs
from seqdec.decoding.autoregressive import AutoregressiveLoop
from seqdec.decoding.drafters import Drafter
from seqdec.decoding.loops import DecodeShapes, HostLoop, Inputs, Programs
from seqdec.decoding.sampling import SamplingParams, make_sampler
from seqdec.decoding.spec import SpecConfig
from seqdec.decoding.speculative import SpecLoop, check_fits, check_window
from seqdec.decoding.trees import TreeShape
from seqdec.errors import ConfigError, UserError
from seqdec.models.config import precision_of
from seqdec.parallel import sharding
from seqdec.parallel.distributed import to_host
from seqdec.tokenizer import Tokenizer

Conversation = list  # list[dict(role=..., content=...)]
Prompt = Union[str, Conversation]


class PromptError(UserError):
  """A prompt cannot be decoded (empty, or too long for the context)."""


@dataclasses.dataclass
class GenerationResult:
  """One row's output.

  Attributes:
    prompt_tokens: the encoded prompt.
    tokens: generated ids, including a final stop id if one was produced.
    text: the detokenised generation (stop id and special tokens excluded).
    logprobs: per generated token, log p under the model (temperature 1).
    margins: per generated token, the target's top-1 minus top-2 logit at
      the position it was chosen (how far greedy decoding was from a tie).
    finish_reason: "stop" (a stop id) or "length" (max_new_tokens).
    metrics: timings and counts (prefill_s, decode_s, decode_tokens_per_s,
      compile_s, new_tokens, prompt_tokens, batch_size).
  """
  prompt_tokens: list[int]
  tokens: list[int]
  text: str
  logprobs: list[float]
  margins: list[float]
  finish_reason: str
  metrics: dict[str, Any]


def _as_prompt_list(prompts) -> list[Prompt]:
  if isinstance(prompts, str):
    return [prompts]
  prompts = list(prompts)
  if prompts and isinstance(prompts[0], dict):  # one conversation
    return [prompts]
  return prompts


class Generator:
  """Generation with bucketed, ahead-of-time compiled programs.

  Args:
    model: the target (a `seqdec.models.Transformer`, or any model of the
      target protocol `seqdec.models.protocol.Target`).
    tokenizer: a `seqdec.Tokenizer`.
    spec: the decoder: a method string of the one grammar
      (`seqdec.decoding.spec`: 'ar', 'ngram/chain4',
      'layerskip@layers=skip:4-15@proposal=wor/kary2x1', ...) or a
      `SpecConfig`; None for autoregressive decoding unless `drafter` is
      given.
    max_new_tokens: default budget per row.
    temperature, top_k, top_p: default sampling (temperature 0 = greedy).
    seed: default random seed; row r uses fold_in(key(seed), row_id[r]).
    eos_ids: stop ids (default: the tokenizer's).
    max_batch: prompts beyond this are decoded in several batches.
    max_top_k: static cap on per-row top_k, shared by the sampler and the
      speculative acceptance rule (a method string's `@max_top_k=` wins).
    drafter, tree, rule, proposal, gate, budget, stop, drafter_options: the
      `SpecConfig`
      fields as keywords (instead of `spec`), or `drafter=` a `Drafter`
      object (a custom drafter, with `tree` and `rule`). `drafter_options`
      may hold `draft_model=` a loaded model; a name or path there is loaded
      with `seqdec.load_pretrained`.
    mesh: None, or a `jax.sharding.Mesh` from
      `seqdec.parallel.sharding.make_mesh`: each batch's rows (rounded up to
      a multiple of the `data` axis) are split over `data`, parameters by
      the logical-axis rules over `model` (`sharding_plan` says what stays
      replicated); the tokens equal an unsharded run's.
  """

  def __init__(self, model, tokenizer: Tokenizer,
               spec: Union[None, str, SpecConfig] = None, *,
               max_new_tokens: int = 128, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               eos_ids: Optional[Sequence[int]] = None, max_batch: int = 8,
               max_top_k: int = spec_lib.DEFAULT_MAX_TOP_K,
               drafter: Union[None, str, Drafter] = None,
               tree: Optional[str] = None, rule: Optional[str] = None,
               proposal: Optional[str] = None,
               gate: Optional[float] = None,
               budget: Optional[str] = None,
               stop: Optional[float] = None,
               drafter_options: Optional[dict] = None,
               mesh: Optional[Any] = None):
    self.model = model
    self.tokenizer = tokenizer
    self.defaults = dict(max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed)
    self.eos_ids = tuple(tokenizer.eos_ids if eos_ids is None else eos_ids)
    self.max_batch = max_batch
    self.graphdef, self.params = nnx.split(model)
    self.spec, self.drafter, self.tree = self._build(
        model, spec, max_top_k, drafter, tree, rule, proposal, gate, budget,
        stop, dict(drafter_options or {}))
    self.budget = (spec_lib.build_budget(self.spec, self.tree)
                   if self.speculative else None)
    self.gate = spec_lib.build_gate(self.spec) if self.speculative else 0.0
    self.mesh = mesh
    self._loop_params = (self.params,
                         self.drafter.params if self.speculative else ())
    self.sharding_plan = None
    if mesh is not None and getattr(model.config, "matmul_impl",
                                    "xla") == "packed":
      raise ConfigError("the f32_packed policy runs a single-host CPU kernel "
                        "and cannot be sharded; use precision=f32 with a mesh")
    if mesh is not None:   # parameters split by the logical-axis rules
      self.sharding_plan = sharding.plan_params(self._loop_params, mesh)
      self._loop_params = sharding.place(self._loop_params, mesh,
                                         self.sharding_plan)
    self.programs = Programs()

  @staticmethod
  def _build(model, spec, max_top_k, drafter, tree, rule, proposal, gate,
             budget, stop, options):
    """`(SpecConfig, Drafter | None, TreeShape | None)` from the arguments."""
    for key in ("proposal", "rule"):  # SpecConfig fields, not drafter options
      if key in options:
        if locals()[key] is not None:
          raise ConfigError(f"{key} given twice (keyword and drafter_options)")
        value = options.pop(key)
        proposal, rule = ((value, rule) if key == "proposal"
                          else (proposal, value))
    shape = None
    if isinstance(tree, TreeShape):   # a topology object, not a spec string
      shape, tree = tree, tree_specs.to_spec(tree)
    fields = {k: v for k, v in dict(tree=tree, rule=rule, proposal=proposal,
                                    gate=gate, budget=budget,
                                    stop=stop).items()
              if v is not None}
    draft_model = None
    if spec is not None:
      if drafter is not None or fields or options:
        raise ConfigError("give either spec= or the drafter/tree/rule/"
                          "proposal/drafter_options keywords, not both")
      if not isinstance(spec, SpecConfig):
        spec = SpecConfig.parse(spec, max_top_k=max_top_k)
    elif isinstance(drafter, Drafter):
      # A custom drafter object: the spec holds tree, rule and caps.
      spec = SpecConfig(max_top_k=max_top_k, **fields)
      shape = drafter.verified_shape(
          shape or spec_lib.build_tree(spec, precision_of(model.config)))
      drafter.check(model.config, shape)
      check_window(model, shape)
      return spec, drafter, shape
    else:
      if not isinstance(options.get("draft_model", ""), str):
        draft_model = options.pop("draft_model")   # a loaded model
      spec = SpecConfig(drafter=drafter, options=tuple(options.items()),
                        max_top_k=max_top_k, **fields)
    if not spec.speculative:
      return spec, None, None
    if (spec.drafter == "draft" and draft_model is None
        and spec.option("draft_model")):
      draft_model, _ = load_pretrained(spec.option("draft_model"),
                                       dtype=model.config.param_dtype)
    shape = shape or spec_lib.build_tree(spec, precision_of(model.config))
    if isinstance(shape, TreeShape) and shape.num_nodes == 1:
      # No draft node (e.g. 'auto' found that no tree pays on this host):
      # plain autoregressive decoding, without a drafter's per-round work.
      return spec, None, None
    eagle_net = None
    if spec.drafter in spec_lib.TRAINED:  # (network, keep_ids)
      from seqdec.checkpoints import drafters as drafter_ckpt  # pylint: disable=g-import-not-at-top
      eagle_net = drafter_ckpt.load_for(model, spec.option("checkpoint"),
                                        spec.drafter)
    built = spec_lib.build_drafter(spec, model, draft_model=draft_model,
                                   eagle_net=eagle_net)
    shape = built.verified_shape(shape)
    built.check(model.config, shape)
    check_window(model, shape)
    return spec, built, shape

  @property
  def speculative(self) -> bool:
    return self.drafter is not None

  @property
  def context_length(self) -> int:
    return self.model.config.max_position_embeddings

  def encode(self, prompt: Prompt) -> list[int]:
    """Token ids of a string prompt or of a rendered conversation."""
    if isinstance(prompt, str):
      return self.tokenizer.encode(prompt)
    return self.tokenizer.encode_chat(prompt)

  def loop(self, shapes: DecodeShapes, temperature=0.0, top_k=0, top_p=1.0):
    """The decoder object for one shape bucket and these (per-row) sampling
    values: the sampler and, when speculative, the acceptance rule ('auto'
    resolved here, `spec.resolve_rule`) share the spec's `max_top_k`."""
    sampler = make_sampler(temperature, top_k, top_p, self.spec.max_top_k)
    if not self.speculative:
      return AutoregressiveLoop(target=self.graphdef, sampler=sampler,
                                shapes=shapes)
    return SpecLoop(target=self.graphdef, drafter=self.drafter,
                    tree=self.tree,
                    rule=spec_lib.build_rule(self.spec, temperature),
                    sampler=sampler, shapes=shapes, gate=self.gate,
                    budget=self.budget)

  @property
  def loop_params(self):
    """`(target params, drafter params)`, the loops' `params` (laid out on
    the mesh by `sharding_plan`, if there is a mesh)."""
    return self._loop_params

  def warmup(self, prompt_lengths: Sequence[int] = (16,),
             batch_sizes: Sequence[int] = (1,),
             max_new_tokens: Optional[int] = None, temperature=None,
             top_k=None, top_p=None, stream: bool = False) -> float:
    """Compiles, ahead of time, the programs of every (batch size, prompt
    length) bucket given, so that a harness can warm up once and then time.

    Returns the seconds spent compiling (0 when everything was compiled).
    `stream=True` compiles the streaming (host loop) programs instead.
    """
    before = self.programs.compile_seconds
    for b in batch_sizes:
      for length in prompt_lengths:
        loop, inputs = self.program_inputs(
            b, length, max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p)
        self._compile(loop, inputs, stream)
    return self.programs.compile_seconds - before

  def program_inputs(self, batch_size: int, prompt_length: int, *,
                     max_new_tokens: Optional[int] = None, temperature=None,
                     top_k=None, top_p=None) -> tuple[Any, Inputs]:
    """`(loop, inputs)` of the shape bucket of `batch_size` prompts of
    `prompt_length` tokens (placeholder ids) with these sampling values
    (default: the Generator's): what `warmup` compiles and `seqdec.export`
    exports."""
    opts = {**self.defaults, **{k: v for k, v in dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p).items() if v is not None}}
    b, n = int(batch_size), int(opts["max_new_tokens"])
    per_row = {k: np.broadcast_to(np.asarray(opts[k]), (b,))
               for k in ("temperature", "top_k", "top_p")}
    return self._prepare([[0] * int(prompt_length)] * b, np.full((b,), n),
                         per_row, seed=0)

  def _prepare(self, prompt_ids, max_new, per_row, seed, row_ids=None):
    """`(loop, inputs)` of one batch: its shape bucket, padded inputs and
    the decoder object for its sampling values."""
    eos = list(self.eos_ids) or [-1]
    shapes = DecodeShapes.for_batch(len(prompt_ids),
                                    max(len(p) for p in prompt_ids),
                                    int(np.max(max_new)), len(eos))
    ways = sharding.data_size(self.mesh)
    if shapes.batch % ways:  # rows split evenly over the data axis
      shapes = shapes._replace(batch=-(-shapes.batch // ways) * ways)
    sparams = SamplingParams.make(len(prompt_ids), per_row["temperature"],
                                  per_row["top_k"], per_row["top_p"])
    inputs = Inputs.make(shapes, prompt_ids, max_new, eos, sparams, seed,
                         row_ids)
    loop = self.loop(shapes, per_row["temperature"], per_row["top_k"],
                     per_row["top_p"])
    if self.mesh is not None:
      inputs = sharding.place_inputs(inputs, self.mesh)
    return loop, inputs

  def _compile(self, loop, inputs, streaming: bool) -> None:
    """Compiles the programs a run needs: prefill + the fused while_loop,
    or prefill + step + live for the host-driven (streaming) loop."""
    # The mesh as context: kernels run per shard under it (shard_map).
    with sharding.mesh_context(self.mesh):
      for kind in ("prefill",) + (("step", "live") if streaming
                                  else ("decode",)):
        self.programs.get(kind, loop, self.loop_params, inputs)

  def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
               stream: Optional[Callable[[int, str], None]] = None,
               **overrides) -> list[GenerationResult]:
    """Generates for each prompt.

    Args:
      prompts: a string, a conversation, or a list of either.
      stream: optional `fn(row_index, text_delta)` called while decoding
        (the rounds are then driven from the host, `loops.HostLoop`, so
        that text arrives after every round).
      **overrides: max_new_tokens, temperature, top_k, top_p, seed, row_ids
        (scalars, or per-prompt sequences for the sampling values).

    Raises:
      PromptError: an empty prompt, or one that leaves no room for
        max_new_tokens within the model's context.
    """
    prompts = _as_prompt_list(prompts)
    if not prompts:
      raise PromptError("no prompts given")
    ids = []
    for i, p in enumerate(prompts):
      if not p:
        raise PromptError(f"prompt {i} is empty")
      ids.append(self.encode(p))
    return self.generate_ids(ids, stream=stream, **overrides)

  def generate_ids(self, prompt_ids: Sequence[Sequence[int]],
                   stream: Optional[Callable[[int, str], None]] = None,
                   **overrides) -> list[GenerationResult]:
    """Like `generate`, from token ids."""
    unknown = set(overrides) - set(self.defaults) - {"row_ids"}
    if unknown:
      raise TypeError(f"unknown generation options {sorted(unknown)}")
    opts = {**self.defaults, **overrides}
    n = len(prompt_ids)
    max_new = np.broadcast_to(np.asarray(opts["max_new_tokens"], np.int64),
                              (n,))
    if (max_new < 1).any():
      raise PromptError(f"max_new_tokens must be >= 1, got "
                        f"{opts['max_new_tokens']}")
    vocab = self.model.config.vocab_size
    for i, p in enumerate(prompt_ids):
      if len(p) == 0:
        raise PromptError(f"prompt {i} is empty")
      if len(p) + int(max_new[i]) > self.context_length:
        raise PromptError(
            f"prompt {i} has {len(p)} tokens; with max_new_tokens="
            f"{int(max_new[i])} it exceeds the model's context of "
            f"{self.context_length} tokens (at most "
            f"{self.context_length - int(max_new[i])} prompt tokens)")
      if self.speculative:
        check_fits(self.tree, len(p), int(max_new[i]), self.context_length)
      if min(p) < 0 or max(p) >= vocab:
        raise PromptError(f"prompt {i} has token ids outside [0, {vocab})")
    row_ids = np.asarray(opts.get("row_ids", np.arange(n)))
    per_row = {k: np.broadcast_to(np.asarray(opts[k]), (n,))
               for k in ("temperature", "top_k", "top_p")}
    # Validate sampling values (and the rule against them) before decoding.
    SamplingParams.make(n, per_row["temperature"], per_row["top_k"],
                        per_row["top_p"])
    make_sampler(per_row["temperature"], per_row["top_k"], per_row["top_p"],
                 self.spec.max_top_k)
    if self.speculative:
      spec_lib.resolve_rule(self.spec.rule, per_row["temperature"])
    results: list[GenerationResult] = []
    for start in range(0, n, self.max_batch):
      rows = slice(start, min(n, start + self.max_batch))
      results += self._run_batch(
          [list(p) for p in prompt_ids[rows]], max_new[rows],
          {k: v[rows] for k, v in per_row.items()}, row_ids[rows],
          int(opts["seed"]), stream, start)
    return results

  def _run_batch(self, prompt_ids, max_new, per_row, row_ids, seed, stream,
                 row_offset) -> list[GenerationResult]:
    n = len(prompt_ids)
    lengths = np.array([len(p) for p in prompt_ids], np.int32)
    loop, inputs = self._prepare(prompt_ids, max_new, per_row, seed, row_ids)
    params = self.loop_params
    compile_before = self.programs.compile_seconds
    self._compile(loop, inputs, stream is not None)
    prefill = self.programs.get("prefill", loop, params, inputs)
    if stream is None:
      decode = self.programs.get("decode", loop, params, inputs)
      t0 = time.perf_counter()
      state = jax.block_until_ready(prefill(params=params, inputs=inputs))
      t1 = time.perf_counter()
      state = jax.block_until_ready(decode(params=params, state=state,
                                           inputs=inputs))
      t2 = time.perf_counter()
    else:
      on_step = _Streamer(self.tokenizer, self.eos_ids, n, row_offset, stream)
      marks = []
      host = HostLoop(loop, programs=self.programs)

      def on_step_timed(state):
        if not marks:
          jax.block_until_ready(state)
          marks.append(time.perf_counter())
        on_step(state)

      t0 = time.perf_counter()
      state = jax.block_until_ready(host.run(params=params, inputs=inputs,
                                             on_step=on_step_timed))
      t1, t2 = marks[0], time.perf_counter()
      on_step.flush()
    compile_s = self.programs.compile_seconds - compile_before
    out_tokens = to_host(state.tokens)
    out_logp = to_host(state.logprobs)
    out_margin = to_host(state.margins)
    num_new = to_host(state.num_new)
    prefill_s, decode_s = t1 - t0, t2 - t1
    spec = {}
    if self.speculative:
      hist = to_host(state.accept_hist)
      spec = dict(target_calls=hist.sum(1), accept_hist=hist,
                  drafted=to_host(state.drafted),
                  batch_target_calls=int(to_host(state.step)),
                  width_rounds=dict(zip(
                      loop.verify_widths,
                      to_host(state.width_rounds).tolist())))
    results = []
    for r in range(n):
      toks = out_tokens[r, :num_new[r]].tolist()
      stopped = bool(toks) and toks[-1] in self.eos_ids
      text_ids = toks[:-1] if stopped else toks
      steps = (spec["batch_target_calls"] if spec
               else max(int(num_new.max()) - 1, 1))
      results.append(GenerationResult(
          prompt_tokens=list(prompt_ids[r]), tokens=toks,
          text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
          logprobs=out_logp[r, :num_new[r]].tolist(),
          margins=out_margin[r, :num_new[r]].tolist(),
          finish_reason="stop" if stopped else "length",
          metrics=dict(prompt_tokens=int(lengths[r]), new_tokens=len(toks),
                       batch_size=n, prefill_s=prefill_s, decode_s=decode_s,
                       decode_steps_per_s=steps / decode_s,
                       decode_tokens_per_s=(int(num_new.sum()) - n) / decode_s,
                       compile_s=compile_s,
                       **(spec_metrics(spec, r, len(toks)) if spec else {}))))
    return results


class _Streamer:
  """`on_step(state)` for `HostLoop`: sends each row's new text to
  `stream(row_offset + row, delta)` (stop ids end a row's text)."""

  def __init__(self, tokenizer, eos_ids, num_rows, row_offset, stream):
    self.decoders = [tokenizer.stream_decoder(skip_special_tokens=True)
                     for _ in range(num_rows)]
    self.sent = np.zeros((num_rows,), np.int64)
    self.stopped = np.zeros((num_rows,), bool)
    self.eos = set(eos_ids)
    self.row_offset = row_offset
    self.stream = stream

  def __call__(self, state) -> None:
    num_new = to_host(state.num_new)[:len(self.sent)]
    if (num_new <= self.sent).all():
      return
    tokens = to_host(state.tokens)
    for r, (have, sent) in enumerate(zip(num_new, self.sent)):
      for t in tokens[r, sent:have].tolist():
        if self.stopped[r] or t in self.eos:
          self.stopped[r] = True
          break
        delta = self.decoders[r].push(t)
        if delta:
          self.stream(self.row_offset + r, delta)
      self.sent[r] = have

  def flush(self) -> None:
    for r, dec in enumerate(self.decoders):
      rest = dec.flush()
      if rest:
        self.stream(self.row_offset + r, rest)


def spec_metrics(spec: dict, row: int, new_tokens: int) -> dict:
  """Per-row speculative metrics.

  tau: tokens per target call, counting the prefill's first token as one
  call (so autoregressive decoding has tau = 1). accept_rate_by_depth[d-1]:
  among rounds that reached depth d - 1, the fraction that accepted a draft
  at depth d. drafted_rounds: the row's rounds that verified a draft (the
  rest verified the root alone: no proposal, or gated off).
  verify_width_rounds: the batch's rounds per verify width (tokens per row
  of the forward, `SpecLoop.verify_widths`).
  """
  calls = int(spec["target_calls"][row])
  hist = spec["accept_hist"][row]
  reached = hist[::-1].cumsum()[::-1]         # rounds with D >= d
  by_depth = [float(reached[d] / reached[d - 1]) if reached[d - 1] else 0.0
              for d in range(1, len(hist))]
  return dict(target_calls=calls + 1,
              tau=new_tokens / (calls + 1),
              mean_accepted=float((hist * np.arange(len(hist))).sum()
                                  / max(hist.sum(), 1)),
              accept_rate_by_depth=by_depth,
              drafted_rounds=int(spec["drafted"][row]),
              verify_width_rounds=dict(spec["width_rounds"]),
              batch_target_calls=spec["batch_target_calls"] + 1)
