"""Hugging Face tensor names -> the NNX `Transformer`, shared by every loader.

Every checkpoint format seqdec reads (HF safetensors, GGUF) is first expressed
as a dict of HF Llama-style tensor names to numpy arrays in HF layout
(`Linear.weight` is `[out, in]`); this module checks it strictly and builds the
model from it without a random initialisation.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqdec.errors import UserError
from seqdec.models.config import TransformerConfig, as_dtype
from seqdec.models.hybrid import HybridConfig, HybridLM
from seqdec.models.transformer import Transformer, inv_freq_array


class CheckpointError(UserError):
  """A checkpoint is missing, corrupt, or does not match the model."""


X64_SWITCH = 'jax.config.update("jax_enable_x64", True)'


def check_dtypes(*names: Optional[str]) -> None:
  """Checks that JAX can build arrays of every dtype a loader was asked for.

  Without `jax_enable_x64`, JAX silently builds float32 arrays where float64
  is requested, so a float64 load would return a float32 model. Loaders call
  this first and refuse instead; they never set the process-wide flag
  themselves (it changes every later computation in the process).

  Args:
    *names: dtype names ('float32', 'bfloat16', 'float16', 'float64') or
      dtypes; None entries are skipped.

  Raises:
    CheckpointError: an unknown dtype name, or a 64-bit dtype while
      `jax_enable_x64` is off (the message names the switch).
  """
  for name in names:
    if name is None:
      continue
    try:
      dtype = as_dtype(name)
    except (ValueError, TypeError) as e:
      raise CheckpointError(f"unknown dtype {name!r}: {e}") from None
    if dtype.itemsize == 8 and not jax.config.read("jax_enable_x64"):
      raise CheckpointError(
          f"dtype {name!r} needs 64-bit JAX types, which are off (JAX would "
          f"silently build a float32 model): call {X64_SWITCH} before "
          f"loading, or start Python with JAX_ENABLE_X64=1")


# A parameter of the model is built from one or more HF tensors:
#   seqdec path -> (HF names, pack(config, *hf_arrays), unpack(config, array)).
# Packing fuses q/k/v into `qkv_proj [D, K, G+2, Dh]` and gate/up into
# `gate_up_proj [D, 2, F]`; Linear weights go from HF's [out, in] to [in, out].
#
# A pack returns `Parts(views, axis)`: the parameter is the concatenation of
# `views` along `axis`, where each view is a transpose / axis-splitting
# reshape / new axis of one HF array -- numpy views, so on memory-mapped
# tensors (`safetensors_io`) nothing is read until `Parts.block` slices them.
# That is how a sharded load reads only each device's block.


@dataclasses.dataclass(frozen=True)
class Parts:
  """A parameter as `concatenate(views, axis)`, still unread."""
  views: tuple
  axis: int

  @property
  def shape(self) -> tuple[int, ...]:
    shape = list(self.views[0].shape)
    shape[self.axis] = sum(v.shape[self.axis] for v in self.views)
    return tuple(shape)

  def block(self, index: tuple = ()) -> np.ndarray:
    """`concatenate(views, axis)[index]`, reading only the block's bytes.

    Args:
      index: a tuple of step-1 slices (what `jax.make_array_from_callback`
        passes), one per leading axis; () is the whole parameter.
    """
    index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
    lo, hi, step = index[self.axis].indices(self.shape[self.axis])
    if step != 1:
      raise ValueError(f"block index {index} has a step")
    out, start = [], 0
    for v in self.views:
      n = v.shape[self.axis]
      a, b = max(lo, start), min(hi, start + n)
      if a < b:
        idx = list(index)
        idx[self.axis] = slice(a - start, b - start)
        out.append(np.asarray(v[tuple(idx)]))
      start += n
    if not out:                                    # an empty block
      idx = list(index)
      idx[self.axis] = slice(0, 0)
      return np.asarray(self.views[0][tuple(idx)])
    return out[0] if len(out) == 1 else np.concatenate(out, self.axis)


def _t(_, w):
  return Parts((w.T,), 0)


def _same(_, w):
  return Parts((w,), 0)


def _untranspose(_, w):
  return w.T


def _unchanged(_, w):
  return w


def _pack_qkv(c: TransformerConfig, q, k, v):
  d, nk, g, dh = c.hidden_size, c.num_kv_heads, c.num_groups, c.head_dim
  return Parts((q.T.reshape(d, nk, g, dh), k.T.reshape(d, nk, 1, dh),
                v.T.reshape(d, nk, 1, dh)), 2)


def _unpack_qkv(c: TransformerConfig, w):
  d, g = c.hidden_size, c.num_groups
  return (w[:, :, :g].reshape(d, -1).T, w[:, :, g].reshape(d, -1).T,
          w[:, :, g + 1].reshape(d, -1).T)


def _pack_qkv_bias(c: TransformerConfig, q, k, v):
  nk, g, dh = c.num_kv_heads, c.num_groups, c.head_dim
  return Parts((q.reshape(nk, g, dh), k.reshape(nk, 1, dh),
                v.reshape(nk, 1, dh)), 1)


def _unpack_qkv_bias(c: TransformerConfig, b):
  g = c.num_groups
  return b[:, :g].reshape(-1), b[:, g].reshape(-1), b[:, g + 1].reshape(-1)


def _pack_gate_up(_, gate, up):
  return Parts((gate.T[:, None], up.T[:, None]), 1)


def _unpack_gate_up(_, w):
  return w[:, 0].T, w[:, 1].T


def _pack_gate_up_bias(_, gate, up):
  return Parts((gate[None], up[None]), 0)


def _unpack_gate_up_bias(_, b):
  return b[0], b[1]


def _hf_shapes(c: TransformerConfig) -> dict[str, tuple[int, ...]]:
  """HF name suffix -> expected shape, for one layer and the top level."""
  d, f, dh = c.hidden_size, c.intermediate_size, c.head_dim
  q, kv = c.num_heads * dh, c.num_kv_heads * dh
  return {
      "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
      "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
      "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
      "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (d,),
      "self_attn.q_norm.weight": (dh,), "self_attn.k_norm.weight": (dh,),
      "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
      "mlp.down_proj.weight": (d, f), "mlp.gate_proj.bias": (f,),
      "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (d,),
      "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
      "pre_feedforward_layernorm.weight": (d,),
      "post_feedforward_layernorm.weight": (d,),
      "model.embed_tokens.weight": (c.vocab_size, d),
      "model.norm.weight": (d,), "lm_head.weight": (c.vocab_size, d),
  }


# Block norms: seqdec name -> HF name, for pre-norm blocks (Llama) and for
# sandwich blocks (Gemma 2/3), where HF's `post_attention_layernorm` is the
# norm on the attention output, not the one before the MLP.
_BLOCK_NORMS = {"input_norm": "input_layernorm",
                "post_attn_norm": "post_attention_layernorm"}
_SANDWICH_NORMS = {"input_norm": "input_layernorm",
                   "attn_out_norm": "post_attention_layernorm",
                   "post_attn_norm": "pre_feedforward_layernorm",
                   "mlp_out_norm": "post_feedforward_layernorm"}


def param_specs(c: TransformerConfig):
  """seqdec path -> (HF names, pack, unpack) for every parameter of `c`."""
  specs = {
      "embed": (["model.embed_tokens.weight"], _same, _unchanged),
      "final_norm.scale": (["model.norm.weight"], _same, _unchanged),
  }
  if not c.tie_embeddings:
    specs["lm_head"] = (["lm_head.weight"], _t, _untranspose)
  for i in range(c.num_layers):
    pre = f"model.layers.{i}."
    attn = [pre + f"self_attn.{x}_proj.weight" for x in "qkv"]
    specs[f"layers.{i}.attn.qkv_proj"] = (attn, _pack_qkv, _unpack_qkv)
    if c.qkv_bias:
      bias = [pre + f"self_attn.{x}_proj.bias" for x in "qkv"]
      specs[f"layers.{i}.attn.qkv_bias"] = (bias, _pack_qkv_bias,
                                            _unpack_qkv_bias)
    specs[f"layers.{i}.attn.o_proj"] = ([pre + "self_attn.o_proj.weight"],
                                        _t, _untranspose)
    if c.o_bias:
      specs[f"layers.{i}.attn.o_bias"] = ([pre + "self_attn.o_proj.bias"],
                                          _same, _unchanged)
    if c.qk_norm:
      for x in "qk":
        specs[f"layers.{i}.attn.{x}_norm.scale"] = (
            [pre + f"self_attn.{x}_norm.weight"], _same, _unchanged)
    specs[f"layers.{i}.mlp.gate_up_proj"] = (
        [pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight"],
        _pack_gate_up, _unpack_gate_up)
    specs[f"layers.{i}.mlp.down_proj"] = ([pre + "mlp.down_proj.weight"],
                                          _t, _untranspose)
    if c.mlp_bias:
      specs[f"layers.{i}.mlp.gate_up_bias"] = (
          [pre + "mlp.gate_proj.bias", pre + "mlp.up_proj.bias"],
          _pack_gate_up_bias, _unpack_gate_up_bias)
      specs[f"layers.{i}.mlp.down_bias"] = ([pre + "mlp.down_proj.bias"],
                                            _same, _unchanged)
    norms = _SANDWICH_NORMS if c.sandwich_norm else _BLOCK_NORMS
    for ours, theirs in norms.items():
      specs[f"layers.{i}.{ours}.scale"] = ([pre + theirs + ".weight"], _same,
                                           _unchanged)
  return specs


# Buffers some exporters save that carry no parameters.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER_RE = re.compile(r"^model\.layers\.\d+\.(.+)$")


def _path_str(path) -> str:
  return ".".join(str(p) for p in path)


@functools.lru_cache(maxsize=8)
def _abstract_split(config: TransformerConfig):
  """(graphdef, abstract state) of a config, computed once per config."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=None)))


