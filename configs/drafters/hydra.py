"""Hydra heads (sequentially dependent Medusa heads) for a target, trained
on the same cached features as EAGLE and Medusa.

Launch:
  python launch/train_drafter.py --config=configs/drafters/hydra.py \\
      --workdir=$HOME/.cache/seqdec/train/hydra_smollm2
  python launch/train_drafter.py --config=configs/drafters/hydra.py:runlocal \\
      --workdir=/tmp/hydra_smoke

Arguments after the colon: those of configs/drafters/medusa.py but
`own_heads` (Hydra's heads share the target's frozen LM head), plus
`prefix_attention` (Hydra++: a decoder layer over the context's features
feeds the heads, `seqdec.models.hydra`).
"""

import importlib.util
import os


def get_config(arg=None):
  spec = importlib.util.spec_from_file_location(
      "medusa_config", os.path.join(os.path.dirname(__file__), "medusa.py"))
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  c = base.get_config(arg, dict(prefix_attention=False))
  if c.drafter.own_heads:
    from seqdec.errors import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError("hydra heads share the target's LM head (own_heads "
                      "is a Medusa option)")
  c.drafter.kind = "hydra"
  return c
