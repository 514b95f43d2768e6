"""Shared helpers for `get_config(arg)` files.

`parse_arg("model=tiny,runlocal")` reads the string after the colon in
`--config=configs/decode.py:model=tiny,runlocal`: comma-separated `key=value`
pairs (a bare `key` means `key=True`), typed from the defaults and strict:
an unknown key or a value that does not parse as the default's type is an
error.
"""

from __future__ import annotations

import ml_collections


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
        raise ValueError(f"unknown config argument {key!r}; known: "
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
          raise ValueError(f"config argument {key!r} expects a bool, got "
                           f"{value!r}")
      elif not has_value:
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      elif isinstance(default, (int, float)):
        kind = type(default)
        try:
          out[key] = kind(value)
        except ValueError:
          raise ValueError(f"config argument {key!r} expects "
                           f"{'an' if kind is int else 'a'} {kind.__name__}, "
                           f"got {value!r}") from None
      else:
        out[key] = value
  return ml_collections.ConfigDict(out)
