"""A recurrent draft head (ReDrafter) for a target, trained on the same
cached features as EAGLE, Medusa and Hydra.

Launch:
  python launch/train_drafter.py --config=configs/drafters/redrafter.py \\
      --workdir=$HOME/.cache/seqdec/train/redrafter_smollm2
  python launch/train_drafter.py --config=configs/drafters/redrafter.py:runlocal \\
      --workdir=/tmp/redrafter_smoke

Arguments after the colon: those of configs/drafters/medusa.py but
`own_heads` (the head shares the target's frozen LM head), plus
`num_layers` (residual blocks on [f ; s]). `num_heads` is the depth its
teacher-forced loss trains (`seqdec.models.redrafter`); it drafts any
depth, and beam trees (`redrafter/beam4x4`) as well as static and dynamic
ones.
"""

import importlib.util
import os


def get_config(arg=None):
  spec = importlib.util.spec_from_file_location(
      "medusa_config", os.path.join(os.path.dirname(__file__), "medusa.py"))
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  c = base.get_config(arg, dict(num_layers=1))
  if c.drafter.own_heads:
    from seqdec.errors import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError("the recurrent drafter shares the target's LM head "
                      "(own_heads is a Medusa option)")
  c.drafter.kind = "redrafter"
  return c
