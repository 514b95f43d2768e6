"""Greedy speculative decoding on SmolLM2-135M: every drafter x tree vs
seqdec's autoregressive decoding and HF transformers' prompt-lookup decoding.

  python launch/bench_spec.py                       # all 48 prompts, N=64
  python launch/bench_spec.py --quick               # 1 prompt/category, N=32
  python launch/bench_spec.py --per_category=3 --methods=ar,ngram/chain4,hf_pld
  python launch/bench_spec.py --model=gemma3-270m --layers=skip:4-13 \
      --output=benchmarks/results/spec_gemma3.json
  python launch/bench_spec.py --temperature=1 --output=benchmarks/results/spec_t1.json \
      --methods=ar,hf_pld,ngram/chain4,layerskip@proposal=wor/kary2x1,\
layerskip/sequoia16:configs/acceptance/smollm2_layerskip-skip4-15_t1.json

Prints a JSON summary and Markdown tables; writes the record to `--output`
(JSON, rewritten after every prompt so an interrupted run keeps its rows;
rerunning with the same configuration resumes after the last finished
prompt), a Markdown copy of the tables and a PNG plot of tau and speedup
against tree size.

Method
------
* Target: SmolLM2-135M-Instruct, float32, batch 1, greedy, exactly N new
  tokens (no stop id), the frozen prompt set of benchmarks/prompts (chat template).
* Methods: `ar` (seqdec autoregressive), `<drafter>/<tree>` (seqdec
  speculative; drafters below), `hf_pld` (HF `generate(...,
  prompt_lookup_num_tokens=K)`, K = --hf_pld_tokens, HF's n-gram size 2 by
  default, on the same GGUF weights dequantised to float32 in torch).
  Drafters: `ngram` = prompt lookup over prompt + output (max n 3);
  `layerskip` = the target running only the layers of --layers, attending to
  the target's own cache; `draft` = an independent draft LM with its own
  cache: SmolLM2 has no smaller sibling offline, so it is the target
  truncated to its first --draft_layers blocks (plus final norm and head).
* decode tokens/s = (N - 1) / decode seconds. seqdec: the jitted loop after
  prefill (`metrics["decode_s"]`). HF: T(generate N) - T(generate 1), both
  with prompt lookup, so set-up and prefill cancel (as in bench_ar.py).
  tau = tokens per target call, the prefill counting as one call.
* Warm-up: every method runs once untimed on the first prompt of each
  prompt-length bucket before any timed run. Timed runs interleave the
  methods in a rotating order per prompt.
* Phase split: for each speculative method, one prompt per category is also
  run through `HostLoop(phases=True)` (draft, verify, finish as three separately jitted
  programs with a host sync between them; the real loop has none), giving
  ms per round for each phase; the autoregressive ms per step is reported
  beside it, and so is the real loop's ms per round (decode seconds / rounds,
  median over all prompts). The split overstates the total: each phase
  program copies the buffers it updates (nothing is donated between them),
  which the single-program loop does not. The last column predicts the
  speedup on an accelerator, where verifying a tree of n <= 64 nodes costs
  about one decoding step: tau / (1 + draft ms / AR step ms), with tau and
  the drafter's cost measured here.
* Agreement: every speculative run's tokens are compared with `ar`'s; a
  difference can only come from float32 near-ties (verification is exact
  argmax), and the first divergent position is reported.
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
from seqdec import cli  # pylint: disable=g-import-not-at-top

DEFAULT_METHODS = (
    "ar", "hf_pld",
    "ngram/chain2", "ngram/chain4", "ngram/chain6", "ngram/kary2x1x1x1",
    "ngram/kary3x1x1x1x1x1", "ngram/static6", "ngram@min_ngram=2/chain4",
    "layerskip/chain2", "layerskip/kary2x1", "draft/chain2")

_METHODS = flags.DEFINE_list(
    "methods", list(DEFAULT_METHODS), "ar, hf_pld, or <drafter>[@key=value...]"
    "/<tree>, drafter in ngram|layerskip|draft|eagle|medusa, keys of "
    "make_drafter (eagle@checkpoint=<dir>/kary2x2x1).")
_MODEL = bench.define_model_flag()
_LAYERS, _DRAFT_LAYERS = bench.define_drafter_flags()
_HF_PLD_TOKENS = flags.DEFINE_integer(
    "hf_pld_tokens", 10, "HF prompt_lookup_num_tokens.")
_CATEGORIES = flags.DEFINE_list("categories", None, "Default: all six.")
_PER_CATEGORY = flags.DEFINE_integer(
    "per_category", None, "First k prompts per category (1 with --quick).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64,
                                       "New tokens per prompt (32 --quick).")
_QUICK = flags.DEFINE_bool("quick", False, "1 prompt per category, N=32.")
_NUM_THREADS = flags.DEFINE_integer("num_threads", 2, "torch threads.")
_PHASES = flags.DEFINE_bool("phases", True, "Measure the phase split.")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/results/spec.json",
                              "JSON record (.md and .png beside it).")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.0, "Sampling temperature of every method (0: greedy). "
    "At T > 0 seqdec's speculative methods verify with the lossless 'sample' "
    "rule unless a method names another (@rule=typical_lossy), and HF "
    "samples too (do_sample=True).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (T > 0).")
_PRECISION = flags.DEFINE_string(
    "precision", "f32", "The target's precision policy (f32, f32_packed, "
    "bf16_packed, bf16_weights; seqdec.models.config.PRECISIONS), for every "
    "method of the run.")
_AR_POLICIES = flags.DEFINE_list(
    "ar_policies", [], "More autoregressive baselines, one per precision "
    "policy (method 'ar[<policy>]', the target loaded under it), measured "
    "side by side; the report divides every method's tok/s by the fastest "
    "autoregressive configuration of the run too.")
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Rebuild the summary, tables and plot from the "
    "per-prompt rows already in --output (e.g. an interrupted run), running "
    "nothing.")

AR, HF_PLD = "ar", "hf_pld"


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def parse_method(method):
  """A method string as a `SpecConfig` (the one grammar,
  `seqdec.decoding.spec`), with --layers / --draft_layers as the default
  drafter options; '@gate=auto' is the tree's break-even on this host
  (`seqdec.app.auto_gate`, under --precision), '@budget=auto' its verify
  ladder priced by this host's profile (`seqdec.app.auto_budget`),
  '@stop=auto' its drafter's per-level cost (`seqdec.app.auto_stop`)."""
  # pylint: disable=g-import-not-at-top
  from seqdec import app as app_lib
  from seqdec.decoding.spec import SpecConfig
  # pylint: enable=g-import-not-at-top
  spec = SpecConfig.parse(method, layers=_LAYERS.value,
                          draft_layers=_DRAFT_LAYERS.value)
  return app_lib.resolve_auto(_MODEL.value, spec, _PRECISION.value)


