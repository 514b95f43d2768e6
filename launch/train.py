"""Train the RNN language model (configs/pararnn_lm.py); resumable.

  python launch/train.py --config=configs/pararnn_lm.py --workdir=/tmp/lm
  python launch/train.py --config=configs/pararnn_lm.py:runlocal --workdir=/tmp/x
  python launch/train.py --config=configs/ssm_lm.py:arch=hybrid \
      --workdir=/tmp/hyb --export_hf=/tmp/hyb/hf    # then decode /tmp/hyb/hf

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

from seqdec import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/pararnn_lm.py", "Training config file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")
_EXPORT_HF = flags.DEFINE_string(
    "export_hf", None, "After training, write the model (Mamba-2 / hybrid "
    "family) as an HF checkpoint directory here (must not exist), which "
    "launch/decode.py --config.model=<dir> decodes.")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    cli.fail("--workdir is required")
  logging.set_verbosity(logging.WARNING)
  # pylint: disable=g-import-not-at-top
  from seqdec.parallel import distributed
  # Several processes (SEQDEC_* variables or a TPU pod slice) join first;
  # each loads its own rows (config key `mesh`), process 0 alone writes.
  cli.run_reporting_user_errors(distributed.initialize)
  from seqdec.train import lm
  # pylint: enable=g-import-not-at-top
  os.makedirs(_WORKDIR.value, exist_ok=True)
  metrics_path = os.path.join(_WORKDIR.value, "metrics.jsonl")
  main_process = distributed.is_main()

  def log(row):
    if not main_process:
      return
    line = json.dumps(row)
    print(line, flush=True)
    with open(metrics_path, "a", encoding="utf-8") as f:
      f.write(line + "\n")

  def progress(steps, start, total):
    if not (_PROGRESS.value and main_process):
      return steps
    import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm.tqdm(steps, initial=start, total=total, file=sys.stderr,
                     desc="train")

  out = cli.run_reporting_user_errors(lambda: lm.train(
      _CONFIG.value, _WORKDIR.value, progress=progress, log=log))
  if main_process:
    print(json.dumps({"summary": out["eval"], "steps": len(out["history"]),
                      "resumed_from": out["resumed_from"]}))
    if _EXPORT_HF.value:
      path = cli.run_reporting_user_errors(lambda: lm.export_hf(
          _CONFIG.value, _WORKDIR.value, _EXPORT_HF.value))
      print(json.dumps({"exported_hf": path}))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
