"""What a verify costs on this host: measured latency curves, keyed by host.

Speculative decoding pays when the tokens a round emits (tau) outweigh
what the round costs, and on a CPU a verify of n tree tokens costs much
more than one decoding step (unlike on an accelerator, where verifying
16-64 tokens costs about one step). Nothing here is assumed: a profile is
measured on the host (`launch/profile_host.py`) and records

    verify_ms[policy][S][T]   the target's forward over T new (tree) tokens
                              against a cache of S committed tokens, batch 1,
                              median ms, for T = 1, 2, 4, ..., 128
    draft_ms[drafter][T]      a drafter's forward over T tokens (one tree
                              level of width T), at the largest S
    round_ms[policy/drafter][D]
                              a whole round of the compiled decoding loop
                              with that drafter and chain(D), {'drafted':
                              ms, 'gated': ms} (every round verifying its
                              chain, or its root alone), D = 0 the
                              autoregressive step; what 'auto' prices a
                              model drafter's chains with

with the host it came from (`host_info`: CPU model, the ISA flags that
change which kernels run -- AMX, AVX-512 --, cores, jax/jaxlib versions)
and the model. Several hosts' profiles live in one JSON file keyed by
`host_key(host, model)`; `find` returns this host's, or None with a
warning for a missing, corrupt or foreign file (callers then fall back to
float32 and a default tree, never to a wrong tree). It looks in
`$SEQDEC_HOST_PROFILES` (else ~/.cache/seqdec/host_profiles.json), then in
the profiles committed with the source (`repo_path()`).

Quiet-machine protocol (`quiet_median`): every point is measured in rounds
of calls; the point is kept when the medians of the last three rounds lie
within 5% of each other, and the load average is recorded. A profile
with an unstable point is refused (`ProfileError`), not written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from seqdec.errors import UserError

FORMAT_VERSION = 1
SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
# ISA flags (from /proc/cpuinfo) that change which matmul kernels XLA:CPU
# runs; two hosts that differ in them are different hosts.
ISA_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512f", "avx512_bf16",
             "avx512_vnni", "avx2", "fma")
ENV_PATH = "SEQDEC_HOST_PROFILES"


class ProfileError(UserError):
  """A measurement that is not stable enough to keep, or a bad profile."""


def _cpuinfo() -> dict[str, Any]:
  model, flags = None, set()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
          model = value.strip()
        elif key == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  return dict(cpu_model=model, isa=sorted(f for f in ISA_FLAGS if f in flags))


def host_info() -> dict[str, Any]:
  """What makes this host's timings its own (the profile's key fields)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count()
  return dict(_cpuinfo(), cores=cores, backend=jax.default_backend(),
              jax=jax.__version__, jaxlib=jaxlib.__version__)


def has_amx(host: Mapping[str, Any]) -> bool:
  return "amx_bf16" in host.get("isa", ())