def ar_policy(method):
  """The policy of an 'ar[<policy>]' baseline, else None."""
  if method.startswith("ar[") and method.endswith("]"):
    return method[3:-1]
  return None


def build_generators(methods, model, tokenizer, n, load):
  """`{method: Generator}` for every seqdec method ('auto' rules: greedy at
  temperature 0, the lossless 'sample' at T > 0, unless a method names
  another with @rule=); an 'ar[<policy>]' baseline decodes the target
  `load(policy)` returns."""
  from seqdec.generator import Generator  # pylint: disable=g-import-not-at-top
  kw = dict(max_new_tokens=n, eos_ids=(), temperature=_TEMPERATURE.value,
            seed=_SEED.value)
  return {m: (Generator(load(ar_policy(m)), tokenizer, AR, **kw)
              if ar_policy(m) else
              Generator(model, tokenizer, parse_method(m), **kw))
          for m in methods if m != HF_PLD}


def fastest_ar(summary, methods, bench):
  """`(method, tok/s)` of the fastest autoregressive configuration (median
  tok/s over all prompts), and every method's overall and per-category
  median tok/s over that configuration's."""
  ars = [m for m in methods if m == AR or ar_policy(m)]
  o = summary["overall"]
  best = max(ars, key=lambda m: o[m]["decode_tps"]["median"])
  ratios = {}
  for group, s in [("overall", o), *summary["by_category"].items()]:
    den = s[best]["decode_tps"]["median"]
    ratios[group] = {m: bench.ratio(s[m]["decode_tps"]["median"], den)
                     for m in methods if s[m].get("decode_tps")}
  return best, o[best]["decode_tps"]["median"], ratios


