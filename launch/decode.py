"""Decode prompts with a seqdec model (a thin CLI over `seqdec.app`).

  python launch/decode.py --config=configs/decode.py --prompt="Hello!"
  python launch/decode.py --config=configs/decode.py:runlocal --prompt=hi
  python launch/decode.py --config=configs/decode.py --config.max_new_tokens=64 \
      --prompts_file=in.jsonl --output=out.jsonl

Errors (unknown model, empty or oversize prompt, bad checkpoint, bad prompts
file) print one line and exit with status 1; `--output` is written only when
every prompt has been decoded.
"""

import os
import sys

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/decode.py", "Decoding config file.", lock_config=True)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, "JSONL: {\"prompt\": ...} or {\"messages\": [...]}.")
_OUTPUT = flags.DEFINE_string("output", None, "JSONL output file.")


def parse_flags(argv):
  """absl flag parsing with one-line errors (e.g. an unknown config key)."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: no such field
    key = str(e).strip("\"'")
    print(f"error: unknown config key {key!r} (see the config file for the "
          f"known keys)", file=sys.stderr)
  except (flags.Error, ValueError, TypeError) as e:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # config_flags wraps the config file's exception in a traceback: keep the
    # flag and the final "Error: message" line.
    msg = lines[0] if len(lines) < 2 else f"{lines[0]} {lines[-1]}"
    print(f"error: {msg}", file=sys.stderr)
  sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from seqdec import app as seqdec_app  # pylint: disable=g-import-not-at-top
  try:
    seqdec_app.run_decode(_CONFIG.value, prompts=_PROMPT.value,
                          prompts_file=_PROMPTS_FILE.value,
                          output=_OUTPUT.value)
  except seqdec_app.USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
