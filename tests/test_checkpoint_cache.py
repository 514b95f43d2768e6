"""The generic conversion cache (`seqdec.checkpoints.cache`), without a model.

The GGUF loader's use of it (keys, rebuilds, a SIGKILL mid-write) is tested in
test_gguf.py; here: entries of arbitrary files, verification, replacement,
aliases and temp-dir cleanup.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from seqdec.checkpoints import cache as C


def _store(root, **kw):
  return C.Cache(root, **{"kind": "test", "format_version": 3, **kw})


def _text_writer(text):
  def write(path):
    with open(path, "w") as f:
      f.write(text)
  return write


def _write(store, key, a="alpha", b="beta" * 100, info=None):
  return store.write(key, {"a.txt": _text_writer(a), "b.bin": _text_writer(b)},
                     info or {"x": 1})


def test_round_trip(tmp_path):
  store = _store(tmp_path / "c")
  assert store.read("k1") is None
  written = _write(store, "k1", info={"x": [1, 2]})
  entry = store.read("k1")
  assert entry == written
  assert entry.info == {"x": [1, 2]} and entry.key == "k1"
  assert open(entry.file("a.txt")).read() == "alpha"
  assert sorted(os.listdir(entry.path)) == ["a.txt", "b.bin", C.META_FILE]
  meta = json.load(open(entry.file(C.META_FILE)))
  assert meta["kind"] == "test" and meta["format_version"] == 3
  assert meta["files"]["b.bin"]["bytes"] == 400
  assert os.listdir(tmp_path / "c") == ["k1"]  # no temp dir left


def test_default_root(tmp_path, monkeypatch):
  monkeypatch.setenv("SEQDEC_CACHE", str(tmp_path / "env"))
  assert C.Cache(None, kind="t", format_version=1).root == str(
      tmp_path / "env")
  monkeypatch.delenv("SEQDEC_CACHE")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert C.default_cache_dir() == str(tmp_path / "home" / ".cache" /
                                      "seqdec")


@pytest.mark.parametrize("damage,match", [
    ("truncate", "bytes, expected"), ("flip", "CRC-32"),
    ("missing_file", "FileNotFoundError"), ("no_meta", "unreadable"),
    ("kind", "holds 'other' data"), ("version", "cache format 2"),
    ("key", "recorded under key"), ("not_object", "not an object")])
def test_damaged_entry_is_reported_and_replaced(tmp_path, damage, match):
  store = _store(tmp_path)
  entry = _write(store, "k")
  meta_path = entry.file(C.META_FILE)
  meta = json.load(open(meta_path))
  if damage == "truncate":
    with open(entry.file("b.bin"), "r+b") as f:
      f.truncate(10)
  elif damage == "flip":
    with open(entry.file("b.bin"), "r+b") as f:
      f.seek(200)
      f.write(b"X")
  elif damage == "missing_file":
    os.remove(entry.file("a.txt"))
  elif damage == "no_meta":
    os.remove(meta_path)
  elif damage == "not_object":
    json.dump([1], open(meta_path, "w"))
  else:
    field, value = {"kind": ("kind", "other"), "version": (
        "format_version", 2), "key": ("key", "other")}[damage]
    meta[field] = value
    json.dump(meta, open(meta_path, "w"))
  with pytest.raises(C.BadEntry, match=match):
    store.read("k")
  _write(store, "k", a="new")  # replaces the bad entry
  assert open(store.read("k").file("a.txt")).read() == "new"
  assert os.listdir(tmp_path) == ["k"]  # no trash left


def test_failed_writer_leaves_nothing(tmp_path):
  store = _store(tmp_path / "c")

  def fail(path):
    raise OSError(28, "No space left on device")

  with pytest.raises(OSError, match="No space"):
    store.write("k", {"a.txt": _text_writer("a"), "b": fail}, {})
  assert os.listdir(tmp_path / "c") == []


def test_invalid_names(tmp_path):
  store = _store(tmp_path)
  for key in ("../x", ".tmp-x", "", "a/b"):
    with pytest.raises(ValueError, match="invalid cache key"):
      store.read(key)
  with pytest.raises(ValueError, match="cache's own file"):
    store.write("k", {C.META_FILE: _text_writer("{}")}, {})


def test_aliases(tmp_path):
  store = _store(tmp_path)
  assert store.resolve("fast") is None
  store.add_alias("fast", "k1", {"why": "test"})
  assert store.resolve("fast") == "k1"
  store.add_alias("fast", "k2")  # replaced atomically
  assert store.resolve("fast") == "k2"
  # Other kinds / versions do not see it; a corrupt alias is just absent.
  assert _store(tmp_path, kind="other").resolve("fast") is None
  assert _store(tmp_path, format_version=4).resolve("fast") is None
  with open(os.path.join(tmp_path, C.ALIASES_DIR, "fast.json"), "w") as f:
    f.write('{"key": ')
  assert store.resolve("fast") is None
  assert os.listdir(tmp_path) == [C.ALIASES_DIR]


def test_clean_removes_dead_and_stale_temp_dirs(tmp_path):
  store = _store(tmp_path)
  host = socket.gethostname()
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  dead_pid = int(dead.stdout)
  names = {
      "dead": f".tmp-{host}-{dead_pid}-0123abcd",
      "live": f".tmp-{host}-{os.getpid()}-0123abcd",
      "trash_dead": f".trash-{host}-{dead_pid}-0123abcd",
      "other_host_fresh": ".tmp-elsewhere-1-0123abcd",
      "other_host_old": ".tmp-elsewhere-2-0123abcd",
  }
  for name in names.values():
    os.makedirs(tmp_path / name / "sub")
  os.makedirs(tmp_path / "entry")
  os.makedirs(tmp_path / C.ALIASES_DIR)
  stale_file = tmp_path / C.ALIASES_DIR / ".tmp-abc_123x.json"
  stale_file.write_text("{}")
  old = time.time() - C.STALE_TEMP_SECONDS - 60
  os.utime(tmp_path / names["other_host_old"], (old, old))
  os.utime(stale_file, (old, old))
  store.clean()
  assert sorted(os.listdir(tmp_path)) == sorted(
      [names["live"], names["other_host_fresh"], "entry", C.ALIASES_DIR])
  assert os.listdir(tmp_path / C.ALIASES_DIR) == []
  C.Cache(tmp_path / "missing", kind="t", format_version=1).clean()  # no-op
