"""Host cost profiles and Sequoia's hardware-aware tree (issue 15).

The optimizer is checked against brute force over every tree of a small
budget; profiles against corrupt and foreign files (a warning and the
default tree, never another host's costs); `tree=auto` end to end on the
tiny model (the chosen tree decodes exactly like autoregressive decoding);
the quiet-machine protocol against a noisy clock.
"""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from seqdec import Generator, Tokenizer, host_profile, testing
from seqdec.decoding import acceptance_rates, sequoia, tree_specs, trees

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBS = (0.55, 0.2, 0.08)


def all_trees(max_nodes, ranks, max_depth):
  """Every prefix-closed set of rank paths (<= max_nodes, depth <=
  max_depth, ranks < `ranks`): every tree the DP searches, ranks skipped
  included."""
  paths = [p for d in range(1, max_depth + 1)
           for p in itertools.product(range(ranks), repeat=d)]
  out = [()]
  for n in range(1, max_nodes + 1):
    for subset in itertools.combinations(paths, n):
      s = set(subset)
      if all(p[:-1] in s or len(p) == 1 for p in subset):
        out.append(subset)
  return out


def sequoia_cost(verify_per_node, per_level):
  """Sequoia's cost model: a verify growing with the tree, plus one drafter
  step per level (a function of (n, d) only)."""
  def cost(shape):
    widths = sequoia.level_widths(shape)
    return 10.0 + verify_per_node * (sum(widths) - 1) + per_level * (
        len(widths) - 1)
  return cost


@pytest.mark.parametrize("verify_per_node,per_level,ranks,depth", [
    (0.3, 1.0, 3, 2), (1.5, 0.5, 2, 3), (0.05, 4.0, 2, 3)])
def test_optimizer_equals_brute_force(verify_per_node, per_level, ranks,
                                      depth):
  """max tau/cost over every tree of <= 5 nodes (ranks and depth capped;
  tau by eq. (1)) == the optimizer's choice, with AR (no tree) a
  candidate."""
  cost = sequoia_cost(verify_per_node, per_level)
  best = 0.0
  for paths in all_trees(5, ranks, depth):
    shape = trees.from_paths(list(paths)) if paths else trees.chain(0)
    tau = sequoia.expected_accepted(shape, PROBS[:ranks])
    best = max(best, tau / cost(shape))
  got = sequoia.hardware_aware_tree(PROBS[:ranks], cost, max_nodes=5,
                                    max_depth=depth)
  np.testing.assert_allclose(got.tau / got.cost_ms, best, rtol=1e-12)
  np.testing.assert_allclose(got.tau, sequoia.expected_accepted(
      got.shape, PROBS[:ranks]), rtol=1e-12)


def test_optimizer_declines_to_speculate_when_a_verify_is_dear():
  got = sequoia.hardware_aware_tree(PROBS, sequoia_cost(20.0, 5.0), 16, 4)
  assert got.nodes == 0 and got.tau == 1.0


def fake_profile(model="tiny", host=None, step=10.0, per_token=0.5,
                 draft=3.0):
  """A synthetic profile: verify(T) = step + per_token (T - 1) ms."""
  curve = {t: step + per_token * (t - 1) for t in (1, 2, 4, 8, 16, 32)}
  return host_profile.HostProfile(
      host=host_profile.host_info() if host is None else host, model=model,
      verify_ms={"f32": {128: curve}},
      draft_ms={"layerskip@first:1": {t: draft + 0.1 * t for t in (1, 4,
                                                                   16)}})


def test_profile_file_round_trip_and_interpolation(tmp_path):
  path = str(tmp_path / "p.json")
  prof = fake_profile()
  host_profile.write_profile(path, prof)
  host_profile.write_profile(path, fake_profile(model="other"))
  back = host_profile.find("tiny", path)
  assert back == prof and back.key == prof.key
  assert back.verify(3) == pytest.approx(11.0)        # between 2 and 4
  assert back.verify(64) == pytest.approx(10 + 0.5 * 63)   # extrapolated
  assert len(host_profile.read_file(path)) == 2


