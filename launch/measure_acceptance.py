"""Measures per-rank acceptance rates of a drafter/target pair for Sequoia trees.

  python launch/measure_acceptance.py --drafter=layerskip --layers=skip:4-15 \\
      --temperature=0 --output=configs/acceptance/smollm2_layerskip_t0.json
  python launch/measure_acceptance.py --drafter=draft --draft_layers=10 \\
      --temperature=1 --per_category=8
  python launch/measure_acceptance.py --model=tiny --drafter=draft \\
      --draft_layers=1 --categories=qa --per_category=1   # smoke run

Writes an acceptance file (format: `seqdec/decoding/acceptance_rates.py`)
that the tree spec 'sequoia<n>:<file>' turns into the DP-optimal tree, and
prints the rates and the predicted tau of Sequoia trees at 8/16/32/64 draft
nodes.

Method
------
* Data: the frozen prompt set of the model (benchmarks/prompts, chat
  template; a `seqdec.bench.BENCH_MODELS` base model such as gemma3-270m
  uses its plain-text set, benchmarks/prompts_base), the first
  --per_category prompts of each category; each is continued by the target
  itself (seqdec's autoregressive `Generator`, --max_new_tokens tokens, no
  stop id, as in bench_spec.py): greedily at --temperature=0, sampled at
  temperature T otherwise (seeded).
* Teacher forcing: one target forward and one drafter forward over prompt +
  continuation give, at every continuation position (each continuation
  token as the root of a round), the drafter's top-K tokens x_1..x_K
  (K = --max_rank) and the target's distribution p there
  (`rank_statistics.rank_statistics`). The layer-skip drafter attends to the
  full target's K/V of the context, exactly as when drafting; a draft LM runs
  over the same tokens with its own cache.
* Rates: at T = 0, p_k = fraction of positions where the target's argmax is
  the drafter's k-th token (greedy verification accepts that child); at
  T > 0, p_k = mean over positions of p_T(x_k) (deterministic top-K
  children under the lossless rule: the child equal to y ~ p_T is
  accepted). "trials" = number of positions; "stderr" = per-rank standard
  error treating positions as independent (they are not quite: neighbours
  share context).
* The positional model behind Sequoia assumes these rates hold at every
  depth and independently across depths; deeper drafted nodes see drafted
  (not target) K/V for their ancestors with the layer-skip drafter, which
  this measurement does not model. Check on SmolLM2, layerskip skip:4-15,
  T=0, one prompt per category, N=64 (round tau = 1 + mean accepted drafts,
  predicted by `expected_accepted` from the committed T=0 file / measured by
  the speculative decoder): chain4 1.67 / 1.50, kary2x1 1.74 / 1.69,
  sequoia8 1.97 / 1.84, sequoia16 2.18 / 2.01, sequoia32 2.39 / 2.17. The
  model overestimates by 3-10 %, more for deeper trees, and ranks the trees
  correctly. The draft LM (draft_layers=10, T=0): chain2 1.06 / 1.07,
  sequoia16 (depth 2) 1.33 / 1.36.
* The n-gram drafter (--drafter=ngram, T = 0 only) needs no drafter
  forward: its chain is a deterministic function of the tokens. At every
  continuation position the lookup of the decoder (longest suffix match of
  3 .. 1 tokens, latest first; `ngram.chain_acceptance`) proposes a chain
  of up to --max_rank drafts, and greedy verification accepts its longest
  prefix that equals the continuation. The file holds that chain's
  acceptance curve c_d = P(first d drafts accepted) overall ('chain'), per
  match length n ('chain_by_match') and the share of positions by n
  ('match_share', n = 0: no match); 'probs' is [c_1]. Per-rank rates that
  hold at every depth would not describe it (deeper drafts follow one
  match's continuation); 'auto' trees read the chain curves instead, and
  `ngram@confidence=<file>` gates rounds by them.
* The EAGLE drafter (--drafter=eagle, T = 0 only; --checkpoint, default
  the drafter shipped for the target): one target forward over prompt +
  continuation gives the features the decoding loop would have handed the
  drafter, and at every continuation position the drafter drafts a chain of
  --max_rank levels from them and then from its own (`train.drafter.
  chain_trace`). The file holds, per prompt and position, the drafts that
  greedy verification accepts and each node's path log q (the confidence
  the round gate reads), and the chain curves as for n-gram. 'auto' replays
  these chains under the loop rounds the host profile measured for the
  drafter (`sequoia.replay_model_chain`).
"""

