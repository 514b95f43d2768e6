"""Medusa heads for a target, trained on the same cached features as EAGLE.

Launch (build the data first with launch/make_drafter_data.py):
  python launch/train_drafter.py --config=configs/drafters/medusa.py \\
      --workdir=$HOME/.cache/seqdec/train/medusa_smollm2
  python launch/train_drafter.py --config=configs/drafters/medusa.py:runlocal \\
      --workdir=/tmp/medusa_smoke
  python launch/train_drafter.py --config=configs/drafters/medusa.py:own_heads \\
      --workdir=...       # Medusa's own LM head per head (V x D each)

Arguments after the colon: those of configs/drafters/eagle.py, plus
`num_heads` (K, the deepest tree it drafts) and `own_heads`. Loss: Medusa's
decayed sum of per-head cross entropies against the target's distribution
recomputed from the cached features (`seqdec.train.drafter.medusa_loss`).
"""

import ml_collections

from seqdec import config_utils


def get_config(arg=None, drafter_args=None):
  """`drafter_args`: more typed arguments (name -> default) that go to
  `c.drafter` (those of the Hydra and ReDrafter configs built on this)."""
  # pylint: disable=g-import-not-at-top
  import importlib.util
  import os
  # pylint: enable=g-import-not-at-top
  extra = dict(drafter_args or {})
  arg = config_utils.parse_arg(arg, model="smollm2-135m-instruct", data="",
                               runlocal=False, num_heads=4, own_heads=False,
                               **extra)
  spec = importlib.util.spec_from_file_location(
      "eagle_config", os.path.join(os.path.dirname(__file__), "eagle.py"))
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  c = base.get_config(f"model={arg.model},data={arg.data},"
                      f"runlocal={arg.runlocal}")
  c.drafter = ml_collections.ConfigDict(dict(
      kind="medusa", num_heads=arg.num_heads, own_heads=arg.own_heads,
      **{k: arg[k] for k in extra}))
  c.train.w_reg = 0.0
  c.train.w_ce = 1.0
  c.train.feature_noise = 0.0
  c.train.ttt_steps = 1           # EAGLE-3's training-time test: EAGLE only
  c.train.steps = 4 if arg.runlocal else 600
  return c
