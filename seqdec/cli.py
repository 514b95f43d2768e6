"""What every `launch/*.py` script shares: absl flag parsing whose config
errors become one line, and the rule that user errors print one `error:`
line and exit 1 while anything else (a bug) keeps its traceback."""

from __future__ import annotations

import sys
from typing import Callable, NoReturn, TypeVar

from seqdec.errors import USER_ERRORS

T = TypeVar("T")


def fail(message: str) -> NoReturn:
  """Prints `error: message` to stderr and exits with status 1."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def parse_flags(argv):
  """absl flag parsing with one-line errors (an unknown config key, a bad
  value, an error raised by the config file's `get_config`)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: no such field
    inner = e
    while isinstance(inner, BaseException) and inner.args:
      inner = inner.args[0]  # AttributeError(KeyError("'key'\nDid you mean"))
    lines = str(inner).splitlines() or [""]
    hint = f" ({lines[-1].strip()})" if len(lines) > 1 else ""
    fail(f"unknown config key {lines[0].strip(chr(34) + chr(39))!r}{hint}")
  except (flags.Error, ValueError, TypeError) as e:
    # config_flags wraps the config file's exception in a traceback: keep
    # the flag and the final "Error: message" line.
    text = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    fail(" ".join(text[:1] + text[-1:]) if len(text) > 1 else text[0])


def run_reporting_user_errors(fn: Callable[[], T]) -> T:
  """`fn()`; a `seqdec.errors.USER_ERRORS` exception becomes one `error:`
  line and exit status 1, any other exception propagates (traceback)."""
  try:
    return fn()
  except USER_ERRORS as e:
    fail(str(e))


def json_main(run: Callable[[], object]) -> Callable[[list], None]:
  """An absl `main(argv)` for a script whose work is `run()`: refuses
  positional arguments, reports user errors as one `error:` line (exit 1)
  and prints `run()`'s result as indented JSON."""
  def main(argv):
    if len(argv) > 1:
      fail(f"unexpected arguments: {argv[1:]}")
    import json  # pylint: disable=g-import-not-at-top
    print(json.dumps(run_reporting_user_errors(run), indent=1), flush=True)
  return main