def host_key(host: Mapping[str, Any], model: str) -> str:
  """A stable key of (host fields, model): the profile's name in a file."""
  blob = json.dumps(dict(host=dict(host), model=model), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _interp(points: Mapping[int, float], x: float) -> float:
  """Piecewise-linear in x through the measured points; beyond the last
  point, linear in x from the last two (a verify grows with its size)."""
  xs = sorted(points)
  ys = [points[k] for k in xs]
  if x <= xs[0]:
    return ys[0]
  if x >= xs[-1] and len(xs) > 1:
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return ys[-1] + slope * (x - xs[-1])
  return float(np.interp(x, xs, ys))


@dataclasses.dataclass(frozen=True)
class HostProfile:
  """One host's measured costs for one model (module docstring)."""
  host: Mapping[str, Any]
  model: str
  verify_ms: Mapping[str, Mapping[int, Mapping[int, float]]]
  draft_ms: Mapping[str, Mapping[int, float]] = dataclasses.field(
      default_factory=dict)
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  round_ms: Mapping[str, Mapping[int, Mapping[str, float]]] = (
      dataclasses.field(default_factory=dict))

  @property
  def key(self) -> str:
    return host_key(self.host, self.model)

  def policies(self) -> list[str]:
    return sorted(self.verify_ms)

  def verify(self, tokens: float, policy: str = "f32",
             cache_len: Optional[int] = None) -> float:
    """ms of a forward over `tokens` new tokens (the root included) at the
    measured cache length nearest `cache_len` (default: the largest)."""
    curves = self.verify_ms[policy]
    s = max(curves) if cache_len is None else min(
        curves, key=lambda c: (abs(c - cache_len), c))
    return _interp(curves[s], tokens)

  def break_even(self, tokens: float, policy: str = "f32",
                 cache_len: Optional[int] = None) -> float:
    """Expected accepted drafts at which verifying `tokens` tree tokens (the
    root included) pays: a round emits 1 + E tokens for verify(tokens) ms,
    a decoding step 1 token for verify(1) ms, so speculating wins iff

        E > verify(tokens) / verify(1) - 1

    (the draft is already paid when the gate decides: `SpecLoop.gate`), at
    the measured cache length nearest `cache_len` (`verify`)."""
    return max(self.verify(tokens, policy, cache_len)
               / self.verify(1, policy, cache_len) - 1.0, 0.0)

  def cache_lens(self, policy: str = "f32") -> list[int]:
    """The cache lengths whose verify curves were measured under `policy`."""
    return sorted(self.verify_ms[policy])

  def draft(self, drafter: str, width: float) -> float:
    """ms of one drafter level of `width` tokens (0 for a drafter with no
    model forward, e.g. n-gram, when its curve is absent)."""
    if drafter not in self.draft_ms:
      raise KeyError(drafter)
    return _interp(self.draft_ms[drafter], width)

  def rounds(self, drafter: str, depth: int, policy: str = "f32"
             ) -> tuple[float, float]:
    """`(drafted, gated)` ms of a loop round of `drafter` with chain(depth),
    the target under precision `policy` (`round_ms['<policy>/<drafter>']`).

    Raises:
      ProfileError: the profile did not measure that drafter, policy and
        depth.
    """
    try:
      r = self.round_ms[f"{policy}/{drafter}"][depth]
    except KeyError:
      raise ProfileError(
          f"the host profile has no loop rounds of {drafter!r} with "
          f"chain{depth} under {policy!r} (it has {sorted(self.round_ms)}); "
          f"measure them with launch/profile_host.py --policies={policy} "
          f"--round_drafters={drafter}") from None
    return r["drafted"], r["gated"]

  def level_cost(self, drafter: str, policy: str = "f32") -> float:
    """One more drafter level, in target decoding steps: the least-squares
    slope of the gated rounds' ms over chain depth D >= 1 (a gated round
    drafts D levels and verifies its root alone), over the plain step
    (`rounds(drafter, 0)`); >= 0.

    Raises:
      ProfileError: fewer than two depths of `drafter` under `policy`.
    """
    depths = self.round_depths(drafter, policy)
    if len(depths) < 2:
      raise ProfileError(
          f"the host profile has {len(depths)} chain depths of {drafter!r} "
          f"under {policy!r}, two are needed for a per-level cost; measure "
          f"them with launch/profile_host.py --policies={policy} "
          f"--round_drafters={drafter}")
    d = np.asarray(depths, np.float64)
    ms = np.asarray([self.rounds(drafter, k, policy)[1] for k in depths])
    slope = float(np.polyfit(d, ms, 1)[0])
    return max(slope, 0.0) / self.rounds(drafter, 0, policy)[0]

  def round_depths(self, drafter: str, policy: str = "f32") -> list[int]:
    """The chain depths D >= 1 whose loop rounds the profile measured for
    `drafter` under `policy` (`rounds`)."""
    return sorted(d for d in self.round_ms.get(f"{policy}/{drafter}", {})
                  if d >= 1)

  def to_json(self) -> dict[str, Any]:
    return dict(
        format_version=FORMAT_VERSION, key=self.key, host=dict(self.host),
        model=self.model,
        verify_ms={p: {str(s): {str(t): round(v, 4) for t, v in c.items()}
                       for s, c in curves.items()}
                   for p, curves in self.verify_ms.items()},
        draft_ms={d: {str(t): round(v, 4) for t, v in c.items()}
                  for d, c in self.draft_ms.items()},
        round_ms={d: {str(k): {w: round(v, 4) for w, v in r.items()}
                      for k, r in c.items()}
                  for d, c in self.round_ms.items()},
        meta=dict(self.meta))

  @classmethod
  def from_json(cls, obj: Any, where: str) -> "HostProfile":
    """Validated; ProfileError naming `where` and the bad field."""
    def curve(c, what):
      if not isinstance(c, dict) or not c:
        raise ProfileError(f"{where}: {what} is not a non-empty object")
      out = {}
      for t, v in c.items():
        try:
          t_i, v_f = int(t), float(v)
        except (TypeError, ValueError):
          raise ProfileError(f"{where}: {what} has a bad entry {t!r}: {v!r}"
                             ) from None
        if t_i < 1 or not np.isfinite(v_f) or v_f <= 0:
          raise ProfileError(f"{where}: {what}[{t}] = {v!r} is not a "
                             f"positive time for a size >= 1")
        out[t_i] = v_f
      return out

    if not isinstance(obj, dict):
      raise ProfileError(f"{where}: not a JSON object")
    if obj.get("format_version") != FORMAT_VERSION:
      raise ProfileError(f"{where}: format_version "
                         f"{obj.get('format_version')!r}, expected "
                         f"{FORMAT_VERSION}")
    for k in ("host", "model", "verify_ms"):
      if k not in obj:
        raise ProfileError(f"{where}: missing {k!r}")
    if not isinstance(obj["verify_ms"], dict) or not obj["verify_ms"]:
      raise ProfileError(f"{where}: verify_ms is empty")
    verify = {}
    for p, curves in obj["verify_ms"].items():
      if not isinstance(curves, dict) or not curves:
        raise ProfileError(f"{where}: verify_ms[{p!r}] is empty")
      verify[p] = {int(s): curve(c, f"verify_ms[{p!r}][{s}]")
                   for s, c in curves.items()}
    draft = {d: curve(c, f"draft_ms[{d!r}]")
             for d, c in dict(obj.get("draft_ms") or {}).items()}
    rounds = {}
    for d, c in dict(obj.get("round_ms") or {}).items():
      if not isinstance(c, dict) or not c:
        raise ProfileError(f"{where}: round_ms[{d!r}] is not a non-empty "
                           f"object")
      rounds[d] = {}
      for k, r in c.items():
        what = f"round_ms[{d!r}][{k}]"
        if not isinstance(r, dict) or set(r) != {"drafted", "gated"}:
          raise ProfileError(f"{where}: {what} must be {{'drafted': ms, "
                             f"'gated': ms}}, got {r!r}")
        try:
          depth = int(k)
        except ValueError:
          raise ProfileError(f"{where}: {what}: bad depth {k!r}") from None
        if depth < 0:
          raise ProfileError(f"{where}: {what}: depth must be >= 0")
        rounds[d][depth] = {}
        for w, v in r.items():
          try:
            ms = float(v)
          except (TypeError, ValueError):
            ms = float("nan")
          if not np.isfinite(ms) or ms <= 0:
            raise ProfileError(f"{where}: {what}[{w!r}] = {v!r} is not a "
                               f"positive time")
          rounds[d][depth][w] = ms
    prof = cls(obj["host"], str(obj["model"]), verify, draft,
               obj.get("meta") or {}, rounds)
    if obj.get("key") not in (None, prof.key):
      raise ProfileError(f"{where}: key {obj.get('key')!r} does not match "
                         f"its host and model (edited by hand?)")
    return prof


def default_path() -> str:
  """`$SEQDEC_HOST_PROFILES`, else `~/.cache/seqdec/host_profiles.json`."""
  return os.environ.get(ENV_PATH) or os.path.join(
      os.path.expanduser("~"), ".cache", "seqdec", "host_profiles.json")


def read_file(path: str) -> dict[str, HostProfile]:
  """Every profile in the file, by key. ProfileError if unreadable."""
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except FileNotFoundError:
    raise ProfileError(f"no host profile file at {path!r} (measure one with "
                       f"launch/profile_host.py)") from None
  except (OSError, ValueError) as e:
    raise ProfileError(f"corrupt host profile file {path!r}: {e}") from None
  if not isinstance(obj, dict) or not isinstance(obj.get("profiles"), dict):
    raise ProfileError(f"{path!r} has no 'profiles' object")
  return {k: HostProfile.from_json(v, f"{path}[{k}]")
          for k, v in obj["profiles"].items()}


def write_profile(path: str, profile: HostProfile) -> None:
  """Adds (or replaces) `profile` in the file at `path`, atomically."""
  from seqdec.jsonl import write_text_atomic  # pylint: disable=g-import-not-at-top
  try:
    profiles = {k: p.to_json() for k, p in read_file(path).items()}
  except ProfileError:
    if os.path.exists(path):
      raise
    profiles = {}
  profiles[profile.key] = profile.to_json()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write_text_atomic(path, json.dumps(dict(profiles=profiles), indent=1,
                                     sort_keys=True) + "\n")


def repo_path() -> str:
  """The profiles committed with the source tree (measured hosts)."""
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))), "benchmarks", "results", "host_profiles.json")


