"""Sharded decoding per mesh: compile time and the collectives of one step.

  python launch/bench_sharded.py                          # tiny, 8 devices
  python launch/bench_sharded.py --model=smollm2-135m-instruct \\
      --meshes=data:8,model:1+data:2,model:4 --spec=ngram/chain4

On a CPU host the devices are simulated (8 unless XLA_FLAGS says
otherwise), so wall-clock ratios between meshes mean nothing here; what a
mesh costs on real hardware is its collectives. For each mesh: what stays
replicated (`sharding.plan_params`), the compile time of prefill and of
one decode step, and the step's collectives from the optimized HLO (count
and bytes by kind: all-reduce, all-gather, reduce-scatter, all-to-all,
collective-permute), with whether the tokens equal a one-device run's.
Prints JSON.
"""

import os
import sys

if "jax" not in sys.modules and "--xla_force_host_platform_device_count" \
    not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

import json  # pylint: disable=g-import-not-at-top,g-bad-import-order
import time  # pylint: disable=g-import-not-at-top,g-bad-import-order

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from seqdec import cli  # pylint: disable=g-import-not-at-top

_MODEL = flags.DEFINE_string("model", "tiny", "Registry name, HF dir or .gguf.")
_SPEC = flags.DEFINE_string("spec", "ngram/chain4", "Decoding method.")
_MESHES = flags.DEFINE_string(
    "meshes", "data:8,model:1+data:4,model:2+data:2,model:4+data:1,model:8",
    "Meshes separated by '+'.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows.")
_NEW = flags.DEFINE_integer("max_new_tokens", 16, "Tokens per row.")

def run() -> dict:
  # pylint: disable=g-import-not-at-top
  import jax
  import seqdec
  from seqdec.parallel import sharding
  # pylint: enable=g-import-not-at-top
  model, tok = seqdec.load_pretrained(_MODEL.value)
  prompts = [f"Row {i}: count from {i} to {i + 5}." for i in range(
      _BATCH.value)]
  kw = dict(max_new_tokens=_NEW.value, eos_ids=())
  want = [r.tokens for r in seqdec.Generator(model, tok, _SPEC.value,
                                             **kw).generate(prompts)]
  rows = []
  for spec in _MESHES.value.split("+"):
    mesh = sharding.make_mesh(spec)
    gen = seqdec.Generator(model, tok, _SPEC.value, mesh=mesh, **kw)
    loop, inputs = gen.program_inputs(len(prompts), max(
        len(gen.encode(p)) for p in prompts))
    t0 = time.perf_counter()
    gen.programs.get("prefill", loop, gen.loop_params, inputs)
    t1 = time.perf_counter()
    step = gen.programs.get("step", loop, gen.loop_params, inputs)
    t2 = time.perf_counter()
    got = [r.tokens for r in gen.generate(prompts)]
    rows.append(dict(
        mesh=spec, replicated=dict(gen.sharding_plan.replicated),
        compile_prefill_s=round(t1 - t0, 2), compile_step_s=round(t2 - t1, 2),
        step_collectives={k: dict(count=v["count"], bytes=v["bytes"])
                          for k, v in sharding.collectives(
                              step.as_text()).items()},
        same_tokens_as_one_device=got == want))
  return dict(model=_MODEL.value, spec=_SPEC.value, devices=jax.device_count(),
              platform=jax.default_backend(), batch_size=_BATCH.value,
              meshes=rows)


main = cli.json_main(run)


if __name__ == "__main__":
  app.run(main)
