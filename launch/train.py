"""Train the RNN language model (configs/pararnn_lm.py); resumable.

  python launch/train.py --config=configs/pararnn_lm.py --workdir=/tmp/lm
  python launch/train.py --config=configs/pararnn_lm.py:runlocal --workdir=/tmp/x

Prints one JSON line per logged step and a final JSON summary (validation
loss, perplexity, bits per byte); writes `metrics.jsonl` and orbax checkpoints
under --workdir. Bad input (unknown config key or argument, bad values, a
checkpoint that does not match the config) prints one `error:` line and exits
with status 1.
"""

import json
import os
import sys

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/pararnn_lm.py", "Training config file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def _flags_parser(argv):
  """absl parsing; config errors become one line (the last of the trace)."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: no such field
    inner = e
    while isinstance(inner, BaseException) and inner.args:
      inner = inner.args[0]  # AttributeError(KeyError("'key'\nDid you mean"))
    lines = str(inner).splitlines() or [""]
    hint = f" ({lines[-1]})" if len(lines) > 1 else ""
    _fail(f"unknown config key {lines[0].strip(chr(34) + chr(39))!r}{hint}")
  except (flags.Error, ValueError, TypeError) as e:
    text = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    _fail(" ".join(text[:1] + text[-1:]) if len(text) > 1 else text[0])


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    _fail("--workdir is required")
  logging.set_verbosity(logging.WARNING)
  from seqdec.train import lm  # pylint: disable=g-import-not-at-top
  os.makedirs(_WORKDIR.value, exist_ok=True)
  metrics_path = os.path.join(_WORKDIR.value, "metrics.jsonl")

  def log(row):
    line = json.dumps(row)
    print(line, flush=True)
    with open(metrics_path, "a", encoding="utf-8") as f:
      f.write(line + "\n")

  def progress(steps, start, total):
    if not _PROGRESS.value:
      return steps
    import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm.tqdm(steps, initial=start, total=total, file=sys.stderr,
                     desc="train")

  try:
    out = lm.train(_CONFIG.value, _WORKDIR.value, progress=progress, log=log)
  except lm.TrainError as e:
    _fail(str(e))
  print(json.dumps({"summary": out["eval"], "steps": len(out["history"]),
                    "resumed_from": out["resumed_from"]}))


if __name__ == "__main__":
  app.run(main, flags_parser=_flags_parser)
