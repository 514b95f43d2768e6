"""Predicted cost and speed of AR and speculative decoding on a TPU v5e-8.

  python launch/tpu_estimates.py                       # JSON + markdown
  python launch/tpu_estimates.py --context=4096 --batch=8

For SmolLM2-135M (8 replicas, one per chip: it fits one chip many times
over), Gemma-3-270M (likewise) and a 7B Llama (Llama-2-7B, tensor-parallel
over the 8 chips), per decoding step and per speculative round: HBM bytes,
FLOPs and ICI bytes per chip, and the predicted tokens/s of autoregressive
and speculative decoding at the tau this repo measured on CPU (the files
named in each row). The cost model and its formulas: `seqdec.roofline`.
Predictions, not measurements: no TPU is available to this project.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags

from seqdec import roofline
from seqdec.decoding import spec as spec_lib
from seqdec.models.config import PRESETS

_BATCH = flags.DEFINE_integer("batch", 1, "Rows per replica.")
_CONTEXT = flags.DEFINE_integer("context", 1024, "Cached tokens per row.")
_LATENCY = flags.DEFINE_float(
    "allreduce_latency_us", 10.0, "Assumed fixed cost of one all-reduce "
    "over the 8 chips (not measured).")

# (method, tree spec, tau measured here, where, drafter: (layers, head
# rows) per level, or None for a weightless drafter).
SMOLLM2_METHODS = [
    ("ngram/chain4", "ngram/chain4", 1.26,
     "benchmarks/results/spec.md (12 prompts, T=0)", None),
    ("layerskip skip:4-15 / sequoia8", "layerskip/sequoia8:configs/acceptance/"
     "smollm2_layerskip-skip4-15_t0.json", 1.76,
     "benchmarks/results/spec.md", (18, None)),
    ("eagle (shipped) / kary2x2x1, low", "eagle/kary2x2x1", 1.33,
     "seqdec/checkpoints/shipped/smollm2-135m-instruct-eagle/README.md",
     (1, 8192)),
    ("eagle (shipped) / kary2x2x1, high", "eagle/kary2x2x1", 1.68,
     "seqdec/checkpoints/shipped/smollm2-135m-instruct-eagle/README.md",
     (1, 8192)),
]
GEMMA_METHODS = [
    ("ngram/chain4", "ngram/chain4", 2.18,
     "benchmarks/results/spec_gemma3.md (12 prompts, T=0)", None),
]
# Llama-2-7B: no 7B was run here; the SmolLM2 tau values stand in.
LLAMA_METHODS = [
    ("ngram/chain4 (SmolLM2's tau)", "ngram/chain4", 1.26,
     "SmolLM2, benchmarks/results/spec.md", None),
    ("eagle-style 1 layer / kary2x2x1 (SmolLM2's tau, high)",
     "eagle/kary2x2x1", 1.68, "SmolLM2 shipped EAGLE", (1, 8192)),
]
DEPLOYMENTS = [("smollm2-135m", 1, SMOLLM2_METHODS),
               ("gemma3-270m", 1, GEMMA_METHODS),
               ("llama-2-7b", 8, LLAMA_METHODS)]


def tree_levels(spec: str) -> tuple[int, list[int]]:
  """(nodes, widths of the levels a drafter expands) of a tree spec."""
  shape = spec_lib.build_tree(spec_lib.SpecConfig.parse(spec))
  widths = [hi - lo for lo, hi in shape.levels]
  return shape.num_nodes, widths[:-1]


def estimate(model: str, chips: int, methods, batch: int, context: int,
             latency: float) -> dict:
  c = PRESETS[model]
  chip = roofline.TPU_V5E
  replicas = 8 // chips

  def seconds(n, layers=None, head_rows=None):
    cost = roofline.forward_cost(c, batch=batch, new_tokens=n,
                                 context=context, chips=chips, layers=layers,
                                 head_rows=head_rows)
    return cost, roofline.predicted_seconds(cost, chip, latency)

  step_cost, step = seconds(1)
  out = dict(model=model, chips_per_replica=chips, replicas=replicas,
             parameters=roofline.parameter_counts(c)["total"],
             step=dict(hbm_mb=round(step_cost["bytes"] / 1e6, 1),
                       gflop=round(step_cost["flops"] / 1e9, 3),
                       ici_kb=round(step_cost["ici_bytes"] / 1e3, 1),
                       predicted_ms=round(1e3 * step, 3),
                       tokens_per_s=round(replicas * batch / step, 1)),
             methods=[])
  for name, spec, tau, source, drafter in methods:
    nodes, widths = tree_levels(spec)
    vcost, verify = seconds(nodes)
    draft = 0.0
    if drafter is not None:
      draft = sum(seconds(w, drafter[0], drafter[1])[1] for w in widths)
    rate = replicas * batch * tau / (verify + draft)
    out["methods"].append(dict(
        method=name, tree_nodes=nodes, tau=tau, tau_source=source,
        verify_ms=round(1e3 * verify, 3), draft_ms=round(1e3 * draft, 3),
        verify_over_step=round(verify / step, 2),
        verify_gflop=round(vcost["flops"] / 1e9, 2),
        round_ici_kb=round(vcost["ici_bytes"] / 1e3, 1),
        tokens_per_s=round(rate, 1),
        speedup=round(rate / out["step"]["tokens_per_s"], 2)))
  return out


def markdown(results: list[dict], batch: int, context: int,
             latency_us: float) -> str:
  lines = [f"TPU v5e-8, bf16, batch {batch} per replica, context {context}, "
           f"all-reduce latency {latency_us:g} us (assumed).", "",
           "| model | chips/replica | step HBM MB/chip | step GFLOP/chip | "
           "step ICI KB/chip | step ms | AR tok/s (v5e-8) |",
           "|---|---|---|---|---|---|---|"]
  for r in results:
    s = r["step"]
    lines.append(f"| {r['model']} | {r['chips_per_replica']} | "
                 f"{s['hbm_mb']} | {s['gflop']} | {s['ici_kb']} | "
                 f"{s['predicted_ms']} | {s['tokens_per_s']} |")
  lines += ["", "| model | method | nodes | tau (measured on CPU) | verify ms "
            "| verify / step | draft ms | spec tok/s | vs AR |",
            "|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    for m in r["methods"]:
      lines.append(f"| {r['model']} | {m['method']} | {m['tree_nodes']} | "
                   f"{m['tau']} | {m['verify_ms']} | {m['verify_over_step']} "
                   f"| {m['draft_ms']} | {m['tokens_per_s']} | "
                   f"{m['speedup']} |")
  return "\n".join(lines)


def main(argv):
  del argv
  latency = _LATENCY.value * 1e-6
  results = [estimate(model, chips, methods, _BATCH.value, _CONTEXT.value,
                      latency) for model, chips, methods in DEPLOYMENTS]
  print(json.dumps(dict(chip=roofline.TPU_V5E.name,
                        source=roofline.TPU_V5E.source, batch=_BATCH.value,
                        context=_CONTEXT.value,
                        allreduce_latency_us=_LATENCY.value,
                        results=results), indent=1))
  print(markdown(results, _BATCH.value, _CONTEXT.value, _LATENCY.value))


if __name__ == "__main__":
  app.run(main)
