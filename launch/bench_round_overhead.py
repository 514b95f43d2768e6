r"""What a speculative round costs when it verifies no draft, against a
decoding step (issue 15: "rounds without a draft cost one step").

A round whose rows all lack a draft node (no n-gram match, or every row
gated) verifies the roots alone. It should cost an autoregressive step plus
the drafter's proposal, nothing more. This times, in one process and in
alternating order, on the frozen prompts of --category:

    ar            the autoregressive decoder: ms per step
    closed        n-gram chain(--depth) with a gate no round passes: every
                  round verifies the root alone (ms per round, tau = 1)
    open          the same drafter ungated (ms per round; ms per token)

and prints JSON: medians over prompts x repeats, and closed / ar.

    .venv/bin/python launch/bench_round_overhead.py --category=qa
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from seqdec import bench  # noqa: E402
from seqdec import cli  # noqa: E402
from seqdec.errors import UserError  # noqa: E402

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Target.")
_PRECISION = flags.DEFINE_string("precision", "f32_packed",
                                 "Target precision policy.")
_CATEGORY = flags.DEFINE_string("category", "qa", "Prompt category.")
_PROMPTS = flags.DEFINE_integer("prompts", 4, "Prompts of the category.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Alternating passes.")
_DEPTH = flags.DEFINE_integer("depth", 4, "Chain depth of the drafter.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "N.")

def run() -> dict:
  # pylint: disable=g-import-not-at-top
  import numpy as np
  import seqdec
  from seqdec.generator import Generator
  # pylint: enable=g-import-not-at-top
  if _CATEGORY.value not in bench.CATEGORIES:
    raise UserError(f"unknown --category {_CATEGORY.value!r}; expected one "
                    f"of {list(bench.CATEGORIES)}")
  if min(_PROMPTS.value, _REPEATS.value, _DEPTH.value) < 1:
    raise UserError("--prompts, --repeats and --depth must be >= 1")
  model, tok = seqdec.load_pretrained(_MODEL.value,
                                      precision=_PRECISION.value)
  prompts = bench.model_prompt_set(_MODEL.value, [_CATEGORY.value],
                                   _PROMPTS.value)
  n = _MAX_NEW.value
  kw = dict(max_new_tokens=n, eos_ids=(), max_batch=1)
  chain = dict(drafter="ngram", tree=f"chain{_DEPTH.value}")
  gens = {"ar": Generator(model, tok, None, **kw),
          "closed": Generator(model, tok, gate=bench.CLOSED_GATE, **chain,
                              **kw),
          "open": Generator(model, tok, **chain, **kw)}
  ids = [gens["ar"].encode(p.as_input()) for p in prompts]
  for g in gens.values():                      # compile every bucket
    for i in ids:
      bench.decode_one(g, i, n)
  rows = {k: [] for k in gens}
  for rep in range(_REPEATS.value):
    for order, i in zip(bench.alternating_orders(len(ids), list(gens)),
                        ids):
      for k in order if rep % 2 == 0 else reversed(order):
        rows[k].append(bench.decode_one(gens[k], i, n))
  med = lambda k, f: float(np.median([f(r) for r in rows[k]]))  # noqa: E731
  out = {k: dict(ms_per_round=round(med(k, lambda r: r["ms_per_round"]), 3),
                 ms_per_token=round(med(k, lambda r: 1e3 * r["decode_s"]
                                        / (n - 1)), 3),
                 tau=round(med(k, lambda r: r["tau"]), 3))
         for k in gens}
  return dict(benchmark="round_overhead", model=_MODEL.value,
              precision=_PRECISION.value, category=_CATEGORY.value,
              prompts=len(ids), repeats=_REPEATS.value,
              tree=chain["tree"], max_new_tokens=n, **out,
              closed_round_over_ar_step=round(
                  out["closed"]["ms_per_round"] / out["ar"]["ms_per_round"],
                  4),
              machine=bench.machine_info(packages=("jax", "jaxlib")))


main = cli.json_main(run)


if __name__ == "__main__":
  app.run(main)