import os
import sys

import json  # pylint: disable=g-import-not-at-top,g-bad-import-order
import time  # pylint: disable=g-import-not-at-top,g-bad-import-order

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from seqdec import bench  # pylint: disable=g-import-not-at-top
from seqdec import cli  # pylint: disable=g-import-not-at-top
from seqdec.errors import UserError  # pylint: disable=g-import-not-at-top

_MODEL = flags.DEFINE_string(
    "model", "smollm2-135m-instruct",
    "Target: a registry name (smollm2-135m-instruct, tiny), HF dir or .gguf.")
_DRAFTER = flags.DEFINE_enum(
    "drafter", "layerskip", ["layerskip", "draft", "ngram", "eagle"],
    "layerskip | draft | ngram | eagle (the last two T = 0; see the module "
    "docstring).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "--drafter=eagle: its checkpoint directory (default: "
    "the drafter shipped for the target).")
_LAYERS, _DRAFT_LAYERS = bench.define_drafter_flags()
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.0, "0: greedy verification; T > 0: lossless rule for "
    "deterministic top-K children at temperature T.")
_MAX_RANK = flags.DEFINE_integer("max_rank", 16, "K, ranks measured.")
_CATEGORIES = flags.DEFINE_list("categories", None, "Default: all six.")
_PER_CATEGORY = flags.DEFINE_integer(
    "per_category", 2, "First k prompts per category (0: all).")
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", 64, "Continuation tokens per prompt (= positions).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (T > 0).")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Acceptance JSON to write (default: configs/acceptance/"
    "<model>_<drafter>_t<T>.json).")

BUDGETS = (8, 16, 32, 64)


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def drafter_label() -> str:
  if _DRAFTER.value == "ngram":
    return "ngram"
  if _DRAFTER.value == "eagle":
    return (f"eagle@checkpoint={_CHECKPOINT.value}" if _CHECKPOINT.value
            else "eagle")
  if _DRAFTER.value == "layerskip":
    return f"layerskip@{_LAYERS.value}"
  return f"draft@draft_layers={_DRAFT_LAYERS.value}"


def default_output() -> str:
  model = os.path.splitext(os.path.basename(_MODEL.value))[0].split("-")[0]
  drafter = ("layerskip-" + _LAYERS.value.replace(":", "").replace("+", "_")
             if _DRAFTER.value == "layerskip" else _DRAFTER.value
             if _DRAFTER.value in ("ngram", "eagle")
             else f"draft{_DRAFT_LAYERS.value}")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(root, "configs", "acceptance",
                      f"{model}_{drafter}_t{_TEMPERATURE.value:g}.json")


def check_flags() -> None:
  """Fails fast (before any model load) on unusable flags."""
  if _DRAFTER.value in ("ngram", "eagle") and _TEMPERATURE.value != 0:
    raise UserError(f"--drafter={_DRAFTER.value} measures greedy "
                    "verification only "
                    "(--temperature=0): its chain's acceptance at T > 0 "
                    "would need the target's probabilities")
  if _TEMPERATURE.value < 0:
    raise UserError(f"--temperature must be >= 0, got {_TEMPERATURE.value}")
  if _MAX_RANK.value < 1:
    raise UserError(f"--max_rank must be >= 1, got {_MAX_RANK.value}")
  if _MAX_NEW_TOKENS.value < 1:
    raise UserError(f"--max_new_tokens must be >= 1, got "
                     f"{_MAX_NEW_TOKENS.value}")
  if _PER_CATEGORY.value < 0:
    raise UserError(f"--per_category must be >= 0, got {_PER_CATEGORY.value}")
  out = _OUTPUT.value or default_output()
  directory = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(directory) and not os.path.isdir(
      os.path.dirname(directory)):
    raise UserError(f"output directory {directory!r} does not exist")


