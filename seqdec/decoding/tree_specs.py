"""Tree shapes from config strings: `parse(spec) -> TreeShape`.

    'chain4'                 4 drafted tokens in a line (`trees.chain`)
    'kary3x2x1'              branching per depth (`trees.kary`)
    'static10'               a hand-built tree of `trees.STATIC_TREES`
    'paths:0-1-0.0-0.1'      Medusa-style rank paths: ranks joined by '.',
                             paths by '-' (`trees.from_paths`)
    'sequoia16:<file.json>'  the Sequoia-optimal tree of 16 draft nodes for
                             the per-rank acceptance rates in that file (path
                             as given or relative to the source tree)
    'sequoia16d4:<file>'     the same with depth <= 4
    'auto:<file>'            Sequoia's hardware-aware choice: the tree of at
                             most 64 nodes (depth <= 8) that maximises
                             tau / (cost of a round) with this host's
                             measured costs (`host_profile`); possibly no
                             tree at all ('chain0': plain decoding steps).
                             A file with traces is replayed instead: an
                             n-gram drafter's rounds under the verify
                             curve, a model drafter's (EAGLE) chains under
                             the loop rounds the profile measured for it,
                             keeping every prompt category of the file at
                             >= AUTO_FLOOR x plain decoding
    'auto32d4:<file>'        the same with at most 32 nodes, depth <= 4
    'dyn16d4k4'              a dynamic tree budget (EAGLE-2, grown on device
                             each round: `trees.DynamicTree`)
    'beam4x4'                a beam search's prefix tree (ReDrafter: 4 beams
                             of depth 4, `trees.BeamTree`)

This module sits above both `trees` (topologies) and `sequoia` (the dynamic
program) with `acceptance_rates` (the files), so that neither of them needs
the other's spec syntax.
"""

from __future__ import annotations

import re
import warnings

from seqdec import host_profile
from seqdec.decoding import acceptance_rates
from seqdec.decoding import sequoia
from seqdec.decoding import trees
from seqdec.errors import TreeError


def _paths(arg: str) -> trees.TreeShape:
  try:
    paths = [tuple(int(r) for r in p.split(".")) for p in arg.split("-")]
  except ValueError:
    raise TreeError(f"bad path list {arg!r}; expected ranks joined by '.' "
                    f"and paths by '-', e.g. paths:0-1-0.0") from None
  return trees.from_paths(paths)


def _static(arg: str) -> trees.TreeShape:
  if int(arg) not in trees.STATIC_TREES:
    raise TreeError(f"no static tree with {arg} nodes; known: "
                    f"{sorted(trees.STATIC_TREES)}")
  return trees.from_paths(trees.STATIC_TREES[int(arg)])


_SEQUOIA = re.compile(r"^(\d+)(?:d(\d+))?:(.+)$", re.DOTALL)


def _sequoia(arg: str) -> trees.TreeShape:
  """'<n>:<path>' or '<n>d<D>:<path>': n draft nodes, depth <= D, rates from
  the acceptance file at path (`sequoia.optimal_tree`,
  `acceptance_rates.load_acceptance`)."""
  match = _SEQUOIA.match(arg)
  if not match:
    raise TreeError(
        f"bad sequoia spec {'sequoia' + arg!r}; expected sequoia<n>:<file.json>"
        f" or sequoia<n>d<depth>:<file.json>, e.g. "
        f"sequoia16:configs/acceptance/smollm2_layerskip_t0.json")
  n, d, path = match.groups()
  rates = acceptance_rates.load_acceptance(path)
  shape, _ = sequoia.optimal_tree(rates.probs, int(n),
                                  None if d is None else int(d))
  return shape


_AUTO = re.compile(r"^(\d*)(?:d(\d+))?:(.+)$", re.DOTALL)
AUTO_MAX_NODES, AUTO_MAX_DEPTH = 64, 8
# Without a usable host profile, 'auto' takes this Sequoia tree instead.
AUTO_FALLBACK_NODES, AUTO_FALLBACK_DEPTH = 8, 4


