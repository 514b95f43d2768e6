r"""Tree verification through a Mamba-2 state (issue 17, item 3): STree's
masked pass against the alternatives, on this host.

One Mamba-2 SSD layer at Mamba2-130M's shapes (H = 24 heads of P = 64,
state N = 128, one B/C group), batch 1, verifying a token tree of n nodes,
depth d and l leaves from the committed state h0, four ways:

    stree   `ssd.ssd_masked`: every node's output from h0 in one pass, the
            decay mask summed along root paths; plus `ssd.ssd_replay` of
            the accepted path (d + 1 tokens) to commit. No per-node state.
    naive   `ssd.ssd_tree_states`: each node's state from its parent's,
            n states of H P N kept (the test oracle).
    paths   every root-to-leaf path re-run as its own sequence (l rows of
            d + 1 tokens, `ssd.ssd_chunked`): what a sequence-only
            implementation does, recomputing shared prefixes.
    chain   one path of d + 1 tokens (chain-only verification: the cost
            floor of a tree of this depth, with one candidate per level).

Reported per tree: median ms (quiet-machine protocol,
`host_profile.quiet_median`) and the bytes of state-sized intermediates
each method materialises (n H P N, l H P N, ... in float32).

    .venv/bin/python launch/bench_stree.py \
        --output=benchmarks/results/stree.json
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_list("trees", ["chain4", "chain8", "kary2x2", "kary2x2x2",
                            "kary4x2x2", "kary4x4x2", "kary2x2x2x2x2"],
                  "Tree specs (seqdec.decoding.tree_specs).")
flags.DEFINE_integer("heads", 24, "SSM heads H.")
flags.DEFINE_integer("head_dim", 64, "Head size P.")
flags.DEFINE_integer("state", 128, "State size N.")
flags.DEFINE_string("output", None, "JSON path (stdout always).")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from seqdec import host_profile  # pylint: disable=g-import-not-at-top
  from seqdec.decoding import tree_specs  # pylint: disable=g-import-not-at-top
  from seqdec.kernels.tree_mask import ancestor_mask  # pylint: disable=g-import-not-at-top
  from seqdec.models import ssd  # pylint: disable=g-import-not-at-top

  h, p, n_s = FLAGS.heads, FLAGS.head_dim, FLAGS.state
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  A = -jnp.asarray(rng.uniform(0.5, 4, (h,)), jnp.float32)
  h0 = f(1, h, p, n_s)
  state_bytes = h * p * n_s * 4

  masked = jax.jit(lambda x, dt, B, C, mask, idx, k: (
      ssd.ssd_masked(x, dt, A, B, C, h0, mask),
      ssd.ssd_replay(jnp.take_along_axis(x, idx[..., None, None], 1),
                     jnp.take_along_axis(dt, idx[..., None], 1), A,
                     jnp.take_along_axis(B, idx[..., None, None], 1), h0, k)))
  naive = jax.jit(lambda x, dt, B, C, parents: ssd.ssd_tree_states(
      x, dt, A, B, C, h0, parents))
  def run_paths(x, dt, B, C, rows):
    """Each row of `rows` `[l, d+1]` (node indices) as its own sequence."""
    x, dt, B, C = (a[0][rows] for a in (x, dt, B, C))
    return ssd.ssd_chunked(
        x, dt, A, B, C, jnp.broadcast_to(h0, (x.shape[0],) + h0.shape[1:]),
        chunk=x.shape[1], impl="sequential")
  paths = jax.jit(run_paths)
  rows = []
  for spec in FLAGS.trees:
    shape = tree_specs.parse(spec)
    parents = np.asarray(shape.parents)
    n, d = shape.num_nodes, shape.max_depth
    is_parent = np.zeros(n, bool)
    is_parent[parents[parents >= 0]] = True
    leaves = np.flatnonzero(~is_parent)
    x, dt = f(1, n, h, p), jnp.asarray(rng.uniform(0.05, 0.5, (1, n, h)),
                                       jnp.float32)
    B, C = f(1, n, 1, n_s), f(1, n, 1, n_s)
    mask = ancestor_mask(jnp.asarray(parents)[None])
    # The accepted path: root to the first leaf.
    path = [int(leaves[0])]
    while parents[path[-1]] >= 0:
      path.append(int(parents[path[-1]]))
    path = path[::-1] + [0] * (d + 1 - len(path))
    idx, k = jnp.asarray([path]), jnp.asarray([len(path)])
    leaf_paths = []
    for leaf in leaves:
      pth = [int(leaf)]
      while parents[pth[-1]] >= 0:
        pth.append(int(parents[pth[-1]]))
      pth = pth[::-1]
      leaf_paths.append(pth + [pth[-1]] * (d + 1 - len(pth)))
    lp = jnp.asarray(leaf_paths)                               # [l, d+1]
    # A chain of d + 1 tokens (the first d + 1 nodes stand in for it).
    chain = jnp.asarray([[min(j, n - 1) for j in range(d + 1)]])

    calls = {
        "stree": lambda: jax.block_until_ready(
            masked(x, dt, B, C, mask, idx, k)),
        "naive": lambda: jax.block_until_ready(
            naive(x, dt, B, C, jnp.asarray(parents)[None])),
        "paths": lambda: jax.block_until_ready(paths(x, dt, B, C, lp)),
        "chain": lambda: jax.block_until_ready(paths(x, dt, B, C, chain)),
    }
    row = dict(tree=spec, nodes=n, depth=d, leaves=int(len(leaves)))
    for name, call in calls.items():
      call()                                             # compile
      ms, info = host_profile.quiet_median(call, per_round=20, max_rounds=20,
                                           spread=0.1)
      row[f"{name}_ms"] = round(ms, 4)
    row["state_bytes"] = dict(
        stree=2 * state_bytes,                 # h0 and the committed state
        naive=(n + 1) * state_bytes,
        paths=2 * len(leaves) * state_bytes,   # chunk states + final states
        chain=2 * state_bytes)
    row["stree_score_bytes"] = n * n * h * 4 * 2     # decay mask + scores
    rows.append(row)
    print(json.dumps(row), flush=True)
  out = dict(host=host_profile.host_info(), shapes=dict(heads=h, head_dim=p,
                                                       state=n_s),
             rows=rows)
  if FLAGS.output:
    with open(FLAGS.output, "w") as fh:
      json.dump(out, fh, indent=1)


if __name__ == "__main__":
  app.run(main)
