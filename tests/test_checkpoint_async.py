"""Asynchronous checkpointing (`config.checkpoint_async`): a run killed while a checkpoint is being written resumes
from the last complete one and ends as an uninterrupted run does."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from medbind_jax import train
from tiny_config import tiny_config
from tiny_data import write_tiny_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the tiny config with async checkpoints in a subprocess whose checkpoint of step 4 never finishes writing: the
# state handler's background write of that step stalls (after orbax has created the step's temporary directory and
# started writing into it), and the run is killed there.
STALLED_RUN = textwrap.dedent("""
    import sys, time
    import orbax.checkpoint as ocp
    from medbind_jax import train
    from tiny_config import tiny_config

    data_dir, workdir, marker = sys.argv[1:]
    original = ocp.StandardCheckpointHandler.async_save

    class Stall:
      def result(self, timeout=None):
        open(marker, "w").close()
        time.sleep(3600)

      def cancel(self):
        return False

    async def async_save(self, directory, *args, **kwargs):
      futures = list(await original(self, directory, *args, **kwargs) or [])
      return futures + [Stall()] if "/4." in str(getattr(directory, "path", directory)) else futures

    ocp.StandardCheckpointHandler.async_save = async_save
    config = tiny_config(data_dir, total_steps=6, checkpoint_async=True, **{"eval.every_steps": 0})
    train.train_and_evaluate(config, workdir)
""")


def _params(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))["params"]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f)}


def test_a_run_killed_during_an_async_checkpoint_write_resumes_from_the_previous_one(tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  write_tiny_dataset(data_dir, num_records=32, num_shards=2, splits=("train", "test"))
  config = tiny_config(str(data_dir), total_steps=6, checkpoint_async=True, **{"eval.every_steps": 0})
  full, killed = tmp_path / "full", tmp_path / "killed"
  train.train_and_evaluate(config, str(full))

  marker = tmp_path / "writing_step_4"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), XLA_FLAGS=(
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
  proc = subprocess.Popen([sys.executable, "-c", STALLED_RUN, str(data_dir), str(killed), str(marker)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 600
    while not marker.exists():
      assert proc.poll() is None, f"the run ended before stalling in step 4's write:\n{proc.stdout.read()[-5000:]}"
      assert time.monotonic() < deadline, "step 4's checkpoint write never started"
      time.sleep(0.2)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)

  checkpoints = killed / "checkpoints"
  # Step 4 was being written (orbax's temporary directory is there) and is not a checkpoint; step 2 is.
  assert any(p.name.startswith("4.") and "tmp" in p.name for p in checkpoints.iterdir()), os.listdir(checkpoints)
  assert train.checkpoint_manager(str(killed), config).all_steps() == [2]

  resumed = train.train_and_evaluate(config, str(killed))
  assert sorted(train.checkpoint_manager(str(killed), config).all_steps()) == [2, 4, 6]
  assert _losses(killed) == _losses(full) and sorted(_losses(killed)) == list(range(1, 7))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(_params(full, 6)), jax.tree.leaves(_params(killed, 6))):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  assert resumed is not None and "retrieval/rsum" in resumed