def _buffer(x) -> tuple[Parts, np.dtype]:
  x = np.asarray(x)
  return Parts((x,), 0), x.dtype


def _conv_pack(_, w):
  """HF conv1d.weight `[C, 1, K]` -> `conv_w [K, C]`."""
  return Parts((w[:, 0, :].T,), 0)


def _conv_unpack(_, w):
  return w.T[:, None, :]


# A Mamba-2 mixer's tensors: seqdec name -> (HF name, pack, unpack).
_MIXER = {"in_proj": ("in_proj.weight", _t, _untranspose),
          "in_bias": ("in_proj.bias", _same, _unchanged),
          "conv_w": ("conv1d.weight", _conv_pack, _conv_unpack),
          "conv_b": ("conv1d.bias", _same, _unchanged),
          "dt_bias": ("dt_bias", _same, _unchanged),
          "A_log": ("A_log", _same, _unchanged),
          "D": ("D", _same, _unchanged),
          "norm": ("norm.weight", _same, _unchanged),
          "out_proj": ("out_proj.weight", _t, _untranspose),
          "out_bias": ("out_proj.bias", _same, _unchanged)}


def hybrid_param_specs(c: HybridConfig):
  """`(specs, shapes)` of a Mamba-2 / hybrid model: seqdec path -> (HF
  names, pack, unpack), and HF name -> expected shape. Names follow
  `Mamba2ForCausalLM` (prefix 'backbone.', no MLP) or `BambaForCausalLM`
  (prefix 'model.', a SwiGLU MLP after every mixer)."""
  bamba = c.architecture == "BambaForCausalLM"
  top = "model." if bamba else "backbone."
  d, conv, h = c.hidden_size, c.conv_dim, c.num_ssm_heads
  proj = c.d_inner + conv + h
  a = c.attention_config
  attn_shapes = _hf_shapes(a)
  mixer_shapes = {"in_proj.weight": (proj, d), "in_proj.bias": (proj,),
                  "conv1d.weight": (conv, 1, c.conv_kernel),
                  "conv1d.bias": (conv,), "dt_bias": (h,), "A_log": (h,),
                  "D": (h,), "norm.weight": (c.d_inner,),
                  "out_proj.weight": (d, c.d_inner), "out_proj.bias": (d,)}
  specs, shapes = {}, {}

  def add(path, names, pack, unpack, want):
    specs[path] = (names, pack, unpack)
    shapes.update(zip(names, want))

  embed = top + ("embed_tokens.weight" if bamba else "embeddings.weight")
  add("embed", [embed], _same, _unchanged, [(c.vocab_size, d)])
  add("final_norm.scale", [top + ("final_layernorm.weight" if bamba
                                  else "norm_f.weight")],
      _same, _unchanged, [(d,)])
  if not c.tie_embeddings:
    add("lm_head", ["lm_head.weight"], _t, _untranspose, [(c.vocab_size, d)])
  for i, kind in enumerate(c.layer_types):
    pre, ours = f"{top}layers.{i}.", f"layers.{i}."
    add(ours + "input_norm.scale",
        [pre + ("input_layernorm.weight" if bamba else "norm.weight")],
        _same, _unchanged, [(d,)])
    if kind == "mamba2":
      mixer = pre + ("mamba." if bamba else "mixer.")
      for name, (hf, pack, unpack) in _MIXER.items():
        if ((name in ("in_bias", "out_bias") and not c.use_bias)
            or (name == "conv_b" and not c.use_conv_bias)):
          continue
        add(ours + "mixer." + name, [mixer + hf], pack, unpack,
            [mixer_shapes[hf]])
    else:
      qkv = [f"self_attn.{x}_proj.weight" for x in "qkv"]
      add(ours + "attn.qkv_proj", [pre + n for n in qkv], _pack_qkv,
          _unpack_qkv, [attn_shapes[n] for n in qkv])
      add(ours + "attn.o_proj", [pre + "self_attn.o_proj.weight"], _t,
          _untranspose, [attn_shapes["self_attn.o_proj.weight"]])
      if c.attention_bias:
        qkv_b = [f"self_attn.{x}_proj.bias" for x in "qkv"]
        add(ours + "attn.qkv_bias", [pre + n for n in qkv_b],
            _pack_qkv_bias, _unpack_qkv_bias,
            [attn_shapes[n] for n in qkv_b])
        add(ours + "attn.o_bias", [pre + "self_attn.o_proj.bias"], _same,
            _unchanged, [(d,)])
    if c.intermediate_size:
      ff = pre + "feed_forward."
      gu = [ff + "gate_proj.weight", ff + "up_proj.weight"]
      add(ours + "post_norm.scale", [pre + "pre_ff_layernorm.weight"], _same,
          _unchanged, [(d,)])
      add(ours + "mlp.gate_up_proj", gu, _pack_gate_up, _unpack_gate_up,
          [attn_shapes["mlp.gate_proj.weight"]] * 2)
      add(ours + "mlp.down_proj", [ff + "down_proj.weight"], _t,
          _untranspose, [attn_shapes["mlp.down_proj.weight"]])
  return specs, shapes


