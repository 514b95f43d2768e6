r"""Small-M matmuls on XLA:CPU (issue 15, item 3): why verifying M = 2-16
tokens costs far more than one token, and which layout, dot form or XLA
flag changes it.

The workload is the weight matmuls of SmolLM2-135M's 30 decoder layers
(hidden 576, 9 heads of 64 + 3 kv heads, MLP 1536), the bytes a verify must
read whatever M is (425 MB in f32, the LM head left out): per layer

    qkv = y Wqkv      [M, 576] x [576, 960]
    y  += qkv[:, :576] Wo                        [576, 576]
    gu  = y Wgu       [M, 576] x [576, 3072]     (gate | up)
    y  += (gu[:, :1536] * gu[:, 1536:]) Wd       [1536, 576]

timed as one jitted program (medians by `host_profile.quiet_median`) for
each M and each variant:

    xw      y = x @ W with W [in, out], q|k|v and gate|up fused (seqdec)
    split   the same with q, k, v, gate, up as five separate matmuls
    wt      W stored [out, in]: y = einsum('mi,oi->mo', x, W)
    left    the weights as the left operand: y^T = W^T x^T, W^T [out, in]
    bf16    bf16 W and x, f32 accumulation (`preferred_element_type`), the
            bf16_weights policy's matmul
    packed  W stored as 16-column panels, multiplied by seqdec's C++ kernel
            (`seqdec.kernels.packed_matmul`, the f32_packed policy)

and, each in its own process (XLA reads XLA_FLAGS once, at start), for
each set of XLA:CPU flags in --flag_sets. It reports ms per 30-layer stack
and the effective weight bandwidth, bytes / time: a matmul that is
memory-bound runs at M = 16 in about M = 1's time.

    .venv/bin/python launch/bench_small_m.py \
        --output=benchmarks/results/small_m.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["1", "2", "4", "8", "16", "32"], "Tokens M.")
flags.DEFINE_list("variants", ["xw", "split", "wt", "left", "bf16",
                               "packed"],
                  "Dot forms (module docstring).")
flags.DEFINE_multi_string(
    "flag_sets",
    ["", "--xla_cpu_experimental_ynn_fusion_type=",
     "--xla_cpu_use_xnnpack=false",
     "--xla_cpu_experimental_onednn_custom_call=true",
     "--xla_cpu_multi_thread_eigen=false"],
    "XLA_FLAGS of each run ('' = the defaults).")
flags.DEFINE_integer("layers", 30, "Decoder layers.")
flags.DEFINE_integer("per_round", 5, "Calls per round (quiet protocol).")
flags.DEFINE_integer("max_rounds", 20, "Rounds before giving up a point.")
flags.DEFINE_string("output", "", "JSON record (.md beside it).")
flags.DEFINE_boolean("child", False, "Internal: measure in this process.")

D, Q, KV, F = 576, 576, 192, 1536   # hidden, q width, k/v width, MLP


def _shapes(variant: str) -> list[tuple[str, int, int]]:
  """(name, in, out) of one layer's weight matrices."""
  if variant == "split":
    return [("q", D, Q), ("k", D, KV), ("v", D, KV), ("o", Q, D),
            ("gate", D, F), ("up", D, F), ("down", F, D)]
  return [("qkv", D, Q + 2 * KV), ("o", Q, D), ("gu", D, 2 * F),
          ("down", F, D)]


