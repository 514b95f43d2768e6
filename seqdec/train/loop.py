"""The resumable training loop shared by the trainers (`lm`, `drafter`).

A run is a pure function of its config: the batch of step s depends on
(seed, s) only, so a run restored from the checkpoint at step k and run to
the end sees exactly the batches steps k .. N-1 of an uninterrupted run
would, none repeated or skipped.

On a device mesh (config key `mesh`, e.g. 'data:2,model:4'; `Layout`) the
same steps run data- and tensor-parallel: parameters are laid out by the
logical-axis rules (`seqdec.parallel.sharding`), every other training
array is replicated, and the rows of each batch are split over `data`,
each process loading only its own rows (`Layout.rows` /
`Layout.batch`). Every row of a batch is a function of (seed, step, its
slot) alone, so a sharded run sees the unsharded run's batches and its
steps compute the same sums.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from seqdec.errors import UserError
from seqdec.parallel import sharding


class TrainError(UserError):
  """Bad training configuration or state (reported as one line by the CLI)."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a trainer's arrays live: one device (`mesh` None) or a mesh."""
  mesh: Optional[jax.sharding.Mesh] = None

  @classmethod
  def from_config(cls, config) -> "Layout":
    """From the config's top-level `mesh` key ('' or absent: one device;
    `sharding.mesh_from_spec`)."""
    return cls(sharding.mesh_from_spec(config.get("mesh", "")))

  def place(self, tree):
    """Parameters split by the rules, other arrays replicated."""
    return tree if self.mesh is None else sharding.place(tree, self.mesh)

  def replicate(self, tree):
    if self.mesh is None:
      return jax.tree.map(jnp.asarray, tree)
    return sharding.replicate(tree, self.mesh)

  def rows(self, num_rows: int) -> slice:
    """The rows of a `num_rows` batch this process loads (all of them on
    one device)."""
    if self.mesh is None:
      return slice(0, num_rows)
    return sharding.process_rows(num_rows, self.mesh)

  def batch(self, local, num_rows: int):
    """A batch from this process's rows `local` (numpy, `rows(num_rows)`
    of it): device arrays split over `data`."""
    if self.mesh is None:
      return jax.tree.map(jnp.asarray, local)
    return sharding.rows_from_processes(local, num_rows, self.mesh)


@dataclasses.dataclass
class TrainState:
  step: int
  params: Any
  opt_state: Any


def run_steps(state: TrainState, total_steps: int,
              batch: Callable[[int], Any],
              step_fn: Callable[[Any, Any, Any], tuple[Any, Any, dict]],
              ckpt=None, checkpoint_every: int = 0, log_every: int = 1,
              progress: Optional[Callable[[Iterable[int], int, int],
                                          Iterable[int]]] = None,
              log: Optional[Callable[[dict], None]] = None,
              every: Optional[Callable[[TrainState], Optional[dict]]] = None
              ) -> tuple[TrainState, list[dict], int]:
  """Restores the latest checkpoint (if any) and runs to `total_steps`.

  Args:
    state: the fresh state (the structure a checkpoint restores into).
    total_steps: N.
    batch: step -> the batch of that step (a function of the step only).
    step_fn: (params, opt_state, batch) -> (params, opt_state, metrics).
    ckpt: a `Checkpointer` (`latest_step`, `restore`, `save`) or None.
    checkpoint_every: save every k steps and at the end (needs ckpt).
    log_every: call `log` with the metrics every k steps and at the end.
    progress: wraps the step range (e.g. tqdm): (range, start, total).
    log: receives {"step", metric: float, ...} rows.
    every: called after each step with the state; a dict it returns (e.g. a
      periodic evaluation) is logged as a row of its own.

  Returns:
    `(final state, history rows, step resumed from)`.

  Raises:
    TrainError: a non-finite loss (the step and its value).
  """
  resumed_from = 0
  if ckpt is not None and ckpt.latest_step() is not None:
    state = ckpt.restore(state)
    resumed_from = state.step
  steps: Iterable[int] = range(state.step, total_steps)
  if progress is not None:
    steps = progress(steps, state.step, total_steps)
  history = []
  for step in steps:
    params, opt_state, metrics = step_fn(state.params, state.opt_state,
                                         batch(step))
    state = TrainState(step + 1, params, opt_state)
    row = {"step": step + 1, **{k: float(v) for k, v in metrics.items()}}
    if not math.isfinite(row["loss"]):
      raise TrainError(f"loss is {row['loss']} at step {step + 1}")
    history.append(row)
    last = step + 1 == total_steps
    if ckpt is not None and checkpoint_every > 0 and (
        (step + 1) % checkpoint_every == 0 or last):
      ckpt.save(state)
    if log is not None and ((step + 1) % log_every == 0 or last):
      log(row)
    extra = every(state) if every is not None else None
    if extra:
      extra = {"step": step + 1, **extra}
      history.append(extra)
      if log is not None:
        log(extra)
  return state, history, resumed_from
