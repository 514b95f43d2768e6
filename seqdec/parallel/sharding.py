"""Device meshes and data-parallel decoding.

    mesh = make_mesh("data:8")             # or make_mesh(): every device
    gen = seqdec.Generator(model, tok, "ngram/chain4", mesh=mesh)

Data parallelism: the weights are replicated on every device and the rows
of a batch are split over the mesh's `data` axis; the decoding programs
are the same jitted programs (`seqdec.decoding.loops`), and XLA's sharding
propagation partitions them from their inputs' shardings. Every row's
computation is independent of the others' (per-row acceptance, per-row
caches, per-row PRNG keys), so the sharded run computes the unsharded
one's tokens exactly (tests/test_sharding.py, 8 simulated CPU devices).

The mesh's axes are `Auto` (sharding propagation decides the
intermediates), not jax's `Explicit` default of `jax.make_mesh`, under
which the per-row gathers of the decode loop need hand-written output
shardings. A `model` axis (tensor parallelism over heads, MLP width and
vocabulary, with logical-axis rules) is the sharding issue's next step;
until then a mesh may only have a `data` axis of size > 1.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from seqdec.errors import ConfigError

DATA = "data"
AXES = (DATA, "model")


def parse_mesh(spec: Optional[str], num_devices: int) -> dict[str, int]:
  """'data:2,model:4' -> {'data': 2, 'model': 4}; None or '' -> every
  device on `data`. One axis may be -1 (the rest of the devices)."""
  if not spec:
    return {DATA: num_devices}
  axes: dict[str, int] = {}
  for part in spec.split(","):
    name, _, size = part.strip().partition(":")
    if name not in AXES:
      raise ConfigError(f"unknown mesh axis {name!r} in {spec!r}; expected "
                        f"{' / '.join(AXES)}")
    if name in axes:
      raise ConfigError(f"mesh axis {name!r} given twice in {spec!r}")
    try:
      axes[name] = int(size)
    except ValueError:
      raise ConfigError(f"mesh axis {name!r} needs an integer size, got "
                        f"{size!r} in {spec!r}") from None
  rest = [n for n, s in axes.items() if s == -1]
  if len(rest) > 1:
    raise ConfigError(f"at most one mesh axis may be -1 in {spec!r}")
  known = int(np.prod([s for s in axes.values() if s != -1]))
  if rest:
    axes[rest[0]] = num_devices // known if known else 0
  if any(s < 1 for s in axes.values()) or int(np.prod(list(
      axes.values()))) != num_devices:
    raise ConfigError(f"mesh {spec!r} ({axes}) does not use the "
                      f"{num_devices} devices")
  return axes


def make_mesh(spec: Optional[str] = None,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A mesh with Auto axes over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  axes = parse_mesh(spec, len(devices))
  if axes.get("model", 1) > 1:
    raise ConfigError("a 'model' mesh axis (tensor parallelism) is not "
                      "supported yet; use data parallelism ('data:N')")
  names = tuple(axes)
  return Mesh(np.asarray(devices).reshape([axes[n] for n in names]), names,
              axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def data_size(mesh: Optional[Mesh]) -> int:
  """Rows are split this many ways (1 without a mesh)."""
  return 1 if mesh is None else int(mesh.shape.get(DATA, 1))


def replicate(tree, mesh: Mesh):
  """Every array of `tree` on every device of `mesh`."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_rows(tree, mesh: Mesh):
  """Every array of `tree` split on its leading (row) axis over `data`."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec(DATA)))


def place_inputs(inputs, mesh: Mesh):
  """`loops.Inputs` with its per-row arrays split over `data` and the stop
  ids replicated. The padded batch must divide evenly."""
  rows, ways = inputs.tokens.shape[0], data_size(mesh)
  if rows % ways:
    raise ConfigError(f"a batch of {rows} rows does not split over a data "
                      f"axis of {ways} devices")
  eos = replicate(inputs.eos_ids, mesh)
  return shard_rows(inputs.replace(eos_ids=None), mesh).replace(eos_ids=eos)
