"""Shared pytest set-up: float32 by default, fixtures for tiny models.

Tests that need float64 use the `x64` fixture (enables `jax_enable_x64` for the
test only). Multi-device tests run in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8, never here.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Persistent compilation cache, one directory per test run (issue 13). Many
# tests compile the very same XLA programs from different Python callables
# (a tiny model's jitted init, a Generator's loop): with the cache the second
# compile is a disk read. The directory is made by the first process of the
# run (the pytest controller) and handed through the environment to xdist
# workers and to the subprocesses of the CLI tests; the process that made it
# removes it at exit. Set SEQDEC_TEST_COMPILE_CACHE to a directory to share
# one cache across runs (.ci/run does, for its two tiers; it is then kept);
# set it to "off" to measure without the cache.
_CACHE_ENV = "SEQDEC_TEST_COMPILE_CACHE"
if not os.environ.get(_CACHE_ENV):
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="seqdec-jax-cache-")
  atexit.register(shutil.rmtree, os.environ[_CACHE_ENV], ignore_errors=True)
COMPILE_CACHE_DIR = os.environ[_CACHE_ENV]
if COMPILE_CACHE_DIR == "off":
  COMPILE_CACHE_DIR = None
else:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = COMPILE_CACHE_DIR
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

if COMPILE_CACHE_DIR:
  jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE_DIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _atomic_cache_put():
  """Makes the cache's writes atomic (temp file + rename).

  jax 0.10.2 writes an entry in place when the cache has no size limit, so
  an xdist worker could read another worker's half-written entry (JAX then
  warns and recompiles). A size limit would lock every access instead, at
  the price of a directory scan per write.
  """
  from jax._src import lru_cache  # pylint: disable=g-import-not-at-top
  cls = getattr(lru_cache, "LRUCache", None)
  suffix = getattr(lru_cache, "_CACHE_SUFFIX", None)
  if cls is None or suffix is None:
    return
  put = cls.put

  def atomic_put(self, key, value):
    if getattr(self, "eviction_enabled", True) or not key:
      return put(self, key, value)
    path = os.path.join(str(self.path), f"{key}{suffix}")
    if os.path.exists(path):
      return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
      f.write(value)
    os.replace(tmp, path)

  cls.put = atomic_put


_atomic_cache_put()


# Where most optimisations are off (the tiers' default: tiny models,
# compile-bound; `_optimisation_level`), programs compile with
# `seqdec.testing.FAST_COMPILE_XLA_OPTIONS`: XLA:CPU's legacy elemental
# emitters, about half the compile time of its MLIR fusion emitters on this
# suite's programs (a hybrid speculative decode program: 17.3 s -> 9.5 s;
# tests/TIERS.md, sixth pass), while on a real model the fusion emitters run
# faster (SmolLM2's speculative test: 88 s with them, 170 s without), so
# `realmodel` tests keep them. Per compilation (XLA_FLAGS would be per
# process): added where jax builds the compile options.


def _fast_compile_options():
  from jax._src import compiler  # pylint: disable=g-import-not-at-top
  from seqdec.testing import FAST_COMPILE_XLA_OPTIONS  # pylint: disable=g-import-not-at-top
  build = compiler.get_compile_options

  def get_compile_options(*args, env_options_overrides=None, **kwargs):
    if jax.config.values["jax_disable_most_optimizations"]:
      env_options_overrides = {**FAST_COMPILE_XLA_OPTIONS,
                               **(env_options_overrides or {})}
    return build(*args, env_options_overrides=env_options_overrides,
                 **kwargs)

  compiler.get_compile_options = get_compile_options


_fast_compile_options()


OPTIMIZE_ENV = "JAX_DISABLE_MOST_OPTIMIZATIONS"


@pytest.fixture(autouse=True)
def _optimisation_level(request, monkeypatch):
  """Both tiers run with XLA's backend optimisations off (the Makefile sets
  JAX_DISABLE_MOST_OPTIMIZATIONS=1: tiny models, compile-bound); a
  `realmodel` test, whose cost is running a real model, compiles with full
  optimisation, as users run it, and so do the subprocesses it starts."""
  if request.node.get_closest_marker("realmodel") is None:
    yield
    return
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", False)
  monkeypatch.setenv(OPTIMIZE_ENV, "0")
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def no_compile_cache():
  """The persistent compilation cache off for one test. jaxlib 0.10.2 has
  crashed (SIGSEGV) in the cache on some programs: two ci-like runs in
  test_tree_attention's Pallas speculative test, in the cache write
  (`put_executable_and_time`) of its interpreted-Pallas program, and the
  hybrid speculative matrix (test_hybrid.py) in the cache read
  (`get_executable_and_time`) after 20 cases in one process, and
  test_linear_rnn.py's float32 case in the cache write; each passes alone
  (test_hybrid.py and test_linear_rnn.py use it module-wide). jax decides once per process whether the
  cache is used (`compilation_cache.is_cache_used` memoizes), so the flag alone
  does nothing in a worker that has compiled before: `reset_cache` makes jax
  decide again, with the cache off here and back on afterwards."""
  yield from _cache_off()


@pytest.fixture(scope="module")
def no_compile_cache_module():
  """`no_compile_cache` for a module-scoped fixture that compiles."""
  yield from _cache_off()


def _cache_off():
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_enable_compilation_cache", True)
  compilation_cache.reset_cache()


@pytest.fixture
def x64():
  """Runs a test with 64-bit JAX types enabled."""
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="session")
def smollm2_model():
  """(SmolLM2-135M-Instruct float32 model, tokenizer), loaded once per session
  (per xdist worker) for the slow `realmodel` tests that only read it."""
  import seqdec  # pylint: disable=g-import-not-at-top
  return seqdec.load_pretrained("smollm2-135m-instruct")


# --- xdist worker crashes -----------------------------------------------------
# XLA:CPU (jaxlib 0.10.2) has segfaulted, rarely and never twice at the same
# test, inside a long-lived xdist worker: compiling (backend_compile_and_load),
# serialising an executable for the compilation cache, and once in an
# unrelated training test. A test whose worker dies from a signal (not from a
# failed assertion: those are reported as usual) runs once more in a fresh
# worker; a second crash of the same test fails the run. Every crash is listed
# in the terminal summary, so a test that crashes reliably cannot hide.
_CRASHES: dict[str, int] = {}
_CRASH_RERUNS = 1


def pytest_handlecrashitem(crashitem, report, sched):
  _CRASHES[crashitem] = _CRASHES.get(crashitem, 0) + 1
  if _CRASHES[crashitem] <= _CRASH_RERUNS:
    sched.mark_test_pending(crashitem)
    report.outcome = "rerun"


@pytest.hookimpl(tryfirst=True)
def pytest_report_teststatus(report):
  if report.outcome == "rerun":
    return "rerun", "R", ("RERUN", {"yellow": True})
  return None


def pytest_terminal_summary(terminalreporter):
  if _CRASHES:
    terminalreporter.section("xdist worker crashes")
    for nodeid, n in sorted(_CRASHES.items()):
      verdict = ("rerun in a fresh worker" if n <= _CRASH_RERUNS
                 else "failed: crashed again")
      terminalreporter.write_line(f"{nodeid}: {n} crash(es), {verdict}")
