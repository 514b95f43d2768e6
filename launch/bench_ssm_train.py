r"""Training throughput of the Mamba-2 / hybrid LMs on this host (issue 17,
item 5): the parallel (chunked SSD) form against the sequential scan.

For each arch of configs/ssm_lm.py and each way of running the SSM over the
sequence,

    chunked/auto         `ssd.ssd_chunked`, state passing by linear_scan
                         impl='auto' (the default)
    chunked/sequential   the same, state passing by `lax.scan`
    chunked/associative  the same, state passing by `lax.associative_scan`
    sequential           `lax.scan` of the recurrent step over all T tokens

the median seconds of one optimiser step (forward, backward, AdamW) on a
batch of --batch rows of --seq_len bytes, and tokens per second. The loss of
the first step is printed too: every variant computes the same function, so
it agrees to float32 rounding.

    .venv/bin/python launch/bench_ssm_train.py \
        --output=benchmarks/results/ssm_train.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_list("archs", ["mamba2", "hybrid"], "configs/ssm_lm.py arches.")
flags.DEFINE_list("variants", ["chunked/auto", "chunked/sequential",
                               "chunked/associative", "sequential"],
                  "SSM forms (module docstring).")
flags.DEFINE_integer("seq_len", 512, "Bytes per row.")
flags.DEFINE_integer("batch", 8, "Rows per step.")
flags.DEFINE_integer("steps", 4, "Timed steps per variant (after one warm).")
flags.DEFINE_string("output", None, "JSON path (stdout always).")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from seqdec import config_utils, host_profile  # pylint: disable=g-import-not-at-top
  from seqdec.train import lm  # pylint: disable=g-import-not-at-top

  rows = []
  tokens = np.random.default_rng(0).integers(
      0, 256, (FLAGS.batch, FLAGS.seq_len + 1)).astype(np.int32)
  for arch in FLAGS.archs:
    config = config_utils.load_config(
        os.path.join(_ROOT, "configs", "ssm_lm.py") + f":arch={arch}")
    for variant in FLAGS.variants:
      ssd_impl, _, scan_impl = variant.partition("/")
      with config.unlocked():
        config.model.ssd_impl = ssd_impl
        config.model.scan_impl = scan_impl or "auto"
      cfg = lm.model_config(config.model)
      graphdef, params, rest = lm.build(cfg, 0)
      tx = lm.make_optimizer(config.train)
      opt_state = tx.init(params)
      t0 = time.perf_counter()
      params, opt_state, m = lm.train_step(graphdef, tx, params, opt_state,
                                           rest, tokens)
      loss = float(m["loss"])
      compile_s = time.perf_counter() - t0
      times = []
      for _ in range(FLAGS.steps):
        t0 = time.perf_counter()
        params, opt_state, m = lm.train_step(graphdef, tx, params, opt_state,
                                             rest, tokens)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
      s = statistics.median(times)
      row = dict(arch=arch, variant=variant, params=cfg.num_params(),
                 step_s=round(s, 3), spread=round((max(times) - min(times))
                                                   / s, 3),
                 tokens_per_s=round(FLAGS.batch * FLAGS.seq_len / s, 1),
                 first_loss=round(loss, 6), first_step_s=round(compile_s, 1))
      rows.append(row)
      print(json.dumps(row), flush=True)
  out = dict(host=host_profile.host_info(), seq_len=FLAGS.seq_len,
             batch=FLAGS.batch, rows=rows)
  if FLAGS.output:
    with open(FLAGS.output, "w") as fh:
      json.dump(out, fh, indent=1)


if __name__ == "__main__":
  app.run(main)
