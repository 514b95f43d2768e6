"""Hardware-aware n-gram speculation (issue 15): the lookup's confidence,
the replay of its rounds, and 'auto' chains.

Oracles: the decoder itself for the replay (greedy n-gram decoding is a
function of the tokens, so the replay of the teacher-forced lookups must
give the engine's exact rounds, gated and drafted, with output equal to
autoregressive decoding in float64); the device lookup (`find_matches`)
for its host twin; brute force over chain depths for the choice.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from seqdec import Generator, Tokenizer, host_profile, testing
from seqdec.decoding import acceptance_rates, sequoia, tree_specs, trees
from seqdec.decoding import spec as spec_lib
from seqdec.decoding.spec import SpecConfig
from seqdec.decoding.drafters import Round
from seqdec.decoding.drafters import ngram as ngram_lib
from seqdec.decoding.drafters import DrafterError
from seqdec.errors import ConfigError, TreeError

# Made-up confidences c_n[d]: 1-gram matches weak, 3-gram matches strong.
CONFIDENCE = {1: (0.1, 0.05, 0.02), 2: (0.5, 0.3, 0.2), 3: (0.9, 0.8, 0.7)}
PROMPTS = [[1, 2, 3, 4, 0, 1, 2], [7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 100, 30],
           [33, 34, 200, 1]]
MAX_NEW = 24


def test_host_lookup_is_the_device_lookup():
  """`best_match` (host) == the first match of `find_matches` (device), with
  its length; `chain_acceptance` == a direct count."""
  rng = np.random.default_rng(0)
  for trial in range(20):
    h = rng.integers(0, 3, size=(2, 24))
    n_h = rng.integers(2, 25, size=2)
    hist = ngram_lib.History.start(jnp.asarray(h, jnp.int32),
                                   jnp.asarray(n_h, jnp.int32), 3)
    end, found, n = ngram_lib.find_matches(hist, 3, 1, 1)
    for b in range(2):
      got = ngram_lib.best_match(h[b, :n_h[b]], 3, 1)
      want = (int(n[b, 0]), int(end[b, 0])) if found[b, 0] else (0, -1)
      assert got == want, (trial, b, got, want)
  # prompt 1 2 3 | continuation 1 2 3 9: at y_0 = 1 the 1-gram "1" ends at
  # j = 0 and proposes 2 3 1 (history 1 2 3 1): 2 and 3 accepted, 1 != 9.
  n, a, v = ngram_lib.chain_acceptance([1, 2, 3], [1, 2, 3, 9], 3, 1, 4)
  np.testing.assert_array_equal(n, [1, 2, 3, 0])
  np.testing.assert_array_equal(a, [2, 1, 0, 0])
  np.testing.assert_array_equal(v, [3, 3, 3, 0])


def test_confidence_sets_path_logq_and_the_gate_reads_it():
  """A node at depth d on a branch matched with length n carries
  log c_n[d]: E = sum of c_n over the valid drafts; `Tree.gated` keeps the
  strong match and declines the weak one."""
  drafter = ngram_lib.NgramDrafter(confidence=CONFIDENCE)
  # Row 0 ends "1 2 3" seen before (3-gram match); row 1 ends "9", seen
  # once before (1-gram match) with two tokens after it.
  tokens = jnp.array([[1, 2, 3, 4, 5, 1, 2, 3, 0, 0],
                      [9, 6, 7, 8, 9, 0, 0, 0, 0, 0]], jnp.int32)
  state = ngram_lib.History.start(tokens, jnp.array([8, 5]), 3)
  rnd = Round(root=jnp.array([3, 9]), prev=jnp.array([2, 8]),
              length=jnp.array([7, 4]), live=jnp.array([True, True]))
  tree = drafter.propose((), state, trees.chain(3), rnd, None, None)[0]
  np.testing.assert_array_equal(tree.tokens, [[3, 4, 5, 1], [9, 6, 7, 8]])
  np.testing.assert_allclose(tree.expected_accepted(),
                             [sum(CONFIDENCE[3]), sum(CONFIDENCE[1])],
                             rtol=1e-6)
  gated, speculate = tree.gated(0.5)
  np.testing.assert_array_equal(speculate, [True, False])
  np.testing.assert_array_equal(gated.valid[1], [True, False, False, False])
  with pytest.raises(DrafterError, match="give confidence"):
    ngram_lib.NgramDrafter(adapt=4)
  with pytest.raises(ConfigError, match="has no 'chain_by_match'"):
    Generator(testing.tiny_model(), Tokenizer.byte_level(),
              "ngram@confidence=configs/acceptance/smollm2_draft10_t0.json"
              "/chain2")


@pytest.mark.parametrize("adapt", [2.0, pytest.param(0.0,
                                                     marks=pytest.mark.slow)])
def test_replay_gives_the_engines_rounds_and_the_gate_switches_inside(
    x64, adapt):
  """Greedy n-gram decoding with the confidence gate (the curves as given,
  or rescaled by each row's record) on a target whose continuations
  repeat: per row, the rounds and drafted rounds the replay of the
  autoregressive continuation's lookups predicts (`sequoia.replay_rounds`)
  are the engine's, gated and drafted rounds alternate inside each run,
  and the output equals autoregressive decoding (float64)."""
  model, tok = testing.cyclic_model(dtype="float64"), Tokenizer.byte_level()
  ar = Generator(model, tok, max_new_tokens=MAX_NEW,
                 eos_ids=()).generate_ids(PROMPTS)
  # A prior that undersells 3-gram matches (E = 0.32 < the gate): as given
  # it gates them; rescaled by a row's record, which finds them accepted,
  # it speculates on them after the first rounds.
  gate, depth = 0.4, 3
  confidence = {**CONFIDENCE, 3: (0.12, 0.1, 0.1)}
  drafter = ngram_lib.NgramDrafter(confidence=confidence, adapt=adapt)
  out = Generator(model, tok, max_new_tokens=MAX_NEW, eos_ids=(),
                  drafter=drafter, tree=f"chain{depth}",
                  gate=gate).generate_ids(PROMPTS)
  drafted_all, gated_all, changed = 0, 0, 0
  for prompt, r, want in zip(PROMPTS, out, ar):
    assert r.tokens == want.tokens
    trace = ngram_lib.chain_acceptance(prompt, want.tokens, 3, 1, depth)
    rounds, drafted, emitted = sequoia.replay_rounds(
        *trace, depth, confidence, gate, adapt)
    changed += sequoia.replay_rounds(*trace, depth, confidence, gate)[1] != (
        drafted)
    assert emitted == MAX_NEW - 1
    assert (rounds, drafted) == (r.metrics["target_calls"] - 1,
                                 r.metrics["drafted_rounds"])
    matched = int(sum(1 for n in trace[0] if n))
    drafted_all += drafted
    gated_all += rounds - drafted
    print("rounds", rounds, "drafted", drafted, "matched positions", matched)
  assert drafted_all > 0 and gated_all > 0
  assert bool(changed) == bool(adapt)   # the record changed decisions


def brute_force(traces, by_match, verify, max_depth):
  """max over D <= max_depth of tokens / ms of the replayed decoding."""
  best, best_d = 1.0 / verify(1), 0
  for d in range(1, max_depth + 1):
    gate = max(verify(d + 1) / verify(1) - 1, 0.0)
    stats = [sequoia.replay_rounds(*t, d, by_match, gate) for t in traces]
    ms = sum(dr * verify(d + 1) + (r - dr) * verify(1) for r, dr, _ in stats)
    rate = sum(t for _, _, t in stats) / ms
    if rate > best * (1 + 1e-12):
      best, best_d = rate, d
  return best_d


@pytest.mark.parametrize("per_token", [0.05, 0.5, 50.0])
def test_replay_chain_is_the_best_depth(per_token):
  """The chain `replay_chain` picks is the brute-force best depth for a
  synthetic verify curve: deep when a verify is cheap, none when dear."""
  rng = np.random.default_rng(1)
  traces = []
  for _ in range(4):
    n = rng.integers(0, 4, size=40)
    a = np.where(n == 3, rng.integers(0, 6, size=40),
                 np.where(n > 0, rng.integers(0, 2, size=40), 0))
    traces.append((n.tolist(), a.tolist(), np.minimum(a + 2, 8).tolist()))
  by_match = {1: (0.2, 0.05), 2: (0.5, 0.3, 0.1), 3: (0.9, 0.8, 0.7, 0.6)}
  verify = lambda t: 10.0 + per_token * (t - 1)  # noqa: E731
  got = sequoia.replay_chain(traces, by_match, verify, 6)
  assert got.nodes == brute_force(traces, by_match, verify, 6)
  assert (got.nodes == 0) == (per_token == 50.0)
  if per_token == 0.05:
    assert got.nodes >= 3


def ngram_file(path, traces, target="tiny"):
  acceptance_rates.write_acceptance(
      path, [0.5], target=target, drafter="ngram", max_rank=6,
      chain=[0.5, 0.3], chain_by_match={str(k): list(v)
                                        for k, v in CONFIDENCE.items()},
      match_share={"0": 0.5, "3": 0.5},
      trace={str(i): [list(x) for x in t] for i, t in enumerate(traces)})


def test_auto_chain_from_the_profile_and_bad_files(tmp_path, monkeypatch):
  """'auto:<ngram file>' replays the file's traces under this host's
  (synthetic) verify curve, with the spec's n-gram `adapt`; malformed
  chain fields and traces are refused with the file named."""
  traces = [([3] * 30, [4] * 30, [6] * 30), ([1, 0] * 15, [0] * 30,
                                                [1, 0] * 15)]
  accept = str(tmp_path / "ngram.json")
  ngram_file(accept, traces)
  path = str(tmp_path / "p.json")
  curve = {t: 10.0 + 0.5 * (t - 1) for t in (1, 2, 4, 8, 16, 32)}
  prof = host_profile.HostProfile(host=host_profile.host_info(), model="tiny",
                                  verify_ms={"f32": {128: curve}}, draft_ms={})
  host_profile.write_profile(path, prof)
  got = tree_specs.auto_choice(f":{accept}", profile_path=path)
  want = sequoia.replay_chain(traces, CONFIDENCE, prof.verify, 6)
  assert got == want and got.nodes > 0
  monkeypatch.setenv(host_profile.ENV_PATH, path)
  spec = SpecConfig.parse(f"ngram@confidence={accept}@adapt=2/auto:{accept}")
  assert spec_lib.build_tree(spec) == sequoia.replay_chain(
      traces, CONFIDENCE, prof.verify, 6, adapt=2.0).shape
  # A foreign profile: a warning and the default tree, as for any drafter.
  other = str(tmp_path / "other.json")
  host_profile.write_profile(other, host_profile.HostProfile(
      host=dict(host_profile.host_info(), cpu_model="Other"), model="tiny",
      verify_ms={"f32": {128: curve}}, draft_ms={}))
  with pytest.warns(RuntimeWarning, match="has no profile of this host"):
    assert np.isnan(tree_specs.auto_choice(f":{accept}",
                                           profile_path=other).cost_ms)
  obj = json.load(open(accept))
  for key, value, message in (
      ("chain", [0.3, 0.5], "non-increasing"),
      ("chain_by_match", {"x": [0.1]}, "not a match length"),
      ("match_share", {"0": 0.7}, "sums to"),
  ):
    bad = str(tmp_path / f"bad_{key}.json")
    json.dump(dict(obj, **{key: value}), open(bad, "w"))
    with pytest.raises(acceptance_rates.AcceptanceError, match=message):
      acceptance_rates.load_acceptance(bad)
  bad = str(tmp_path / "bad_trace.json")
  json.dump(dict(obj, trace={"0": [[1, 2], [0]]}), open(bad, "w"))
  with pytest.raises(TreeError, match="three lists"):
    tree_specs.auto_choice(f":{bad}", profile_path=path)


def test_bench_spec_refuses_a_bad_method_before_loading(tmp_path):
  """A method string with an unknown drafter option: one error line and
  exit status 1, before any model loads; nothing written."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "spec.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(root, "launch", "bench_spec.py"),
       "--methods=ngram@min_n=2/chain4", "--quick", f"--output={out}"],
      capture_output=True, text=True, timeout=120, check=False)
  lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
  assert proc.returncode == 1, proc.stderr
  assert len(lines) == 1 and "unknown option 'min_n'" in lines[0]
  assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--category=poetry"], "unknown --category 'poetry'"),
    (["--depth=0"], "must be >= 1")])
