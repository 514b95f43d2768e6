"""Helpers for the `get_config(arg)` files under `configs/` (which import
only from `seqdec`, never from each other), and for loading them by path.

`parse_arg("model=tiny,runlocal")` reads the string after the colon in
`--config=configs/decode.py:model=tiny,runlocal`: comma-separated `key=value`
pairs (a bare `key` means `key=True`), typed from the defaults and strict:
an unknown key or a value that does not parse as the default's type is an
error.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections

from seqdec.errors import ConfigError


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `key=value,...` against typed defaults."""
  out = dict(defaults)
  if arg:
    for item in arg.split(","):
      item = item.strip()
      if not item:
        continue
      key, has_value, value = item.partition("=")
      if key not in defaults:
        raise ConfigError(f"unknown config argument {key!r}; known: "
                         f"{sorted(defaults)}")
      default = defaults[key]
      if isinstance(default, bool):
        if not has_value:
          out[key] = True
        elif value.lower() in ("true", "1", "yes"):
          out[key] = True
        elif value.lower() in ("false", "0", "no"):
          out[key] = False
        else:
          raise ConfigError(f"config argument {key!r} expects a bool, got "
                           f"{value!r}")
      elif not has_value:
        raise ConfigError(f"config argument {key!r} needs a value ({key}=...)")
      elif isinstance(default, (int, float)):
        kind = type(default)
        try:
          out[key] = kind(value)
        except ValueError:
          raise ConfigError(f"config argument {key!r} expects "
                           f"{'an' if kind is int else 'a'} {kind.__name__}, "
                           f"got {value!r}") from None
      else:
        out[key] = value
  return ml_collections.ConfigDict(out)


def load_config(path_and_arg: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file, as `--config=path[:arg]` gives it
  (for notebooks and tests; the launch scripts use absl's config_flags)."""
  path, _, arg = path_and_arg.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  name = "seqdec_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def module_doc(path: str) -> Any:
  """The docstring of a config file (its launch command lives there)."""
  name = "seqdec_config_doc_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.__doc__


def decode_config(model: str = "smollm2-135m-instruct",
                  runlocal: bool = False) -> ml_collections.ConfigDict:
  """The settings every decoding config shares (model, sampling, prompts).

  `runlocal` swaps in the tiny random model (byte-level tokenizer) and a
  short budget, for a CPU smoke run.
  """
  c = ml_collections.ConfigDict()
  c.model = "tiny" if runlocal else model
  c.dtype = "float32"          # bfloat16 on accelerators; f32 on CPU
  # Precision policy of the target (seqdec.models.config.PRECISIONS): f32,
  # f32_packed (f32, weight matmuls by the packed CPU kernel: cheap
  # verifies), bf16_weights (bf16 weights, bf16 x bf16 -> f32 matmuls, the
  # rest f32), bf16_packed (bf16_weights' function on the packed kernel:
  # AMX tiles where the host has them), or auto (the cheapest on this
  # host's profile, launch/profile_host.py).
  c.precision = "f32"
  c.max_new_tokens = 16 if runlocal else 128
  c.temperature = 0.0          # 0 = greedy
  c.top_k = 0                  # 0 = off
  c.top_p = 1.0                # 1 = off
  c.seed = 0
  c.chat = True                # render prompts with the chat template
  c.system_prompt = ""         # prepended as a system message when chatting
  c.max_batch = 8
  # Device mesh (seqdec.parallel.sharding): '' one device; 'auto' every
  # device on the data axis; 'data:2,model:4' (product = device count).
  c.mesh = ""
  c.stream = True              # stream text when decoding a single prompt
  c.default_prompt = ("Explain in three sentences why the sky is blue, for a "
                      "ten-year-old.")
  return c
