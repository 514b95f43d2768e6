"""Small-M weight matmuls on XLA:CPU through a custom call: float32, or
bfloat16 weights and activations with float32 accumulation.

On a CPU, XLA runs a one-row weight matmul as a matrix-vector product at
memory bandwidth, but a 2-16-row one as a GEMM that repacks the weight
operand on every call: a 5-token verify of SmolLM2's 30 layers took ~1.5x,
and 16 tokens ~2x, a 1-token step (`benchmarks/results/small_m.md`). This
module stores each weight matrix once in the layout its matmul streams,

    panels[p, k, j] = W[k, 16 p + j]        W: [K, N] -> panels: [ceil(N/16), K, 16]

(columns padded with zeros to a multiple of 16), and runs

    y[m, n] = sum_k x[m, k] W[k, n]

in a small C++ kernel (`cpu/packed_matmul.cc`) called through the XLA FFI:
register tiles of up to 12 rows x 32 columns, float32 fused multiply-adds
in k order, panel pairs split over the host's cores. Every output
accumulates in the same order whatever the number of rows, so the matmul
is batch-invariant: a row's result does not depend on the other rows of
the call.

The kernel is compiled for the host (`-march=native`) on first use and kept
under `$SEQDEC_CACHE/kernels` (default `~/.cache/seqdec`), keyed by the
source, the compiler, the flags and the CPU; nothing is downloaded. A host
without a C++ compiler gets `KernelBuildError` when the policy is asked for.

bfloat16 (the 'bf16_packed' policy): W and x in bf16, products exact in
float32 and summed in float32. The panels then hold pairs of consecutive
k (the operand layout of AVX512-BF16's dot-product instruction),

    panels[p, k2, 2 j + e] = W[2 k2 + e, 16 p + j]     W: [K, N] -> [ceil(N/16), K2, 32]

(K padded with zero rows to a multiple of 32, K2 = that / 2: whole AMX
tiles), and y[m, n] adds, for each pair, the odd k's product and then the
even k's: the same function as XLA's bf16 x bf16 -> f32 dot (the
bf16_weights policy) up to the order of the float32 additions, at half
the f32 kernel's bytes per call. The kernel
runs on AMX tiles where the host has them (every M; a 16-row call then
costs about what a 1-row call does), else VDPBF16PS, else it widens the
pairs to float32 (`cpu/packed_matmul.cc`).

The model side is `PackedWeight` (a pytree holding the panels and the
matrix's logical shape) and the 'f32_packed' and 'bf16_packed' precision
policies (`seqdec.models.config.PRECISIONS`, `transformer.with_precision`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from seqdec.errors import UserError

LANES = 16
TARGET = "seqdec_packed_matmul"
TARGET_BF16 = "seqdec_packed_matmul_bf16"
SOURCE = os.path.join(os.path.dirname(__file__), "cpu", "packed_matmul.cc")
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++20",
         "-shared", "-fPIC", "-w")
# Extra compiler flags (part of the build's cache key), e.g.
# `-mno-avx512bf16` to build the bf16 kernel's portable path on a host
# that has the instruction (its test does).
FLAGS_ENV = "SEQDEC_KERNEL_CXXFLAGS"


def _flags() -> tuple[str, ...]:
  return FLAGS + tuple(os.environ.get(FLAGS_ENV, "").split())


class KernelBuildError(UserError):
  """The packed-matmul kernel cannot be built or loaded on this host."""


def _cache_root() -> str:
  root = os.environ.get("SEQDEC_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "seqdec")
  return os.path.join(root, "kernels")


def _cpu_signature() -> str:
  """The CPU model and flags (what `-march=native` compiles for)."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f.read().splitlines()
               if l.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))
  except OSError:
    return platform.processor() or platform.machine()


def _compiler() -> str:
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if not cxx:
    raise KernelBuildError(
        "the f32_packed and bf16_packed policies compile a C++ kernel on "
        "first use, and no C++ compiler was found (set CXX, or install g++); "
        "use precision=f32 or bf16_weights")
  return cxx


def can_build() -> bool:
  """Whether this host can build the kernel (a C++ compiler is found):
  what `precision=auto` asks before it picks a packed policy."""
  try:
    return shutil.which(_compiler()) is not None
  except KernelBuildError:
    return False


