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

from seqdec.errors import UserError
from seqdec.decoding.autoregressive import (AutoregressiveDecoder,
                                            DecodeShapes, bucket)
from seqdec.decoding.drafters import Drafter, make_drafter
from seqdec.decoding.sampling import SamplingParams, make_sampler, row_keys
from seqdec.decoding.speculative import SpeculativeDecoder
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
    finish_reason: "stop" (a stop id) or "length" (max_new_tokens).
    metrics: timings and counts (prefill_s, decode_s, decode_tokens_per_s,
      compile_s, new_tokens, prompt_tokens, batch_size).
  """
  prompt_tokens: list[int]
  tokens: list[int]
  text: str
  logprobs: list[float]
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
  """Autoregressive generation with bucketed, ahead-of-time compiled programs.

  Args:
    model: a `seqdec.models.Transformer`.
    tokenizer: a `seqdec.Tokenizer`.
    max_new_tokens: default budget per row.
    temperature, top_k, top_p: default sampling (temperature 0 = greedy).
    seed: default random seed; row r uses fold_in(key(seed), row_id[r]).
    eos_ids: stop ids (default: the tokenizer's).
    max_batch: prompts beyond this are decoded in several batches.
    max_top_k: static cap on per-row top_k.
    drafter: None for autoregressive decoding, or speculative decoding with
      a `Drafter` or a drafter name ('ngram', 'layerskip', 'draft') built by
      `make_drafter(name, model, **drafter_options)`.
    tree: the draft tree ('chain4', 'kary2x2', 'static10', or a `TreeShape`).
    rule: the acceptance rule ('greedy').
  """

  def __init__(self, model, tokenizer: Tokenizer, *, max_new_tokens: int = 128,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: int = 0, eos_ids: Optional[Sequence[int]] = None,
               max_batch: int = 8, max_top_k: int = 64,
               drafter: Union[None, str, Drafter] = None, tree="chain4",
               rule: str = "greedy", drafter_options: Optional[dict] = None):
    self.model = model
    self.tokenizer = tokenizer
    self.defaults = dict(max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=seed)
    self.eos_ids = tuple(tokenizer.eos_ids if eos_ids is None else eos_ids)
    self.max_batch = max_batch
    self.max_top_k = max_top_k
    if drafter is None:
      self.decoder = AutoregressiveDecoder(model)
    else:
      if isinstance(drafter, str):
        drafter = make_drafter(drafter, model, **(drafter_options or {}))
      self.decoder = SpeculativeDecoder(model, drafter, tree, rule)

  @property
  def speculative(self) -> bool:
    return isinstance(self.decoder, SpeculativeDecoder)

  @property
  def context_length(self) -> int:
    return self.model.config.max_position_embeddings

  def encode(self, prompt: Prompt) -> list[int]:
    """Token ids of a string prompt or of a rendered conversation."""
    if isinstance(prompt, str):
      return self.tokenizer.encode(prompt)
    return self.tokenizer.encode_chat(prompt)

  def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
               stream: Optional[Callable[[int, str], None]] = None,
               **overrides) -> list[GenerationResult]:
    """Generates for each prompt.

    Args:
      prompts: a string, a conversation, or a list of either.
      stream: optional `fn(row_index, text_delta)` called while decoding.
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
      raise PromptError(f"max_new_tokens must be >= 1, got {opts['max_new_tokens']}")
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
        self.decoder.check_fits(len(p), int(max_new[i]), self.context_length)
      if min(p) < 0 or max(p) >= vocab:
        raise PromptError(f"prompt {i} has token ids outside [0, {vocab})")
    row_ids = np.asarray(opts.get("row_ids", np.arange(n)))
    per_row = {k: np.broadcast_to(np.asarray(opts[k]), (n,))
               for k in ("temperature", "top_k", "top_p")}
    sampler = make_sampler(per_row["temperature"], per_row["top_k"],
                           per_row["top_p"], self.max_top_k)
    results: list[GenerationResult] = []
    for start in range(0, n, self.max_batch):
      rows = slice(start, min(n, start + self.max_batch))
      results += self._run_batch(
          [list(p) for p in prompt_ids[rows]], max_new[rows],
          {k: v[rows] for k, v in per_row.items()}, row_ids[rows],
          int(opts["seed"]), sampler, stream, start)
    return results

  def _run_batch(self, prompt_ids, max_new, per_row, row_ids, seed, sampler,
                 stream, row_offset) -> list[GenerationResult]:
    n = len(prompt_ids)
    lengths = np.array([len(p) for p in prompt_ids], np.int32)
    eos = list(self.eos_ids) or [-1]
    shapes = DecodeShapes(batch=bucket(n, 1), prompt=bucket(int(lengths.max())),
                          new=bucket(int(max_new.max())),
                          num_eos=bucket(len(eos), 4))
    b = shapes.batch
    tokens = np.zeros((b, shapes.prompt), np.int32)
    for i, p in enumerate(prompt_ids):
      tokens[i, :len(p)] = p
    prompt_len = np.ones((b,), np.int32)
    prompt_len[:n] = lengths
    budget = np.zeros((b,), np.int32)
    budget[:n] = max_new
    eos_arr = np.full((shapes.num_eos,), -1, np.int32)
    eos_arr[:len(eos)] = eos
    sparams = SamplingParams.make(
        n, per_row["temperature"], per_row["top_k"], per_row["top_p"]).pad(b)
    ids = np.zeros((b,), np.int64)
    ids[:n] = row_ids
    keys = row_keys(seed, ids)

    on_tokens = None
    if stream is not None:
      decoders = [self.tokenizer.stream_decoder() for _ in range(n)]
      eos_set = set(self.eos_ids)

      def on_tokens(tok, counts):
        for r in range(n):
          for t in tok[r, :counts[r]].tolist():
            if t in eos_set:
              break
            delta = decoders[r].push(t)
            if delta:
              stream(row_offset + r, delta)

    marks = {}
    compile_before = self.decoder.compile_seconds
    state = self.decoder.run(shapes, tokens, prompt_len, keys, sparams,
                             budget, eos_arr, sampler, stream=on_tokens,
                             timer=lambda k: marks.__setitem__(
                                 k, time.perf_counter()))
    if stream is not None:
      for r in range(n):
        rest = decoders[r].flush()
        if rest:
          stream(row_offset + r, rest)
    out_tokens = np.asarray(state.tokens)
    out_logp = np.asarray(state.logprobs)
    num_new = np.asarray(state.num_new)
    prefill_s = marks["prefill_end"] - marks["prefill_start"]
    decode_s = marks["decode_end"] - marks["prefill_end"]
    compile_s = self.decoder.compile_seconds - compile_before
    spec = {}
    if self.speculative:
      hist = np.asarray(state.accept_hist)
      spec = dict(target_calls=hist.sum(1), accept_hist=hist,
                  batch_target_calls=int(state.step))
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
          finish_reason="stop" if stopped else "length",
          metrics=dict(prompt_tokens=int(lengths[r]), new_tokens=len(toks),
                       batch_size=n, prefill_s=prefill_s, decode_s=decode_s,
                       decode_steps_per_s=steps / decode_s,
                       decode_tokens_per_s=(int(num_new.sum()) - n) / decode_s,
                       compile_s=compile_s,
                       **(spec_metrics(spec, r, len(toks)) if spec else {}))))
    return results


def spec_metrics(spec: dict, row: int, new_tokens: int) -> dict:
  """Per-row speculative metrics.

  tau: tokens per target call, counting the prefill's first token as one
  call (so autoregressive decoding has tau = 1). accept_rate_by_depth[d-1]:
  among rounds that reached depth d - 1, the fraction that accepted a draft
  at depth d.
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
              batch_target_calls=spec["batch_target_calls"] + 1)
