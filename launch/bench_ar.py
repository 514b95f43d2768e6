"""Greedy autoregressive decoding: seqdec vs HF transformers on this CPU.

  python launch/bench_ar.py                 # 48 prompts, 64 new tokens each
  python launch/bench_ar.py --quick         # 1 prompt per category, 32 tokens
  python launch/bench_ar.py --categories=rewrite,code --max_new_tokens=128
  python launch/bench_ar.py --model=gemma3-270m --output=benchmarks/results/ar_gemma3.json

Prints a JSON summary and a Markdown table to stdout and writes the full
record (config, machine, compile times, per-category and overall statistics,
every prompt's timings and token agreement) to `--output`. Progress goes to
stderr.

Method
------
* Weights (`--model`): SmolLM2-135M-Instruct (default) or Gemma-3-270M,
  from one GGUF file, dequantised to float32
  on both sides (seqdec by its own reader, `seqdec.load_pretrained(path)`;
  HF by `AutoModelForCausalLM.from_pretrained(dir, gguf_file=f,
  dtype=torch.float32)`). Batch size 1; torch uses `--num_threads` (2)
  intra-op threads; XLA uses the machine's cores.
* Prompts: the model's frozen set (`seqdec.bench.BENCH_MODELS`):
  benchmarks/prompts (chat) for SmolLM2, benchmarks/prompts_base (plain-text
  continuations) for the base Gemma-3-270M; see their READMEs. Each side
  encodes with its own tokenizer (and chat template); the ids are compared
  (the count of agreeing prompts is reported) and seqdec's ids are fed to
  both, so both decode exactly the same input.
* Exactly N new tokens on both sides, pure argmax at every step: seqdec's
  `Generator(..., eos_ids=())`; HF `generate(ids, max_new_tokens=N,
  min_new_tokens=N, do_sample=False, eos_token_id=[])`. The HF stop id is
  removed as well: with it, `min_new_tokens` sets the EOS logit to -inf
  until N tokens exist, so HF would pick the runner-up wherever EOS is the
  argmax while seqdec picks EOS, and the two sequences would differ for a
  reason that has nothing to do with numerics.
* Warm-up and compilation: for every shape bucket (seqdec's padded prompt
  length; N is fixed) one untimed seqdec run and one untimed HF run on the
  first prompt of that bucket precede all timed runs. seqdec's compile time
  is its `metrics["compile_s"]` in those runs and is reported separately;
  a timed run that compiled anything (compile_s > 0) is flagged.
* Interleaving: prompt i runs seqdec then HF for even i, HF then seqdec for
  odd i, so slow drifts in machine load hit both sides alike.
* Definitions (the same for both sides). After the prompt, N tokens need
  one prefill forward (whose last logits give token 1) and N - 1 forward
  steps of one token each.
  - prefill ms: one forward over the prompt that fills the KV cache and
    gives the last position's logits. seqdec: `metrics["prefill_s"]` (its
    prefill program, blocked on). HF: a separately timed
    `model(ids, use_cache=True, logits_to_keep=1)`, which is the call
    `generate` makes for its first step.
  - decode tokens/s = (N - 1) / decode_s. seqdec: `metrics["decode_s"]`
    (the jitted while_loop: N - 1 steps and N greedy picks). HF:
    decode_s = T(generate, N new) - T(generate, 1 new), both timed end to
    end on the same ids: they share the set-up and the prefill, so the
    difference is exactly the N - 1 incremental steps (forward with
    `DynamicCache`, logits processing, greedy pick, stopping checks).
  - end-to-end tokens/s = N / (prefill + decode) for seqdec and
    N / T(generate, N new) for HF.
  Statistics are medians and p10/p90 over prompts, per category and
  overall; ratios are seqdec / HF of the medians (decode tokens/s > 1 and
  prefill ms < 1 mean seqdec is faster), plus the median of the per-prompt
  (paired) decode ratios.
* Token agreement: the greedy sequences are compared; float32 round-off can
  flip a near-tied argmax, after which the sequences differ. For each
  divergent prompt the first divergence position, both tokens and HF's
  top-1/top-2 log-probability margin at that position (an untimed forward
  after all timing) are reported.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # pylint: disable=g-import-not-at-top,g-bad-import-order
import time  # pylint: disable=g-import-not-at-top,g-bad-import-order

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from seqdec import bench  # pylint: disable=g-import-not-at-top

_MODEL = bench.define_model_flag()
_GGUF = flags.DEFINE_string(
    "gguf", None, "GGUF file for both sides (default: --model's).")
_PROMPTS_DIR = flags.DEFINE_string(
    "prompts_dir", None, "Prompt-set directory (default: --model's).")
_CATEGORIES = flags.DEFINE_list(
    "categories", None, "Categories to run (default: all six).")
_PER_CATEGORY = flags.DEFINE_integer(
    "per_category", None, "First k prompts of each category (default: all; "
    "1 with --quick).")
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", 64, "Exactly this many new tokens per prompt (32 with "
    "--quick unless given).")
_QUICK = flags.DEFINE_bool(
    "quick", False, "Smoke run: 1 prompt per category and 32 new tokens.")
_NUM_THREADS = flags.DEFINE_integer(
    "num_threads", 2, "torch intra-op threads.")
_OUTPUT = flags.DEFINE_string(
    "output", "benchmarks/results/ar.json", "Full JSON record.")

SEQDEC, HF = "seqdec", "hf"


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def run_hf(hf, ids, n: int) -> dict:
  prefill_s = hf.prefill_s(ids)
  _, gen1_s = hf.generate(ids, 1)
  toks, genn_s = hf.generate(ids, n)
  decode_s = genn_s - gen1_s
  return dict(tokens=toks, prefill_ms=1e3 * prefill_s, generate_1_s=gen1_s,
              generate_n_s=genn_s, decode_s=decode_s,
              decode_tps=(n - 1) / decode_s if decode_s > 0 else None,
              e2e_tps=n / genn_s)


def summarize_group(rows, bench) -> dict:
  """Statistics of one group of per-prompt rows (a category or all)."""
  out = dict(n=len(rows))
  for side in (SEQDEC, HF):
    out[side] = {}
    for k in ("decode_tps", "prefill_ms", "e2e_tps"):
      vals = [r[side][k] for r in rows if r[side][k] is not None]
      out[side][k] = bench.summarize(vals) if vals else None
  for k in ("decode_tps", "prefill_ms", "e2e_tps"):
    a, b = out[SEQDEC][k], out[HF][k]
    out[f"ratio_{k}"] = bench.ratio(a["median"], b["median"]) if (
        a and b) else None
  paired = [r[SEQDEC]["decode_tps"] / r[HF]["decode_tps"] for r in rows
            if r[HF]["decode_tps"]]
  out["paired_ratio_decode_tps"] = bench.summarize(paired) if paired else None
  out["identical_tokens"] = sum(r["identical"] for r in rows)
  return out


def _fmt(x, digits: int = 2) -> str:
  return "-" if x is None else f"{x:.{digits}f}"


def table(summary, bench) -> str:
  """The Markdown table: one row per category and an overall row."""
  headers = ["category", "n", "seqdec decode tok/s", "HF decode tok/s",
             "ratio", "seqdec prefill ms", "HF prefill ms", "ratio",
             "same tokens"]
  rows = []
  groups = list(summary["by_category"].items()) + [
      ("**overall**", summary["overall"])]
  for name, g in groups:
    rows.append([
        name, g["n"], bench.fmt_stats(g[SEQDEC]["decode_tps"]),
        bench.fmt_stats(g[HF]["decode_tps"]), _fmt(g["ratio_decode_tps"]),
        bench.fmt_stats(g[SEQDEC]["prefill_ms"], 0),
        bench.fmt_stats(g[HF]["prefill_ms"], 0),
        _fmt(g["ratio_prefill_ms"]), f"{g['identical_tokens']}/{g['n']}"])
  return bench.markdown_table(headers, rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # pylint: disable=g-import-not-at-top
  import seqdec
  from hf_baseline import HFSide
  from seqdec.decoding.loops import bucket
  # pylint: enable=g-import-not-at-top

  load_at_start = bench.machine_info()["load_average_1_5_15"]
  n, per_category = bench.quick_settings(
      _QUICK.value, _MAX_NEW_TOKENS.value,
      flags.FLAGS["max_new_tokens"].present, _PER_CATEGORY.value)
  if n < 2:
    raise app.UsageError("--max_new_tokens must be >= 2 (decode has N - 1 "
                         "steps)")
  model_gguf, model_prompts, expected = bench.bench_model(_MODEL.value)
  prompts_dir = os.path.abspath(_PROMPTS_DIR.value or model_prompts)
  prompts = bench.load_prompt_set(
      prompts_dir, categories=_CATEGORIES.value or bench.CATEGORIES,
      per_category=per_category,
      expected_per_category=None if _PROMPTS_DIR.value else expected)
  gguf_path = os.path.abspath(_GGUF.value or model_gguf)
  config = dict(model=_MODEL.value, gguf=gguf_path, max_new_tokens=n,
                quick=_QUICK.value,
                per_category=per_category, num_prompts=len(prompts),
                categories=sorted({p.category for p in prompts},
                                  key=list(bench.CATEGORIES).index),
                batch_size=1, num_threads_torch=_NUM_THREADS.value,
                prompts_dir=prompts_dir)
  log(f"bench_ar: {len(prompts)} prompts, N={n}, {gguf_path}")

  with bench.Stopwatch() as sw:
    model, tokenizer = seqdec.load_pretrained(gguf_path)
  load = dict(seqdec_s=sw.seconds)
  gen = seqdec.Generator(model, tokenizer, max_new_tokens=n, eos_ids=())
  with bench.Stopwatch() as sw:
    hf = HFSide(gguf_path, _NUM_THREADS.value)
  load["hf_s"] = sw.seconds
  log(f"loaded: seqdec {load['seqdec_s']:.1f} s, HF {load['hf_s']:.1f} s")

  # Inputs: each side's own chat template; seqdec's ids feed both.
  inputs = []
  for p in prompts:
    ids = gen.encode(p.as_input())
    hf_ids = hf.encode(p.as_input())
    inputs.append((p, ids, ids == hf_ids))
    if ids != hf_ids:
      log(f"  {p.id}: tokenizers disagree (seqdec {len(ids)} ids, HF "
          f"{len(hf_ids)}, first difference at "
          f"{bench.first_divergence(ids, hf_ids)}); using seqdec's ids")

  # Warm-up: one untimed run per side and shape bucket.
  warmups = []
  for b in sorted({bucket(len(ids)) for _, ids, _ in inputs}):
    p, ids, _ = next(x for x in inputs if bucket(len(x[1])) == b)
    t0 = time.perf_counter()
    s = bench.decode_one(gen, ids, n)
    t1 = time.perf_counter()
    run_hf(hf, ids, n)
    t2 = time.perf_counter()
    warmups.append(dict(prompt_bucket=b, new_bucket=bucket(n), prompt=p.id,
                        seqdec_compile_s=s["compile_s"],
                        seqdec_warmup_s=t1 - t0, hf_warmup_s=t2 - t1))
    log(f"warm-up bucket {b}: seqdec compile {s['compile_s']:.1f} s "
        f"(run {t1 - t0:.1f} s), HF {t2 - t1:.1f} s")

  # Timed, interleaved runs.
  rows = []
  orders = bench.alternating_orders(len(inputs), (SEQDEC, HF))
  for (p, ids, ids_agree), order in zip(inputs, orders):
    res = {}
    for side in order:
      res[side] = bench.decode_one(gen, ids, n) if side == SEQDEC else run_hf(
          hf, ids, n)
    div = bench.first_divergence(res[SEQDEC]["tokens"], res[HF]["tokens"])
    row = dict(id=p.id, category=p.category, prompt_tokens=len(ids),
               prompt_bucket=bucket(len(ids)), prompt_ids_agree=ids_agree,
               order=list(order), identical=div is None,
               first_divergence=div, seqdec=res[SEQDEC], hf=res[HF])
    rows.append(row)
    hf_tps = res[HF]["decode_tps"]
    log(f"  {p.id:16s} P={len(ids):4d}  seqdec "
        f"{res[SEQDEC]['decode_tps']:6.1f} tok/s "
        f"{res[SEQDEC]['prefill_ms']:6.0f} ms | HF "
        f"{hf_tps if hf_tps is not None else float('nan'):6.1f} tok/s "
        f"{res[HF]['prefill_ms']:6.0f} ms | "
        f"{'same' if div is None else f'diverge@{div}'}")

  # Untimed: HF's margin where the greedy sequences first differ.
  divergences = []
  for (p, ids, _), row in zip(inputs, rows):
    d = row["first_divergence"]
    if d is None:
      continue
    s_toks, h_toks = row[SEQDEC]["tokens"], row[HF]["tokens"]
    top2, margin = hf.top2_margin(ids + s_toks[:d])
    divergences.append(dict(
        id=p.id, position=d, seqdec_token=s_toks[d], hf_token=h_toks[d],
        hf_top2=top2, hf_top2_logprob_margin=margin))
    row["hf_top2_logprob_margin_at_divergence"] = margin

  for row in rows:
    row["seqdec"]["text"] = tokenizer.decode(row["seqdec"]["tokens"],
                                             skip_special_tokens=False)
  compiled_in_timed = [r["id"] for r in rows if r[SEQDEC]["compile_s"] > 0]
  summary = dict(
      overall=summarize_group(rows, bench),
      by_category={c: summarize_group(g, bench) for c, g in bench.group_by(
          rows, "category", bench.CATEGORIES).items()})
  machine = bench.machine_info()
  machine["load_average_1_5_15_at_start"] = load_at_start
  record = dict(
      benchmark="autoregressive greedy, seqdec vs HF transformers",
      config=config, machine=machine, load=load,
      compile=dict(seqdec_compile_s_total=sum(w["seqdec_compile_s"]
                                              for w in warmups),
                   warmups=warmups, timed_runs_that_compiled=compiled_in_timed),
      agreement=dict(
          prompts=len(rows),
          prompt_ids_agree=sum(r["prompt_ids_agree"] for r in rows),
          identical_tokens=sum(r["identical"] for r in rows),
          divergences=divergences),
      summary=summary, table_markdown=table(summary, bench),
      per_prompt=rows)
  bench.write_json(_OUTPUT.value, record)

  brief = {k: record[k] for k in ("benchmark", "config", "machine", "load",
                                  "compile", "agreement")}
  brief["summary"] = {
      "overall": {k: summary["overall"][k] for k in (
          "n", "ratio_decode_tps", "ratio_prefill_ms", "ratio_e2e_tps",
          "identical_tokens")},
  }
  for side in (SEQDEC, HF):
    for k in ("decode_tps", "prefill_ms"):
      st = summary["overall"][side][k]
      brief["summary"][f"{side}_{k}_median"] = st and st["median"]
  brief["output"] = os.path.abspath(_OUTPUT.value)
  print(json.dumps(brief, indent=2))
  print()
  print(f"Greedy decoding, batch 1, N={n} new tokens, {len(rows)} prompts; "
        f"median [p10-p90] over prompts; ratio = seqdec / HF of medians.")
  print()
  print(record["table_markdown"])


if __name__ == "__main__":
  app.run(main)