def _measure(variant: str, sizes, layers: int, per_round: int,
             max_rounds: int) -> dict:
  """ms and GB/s of the 30-layer stack at each M for one dot form."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from seqdec import host_profile  # pylint: disable=g-import-not-at-top
  from seqdec.kernels import packed_matmul  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  wdtype = jnp.bfloat16 if variant == "bf16" else jnp.float32
  transposed = variant in ("wt", "left")
  weights = []
  for _ in range(layers):
    layer = {}
    for name, din, dout in _shapes(variant):
      w = (rng.standard_normal((din, dout), np.float32) / np.sqrt(din))
      layer[name] = jnp.asarray(w.T if transposed else w, wdtype)
      if variant == "packed":
        layer[name] = packed_matmul.PackedWeight.from_matrix(layer[name])
    weights.append(layer)
  if variant == "packed":
    packed_matmul.ensure_registered()
  nbytes = sum(x.nbytes for x in jax.tree.leaves(weights))

  def mm(x, w):
    if variant == "wt":
      return jnp.einsum("mi,oi->mo", x, w)
    if variant == "left":
      return (w @ x.T).T
    if variant == "bf16":
      return jnp.dot(x.astype(jnp.bfloat16), w,
                     preferred_element_type=jnp.float32)
    if variant == "packed":
      return w.matmul(x)
    return x @ w

  def stack(weights, y):
    for w in weights:
      # Every output column feeds y (q + [k, v, k]), so that XLA can drop
      # no part of a matmul as dead code.
      if variant == "split":
        q, k, v = mm(y, w["q"]), mm(y, w["k"]), mm(y, w["v"])
        y = y + mm(q + jnp.concatenate([k, v, k], -1), w["o"])
        y = y + mm(mm(y, w["gate"]) * mm(y, w["up"]), w["down"])
      else:
        qkv = mm(y, w["qkv"])
        k, v = qkv[:, Q:Q + KV], qkv[:, Q + KV:]
        y = y + mm(qkv[:, :Q] + jnp.concatenate([k, v, k], -1), w["o"])
        gu = mm(y, w["gu"])
        y = y + mm(gu[:, :F] * gu[:, F:], w["down"])
    return y

  run = jax.jit(stack)
  out = {"weight_bytes": nbytes, "points": {}}
  for m in sizes:
    x = jnp.asarray(rng.standard_normal((m, D), np.float32) * 0.1)
    jax.block_until_ready(run(weights, x))          # compile
    try:
      ms, info = host_profile.quiet_median(
          lambda: jax.block_until_ready(run(weights, x)),
          per_round=per_round, max_rounds=max_rounds)
    except host_profile.ProfileError as e:
      out["points"][m] = {"error": str(e)}
      continue
    out["points"][m] = {"ms": ms, "gb_per_s": nbytes / ms / 1e6,
                        "load": info.get("load")}
  return out


def child() -> None:
  sizes = [int(s) for s in FLAGS.sizes]
  result = {}
  for variant in FLAGS.variants:
    result[variant] = _measure(variant, sizes, FLAGS.layers, FLAGS.per_round,
                               FLAGS.max_rounds)
  print("RESULT " + json.dumps(result))


def _table(runs: list[dict], sizes) -> str:
  lines = ["ms per 30-layer stack of SmolLM2-135M's weight matmuls (effective "
           "GB/s of weights read); ratio = ms(M) / ms(1) of the same row.", "",
           "| XLA_FLAGS | variant | " + " | ".join(f"M={m}" for m in sizes)
           + f" | ms(M={sizes[-2]})/ms(1) |",
           "|---|---|" + "---|" * (len(sizes) + 1)]
  for run in runs:
    if "error" in run:
      lines.append(f"| `{run['flags'] or 'default'}` | - | failed: "
                   f"{run['error'][:120]} |" + " |" * len(sizes))
      continue
    for variant, res in run["result"].items():
      cells, base = [], res["points"].get(str(sizes[0]), {}).get("ms")
      for m in sizes:
        p = res["points"].get(str(m), {})
        cells.append(f"{p['ms']:.1f} ({p['gb_per_s']:.0f})" if "ms" in p
                     else "unstable")
      last = res["points"].get(str(sizes[-2]), {}).get("ms")
      ratio = f"{last / base:.2f}" if base and last else "-"
      lines.append(f"| `{run['flags'] or 'default'}` | {variant} | "
                   + " | ".join(cells) + f" | {ratio} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if FLAGS.child:
    child()
    return
  from seqdec import host_profile  # pylint: disable=g-import-not-at-top
  sizes = [int(s) for s in FLAGS.sizes]
  runs = []
  for flag_set in FLAGS.flag_sets:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flag_set)
    cmd = [sys.executable, os.path.abspath(__file__), "--child",
           f"--sizes={','.join(FLAGS.sizes)}",
           f"--variants={','.join(FLAGS.variants)}",
           f"--layers={FLAGS.layers}", f"--per_round={FLAGS.per_round}",
           f"--max_rounds={FLAGS.max_rounds}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
      run = {"flags": flag_set, "error": done.stderr.strip()[-400:]}
    else:
      run = {"flags": flag_set, "result": json.loads(lines[-1][7:]),
             "seconds": time.perf_counter() - t0}
    runs.append(run)
    print(json.dumps(run), flush=True)
  record = {"host": host_profile.host_info(), "sizes": sizes, "runs": runs,
            "command": " ".join(sys.argv)}
  table = _table(runs, sizes)
  print(table)
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(record, f, indent=1)
    with open(os.path.splitext(FLAGS.output)[0] + ".md", "w") as f:
      f.write(f"Host: {record['host'].get('cpu_model')}, "
              f"{record['host'].get('cores')} cores. Command: "
              f"`{record['command']}`\n\n" + table)


if __name__ == "__main__":
  app.run(main)