def measure() -> dict:
  """Runs the measurement; returns the acceptance record (also written)."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from seqdec.decoding import acceptance_rates
  from seqdec.decoding import rank_statistics
  from seqdec.decoding import sequoia
  from seqdec.decoding import trees
  from seqdec.decoding.loops import bucket
  from seqdec.decoding import spec as spec_lib
  # pylint: enable=g-import-not-at-top
  t_start = time.perf_counter()
  n, k, temp = _MAX_NEW_TOKENS.value, _MAX_RANK.value, _TEMPERATURE.value
  prompts = bench.model_prompt_set(
      _MODEL.value, categories=_CATEGORIES.value or bench.CATEGORIES,
      per_category=_PER_CATEGORY.value or None)
  log(f"measure_acceptance: {len(prompts)} prompts x {n} positions, "
      f"{drafter_label()}, T={temp:g}, K={k}")
  t0 = time.perf_counter()
  model, _, inputs, results = bench.continuations(
      _MODEL.value, prompts, n, temp, _SEED.value)
  continuation_s = time.perf_counter() - t0
  if _DRAFTER.value == "ngram":
    return ngram_record(prompts, inputs, results, t_start, continuation_s)
  if _DRAFTER.value == "eagle":
    return eagle_record(model, prompts, inputs, results, t_start,
                        continuation_s)
  options = (dict(layers=_LAYERS.value) if _DRAFTER.value == "layerskip"
             else dict(draft_layers=_DRAFT_LAYERS.value))
  drafter = spec_lib.build_drafter(spec_lib.SpecConfig(
      drafter=_DRAFTER.value, options=tuple(options.items())), model)

  t0 = time.perf_counter()
  per_prompt, by_cat, mismatches = [], {}, 0
  for p, ids, r in zip(prompts, inputs, results):
    seq = list(ids) + list(r.tokens)
    length = bucket(len(seq))
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(seq)] = seq
    s, argmax = rank_statistics.rank_statistics(
        model, drafter, tokens, np.array([len(ids) - 1]), len(r.tokens),
        temp, k)
    s = s[0, :len(r.tokens)].astype(np.float64)              # [N, K]
    if temp == 0:
      mismatches += int((argmax[0, :len(r.tokens)] != r.tokens).sum())
    per_prompt.append(dict(id=p.id, category=p.category,
                           positions=len(r.tokens),
                           probs=s.mean(0).tolist()))
    by_cat.setdefault(p.category, []).append(s)
    log(f"  {p.id:16s} p_1..3 = "
        + " ".join(f"{x:.3f}" for x in s.mean(0)[:3]))
  probe_s = time.perf_counter() - t0

  every = np.concatenate([x for v in by_cat.values() for x in v])  # [P, K]
  probs = every.mean(0)
  stderr = every.std(0, ddof=1) / np.sqrt(len(every)) if len(every) > 1 else (
      np.zeros(k))
  taus = sequoia.optimal_taus(probs, max(BUDGETS))
  record = dict(
      drafter=drafter_label(), target=_MODEL.value, temperature=temp,
      rule="greedy" if temp == 0 else "lossless-deterministic",
      trials=int(len(every)),
      command="python launch/measure_acceptance.py " + " ".join(
          a for a in sys.argv[1:]),
      method=("teacher-forced: target continuation (greedy at T=0, sampled "
              "at T>0, no stop id), rank of the target's argmax among the "
              "drafter's top-K (T=0) or mean p_T(x_k) (T>0) per position"),
      max_rank=k, max_new_tokens=n, per_category=_PER_CATEGORY.value or None,
      prompts=[p.id for p in prompts], seed=_SEED.value,
      stderr=stderr.tolist(), reject_all=float(1 - probs.sum()),
      by_category={c: np.concatenate(v).mean(0).tolist()
                   for c, v in by_cat.items()},
      per_prompt=per_prompt,
      sequoia_tau={str(b): float(taus[b]) for b in BUDGETS},
      chain_tau={str(g): float(sequoia.expected_accepted(
          trees.chain(g), probs)) for g in (2, 4, 8)},
      greedy_continuation_mismatches=mismatches if temp == 0 else None,
      seconds=dict(continuation=continuation_s, probe=probe_s,
                   total=time.perf_counter() - t_start),
      machine=bench.machine_info(packages=("jax", "jaxlib", "flax")))
  out = _OUTPUT.value or default_output()
  acceptance_rates.write_acceptance(out, probs, **record)
  record["probs"] = probs.tolist()
  record["output"] = os.path.abspath(out)
  return record


def chain_curve(accepted, depth: int) -> list:
  """c_d = fraction of positions with at least d accepted, d = 1..depth."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  a = np.asarray(accepted)
  return [float((a >= d).mean()) if len(a) else 0.0
          for d in range(1, depth + 1)]