def run_hf_pld(hf, ids, n):
  options = dict(prompt_lookup_num_tokens=_HF_PLD_TOKENS.value)
  if _TEMPERATURE.value > 0:
    options.update(do_sample=True, temperature=_TEMPERATURE.value, top_k=0)
  _, gen1_s = hf.generate(ids, 1, **options)
  toks, genn_s = hf.generate(ids, n, **options)
  decode_s = genn_s - gen1_s
  return dict(tokens=toks, decode_s=decode_s, generate_1_s=gen1_s,
              generate_n_s=genn_s,
              decode_tps=(n - 1) / decode_s if decode_s > 0 else None)


def tree_nodes(method):
  """Draft nodes of a method's tree (the spec grammar's split, so a
  drafter option holding a path, eagle@checkpoint=<dir>/chain4, works)."""
  # pylint: disable=g-import-not-at-top
  from seqdec.decoding import spec as spec_lib
  # pylint: enable=g-import-not-at-top
  if "/" not in method:
    return 0
  spec = spec_lib.SpecConfig.parse(method)
  # The node budget: a stop's cost (auto or not) does not change it.
  return spec_lib.build_tree(spec.replace(stop=0.0),
                             _PRECISION.value).num_nodes - 1


def summarize(rows, methods, bench, greedy=True):
  """Per-method statistics of a group of per-prompt rows."""
  out = {"n": len(rows)}
  ar_med = None
  for m in methods:
    tps = [r[m]["decode_tps"] for r in rows if r[m].get("decode_tps")]
    st = dict(decode_tps=bench.summarize(tps) if tps else None)
    if m != HF_PLD:
      st["tau"] = bench.summarize([r[m]["tau"] for r in rows])
      st["loop_ms_per_round"] = bench.summarize(
          # (computed: rows of results written before ms_per_round)
          [1e3 * r[m]["decode_s"] / max(r[m]["target_calls"] - 1, 1)
           for r in rows])
      st["identical_to_ar"] = sum(r[m]["tokens"] == r[AR]["tokens"]
                                  for r in rows) if (
                                      AR in methods and greedy) else None
    out[m] = st
    if m == AR and tps:
      ar_med = st["decode_tps"]["median"]
  for m in methods:
    med = out[m]["decode_tps"] and out[m]["decode_tps"]["median"]
    out[m]["speedup_vs_ar"] = bench.ratio(med, ar_med) if med and ar_med else None
    hf = out.get(HF_PLD, {}).get("decode_tps")
    out[m]["ratio_vs_hf_pld"] = bench.ratio(med, hf["median"]) if (
        med and hf) else None
  return out


def tables(summary, methods, bench, temperature=0.0):
  """Markdown: per-method overall table, then per-category best methods."""
  fmt = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"
  head = ["method", "draft nodes", "tau", "decode tok/s", "vs AR",
          "vs HF PLD", "same tokens as AR"]
  rows = []
  o = summary["overall"]
  for m in methods:
    s = o[m]
    rows.append([m, tree_nodes(m) if "/" in m else "-",
                 fmt(s["tau"]["median"]) if s.get("tau") else "-",
                 bench.fmt_stats(s["decode_tps"]), fmt(s["speedup_vs_ar"]),
                 fmt(s["ratio_vs_hf_pld"]),
                 f"{s['identical_to_ar']}/{o['n']}" if s.get(
                     "identical_to_ar") is not None else "-"])
  overall = bench.markdown_table(head, rows)
  head = ["category", "n", "AR tok/s", "HF PLD tok/s", "best lossless method",
          "its tok/s", "tau", "vs AR", "vs HF PLD"]
  rows = []
  # pylint: disable=g-import-not-at-top
  from seqdec.decoding.spec import resolve_rule
  from seqdec.decoding.verify import RULES
  # pylint: enable=g-import-not-at-top
  # Lossy rules (Medusa's typical acceptance) are never "best": their output
  # is not the target's distribution.
  spec = [m for m in methods if "/" in m
          and RULES[resolve_rule(parse_method(m).rule, temperature)].lossless]
  for cat, g in list(summary["by_category"].items()) + [("**overall**", o)]:
    best = max(spec, key=lambda m: g[m]["decode_tps"]["median"]) if spec else None
    b = g[best] if best else {}
    rows.append([cat, g["n"],
                 fmt(g[AR]["decode_tps"]["median"], 1) if AR in g else "-",
                 fmt(g[HF_PLD]["decode_tps"]["median"], 1) if (
                     HF_PLD in g and g[HF_PLD]["decode_tps"]) else "-",
                 best or "-", fmt(b["decode_tps"]["median"], 1) if b else "-",
                 fmt(b["tau"]["median"]) if b else "-",
                 fmt(b.get("speedup_vs_ar")), fmt(b.get("ratio_vs_hf_pld"))])
  per_cat = bench.markdown_table(head, rows)
  return overall, per_cat


