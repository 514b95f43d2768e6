"""The import graph of `seqdec`: no cycle, no upward arrow.

Layers, lowest first (an arrow may only point down):

    errors, ops                 leaves: import nothing from seqdec
    kernels, parallel           import only the leaves and their own package
    models                      may use kernels and parallel
    checkpoints                 -> models
    decoding                    -> models (and kernels)
    generator, app, bench, ...  -> decoding

and, across the whole package, nothing imports torch or transformers (test
and benchmark oracles only) or the `configs` directory.

The graph is read from the source with `ast` (every `import` statement,
including those inside functions, which is where a cycle likes to hide
behind a lazy import), so this test imports neither jax nor seqdec and runs
in a fraction of a second. Only explicit imports are edges: the implicit
import of a module's parent packages is not (`seqdec/__init__.py` imports
the whole public API, so counting it would make every module a cycle).
"""

from __future__ import annotations

import ast
import functools
import os
import pkgutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "seqdec"

# Modules that every module may import and that import nothing from seqdec.
LEAVES = ("seqdec.errors", "seqdec.ops")
# Packages that import only the leaves and themselves.
LEAF_PACKAGES = ("seqdec.kernels", "seqdec.parallel")
# importer prefix -> prefixes it must not import (an upward arrow).
FORBIDDEN = {
    "seqdec.models": ("seqdec.checkpoints", "seqdec.decoding",
                      "seqdec.generator", "seqdec.app", "seqdec.bench"),
    "seqdec.checkpoints": ("seqdec.decoding", "seqdec.generator",
                           "seqdec.app", "seqdec.bench"),
    "seqdec.decoding": ("seqdec.generator", "seqdec.app", "seqdec.bench"),
}
# Top-level names no module under seqdec may import.
BANNED = ("torch", "transformers", "configs", "launch")
# Within decoding: the Sequoia dynamic program and the acceptance-file I/O
# are host code that must not pull in models or drafters.
HOST_ONLY = {
    "seqdec.decoding.sequoia": ("seqdec.decoding.drafters", "seqdec.models",
                                "seqdec.decoding.rank_statistics"),
    "seqdec.decoding.acceptance_rates": (
        "seqdec.decoding.drafters", "seqdec.models",
        "seqdec.decoding.rank_statistics", "seqdec.decoding.sequoia"),
}


def _walk(path: str, prefix: str) -> dict[str, tuple[str, bool]]:
  """name -> (file, is_package) for every module under `path`, recursively
  (`pkgutil.iter_modules` per directory: nothing is imported)."""
  out = {}
  for info in pkgutil.iter_modules([path], prefix):
    sub = os.path.join(path, info.name.rsplit(".", 1)[-1])
    if info.ispkg:
      out[info.name] = (os.path.join(sub, "__init__.py"), True)
      out.update(_walk(sub, info.name + "."))
    else:
      out[info.name] = (sub + ".py", False)
  return out


def modules() -> dict[str, tuple[str, bool]]:
  """Every module of the package, the package itself included."""
  pkg_dir = os.path.join(ROOT, PACKAGE)
  out = {PACKAGE: (os.path.join(pkg_dir, "__init__.py"), True)}
  out.update(_walk(pkg_dir, PACKAGE + "."))
  return out


def imported_names(name: str, file: str, is_package: bool,
                   known: set[str]) -> set[str]:
  """Fully qualified modules (or, outside the package, top-level names)
  imported anywhere in `file`.

  `from a.b import c` is an edge to `a.b.c` when that is a module of the
  package, else to `a.b`; relative imports are resolved against the
  module's package.
  """
  with open(file, encoding="utf-8") as f:
    tree = ast.parse(f.read(), file)
  here = name if is_package else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = here.split(".")
        base = base[:len(base) - node.level + 1]
        mod = ".".join(base + ([node.module] if node.module else []))
      else:
        mod = node.module
      for alias in node.names:
        full = f"{mod}.{alias.name}"
        out.add(full if full in known else mod)
  # `import a.b.c` names a.b.c; keep package-internal names exact and
  # reduce foreign ones to their top-level package.
  return {m if m.split(".")[0] == PACKAGE else m.split(".")[0] for m in out}


