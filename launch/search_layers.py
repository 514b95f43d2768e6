"""Searches the layer subset of a layer-skip drafter (greedy, teacher-forced).

  python launch/search_layers.py --model=gemma3-270m --per_category=1 \\
      --output=benchmarks/results/gemma3_layer_search.json
  python launch/search_layers.py --model=tiny --categories=qa \\
      --per_category=1 --max_new_tokens=8          # smoke run

Data: the model's prompt set (`seqdec.bench.model_prompt_set`), the first
--per_category prompts of each category, each continued greedily by the
model itself for --max_new_tokens tokens; every continuation position is the
root of a round. The target runs once; each candidate subset runs the kept
blocks against the target's K/V (`seqdec.decoding.layer_search`), scoring
top-1 agreement with the target's argmax. The greedy path drops one block
per step; the best point under the cost model
`tau(g, a) / (verify_cost + g * |S| / L)` is printed with its layer spec
(`--config.spec` `layerskip@layers=<spec>/chain<g>`). --verify_cost=1 is an
accelerator (a verify costs one decoding step); on a CPU host, pass the ratio
the bench's phase split measures (verify ms / AR step ms).
"""

import json
import sys
import time

from absl import app
from absl import flags

from seqdec import bench
from seqdec import cli
from seqdec.errors import UserError

_MODEL = flags.DEFINE_string(
    "model", "smollm2-135m-instruct",
    "Target: a registry name, HF dir or .gguf (a seqdec.bench.BENCH_MODELS "
    "name uses its own prompt set).")
_CATEGORIES = flags.DEFINE_list("categories", None, "Default: all six.")
_PER_CATEGORY = flags.DEFINE_integer(
    "per_category", 1, "First k prompts per category (0: all).")
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", 48, "Continuation tokens per prompt (= roots).")
_MIN_KEEP = flags.DEFINE_integer(
    "min_keep", 0, "Stop the path at this many kept blocks (0: L // 4).")
_VERIFY_COST = flags.DEFINE_float(
    "verify_cost", 1.0, "Verify cost in decoding steps (cost model).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON record to write.")


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def check_flags() -> None:
  if _MAX_NEW_TOKENS.value < 1:
    raise UserError(f"--max_new_tokens must be >= 1, got "
                     f"{_MAX_NEW_TOKENS.value}")
  if _PER_CATEGORY.value < 0:
    raise UserError(f"--per_category must be >= 0, got {_PER_CATEGORY.value}")
  if _VERIFY_COST.value <= 0:
    raise UserError(f"--verify_cost must be > 0, got {_VERIFY_COST.value}")


def search() -> dict:
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from seqdec.decoding import layer_search
  from seqdec.decoding.loops import bucket
  # pylint: enable=g-import-not-at-top
  t_start = time.perf_counter()
  n = _MAX_NEW_TOKENS.value
  prompts = bench.model_prompt_set(
      _MODEL.value, categories=_CATEGORIES.value or bench.CATEGORIES,
      per_category=_PER_CATEGORY.value or None)
  model, _, inputs, results = bench.continuations(_MODEL.value, prompts, n)
  num_layers = model.config.num_layers
  min_keep = _MIN_KEEP.value or max(1, num_layers // 4)
  if not 1 <= min_keep < num_layers:
    raise UserError(f"--min_keep must be in [1, {num_layers - 1}], got "
                    f"{min_keep}")
  seqs = [list(i) + list(r.tokens) for i, r in zip(inputs, results)]
  tokens = np.zeros((len(seqs), bucket(max(map(len, seqs)))), np.int32)
  valid = np.zeros((len(seqs), n), bool)
  for b, (seq, r) in enumerate(zip(seqs, results)):
    tokens[b, :len(seq)] = seq
    valid[b, :len(r.tokens)] = True
  first_root = np.array([len(i) - 1 for i in inputs], np.int32)
  log(f"search_layers: {len(prompts)} prompts x {n} roots, L={num_layers}, "
      f"path down to {min_keep} blocks")
  agreement = layer_search.agreement_fn(model, tokens, first_root, n, valid)
  path = layer_search.greedy_search(agreement, num_layers, min_keep, log=log)
  step, g, speed = layer_search.best_chain(path, num_layers,
                                           _VERIFY_COST.value)
  record = dict(
      target=_MODEL.value, num_layers=num_layers, roots=int(valid.sum()),
      prompts=[p.id for p in prompts], verify_cost=_VERIFY_COST.value,
      command="python launch/search_layers.py " + " ".join(sys.argv[1:]),
      path=[dict(kept=len(s.keep), layers=layer_search.as_spec(s.keep),
                 agreement=round(s.agreement, 4)) for s in path],
      best=dict(layers=layer_search.as_spec(step.keep), kept=len(step.keep),
                agreement=round(step.agreement, 4), chain=g,
                predicted_tau=round(layer_search.chain_tau(step.agreement, g),
                                    3),
                predicted_speedup=round(speed, 3),
                spec=f"layerskip@layers={layer_search.as_spec(step.keep)}"
                     f"/chain{g}"),
      seconds=round(time.perf_counter() - t_start, 1),
      machine=bench.machine_info(packages=("jax", "jaxlib", "flax")))
  if _OUTPUT.value:
    bench.write_json(_OUTPUT.value, record)
  return record


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.run_reporting_user_errors(check_flags)
  record = cli.run_reporting_user_errors(search)
  print(json.dumps(dict(best=record["best"], path=record["path"],
                        seconds=record["seconds"]), indent=2))


if __name__ == "__main__":
  app.run(main)
