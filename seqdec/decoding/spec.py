"""One description of a decoder: the method grammar, `SpecConfig`, and the
one function that builds drafter, tree and acceptance rule from it.

Every way of naming a decoder goes through this module: the
`configs/spec_decode.py` config (its `config.spec` block), `launch/decode.py`,
`Generator(spec=...)` and the benchmarks' method strings. The grammar:

    method  :=  "ar"                                  autoregressive
             |  drafter ("@" key "=" value)* "/" tree
    drafter :=  "ngram" | "layerskip" | "draft" | "eagle" | "medusa" | "hydra"
             |  "redrafter"
    key     :=  a drafter option (`DRAFTER_OPTIONS[drafter]`)
             |  "rule"       auto | greedy | sample | sample_vector
                             | typical_lossy
             |  "proposal"   topk | iid | wor (model drafters)
             |  "gate"       a number g >= 0: a row whose drafts the drafter
                             expects to accept fewer than g of
                             (`Tree.expected_accepted`) verifies its root
                             alone that round (0: never), or 'auto' (the
                             tree's break-even on this host)
             |  "budget"     a verify budget: each round verifies only the
                             tree's first w slots, w from a ladder of widths
                             priced in decoding steps, '<w>:<c>+<w>:<c>...'
                             ending at the tree's N, or 'auto' (the app
                             prices the ladder by this host's profile:
                             `seqdec.decoding.budget`)
             |  "stop"       a dynamic tree grows a level only while its
                             frontier can repay a drafter level, priced in
                             decoding steps, or 'auto' (the host profile's
                             per-level cost: `drafters.dynamic`)
    tree    :=  a tree spec (`seqdec.decoding.tree_specs.parse`: chain4, kary2x2,
                static6, paths:0-1-0.0, sequoia16:<file>, auto:<file> (sized
                to this host's measured costs), dyn16d4k4 (a dynamic-tree
                budget, grown on device: eagle, redrafter), beam4x4 (a beam
                search's prefix tree: eagle, redrafter), ...)

e.g. `ngram@min_ngram=2/chain4`, `layerskip@layers=skip:4-15@proposal=wor/
kary2x1`, `draft@draft_layers=10@rule=typical_lossy/static6`,
`eagle@gate=1.2/dyn16d4k4`, `eagle@budget=auto/dyn32d5k4`,
`eagle@lookup=4/dyn8d3k2` (a 4-token prompt-lookup chain merged into each
dynamic tree). Values are
typed by the option's default (int options parse as int), and an unknown
drafter, key or value is a `ConfigError` naming what is known.

`rule='auto'` is resolved per batch by `resolve_rule` (the one place that
does it): 'greedy' when every row's temperature is 0, else 'sample', whose
temperature-0 rows equal 'greedy'. The rule is built with the sampler's caps
(`max_top_k`), so the speculative target distribution is exactly the one
the autoregressive sampler draws from.

Room for what comes next: a dynamic tree budget, per-round tree shapes, a
precision policy and a mesh become new `SpecConfig` fields with defaults that
mean today's behaviour, and new keys of the grammar.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import numpy as np

from seqdec.decoding import acceptance_rates
from seqdec.decoding import budget as budget_lib
from seqdec.decoding import drafters
from seqdec.decoding import tree_specs
from seqdec.decoding import trees
from seqdec.decoding import verify
from seqdec.errors import ConfigError

AR = "ar"

# Options of each drafter, with their defaults (the defaults type the values).
DRAFTER_OPTIONS: dict[str, dict[str, Any]] = {
    # confidence: an n-gram acceptance file (its 'chain_by_match'), for the
    # round gate (`NgramDrafter`); "" = none. adapt: rounds of prior the
    # file's curves weigh against the row's own record (0: as given).
    "ngram": {"max_ngram": 3, "min_ngram": 1, "confidence": "",
              "adapt": 0},
    "layerskip": {"layers": ""},
    "draft": {"draft_layers": 0, "draft_model": ""},
    # checkpoint: a trained drafter directory (`seqdec.checkpoints.drafters`);
    # "" = the one shipped for this target. trim: score only the
    # checkpoint's kept ids (its trimmed head, VocabTrim) if it has them;
    # false: the full vocabulary. lookup: a prompt-lookup chain of this
    # many tokens merged into every tree (`drafters.lookup`; 0: none),
    # matching n-grams of lookup_ngram .. max(3, lookup_ngram) tokens.
    **{name: {"checkpoint": "", "trim": True, "lookup": 0,
              "lookup_ngram": 2}
       for name in drafters.TRAINED},
}
TRAINED = tuple(drafters.TRAINED)     # drafters with a trained network
RULE_NAMES = ("auto", "greedy", "sample", "sample_vector", "typical_lossy")
PROPOSAL_NAMES = ("topk", "iid", "wor")
DEFAULT_MAX_TOP_K = 64


def _typed(key: str, value: Any, default: Any) -> Any:
  """`value` converted to the type of `default` (ConfigError if it cannot)."""
  if isinstance(default, bool):
    if isinstance(value, str):
      if value.lower() in ("1", "true", "yes"):
        return True
      if value.lower() in ("0", "false", "no"):
        return False
      raise ConfigError(f"option {key!r} expects a bool, got {value!r}")
    return bool(value)
  if isinstance(default, int):
    try:
      return int(value)
    except (TypeError, ValueError):
      raise ConfigError(f"option {key!r} expects an int, got {value!r}"
                        ) from None
  return str(value)


AUTO = "auto"
_THRESHOLDS = {
    "gate": "expected accepted drafts below which a round verifies its root "
            "alone, or 'auto'",
    "stop": "the cost of one drafter level in target decoding steps, or "
            "'auto'"}


def _threshold(value: Any, key: str) -> Any:
  """A `gate` or `stop` threshold: a float >= 0, or 'auto' (priced from the
  host profile by `seqdec.app.resolve_auto`); ConfigError otherwise."""
  if str(value).strip() == AUTO:
    return AUTO
  try:
    gate = float(value)
  except (TypeError, ValueError):
    raise ConfigError(f"{key} expects a number >= 0 ({_THRESHOLDS[key]}), "
                      f"got {value!r}") from None
  if not 0 <= gate < float("inf"):   # NaN fails too
    raise ConfigError(f"{key} must be a finite number >= 0, got {value!r}")
  return gate


def _threshold_str(value: Any) -> str:
  """A threshold as the grammar writes it (every digit of a float kept)."""
  return AUTO if value == AUTO else repr(value)


TREE_PREFIXES = tree_specs.PREFIXES


def _split_tree(method: str) -> tuple[str, str, str]:
  """`(drafter part, "/", tree)` split at the first '/' that a tree spec
  follows, so option values may hold paths (eagle@checkpoint=/a/b/chain4)."""
  at = 0
  while (i := method.find("/", at)) >= 0:
    if method.startswith(TREE_PREFIXES, i + 1):
      return method[:i], "/", method[i + 1:]
    at = i + 1
  return method.partition("/")


@dataclasses.dataclass(frozen=True)
class SpecConfig:
  """A decoder: autoregressive (`drafter=None`) or speculative.

  Attributes:
    drafter: 'ngram' | 'layerskip' | 'draft', or None (autoregressive).
    options: the drafter's options as sorted `(key, value)` pairs, only
      those that differ from `DRAFTER_OPTIONS` defaults are kept.
    tree: tree spec string.
    rule: acceptance rule name ('auto' resolved per batch, `resolve_rule`).
    proposal: how model drafters draw children at temperature > 0.
    max_top_k: static cap on per-row top_k, shared by the sampler and the
      acceptance rule.
    gate: speculate only when it pays: a row whose expected accepted drafts
      (`Tree.expected_accepted`, by the drafter's own confidence) are below
      `gate` verifies its root alone that round (rows whose children are
      drawn at random are never gated: `Tree.gated`); 0 never gates;
      'auto' is resolved by the app from the host profile
      (`seqdec.app.auto_gate`: the tree's break-even).
    budget: '' (verify the whole tree), a verify-width ladder
      '<w>:<c>+...' (`budget.WidthBudget`), or 'auto' (resolved by the app
      from the host profile, `seqdec.app.auto_budget`).
    stop: a dynamic tree grows its next level only while the frontier's
      mass (the bound on what that level can add to the accepted length)
      is at least `stop`, the cost of one drafter level in target decoding
      steps (`DynamicTree.stop`, `drafters.dynamic`); 0 grows every level,
      'auto' is resolved by the app from the host profile
      (`seqdec.app.auto_stop`).
  """
  drafter: Optional[str] = None
  options: tuple[tuple[str, Any], ...] = ()
  tree: str = "chain4"
  rule: str = "auto"
  proposal: str = "topk"
  max_top_k: int = DEFAULT_MAX_TOP_K
  gate: Any = 0.0
  budget: str = ""
  stop: Any = 0.0

  def __post_init__(self):
    if self.drafter is not None and self.drafter not in DRAFTER_OPTIONS:
      raise ConfigError(f"unknown drafter {self.drafter!r}; known: "
                        f"{sorted(DRAFTER_OPTIONS)}")
    if self.rule not in RULE_NAMES:
      raise ConfigError(f"unknown acceptance rule {self.rule!r}; known: "
                        f"{list(RULE_NAMES)}")
    if self.proposal not in PROPOSAL_NAMES:
      raise ConfigError(f"unknown proposal {self.proposal!r}; known: "
                        f"{list(PROPOSAL_NAMES)}")
    if self.drafter == "ngram" and self.proposal != "topk":
      raise ConfigError(f"the n-gram drafter proposes deterministically; "
                        f"proposal={self.proposal!r} needs a model drafter")
    if self.max_top_k < 1:
      raise ConfigError(f"max_top_k must be >= 1, got {self.max_top_k}")
    for key in _THRESHOLDS:
      object.__setattr__(self, key, _threshold(getattr(self, key), key))
    budget = str(self.budget or "").strip()
    if budget and budget != "auto":
      budget = str(budget_lib.WidthBudget.parse(budget))
    object.__setattr__(self, "budget", budget)
    known = DRAFTER_OPTIONS.get(self.drafter, {})
    typed = {}
    for key, value in dict(self.options).items():
      if key not in known:
        raise ConfigError(
            f"unknown option {key!r} of drafter {self.drafter!r}; known: "
            f"{sorted(known) + ['proposal', 'rule']}")
      typed[key] = _typed(key, value, known[key])
    object.__setattr__(self, "options", tuple(sorted(
        (k, v) for k, v in typed.items() if v != known[k])))
    lookup = typed.get("lookup", 0)
    if lookup < 0 or typed.get("lookup_ngram", 2) < 1:
      raise ConfigError(f"lookup (chain tokens, 0: none) must be >= 0 and "
                        f"lookup_ngram >= 1, got {lookup} and "
                        f"{typed.get('lookup_ngram')}")
    if lookup and self.proposal != "topk":
      raise ConfigError(f"a prompt-lookup chain (lookup={lookup}) is "
                        f"deterministic, so the drafter's children must be "
                        f"too: proposal='topk', not {self.proposal!r}")

  @property
  def speculative(self) -> bool:
    return self.drafter is not None

  def option(self, key: str) -> Any:
    """A drafter option's value (its default when not set)."""
    return dict(self.options).get(key, DRAFTER_OPTIONS[self.drafter][key])

  def drafter_options(self) -> dict[str, Any]:
    """Every option of the drafter, defaults filled in."""
    return {**DRAFTER_OPTIONS[self.drafter], **dict(self.options)}

  def replace(self, **changes) -> "SpecConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def parse(cls, method: str, **defaults) -> "SpecConfig":
    """A `SpecConfig` from the method grammar (module docstring).

    `defaults` (e.g. max_top_k, or drafter options such as `layers`) apply
    where the string does not set them; a drafter option in `defaults` that
    the parsed drafter does not have is ignored (so one set of defaults can
    serve a list of methods).
    """
    if not isinstance(method, str) or not method.strip():
      raise ConfigError(f"a decoder method must be a non-empty string, got "
                        f"{method!r}")
    method = method.strip()
    fields = {k: defaults.pop(k) for k in ("rule", "proposal", "max_top_k",
                                           "gate", "budget", "stop")
              if k in defaults}
    if method == AR:
      return cls(max_top_k=fields.get("max_top_k", DEFAULT_MAX_TOP_K))
    head, slash, tree = _split_tree(method)
    if not slash or not tree:
      raise ConfigError(f"bad method {method!r}: expected 'ar' or "
                        f"<drafter>[@key=value...]/<tree>, e.g. ngram/chain4")
    drafter, *items = head.split("@")
    if drafter not in DRAFTER_OPTIONS:
      raise ConfigError(f"unknown drafter {drafter!r} in {method!r}; known: "
                        f"{sorted(DRAFTER_OPTIONS)}")
    options = {k: v for k, v in defaults.items()
               if k in DRAFTER_OPTIONS[drafter]}
    unknown = set(defaults) - set().union(*DRAFTER_OPTIONS.values())
    if unknown:
      raise ConfigError(f"unknown defaults {sorted(unknown)}")
    for item in items:
      key, eq, value = item.partition("=")
      if not eq or not key:
        raise ConfigError(f"bad option {item!r} in {method!r}: expected "
                          f"@key=value")
      if key in ("rule", "proposal"):
        fields[key] = value
      elif key == "max_top_k":
        fields[key] = _typed(key, value, 0)
      elif key in ("gate", "budget", "stop"):
        fields[key] = value
      else:
        options[key] = value
    return cls(drafter=drafter, options=tuple(options.items()), tree=tree,
               **fields)

  def __str__(self) -> str:
    """The canonical method string (`parse(str(s)) == s`, but for
    max_top_k, which is not part of a method name)."""
    if self.drafter is None:
      return AR
    items = [f"@{k}={v}" for k, v in self.options]
    if self.proposal != "topk":
      items.append(f"@proposal={self.proposal}")
    if self.rule != "auto":
      items.append(f"@rule={self.rule}")
    if self.gate:
      items.append(f"@gate={_threshold_str(self.gate)}")
    if self.budget:
      items.append(f"@budget={self.budget}")
    if self.stop:
      items.append(f"@stop={_threshold_str(self.stop)}")
    return f"{self.drafter}{''.join(items)}/{self.tree}"

  # -- the config file's nested block ----------------------------------------

  @classmethod
  def from_config(cls, block: Mapping[str, Any]) -> "SpecConfig":
    """From a `config.spec` block (`to_config`'s layout); unknown keys are a
    `ConfigError`."""
    block = dict(block)
    known = {"drafter", "tree", "rule", "proposal", "max_top_k", "options",
             "gate", "budget", "stop"}
    unknown = set(block) - known
    if unknown:
      raise ConfigError(f"unknown spec keys {sorted(unknown)}; known: "
                        f"{sorted(known)}")
    drafter = block.get("drafter") or None
    options = dict(block.get("options") or {})
    if drafter is not None:
      defaults = DRAFTER_OPTIONS.get(drafter, {})
      # The block lists every drafter's options; keep this drafter's.
      options = {k: v for k, v in options.items() if k in defaults}
    else:
      options = {}
    return cls(drafter=drafter, options=tuple(options.items()),
               tree=block.get("tree", "chain4"), rule=block.get("rule", "auto"),
               proposal=block.get("proposal", "topk"),
               max_top_k=int(block.get("max_top_k", DEFAULT_MAX_TOP_K)),
               gate=block.get("gate", 0.0), budget=block.get("budget", ""),
               stop=block.get("stop", 0.0))

  def to_config(self) -> dict[str, Any]:
    """A plain dict for `config.spec`: every drafter's options appear (with
    this drafter's values), so `--config.spec.options.<key>=...` overrides
    type-check against the config file. `gate` and `stop` are strings
    there, so that `--config.spec.gate=auto` can be set."""
    options = {k: v for opts in DRAFTER_OPTIONS.values()
               for k, v in opts.items()}
    if self.drafter is not None:
      options.update(self.drafter_options())
    return dict(drafter=self.drafter or "", tree=self.tree, rule=self.rule,
                proposal=self.proposal, max_top_k=self.max_top_k,
                gate=_threshold_str(self.gate), budget=self.budget,
                stop=_threshold_str(self.stop),
                options=options)


def resolve_rule(rule: str, temperature: Any) -> str:
  """The rule a batch runs: 'auto' -> 'greedy' if every row's temperature
  is 0, else 'sample' (lossless; its temperature-0 rows equal 'greedy').

  Raises:
    ConfigError: 'greedy' asked for with a row at temperature > 0.
  """
  hot = bool((np.asarray(temperature, np.float64) > 0).any())
  if rule == "auto":
    return "sample" if hot else "greedy"
  if rule == "greedy" and hot:
    raise ConfigError("greedy verification serves temperature 0 only; "
                      "speculative sampling at temperature > 0 needs "
                      "rule='sample' (or 'auto')")
  return rule


# -- the builder ---------------------------------------------------------------


def build_tree(spec: SpecConfig, policy: str = "f32"):
  """The spec's `TreeShape` (a `TreeError` for a bad tree spec); `policy`,
  the target's precision policy, prices an 'auto' tree, which replays an
  n-gram drafter's rounds with its `adapt`."""
  shape = tree_specs.parse(spec.tree, policy, adapt=auto_adapt(spec))
  if spec.stop == AUTO:
    raise ConfigError("stop=auto must be resolved from the host profile "
                      "first (seqdec.app.resolve_auto)")
  if spec.stop:
    if not isinstance(shape, trees.DynamicTree):
      raise ConfigError(f"stop={spec.stop!r} applies to dynamic trees "
                        f"(dyn<N>d<D>k<K>), not {spec.tree!r}")
    shape = dataclasses.replace(shape, stop=spec.stop)
  if spec.drafter in TRAINED and spec.option("lookup"):
    shape = trees.WithLookup(shape, spec.option("lookup"))
  return shape


def auto_adapt(spec: SpecConfig) -> float:
  """The `adapt` of an n-gram spec's drafter (0 for other drafters)."""
  return float(spec.option("adapt") or 0) if spec.drafter == "ngram" else 0.0


def build_drafter(spec: SpecConfig, target, draft_model=None, eagle_net=None):
  """The spec's drafter for `target`.

  Args:
    spec: a speculative `SpecConfig`.
    target: the target model.
    draft_model: the loaded draft LM for drafter 'draft' when the spec names
      one by `draft_model=<name or path>` (loading is the caller's: decoding
      does not import checkpoints; `Generator` loads it).
    eagle_net: `(network, keep_ids or None)` for the trained drafters
      (`TRAINED`; likewise loaded by `Generator` from the `checkpoint`
      option); the `trim` option false drops the keep_ids.
  """
  if not spec.speculative:
    raise ConfigError("an autoregressive spec has no drafter")
  options = spec.drafter_options()
  if spec.drafter in TRAINED:
    if eagle_net is None:
      raise ConfigError(f"drafter {spec.drafter!r} needs its trained network:"
                        f" load it (seqdec.checkpoints.drafters.load) and "
                        f"pass eagle_net= (Generator does)")
    net, keep_ids = eagle_net
    built = drafters.make_drafter(
        spec.drafter, target, eagle_net=net,
        keep_ids=keep_ids if options["trim"] else None,
        proposal=spec.proposal)
    if options["lookup"]:
      built = drafters.WithLookupChain(built, options["lookup"],
                                       min_ngram=options["lookup_ngram"])
    return built
  name = options.pop("draft_model", "")
  if spec.drafter == "draft":
    if name and draft_model is None:
      raise ConfigError(f"drafter 'draft' names draft_model={name!r}: load "
                        f"it and pass draft_model= (Generator does)")
    options["draft_model"] = draft_model
  if spec.drafter != "ngram":
    options["proposal"] = spec.proposal
  elif options.get("confidence"):
    rates = acceptance_rates.load_acceptance(options["confidence"])
    if rates.chain_by_match is None:
      raise ConfigError(f"ngram confidence file {options['confidence']!r} "
                        f"has no 'chain_by_match' (measure one with "
                        f"launch/measure_acceptance.py --drafter=ngram)")
    options["confidence"] = rates.chain_by_match
  else:
    options["confidence"] = None
  return drafters.make_drafter(spec.drafter, target, **options)


def build_gate(spec: SpecConfig) -> float:
  """The spec's round gate; 'auto' must have been resolved
  (`seqdec.app.resolve_auto`)."""
  if spec.gate == AUTO:
    raise ConfigError("gate=auto must be resolved from the host profile "
                      "first (seqdec.app.resolve_auto)")
  return spec.gate


def build_budget(spec: SpecConfig, shape) -> Optional[budget_lib.WidthBudget]:
  """The spec's verify budget for a tree `shape` (None without one);
  'auto' must have been resolved (`budget.parse_budget`)."""
  ladder = budget_lib.parse_budget(spec.budget)
  return None if ladder is None else ladder.fitted(shape.num_nodes)


def build_rule(spec: SpecConfig, temperature: Any):
  """The acceptance rule a batch at these per-row temperatures runs ('auto'
  resolved by `resolve_rule`), with the spec's sampler caps."""
  return verify.make_rule(resolve_rule(spec.rule, temperature),
                          max_top_k=spec.max_top_k)
