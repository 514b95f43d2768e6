r"""How accurate this host's float32 matmuls are, under XLA:CPU's default
kernels and with its YNNPACK fusions off (CONTRIBUTING.md, "Known
deviations"): SmolLM2's shapes, each product against a float64 reference.

For C = A B with A [M, K], B [K, N] drawn with SmolLM2-like scales, the
error reported is the largest elementwise

    |C_f32 - C_f64| / (|A| |B|)_f64

(the rounding error relative to the product's condition, so that
cancellation does not inflate it; a correctly rounded float32 dot of length
K is below about K * 2^-24 and a pairwise or blocked sum much lower).
XLA's figure is measured in a subprocess per flag set (XLA reads XLA_FLAGS
once, at start, and a persistent compilation cache is left off); numpy's
float32 matmul (its BLAS) is printed beside it. One JSON document on
stdout:

    .venv/bin/python launch/check_f32_dots.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app
from absl import flags

_FLAG_SETS = flags.DEFINE_multi_string(
    "flag_sets", ["", "--xla_cpu_experimental_ynn_fusion_type="],
    "XLA_FLAGS values to compare ('' is XLA's default).")
_SHAPES = flags.DEFINE_list(
    "shapes", ["43x576x1536", "1x576x1536", "43x1536x576", "43x576x49152"],
    "MxKxN products (SmolLM2: gate|up, the single-token gate|up, down, "
    "the LM head over a 43-token prompt).")

_CHILD = r"""
import json, sys
import numpy as np
import jax, jax.numpy as jnp
shapes = [tuple(map(int, s.split("x"))) for s in sys.argv[1].split(",")]
rng = np.random.default_rng(0)
dot = jax.jit(jnp.dot)
out = {}
for m, k, n in shapes:
  a = (rng.standard_normal((m, k)) * 30).astype(np.float32)
  b = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  ref, cond = a64 @ b64, np.abs(a64) @ np.abs(b64)
  err = lambda c: float((np.abs(np.asarray(c, np.float64) - ref) / cond).max())
  out[f"{m}x{k}x{n}"] = {"xla": err(dot(a, b)), "numpy": err(a @ b)}
print(json.dumps(out))
"""


def measure(xla_flags: str, shapes: list[str]) -> dict:
  """`{shape: {'xla': err, 'numpy': err}}` from a fresh process run with
  XLA_FLAGS = `xla_flags` and no persistent compilation cache."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
  env.update(XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", _CHILD, ",".join(shapes)],
                        env=env, capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"XLA_FLAGS={xla_flags!r}: {done.stderr[-2000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  # pylint: disable-next=g-import-not-at-top
  from seqdec import host_profile
  print(json.dumps({
      "host": host_profile.host_info(),
      "command": "python launch/check_f32_dots.py " + " ".join(sys.argv[1:]),
      "relative_error": {f or "(default)": measure(f, _SHAPES.value)
                         for f in _FLAG_SETS.value}}, indent=1))


if __name__ == "__main__":
  app.run(main)
