"""Device meshes, logical-axis rules, and sharded decoding.

    mesh = make_mesh("data:2,model:4")     # or make_mesh(): every device on data
    gen = seqdec.Generator(model, tok, "ngram/chain4", mesh=mesh)

Data parallelism: the rows of a batch are split over the mesh's `data`
axis. Tensor parallelism: every parameter carries logical axis names
(`seqdec.models.transformer`: vocab, embed, heads, kv_heads, head_dim,
mlp), and RULES map them to mesh axes (MaxText-style): vocabulary, MLP
width and attention heads over `model`, the rest replicated. The decoding
programs are the same jitted programs (`seqdec.decoding.loops`); XLA's
sharding propagation partitions every intermediate (KV cache, logits,
drafts) from the parameters' and inputs' shardings. Every row's
computation is independent of the others' (per-row acceptance, caches and
PRNG keys), and a sharded contraction is the same sum, so the sharded run
gives the unsharded one's tokens (tests/test_sharding.py, 8 simulated CPU
devices, float64 exactly).

A logical axis whose dimension the mesh axis does not divide is
replicated instead, for every parameter that carries it (`plan_params`
reports which and why): SmolLM2's 3 kv heads or Gemma-3-270M's one on a
model axis of 2 or 4 keep attention replicated while the MLP and the
vocabulary are split. `heads` and `kv_heads` are split together or not at
all (a query head must live with its kv head).

The mesh's axes are `Auto` (sharding propagation decides the
intermediates), not jax's `Explicit` default of `jax.make_mesh`, under
which the per-row gathers of the decode loop need hand-written output
shardings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from seqdec.errors import ConfigError
from seqdec.parallel import distributed

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)
# Logical axis -> mesh axis; a logical axis not listed is replicated.
RULES = (("vocab", MODEL), ("mlp", MODEL), ("heads", MODEL),
         ("kv_heads", MODEL))
# Logical axes that are split together or not at all.
TIED = (("heads", "kv_heads"),)


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
  names = tuple(axes)
  return Mesh(np.asarray(devices).reshape([axes[n] for n in names]), names,
              axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def mesh_from_spec(spec: Optional[str]) -> Optional[Mesh]:
  """A config's `mesh` value as a mesh: '' -> None (one device), 'auto' ->
  every device on `data`, 'data:2,model:4' -> that mesh."""
  if not spec:
    return None
  return make_mesh(None if spec == "auto" else spec)


def kv_head_axis(num_kv_heads: int, mesh) -> Optional[str]:
  """The mesh axis attention heads are split over on `mesh` (a Mesh or an
  AbstractMesh): 'model' when it divides the kv heads (the RULES' heads /
  kv_heads), else None (attention replicated)."""
  size = dict(mesh.shape).get(MODEL, 1)
  return MODEL if size > 1 and num_kv_heads % size == 0 else None


def vocab_blocks(v: int) -> int:
  """Into how many blocks a vocabulary axis of `v` entries is split on the
  context mesh (`jax.set_mesh`, `mesh_context`): the size of `model` when
  it divides v, else 1 (also outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  g = 1 if mesh.empty else int(dict(mesh.shape).get(MODEL, 1))
  return g if g > 1 and v % g == 0 else 1


def blocked_cumsum(x: jax.Array) -> jax.Array:
  """`cumsum(x)` along the last axis, as `vocab_blocks` blocks: a cumsum
  within each block plus the exclusive prefix sum of the block totals,

      c[j, i] = sum_{l < i} x[j, l] + sum_{m < j} sum_l x[m, l],

  so a vocabulary split over `model` is summed where it lies (only the g
  block totals move). Equal to `jnp.cumsum` up to the order of additions
  (identical on one block)."""
  g = vocab_blocks(x.shape[-1])
  if g == 1:
    return jnp.cumsum(x, axis=-1)
  blocks = x.reshape(x.shape[:-1] + (g, x.shape[-1] // g))
  inner = jnp.cumsum(blocks, axis=-1)
  totals = inner[..., -1]
  before = jnp.cumsum(totals, axis=-1) - totals
  return (inner + before[..., None]).reshape(x.shape)


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k(x, k)` over the last (vocabulary) axis, computed where the
  data lies: XLA's own partitioning of a top-k replicates its whole operand
  on every device (all rows, the whole vocabulary), hence `shard_map`.

  Inside a mesh context, rows (the leading axis, when `data` divides it)
  stay on their data shard. When `model` (g > 1 devices) splits the
  vocabulary (g dividing V, V / g >= k), each device takes the top k of its
  block of V / g entries, and only those g*k candidates are gathered over
  `model` and reduced:

      top_k(x) = top_k(concat_j top_k(x[..., j V/g : (j+1) V/g]))

  with block j's indices offset by j V/g. Values and indices equal
  `lax.top_k`'s (ties go to the lower index in both stages). Outside a
  mesh, or when k exceeds a block of a split vocabulary, it is
  `lax.top_k`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return jax.lax.top_k(x, k)
  sizes = dict(mesh.shape)
  v = x.shape[-1]
  g = vocab_blocks(v)
  if v // g < k:
    # More candidates than a vocabulary block holds (a tiny vocabulary):
    # XLA's top-k, which gathers the split vocabulary where it runs.
    return jax.lax.top_k(x, k)
  rows = DATA if (x.ndim > 1 and DATA in sizes
                  and x.shape[0] % int(sizes[DATA]) == 0) else None
  if g == 1 and rows is None:
    return jax.lax.top_k(x, k)
  lead = (rows,) + (None,) * (x.ndim - 2) if x.ndim > 1 else ()
  width = v // g

  def local(block):                                  # [..., V/g]
    vals, idx = jax.lax.top_k(block, k)
    if g == 1:
      return vals, idx
    idx = idx + jax.lax.axis_index(MODEL).astype(idx.dtype) * width
    vals = jax.lax.all_gather(vals, MODEL, axis=block.ndim - 1, tiled=True)
    idx = jax.lax.all_gather(idx, MODEL, axis=block.ndim - 1, tiled=True)
    vals, pick = jax.lax.top_k(vals, k)              # over the g*k
    return vals, jnp.take_along_axis(idx, pick, -1)

  out = PartitionSpec(*lead, None)
  split = PartitionSpec(*lead, MODEL if g > 1 else None)
  return jax.shard_map(local, mesh=mesh, in_specs=split,
                       out_specs=(out, out), check_vma=False)(x)


def mesh_context(mesh: Optional[Mesh]):
  """`jax.set_mesh(mesh)` (what `jax.sharding.get_abstract_mesh` sees while
  tracing), or a no-op context without a mesh."""
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def data_size(mesh: Optional[Mesh]) -> int:
  """Rows are split this many ways (1 without a mesh)."""
  return 1 if mesh is None else int(mesh.shape.get(DATA, 1))


@dataclasses.dataclass(frozen=True)
class Plan:
  """How parameters are laid out on a mesh.

  Attributes:
    rules: logical axis -> mesh axis, after the divisibility check.
    replicated: logical axis -> why a ruled axis is replicated instead.
  """
  rules: tuple[tuple[str, str], ...]
  replicated: tuple[tuple[str, str], ...]

  def mesh_spec(self, logical: Sequence[Optional[str]]) -> PartitionSpec:
    """PartitionSpec of a parameter with these logical axes."""
    rules = dict(self.rules)
    return PartitionSpec(*(rules.get(a) if a else None for a in logical))


def _logical(var) -> Optional[tuple]:
  meta = var.get_metadata() if isinstance(var, nnx.Variable) else {}
  return meta.get("out_sharding")


def _variables(tree) -> list[Any]:
  return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def plan_params(tree, mesh, rules: Sequence[tuple[str, str]] = RULES
                ) -> Plan:
  """The rules that apply to the parameters of `tree` (nnx States, or
  pytrees of them) on `mesh` (a Mesh, or {axis: size}): a logical axis is
  split over its mesh axis only if that axis divides every dimension
  carrying it (and its TIED partners'); otherwise it is replicated, and
  `Plan.replicated` says why."""
  sizes = {name: int(n) for name, n in dict(getattr(mesh, "shape",
                                                    mesh)).items()}
  why: dict[str, str] = {}
  for var in _variables(tree):
    logical = _logical(var)
    if not logical:
      continue
    for axis, dim in zip(logical, np.shape(var.get_value())):
      target = dict(rules).get(axis)
      if target and dim % sizes.get(target, 1) and axis not in why:
        why[axis] = (f"{axis} dimension {dim} is not a multiple of mesh axis "
                     f"{target!r} ({sizes[target]})")
  for group in TIED:
    failed = [a for a in group if a in why]
    for a in group:
      if failed and a not in why:
        why[a] = f"split together with {failed[0]}, which is replicated"
  kept = tuple((a, m) for a, m in rules if a not in why and m in sizes)
  return Plan(rules=kept, replicated=tuple(sorted(why.items())))


def target_shardings(state, mesh: Mesh, plan: Optional[Plan] = None
                     ) -> dict[tuple, NamedSharding]:
  """{flat path: NamedSharding} of an nnx State (abstract or concrete)
  under `plan` (default `plan_params(state, mesh)`); what sharded loading
  places each parameter with."""
  plan = plan_params(state, mesh) if plan is None else plan
  return {path: NamedSharding(mesh, plan.mesh_spec(_logical(var) or ()))
          for path, var in nnx.to_flat_state(state)}


def place_model(model, mesh: Mesh, plan: Optional[Plan] = None):
  """The same model with its parameters laid out on `mesh` (`place`)."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, place(state, mesh, plan))


def place(tree, mesh: Mesh, plan: Optional[Plan] = None):
  """`tree` on `mesh`: nnx parameters split by `plan` (default
  `plan_params(tree, mesh)`), every other array replicated."""
  plan = plan_params(tree, mesh) if plan is None else plan

  def put(var):
    if not isinstance(var, nnx.Variable):
      return distributed.global_array(var, NamedSharding(mesh, PartitionSpec()))
    logical = _logical(var) or ()
    target = NamedSharding(mesh, plan.mesh_spec(logical) if logical
                           else PartitionSpec())
    return jax.tree.map(lambda x: distributed.global_array(x, target), var)
  return jax.tree.map(put, tree,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicate(tree, mesh: Mesh):
  """Every array of `tree` on every device of `mesh`."""
  target = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda x: distributed.global_array(x, target), tree)


def shard_rows(tree, mesh: Mesh):
  """Every array of `tree` split on its leading (row) axis over `data`."""
  target = NamedSharding(mesh, PartitionSpec(DATA))
  return jax.tree.map(lambda x: distributed.global_array(x, target), tree)


def process_rows(num_rows: int, mesh: Mesh) -> slice:
  """The rows of a `[num_rows, ...]` batch split over `data` that this
  process's devices hold: what per-process data loading reads.

  Raises:
    ConfigError: the data axis does not divide `num_rows`, or this
      process's rows are not one contiguous range (a mesh whose device
      order interleaves processes on `data`).
  """
  ways = data_size(mesh)
  if num_rows % ways:
    raise ConfigError(f"a batch of {num_rows} rows does not split over a "
                      f"data axis of {ways} devices")
  held = NamedSharding(mesh, PartitionSpec(DATA)).addressable_devices_indices_map(
      (num_rows,))
  ranges = sorted({idx[0].indices(num_rows)[:2] for idx in held.values()})
  for (_, stop), (start, _) in zip(ranges, ranges[1:]):
    if stop != start:
      raise ConfigError(f"this process holds rows {ranges} of the batch: "
                        f"not one contiguous range (mesh device order)")
  return slice(ranges[0][0], ranges[-1][1])


def rows_from_processes(local, num_rows: int, mesh: Mesh):
  """Global arrays `[num_rows, ...]` split over `data`, assembled from each
  process's own rows `local` (a pytree of numpy arrays holding the
  `process_rows` of the batch); no process reads another's rows."""
  target = NamedSharding(mesh, PartitionSpec(DATA))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      target, np.asarray(x), (num_rows,) + np.shape(x)[1:]), local)


def place_inputs(inputs, mesh: Mesh):
  """`loops.Inputs` with its per-row arrays split over `data` and the stop
  ids replicated. The padded batch must divide evenly."""
  rows, ways = inputs.tokens.shape[0], data_size(mesh)
  if rows % ways:
    raise ConfigError(f"a batch of {rows} rows does not split over a data "
                      f"axis of {ways} devices")
  eos = replicate(inputs.eos_ids, mesh)
  return shard_rows(inputs.replace(eos_ids=None), mesh).replace(eos_ids=eos)


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4,
          "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "s8": 1, "u8": 1,
          "pred": 1}


def _conditional_only(hlo_text: str) -> set[str]:
  """Names of the computations reached only through a `conditional`'s
  branches (code that runs only when its branch is taken)."""
  lines: dict[str, list[str]] = {}
  entry, name = [], None
  for line in hlo_text.splitlines():
    m = re.match(r"(ENTRY )?%([\w.\-]+) ", line)
    if m and line.rstrip().endswith("{"):
      name = m.group(2)
      lines[name] = []
      if m.group(1):
        entry.append(name)
    elif name is not None:
      lines[name].append(line)
  bodies = {n: "\n".join(ls) for n, ls in lines.items()}
  called = re.compile(r"(?:calls|to_apply|body|condition|true_computation|"
                      r"false_computation)=%([\w.\-]+)")
  branches = re.compile(r"branch_computations=\{([^}]*)\}")

  def reach(roots, through_branches):
    seen, todo = set(), list(roots)
    while todo:
      c = todo.pop()
      if c in seen or c not in bodies:
        continue
      seen.add(c)
      text = bodies[c]
      todo += called.findall(text)
      for group in branches.findall(text):
        if through_branches:
          todo += re.findall(r"%([\w.\-]+)", group)
    return seen

  always = reach(entry, through_branches=False)
  return set(bodies) - always


def collectives(hlo_text: str, conditional: bool = True
                ) -> dict[str, dict[str, Any]]:
  """The collectives of a compiled program (`compiled.as_text()`, the
  optimized HLO): {kind: {count, bytes, shapes}}, shapes as 'd0,d1,...'
  strings of each result, bytes their total (an async pair is counted
  once, at its start). `conditional=False` leaves out those inside the
  branches of a `conditional` (e.g. a top-p filter no row enables), which
  run only when their branch is taken."""
  out = {k: dict(count=0, bytes=0, shapes=[]) for k in COLLECTIVES}
  pattern = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) +
                       r")(-start)?\(")
  skip = set() if conditional else _conditional_only(hlo_text)
  current = None
  for line in hlo_text.splitlines():
    head = re.match(r"(?:ENTRY )?%([\w.\-]+) ", line)
    if head and line.rstrip().endswith("{"):
      current = head.group(1)
    m = pattern.search(line)
    if not m or current in skip:
      continue
    results = re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))
    entry = out[m.group(2)]
    entry["count"] += 1
    for dtype, dims in results:
      entry["shapes"].append(dims)
      entry["bytes"] += _BYTES.get(dtype, 4) * int(np.prod(
          [int(d) for d in dims.split(",") if d] or [1]))
  return out