@pytest.mark.parametrize("damage,message", [
    ("missing", "no host profile file"),
    ("corrupt", "corrupt host profile file"),
    ("foreign", "has no profile of this host"),
    ("edited", "does not match its host and model"),
    ("negative", "is not a positive time"),
])
def test_bad_profiles_warn_and_fall_back_to_the_default_tree(
    tmp_path, damage, message):
  """A missing, corrupt, foreign or tampered profile: a RuntimeWarning
  naming the problem, and 'auto' takes the Sequoia tree of
  AUTO_FALLBACK_NODES nodes (never another host's costs)."""
  path = str(tmp_path / "p.json")
  if damage == "foreign":
    other = dict(host_profile.host_info(), cpu_model="Some Other CPU")
    host_profile.write_profile(path, fake_profile(host=other))
  elif damage != "missing":
    host_profile.write_profile(path, fake_profile())
    obj = json.load(open(path))
    entry = next(iter(obj["profiles"].values()))
    if damage == "edited":
      entry["host"]["cores"] = 999
    elif damage == "negative":
      entry["verify_ms"]["f32"]["128"]["4"] = -1
    text = json.dumps(obj)
    if damage == "corrupt":
      text = text[:len(text) // 2]
    open(path, "w").write(text)
  accept = str(tmp_path / "a.json")
  acceptance_rates.write_acceptance(accept, PROBS, target="tiny",
                                    drafter="layerskip@first:1")
  with pytest.warns(RuntimeWarning, match=message):
    got = tree_specs.auto_choice(f":{accept}", profile_path=path)
  want, tau = sequoia.optimal_tree(PROBS, tree_specs.AUTO_FALLBACK_NODES,
                                   tree_specs.AUTO_FALLBACK_DEPTH)
  assert got.shape == want and got.tau == tau and np.isnan(got.cost_ms)


@pytest.mark.slow
def test_auto_tree_decodes_like_autoregressive(x64, tmp_path, monkeypatch):
  """'layerskip.../auto:<file>' with this host's (synthetic) profile: the
  optimizer's tree for those costs, and greedy output == AR."""
  path = str(tmp_path / "profiles.json")
  host_profile.write_profile(path, fake_profile())
  monkeypatch.setenv(host_profile.ENV_PATH, path)
  accept = str(tmp_path / "a.json")
  acceptance_rates.write_acceptance(accept, PROBS, target="tiny",
                                    drafter="layerskip@first:1")
  choice = tree_specs.auto_choice(f"16d4:{accept}")
  cost = tree_specs.round_cost(fake_profile(), "layerskip@first:1")
  assert choice == sequoia.hardware_aware_tree(PROBS, cost, 16, 4)
  assert choice.nodes > 0
  # Another policy's prices: the profile has none, so the default tree.
  with pytest.warns(RuntimeWarning, match="no curve for precision"):
    fallback = tree_specs.parse(f"auto16d4:{accept}", "bf16_weights")
  assert fallback == sequoia.optimal_tree(
      PROBS, tree_specs.AUTO_FALLBACK_NODES, tree_specs.AUTO_FALLBACK_DEPTH)[0]
  model, tok = testing.tiny_model("float64"), Tokenizer.byte_level()
  prompts = ["abcabcabc", "hello there"]
  ar = Generator(model, tok, max_new_tokens=10, eos_ids=()).generate(prompts)
  spec = Generator(model, tok, f"layerskip@layers=first:1/auto16d4:{accept}",
                   max_new_tokens=10, eos_ids=()).generate(prompts)
  assert [r.tokens for r in spec] == [r.tokens for r in ar]


def test_auto_gate_is_the_hosts_break_even(tmp_path, monkeypatch):
  """`gate=auto` in a decode config: verify(N) / verify(1) - 1 of the
  spec's tree from this host's profile (N = 5 for chain4); with no usable
  profile a warning and no gate."""
  from seqdec import app  # pylint: disable=g-import-not-at-top
  from seqdec.decoding.spec import SpecConfig  # pylint: disable=g-import-not-at-top
  prof = fake_profile()
  assert prof.break_even(5) == pytest.approx(prof.verify(5) / prof.verify(1)
                                             - 1)
  path = str(tmp_path / "profiles.json")
  host_profile.write_profile(path, prof)
  monkeypatch.setenv(host_profile.ENV_PATH, path)
  spec = SpecConfig.parse("ngram/chain4")
  assert app.auto_gate("tiny", spec, "f32") == pytest.approx(
      prof.break_even(5))
  with pytest.warns(RuntimeWarning, match="no curve for precision"):
    assert app.auto_gate("tiny", spec, "bf16_weights") == 0.0
  with pytest.warns(RuntimeWarning, match="no host profile"):
    assert app.auto_gate("other-model", spec, "f32") == 0.0


def test_quiet_median_refuses_a_noisy_machine():
  ticks = iter(np.cumsum(np.random.default_rng(0).uniform(
      0.001, 0.004, 10_000)))
  with pytest.raises(host_profile.ProfileError, match="did not settle"):
    host_profile.quiet_median(lambda: None, clock=lambda: next(ticks),
                              max_rounds=6)
  steady = iter(np.arange(0, 100, 0.002))
  ms, stats = host_profile.quiet_median(lambda: None,
                                        clock=lambda: next(steady))
  assert ms == pytest.approx(2.0) and stats["rounds"] == 3


@pytest.mark.slow
def test_profile_host_script_on_the_tiny_model(tmp_path):
  """launch/profile_host.py measures and writes this host's profile (with
  a drafter curve from an acceptance file), and draws the curves. The tiny
  model's sub-millisecond points scatter under the other xdist worker's
  load (a CI-like run refused at spread 0.5), so the spread allowed is wide:
  this case is the script's plumbing; refusing a noisy machine is
  `test_quiet_median_refuses_a_noisy_machine`'s."""
  accept = str(tmp_path / "a.json")
  acceptance_rates.write_acceptance(accept, PROBS, target="tiny",
                                    drafter="layerskip@first:1")
  out, png = str(tmp_path / "p.json"), str(tmp_path / "p.png")
  done = subprocess.run(
      [sys.executable, "launch/profile_host.py", "--model=tiny",
       "--sizes=1,4", "--draft_sizes=1,2", "--cache_lens=16",
       f"--acceptance={accept}", f"--out={out}", f"--plot={png}",
       "--spread=100", "--per_round=3"],
      capture_output=True, text=True, timeout=300, cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
  summary = json.loads(done.stdout)
  prof = host_profile.find("tiny", out)
  assert prof is not None and prof.key == summary["key"]
  assert sorted(prof.verify_ms["f32"][16]) == [1, 4]
  assert sorted(prof.draft_ms["layerskip@first:1"]) == [1, 2]
  assert os.path.getsize(png) > 1000


def test_auto_stop_is_the_drafters_per_level_cost(tmp_path, monkeypatch):
  """`stop=auto`: the gated rounds' least-squares slope over chain depth
  (one drafter level) over the plain step, from this host's profile; with
  fewer than two depths a warning and no stopping."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from seqdec import app  # pylint: disable=g-import-not-at-top
  from seqdec.decoding.spec import SpecConfig  # pylint: disable=g-import-not-at-top
  rounds = {d: {"drafted": 10.0 + 5 * d, "gated": 10.0 + 2.0 * d + (
      0.3 if d == 2 else 0.0)} for d in (0, 1, 2, 3, 4)}
  prof = dataclasses.replace(fake_profile(), round_ms={"f32/eagle": rounds})
  d = np.array([1, 2, 3, 4.0])
  want = np.polyfit(d, [rounds[k]["gated"] for k in (1, 2, 3, 4)], 1)[0]
  assert prof.level_cost("eagle", "f32") == pytest.approx(want / 10.0)
  path = str(tmp_path / "profiles.json")
  host_profile.write_profile(path, prof)
  monkeypatch.setenv(host_profile.ENV_PATH, path)
  spec = SpecConfig.parse("eagle@stop=auto/dyn16d4k4")
  assert app.auto_stop("tiny", spec, "f32") == pytest.approx(want / 10.0)
  both = app.resolve_auto("tiny", SpecConfig.parse(
      "eagle@gate=auto@budget=auto@stop=auto/dyn16d4k4"), "f32")
  assert both.stop == pytest.approx(want / 10.0)
  assert both.gate == app.auto_gate("tiny", spec.replace(stop=0.0), "f32") > 0
  assert both.budget == app.auto_budget("tiny", spec.replace(stop=0.0),
                                        "f32")
  thin = dataclasses.replace(prof, round_ms={"f32/eagle": {
      0: rounds[0], 1: rounds[1]}})
  host_profile.write_profile(path, thin)
  with pytest.warns(RuntimeWarning, match="two are needed"):
    assert app.auto_stop("tiny", spec, "f32") == 0.0
