"""JSON Lines reading shared by the CLI and the benchmarks."""

from __future__ import annotations

import json
import os
from typing import Any, Iterator


def iter_jsonl(path: str, error: type[Exception] = ValueError
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
