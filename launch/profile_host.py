"""Measures what a verify costs on this host: the host profile of a model.

  python launch/profile_host.py                       # SmolLM2, f32, into
                                                      # ~/.cache/seqdec/host_profiles.json
  python launch/profile_host.py \\
      --acceptance=configs/acceptance/smollm2_layerskip-skip4-15_t0.json \\
      --out=benchmarks/results/host_profiles.json --plot=benchmarks/results/host_profile.png
  python launch/profile_host.py --model=tiny --sizes=1,4 --cache_lens=16  # smoke

For every precision policy (--policies), cache length S (--cache_lens) and
tree size T (--sizes), the median ms of the target's forward over T new
tokens after S committed ones (batch 1, the cache donated as in the
decoding loop); for the drafter of each --acceptance file (layer skip, a
truncated draft LM), its forward over T tokens (one tree level) at the
largest S. Every point follows the quiet-machine protocol of
`seqdec.host_profile.quiet_median` (rounds until three agree within
--spread), and nothing is written if a point does not settle. The profile
is added to --out under this host's key (CPU model and ISA flags, cores,
jax/jaxlib; `seqdec.host_profile.host_info`); decoding with
`tree=auto:<acceptance file>` reads it from there
(`$SEQDEC_HOST_PROFILES`, else ~/.cache/seqdec/host_profiles.json, then
the repo's benchmarks/results/host_profiles.json). Prints a JSON summary.

With --round_drafters (model drafters, e.g. eagle) it also times whole
rounds of the compiled decoding loop with chain(D) for D in --round_depths,
every round drafted or every round gated, and the autoregressive step
(`round_ms`): what 'auto' prices a model drafter's replayed chains with
(`seqdec.decoding.sequoia.replay_model_chain`). --update merges a run into
this host's existing profile (e.g. `--update --sizes= --policies=f32_packed
--round_drafters=eagle` adds the EAGLE rounds alone).
"""

import sys
import time

from absl import app
from absl import flags

from seqdec import cli
from seqdec.errors import UserError

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct",
                             "Target: a registry name, HF dir or .gguf.")
_SIZES = flags.DEFINE_list("sizes", ["1", "2", "4", "8", "16", "32", "64",
                                     "128"], "Tree sizes T (tokens).")
_DRAFT_SIZES = flags.DEFINE_list("draft_sizes", ["1", "2", "4", "8", "16",
                                                 "32"],
                                 "Level widths for the drafter curves.")
_CACHE = flags.DEFINE_list("cache_lens", ["128", "512"],
                           "Committed cache lengths S.")
_POLICIES = flags.DEFINE_list(
    "policies", ["f32"], "Precision policies to measure (f32, f32_packed, "
    "bf16_packed, bf16_weights); the drafter curves use the first.")
_ACCEPT = flags.DEFINE_multi_string(
    "acceptance", [], "Acceptance files whose drafters to measure.")
_OUT = flags.DEFINE_string("out", None, "Profile file (default: "
                           "seqdec.host_profile.default_path()).")
_PLOT = flags.DEFINE_string("plot", "", "Also draw the curves to this PNG.")
_ROUND_DRAFTERS = flags.DEFINE_list(
    "round_drafters", [], "Model drafters (a method's drafter part, e.g. "
    "eagle) whose loop rounds to time with chain(D), drafted and gated, "
    "under each policy ('auto' prices their chains with them).")
_ROUND_DEPTHS = flags.DEFINE_list("round_depths", ["1", "2", "3", "4", "6"],
                                  "Chain depths D of --round_drafters.")
_UPDATE = flags.DEFINE_bool(
    "update", False, "Merge into this host's profile in --out: keep what "
    "this run does not measure (with --sizes= empty, no verify curves).")
_ROUND_TOKENS = flags.DEFINE_integer(
    "round_tokens", 48, "Tokens decoded per timed run of --round_drafters.")
_SPREAD = flags.DEFINE_float("spread", 0.05,
                             "Largest relative spread of 3 round medians.")
_PER_ROUND = flags.DEFINE_integer("per_round", 5, "Calls per round.")
_MAX_ROUNDS = flags.DEFINE_integer("max_rounds", 12, "Rounds per point.")


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def ints(name, values):
  try:
    out = [int(v) for v in values]
  except ValueError:
    raise UserError(f"--{name} must be integers, got {values}") from None
  if not out or min(out) < 1:
    raise UserError(f"--{name} must be integers >= 1, got {values}")
  return out


