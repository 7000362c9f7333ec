"""The step loop both trainers share (`loop.run_steps`): when it saves, logs, evaluates and stops, and that a
non-finite step is never saved."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from medbind_jax import loop, metric_writer


class FakeManager:
  """The parts of an orbax CheckpointManager the loop touches."""

  def __init__(self):
    self.saved, self.directory, self.waited = [], "/ckpt", False

  def latest_step(self):
    return self.saved[-1] if self.saved else None

  def wait_until_finished(self):
    self.waited = True


def _run(tmp_path, losses, *, start_step=0, total_steps=None, checkpoint_every=3, log_every=2, stop_after_step=None):
  """Runs the loop over a state that counts steps; step s has loss losses[s - 1]. Returns (state, finished,
  manager, saves, after-step calls, metrics.jsonl rows, batches asked for)."""
  manager, saves, after, asked = FakeManager(), [], [], []
  writer = metric_writer.MetricWriter(str(tmp_path))

  def step_fn(state, batch):
    assert batch == {"step": state + 1}
    loss = losses[state]
    return state + 1, {"loss": jnp.float32(loss), "grad_norm": jnp.float32(1.0), "param_norm": jnp.float32(2.0)}

  def save(step, state):
    assert step == state
    saves.append(step)
    manager.saved.append(step)

  def next_batch(step):
    asked.append(step)
    return {"step": step}

  try:
    state, finished = loop.run_steps(
        start_step, step_fn=step_fn, next_batch=next_batch, start_step=start_step,
        total_steps=total_steps or len(losses), manager=manager, save=save, writer=writer, log_every=log_every,
        checkpoint_every=checkpoint_every, examples_per_step=8,
        after_step=lambda step, state, final: after.append((step, state, final)), stop_after_step=stop_after_step)
  finally:
    writer.close()
    path = os.path.join(tmp_path, metric_writer.METRICS_FILE)
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
  return state, finished, manager, saves, after, rows, asked


def test_saves_logs_and_evaluates_on_schedule(tmp_path):
  state, finished, manager, saves, after, rows, asked = _run(tmp_path, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
  assert (state, finished) == (7, True)
  assert asked == list(range(1, 8))
  assert saves == [3, 6, 7]  # every checkpoint_every steps and the last
  assert manager.waited
  assert after == [(s, s, s == 7) for s in range(1, 8)]
  assert [r["step"] for r in rows] == [2, 4, 6, 7]  # every log_every steps and the last
  np.testing.assert_allclose([r["loss"] for r in rows], [1.5, 3.5, 5.5, 7.0])  # the window's mean
  for r in rows:
    assert r["examples_per_sec"] > 0 and 0.0 <= r["data_wait_fraction"] <= 1.0
    assert r["grad_norm"] == 1.0 and r["param_norm"] == 2.0


def test_resumes_from_start_step(tmp_path):
  state, finished, _, saves, _, rows, asked = _run(tmp_path, [1.0] * 6, start_step=4)
  assert (state, finished, asked, saves) == (6, True, [5, 6], [6])
  assert [r["step"] for r in rows] == [6]


@pytest.mark.parametrize("bad_step", [3, 5])
def test_non_finite_step_is_never_saved(tmp_path, bad_step):
  losses = [1.0] * 8
  losses[bad_step - 1] = float("nan")
  with pytest.raises(loop.NonFiniteLossError, match=rf"loss is nan at step {bad_step}\b") as err:
    _run(tmp_path, losses, checkpoint_every=3)
  last_good = 3 * ((bad_step - 1) // 3) or None  # the bad step's own checkpoint is never written
  assert f"(step {last_good})" in str(err.value)


def test_stop_after_step_returns_unfinished_without_saving(tmp_path):
  state, finished, _, saves, after, _, asked = _run(tmp_path, [1.0] * 8, stop_after_step=4)
  assert (state, finished) == (4, False)
  assert asked == [1, 2, 3, 4] and saves == [3]
  assert after[-1] == (4, 4, False)
