"""Train a drafter on a target's cached features (configs/drafters/*.py).

  python launch/train_drafter.py --config=configs/drafters/eagle.py \\
      --workdir=$HOME/.cache/seqdec/train/eagle_smollm2
  python launch/train_drafter.py --config=configs/drafters/eagle.py:runlocal \\
      --workdir=/tmp/eagle_smoke
  python launch/train_drafter.py --config=configs/drafters/eagle.py \\
      --evaluate=<drafter dir>          # a saved drafter on the validation rows

Prints one JSON line per logged step (loss, its SmoothL1 and CE terms,
teacher-forced top-1 agreement with the target, tokens/s) and a final JSON
summary; a tqdm bar shows loss, tokens/s and ETA on stderr. Orbax
checkpoints go under --workdir (rerunning resumes at the saved step); the
trained network is exported to <workdir>/drafter. Bad input (a missing or
corrupt dataset, one built from another target, unknown config keys) prints
one `error:` line and exits with status 1.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from seqdec import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/drafters/eagle.py", "Drafter training config.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and export.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a tqdm progress bar.")
_EVALUATE = flags.DEFINE_string(
    "evaluate", None, "Train nothing: print the validation metrics of the "
    "saved drafter at this directory on the config's validation split.")


def evaluate(config, path: str) -> dict:
  # pylint: disable=g-import-not-at-top
  import seqdec
  from seqdec.checkpoints import drafters as drafter_ckpt
  from seqdec.train import drafter as trainer
  # pylint: enable=g-import-not-at-top
  target, _ = seqdec.load_pretrained(config.model)
  net, keep_ids = drafter_ckpt.load(path, target)
  return dict(drafter=path, data=config.data.path,
              **{k: round(v, 5) for k, v in trainer.validate(
                  config, target, net, keep_ids).items()})


def run(config, workdir: str) -> dict:
  # pylint: disable=g-import-not-at-top
  import seqdec
  from seqdec.checkpoints import drafters as drafter_ckpt
  from seqdec.data import drafter_prompts, features
  from seqdec.parallel import distributed
  from seqdec.train import drafter as trainer
  # pylint: enable=g-import-not-at-top
  main_process = distributed.is_main()
  target, tokenizer = seqdec.load_pretrained(config.model)
  if config.data.build_prompts and main_process and not os.path.exists(
      os.path.join(config.data.path, "meta.json")):
    features.build(config.data.path, target, tokenizer,
                   drafter_prompts.build_prompts(config.data.build_prompts,
                                                 max_files=40),
                   meta=dict(model=config.model, runlocal=True),
                   max_prompt=48, max_new=16, temperature=0.0, seed=0,
                   chunk=8, taps=trainer.config_taps(config, target)
                   if config.drafter.kind == "eagle" else ())
  distributed.barrier("drafter data")
  tokens_per_step = config.data.batch_size * config.data.positions
  t_last = [time.perf_counter()]
  bar = None

  def progress(steps, start, total):
    nonlocal bar
    if not (_PROGRESS.value and main_process):
      return steps
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(steps, initial=start, total=total, file=sys.stderr,
               dynamic_ncols=True)
    return bar

  def log(row):
    if not main_process:
      return
    now = time.perf_counter()
    if "loss" in row:
      every = config.train.log_every
      row = dict(row, tokens_per_s=round(every * tokens_per_step
                                         / max(now - t_last[0], 1e-9), 1))
      t_last[0] = now
      if bar is not None:
        bar.set_postfix(loss=f"{row['loss']:.3f}", top1=f"{row['top1']:.3f}",
                        tok_s=row["tokens_per_s"])
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v)
                      for k, v in row.items()}), flush=True)

  t0 = time.perf_counter()
  out = trainer.train(config, target, workdir, progress, log)
  if bar is not None:
    bar.close()
  net = distributed.gathered(out["net"])      # every process takes part
  if not main_process:
    return {}
  export = drafter_ckpt.save(
      os.path.join(workdir, "drafter"), net, target,
      dtype="float32" if config.runlocal else "bfloat16",
      keep_ids=out["keep_ids"],
      model=config.model, data=config.data.path,
      steps=config.train.steps, train_rows=out["train_rows"],
      valid=out["eval"],
      command="python launch/train_drafter.py " + " ".join(sys.argv[1:]))
  return dict(export=export, steps=config.train.steps,
              resumed_from=out["resumed_from"], seconds=round(
                  time.perf_counter() - t0, 1),
              **{k: round(v, 5) for k, v in out["eval"].items()})


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  if not (_WORKDIR.value or _EVALUATE.value):
    cli.fail("--workdir is required")
  logging.set_verbosity(logging.WARNING)
  if _WORKDIR.value:
    os.makedirs(_WORKDIR.value, exist_ok=True)
  from seqdec.parallel import distributed  # pylint: disable=g-import-not-at-top
  # Several processes (SEQDEC_* variables or a TPU pod slice) join first;
  # each loads its own rows (config key `mesh`), process 0 alone writes.
  cli.run_reporting_user_errors(distributed.initialize)
  if _EVALUATE.value:
    summary = cli.run_reporting_user_errors(
        lambda: evaluate(_CONFIG.value, _EVALUATE.value))
  else:
    summary = cli.run_reporting_user_errors(
        lambda: run(_CONFIG.value, _WORKDIR.value))
  if summary:
    print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
