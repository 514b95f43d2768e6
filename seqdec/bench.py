"""Benchmark helpers: the frozen prompt set, timing, robust statistics, output.

The `launch/bench_*.py` scripts are thin layers over these functions, which
are also usable from a notebook:

    from seqdec import bench
    prompts = bench.load_prompt_set(per_category=1)
    with bench.Stopwatch() as sw:
      ...
    stats = bench.summarize([12.0, 11.5, 13.2])   # median, p10, p90, ...
    bench.write_json("benchmarks/results/x.json", {"machine": bench.machine_info()})

Nothing here imports torch or transformers (they are test and benchmark
oracles only); library versions are read from package metadata.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from seqdec.errors import UserError
from seqdec.jsonl import iter_jsonl, write_text_atomic

CATEGORIES = ("writing", "qa", "summarization", "rewrite", "math", "code")
# A round gate no round passes (`SpecConfig.gate`; a draft node counts at
# most 1 expected accepted draft): every round verifies its root alone.
CLOSED_GATE = 1e6
PROMPTS_PER_CATEGORY = 8
_ROLES = ("system", "user", "assistant")
_PROMPT_KEYS = ({"id", "category", "messages"},   # chat models
                {"id", "category", "text"})       # base models: continuation


class PromptSetError(UserError):
  """A prompt file is missing or malformed."""


@dataclasses.dataclass(frozen=True)
class BenchPrompt:
  """One benchmark prompt.

  Attributes:
    id: "<category>-<n>", unique within the set.
    category: one of `CATEGORIES`.
    messages: the conversation, `[{"role": ..., "content": ...}, ...]`
      (empty for a text prompt).
    text: a plain-text prompt for a base model to continue, or None.
  """
  id: str
  category: str
  messages: tuple[dict[str, str], ...]
  text: Optional[str] = None

  def as_messages(self) -> list[dict[str, str]]:
    """A fresh, mutable copy of the conversation."""
    return [dict(m) for m in self.messages]

  def as_input(self) -> str | list[dict[str, str]]:
    """What `Generator.encode` takes: the text, else the conversation."""
    return self.text if self.text is not None else self.as_messages()


def default_prompts_dir() -> str:
  """`benchmarks/prompts` of the source tree this module belongs to."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(root, "benchmarks", "prompts")


@dataclasses.dataclass(frozen=True)
class BenchModel:
  """A model the benchmarks know: its GGUF and its prompt set.

  Attributes:
    name: the `seqdec.load_pretrained` name.
    find_gguf: the function (in `seqdec.checkpoints.gguf`) that returns its
      GGUF path.
    prompts: the prompt-set directory under `benchmarks/` (chat prompts for
      instruction-tuned models, plain-text continuations for base models).
    per_category: prompts per category in that set.
  """
  name: str
  find_gguf: str
  prompts: str
  per_category: int


BENCH_MODELS = {m.name: m for m in (
    BenchModel("smollm2-135m-instruct", "find_smollm2_gguf", "prompts",
               PROMPTS_PER_CATEGORY),
    BenchModel("gemma3-270m", "find_gemma3_gguf", "prompts_base", 4),
)}


def bench_model(name: str) -> tuple[str, str, int]:
  """`(GGUF path, prompt-set directory, prompts per category)` of a
  `BENCH_MODELS` name.

  Raises:
    PromptSetError: an unknown name.
  """
  if name not in BENCH_MODELS:
    raise PromptSetError(f"unknown benchmark model {name!r}; known: "
                         f"{sorted(BENCH_MODELS)}")
  from seqdec.checkpoints import gguf  # pylint: disable=g-import-not-at-top
  m = BENCH_MODELS[name]
  root = os.path.dirname(default_prompts_dir())
  return (os.path.abspath(getattr(gguf, m.find_gguf)()),
          os.path.join(root, m.prompts), m.per_category)


def model_prompt_set(model: str, categories: Sequence[str] = CATEGORIES,
                     per_category: Optional[int] = None) -> list[BenchPrompt]:
  """The prompt set a model is measured on: a `BENCH_MODELS` name's own set
  (plain-text continuations for a base model), else the chat set."""
  directory, expected = None, PROMPTS_PER_CATEGORY
  if model in BENCH_MODELS:
    _, directory, expected = bench_model(model)
  return load_prompt_set(directory, categories=categories,
                         per_category=per_category,
                         expected_per_category=expected)