def draft_model(target, drafter: str):
  """The model one level of `drafter` (an acceptance file's name) runs."""
  # pylint: disable=g-import-not-at-top
  from seqdec.decoding.drafters import model as drafter_models
  # pylint: enable=g-import-not-at-top
  name, _, arg = drafter.partition("@")
  if name == "layerskip" and arg:
    layers = drafter_models.parse_layers(arg.removeprefix("layers="),
                                         target.config.num_layers)
    return drafter_models.layer_subset(target, layers)
  if name == "draft" and arg.startswith("draft_layers="):
    return drafter_models.truncated(target, int(arg.split("=", 1)[1]))
  raise UserError(f"cannot profile drafter {drafter!r}: layerskip@<layers> "
                  f"and draft@draft_layers=<k> are supported")


def measure_rounds(model, tokenizer, drafter: str, depths, tokens: int,
                   **quiet) -> tuple[dict[int, dict[str, float]], dict]:
  """`({D: {'drafted': ms, 'gated': ms}}, stats)`: ms per round of the
  compiled decoding loop with `drafter` and chain(D) on the first frozen
  prompt, every round verifying its chain (gate 0: a model drafter drafts
  every round) or its root alone (a gate no round passes); D = 0 is the
  autoregressive step. Medians by the quiet-machine protocol."""
  # pylint: disable=g-import-not-at-top
  from seqdec import bench, host_profile
  from seqdec.decoding import spec as spec_lib
  from seqdec.generator import Generator
  # pylint: enable=g-import-not-at-top
  name = drafter.split("@")[0]
  if name not in spec_lib.DRAFTER_OPTIONS or name == "ngram":
    raise UserError(f"--round_drafters takes model drafters (a method's "
                    f"drafter part, e.g. eagle), got {drafter!r}")
  prompt = bench.model_prompt_set(_MODEL.value, per_category=1)[0]
  kw = dict(max_new_tokens=tokens, eos_ids=(), max_batch=1)

  def per_round(gen, ids):
    return lambda: bench.decode_one(gen, ids, tokens)["ms_per_round"]

  ar = Generator(model, tokenizer, None, **kw)
  ids = ar.encode(prompt.as_input())
  bench.decode_one(ar, ids, tokens)                      # compile
  step, st = host_profile.quiet_samples(per_round(ar, ids), **quiet)
  out, stats = {0: dict(drafted=step, gated=step)}, {"0": st}
  log(f"{drafter}: step {step:.2f} ms")
  for d in depths:
    out[d] = {}
    for kind, gate in (("drafted", 0.0), ("gated", bench.CLOSED_GATE)):
      gen = Generator(model, tokenizer, f"{drafter}@gate={gate:g}/chain{d}",
                      **kw)
      bench.decode_one(gen, ids, tokens)                 # compile
      out[d][kind], stats[f"{d}/{kind}"] = host_profile.quiet_samples(
          per_round(gen, ids), **quiet)
    log(f"{drafter} chain{d}: drafted {out[d]['drafted']:.2f} ms, gated "
        f"{out[d]['gated']:.2f} ms per round")
  return out, stats