def round_cost(profile: host_profile.HostProfile, drafter: str,
               policy: str = "f32"):
  """`shape -> ms` of one round on the profiled host: a verify of the
  shape's nodes (root included) plus one drafter forward per level that
  has children, over that level's nodes,

      cost(T) = verify(|T|) + sum_{l < depth(T)} draft(width_l(T)),

  (a chain(0) round is one plain decoding step, verify(1)). A drafter with
  no model forward (n-gram) has no curve and costs 0 per level.

  Raises:
    host_profile.ProfileError: a model drafter the profile did not measure.
  """
  model_free = drafter.split("@")[0] in ("ngram",)
  if not model_free and drafter not in profile.draft_ms:
    raise host_profile.ProfileError(
        f"the host profile has no drafter curve for {drafter!r} (it has "
        f"{sorted(profile.draft_ms)}); measure it with launch/profile_host.py "
        f"--acceptance=<its acceptance file>")

  def cost(shape: trees.TreeShape) -> float:
    widths = sequoia.level_widths(shape)
    ms = profile.verify(sum(widths), policy)
    if not model_free:
      ms += sum(profile.draft(drafter, w) for w in widths[:-1])
    return ms
  return cost


def _traces(rates: acceptance_rates.AcceptanceRates, parse, expected: str):
  """`[parse(value) for each prompt's trace]` of the file's 'trace'
  object; `parse` returns None (or raises TypeError / ValueError) for a
  malformed value, which is a TreeError saying `expected`."""
  trace = rates.meta["trace"]
  if not isinstance(trace, dict):
    raise TreeError(f"acceptance file {rates.path!r}: 'trace' must be an "
                    f"object of per-prompt traces")
  out = []
  for value in trace.values():
    try:
      parsed = parse(value)
    except (TypeError, ValueError):
      parsed = None
    if parsed is None:
      raise TreeError(f"acceptance file {rates.path!r}: each trace must be "
                      f"{expected}")
    out.append(parsed)
  return out


def chain_traces(rates: acceptance_rates.AcceptanceRates):
  """The `(match lengths, accepted drafts, available drafts)` traces of a
  chain drafter's acceptance file ('trace', `launch/measure_acceptance.py
  --drafter=ngram`; `sequoia.replay_rounds`).

  Raises:
    TreeError: a malformed trace.
  """
  def parse(value):
    n, a, v = (list(map(int, x)) for x in value)
    ok = len(n) == len(a) == len(v) and min(n + a + v, default=0) >= 0
    return (n, a, v) if ok else None
  return _traces(rates, parse,
                 "three lists of non-negative integers of one length")


# A replayed 'auto' chain keeps every prompt category of the acceptance
# file at or above this speed relative to plain decoding on the profiled
# host (`sequoia._choose`): it declines depths that win overall by losing
# on a kind of prompt.
AUTO_FLOOR = 0.97


def trace_groups(rates: acceptance_rates.AcceptanceRates):
  """Each trace's prompt category, in 'trace' order, from the file's
  'per_prompt' records; None when the file does not give every trace's."""
  category = {str(r.get("id")): r.get("category")
              for r in rates.meta.get("per_prompt") or ()
              if isinstance(r, dict)}
  groups = [category.get(str(k)) for k in rates.meta["trace"]]
  return None if any(g is None for g in groups) else groups


# 'trace_kind' of a model drafter's chain traces (`confidence_traces`).
CONFIDENCE_TRACE = "accepted+path_logq"


