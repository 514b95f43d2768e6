"""JSON Lines reading shared by the CLI and the benchmarks."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterator

from seqdec.errors import UserError


def iter_jsonl(path: str, error: type[Exception] = UserError
               ) -> Iterator[tuple[str, Any]]:
  """Yields `("path:line", object)` for every non-blank line of a JSONL file.

  Raises:
    error: the file does not exist, or a line is not valid JSON (the message
      names the file and line).
  """
  if not os.path.isfile(path):
    raise error(f"{path!r} does not exist")
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        yield where, json.loads(line)
      except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg})") from None


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to a temp file beside `path`, fsyncs it, then renames it.

  A reader never sees a half-written file, and a failure (or a kill) leaves
  any earlier file at `path` untouched. The parent directory must exist.
  """
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-",
                             suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