def ngram_record(prompts, inputs, results, t_start, continuation_s) -> dict:
  """The n-gram acceptance file (module docstring), written and returned."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from seqdec.decoding.drafters import ngram
  # pylint: enable=g-import-not-at-top
  depth, max_n, min_n = _MAX_RANK.value, 3, 1
  t0 = time.perf_counter()
  lens, acc, trace = [], [], {}
  for p, ids, r in zip(prompts, inputs, results):
    n, a, v = ngram.chain_acceptance(list(ids), list(r.tokens), max_n,
                                     min_n, depth)
    lens.append(n)
    acc.append(a)
    trace[p.id] = [n.tolist(), a.tolist(), v.tolist()]
    log(f"  {p.id:16s} matched {float((n > 0).mean()):.2f}, "
        f"mean accepted {float(a.mean()):.2f}")
  lens, every = np.concatenate(lens), np.concatenate(acc)
  by_match = {str(n): chain_curve(every[lens == n], depth)
              for n in range(min_n, max_n + 1) if (lens == n).any()}
  share = {str(n): float((lens == n).mean())
           for n in range(0, max_n + 1) if (lens == n).any()}
  return chain_record(
      prompts, acc, trace, t_start, continuation_s, t0,
      method=("teacher-forced prompt lookup along the target's greedy "
              "continuation (no stop id): at each position the decoder's "
              "best match (longest n of 3..1, latest) proposes a chain, "
              "accepted up to its first token that differs"),
      max_ngram=max_n, min_ngram=min_n, chain_by_match=by_match,
      match_share=share)


def eagle_record(model, prompts, inputs, results, t_start, continuation_s
                 ) -> dict:
  """The EAGLE drafter's chain file (module docstring), written and
  returned: per prompt and continuation position, the drafts of its chain
  that greedy verification accepts and their path log-probabilities
  (`train.drafter.chain_trace`)."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from seqdec.checkpoints import drafters as drafter_ckpt
  from seqdec.decoding.loops import bucket
  from seqdec.decoding.tree_specs import CONFIDENCE_TRACE
  from seqdec.models.protocol import backbone_features
  from seqdec.train import drafter as train_drafter
  # pylint: enable=g-import-not-at-top
  depth = _MAX_RANK.value
  net, keep_ids = drafter_ckpt.load_for(model, _CHECKPOINT.value, "eagle")
  taps = tuple(getattr(net, "taps", ()))
  keep = None if keep_ids is None else jnp.asarray(keep_ids)

  target_def, target_state = nnx.split(model)
  net_def, net_state = nnx.split(net)

  @jax.jit
  def trace_of(target_state, net_state, tokens, length, index):
    target = nnx.merge(target_def, target_state)
    pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    feats, _ = backbone_features(target, tokens, pos,
                                 target.init_cache(1, tokens.shape[1]),
                                 taps=taps)
    batch = dict(tokens=tokens, features=feats, lengths=length, index=index)
    return train_drafter.chain_trace(nnx.merge(net_def, net_state), target,
                                     batch, depth, keep)

  t0 = time.perf_counter()
  acc, trace = [], {}
  for p, ids, r in zip(prompts, inputs, results):
    seq = list(ids) + list(r.tokens)
    tokens = np.zeros((1, bucket(len(seq) + depth)), np.int32)
    tokens[0, :len(seq)] = seq
    # The round at continuation position t has root x_{P+t}: index P-1+t.
    index = len(ids) - 1 + np.arange(len(r.tokens))[None]
    a, logq = jax.device_get(trace_of(target_state, net_state,
                                      jnp.asarray(tokens),
                                      jnp.array([len(seq)]),
                                      jnp.asarray(index)))
    acc.append(a[0])
    trace[p.id] = [a[0].tolist(), np.round(logq[0], 5).tolist()]
    log(f"  {p.id:16s} mean accepted {float(a[0].mean()):.2f}, "
        f"mean q(first draft) {float(np.exp(logq[0, :, 0]).mean()):.2f}")
  return chain_record(
      prompts, acc, trace, t_start, continuation_s, t0,
      method=("teacher-forced EAGLE chains along the target's greedy "
              "continuation (no stop id): at each position the drafter "
              "drafts --max_rank levels from the target's features of the "
              "committed text and its own after, accepted up to the first "
              "draft that differs (`train.drafter.chain_trace`); with each "
              "node's path log q, which the round gate reads"),
      trace_kind=CONFIDENCE_TRACE, checkpoint=_CHECKPOINT.value or "shipped")