def find(model: str, path: Optional[str] = None,
         host: Optional[Mapping[str, Any]] = None) -> Optional[HostProfile]:
  """This host's profile for `model` from `path`, or (path None) from
  `default_path()` and then the repo's `repo_path()`; None with a
  RuntimeWarning that says why (no file, a corrupt file, or no entry for
  this host: profiles of other hosts are never used)."""
  host = host_info() if host is None else host
  key = host_key(host, model)
  paths = [path] if path else [default_path(), repo_path()]
  problems, others = [], set()
  for p in paths:
    if not path and not os.path.exists(p):
      problems.append(f"no file {p!r}")
      continue
    try:
      profiles = read_file(p)
    except ProfileError as e:
      problems.append(str(e))
      continue
    if key in profiles:
      return profiles[key]
    others |= {f"{q.host.get('cpu_model')} {q.host.get('cores')} cores/"
               f"{q.model}" for q in profiles.values()}
    problems.append(f"{p!r} has no profile of this host for {model!r}")
  held = f" (profiles held: {sorted(others)})" if others else ""
  warnings.warn(f"seqdec: no host profile: {'; '.join(problems)}{held}; "
                f"falling back to float32 and the default tree (measure one "
                f"with launch/profile_host.py)", RuntimeWarning, stacklevel=2)
  return None


