"""Every config file loads, locks, and builds its model.

Full-size models are built with `jax.eval_shape` (no weights); `runlocal`
arms build their tiny model for real.
"""

import glob
import os

import jax
import pytest
from flax import nnx

from seqdec import config_utils
from seqdec.checkpoints import registry
from seqdec.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3]
                 for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith("_")
                 # training configs: test_train.py, test_hybrid.py
                 and os.path.basename(p) not in ("pararnn_lm.py",
                                                 "ssm_lm.py"))


def test_there_are_configs():
  assert "decode" in CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_config_default_and_runlocal(name):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  assert "launch/" in config_utils.module_doc(path)  # its command
  full = config_utils.load_config(path)
  full.lock()
  with pytest.raises(AttributeError):
    full.no_such_key = 1
  model = registry.abstract_model(full.model)
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) > 0
  local = config_utils.load_config(path + ":runlocal")
  local.lock()
  tiny, tok = registry.load_pretrained(local.model)
  assert tiny.config.vocab_size >= tok.vocab_size


@pytest.mark.parametrize("arg,error", [
    ("nosuchkey=1", "unknown config argument"),
    ("runlocal=maybe", "expects a bool"),
    ("model", "needs a value"),
])
def test_config_arguments_are_strict(arg, error):
  with pytest.raises(ConfigError, match=error):
    config_utils.load_config(os.path.join(ROOT, "configs", "decode.py:") + arg)
