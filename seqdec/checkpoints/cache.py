"""A crash-safe on-disk cache of converted checkpoints, shared by the loaders.

A loader that converts a checkpoint (today the GGUF loader: dequantised
float32 safetensors + the rebuilt tokenizer) stores the result as an *entry*:
a directory of named files plus a JSON meta file, found by a *key* that the
loader derives from its source (the GGUF loader uses the SHA-256 of the file).
The HF safetensors loader (`seqdec.checkpoints.hf`) converts nothing worth
caching -- its weights are read straight from the checkpoint -- so it has no
entries; a future converting loader reuses this module with its own `kind`.

Layout under the root (`$SEQDEC_CACHE`, else `~/.cache/seqdec`):

    <key>/                       one entry: its files + `seqdec.json`
    aliases/<alias>.json         {"key": <key>, ...}: a cheap second key
    .tmp-<host>-<pid>-<rand>/    an entry being written
    .trash-<host>-<pid>-<rand>/  a bad entry being removed

`seqdec.json` is written last and records, besides the loader's own `info`:

    {"kind": "gguf", "format_version": 2, "key": <key>, "created": <time>,
     "files": {<name>: {"bytes": <size>, "crc32": <CRC-32>}, ...},
     "info": {...}}

Crash safety: an entry is assembled in a fresh temp dir in the root, every
file (and the dir) is fsynced, the meta file goes in last, and the dir is
renamed onto `<key>` (atomic on POSIX). A process killed at any point leaves
either no entry or a complete one; its temp dir is removed by a later
`Cache.clean` (at once when its pid is dead on this host, after a day for
other hosts sharing the directory). `Cache.read` re-checks every file's size
and CRC-32, so a truncated or bit-flipped entry is reported (`BadEntry`) and
rebuilt by the caller, never loaded.

Aliases map a cheap key (the GGUF loader's stat + header fingerprint) to an
entry's key, so that a hit needs no expensive key computation; they are
plain atomically replaced JSON files, and a lost or stale alias only costs
recomputing the real key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
import zlib
from typing import Any, Callable, Mapping, Optional

from seqdec.jsonl import write_text_atomic

META_FILE = "seqdec.json"
ALIASES_DIR = "aliases"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
# Temp dirs of other hosts (shared cache dirs) are removed after this long.
STALE_TEMP_SECONDS = 24 * 3600
_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


class BadEntry(Exception):
  """A cache entry that must be rebuilt (the message says why)."""


def default_cache_dir() -> str:
  """`$SEQDEC_CACHE`, else `~/.cache/seqdec`."""
  return os.environ.get("SEQDEC_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "seqdec")


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
  """Hex SHA-256 of a file's bytes (~0.15 s per 100 MB here)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while True:
      block = f.read(chunk)
      if not block:
        return h.hexdigest()
      h.update(block)


def crc32_file(path: str, chunk: int = 1 << 24) -> int:
  """CRC-32 of a file's bytes (detects truncation and bit flips)."""
  crc = 0
  with open(path, "rb") as f:
    while True:
      block = f.read(chunk)
      if not block:
        return crc
      crc = zlib.crc32(block, crc)


