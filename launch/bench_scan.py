r"""Which `linear_scan` back end is fastest for a diagonal recurrence on this
host, as the call is made (issue 17, item 6), and the table `impl='auto'`
reads.

The chunked back end's fix-up writes the states into b's buffer. Whether
that is free depends on the call, not on the recurrence:

    overwrite   b is an intermediate of the jitted program (computed inside
                it, dead after the scan): XLA reuses its buffer in place;
    live        b is a (non-donated) argument of the program: XLA must copy
                it first, which the sequential `lax.scan` never pays.

For T in --lengths and C in --channels (float32, one batch axis of 1), the
median ms (quiet-machine protocol) of 'sequential', 'chunked' (chunk 64)
and 'associative' in both contexts. `--write_table` stores, per context, the
smallest T from which 'chunked' beats 'sequential' at every measured longer
T (None: never), per C, in `seqdec/parallel/scan_table.json` with this
host's description; `scan.resolve_impl` reads it.

    .venv/bin/python launch/bench_scan.py \
        --output=benchmarks/results/scan_auto.json --write_table
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["64", "128", "256", "512", "1024", "2048",
                              "4096"], "Sequence lengths T.")
flags.DEFINE_list("channels", ["64", "1024"], "Channels C.")
flags.DEFINE_list("impls", ["sequential", "chunked", "associative"],
                  "Back ends.")
flags.DEFINE_string("output", None, "JSON path (stdout always).")
flags.DEFINE_bool("write_table", False,
                  "Write the crossover table that impl='auto' reads.")


def crossover(rows, context: str, channels: int):
  """Smallest T from which chunked < sequential at every longer T (for C
  channels), or None."""
  rows = [r for r in rows if r["C"] == channels]
  lengths = sorted({r["T"] for r in rows})
  ok = {t: all(r[f"{context}_chunked_ms"] < r[f"{context}_sequential_ms"]
               for r in rows if r["T"] == t) for t in lengths}
  best = None
  for t in reversed(lengths):
    if not ok[t]:
      break
    best = t
  return best


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from seqdec import host_profile  # pylint: disable=g-import-not-at-top
  from seqdec.parallel import scan  # pylint: disable=g-import-not-at-top

  rows = []
  for t in map(int, FLAGS.lengths):
    for c in map(int, FLAGS.channels):
      rng = np.random.default_rng(0)
      a = jnp.asarray(rng.uniform(0.5, 1.0, (t, 1, c)), jnp.float32)
      b = jnp.asarray(rng.standard_normal((t, 1, c)), jnp.float32)
      row = dict(T=t, C=c)
      for impl in FLAGS.impls:
        live = jax.jit(lambda a, b, impl=impl: scan.linear_scan(
            a, b, structure="diagonal", impl=impl))
        # b computed inside the program and dead after the scan.
        over = jax.jit(lambda a, x, impl=impl: scan.linear_scan(
            a, x * 0.5 + 1.0, structure="diagonal", impl=impl))
        for name, fn in (("live", live), ("overwrite", over)):
          jax.block_until_ready(fn(a, b))                  # compile
          t0 = time.perf_counter()
          jax.block_until_ready(fn(a, b))
          # Calls under ~2 ms are timed in batches (noise of one dispatch).
          reps = max(1, int(2e-3 / max(time.perf_counter() - t0, 1e-6)))

          def call(fn=fn, reps=reps):
            for _ in range(reps):
              out = fn(a, b)
            jax.block_until_ready(out)
          ms, _ = host_profile.quiet_median(call, per_round=10,
                                            max_rounds=20, spread=0.1)
          row[f"{name}_{impl}_ms"] = round(ms / reps, 5)
      rows.append(row)
      print(json.dumps(row), flush=True)
  table = {context: {str(c): crossover(rows, context, c)
                     for c in map(int, FLAGS.channels)}
           for context in ("live", "overwrite")}
  host = host_profile.host_info()
  out = dict(host=host, rows=rows, chunked_from_T=table)
  print(json.dumps(dict(chunked_from_T=table)))
  if FLAGS.output:
    with open(FLAGS.output, "w") as fh:
      json.dump(out, fh, indent=1)
  if FLAGS.write_table:
    path = os.path.join(os.path.dirname(scan.__file__), "scan_table.json")
    entry = dict(cpu=host.get("cpu_model"), cores=host.get("cores"),
                 jax=jax.__version__, chunked_from_T=table)
    with open(path, "w") as fh:
      json.dump(entry, fh, indent=1)
      fh.write("\n")
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
