"""Decoding programs exported for hardware this host may not have.

    gen = Generator(for_platform(model, "tpu"), tokenizer, "ngram/chain4")
    programs = export_generator(gen, platform="tpu", batch_size=8,
                                prompt_length=128, max_new_tokens=256)
    programs["decode"].serialize()     # bytes: jax.export.deserialize later

`jax.export` lowers a jitted function to StableHLO for the platforms asked
for, without a device of that kind: the programs `Generator` compiles
(`seqdec.decoding.loops.program`: prefill, then the whole decode
`while_loop`, or the streaming step + live pair) are lowered for TPU or
GPU on a CPU host. With `attention_impl='pallas'` the verify calls embed
the tree-attention kernel lowered by Mosaic (a `tpu_custom_call`) or
Triton (a `__gpu$xla.gpu.triton` custom call): the model's `platform`
field chooses the kernel body (`for_platform`), never the host's backend.

What this proves and what it does not: the program, kernels included, is
expressible for the platform (every op has a lowering, the shapes are
static, donation and PRNG keys survive serialisation). The device's own
compilers (XLA:TPU, Mosaic's and Triton's backends: tiling, VMEM and
register limits) run only on the device.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax

from seqdec.decoding import loops
from seqdec.errors import ConfigError
from seqdec.models import transformer as tr
from seqdec.parallel import sharding

# `jax.export` platform names of the model's `platform` values.
EXPORT_PLATFORMS = {"tpu": "tpu", "gpu": "cuda", "cpu": "cpu"}
# The custom calls of the Pallas kernels: Mosaic (TPU) and Triton (GPU).
MOSAIC_CALL, TRITON_CALL = "tpu_custom_call", "__gpu$xla.gpu.triton"


def for_platform(model: tr.Transformer, platform: str,
                 attention_impl: str = "pallas") -> tr.Transformer:
  """The same weights, configured to be built for `platform` ('tpu' |
  'gpu' | 'cpu'), verifying trees through the Pallas kernel by default."""
  if platform not in EXPORT_PLATFORMS:
    raise ConfigError(f"unknown platform {platform!r}; expected one of "
                      f"{sorted(EXPORT_PLATFORMS)}")
  return tr.reconfigured(model, platform=platform,
                         attention_impl=attention_impl)


def _models(generator) -> list[Any]:
  """The Transformers a generator's programs run: the target, and a
  drafter's own model when it has one."""
  found = [generator.model]
  drafter_model = getattr(generator.drafter, "model", None)
  if isinstance(drafter_model, tr.Transformer) and (
      drafter_model is not generator.model):
    found.append(drafter_model)
  return found


def check_platform(generator, platform: str) -> None:
  """Every model of `generator` must be configured for `platform`
  (`for_platform`): a model left on the host's backend would embed
  interpreted kernels, or the wrong platform's, without failing."""
  for model in _models(generator):
    if model.config.platform != platform:
      raise ConfigError(
          f"the model is configured for platform {model.config.platform!r}, "
          f"not {platform!r}: build the Generator on "
          f"seqdec.export.for_platform(model, {platform!r}) (and the same "
          f"for a draft model)")


def export_generator(generator, *, platform: str = "tpu",
                     batch_size: int = 1, prompt_length: int = 16,
                     max_new_tokens: Optional[int] = None,
                     temperature: Optional[float] = None,
                     kinds: Sequence[str] = ("prefill", "decode")
                     ) -> dict[str, jax.export.Exported]:
  """Exports the programs of one shape bucket of `generator` for `platform`.

  Args:
    generator: a `seqdec.Generator` whose model (and draft model) were
      configured with `for_platform(model, platform)`.
    platform: 'tpu' | 'gpu' | 'cpu'.
    batch_size, prompt_length, max_new_tokens, temperature: the bucket
      (`Generator.program_inputs`; defaults: the generator's).
    kinds: programs of `seqdec.decoding.loops.KINDS`: ('prefill', 'decode')
      is a whole run; ('prefill', 'step', 'live') the streaming loop.

  Returns:
    {kind: `jax.export.Exported`}, each lowered for exactly `platform`; on
    a generator with a mesh, for that mesh's devices (`nr_devices`), the
    arguments laid out as the generator lays them out.
  """
  check_platform(generator, platform)
  loop, inputs = generator.program_inputs(
      batch_size, prompt_length, max_new_tokens=max_new_tokens,
      temperature=temperature)
  mesh = generator.mesh

  def spec(x):   # on a mesh, the arguments keep their layout
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=(
        x.sharding if mesh is not None else None))
  abstract = jax.tree.map(spec, inputs)
  params = jax.tree.map(spec, generator.loop_params)
  exported, state_shardings = {}, None
  for kind in ("prefill",) + tuple(k for k in kinds if k != "prefill"):
    fn, kwargs = loops.program(kind, loop, params, abstract, state_shardings)
    with sharding.mesh_context(mesh):   # kernels run per shard
      exported[kind] = _export_flat(fn, loop, kwargs, platform)
    if kind == "prefill" and mesh is not None:
      # Later programs take the state as prefill lays it out.
      state = jax.eval_shape(lambda p, i: loop.prefill(params=p, inputs=i),
                             params, abstract)
      state_shardings = jax.tree.unflatten(
          jax.tree.structure(state),
          exported[kind].out_shardings_jax(mesh))
  return {k: exported[k] for k in kinds}


def _export_flat(fn, loop, kwargs: dict[str, Any], platform: str
                 ) -> jax.export.Exported:
  """Exports `fn(loop, **kwargs)` as a function of the flat list of its
  argument leaves returning the flat list of its output leaves, so that
  the serialised program holds no Python pytree types (`jax.tree.flatten`
  of the same arguments rebuilds the call on the other side). The state's
  leaves stay donated, as in `loops.DECODE` / `loops.STEP`."""
  names = sorted(kwargs)
  leaves = flat_arguments(**kwargs)
  treedef = jax.tree.structure([kwargs[n] for n in names])
  donated, start = [], 0
  for name in names:
    count = len(jax.tree.leaves(kwargs[name]))
    if name == "state" and fn is not loops.LIVE:
      donated.extend(range(start, start + count))
    start += count

  def flat(*args):
    values = jax.tree.unflatten(treedef, list(args))
    out = fn.__wrapped__(loop, **dict(zip(names, values)))
    return jax.tree.leaves(out)

  # Triton calls carry no cross-version guarantee (jax's export docs): the
  # module is only good for the jaxlib that lowered it.
  unchecked = ([jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
               if platform == "gpu" else [])
  return jax.export.export(
      jax.jit(flat, donate_argnums=tuple(donated)),
      platforms=[EXPORT_PLATFORMS[platform]],
      disabled_checks=unchecked)(*leaves)


def flat_arguments(**kwargs) -> list[Any]:
  """The positional arguments of an exported program: the leaves of its
  keyword arguments (params, state, inputs), names in sorted order."""
  return jax.tree.leaves([kwargs[n] for n in sorted(kwargs)])


def custom_calls(exported: jax.export.Exported) -> dict[str, int]:
  """{custom call target: count} in an exported module's StableHLO (e.g.
  'tpu_custom_call' for Mosaic kernels)."""
  counts: dict[str, int] = {}
  for line in exported.mlir_module().splitlines():
    if "stablehlo.custom_call" not in line:
      continue
    target = line.split("@", 1)[1].split("(", 1)[0].strip() if "@" in line \
        else "?"
    counts[target] = counts.get(target, 0) + 1
  return counts