def continuations(model_name: str, prompts: Sequence[BenchPrompt],
                  max_new_tokens: int, temperature: float = 0.0,
                  seed: int = 0):
  """Loads a model and continues each prompt with it (no stop id).

  The data of teacher-forced measurements (`launch/measure_acceptance.py`,
  `launch/search_layers.py`). Returns `(model, tokenizer, inputs, results)`:
  the prompt ids of each prompt (its text, else its conversation through the
  chat template, else the messages joined by newlines for a tokenizer
  without one) and the `GenerationResult`s (greedy at temperature 0,
  seeded sampling otherwise).
  """
  # pylint: disable=g-import-not-at-top
  import seqdec
  from seqdec.generator import Generator
  # pylint: enable=g-import-not-at-top
  model, tokenizer = seqdec.load_pretrained(model_name)
  gen = Generator(model, tokenizer, max_new_tokens=max_new_tokens, eos_ids=(),
                  temperature=temperature, seed=seed)
  inputs = []
  for p in prompts:
    if p.text is not None:
      inputs.append(gen.encode(p.text))
    elif tokenizer.chat_template:
      inputs.append(gen.encode(p.as_messages()))
    else:  # e.g. the byte-level tokenizer of the tiny test model
      inputs.append(gen.encode("\n".join(m["content"] for m in p.messages)))
  return model, tokenizer, inputs, gen.generate_ids(inputs)


def _check_messages(messages: Any, where: str) -> tuple[dict[str, str], ...]:
  if not isinstance(messages, list) or not messages:
    raise PromptSetError(f"{where}: 'messages' must be a non-empty list")
  out = []
  for m in messages:
    if not isinstance(m, dict) or set(m) != {"role", "content"}:
      raise PromptSetError(f"{where}: each message needs exactly 'role' and "
                           f"'content', got {m!r}")
    if m["role"] not in _ROLES:
      raise PromptSetError(f"{where}: unknown role {m['role']!r}")
    if not isinstance(m["content"], str) or not m["content"].strip():
      raise PromptSetError(f"{where}: message content must be a non-empty "
                           f"string")
    out.append({"role": m["role"], "content": m["content"]})
  if out[-1]["role"] != "user":
    raise PromptSetError(f"{where}: the last message must be the user's")
  return tuple(out)


def load_category(path: str, category: str) -> list[BenchPrompt]:
  """Reads and validates one `<category>.jsonl` file.

  Each line is `{"id": "<category>-<n>", "category": ..., "messages": [...]}`
  (or `"text": "..."` instead of messages, for base models) with n = 1, 2,
  ... in file order.

  Raises:
    PromptSetError: missing file, invalid JSON, wrong keys, ids or messages.
  """
  prompts = []
  for where, rec in iter_jsonl(path, PromptSetError):
    if not isinstance(rec, dict) or set(rec) not in _PROMPT_KEYS:
      raise PromptSetError(f"{where}: expected keys "
                           f"{' or '.join(str(sorted(k)) for k in _PROMPT_KEYS)}")
    if rec["category"] != category:
      raise PromptSetError(f"{where}: category {rec['category']!r} in the "
                           f"file of {category!r}")
    expected_id = f"{category}-{len(prompts) + 1}"
    if rec["id"] != expected_id:
      raise PromptSetError(f"{where}: id {rec['id']!r}, expected "
                           f"{expected_id!r}")
    if "text" in rec:
      if not isinstance(rec["text"], str) or not rec["text"].strip():
        raise PromptSetError(f"{where}: 'text' must be a non-empty string")
      prompts.append(BenchPrompt(id=rec["id"], category=category,
                                 messages=(), text=rec["text"]))
    else:
      prompts.append(BenchPrompt(
          id=rec["id"], category=category,
          messages=_check_messages(rec["messages"], where)))
  return prompts


def load_prompt_set(directory: Optional[str] = None,
                    categories: Sequence[str] = CATEGORIES,
                    per_category: Optional[int] = None,
                    expected_per_category: Optional[int] = PROMPTS_PER_CATEGORY
                    ) -> list[BenchPrompt]:
  """Loads the benchmark prompts, category by category, in file order.

  Args:
    directory: holds `<category>.jsonl` files (default:
      `default_prompts_dir()`).
    categories: which categories, in this order.
    per_category: keep only the first k prompts of each category
      (None: all).
    expected_per_category: each file must hold exactly this many prompts
      (None: any number >= 1).

  Raises:
    PromptSetError: a missing or malformed file, a wrong prompt count, or a
      duplicate id.
  """
  directory = directory or default_prompts_dir()
  if per_category is not None and per_category < 1:
    raise PromptSetError(f"per_category must be >= 1, got {per_category}")
  out: list[BenchPrompt] = []
  seen: set[str] = set()
  for cat in categories:
    prompts = load_category(os.path.join(directory, f"{cat}.jsonl"), cat)
    if not prompts:
      raise PromptSetError(f"{cat}.jsonl holds no prompts")
    if (expected_per_category is not None
        and len(prompts) != expected_per_category):
      raise PromptSetError(f"{cat}.jsonl holds {len(prompts)} prompts, "
                           f"expected {expected_per_category}")
    for p in prompts:
      if p.id in seen:
        raise PromptSetError(f"duplicate prompt id {p.id!r}")
      seen.add(p.id)
    out += prompts[:per_category]
  return out