@functools.lru_cache(maxsize=1)
def import_graph() -> dict[str, set[str]]:
  mods = modules()
  known = set(mods)
  return {name: imported_names(name, file, is_pkg, known)
          for name, (file, is_pkg) in mods.items()}


def _under(module: str, prefix: str) -> bool:
  return module == prefix or module.startswith(prefix + ".")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle (as a closed path a -> ... -> a) per strongly connected
  component of more than one module, or with a self-loop (Tarjan)."""
  index, low, stack, on_stack, sccs = {}, {}, [], set(), []
  counter = [0]

  def strongconnect(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in graph:
        continue
      if w not in index:
        strongconnect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      scc = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        scc.append(w)
        if w == v:
          break
      if len(scc) > 1 or v in graph[v]:
        sccs.append(set(scc))

  for v in sorted(graph):
    if v not in index:
      strongconnect(v)

  cycles = []
  for scc in sccs:   # a shortest cycle through the component's first node
    start = min(scc)
    parent, frontier, found = {start: None}, [start], None
    while frontier and found is None:
      nxt = []
      for v in frontier:
        for w in sorted(graph[v] & scc):
          if w == start:
            found = v
            break
          if w not in parent:
            parent[w] = v
            nxt.append(w)
        if found is not None:
          break
      frontier = nxt
    path, v = [start], found
    while v is not None and v != start:
      path.insert(1, v)
      v = parent[v]
    cycles.append(path + [start])
  return cycles


def violations(graph: dict[str, set[str]]) -> list[str]:
  """Every upward arrow and banned import, one line each."""
  bad = []
  for mod, targets in sorted(graph.items()):
    for t in sorted(targets):
      top = t.split(".")[0]
      if top in BANNED:
        bad.append(f"{mod} imports {t} (banned under {PACKAGE})")
        continue
      if top != PACKAGE or t == mod:
        continue
      if mod in LEAVES and t != PACKAGE:
        bad.append(f"{mod} is a leaf but imports {t}")
      for pkg in LEAF_PACKAGES:
        if _under(mod, pkg) and not (_under(t, pkg) or t in LEAVES):
          bad.append(f"{mod} imports {t}: {pkg} may import only "
                     f"{', '.join(LEAVES)} and itself")
      for importer, banned in {**FORBIDDEN, **HOST_ONLY}.items():
        if _under(mod, importer):
          bad.extend(f"{mod} imports {t} (upward arrow)"
                     for b in banned if _under(t, b))
  return bad


def test_the_graph_is_read():
  """The parser sees known edges (the checks below are not vacuous)."""
  graph = import_graph()
  assert "seqdec.kernels.tree_mask" in graph
  assert "seqdec.kernels.tree_attention" in graph[
      "seqdec.models.transformer"]
  assert "seqdec.errors" in graph["seqdec.kernels.tree_mask"]
  assert "jax" in graph["seqdec.kernels.tree_mask"]
  # Imports inside functions count.
  assert "seqdec.checkpoints.gguf" in graph["seqdec.checkpoints.registry"]


def test_no_cycle():
  cycles = find_cycles(import_graph())
  assert not cycles, "import cycles:\n" + "\n".join(
      " -> ".join(c) for c in cycles)


def test_no_upward_arrow_and_no_banned_import():
  bad = violations(import_graph())
  assert not bad, "\n".join(bad)


def test_the_checks_catch_what_they_should():
  graph = {"seqdec.a": {"seqdec.b"}, "seqdec.b": {"seqdec.c"},
           "seqdec.c": {"seqdec.a", "jax"}, "seqdec.d": {"seqdec.d"}}
  assert find_cycles(graph) == [["seqdec.a", "seqdec.b", "seqdec.c",
                                 "seqdec.a"], ["seqdec.d", "seqdec.d"]]
  graph = {"seqdec.kernels.x": {"seqdec.decoding.trees", "seqdec.errors"},
           "seqdec.models.m": {"seqdec.kernels.x", "seqdec.decoding"},
           "seqdec.errors": {"seqdec.ops"},
           "seqdec.bench": {"torch"}}
  bad = violations(graph)
  assert len(bad) == 4, bad


@pytest.mark.parametrize("name", ["torch", "transformers"])
def test_oracles_are_not_imported(name):
  for mod, targets in import_graph().items():
    assert name not in targets, f"{mod} imports {name}"