def library_path() -> str:
  """Builds the kernel for this host if needed; returns the .so path."""
  cxx = _compiler()
  include = jax.ffi.include_dir()
  with open(SOURCE, "rb") as f:
    source = f.read()
  try:
    version = subprocess.run([cxx, "--version"], capture_output=True,
                             text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise KernelBuildError(f"{cxx} --version failed: {e}") from e
  key = hashlib.sha256(b"\0".join([
      source, " ".join(_flags()).encode(), version.encode(),
      _cpu_signature().encode(), jax.__version__.encode()])).hexdigest()[:16]
  path = os.path.join(_cache_root(), f"packed_matmul-{key}.so")
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  cmd = [cxx, *_flags(), f"-I{include}", SOURCE, "-o", tmp, "-lpthread"]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode:
    os.unlink(tmp)
    raise KernelBuildError(f"building the packed-matmul kernel failed "
                           f"({' '.join(cmd)}):\n{done.stderr[-2000:]}")
  os.replace(tmp, path)   # atomic: concurrent builders agree
  return path


_LOCK = threading.Lock()
_LIBRARY: Optional[ctypes.CDLL] = None


def ensure_registered(threads: Optional[int] = None) -> None:
  """Builds (once per host), loads and registers the custom call.

  Args:
    threads: the kernel's worker pool size, fixed at its first call (None:
      `$SEQDEC_KERNEL_THREADS`, else every core of this process's affinity).
  """
  global _LIBRARY
  with _LOCK:
    if _LIBRARY is not None:
      return
    path = library_path()
    try:
      lib = ctypes.cdll.LoadLibrary(path)
    except OSError as e:
      raise KernelBuildError(f"cannot load {path}: {e}") from e
    if threads is None:
      threads = int(os.environ.get("SEQDEC_KERNEL_THREADS", "0") or 0)
      if threads <= 0 and hasattr(os, "sched_getaffinity"):
        threads = len(os.sched_getaffinity(0))
    lib.seqdec_packed_matmul_set_threads(ctypes.c_int(threads))
    for name, fn in ((TARGET, lib.SeqdecPackedMatmul),
                     (TARGET_BF16, lib.SeqdecPackedMatmulBf16)):
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(fn), platform="cpu")
    _LIBRARY = lib


def _paired(dtype) -> bool:
  """bfloat16 panels hold k pairs (module docstring)."""
  return np.dtype(dtype) == np.dtype(jnp.bfloat16)


def pack(w: Any) -> Any:
  """`[K, N]` -> panels: `[ceil(N/16), K, 16]` (float32), or for a bfloat16
  W `[ceil(N/16), K2, 32]` (k pairs, K2 = ceil(K/32) * 16); zero-padded
  (numpy in, numpy out; a jax array in, a jax array out)."""
  xp = np if isinstance(w, np.ndarray) else jnp
  k, n = w.shape
  pad = -n % LANES
  if pad:
    w = xp.concatenate([w, xp.zeros((k, pad), w.dtype)], axis=1)
  if not _paired(w.dtype):
    return w.reshape(k, -1, LANES).transpose(1, 0, 2)
  if k % 32:
    w = xp.concatenate([w, xp.zeros((-k % 32, w.shape[1]), w.dtype)], axis=0)
  k2 = w.shape[0] // 2
  return w.reshape(k2, 2, -1, LANES).transpose(2, 0, 3, 1).reshape(
      -1, k2, 2 * LANES)


def unpack(panels: Any, n: int, k: Optional[int] = None) -> Any:
  """The inverse of `pack`: panels -> `[K, n]` (K = `k`, default all the
  panels' rows)."""
  p = panels.shape[0]
  if _paired(panels.dtype):
    k2 = panels.shape[1]
    w = panels.reshape(p, k2, LANES, 2).transpose(1, 3, 0, 2).reshape(
        2 * k2, p * LANES)
  else:
    w = panels.transpose(1, 0, 2).reshape(panels.shape[1], p * LANES)
  return w[:k, :n]


