"""Greedy speculative decoding on a trained Mamba-2 or hybrid target (issue
17): tau, ms per round and speedup over autoregressive decoding, per
drafter and tree, on held-out Python source.

  python launch/train.py --config=configs/ssm_lm.py:arch=hybrid \\
      --workdir=/tmp/hyb --export_hf=/tmp/hyb/hf
  python launch/bench_ssm_spec.py --model=/tmp/hyb/hf \\
      --output=benchmarks/results/ssm_spec_hybrid.json
  python launch/bench_ssm_spec.py --model=tiny-hybrid --prompts=2 \\
      --max_new_tokens=16 --methods=ar,ngram/chain4 --output=/tmp/x.json

Method
------
* Target: `--model` (an HF directory written by `launch/train.py
  --export_hf`, or a registry name), float32, batch 1, greedy, exactly N new
  tokens (no stop id).
* Prompts: the validation split of the training corpus
  (`seqdec.data.stdlib_corpus`, the stdlib's last files, never trained on):
  `--prompts` windows of `--prompt_bytes` bytes, evenly spaced, each
  starting after a newline; ids are the raw bytes (the model was trained on
  byte windows without BOS).
* Methods: `ar`, or `<drafter>[@key=value...]/<tree>` (the one method
  grammar, `seqdec.decoding.spec`): `ngram` (prompt lookup over prompt +
  output), `layerskip` (the target without the blocks of --layers' skip,
  reading the target's own caches and states), `draft` (the target's first
  --draft_layers blocks as an independent draft LM).
* Timing: every method runs once untimed per prompt-length bucket, then
  the timed runs interleave the methods in a rotating order per prompt.
  decode tokens/s = (N - 1) / decode seconds (the jitted loop after
  prefill); speedup = a method's median decode tokens/s over `ar`'s, both
  measured in this run. ms/round = decode seconds / target calls of the
  loop. tau = tokens per target call (the prefill counting as one).
* Sequoia trees (--sequoia): the drafter's per-rank greedy acceptance
  rates, teacher-forced on the target's own continuations of further
  held-out windows (alternate windows: disjoint from the timed prompts),
  give the DP-optimal tree of that many nodes (`seqdec.decoding.sequoia`).
* Agreement: each speculative run's tokens are compared with `ar`'s; a
  difference can only be a float32 near-tie (verification is exact argmax).
* Quality: the target's held-out loss on the validation split, in bits per
  byte (`--eval_batches` batches of 8 windows of 512 bytes: the trainer's
  final evaluation, the same windows).
"""

import json
import os
import re
import sys
import time

from absl import app
from absl import flags

from seqdec import bench

DEFAULT_METHODS = ("ar", "ngram/chain4", "ngram/kary2x1x1x1",
                   "ngram/chain8", "layerskip/chain2", "layerskip/kary2x1",
                   "draft/chain2", "draft/chain4", "draft/kary2x2x1")

_MODEL = flags.DEFINE_string("model", None, "HF directory or model name.")
_METHODS = flags.DEFINE_list("methods", list(DEFAULT_METHODS),
                             "ar, or <drafter>[@key=value...]/<tree>.")
_LAYERS = flags.DEFINE_string("layers", "skip:3-6",
                              "Layer subset of the layerskip drafter.")
_DRAFT_LAYERS = flags.DEFINE_integer("draft_layers", 2,
                                     "Blocks of the truncated draft LM.")
_PROMPTS = flags.DEFINE_integer("prompts", 12, "Held-out prompts.")
_PROMPT_BYTES = flags.DEFINE_integer("prompt_bytes", 384, "Prompt length.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "New tokens.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 16,
                                     "Validation windows for bits per byte.")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/results/ssm_spec.json",
                              "JSON record (a Markdown table beside it).")
_SEQUOIA = flags.DEFINE_list(
    "sequoia", ["draft:16"],
    "<drafter>:<nodes> pairs: measure the drafter's per-rank acceptance on "
    "held-out windows disjoint from the timed prompts, write it beside "
    "--output, and add the method <drafter>/sequoia<nodes>:<that file>.")
_ACCEPT_PROMPTS = flags.DEFINE_integer(
    "acceptance_prompts", 8, "Held-out windows for the acceptance rates.")