def chain_record(prompts, accepted, trace, t_start, continuation_s, probe_t0,
                 **fields) -> dict:
  """A chain drafter's acceptance file from its per-prompt accepted drafts
  (arrays, one entry per continuation position) and traces: the chain
  curve c_d overall ('chain', and 'probs' = [c_1]), by category and by
  prompt, written and returned."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from seqdec.decoding import acceptance_rates
  # pylint: enable=g-import-not-at-top
  depth = _MAX_RANK.value
  cats = np.array([p.category for p, a in zip(prompts, accepted)
                   for _ in range(len(a))])
  every = np.concatenate(accepted)
  chain = chain_curve(every, depth)
  record = dict(
      drafter=drafter_label(), target=_MODEL.value, temperature=0.0,
      rule="greedy", trials=int(len(every)),
      command="python launch/measure_acceptance.py " + " ".join(
          a for a in sys.argv[1:]),
      max_rank=depth, max_new_tokens=_MAX_NEW_TOKENS.value,
      per_category=_PER_CATEGORY.value or None,
      prompts=[p.id for p in prompts], chain=chain,
      chain_by_category={c: chain_curve(every[cats == c], depth)
                         for c in dict.fromkeys(cats.tolist())},
      chain_tau={str(g): 1.0 + sum(chain[:g]) for g in (1, 2, 4, 8)
                 if g <= depth},
      per_prompt=[dict(id=p.id, category=p.category, positions=len(a),
                       chain=chain_curve(a, depth))
                  for p, a in zip(prompts, accepted)],
      # Per prompt, per position: what 'auto' replays
      # (`sequoia.replay_chain`, `sequoia.replay_model_chain`).
      trace=trace,
      seconds=dict(continuation=continuation_s,
                   probe=time.perf_counter() - probe_t0,
                   total=time.perf_counter() - t_start),
      machine=bench.machine_info(packages=("jax", "jaxlib", "flax")),
      **fields)
  out = _OUTPUT.value or default_output()
  acceptance_rates.write_acceptance(out, chain[:1], **record)
  record.update(probs=chain[:1], output=os.path.abspath(out),
                reject_all=1.0 - chain[0], sequoia_tau={})
  return record


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.run_reporting_user_errors(check_flags)
  rec = cli.run_reporting_user_errors(measure)
  print(json.dumps(dict(
      output=rec["output"], drafter=rec["drafter"],
      temperature=rec["temperature"], trials=rec["trials"],
      probs=[round(x, 4) for x in rec["probs"]],
      reject_all=round(rec["reject_all"], 4),
      sequoia_tau={b: round(t, 3) for b, t in rec["sequoia_tau"].items()},
      chain_tau={b: round(t, 3) for b, t in rec["chain_tau"].items()},
      seconds={k: round(v, 1) for k, v in rec["seconds"].items()}), indent=2))


if __name__ == "__main__":
  app.run(main)
