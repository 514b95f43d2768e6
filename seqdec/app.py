"""What `launch/decode.py` does, as functions a notebook can call too.

Errors a user can cause (bad prompt file, unknown model, oversize prompt, bad
checkpoint) raise `UserError` subclasses with one-line messages; the CLI prints
them and exits non-zero. Output files are written atomically (temp file +
rename) and only after every prompt has been decoded, so a failure never leaves
a partial output.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
import warnings
from typing import Any, Iterable, Optional, Sequence

from seqdec import errors
from seqdec import host_profile
from seqdec.checkpoints import load_pretrained
from seqdec.decoding import spec as spec_lib
from seqdec.decoding.budget import WidthBudget
from seqdec.decoding.spec import SpecConfig
from seqdec.generator import GenerationResult, Generator, PromptError
from seqdec.jsonl import iter_jsonl, write_text_atomic
from seqdec.models.config import precision_of
from seqdec.parallel import distributed, sharding

# Exceptions that are the user's input, reported as one line (anything else
# is a bug and keeps its traceback).
USER_ERRORS = errors.USER_ERRORS


def read_prompts_file(path: str) -> list[dict[str, Any]]:
  """Reads a JSONL file: each line `{"prompt": str}` or `{"messages": [...]}`
  (optionally with an "id"), or a bare JSON string."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompts file {path!r} does not exist")
  records = []
  for where, rec in iter_jsonl(path, PromptError):
    if isinstance(rec, str):
      rec = {"prompt": rec}
    if not isinstance(rec, dict) or not (("prompt" in rec)
                                         ^ ("messages" in rec)):
      raise PromptError(f"{where}: expected an object with exactly "
                       f"one of 'prompt' or 'messages'")
    records.append(rec)
  if not records:
    raise PromptError(f"prompts file {path!r} has no prompts")
  return records


def build_prompts(records: Sequence[dict[str, Any]], chat: bool,
                  system_prompt: str = "", has_template: bool = True) -> list:
  """Turns prompt records into `Generator.generate` inputs."""
  prompts = []
  for i, rec in enumerate(records):
    if "messages" in rec:
      prompts.append(list(rec["messages"]))
      continue
    text = rec["prompt"]
    if not isinstance(text, str) or not text.strip():
      raise PromptError(f"prompt {i} is empty")
    if chat and has_template:
      msgs = [{"role": "system", "content": system_prompt}] if system_prompt \
          else []
      prompts.append(msgs + [{"role": "user", "content": text}])
    else:
      prompts.append(text)
  return prompts


def write_jsonl_atomic(path: str, rows: Iterable[dict[str, Any]]) -> None:
  """Writes all rows as JSON Lines, atomically (`write_text_atomic`)."""
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"output directory {directory!r} does not exist")
  write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                  for row in rows))


def config_mesh(config):
  """The device mesh of a config's `mesh` field: None ('' : one device),
  every device on `data` ('auto'), or a spec like 'data:2,model:4'."""
  return sharding.mesh_from_spec(config.get("mesh", ""))


def _policy_profile(model_name: str, policy: str, fallback: str):
  """This host's profile of `model_name` if it has a curve for `policy`;
  else None (with a RuntimeWarning ending in `fallback`, what the caller
  does without one; `host_profile.find` warns of a missing profile)."""
  profile = host_profile.find(model_name)
  if profile is not None and policy not in profile.verify_ms:
    warnings.warn(f"seqdec: the host profile has no curve for precision "
                  f"{policy!r}; {fallback}", RuntimeWarning, stacklevel=3)
    return None
  return profile


def auto_gate(model_name: str, spec: SpecConfig, policy: str) -> float:
  """`gate=auto`: the break-even of the spec's tree on this host,
  verify(N) / verify(1) - 1 from the host profile under the target's
  precision `policy` (`HostProfile.break_even`); 0 (never gate) with a
  warning when the host has no usable profile."""
  profile = _policy_profile(model_name, policy,
                            "gate=auto speculates every round")
  if profile is None:
    return 0.0
  return profile.break_even(spec_lib.build_tree(spec, policy).num_nodes,
                            policy)