AR = "ar"


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def held_out_prompts(valid, n: int, length: int) -> list[list[int]]:
  """`n` byte windows of the validation split, evenly spaced, each starting
  just after a newline (and not across a file separator)."""
  from seqdec.data.stdlib_corpus import SEPARATOR  # pylint: disable=g-import-not-at-top
  out = []
  for start in range(0, len(valid) - 2 * length, (len(valid) - 2 * length)
                     // n)[:n]:
    s = start
    while valid[s] != ord("\n") and s < start + length:
      s += 1
    window = valid[s + 1:s + 1 + length]
    if SEPARATOR in window:
      window = window[:list(window).index(SEPARATOR)]
    out.append([int(b) for b in window])
  return out


def held_out_bpb(model, valid, n_batches: int, batch: int = 8,
                 seq_len: int = 512) -> float:
  """`model`'s held-out loss in bits per byte: the trainer's evaluation
  (`lm.evaluate`) on the same windows (`Corpus.valid_batches` of
  configs/ssm_lm.py's batch 8 and length 512)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from seqdec.data.stdlib_corpus import Corpus  # pylint: disable=g-import-not-at-top
  from seqdec.train import lm  # pylint: disable=g-import-not-at-top
  batches = Corpus(train=valid, valid=valid).valid_batches(n_batches, batch,
                                                           seq_len)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return lm.evaluate(graphdef, params, rest, batches)["valid_bpb"]


def measure_acceptance(model, ar_gen, drafter_name: str, prompts, n: int,
                       path: str, max_rank: int = 8) -> dict:
  """Per-rank greedy acceptance rates of a model drafter (layerskip /
  draft), teacher-forced on the target's own greedy continuations of
  `prompts` (`rank_statistics`, as launch/measure_acceptance.py does on the
  chat prompts), written to `path` as an acceptance file for
  'sequoia<n>:<path>' trees."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from seqdec.decoding import acceptance_rates, rank_statistics, sequoia  # pylint: disable=g-import-not-at-top
  from seqdec.decoding import spec as spec_lib  # pylint: disable=g-import-not-at-top
  from seqdec.decoding.loops import bucket  # pylint: disable=g-import-not-at-top
  options = (dict(layers=_LAYERS.value) if drafter_name == "layerskip"
             else dict(draft_layers=_DRAFT_LAYERS.value))
  drafter = spec_lib.build_drafter(spec_lib.SpecConfig(
      drafter=drafter_name, options=tuple(options.items())), model)
  rows = []
  for ids, r in zip(prompts, ar_gen.generate_ids(prompts, max_new_tokens=n)):
    seq = list(ids) + list(r.tokens)
    tokens = np.zeros((1, bucket(len(seq))), np.int32)
    tokens[0, :len(seq)] = seq
    stats, _ = rank_statistics.rank_statistics(
        model, drafter, tokens, np.array([len(ids) - 1]), len(r.tokens), 0.0,
        max_rank)
    rows.append(stats[0, :len(r.tokens)].astype(np.float64))
  every = np.concatenate(rows)
  probs = every.mean(0)
  acceptance_rates.write_acceptance(
      path, probs, drafter=f"{drafter_name}@{options}", target=_MODEL.value,
      temperature=0.0, rule="greedy", trials=int(len(every)), max_rank=max_rank,
      max_new_tokens=n, command=" ".join(sys.argv),
      method="teacher-forced on the target's greedy continuations of "
             "held-out windows (launch/bench_ssm_spec.py)")
  return dict(path=path, probs=probs.tolist(), trials=int(len(every)),
              sequoia_tau={str(b): float(sequoia.optimal_taus(probs, 64)[b])
                           for b in (8, 16, 32)})


def summarize(rows, methods):
  out = {}
  ar_tps = bench.median(r[AR]["decode_tps"] for r in rows)
  for m in methods:
    tps = bench.median(r[m]["decode_tps"] for r in rows)
    div = [r[m]["tokens"] != r[AR]["tokens"] for r in rows]
    out[m] = dict(
        tau=sum(r[m]["tau"] for r in rows) / len(rows),
        decode_tps_median=tps, speedup=bench.ratio(tps, ar_tps),
        ms_per_round_median=bench.median(r[m]["ms_per_round"] for r in rows),
        prompts_differing_from_ar=int(sum(div)))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # pylint: disable=g-import-not-at-top
  import seqdec
  from seqdec.data.stdlib_corpus import Corpus
  from seqdec.decoding.loops import bucket
  from seqdec.decoding.spec import SpecConfig
  from seqdec.generator import Generator
  # pylint: enable=g-import-not-at-top
  if not _MODEL.value:
    raise app.UsageError("--model is required")
  methods = list(_METHODS.value)
  if AR not in methods:
    methods.insert(0, AR)
  n = _MAX_NEW.value
  model, tokenizer = seqdec.load_pretrained(_MODEL.value)
  valid = Corpus.load().valid
  both = held_out_prompts(valid, _PROMPTS.value + _ACCEPT_PROMPTS.value,
                          _PROMPT_BYTES.value)
  # Alternate windows: the acceptance rates never see a timed prompt.
  k = _ACCEPT_PROMPTS.value
  prompts = both[1:2 * k:2] + both[2 * k:] if k else both
  accept_prompts = both[0:2 * k:2]
  acceptance = {}
  for item in _SEQUOIA.value:
    drafter_name, _, nodes = item.partition(":")
    if drafter_name != "draft" or not nodes.isdigit():
      # Layer-skip's teacher-forced rates need, at every position, the
      # target's recurrent state of each kept layer fed the drafter's own
      # input (`rank_statistics` does it for attention layers only).
      raise app.UsageError(f"--sequoia item {item!r}: expected "
                           f"draft:<nodes> (layer-skip rates through "
                           f"recurrent layers are not measured)")
    path = (os.path.splitext(_OUTPUT.value)[0]
            + f"_acceptance_{drafter_name}.json")
    if drafter_name not in acceptance:
      t0 = time.perf_counter()
      acceptance[drafter_name] = measure_acceptance(
          model, Generator(model, tokenizer, max_new_tokens=n, eos_ids=()),
          drafter_name, accept_prompts, n, path)
      log(f"acceptance {drafter_name}: p_1..3 " + " ".join(
          f"{x:.3f}" for x in acceptance[drafter_name]["probs"][:3])
          + f" ({time.perf_counter() - t0:.0f} s)")
    methods.append(f"{drafter_name}/sequoia{nodes}:{os.path.abspath(path)}")
  gens = {m: Generator(model, tokenizer, SpecConfig.parse(
      m, layers=_LAYERS.value, draft_layers=_DRAFT_LAYERS.value),
                       max_new_tokens=n, eos_ids=())
          for m in methods}
  log(f"bench_ssm_spec: {len(prompts)} prompts x {len(methods)} methods, "
      f"N={n}")
  t0 = time.perf_counter()
  bpb = held_out_bpb(model, valid, _EVAL_BATCHES.value)
  log(f"held-out {bpb:.3f} bits/byte ({time.perf_counter() - t0:.0f} s)")
  warm = {}
  for b in sorted({bucket(len(p)) for p in prompts}):
    ids = next(p for p in prompts if bucket(len(p)) == b)
    for m in methods:
      t0 = time.perf_counter()
      bench.decode_one(gens[m], ids, n)
      warm[f"{m}@{b}"] = time.perf_counter() - t0
  rows = []
  for ids, order in zip(prompts, bench.alternating_orders(len(prompts),
                                                          methods)):
    rows.append({m: bench.decode_one(gens[m], ids, n) for m in order})
    log("  " + " ".join(f"{m}={rows[-1][m]['decode_tps']:.0f}"
                        f"(tau {rows[-1][m]['tau']:.2f})" for m in methods))
  summary = summarize(rows, methods)
  config = dict(model=_MODEL.value, architecture=model.config.architecture,
                layer_types=list(model.config.layer_types),
                max_new_tokens=n, prompts=len(prompts),
                prompt_bytes=_PROMPT_BYTES.value, layers=_LAYERS.value,
                draft_layers=_DRAFT_LAYERS.value, methods=methods,
                eval_batches=_EVAL_BATCHES.value)
  record = dict(config=config, machine=bench.machine_info(),
                held_out_bits_per_byte=bpb, summary=summary,
                acceptance=acceptance,
                warmup_s=warm, per_prompt=[
                    {m: {k: v for k, v in r[m].items() if k != "tokens"}
                     for m in methods} for r in rows],
                command=" ".join(sys.argv))
  bench.write_json(_OUTPUT.value, record)
  def label(m):   # a Sequoia method without its acceptance file's path
    return re.sub(r"(sequoia\d+):\S+", r"\1", m)
  table = bench.markdown_table(
      ["method", "tau", "decode tok/s", "speedup", "ms/round",
       "differ from ar"],
      [[label(m), f"{s['tau']:.2f}", f"{s['decode_tps_median']:.1f}",
        f"{s['speedup']:.2f}x", f"{s['ms_per_round_median']:.2f}",
        s["prompts_differing_from_ar"]]
       for m, s in summary.items()])
  md = os.path.splitext(_OUTPUT.value)[0] + ".md"
  with open(md, "w", encoding="utf-8") as f:
    f.write(f"# {config['architecture']} {_MODEL.value}: held-out "
            f"{bpb:.3f} bits/byte\n\n{table}\n")
  print(json.dumps(dict(held_out_bits_per_byte=bpb, summary=summary)))


if __name__ == "__main__":
  app.run(main)
