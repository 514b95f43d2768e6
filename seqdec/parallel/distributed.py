"""Several processes, one mesh: `jax.distributed` set-up and host transfers.

    distributed.initialize()                 # before any other jax call
    mesh = sharding.make_mesh("data:2,model:4")   # over every process's devices
    gen = seqdec.Generator(model, tok, spec, mesh=mesh)
    results = gen.generate(prompts)          # every process gets every row
    if distributed.is_main(): print(...)

On a Cloud TPU slice `jax.distributed.initialize()` finds the coordinator
and the processes itself. Elsewhere (CPU hosts, tests) they come from the
arguments or the environment: SEQDEC_COORDINATOR (host:port),
SEQDEC_NUM_PROCESSES, SEQDEC_PROCESS_ID. CPU processes exchange data with
gloo collectives (jax's default on CPU).

Every process runs the same program on the same inputs (multi-controller
JAX). Arrays that span processes are assembled from each process's own
shards (`global_array`: `jax.make_array_from_callback`, each device reads
its block of a host value), and read back with `to_host`, which gathers
the blocks of the other processes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from seqdec.errors import ConfigError

ENV = ("SEQDEC_COORDINATOR", "SEQDEC_NUM_PROCESSES", "SEQDEC_PROCESS_ID")


def initialize(coordinator: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               timeout_s: int = 120) -> bool:
  """Joins the processes of one run (`jax.distributed.initialize`).

  Arguments default to the SEQDEC_* environment variables; with none set
  on a TPU VM, jax discovers the slice itself. Returns False (and does
  nothing) for a single process. A process that cannot join within
  `timeout_s` seconds ends: with a ConfigError naming the coordinator when
  jax raises, or, when jax's distributed service aborts the process (a
  peer that never came), with its fatal log line and a non-zero status;
  `launch_local` turns either into one clear error for the whole run.
  """
  coordinator = coordinator or os.environ.get(ENV[0])
  num_processes = num_processes or _int_env(ENV[1])
  process_id = process_id if process_id is not None else _int_env(ENV[2])
  if coordinator is None and num_processes is None:
    # A multi-host TPU slice lists its hosts; jax finds the rest itself.
    if "," not in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
      return False
  elif None in (coordinator, num_processes, process_id):
    raise ConfigError(f"a multi-process run needs all of {', '.join(ENV)} "
                      f"(got {coordinator!r}, {num_processes!r}, "
                      f"{process_id!r})")
  try:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=num_processes,
                               process_id=process_id,
                               initialization_timeout=timeout_s)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"process {process_id} of {num_processes} could not "
                      f"join the coordinator {coordinator!r} within "
                      f"{timeout_s} s: {e}") from e
  return True


def _int_env(name: str) -> Optional[int]:
  value = os.environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"{name}={value!r} is not an integer") from None


def is_main() -> bool:
  """Whether this is process 0 (the one that prints and writes files)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op alone)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def gathered(module):
  """An nnx module whose arrays are whole numpy values in every process
  (`to_host`; collective: every process must call it), e.g. to export
  weights trained on a mesh."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, jax.tree.map(to_host, state))


def global_array(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """`value` (the same host value in every process, or a fully addressable
  jax.Array) laid out as `sharding`, each device holding only its block.
  Typed PRNG keys travel as their key data."""
  if isinstance(value, jax.Array) and value.sharding == sharding:
    return value                      # already laid out (sharded loading)
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    return jax.device_put(value, sharding)   # a global array: reshard
  if isinstance(value, jax.Array) and jax.dtypes.issubdtype(
      value.dtype, jax.dtypes.prng_key):
    impl = jax.random.key_impl(value)
    data = global_array(jax.random.key_data(value), _key_data_sharding(
        sharding, value.ndim))
    return jax.random.wrap_key_data(data, impl=impl)
  host = np.asarray(value)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: host[index])


def array_from_blocks(shape: tuple[int, ...], sharding: jax.sharding.Sharding,
                      block: Callable[[tuple], np.ndarray]) -> jax.Array:
  """A global array of `shape` laid out as `sharding`, built from
  `block(index) -> np.ndarray`, called once per distinct block this process's
  devices hold (replicas share one call): the caller reads only those."""
  cache: dict = {}

  def cached(index):
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in cache:
      cache[key] = block(index)
    return cache[key]

  return jax.make_array_from_callback(tuple(shape), sharding, cached)


def _key_data_sharding(sharding, ndim: int):
  """A key array's sharding extended over its trailing key-data axis."""
  spec = tuple(sharding.spec) + (None,) * (ndim + 1 - len(sharding.spec))
  return jax.sharding.NamedSharding(sharding.mesh,
                                    jax.sharding.PartitionSpec(*spec))


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of `x` as a NumPy array in every process (gathering the
  blocks other processes hold when `x` spans processes)."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_local(command: Sequence[str], num_processes: int, *,
                 devices_per_process: int = 4, timeout_s: float = 600,
                 env: Optional[dict[str, str]] = None) -> list[str]:
  """Runs `command` as the `num_processes` processes of one run on this
  machine: coordinator on 127.0.0.1, each process with its SEQDEC_*
  variables (`initialize` reads them) and `devices_per_process` CPU
  devices. Returns each process's stdout, in process order.

  The first process to fail, or a run still going after `timeout_s`
  seconds, stops the run: the others are killed and a ConfigError names
  the process, its exit status and the end of its stderr.
  """
  port = free_port()
  logs = [tempfile.TemporaryFile("w+") for _ in range(2 * num_processes)]
  procs = []
  for i in range(num_processes):
    proc_env = dict(os.environ if env is None else env,
                    JAX_PLATFORMS="cpu", SEQDEC_COORDINATOR=f"127.0.0.1:{port}",
                    SEQDEC_NUM_PROCESSES=str(num_processes),
                    SEQDEC_PROCESS_ID=str(i),
                    XLA_FLAGS="--xla_force_host_platform_device_count="
                    f"{devices_per_process}")
    procs.append(subprocess.Popen(list(command), env=proc_env,
                                  stdout=logs[2 * i], stderr=logs[2 * i + 1]))

  def tail(i: int) -> str:
    logs[2 * i + 1].seek(0)
    lines = [ln for ln in logs[2 * i + 1].read().splitlines() if ln.strip()]
    return " | ".join(lines[-3:])[-1500:]

  start, failure = time.monotonic(), None
  try:
    while failure is None and any(p.poll() is None for p in procs):
      for i, p in enumerate(procs):
        if p.poll() not in (None, 0):
          failure = (f"process {i} of {num_processes} exited with status "
                     f"{p.returncode}: {tail(i)}")
          break
      else:
        if time.monotonic() - start > timeout_s:
          failure = (f"the {num_processes} processes did not finish within "
                     f"{timeout_s:g} s")
        time.sleep(0.2)
    if failure is None:
      bad = [i for i, p in enumerate(procs) if p.returncode]
      if bad:
        failure = (f"process {bad[0]} of {num_processes} exited with status "
                   f"{procs[bad[0]].returncode}: {tail(bad[0])}")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  if failure is not None:
    raise ConfigError(failure)
  out = []
  for i in range(num_processes):
    logs[2 * i].seek(0)
    out.append(logs[2 * i].read())
  for f in logs:
    f.close()
  return out