def auto_budget(model_name: str, spec: SpecConfig, policy: str) -> str:
  """`budget=auto`: the verify-width ladder of the spec's tree priced by
  this host's profile under the target's precision `policy`, each width w
  at its break-even verify(w) / verify(1) - 1 at each measured cache length
  (`budget.WidthBudget`: a row pays the costs at its own length); ''
  (verify the whole tree) with a warning when the host has no usable
  profile."""
  profile = _policy_profile(model_name, policy,
                            "budget=auto verifies the whole tree")
  if profile is None:
    return ""
  n = spec_lib.build_tree(spec, policy).num_nodes
  lengths = tuple(profile.cache_lens(policy))
  if len(lengths) < 2:
    return str(WidthBudget.from_costs(
        n, lambda w: profile.break_even(w, policy)))
  return str(WidthBudget.from_costs(
      n, lambda w, s: profile.break_even(w, policy, s), lengths=lengths))


def auto_stop(model_name: str, spec: SpecConfig, policy: str) -> float:
  """`stop=auto`: the cost of one more level of the spec's drafter, in
  decoding steps, from this host's profile under the target's precision
  `policy` (`HostProfile.level_cost`: the gated rounds' slope over chain
  depth); 0 (grow every level) with a warning when the profile has no such
  rounds."""
  profile = _policy_profile(model_name, policy,
                            "stop=auto grows every level")
  if profile is None:
    return 0.0
  try:
    return profile.level_cost(spec.drafter, policy)
  except host_profile.ProfileError as e:
    warnings.warn(f"seqdec: {e}; stop=auto grows every level",
                  RuntimeWarning, stacklevel=2)
    return 0.0


def resolve_auto(model_name: str, spec: SpecConfig, policy: str
                 ) -> SpecConfig:
  """`spec` with `stop=auto`, `gate=auto` and `budget=auto` priced from
  this host's profile (`auto_stop` first: the others build the tree)."""
  if spec.stop == spec_lib.AUTO:
    spec = spec.replace(stop=auto_stop(model_name, spec, policy))
  if spec.gate == spec_lib.AUTO:
    spec = spec.replace(gate=auto_gate(model_name, spec, policy))
  if spec.budget == spec_lib.AUTO:
    spec = spec.replace(budget=auto_budget(model_name, spec, policy))
  return spec


def make_generator(config, model, tokenizer, speculative: bool = True,
                   mesh=None) -> Generator:
  """The `Generator` a decode config describes: its `config.spec` block
  (`SpecConfig.from_config`), autoregressive when `speculative` is False,
  on `mesh` (default: the config's)."""
  spec = SpecConfig.from_config(config.spec)
  policy = precision_of(model.config)
  if not speculative:
    spec = SpecConfig(max_top_k=spec.max_top_k)
  spec = resolve_auto(config.model, spec, policy)
  mesh = config_mesh(config) if mesh is None else mesh
  return Generator(model, tokenizer, spec,
                   max_new_tokens=config.max_new_tokens,
                   temperature=config.temperature, top_k=config.top_k,
                   top_p=config.top_p, seed=config.seed,
                   max_batch=config.max_batch, mesh=mesh)


def describe(results: Sequence[GenerationResult]) -> str:
  """One line of speculative metrics (tau, target calls, acceptance)."""
  m = results[0].metrics
  if "tau" not in m:
    return ""
  new = sum(r.metrics["new_tokens"] for r in results)
  calls = sum(r.metrics["target_calls"] for r in results)
  rates = " ".join(f"{x:.2f}" for x in m["accept_rate_by_depth"])
  return (f"tau {new / calls:.2f} tokens per target call ({new} tokens, "
          f"{calls} row-calls) | acceptance by depth (row 0): {rates}")


