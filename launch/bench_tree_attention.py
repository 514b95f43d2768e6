"""Tree attention: the paper cost model, and interpret-mode agreement on CPU.

  python launch/bench_tree_attention.py                # the issue's setting
  python launch/bench_tree_attention.py --fill=0.5 --n=32

Prints JSON. `model` is the byte/FLOP count of one verify call (one layer)
for the kernel and two dense-mask implementations, with predicted times on
TPU v5e and H100 = max(bytes / bandwidth, FLOPs / peak): predictions, as no
accelerator is available (see `seqdec.kernels.tree_attention`). `check` runs
both kernel bodies in interpret mode at a reduced size against the dense
reference: agreement only; interpret-mode timings say nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

# (HBM bytes/s, dense bf16 FLOP/s), from the vendors' data sheets.
DEVICES = {"tpu_v5e": (819e9, 197e12), "h100_sxm": (3.35e12, 989e12)}


def cost_model(b, h, hkv, d, s, n, fill=1.0, itemsize=2):
  """Bytes moved and FLOPs of one verify call, one layer.

  fill: mean committed length / S (the kernel skips blocks past a row's
  length; the dense forms pay for all S).
  """
  g, live = h // hkv, fill * s
  kv = 2 * b * hkv * live * d * itemsize
  q = out = b * h * n * d * itemsize
  tree_kv = 2 * b * hkv * n * d * itemsize
  words = b * n * math.ceil(n / 32) * 4 * g
  flops_kernel = 4 * b * h * n * (live + n) * d
  flops_dense = 4 * b * h * n * (s + n) * d
  scores = b * h * n * s * 4
  forms = {
      "kernel": (kv + q + tree_kv + words + 12 * b + out, flops_kernel),
      "dense_bias_flash": (2 * b * hkv * s * d * itemsize + q + tree_kv
                           + b * h * n * (s + n) * itemsize + out,
                           flops_dense),
      "dense_unfused_xla": (2 * b * hkv * s * d * itemsize + q + tree_kv
                            + 4 * scores + b * g * n * s + out, flops_dense),
  }
  result = {}
  for name, (nbytes, flops) in forms.items():
    pred = {dev: round(1e6 * max(nbytes / bw, flops / peak), 1)
            for dev, (bw, peak) in DEVICES.items()}
    result[name] = dict(bytes=int(nbytes), gflop=round(flops / 1e9, 2),
                        flop_per_byte=round(flops / nbytes, 1),
                        predicted_us=pred)
  return result


def check(seed=0):
  """Max |kernel - reference| for both bodies at B=2, H=8, K=2, N=24."""
  import jax.numpy as jnp
  from seqdec.kernels import tree_attention as ta
  from seqdec.kernels import tree_mask as tm
  rng = np.random.default_rng(seed)
  b, h, k, n, s, d = 2, 8, 2, 24, 256, 32
  parents = np.array([[-1] + [int(rng.integers(0, i)) for i in range(1, n)]
                      for _ in range(b)], np.int32)
  words, depth = tm.tree_mask(parents)
  x = [jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in
       [(b, h, n, d), (b, k, s, d), (b, k, s, d), (b, k, n, d), (b, k, n, d)]]
  lengths = jnp.asarray([100, s], jnp.int32)
  args = (x[0], x[1], x[2], lengths, x[3], x[4], words)
  ref = ta.tree_attention_reference(*args)
  return {p: float(jnp.abs(ta.tree_attention(*args, platform=p,
                                             block_kv=64) - ref).max())
          for p in ("gpu", "tpu")}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for name, default in (("b", 8), ("h", 32), ("hkv", 8), ("d", 128),
                        ("s", 4096), ("n", 64)):
    ap.add_argument(f"--{name}", type=int, default=default)
  ap.add_argument("--fill", type=float, default=1.0)
  ap.add_argument("--no_check", action="store_true")
  a = ap.parse_args()
  out = {"setting": vars(a), "devices": DEVICES,
         "model": cost_model(a.b, a.h, a.hkv, a.d, a.s, a.n, a.fill),
         "note": "predictions; no accelerator was available"}
  if not a.no_check:
    out["check_max_abs_err"] = check()
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