def matmul_2d(x: jax.Array, panels: jax.Array, n: int) -> jax.Array:
  """`x [M, K] @ W [K, n]` with W given as `pack(W)` (the custom call;
  XLA:CPU only), float32 out. Float32 panels take a float32 x; bfloat16
  panels round x to bfloat16 (as the bf16_weights policy's dot does)."""
  m = x.shape[0]
  p = panels.shape[0]
  out = jax.ShapeDtypeStruct((m, p * LANES), jnp.float32)
  if _paired(panels.dtype):
    x = x.astype(jnp.bfloat16)
    pad = 2 * panels.shape[1] - x.shape[1]
    if pad:
      x = jnp.pad(x, ((0, 0), (0, pad)))
    y = jax.ffi.ffi_call(TARGET_BF16, out)(x, panels)
  else:
    if x.dtype != jnp.float32 or panels.dtype != jnp.float32:
      raise TypeError(f"packed matmul takes float32 or bfloat16 panels with "
                      f"a float32 x; got x {x.dtype}, panels {panels.dtype}")
    y = jax.ffi.ffi_call(TARGET, out)(x, panels)
  return y if n == p * LANES else y[:, :n]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
  """A weight matrix stored as `pack(W)`, W `[K, N]` the matrix flattened
  to (contracted input, output) with N = prod(out_shape).

  Stands where the model's weight array stood (`param[...]` returns it);
  `transformer.weight_matmul` calls `matmul`. `columns(ids)` reads W's columns
  `ids` as rows (`[..., K]`): the tied embedding's rows for the token
  lookup and for a trimmed head.
  """

  panels: jax.Array
  out_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  transposed: bool = dataclasses.field(default=False,
                                       metadata=dict(static=True))
  # K (bfloat16 panels pad it to a multiple of 32); 0: the panels' rows.
  rows: int = dataclasses.field(default=0, metadata=dict(static=True))

  def __getitem__(self, index):
    if index is Ellipsis:
      return self
    raise TypeError("a PackedWeight is read whole (param[...]) or through "
                    "matmul / columns")

  @property
  def dtype(self):
    return self.panels.dtype

  @property
  def shape(self) -> tuple[int, ...]:
    """The shape of the array it stands for (`to_array`)."""
    if self.transposed:
      return (self.out_dim, self.in_dim)
    return (self.in_dim, *self.out_shape)

  @property
  def in_dim(self) -> int:
    return self.rows or self.panels.shape[1]

  @property
  def out_dim(self) -> int:
    return int(np.prod(self.out_shape))

  @classmethod
  def from_matrix(cls, w: Any, transposed: bool = False) -> "PackedWeight":
    """Packs a weight array `[K, *out_shape]` whose first axis is
    contracted (or, `transposed`, a `[N, K]` matrix contracted on its last
    axis: a tied embedding used as the LM head)."""
    if transposed:
      return cls(pack(w.T), (w.shape[0],), True, w.shape[1])
    return cls(pack(w.reshape(w.shape[0], -1)), tuple(w.shape[1:]), False,
               w.shape[0])

  def to_array(self) -> Any:
    """The weight array `from_matrix` was given."""
    w = unpack(self.panels, self.out_dim, self.in_dim)
    return w.T if self.transposed else w.reshape(self.in_dim,
                                                 *self.out_shape)

  def matmul(self, x: jax.Array) -> jax.Array:
    """`[..., K] -> [..., *out_shape]`, float32 (x rounded to bfloat16 for
    bfloat16 panels)."""
    lead = x.shape[:-1]
    y = matmul_2d(x.reshape(-1, x.shape[-1]), self.panels, self.out_dim)
    return y.reshape(*lead, *self.out_shape)

  def columns(self, ids: jax.Array) -> jax.Array:
    """W[:, ids] as `[*ids.shape, K]` (a gather of K strided entries per id)."""
    p, j = ids // LANES, ids % LANES
    if not _paired(self.panels.dtype):
      return self.panels[p, :, j]
    pairs = jnp.stack([self.panels[p, :, 2 * j], self.panels[p, :, 2 * j + 1]],
                      axis=-1)                            # [..., K2, 2]
    return pairs.reshape(*ids.shape, -1)[..., :self.in_dim]