def _fsync_path(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _write_text(path: str, text: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def _check_name(name: str, what: str) -> str:
  if not isinstance(name, str) or not _KEY_RE.fullmatch(name):
    raise ValueError(f"invalid cache {what} {name!r}: use letters, digits, "
                     f"'_', '.', '-', not starting with '.' or '-'")
  return name


def _unique(prefix: str) -> str:
  return (f"{prefix}{socket.gethostname()}-{os.getpid()}-"
          f"{uuid.uuid4().hex[:8]}")


@dataclasses.dataclass(frozen=True)
class Entry:
  """A verified cache entry.

  Attributes:
    path: the entry directory.
    key: its key.
    info: the loader's `info` object from the meta file.
  """
  path: str
  key: str
  info: dict[str, Any]

  def file(self, name: str) -> str:
    """Path of one of the entry's files."""
    return os.path.join(self.path, name)


class Cache:
  """Entries of one kind (one producer and format version) under a root.

  Attributes:
    root: the cache directory (created on the first write).
    kind: the producer, e.g. 'gguf'; an entry of another kind is bad.
    format_version: the producer's layout/conversion version; bump it when
      either changes and older entries are rebuilt instead of loaded.
  """

  def __init__(self, root: Optional[str | os.PathLike], *, kind: str,
               format_version: int):
    self.root = os.fspath(root) if root else default_cache_dir()
    self.kind = kind
    self.format_version = format_version

  def entry_path(self, key: str) -> str:
    return os.path.join(self.root, _check_name(key, "key"))

  # ------------------------------------------------------------- entries

  def read(self, key: str) -> Optional[Entry]:
    """The entry for `key`, verified; None when there is none.

    Checks the meta file (kind, format version, key) and every recorded
    file's size and CRC-32 (this reads each file once).

    Raises:
      BadEntry: an entry exists but is unreadable, of another kind or
        version, or has a missing, truncated or corrupt file.
    """
    path = self.entry_path(key)
    if not os.path.isdir(path):
      return None
    try:
      with open(os.path.join(path, META_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    except (OSError, ValueError) as e:
      raise BadEntry(f"unreadable {META_FILE}: {e}") from e
    if not isinstance(meta, dict):
      raise BadEntry(f"{META_FILE} is not an object")
    if meta.get("format_version") != self.format_version:
      raise BadEntry(f"cache format {meta.get('format_version')!r}, this "
                     f"seqdec writes {self.format_version}")
    if meta.get("kind") != self.kind:
      raise BadEntry(f"the entry holds {meta.get('kind')!r} data, not "
                     f"{self.kind!r}")
    if meta.get("key") != key:
      raise BadEntry(f"the entry is recorded under key {meta.get('key')!r}")
    files, info = meta.get("files"), meta.get("info")
    if not isinstance(files, dict) or not isinstance(info, dict):
      raise BadEntry(f"{META_FILE} lacks 'files' or 'info'")
    for name, want in files.items():
      file = os.path.join(path, name)
      try:
        size = os.path.getsize(file)
        if size != want["bytes"]:
          raise BadEntry(f"{name} has {size} bytes, expected "
                         f"{want['bytes']} (truncated?)")
        if crc32_file(file) != want["crc32"]:
          raise BadEntry(f"{name} fails its CRC-32 check (corrupt)")
      except (OSError, KeyError, TypeError) as e:
        raise BadEntry(f"{name}: {type(e).__name__}: {e}") from e
    return Entry(path=path, key=key, info=info)

  def write(self, key: str, files: Mapping[str, Callable[[str], None]],
            info: Mapping[str, Any]) -> Entry:
    """Writes the entry for `key` atomically, replacing a bad one.

    Args:
      key: the entry's key.
      files: file name -> a function writing that file at the path it is
        given (inside a temp dir); the cache fsyncs it and records its size
        and CRC-32.
      info: JSON-serialisable producer data, returned by `read` as
        `Entry.info`.

    Returns:
      The written entry. When another process installed the same key
      meanwhile, theirs is kept.

    Raises:
      OSError: the cache cannot be written (nothing is left behind);
        anything a file writer raises.
    """
    entry = self.entry_path(key)
    for name in files:
      if _check_name(name, "file name") == META_FILE:
        raise ValueError(f"{META_FILE} is the cache's own file")
    os.makedirs(self.root, exist_ok=True)
    tmp = os.path.join(self.root, _unique(_TMP_PREFIX))
    os.mkdir(tmp)
    try:
      recorded = {}
      for name, write in files.items():
        file = os.path.join(tmp, name)
        write(file)
        _fsync_path(file)
        recorded[name] = {"bytes": os.path.getsize(file),
                          "crc32": crc32_file(file)}
      meta = {"kind": self.kind, "format_version": self.format_version,
              "key": key, "created": time.time(), "files": recorded,
              "info": dict(info)}
      _write_text(os.path.join(tmp, META_FILE), json.dumps(meta, indent=1))
      _fsync_path(tmp)
      if os.path.isdir(entry):  # a bad entry being rebuilt: move it aside
        trash = os.path.join(self.root, _unique(_TRASH_PREFIX))
        try:
          os.rename(entry, trash)
        except FileNotFoundError:
          pass
        else:
          shutil.rmtree(trash, ignore_errors=True)
      try:
        os.rename(tmp, entry)
      except OSError:
        if not os.path.isdir(entry):
          raise
        # Another process installed the same entry meanwhile; keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)
      _fsync_path(self.root)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    return Entry(path=entry, key=key, info=dict(info))

  # ------------------------------------------------------------- aliases

  def _alias_path(self, alias: str) -> str:
    return os.path.join(self.root, ALIASES_DIR,
                        _check_name(alias, "alias") + ".json")

  def resolve(self, alias: str) -> Optional[str]:
    """The key an alias names, or None (no alias, or an unreadable one)."""
    try:
      with open(self._alias_path(alias), encoding="utf-8") as f:
        record = json.load(f)
    except (OSError, ValueError):
      return None
    if (not isinstance(record, dict) or record.get("kind") != self.kind
        or record.get("format_version") != self.format_version
        or record.get("alias") != alias):
      return None
    key = record.get("key")
    return key if isinstance(key, str) and _KEY_RE.fullmatch(key) else None

  def add_alias(self, alias: str, key: str,
                info: Optional[Mapping[str, Any]] = None) -> None:
    """Points `alias` at `key` (atomically replacing an older alias).

    Raises:
      OSError: the alias cannot be written.
    """
    _check_name(key, "key")
    path = self._alias_path(alias)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text_atomic(path, json.dumps(
        {"kind": self.kind, "format_version": self.format_version,
         "alias": alias, "key": key, "created": time.time(),
         "info": dict(info or {})}, indent=1))

  # ------------------------------------------------------------- cleanup

  def clean(self) -> None:
    """Removes temp/trash dirs and files left by killed writers.

    A name `.tmp-<host>-<pid>-<rand>` (or `.trash-...`) is removed when
    <host> is this host and <pid> is no longer running, or when it is older
    than `STALE_TEMP_SECONDS` (other hosts sharing the directory, or a temp
    name of another pattern). Live writers are left alone.
    """
    host = socket.gethostname()
    now = time.time()
    for directory in (self.root, os.path.join(self.root, ALIASES_DIR)):
      try:
        names = os.listdir(directory)
      except OSError:
        continue
      for name in names:
        if not name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
          continue
        path = os.path.join(directory, name)
        stem = name.split("-", 1)[1]
        owner, _, rest = stem.rpartition("-")  # drop the random suffix
        owner_host, _, pid = owner.rpartition("-")
        dead = False
        if owner_host == host and pid.isdigit():
          try:
            os.kill(int(pid), 0)
          except ProcessLookupError:
            dead = True
          except OSError:
            pass
        try:
          old = now - os.path.getmtime(path) > STALE_TEMP_SECONDS
        except OSError:
          continue
        if dead or old or not rest:
          if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
          else:
            try:
              os.unlink(path)
            except OSError:
              pass
