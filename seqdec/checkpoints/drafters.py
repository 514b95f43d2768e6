"""Trained drafter checkpoints: safetensors weights + drafter.json.

A drafter directory holds

    drafter.safetensors   the network's parameters by flat NNX path
                          ('layers.0.attn.qkv_proj', ...), stored in
                          `dtype` (bfloat16 halves a shipped file), and
                          for a trimmed head 'vocab.keep_ids' (int32 [M])
    drafter.json          kind ('eagle'), the target's fingerprint
                          (`seqdec.checkpoints.fingerprint`: a hash of its
                          weights, since e.g. SmolLM2 base and Instruct share
                          every shape), hidden size, vocabulary, the network
                          config, and free-form provenance (command, data)

`load` refuses a file for another target (fingerprint, hidden size or
vocabulary), a missing or corrupt file, naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqdec.checkpoints.fingerprint import fingerprint
from seqdec.errors import UserError
from seqdec.jsonl import write_text_atomic
from seqdec.models import eagle
from seqdec.models import hydra
from seqdec.models import medusa
from seqdec.models import redrafter

WEIGHTS, META = "drafter.safetensors", "drafter.json"
KINDS = ("eagle", "medusa", "hydra", "redrafter")
# The heads' (config, module) by kind; 'eagle' is built from the target's.
_HEADS = {"medusa": (medusa.MedusaConfig, medusa.MedusaHeads),
          "hydra": (hydra.HydraConfig, hydra.HydraHeads),
          "redrafter": (redrafter.ReDrafterConfig, redrafter.ReDrafterHead)}


class DrafterCheckpointError(UserError):
  """A drafter checkpoint is missing, corrupt or for another target."""


def _flat(state) -> dict[str, Any]:
  return {".".join(str(k) for k in path): v.get_value()
          for path, v in nnx.to_flat_state(state)}


KEEP_IDS = "vocab.keep_ids"


def save(path: str, net, target, *, dtype: str = "bfloat16",
         keep_ids=None, target_fingerprint: Optional[str] = None,
         **provenance) -> str:
  """Writes `net` (an `EagleNet` or `MedusaHeads` for `target`; `keep_ids`
  its trimmed head's vocabulary or None) to directory `path`."""
  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file
  # pylint: enable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  params = nnx.state(net, nnx.Param)
  tensors = {k: np.asarray(jnp.asarray(v, dtype).astype(jnp.float32)
                           if dtype == "bfloat16" else jnp.asarray(v, dtype))
             for k, v in _flat(params).items()}
  if dtype == "bfloat16":   # safetensors.numpy has no bf16: store the bits
    tensors = {k: v.astype(np.float32).view(np.uint32).__rshift__(16)
               .astype(np.uint16) for k, v in tensors.items()}
  num_params = int(sum(np.size(v) for v in tensors.values()))
  if keep_ids is not None:
    tensors[KEEP_IDS] = np.asarray(keep_ids, np.int32)
  tmp = os.path.join(path, WEIGHTS + ".tmp")
  save_file(tensors, tmp)
  os.replace(tmp, os.path.join(path, WEIGHTS))
  kind = kind_of(net)
  meta = dict(kind=kind, dtype=dtype,
              target_fingerprint=target_fingerprint or fingerprint(target),
              hidden_size=target.config.hidden_size,
              vocab_size=target.config.vocab_size,
              net_config=dataclasses.asdict(net.config),
              taps=list(getattr(net, "taps", ())),
              num_params=num_params,
              vocab_kept=None if keep_ids is None else int(len(keep_ids)),
              provenance=provenance)
  write_text_atomic(os.path.join(path, META),
                    json.dumps(meta, indent=1, sort_keys=True, default=str))
  return path


def read_meta(path: str) -> dict:
  meta_path = os.path.join(path, META)
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise DrafterCheckpointError(
        f"no drafter checkpoint at {path!r} (missing {META})") from None
  except (OSError, ValueError) as e:
    raise DrafterCheckpointError(f"corrupt {meta_path!r}: {e}") from None
  if meta.get("kind") not in KINDS:
    raise DrafterCheckpointError(f"{meta_path!r}: unknown drafter kind "
                                 f"{meta.get('kind')!r}; known: {KINDS}")
  return meta


def kind_of(net) -> str:
  """The `KINDS` entry of the network's type."""
  for kind, (_, module) in _HEADS.items():
    if isinstance(net, module):
      return kind
  return "eagle"


def _abstract(meta: dict, target, path: str):
  """`(config, constructor)` of the stored network, for `target`."""
  c = target.config
  if meta["kind"] == "eagle":
    config = eagle.eagle_config(c).replace(dtype=c.dtype,
                                           param_dtype=c.param_dtype)
    try:
      taps = eagle.check_taps(meta.get("taps") or (),
                              getattr(c, "num_layers", 0))
    except (TypeError, ValueError) as e:
      raise DrafterCheckpointError(f"{path!r}: bad feature taps: {e}"
                                   ) from None
    return config, lambda: eagle.EagleNet(config, rngs=None, taps=taps)
  config_cls, module = _HEADS[meta["kind"]]
  try:
    config = config_cls(**dict(meta["net_config"], dtype=c.dtype,
                               param_dtype=c.param_dtype))
  except (TypeError, KeyError) as e:
    raise DrafterCheckpointError(f"{path!r}: bad {meta['kind']} config: {e}"
                                 ) from None
  if getattr(config, "prefix_attention", False):     # Hydra++
    block = hydra.prefix_config(c)
    return config, lambda: module(config, rngs=None, block_config=block)
  return config, lambda: module(config, rngs=None)


def load(path: str, target, *, check_fingerprint: bool = True
         ) -> tuple[Any, Optional[np.ndarray]]:
  """`(network, keep_ids or None)` stored at `path`, for `target` (checked):
  an `EagleNet` or `MedusaHeads` by the file's kind.

  Raises:
    DrafterCheckpointError: missing/corrupt files, or a checkpoint trained
      for another target (hidden size, vocabulary or weights fingerprint).
  """
  # pylint: disable=g-import-not-at-top
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  # pylint: enable=g-import-not-at-top
  meta = read_meta(path)
  c = target.config
  for key, have in (("hidden_size", c.hidden_size),
                    ("vocab_size", c.vocab_size)):
    if meta.get(key) != have:
      raise DrafterCheckpointError(
          f"drafter {path!r} was trained for a target with {key}="
          f"{meta.get(key)}, this target has {have}")
  if check_fingerprint and meta.get("target_fingerprint") != fingerprint(
      target):
    raise DrafterCheckpointError(
        f"drafter {path!r} was trained for another target (weights "
        f"fingerprint {str(meta.get('target_fingerprint'))[:16]}... differs "
        f"from this target's); retrain it for this model")
  weights = os.path.join(path, WEIGHTS)
  try:
    tensors = load_file(weights)
  except FileNotFoundError:
    raise DrafterCheckpointError(f"missing {weights!r}") from None
  except (SafetensorError, OSError, ValueError) as e:
    raise DrafterCheckpointError(f"corrupt {weights!r}: {e}") from None
  _, build = _abstract(meta, target, path)
  abstract = nnx.eval_shape(build)
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  keep_ids = tensors.pop(KEEP_IDS, None)
  want = _flat(params)
  if sorted(want) != sorted(tensors):
    raise DrafterCheckpointError(
        f"{weights!r} holds tensors {sorted(set(tensors) ^ set(want))[:4]} "
        f"that do not match a {meta['kind']} drafter for this target")
  flat = []
  for p, v in nnx.to_flat_state(params):
    key = ".".join(str(k) for k in p)
    x = tensors[key]
    if meta.get("dtype") == "bfloat16":
      x = (x.astype(np.uint32) << 16).view(np.float32)
    if x.shape != v.get_value().shape:
      raise DrafterCheckpointError(f"{weights!r}: {key} has shape {x.shape}, "
                                   f"expected {v.get_value().shape}")
    flat.append((p, v.replace(jnp.asarray(x, v.get_value().dtype))))
  rest = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])()
  return nnx.merge(graphdef, nnx.from_flat_state(flat), rest), keep_ids


SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "shipped")


def shipped() -> list[str]:
  """The drafter directories shipped with seqdec (`SHIPPED_DIR/*`)."""
  if not os.path.isdir(SHIPPED_DIR):
    return []
  return sorted(os.path.join(SHIPPED_DIR, d) for d in os.listdir(SHIPPED_DIR)
                if os.path.isfile(os.path.join(SHIPPED_DIR, d, META)))


def load_for(target, checkpoint: str = "", kind: str = "eagle"
             ) -> tuple[Any, Optional[np.ndarray]]:
  """`load(checkpoint, target)`, or with checkpoint '' the shipped drafter
  of this `kind` whose target fingerprint is this target's.

  Raises:
    DrafterCheckpointError: no shipped drafter for this target (how to train
      one), or `load`'s errors.
  """
  if checkpoint:
    net, keep_ids = load(os.path.expanduser(checkpoint), target)
    got = kind_of(net)
    if got != kind:
      raise DrafterCheckpointError(f"{checkpoint!r} holds a {got} drafter, "
                                   f"not {kind}")
    return net, keep_ids
  mine = fingerprint(target)
  for path in shipped():
    meta = read_meta(path)
    if meta.get("target_fingerprint") == mine and meta["kind"] == kind:
      return load(path, target, check_fingerprint=False)
  raise DrafterCheckpointError(
      f"no {kind} drafter is shipped for this target (its weights match none "
      f"of {[os.path.basename(p) for p in shipped()]}); train one with "
      "launch/make_drafter_data.py and launch/train_drafter.py, then pass "
      f"{kind}@checkpoint=<workdir>/drafter")