def test_bench_round_overhead_refuses_bad_flags(args, message):
  """Bad flags of the round-overhead bench: one error line, exit status 1,
  before any model loads."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, os.path.join(root, "launch", "bench_round_overhead.py"),
       *args], capture_output=True, text=True, timeout=120, check=False)
  lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
  assert proc.returncode == 1, proc.stderr
  assert len(lines) == 1 and message in lines[0], proc.stderr


def test_model_chain_replay_by_hand_and_its_optimum():
  """`replay_confident_rounds` on a hand-checked trace, and
  `replay_model_chain` == the brute-force best depth (chain0 when every
  drafted round costs too much) under synthetic loop rounds."""
  # Positions 0..5 (5 tokens after the prefill's); q(first draft) high at
  # 0, 3 and low elsewhere.
  accepted = [2, 0, 0, 3, 1, 0]
  logq = [[np.log(0.9), np.log(0.8)], [np.log(0.1), np.log(0.05)],
          [np.log(0.2), np.log(0.1)], [np.log(0.9), np.log(0.9)],
          [np.log(0.3), np.log(0.1)], [np.log(0.1), np.log(0.1)]]
  # Ungated chain2: i=0 emits 3 -> i=3 emits 3 (cut to the 2 left): 2 rounds.
  assert sequoia.replay_confident_rounds(accepted, logq, 2, 0.0) == (2, 2, 5)
  # Gate 1.0 (E = q1 + q2): i=0 E=1.7 drafts (3 tokens), i=3 E=1.8 drafts.
  assert sequoia.replay_confident_rounds(accepted, logq, 2, 1.0) == (2, 2, 5)
  # Gate 1.75 declines i=0 (1.7): i=0 1 token, i=1 E=0.15 declined, i=2
  # 0.3 declined, i=3 E=1.8 drafts 3 (cut to 2).
  assert sequoia.replay_confident_rounds(accepted, logq, 2, 1.75) == (4, 1, 5)
  rng = np.random.default_rng(3)
  traces = []
  for _ in range(4):
    a = rng.integers(0, 5, size=40).tolist()
    q = np.cumsum(np.log(rng.uniform(0.05, 1.0, size=(40, 6))), axis=1)
    traces.append((a, q.tolist()))

  def brute(round_ms, gate, max_depth):
    best = (1e3 / round_ms(0)[0], 0)
    for d in range(1, max_depth + 1):
      rr = dd = tt = 0
      for a, q in traces:
        r, k, t = sequoia.replay_confident_rounds(a, q, d, gate(d))
        rr, dd, tt = rr + r, dd + k, tt + t
      ms = dd * round_ms(d)[0] + (rr - dd) * round_ms(d)[1]
      best = max(best, (1e3 * tt / ms, -d))
    return -best[1] if best[1] else 0

  for step, per_level, verify_extra in ((20.0, 1.0, 2.0), (20.0, 8.0, 6.0),
                                        (20.0, 0.2, 0.5)):
    round_ms = lambda d, s=step, l=per_level, v=verify_extra: (  # noqa: E731
        (s,) * 2 if d == 0 else (s + l * d + v * d, s + l * d))
    gate = lambda d, s=step, v=verify_extra: v * d / s  # noqa: E731
    got = sequoia.replay_model_chain(traces, round_ms, gate, range(7))
    assert got.nodes == brute(round_ms, gate, 6), (step, per_level)
  # The per-category floor: one group drafts well (a = 4), the other never
  # (a = 0, the drafter sure of itself): chain(D) wins overall but runs the
  # second group at step / drafted_ms < 0.97 of plain decoding.
  good = ([4] * 40, np.log(np.full((40, 6), 0.9)).tolist())
  bad = ([0] * 40, np.log(np.full((40, 6), 0.9)).tolist())
  costly = lambda d: (20.0, 20.0) if d == 0 else (25.0, 22.0)  # noqa: E731
  pooled = sequoia.replay_model_chain([good, bad], costly, lambda d: 0.0,
                                      range(5))
  assert pooled.nodes > 0
  floored = sequoia.replay_model_chain([good, bad], costly, lambda d: 0.0,
                                       range(5), ["easy", "hard"], 0.97)
  assert floored.nodes == 0
  assert sequoia.replay_model_chain(
      [good, bad], costly, lambda d: 0.0, range(5), ["easy", "easy"],
      0.97) == pooled
  # Rounds that cost 5 steps whatever they draft, where a round emits at
  # most 5 tokens (a <= 4): never worth it.
  never = sequoia.replay_model_chain(
      traces, lambda d: (20.0, 20.0) if d == 0 else (100.0, 100.0),
      lambda d: 0.0, range(7))
  assert never.nodes == 0 and never.tau == 1.0


def confidence_file(path, traces, drafter="eagle", target="tiny"):
  acceptance_rates.write_acceptance(
      path, [0.5], target=target, drafter=drafter, max_rank=6,
      chain=[0.5, 0.3], trace_kind=tree_specs.CONFIDENCE_TRACE,
      trace={str(i): [list(a), [list(r) for r in q]]
             for i, (a, q) in enumerate(traces)})


def test_auto_prices_a_model_drafters_chains_with_loop_rounds(tmp_path):
  """'auto:<EAGLE chain file>' replays its chains under this host's
  measured loop rounds (`HostProfile.rounds`) with the gate at each
  chain's break-even; a profile without those rounds warns and falls back;
  malformed traces and round records are refused, naming the field."""
  rng = np.random.default_rng(5)
  traces = [(rng.integers(0, 4, size=30).tolist(),
             np.cumsum(np.log(rng.uniform(0.1, 1.0, size=(30, 6))),
                       axis=1).tolist()) for _ in range(3)]
  accept = str(tmp_path / "eagle.json")
  confidence_file(accept, traces)
  curve = {t: 10.0 + 0.5 * (t - 1) for t in (1, 2, 4, 8, 16, 32)}
  rounds = {d: dict(drafted=10.0 + 1.5 * d, gated=10.0 + 1.0 * d)
            for d in (0, 1, 2, 3, 4, 6)}    # D = 5 not measured: skipped
  rounds[0] = dict(drafted=10.0, gated=10.0)
  prof = host_profile.HostProfile(
      host=host_profile.host_info(), model="tiny",
      verify_ms={"f32": {128: curve}}, round_ms={"f32/eagle": rounds})
  path = str(tmp_path / "p.json")
  host_profile.write_profile(path, prof)
  again = host_profile.find("tiny", path)
  assert again.rounds("eagle", 3, "f32") == (14.5, 13.0)
  got = tree_specs.auto_choice(f":{accept}", profile_path=path)
  want = sequoia.replay_model_chain(
      traces, lambda d: (rounds[d]["drafted"], rounds[d]["gated"]),
      lambda d: prof.break_even(d + 1), (1, 2, 3, 4, 6))
  assert got == want and got.nodes > 0
  # No rounds of this drafter under this policy: the default tree.
  bare = str(tmp_path / "bare.json")
  host_profile.write_profile(bare, host_profile.HostProfile(
      host=host_profile.host_info(), model="tiny",
      verify_ms={"f32": {128: curve}}))
  with pytest.warns(RuntimeWarning, match="no loop rounds of 'eagle'"):
    assert np.isnan(tree_specs.auto_choice(f":{accept}",
                                           profile_path=bare).cost_ms)
  bad = str(tmp_path / "bad_trace.json")
  confidence_file(bad, [([1, 2], [[-0.1], [0.5]])])    # log q > 0
  with pytest.raises(TreeError, match="path log-probabilities"):
    tree_specs.auto_choice(f":{bad}", profile_path=path)
  obj = json.load(open(path))
  for entry, message in ((dict(drafted=-1.0, gated=2.0), "positive time"),
                         (dict(drafted=1.0), "must be")):
    broken = json.loads(json.dumps(obj))
    [key] = broken["profiles"]
    broken["profiles"][key]["round_ms"]["f32/eagle"]["2"] = entry
    bad_prof = str(tmp_path / "bad_prof.json")
    json.dump(broken, open(bad_prof, "w"))
    with pytest.raises(host_profile.ProfileError,
                       match=r"round_ms\['f32/eagle'\]\[2\]"):
      host_profile.read_file(bad_prof)
