"""The resumable training loop shared by the trainers (`lm`, `drafter`).

A run is a pure function of its config: the batch of step s depends on
(seed, s) only, so a run restored from the checkpoint at step k and run to
the end sees exactly the batches steps k .. N-1 of an uninterrupted run
would, none repeated or skipped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Optional

from seqdec.errors import UserError


class TrainError(UserError):
  """Bad training configuration or state (reported as one line by the CLI)."""


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