# The tree sizes a decoding run's forwards typically take (a step, small
# and mid-size verifies): `choose_precision` weighs the policies on them.
POLICY_SIZES = (1, 8, 16)


def choose_precision(model: str, path: Optional[str] = None) -> str:
  """The precision policy ('auto') for `model` on this host: the profiled
  policy with the smallest summed verify cost over POLICY_SIZES (one policy
  serves a run's decoding steps and its verifies), among those the host
  can run (a packed policy needs a C++ compiler to build its kernel);
  'f32' without a usable profile (with `find`'s warning)."""
  # pylint: disable=g-import-not-at-top
  from seqdec.kernels import packed_matmul
  from seqdec.models.config import PRECISIONS
  profile = find(model, path)
  if profile is None:
    return "f32"
  runnable = [p for p in profile.policies()
              if PRECISIONS.get(p, {}).get("matmul_impl") != "packed"
              or packed_matmul.can_build()]
  if not runnable:
    return "f32"
  return min(runnable, key=lambda p: (
      sum(profile.verify(t, p) for t in POLICY_SIZES), p != "f32"))


def quiet_median(call: Callable[[], Any], *, per_round: int = 5,
                 max_rounds: int = 12, spread: float = 0.05,
                 clock: Callable[[], float] = time.perf_counter
                 ) -> tuple[float, dict[str, Any]]:
  """Median ms of `call()` (which must block until done) by the
  quiet-machine protocol: rounds of `per_round` calls until the medians of
  the last three rounds are within `spread` (relative) of their median.

  Returns:
    `(median ms, {rounds, spread, load})`.

  Raises:
    ProfileError: no three consecutive rounds agreed within `max_rounds`.
  """
  def sample() -> float:
    t0 = clock()
    call()
    return (clock() - t0) * 1e3
  return quiet_samples(sample, per_round=per_round, max_rounds=max_rounds,
                       spread=spread)