def tree_family(method):
  """'chain' / 'k-ary' / 'Sequoia' / 'static' / 'paths' of `<drafter>/<tree>`."""
  spec = method.partition("/")[2]
  for prefix, name in (("chain", "chain"), ("kary", "k-ary"),
                       ("sequoia", "Sequoia"), ("static", "static"),
                       ("auto", "auto (host-sized)")):
    if spec.startswith(prefix):
      return name
  return "paths"


def plot(summary, methods, path, temperature=0.0):
  """tau and speedup against draft nodes, one line per drafter x tree family."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  o = summary["overall"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  lines = {}
  for m in methods:
    if "/" in m:
      lines.setdefault(f"{m.partition('/')[0]} {tree_family(m)}", []).append(m)
  for label, ms in lines.items():
    for ax, key in zip(axes, ("tau", "speedup_vs_ar")):
      pts = sorted((tree_nodes(m), o[m]["tau"]["median"] if key == "tau"
                    else o[m][key], m) for m in ms)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
      for x, y, m in pts:
        ax.annotate(m.partition("/")[2].partition(":")[0], (x, y), fontsize=6)
  most = max([tree_nodes(m) for m in methods if "/" in m] or [1])
  ticks = [2 ** i for i in range(most.bit_length() + 1) if 2 ** i <= 2 * most]
  axes[0].set(xscale="log", xlabel="draft nodes (log)",
              ylabel="tau (tokens / target call)",
              title=f"tau vs node budget, T={temperature:g} (median)")
  axes[1].axhline(1.0, color="gray", lw=0.8)
  if HF_PLD in o and o[HF_PLD]["speedup_vs_ar"]:
    axes[1].axhline(o[HF_PLD]["speedup_vs_ar"], color="red", lw=0.8,
                    ls="--", label="HF prompt lookup")
  axes[1].set(xscale="log", xlabel="draft nodes (log)",
              ylabel="decode tok/s / seqdec AR",
              title="speedup over seqdec AR (median tok/s)")
  for ax in axes:
    ax.set_xticks(ticks, [str(x) for x in ticks], minor=False)
    ax.minorticks_off()
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def phase_split(gens, inputs, n, bench):
  """ms per round of draft / verify / finish for each speculative method
  (`loops.HostLoop(phases=True)`: the loop's own step, phase by phase)."""
  # pylint: disable=g-import-not-at-top
  from seqdec.decoding.loops import DecodeShapes, HostLoop, Inputs
  from seqdec.decoding.sampling import SamplingParams
  # pylint: enable=g-import-not-at-top
  picks = {}
  for p, ids in inputs:
    picks.setdefault(p.category, (p, ids))
  out = {}
  temperature = _TEMPERATURE.value
  for m, gen in gens.items():
    if not gen.speculative:
      continue
    totals = {"draft": 0.0, "verify": 0.0, "finish": 0.0, "rounds": 0}
    for p, ids in picks.values():
      shapes = DecodeShapes.for_batch(1, len(ids), n, 1)
      sparams = SamplingParams.make(1, temperature)
      inputs_ = Inputs.make(shapes, [ids], [n], [-1], sparams, _SEED.value)
      host = HostLoop(gen.loop(shapes, [temperature]), phases=True)
      host.run(params=gen.loop_params, inputs=inputs_)
      for k in totals:
        totals[k] += host.seconds.get(k, 0)
    r = max(totals["rounds"], 1)
    out[m] = {f"{k}_ms_per_round": 1e3 * totals[k] / r
              for k in ("draft", "verify", "finish")}
    out[m]["rounds"] = totals["rounds"]
    log(f"  phases {m:24s} " + " ".join(
        f"{k} {v:.1f}" for k, v in out[m].items() if k.endswith("round")))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # pylint: disable=g-import-not-at-top
  import seqdec
  from seqdec.decoding.loops import bucket
  # pylint: enable=g-import-not-at-top
  methods = list(_METHODS.value)
  if AR not in methods:
    methods.insert(0, AR)
  for policy in _AR_POLICIES.value:
    if policy != _PRECISION.value and f"ar[{policy}]" not in methods:
      methods.insert(1, f"ar[{policy}]")
  # A bad method string fails here, as one error line, before any load.
  cli.run_reporting_user_errors(lambda: [
      parse_method(m) for m in methods
      if m not in (AR, HF_PLD) and not ar_policy(m)])
  n, per_category = bench.quick_settings(
      _QUICK.value, _MAX_NEW_TOKENS.value,
      flags.FLAGS["max_new_tokens"].present, _PER_CATEGORY.value)
  gguf_path, prompts_dir, expected = bench.bench_model(_MODEL.value)
  prompts = bench.load_prompt_set(
      prompts_dir, categories=_CATEGORIES.value or bench.CATEGORIES,
      per_category=per_category, expected_per_category=expected)
  config = dict(model=_MODEL.value, gguf=gguf_path, max_new_tokens=n,
                methods=methods,
                layers=_LAYERS.value, draft_layers=_DRAFT_LAYERS.value,
                hf_pld_tokens=_HF_PLD_TOKENS.value, per_category=per_category,
                prompts=[p.id for p in prompts], batch_size=1,
                num_threads_torch=_NUM_THREADS.value,
                temperature=_TEMPERATURE.value, seed=_SEED.value,
                precision=_PRECISION.value)
  if _REPORT_ONLY.value:
    with open(_OUTPUT.value, encoding="utf-8") as f:
      old = json.load(f)
    log(f"report only: {len(old['per_prompt'])} measured prompts of "
        f"{_OUTPUT.value}")
    report(old["per_prompt"], old["config"]["methods"], old["config"],
           old["machine"], old.get("warmup_s"),
           old.get("phases_ms_per_round"), old["config"]["max_new_tokens"],
           bench)
    return
  done_rows = []
  if os.path.exists(_OUTPUT.value):
    with open(_OUTPUT.value, encoding="utf-8") as f:
      old = json.load(f)
    if old.get("config") == config and old.get("partial"):
      done_rows = old["per_prompt"]
      log(f"resuming: {len(done_rows)} prompts already measured")
  machine = bench.machine_info()
  log(f"bench_spec: {len(prompts)} prompts x {len(methods)} methods, N={n}")

  model, tokenizer = seqdec.load_pretrained(gguf_path,
                                            precision=_PRECISION.value)
  gens = cli.run_reporting_user_errors(lambda: build_generators(
      methods, model, tokenizer, n,
      lambda policy: seqdec.load_pretrained(gguf_path, precision=policy)[0]))
  hf = None
  if HF_PLD in methods:
    from hf_baseline import HFSide  # pylint: disable=g-import-not-at-top
    hf = HFSide(gguf_path, _NUM_THREADS.value)
  inputs = [(p, gens[AR].encode(p.as_input())) for p in prompts]

  def run(m, ids):
    return run_hf_pld(hf, ids, n) if m == HF_PLD else bench.decode_one(
        gens[m], ids, n)

  warm = {}
  for b in sorted({bucket(len(ids)) for _, ids in inputs}):
    _, ids = next(x for x in inputs if bucket(len(x[1])) == b)
    for m in methods:
      t0 = time.perf_counter()
      run(m, ids)
      warm[f"{m}@{b}"] = time.perf_counter() - t0
    log(f"warm-up bucket {b}: {sum(v for k, v in warm.items() if k.endswith(f'@{b}')):.0f} s")

  rows = list(done_rows)
  orders = bench.alternating_orders(len(inputs), methods)
  for (p, ids), order in zip(inputs[len(rows):], orders[len(rows):]):
    res = {m: run(m, ids) for m in order}
    row = dict(id=p.id, category=p.category, prompt_tokens=len(ids),
               order=list(order), **res)
    for m in methods:
      if m != AR:
        row[m]["first_divergence_from_ar"] = bench.first_divergence(
            res[m]["tokens"], res[AR]["tokens"])
    rows.append(row)
    log(f"  {p.id:16s} " + " ".join(
        f"{m}={res[m]['decode_tps']:.1f}" + (
            f"(tau {res[m]['tau']:.2f})" if "tau" in res[m] and m != AR else "")
        for m in methods if res[m].get("decode_tps")))
    bench.write_json(_OUTPUT.value, dict(config=config, partial=True,
                                         machine=machine, per_prompt=rows))

  phases = phase_split(gens, inputs, n, bench) if _PHASES.value else None
  report(rows, methods, config, machine, warm, phases, n, bench)


def _num(x, digits=1):
  return "-" if x is None else f"{x:.{digits}f}"


def auto_trees(methods, summary):
  """For each `<drafter>/auto...` method: the tree the hardware-aware
  optimizer chose on this host, with its predicted and measured tok/s."""
  # pylint: disable=g-import-not-at-top
  from seqdec import host_profile
  from seqdec.decoding import acceptance_rates
  from seqdec.decoding import spec as spec_lib
  from seqdec.decoding import tree_specs
  # pylint: enable=g-import-not-at-top
  out = {}
  for m in methods:
    tree = spec_lib._split_tree(m)[2]  # pylint: disable=protected-access
    if not tree.startswith("auto"):
      continue
    choice = tree_specs.auto_choice(
        tree[len("auto"):], policy=_PRECISION.value,
        adapt=spec_lib.auto_adapt(parse_method(m)))
    tps = summary["overall"][m]["decode_tps"]
    # The prediction against the decoding step the optimizer weighed it
    # against: a measured loop step (replayed model chains), else the
    # profile's verify(1).
    target = acceptance_rates.load_acceptance(
        tree.split(":", 1)[1]).meta.get("target")
    profile = host_profile.find(str(target))
    known = profile is not None and choice.cost_ms == choice.cost_ms
    out[m] = dict(tree=tree_specs.to_spec(choice.shape), nodes=choice.nodes,
                  predicted_tau=choice.tau,
                  predicted_tokens_per_s=(choice.tokens_per_s if known
                                          else None),
                  predicted_speedup=(choice.tokens_per_s * (
                      choice.step_ms if choice.step_ms == choice.step_ms
                      else profile.verify(1, _PRECISION.value)) / 1e3
                                     if known else None),
                  measured_tokens_per_s=tps and tps["median"],
                  measured_speedup=summary["overall"][m].get(
                      "speedup_vs_ar"))
  return out


def accelerator_speedup(tau, draft_ms, ar_step_ms):
  """tau / (1 + draft / AR step): the speedup over autoregressive decoding
  if a verify of the tree cost one decoding step (an accelerator, where
  verifying n <= 64 tokens is memory-bound like one token), with the
  drafter's cost as measured here relative to an AR step."""
  if tau is None or not ar_step_ms:
    return None
  return tau / (1.0 + draft_ms / ar_step_ms)


def report(rows, methods, config, machine, warm, phases, n, bench):
  """Summary, tables, JSON record, Markdown and plot from per-prompt rows."""
  greedy = not config.get("temperature")
  summary = dict(overall=summarize(rows, methods, bench, greedy),
                 by_category={c: summarize(g, methods, bench, greedy)
                              for c, g in bench.group_by(
                                  rows, "category", bench.CATEGORIES).items()})
  ar_step_ms = 1e3 / summary["overall"][AR]["decode_tps"]["median"]
  overall_md, per_cat_md = tables(summary, methods, bench,
                                  config.get("temperature", 0.0))
  machine["load_average_1_5_15_at_end"] = bench.machine_info()[
      "load_average_1_5_15"]
  kind = ("greedy" if greedy else
          f"T={config['temperature']:g} sampling (lossless rule unless @rule=)")
  record = dict(benchmark=f"{kind} speculative decoding, SmolLM2-135M, CPU",
                config=config, partial=False, machine=machine,
                warmup_s=warm, phases_ms_per_round=phases,
                ar_ms_per_step=ar_step_ms, summary=summary,
                table_methods=overall_md, table_categories=per_cat_md,
                per_prompt=rows)
  bench.write_json(_OUTPUT.value, record)
  stem = os.path.splitext(_OUTPUT.value)[0]
  phase_md = ""
  if phases:
    for m, v in phases.items():
      v["predicted_accelerator_speedup"] = accelerator_speedup(
          summary["overall"][m]["tau"]["median"], v["draft_ms_per_round"],
          ar_step_ms)
    phase_md = bench.markdown_table(
        ["method", "draft ms/round", "verify ms/round", "finish ms/round",
         "rounds timed", "real loop ms/round (all prompts)",
         "predicted speedup if verify = 1 step"],
        [[m, f"{v['draft_ms_per_round']:.1f}", f"{v['verify_ms_per_round']:.1f}",
          f"{v['finish_ms_per_round']:.1f}", v["rounds"],
          f"{summary['overall'][m]['loop_ms_per_round']['median']:.1f}",
          f"{v['predicted_accelerator_speedup']:.2f}"]
         for m, v in phases.items()])
  auto = auto_trees(methods, summary)
  record["auto_trees"] = auto
  best_ar, best_tps, vs_best = fastest_ar(summary, methods, bench)
  record["fastest_ar"] = dict(method=best_ar, decode_tps=best_tps,
                              speedups=vs_best)
  bench.write_json(_OUTPUT.value, record)
  text = (f"{kind[0].upper() + kind[1:]}, batch 1, N={n} new tokens, {len(rows)} prompts, "
          f"median [p10-p90] over prompts.\n\n{overall_md}\n\n"
          f"Best lossless seqdec method per category:\n\n{per_cat_md}\n")
  groups = list(vs_best)
  text += (f"\nEvery method against the fastest autoregressive configuration "
           f"of this run, `{best_ar}` ({best_tps:.1f} tok/s overall; target "
           f"policy of the other methods: {config['precision']}), median "
           f"tok/s ratios:\n\n" + bench.markdown_table(
               ["method", *groups],
               [[m, *[_num(vs_best[g].get(m), 2) for g in groups]]
                for m in methods if m in vs_best["overall"]]) + "\n")
  if auto:
    text += ("\n`tree=auto` (Sequoia's hardware-aware choice from this host's "
             "profile):\n\n" + bench.markdown_table(
                 ["method", "chosen tree", "draft nodes", "predicted tau",
                  "predicted tok/s", "measured tok/s",
                  "predicted vs AR (its step)", "measured vs AR"],
                 [[m, a["tree"], a["nodes"], f"{a['predicted_tau']:.2f}",
                   _num(a["predicted_tokens_per_s"]),
                   _num(a["measured_tokens_per_s"]),
                   _num(a.get("predicted_speedup"), 2),
                   _num(a.get("measured_speedup"), 2)]
                  for m, a in auto.items()]) + "\n")
  if phase_md:
    text += (f"\nPhase split (one prompt per category; AR step "
             f"{ar_step_ms:.1f} ms):\n\n{phase_md}\n")
  with open(stem + ".md", "w", encoding="utf-8") as f:
    f.write(text)
  plot(summary, methods, stem + ".png", config.get("temperature", 0.0))
  brief = dict(config=config, ar_ms_per_step=ar_step_ms,
               overall={m: dict(decode_tps=summary["overall"][m]["decode_tps"]
                                and summary["overall"][m]["decode_tps"]["median"],
                                speedup_vs_ar=summary["overall"][m]["speedup_vs_ar"],
                                ratio_vs_hf_pld=summary["overall"][m]["ratio_vs_hf_pld"])
                        for m in methods},
               output=os.path.abspath(_OUTPUT.value))
  print(json.dumps(brief, indent=2))
  print(text)


if __name__ == "__main__":
  app.run(main)
