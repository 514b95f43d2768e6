"""`seqdec.checkpoints` imports: no cycles, no decoding, old names kept.

Cycles are checked statically (module-level imports between the checkpoint
modules); what the modules pull in at run time is checked in a subprocess
under a bare `seqdec` package, so that `seqdec/__init__.py` (which imports
the generator and hence decoding) does not mask it.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

import seqdec.checkpoints

ROOT = pathlib.Path(seqdec.checkpoints.__file__).parent


def _module_name(path):
  rel = path.relative_to(ROOT.parent.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


MODULES = sorted(_module_name(p) for p in ROOT.rglob("*.py"))


def _top_level_imports(path, name, modules):
  """Checkpoint modules that `name` imports at module level."""
  is_pkg = path.name == "__init__.py"
  out = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = name if is_pkg else name.rpartition(".")[0]
        for _ in range(node.level - 1):
          pkg = pkg.rpartition(".")[0]
        base = f"{pkg}.{base}" if base else pkg
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    else:
      continue
    out.update(t for t in targets if t in modules)
  return out


def test_no_import_cycles():
  paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
  graph = {m: _top_level_imports(p, m, paths) for m, p in paths.items()}
  assert graph["seqdec.checkpoints.gguf"] >= {
      "seqdec.checkpoints.gguf.load", "seqdec.checkpoints.cache"}
  state = {}

  def visit(m, stack):
    if state.get(m) == "done":
      return
    assert state.get(m) != "active", " -> ".join(stack + [m])
    state[m] = "active"
    for n in sorted(graph[m]):
      visit(n, stack + [m])
    state[m] = "done"

  for m in sorted(graph):
    visit(m, [])


_BARE = """
import importlib, importlib.util, sys, types
spec = importlib.util.find_spec("seqdec")
pkg = types.ModuleType("seqdec")
pkg.__path__ = list(spec.submodule_search_locations)
sys.modules["seqdec"] = pkg
for name in sys.argv[1:]:
  importlib.import_module(name)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch",
             "transformers") or m.startswith(("seqdec.decoding",
             "seqdec.generator")))
assert not bad, bad
"""


def test_imports_pull_in_no_decoding_and_seqdec_imports():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  runs = {
      "bare": [sys.executable, "-c", _BARE, *MODULES],
      "seqdec": [sys.executable, "-c",
                 "import seqdec; import seqdec.checkpoints.gguf as G; "
                 "G.load_gguf, G.scan_gguf, G.GGUFTokenizer"],
  }
  procs = {k: subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
           for k, cmd in runs.items()}
  for k, p in procs.items():
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, (k, err[-2000:])


@pytest.mark.parametrize("name", [
    "CACHE_FORMAT_VERSION", "CheckpointError", "GGUFHeader", "GGUFTensorInfo",
    "GGUFTokenizer", "SMOLLM2_FILE", "SMOLLM2_INSTALL", "SMOLLM2_PACKAGE",
    "SUPPORTED_ARCHITECTURES", "TOKEN_BYTE", "TOKEN_CONTROL", "TOKEN_NORMAL",
    "TOKEN_UNKNOWN", "TOKEN_UNUSED", "TOKEN_USER_DEFINED",
    "build_byte_level_tokenizer", "check_architecture", "config_from_gguf",
    "default_cache_dir", "dequantize", "find_smollm2_gguf", "gguf_name_to_hf",
    "hf_tensors_from_gguf", "load_gguf", "model_from_gguf", "read_gguf",
    "scan_gguf", "sha256_file", "tokenizer_from_gguf", "unpermute_qk"])
def test_public_names_of_the_old_module_remain(name):
  """Every public name of the former `gguf.py` module is still there."""
  from seqdec.checkpoints import gguf  # pylint: disable=g-import-not-at-top
  assert hasattr(gguf, name)
  assert name in gguf.__all__