def quiet_samples(sample: Callable[[], float], *, per_round: int = 5,
                  max_rounds: int = 12, spread: float = 0.05
                  ) -> tuple[float, dict[str, Any]]:
  """`quiet_median` of a measurement that times itself: `sample()` runs
  once and returns its ms (e.g. ms per round of a decoding run)."""
  medians = []
  for _ in range(max_rounds):
    times = [sample() for _ in range(per_round)]
    medians.append(statistics.median(times))
    if len(medians) >= 3:
      last = medians[-3:]
      mid = statistics.median(last)
      rel = (max(last) - min(last)) / mid
      if rel <= spread:
        return mid, dict(rounds=len(medians), spread=round(rel, 4),
                         load=load_average())
  raise ProfileError(
      f"timings did not settle within {spread:.0%} over {max_rounds} rounds "
      f"(round medians {[round(m, 2) for m in medians]} ms, load "
      f"{load_average()}): is the machine busy? Not writing a profile")


def load_average() -> Optional[list[float]]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def measure_forward(model, tokens: int, cache_len: int, *, batch: int = 1
                    ) -> Callable[[], Any]:
  """A blocking call: `model`'s forward over `tokens` new tokens (a causal
  tree mask, as a verify) after `cache_len` committed ones, the cache
  donated and threaded through as in the decoding loop."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(model)

  def forward(state, cache, toks, pos, mask):
    m = nnx.merge(graphdef, state)
    logits, cache = m(toks, pos, cache, mask)
    return logits, cache

  forward = jax.jit(forward, donate_argnums=1)
  cache = model.init_cache(batch, cache_len + tokens)
  cache = cache._replace(length=jnp.full((batch,), cache_len, jnp.int32))
  toks = jnp.zeros((batch, tokens), jnp.int32)
  pos = cache_len + jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32),
                                     (batch, tokens))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((tokens, tokens), bool)),
                          (batch, tokens, tokens))
  box = [cache]

  def call():
    logits, box[0] = forward(state, box[0], toks, pos, mask)
    logits.block_until_ready()
  call()                                  # compile
  return call


def measure_curves(model, sizes: Sequence[int], cache_lens: Sequence[int],
                   log: Callable[[str], None] = lambda _: None, **quiet
                   ) -> tuple[dict[int, dict[int, float]], dict[str, Any]]:
  """`({S: {T: ms}}, per-point protocol stats)` for `model`."""
  curves: dict[int, dict[int, float]] = {}
  stats: dict[str, Any] = {}
  for s in cache_lens:
    curves[s] = {}
    for t in sizes:
      ms, st = quiet_median(measure_forward(model, t, s), **quiet)
      curves[s][t] = ms
      stats[f"{s}/{t}"] = st
      log(f"S={s} T={t}: {ms:.2f} ms ({st['rounds']} rounds, spread "
          f"{st['spread']:.1%})")
  return curves, stats