# ------------------------------------------------------------------ statistics


def percentile(values: Iterable[float], q: float) -> float:
  """The q-th percentile, interpolating linearly between order statistics.

  With the n values sorted as x_0 <= ... <= x_{n-1}, h = (n - 1) q / 100 and
  percentile = x_floor(h) + (h - floor(h)) (x_ceil(h) - x_floor(h)); this is
  numpy's default ("linear") method.

  Raises:
    ValueError: no values, a NaN, or q outside [0, 100].
  """
  xs = sorted(float(v) for v in values)
  if not xs:
    raise ValueError("percentile of no values")
  if any(math.isnan(x) for x in xs):
    raise ValueError("percentile of values containing NaN")
  if not 0.0 <= q <= 100.0:
    raise ValueError(f"q must be in [0, 100], got {q}")
  h = (len(xs) - 1) * q / 100.0
  lo = math.floor(h)
  hi = min(lo + 1, len(xs) - 1)
  return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def median(values: Iterable[float]) -> float:
  """The 50th percentile (the mean of the two middle values for even n)."""
  return percentile(values, 50.0)


def summarize(values: Iterable[float]) -> dict[str, float]:
  """Median, p10, p90, min, max, mean and count of `values`."""
  xs = [float(v) for v in values]
  if not xs:
    raise ValueError("summarize of no values")
  return dict(median=median(xs), p10=percentile(xs, 10.0),
              p90=percentile(xs, 90.0), min=min(xs), max=max(xs),
              mean=sum(xs) / len(xs), n=len(xs))


def ratio(numerator: float, denominator: float) -> Optional[float]:
  """numerator / denominator, or None when the denominator is 0."""
  return None if denominator == 0 else numerator / denominator


def group_by(records: Sequence[Mapping[str, Any]], key: str,
             order: Optional[Sequence[str]] = None
             ) -> dict[str, list[Mapping[str, Any]]]:
  """Records grouped by `record[key]`, groups in `order` (else first seen)."""
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for k in order or ():
    groups[k] = []
  for r in records:
    groups.setdefault(r[key], []).append(r)
  return {k: v for k, v in groups.items() if v}