def confidence_traces(rates: acceptance_rates.AcceptanceRates):
  """The `(accepted drafts, path log q per depth)` traces of a model
  drafter's chains ('trace' with 'trace_kind' CONFIDENCE_TRACE,
  `launch/measure_acceptance.py --drafter=eagle`;
  `sequoia.replay_confident_rounds`).

  Raises:
    TreeError: a malformed trace.
  """
  def parse(value):
    accepted, logq = value
    accepted = [int(a) for a in accepted]
    logq = [[float(x) for x in row] for row in logq]
    ok = (len(accepted) == len(logq) and min(accepted, default=0) >= 0
          and all(x <= 0 for row in logq for x in row))   # (False for nan)
    return (accepted, logq) if ok else None
  return _traces(rates, parse,
                 "a list of non-negative accepted counts and one of as many "
                 "lists of non-positive path log-probabilities")


def auto_choice(arg: str, profile_path=None, policy: str = "f32",
                adapt: float = 0.0) -> sequoia.Choice:
  """The `Choice` of 'auto<arg>' (module docstring) with its predicted
  tokens per second, the verifies priced under the target's precision
  `policy`; without a usable profile (missing, corrupt, another host's, no
  curve for the drafter or the policy) a RuntimeWarning and the Sequoia
  tree of AUTO_FALLBACK_NODES nodes, with cost_ms = nan. A chain drafter's
  rounds are replayed with its `adapt` (`sequoia.replay_rounds`)."""
  match = _AUTO.match(arg)
  if not match:
    raise TreeError(
        f"bad auto tree spec {'auto' + arg!r}; expected auto:<file.json>, "
        f"auto<n>:<file.json> or auto<n>d<depth>:<file.json>")
  n, d, path = match.groups()
  rates = acceptance_rates.load_acceptance(path)
  target, drafter = rates.meta.get("target"), rates.meta.get("drafter")
  if not target or not drafter:
    raise TreeError(f"acceptance file {path!r} does not name its target and "
                    f"drafter, which 'auto' needs")
  profile = host_profile.find(str(target), profile_path)
  if profile is not None:
    try:
      if policy not in profile.verify_ms:
        raise host_profile.ProfileError(
            f"the host profile has no curve for precision {policy!r} (it "
            f"has {profile.policies()})")
      return _priced_choice(rates, profile, str(drafter), policy,
                            int(n) if n else AUTO_MAX_NODES,
                            int(d) if d else AUTO_MAX_DEPTH, adapt)
    except host_profile.ProfileError as e:
      warnings.warn(f"seqdec: {e}; falling back to the default tree",
                    RuntimeWarning, stacklevel=2)
  shape, tau = sequoia.optimal_tree(rates.probs, AUTO_FALLBACK_NODES,
                                    AUTO_FALLBACK_DEPTH)
  return sequoia.Choice(shape, tau, float("nan"))


def _priced_choice(rates: acceptance_rates.AcceptanceRates,
                   profile: host_profile.HostProfile, drafter: str,
                   policy: str, nodes: int, depth: int,
                   adapt: float) -> sequoia.Choice:
  """`auto_choice` on a usable profile: a file with traces is replayed
  (an n-gram drafter's under the verify curve, a model drafter's chains
  under the measured loop rounds and the gate at each chain's
  break-even), any other file goes to Sequoia's positional optimizer."""
  trace = rates.meta.get("trace")
  deepest = min(depth, nodes, int(rates.meta.get("max_rank", AUTO_MAX_DEPTH)))
  if trace is not None and rates.meta.get("trace_kind") == CONFIDENCE_TRACE:
    measured = [k for k in profile.round_depths(drafter, policy)
                if k <= deepest]
    return sequoia.replay_model_chain(
        confidence_traces(rates),
        lambda k: profile.rounds(drafter, k, policy),
        lambda k: profile.break_even(k + 1, policy), measured,
        trace_groups(rates), AUTO_FLOOR)
  if trace is not None:                      # an n-gram drafter's rounds
    return sequoia.replay_chain(
        chain_traces(rates), rates.chain_by_match or {},
        lambda t: profile.verify(t, policy), deepest, adapt,
        trace_groups(rates), AUTO_FLOOR)
  return sequoia.hardware_aware_tree(
      rates.probs, round_cost(profile, drafter, policy), nodes, depth)