_HYBRID_LAYER_RE = re.compile(
    r"^(?:model|backbone)\.layers\.(\d+)\.(mamba|mixer|self_attn)\.")


def check_layer_pattern(config: HybridConfig,
                        tensors: Mapping[str, np.ndarray]) -> None:
  """CheckpointError if a layer's tensors are of another mixer kind than
  the config's `layer_types` says (e.g. attention weights where the config
  has a Mamba-2 layer)."""
  found: dict[int, set] = {}
  for name in tensors:
    m = _HYBRID_LAYER_RE.match(name)
    if m:
      kind = "attention" if m.group(2) == "self_attn" else "mamba2"
      found.setdefault(int(m.group(1)), set()).add(kind)
  for i, kinds in sorted(found.items()):
    want = (config.layer_types[i] if i < config.num_layers else None)
    if kinds != {want}:
      raise CheckpointError(
          f"layer {i} holds {' and '.join(sorted(kinds))} weights but the "
          f"config's layer pattern says "
          f"{want or f'there are {config.num_layers} layers'} "
          f"(layer_types {list(config.layer_types)})")


def _pack_config(config) -> TransformerConfig:
  """The `TransformerConfig` the pack/unpack functions read."""
  return (config.attention_config if isinstance(config, HybridConfig)
          else config)