def first_divergence(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
  """Index of the first position where `a` and `b` differ, else None.

  A length difference counts as a divergence at the shorter length.
  """
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return i
  return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------------- timing


class Stopwatch:
  """Wall-clock timer (`time.perf_counter`) usable as a context manager.

      with Stopwatch() as sw:
        work()
      print(sw.seconds)

  Asynchronous work (JAX) must be blocked on inside the block.
  """

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self._start: Optional[float] = None
    self.seconds: Optional[float] = None

  def __enter__(self) -> "Stopwatch":
    self._start = self._clock()
    return self

  def __exit__(self, *exc) -> None:
    self.seconds = self._clock() - self._start


def define_model_flag():
  """absl flag `--model`: a `BENCH_MODELS` name (its GGUF and prompt set)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return flags.DEFINE_enum(
      "model", "smollm2-135m-instruct", sorted(BENCH_MODELS),
      "Benchmark model (seqdec.bench.BENCH_MODELS): its installed GGUF and "
      "its prompt set (chat prompts; plain-text continuations for a base "
      "model).")


def define_drafter_flags():
  """absl flags `--layers` and `--draft_layers` shared by the drafter benches.

  Returns their holders `(layers, draft_layers)`: the layer subset of the
  layer-skip drafter and the depth of the truncated-target draft LM.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  layers = flags.DEFINE_string("layers", "skip:4-15",
                               "Layer subset of the layerskip drafter.")
  draft_layers = flags.DEFINE_integer(
      "draft_layers", 10, "Layers of the truncated-target draft LM (draft).")
  return layers, draft_layers


def quick_settings(quick: bool, max_new_tokens: int, max_new_given: bool,
                   per_category: Optional[int]) -> tuple[int, Optional[int]]:
  """`(N, per_category)` for a bench run: `--quick` means N=32 (unless
  --max_new_tokens was given) and one prompt per category (unless given)."""
  n = 32 if quick and not max_new_given else max_new_tokens
  if quick and per_category is None:
    per_category = 1
  return n, per_category


def time_call(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, float]:
  """`(fn(*args, **kwargs), wall seconds)`; fn must return finished work."""
  t0 = time.perf_counter()
  out = fn(*args, **kwargs)
  return out, time.perf_counter() - t0


def decode_one(gen, ids: Sequence[int], n: int) -> dict[str, Any]:
  """Decodes exactly `n` new tokens after prompt `ids` (one row, EOS off or
  never hit) with `gen` (a `seqdec.Generator`) and returns the timing row
  the bench scripts share: tokens, decode_s (the loop, prefill excluded),
  decode_tps = (n - 1) / decode_s (prefill makes the first token),
  prefill_ms, e2e_tps = n / (prefill + decode), compile_s, tau (1 for
  autoregressive), target_calls (prefill included) and ms_per_round =
  decode_s / (target_calls - 1); accept_rate_by_depth and
  verify_width_rounds when the loop reports them. Fewer than `n` tokens
  raise RuntimeError."""
  [r] = gen.generate_ids([list(ids)], max_new_tokens=n)
  m = r.metrics
  if len(r.tokens) != n:
    raise RuntimeError(f"generated {len(r.tokens)} tokens, expected {n}")
  calls = m.get("target_calls", n)
  out = dict(tokens=list(r.tokens), decode_s=m["decode_s"],
             decode_tps=(n - 1) / m["decode_s"],
             prefill_ms=1e3 * m["prefill_s"],
             e2e_tps=n / (m["prefill_s"] + m["decode_s"]),
             compile_s=m["compile_s"], tau=m.get("tau", 1.0),
             target_calls=calls,
             ms_per_round=1e3 * m["decode_s"] / max(calls - 1, 1))
  if "accept_rate_by_depth" in m:
    out["accept_rate_by_depth"] = m["accept_rate_by_depth"]
  if "verify_width_rounds" in m:   # {width: rounds}, JSON keys
    out["verify_width_rounds"] = {str(w): int(c) for w, c in
                                  m["verify_width_rounds"].items()}
  return out


def alternating_orders(n: int, names: Sequence[str]) -> list[tuple[str, ...]]:
  """Run orders for n interleaved rounds: round i rotates `names` by i.

  With two systems this alternates "a, b" and "b, a", so neither always runs
  first (warm caches, CPU frequency and background load even out).
  """
  names = tuple(names)
  k = len(names)
  return [names[i % k:] + names[:i % k] for i in range(n)]


# ---------------------------------------------------------------------- output


def package_version(name: str) -> Optional[str]:
  """Installed version of a distribution, or None (no import needed)."""
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def machine_info(packages: Sequence[str] = (
    "jax", "jaxlib", "flax", "numpy", "torch", "transformers")
                 ) -> dict[str, Any]:
  """Host, CPU, library versions and the UTC date, for a benchmark record."""
  cpu_model = None
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          cpu_model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    affinity = None
  try:
    load = list(os.getloadavg())
  except OSError:
    load = None
  now = datetime.datetime.now(datetime.timezone.utc)
  return dict(
      date=now.date().isoformat(),
      datetime_utc=now.isoformat(timespec="seconds"),
      hostname=platform.node(), platform=platform.platform(),
      python=platform.python_version(), cpu_model=cpu_model,
      cpu_count=os.cpu_count(), cpu_affinity=affinity,
      load_average_1_5_15=load,
      versions={p: package_version(p) for p in packages})


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON, atomically (`write_text_atomic`).

  Creates the parent directory. A reader never sees a half-written file, and
  a failed run leaves any earlier result in place.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def markdown_table(headers: Sequence[str],
                   rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub-flavoured Markdown table.

  Cells are shown with `str` (format floats first); None is shown as "-".
  """
  def cell(v):
    return "-" if v is None else str(v).replace("|", "\\|")
  for r in rows:
    if len(r) != len(headers):
      raise ValueError(f"row {r!r} has {len(r)} cells, expected "
                       f"{len(headers)}")
  lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
  return "\n".join(lines)


def fmt_stats(stats: Optional[Mapping[str, float]], digits: int = 1) -> str:
  """"median [p10-p90]" of a `summarize` dict, e.g. "27.8 [25.1-29.0]"."""
  if not stats:
    return "-"
  return (f"{stats['median']:.{digits}f} "
          f"[{stats['p10']:.{digits}f}-{stats['p90']:.{digits}f}]")
