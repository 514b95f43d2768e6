"""Decode prompts with a seqdec model (a thin CLI over `seqdec.app`).

  python launch/decode.py --config=configs/decode.py --prompt="Hello!"
  python launch/decode.py --config=configs/decode.py:runlocal --prompt=hi
  python launch/decode.py --config=configs/decode.py --config.max_new_tokens=64 \
      --prompts_file=in.jsonl --output=out.jsonl

Errors (unknown model, empty or oversize prompt, bad checkpoint, bad prompts
file) print one line and exit with status 1; `--output` is written only when
every prompt has been decoded.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from seqdec import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/decode.py", "Decoding config file.", lock_config=True)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, "JSONL: {\"prompt\": ...} or {\"messages\": [...]}.")
_OUTPUT = flags.DEFINE_string("output", None, "JSONL output file.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if _CONFIG.value.dtype == "float64":
    # The process owns this switch; loaders never flip it (they refuse
    # float64 without it).
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_enable_x64", True)
  from seqdec import app as seqdec_app  # pylint: disable=g-import-not-at-top
  from seqdec.parallel import distributed  # pylint: disable=g-import-not-at-top
  # Several processes (SEQDEC_COORDINATOR, ... or a TPU pod slice) join
  # before any computation; one process does nothing here.
  cli.run_reporting_user_errors(distributed.initialize)
  cli.run_reporting_user_errors(lambda: seqdec_app.run_decode(
      _CONFIG.value, prompts=_PROMPT.value, prompts_file=_PROMPTS_FILE.value,
      output=_OUTPUT.value))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