def _layout(config):
  """`(graphdef, abstract state, specs, shape_of(HF name), buffers)` of a
  config: the Llama-family `Transformer` or a `HybridLM`."""
  if isinstance(config, HybridConfig):
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: HybridLM(config, rngs=None)))
    specs, shapes = hybrid_param_specs(config)
    buffers = {"inv_freq": inv_freq_array(config.attention_config)}
    return graphdef, state, specs, shapes.__getitem__, buffers
  graphdef, state = _abstract_split(config)
  suffix_shapes = _hf_shapes(config)

  def shape_of(name):
    m = _LAYER_RE.match(name)
    return suffix_shapes[m.group(1) if m else name]
  buffers = {"inv_freq": inv_freq_array(config)}
  if config.rope_local_theta is not None:
    buffers["inv_freq_local"] = inv_freq_array(config, local=True)
  return graphdef, state, param_specs(config), shape_of, buffers


def model_from_hf_tensors(config, tensors: Mapping[str, np.ndarray],
                          mesh=None):
  """Builds a `Transformer` (or, for a `HybridConfig`, a `HybridLM`) from
  HF-named tensors, checking names and shapes.

  A tied model (`config.tie_embeddings`) may carry an `lm_head.weight` equal to
  the embedding (some exporters save it); it is then ignored. Unknown tensors,
  missing tensors and shape mismatches raise `CheckpointError` naming them.
  With a `mesh` (`seqdec.parallel.sharding`), each device receives only its
  block of each parameter under the logical-axis rules, and when `tensors`
  are memory-mapped (`safetensors_io`) only that block is read from disk
  (`Parts.block`): no process reads or holds a whole sharded tensor.
  """
  check_dtypes(config.dtype, config.param_dtype)
  graphdef, state, specs, shape_of, buffers = _layout(config)
  targets = None
  if mesh is not None:
    from seqdec.parallel import sharding  # pylint: disable=g-import-not-at-top
    targets = sharding.target_shardings(state, mesh)
  if isinstance(config, HybridConfig):
    check_layer_pattern(config, tensors)
  used = {n for names, _, _ in specs.values() for n in names}
  unknown = sorted(n for n in tensors if n not in used
                   and not _IGNORED.match(n)
                   and not (n == "lm_head.weight" and config.tie_embeddings))
  if unknown:
    raise CheckpointError(
        f"checkpoint has {len(unknown)} tensors this model does not use, e.g. "
        f"{unknown[:3]} (wrong architecture or config?)")
  missing = sorted(n for n in used if n not in tensors)
  if missing:
    raise CheckpointError(
        f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
  pdt = as_dtype(config.param_dtype)
  packed: dict[str, Parts] = {}
  for path, (names, pack, _) in specs.items():
    arrays = []
    for name in names:
      array = tensors[name]
      want = shape_of(name)
      if tuple(array.shape) != want:
        raise CheckpointError(f"tensor {name!r} has shape "
                              f"{tuple(array.shape)}, the config implies "
                              f"{want}")
      arrays.append(array)
    packed[path] = (pack(_pack_config(config), *arrays), pdt)
  # RoPE frequencies keep their own dtype (float32, float64 for f64 models).
  packed.update({k: _buffer(v) for k, v in buffers.items()})
  flat = []
  for path, var in nnx.to_flat_state(state):
    parts, dtype = packed[_path_str(path)]
    if targets is None:
      value = jnp.asarray(parts.block().astype(dtype, copy=False))
    else:
      from seqdec.parallel import distributed  # pylint: disable=g-import-not-at-top
      value = distributed.array_from_blocks(
          parts.shape, targets[path],
          lambda index, p=parts, t=dtype: p.block(index).astype(t))
    flat.append((path, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def model_to_hf_tensors(model) -> dict[str, np.ndarray]:
  """The inverse mapping (used to write safetensors caches and in tests),
  for a `Transformer` or a `HybridLM`."""
  state = nnx.state(model, nnx.Param)
  by_path = {_path_str(p): np.asarray(v.get_value())
             for p, v in nnx.to_flat_state(state)}
  out = {}
  for path, (names, _, unpack) in _layout(model.config)[2].items():
    parts = unpack(_pack_config(model.config), by_path[path])
    if len(names) == 1:
      parts = (parts,)
    for name, part in zip(names, parts):
      out[name] = np.ascontiguousarray(part)
  return out