def plot(profile, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for policy, curves in profile.verify_ms.items():
    for s, c in sorted(curves.items()):
      xs = sorted(c)
      ax.plot(xs, [c[x] for x in xs], marker="o",
              label=f"target {policy}, S={s}")
  for d, c in profile.draft_ms.items():
    xs = sorted(c)
    ax.plot(xs, [c[x] for x in xs], marker="s", linestyle="--",
            label=f"drafter {d}")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("tokens per forward (tree size T)")
  ax.set_ylabel("ms per forward (median)")
  h = profile.host
  ax.set_title(f"{profile.model} on {h.get('cpu_model')} "
               f"({h.get('cores')} cores, ISA {','.join(h.get('isa', []))})",
               fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def run() -> dict:
  # pylint: disable=g-import-not-at-top
  import seqdec
  from seqdec import host_profile
  from seqdec.decoding import acceptance_rates
  # pylint: enable=g-import-not-at-top
  sizes = (ints("sizes", _SIZES.value) if _SIZES.value or not _UPDATE.value
           else [])
  draft_sizes = ints("draft_sizes", _DRAFT_SIZES.value)
  cache_lens = ints("cache_lens", _CACHE.value)
  drafters = []
  for path in _ACCEPT.value:
    rates = acceptance_rates.load_acceptance(path)
    if rates.meta.get("target") not in (None, _MODEL.value):
      raise UserError(f"{path} was measured on {rates.meta.get('target')!r}, "
                      f"not --model={_MODEL.value!r}")
    drafters.append(str(rates.meta["drafter"]))
  t0 = time.perf_counter()
  quiet = dict(per_round=_PER_ROUND.value, max_rounds=_MAX_ROUNDS.value,
               spread=_SPREAD.value)
  load_before = host_profile.load_average()
  log(f"host {host_profile.host_info()}, load {load_before}")
  round_depths = ints("round_depths", _ROUND_DEPTHS.value)
  verify, stats, rounds = {}, {}, {}
  for policy in _POLICIES.value:
    log(f"policy {policy}")
    model, tokenizer = seqdec.load_pretrained(_MODEL.value, precision=policy)
    if sizes:
      verify[policy], st = host_profile.measure_curves(
          model, sizes, cache_lens, log=log, **quiet)
      stats.update({f"{policy}/{k}": v for k, v in st.items()})
    for d in _ROUND_DRAFTERS.value:
      rounds[f"{policy}/{d}"], st = measure_rounds(
          model, tokenizer, d, round_depths, _ROUND_TOKENS.value, **quiet)
      stats.update({f"{policy}/{d}/rounds/{k}": v for k, v in st.items()})
  target, _ = seqdec.load_pretrained(_MODEL.value,
                                     precision=_POLICIES.value[0])
  draft = {}
  for d in dict.fromkeys(drafters):
    log(f"drafter {d}")
    curves, st = host_profile.measure_curves(
        draft_model(target, d), draft_sizes, [max(cache_lens)], log=log,
        **quiet)
    draft[d] = curves[max(cache_lens)]
    stats.update({f"{d}/{k}": v for k, v in st.items()})
  out = _OUT.value or host_profile.default_path()
  commands = ["python launch/profile_host.py " + " ".join(sys.argv[1:])]
  if _UPDATE.value:   # this run's command after the merged profile's
    old = host_profile.find(_MODEL.value, out)
    if old is None:
      raise UserError(f"--update: {out!r} holds no profile of this host for "
                      f"{_MODEL.value!r} to update")
    verify, draft = {**old.verify_ms, **verify}, {**old.draft_ms, **draft}
    rounds = {**old.round_ms, **rounds}
    stats = {**old.meta.get("points", {}), **stats}
    commands = [*old.meta.get("commands", [old.meta.get("command")]),
                *commands]
  if not verify:
    raise UserError("no verify curve measured (--sizes is empty)")
  profile = host_profile.HostProfile(
      host=host_profile.host_info(), model=_MODEL.value,
      verify_ms=verify, draft_ms=draft, round_ms=rounds,
      meta=dict(points=stats, load_before=load_before,
                load_after=host_profile.load_average(),
                seconds=round(time.perf_counter() - t0, 1),
                command=commands[-1], commands=commands))
  host_profile.write_profile(out, profile)
  if _PLOT.value:
    plot(profile, _PLOT.value)
  first_curves = verify.get(_POLICIES.value[0]) or next(iter(verify.values()))
  s = max(first_curves)
  first = first_curves[s][min(first_curves[s])]
  return dict(out=out, key=profile.key, host=profile.host,
              verify_ms={p: {str(k): {str(t): round(v, 2)
                                      for t, v in c.items()}
                             for k, c in curves.items()}
                         for p, curves in verify.items()},
              # Each policy's verify(T) over the first policy's step at T=1.
              verify_over_step={p: {str(t): round(v / first, 2)
                                    for t, v in curves[s].items()}
                                for p, curves in verify.items()},
              draft_ms={d: {str(t): round(v, 2) for t, v in c.items()}
                        for d, c in draft.items()},
              round_ms={d: {str(k): {w: round(v, 2) for w, v in r.items()}
                            for k, r in c.items()}
                        for d, c in rounds.items()},
              seconds=profile.meta["seconds"])


main = cli.json_main(run)


if __name__ == "__main__":
  app.run(main)