def run_decode(config, prompts: Optional[Sequence[str]] = None,
               prompts_file: Optional[str] = None,
               output: Optional[str] = None, out=sys.stdout,
               log=sys.stderr) -> list[GenerationResult]:
  """Loads the model named by `config.model` and decodes the prompts.

  With one prompt and `config.stream`, text is streamed to `out` as it is
  produced; timings go to `log`.
  """
  if prompts and prompts_file:
    raise errors.UserError("give --prompt or --prompts_file, not both")
  if not distributed.is_main():   # several processes: process 0 reports
    out, log, output = io.StringIO(), io.StringIO(), None
  if prompts_file:
    records = read_prompts_file(prompts_file)
  else:
    records = [{"prompt": p} for p in (prompts or [config.default_prompt])]
  if output:  # fail before the slow load if the output cannot be written
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"output directory {directory!r} does not exist")

  t0 = time.perf_counter()
  mesh = config_mesh(config)
  precision = config.get("precision", "f32")
  if precision == "auto":
    precision = host_profile.choose_precision(config.model)
  model, tokenizer = load_pretrained(
      config.model, dtype=config.dtype, precision=precision,
      **({} if mesh is None else dict(mesh=mesh)))
  load_s = time.perf_counter() - t0
  inputs = build_prompts(records, config.chat, config.system_prompt,
                         has_template=bool(tokenizer.chat_template))
  gen = make_generator(config, model, tokenizer, mesh=mesh)
  # Encode and validate every prompt before decoding any.
  ids = [gen.encode(p) for p in inputs]
  for i, p in enumerate(ids):
    if not p:
      raise PromptError(f"prompt {i} is empty")
  stream = None
  if config.stream and len(ids) == 1 and not output:
    def stream(_, delta):
      out.write(delta)
      out.flush()
  results = gen.generate_ids(ids, stream=stream)
  if stream is not None:
    out.write("\n")
  elif not output:
    for r in results:
      out.write(r.text + "\n")
  m = results[0].metrics
  print(f"[seqdec] model={config.model} precision={precision} load "
        f"{load_s:.2f} s | compile "
        f"{m['compile_s']:.2f} s | prefill {m['prefill_s'] * 1e3:.1f} ms "
        f"({m['prompt_tokens']} tokens) | decode "
        f"{m['decode_tokens_per_s']:.1f} tokens/s "
        f"({sum(r.metrics['new_tokens'] for r in results)} new tokens, "
        f"batch {m['batch_size']})", file=log)
  if gen.speculative:
    print(f"[seqdec] speculative: {gen.spec} | {describe(results)}",
          file=log)
    if config.get("compare_ar"):
      compare_autoregressive(config, model, tokenizer, ids, results, log)
  if output:
    write_jsonl_atomic(output, (
        {**{k: v for k, v in rec.items()}, "text": r.text, "tokens": r.tokens,
         "finish_reason": r.finish_reason, "metrics": r.metrics}
        for rec, r in zip(records, results)))
  return results


def compare_autoregressive(config, model, tokenizer, ids, spec_results,
                           log=sys.stderr) -> dict[str, Any]:
  """Decodes `ids` autoregressively too; prints and returns the speedup
  (decode tokens/s ratio) and whether every row's tokens agree."""
  ar = make_generator(config, model, tokenizer, speculative=False)
  ar_results = ar.generate_ids(ids)
  same = sum(a.tokens == s.tokens for a, s in zip(ar_results, spec_results))
  ar_tps = ar_results[0].metrics["decode_tokens_per_s"]
  spec_tps = spec_results[0].metrics["decode_tokens_per_s"]
  out = dict(ar_tokens_per_s=ar_tps, spec_tokens_per_s=spec_tps,
             speedup=spec_tps / ar_tps, rows_agree=same, rows=len(ids))
  if float(config.temperature) > 0:
    agree = (f"outputs agree: {same}/{len(ids)} rows (sampling at temperature "
             f"{config.temperature}: equal in distribution, not token for "
             f"token)")
  else:
    agree = f"outputs agree: {same}/{len(ids)} rows" + (
        "" if same == len(ids) else " (float32 near-ties: see README)")
  print(f"[seqdec] autoregressive {ar_tps:.1f} tokens/s vs speculative "
        f"{spec_tps:.1f} tokens/s: speedup {out['speedup']:.2f}x | {agree}",
        file=log)
  return out
