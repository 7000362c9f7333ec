"""The step loop both trainers run (MEDBind's `train.train_and_evaluate` and the LLM prompt tuner's): fetch a
batch, take a step, check the previous step's loss, checkpoint, log, evaluate, stop when asked.

A step's metrics are read while the next step runs, so checking them never stalls the device; a step whose loss,
gradient norm or parameter norm is not finite stops the run before its state is saved (the last good checkpoint
stays the latest). Every `log_every` steps (and after the last) the metrics of the window are averaged and written
with `examples_per_sec` and `data_wait_fraction` (the share of the window spent in `next_batch`).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from medbind_jax import metric_writer

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  pass


def raise_if_not_finite(step: int, values, manager: ocp.CheckpointManager) -> None:
  """Raises NonFiniteLossError when a step's loss, gradient norm or parameter norm is not finite, naming the last
  good checkpoint of `manager` and the fix."""
  bad = [f"{name} is {values[name]}" for name in ("loss", "grad_norm", "param_norm") if not np.isfinite(values[name])]
  if bad:
    raise NonFiniteLossError(
        f"{', '.join(bad)} at step {step}; stopping. The last good checkpoint "
        f"(step {manager.latest_step()}) is kept in {manager.directory}. Lower optim.learning_rate or raise "
        "optim.warmup_steps, then run again to resume from it.")


def run_steps(state, *, step_fn: Callable[[Any, Any], tuple[Any, Any]], next_batch: Callable[[int], Any],
              start_step: int, total_steps: int, manager: ocp.CheckpointManager,
              save: Callable[[int, Any], None], writer: metric_writer.MetricWriter, log_every: int,
              checkpoint_every: int, examples_per_step: int, desc: str = "train",
              after_step: Callable[[int, Any, bool], None] | None = None,
              stop_after_step: int | None = None) -> tuple[Any, bool]:
  """Steps `start_step + 1` .. `total_steps` of a run.

  Args:
    state: the train state after `start_step`.
    step_fn: (state, batch) -> (state, metrics), metrics a dict of device scalars with 'loss', 'grad_norm' and
      'param_norm'.
    next_batch: step -> that step's batch, ready for `step_fn`.
    manager: the run's checkpoint manager (named in a non-finite-loss error; waited for at the end).
    save: (step, state) -> None, a checkpoint of `state` after `step` (every `checkpoint_every` steps and the last).
    writer: where each log window's averaged metrics go.
    examples_per_step: for `examples_per_sec`.
    after_step: (step, state, final) -> None, called after each step's saving and logging (e.g. evaluation).
    stop_after_step: stop right after this step without saving, as a pre-emption would.
  Returns:
    (the state after the last step taken, whether the run reached `total_steps`).
  """
  pending: tuple[int, Any] | None = None
  history: list[dict[str, float]] = []
  timer = {"data": 0.0, "start": time.perf_counter(), "steps": 0}
  bar = tqdm.tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True)

  def check():
    nonlocal pending
    if pending is not None:
      step, values = pending[0], jax.device_get(pending[1])
      pending = None
      raise_if_not_finite(step, values, manager)
      history.append({k: float(v) for k, v in values.items()})

  def report(step):
    elapsed = max(time.perf_counter() - timer["start"], 1e-9)
    summary = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
    summary["examples_per_sec"] = examples_per_step * timer["steps"] / elapsed
    summary["data_wait_fraction"] = timer["data"] / elapsed
    writer.write(step, summary)
    bar.set_postfix(loss=f"{summary['loss']:.3f}", ex_s=f"{summary['examples_per_sec']:.1f}",
                    data_wait=f"{100 * summary['data_wait_fraction']:.0f}%")
    history.clear()
    timer.update(data=0.0, start=time.perf_counter(), steps=0)

  try:
    for step in range(start_step + 1, total_steps + 1):
      start = time.perf_counter()
      batch = next_batch(step)
      timer["data"] += time.perf_counter() - start
      state, metrics = step_fn(state, batch)
      timer["steps"] += 1
      check()  # the previous step's, while this one runs
      pending = (step, metrics)
      bar.update(1)
      final = step == total_steps
      if step % checkpoint_every == 0 or final:
        check()  # never save a state whose loss was not finite
        save(step, state)
      if step % log_every == 0 or final:
        check()
        report(step)
      if after_step is not None:
        after_step(step, state, final)
      if stop_after_step is not None and step >= stop_after_step:
        log.info("stopping after step %d as asked (stop_after_step)", step)
        return state, False
    check()
  finally:
    bar.close()
    manager.wait_until_finished()
  return state, True
