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

This module sits above both `trees` (topologies) and `sequoia` (the dynamic
program) with `acceptance_rates` (the files), so that neither of them needs
the other's spec syntax.
"""

from __future__ import annotations

import re

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


def _dynamic(arg: str) -> trees.DynamicTree:
  """'dyn<N>d<D>k<K>': a `trees.DynamicTree` budget."""
  m = re.fullmatch(r"(\d+)d(\d+)k(\d+)", arg)
  if not m:
    raise TreeError(f"bad dynamic tree spec 'dyn{arg}'; expected "
                    f"dyn<nodes>d<depth>k<top_k>, e.g. dyn16d4k4")
  return trees.DynamicTree(*(int(x) for x in m.groups()))


_NAMED = {
    "dyn": _dynamic,
    "chain": lambda arg: trees.chain(int(arg)),
    "kary": lambda arg: trees.kary(tuple(int(x) for x in arg.split("x"))),
    "static": _static,
    "paths:": _paths,
    "sequoia": _sequoia,
}


def parse(spec: str) -> trees.TreeShape:
  """A tree shape from a config string (the forms of the module docstring).

  Raises:
    TreeError: an unknown or malformed spec; a bad acceptance file's
      `AcceptanceError` is reported as one, naming the spec.
  """
  if not isinstance(spec, str):
    raise TreeError(f"tree spec must be a string, got {spec!r}")
  for name, build in _NAMED.items():
    if spec.startswith(name) and spec[len(name):]:
      try:
        return build(spec[len(name):])
      except ValueError as e:
        if isinstance(e, TreeError):
          raise
        raise TreeError(f"bad tree spec {spec!r}: {e}") from None
  raise TreeError(f"unknown tree spec {spec!r}; expected chain<gamma>, "
                  f"kary<b1>x<b2>x..., static<n>, paths:<p1>-<p2>-..., "
                  f"sequoia<n>[d<depth>]:<acceptance.json> or "
                  f"dyn<nodes>d<depth>k<top_k>")


def to_spec(shape: trees.TreeShape) -> str:
  """A spec string for a topology: 'chain<g>' for chains, else its rank
  paths ('paths:0-1-0.0'), which `parse` reads back (for display and for a
  `SpecConfig` holding a tree built in code); 'dyn<N>d<D>k<K>' for a
  dynamic tree budget."""
  if isinstance(shape, trees.DynamicTree):
    return f"dyn{shape.num_nodes}d{shape.max_depth}k{shape.top_k}"
  if shape.parents == tuple(range(-1, shape.num_nodes - 1)) and not any(
      shape.ranks):
    return f"chain{shape.num_nodes - 1}"
  return "paths:" + "-".join(".".join(str(r) for r in p)
                             for p in shape.rank_paths()[1:])