def _dynamic(arg: str) -> trees.DynamicTree:
  """'dyn<N>d<D>k<K>': a `trees.DynamicTree` budget."""
  m = re.fullmatch(r"(\d+)d(\d+)k(\d+)", arg)
  if not m:
    raise TreeError(f"bad dynamic tree spec 'dyn{arg}'; expected "
                    f"dyn<nodes>d<depth>k<top_k>, e.g. dyn16d4k4")
  return trees.DynamicTree(*(int(x) for x in m.groups()))


def _beam(arg: str) -> trees.BeamTree:
  """'beam<W>x<D>': a `trees.BeamTree` budget (W beams, depth D)."""
  m = re.fullmatch(r"(\d+)x(\d+)", arg)
  if not m:
    raise TreeError(f"bad beam tree spec 'beam{arg}'; expected "
                    f"beam<width>x<depth>, e.g. beam4x4")
  return trees.BeamTree(*(int(x) for x in m.groups()))


_NAMED = {
    "dyn": _dynamic,
    "beam": _beam,
    "chain": lambda arg: trees.chain(int(arg)),
    "kary": lambda arg: trees.kary(tuple(int(x) for x in arg.split("x"))),
    "static": _static,
    "paths:": _paths,
    "sequoia": _sequoia,
    "auto": lambda arg: auto_choice(arg).shape,   # `parse` passes the policy
}
# What a tree spec starts with (`spec._split_tree` finds the tree by them).
PREFIXES = tuple(_NAMED)


def parse(spec: str, policy: str = "f32", adapt: float = 0.0
          ) -> trees.TreeShape:
  """A tree shape from a config string (the forms of the module docstring);
  `policy`: the target's precision policy, which prices an 'auto' tree;
  `adapt`: an n-gram drafter's, which its replayed rounds follow.

  Raises:
    TreeError: an unknown or malformed spec; a bad acceptance file's
      `AcceptanceError` is reported as one, naming the spec.
  """
  if not isinstance(spec, str):
    raise TreeError(f"tree spec must be a string, got {spec!r}")
  for name, build in _NAMED.items():
    if spec.startswith(name) and spec[len(name):]:
      if name == "auto":
        build = lambda arg: auto_choice(  # noqa: E731
            arg, policy=policy, adapt=adapt).shape
      try:
        return build(spec[len(name):])
      except ValueError as e:
        if isinstance(e, TreeError):
          raise
        raise TreeError(f"bad tree spec {spec!r}: {e}") from None
  raise TreeError(f"unknown tree spec {spec!r}; expected chain<gamma>, "
                  f"kary<b1>x<b2>x..., static<n>, paths:<p1>-<p2>-..., "
                  f"sequoia<n>[d<depth>]:<acceptance.json>, "
                  f"auto[<n>[d<depth>]]:<acceptance.json>, "
                  f"dyn<nodes>d<depth>k<top_k> or beam<width>x<depth>")


def to_spec(shape: trees.TreeShape) -> str:
  """A spec string for a topology: 'chain<g>' for chains, else its rank
  paths ('paths:0-1-0.0'), which `parse` reads back (for display and for a
  `SpecConfig` holding a tree built in code); 'dyn<N>d<D>k<K>' for a
  dynamic tree budget, 'beam<W>x<D>' for a beam tree."""
  if isinstance(shape, trees.DynamicTree):
    return f"dyn{shape.num_nodes}d{shape.max_depth}k{shape.top_k}"
  if isinstance(shape, trees.BeamTree):
    return f"beam{shape.width}x{shape.max_depth}"
  if shape.parents == tuple(range(-1, shape.num_nodes - 1)) and not any(
      shape.ranks):
    return f"chain{shape.num_nodes - 1}"
  return "paths:" + "-".join(".".join(str(r) for r in p)
                             for p in shape.rank_paths()[1:])
