"""Two processes on this machine (`launch.sh local 2`, jax.distributed, gloo collectives, 4 CPU devices each) train
as one process with 8 devices does: the same per-step losses, the same parameters, the same evaluation, also when
the two-process run is pre-empted and resumed.

The runs go through main.py, as users start them, on the tiny config (tests/tiny_config.py).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from tiny_data import write_tiny_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.pop("MEDBIND_COORDINATOR_PORT", None)
  return env


def _config(data_dir) -> str:
  # Retrieval and few-shot: both gather embeddings of the whole split (few-shot draws support sets from them).
  return f"--config=tests/tiny_config.py:{data_dir},total_steps={STEPS},checkpoint_every=2"


def _run(cmd, env, tmp_path, name):
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  (tmp_path / f"{name}.log").write_text(done.stdout + done.stderr)
  assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
  return done


def _two_processes(workdir, data_dir, tmp_path, name, *flags):
  log_dir = tmp_path / f"{name}_logs"
  cmd = ["bash", "launch.sh", "local", "--devices-per-process", "4", "--log-dir", str(log_dir), "2", str(workdir),
         _config(data_dir), *flags]
  env = _env(4)
  env["PYTHON"] = sys.executable
  try:
    return _run(cmd, env, tmp_path, name)
  except AssertionError:
    for log in sorted(log_dir.glob("*.log")):
      print(f"==== {log.name}\n{log.read_text()[-4000:]}")
    raise


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  steps = [row["step"] for row in rows if "loss" in row]
  assert len(steps) == len(set(steps)), f"steps logged more than once (by both processes?): {steps}"
  return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _params(workdir, step):
  # Restored as host arrays: the checkpoints were written by 8 devices of one or of two processes.
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  metadata = ocp.StandardCheckpointer().metadata(path)
  tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata.tree
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
  return ocp.StandardCheckpointer().restore(path, target)["params"]


def test_two_processes_train_resume_and_evaluate_as_one(tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  write_tiny_dataset(data_dir, num_records=32, num_shards=2, splits=("train", "test"))
  one, two = tmp_path / "one", tmp_path / "two"

  _run([sys.executable, "main.py", _config(data_dir), f"--workdir={one}"], _env(8), tmp_path, "one_process")
  # Pre-empted after step 3 (the last checkpoint is step 2), then the same command again.
  _two_processes(two, data_dir, tmp_path, "two_processes_stopped", "--stop_after_step=3")
  assert sorted(os.listdir(two / "checkpoints")) == ["2"]
  assert not (two / "metrics.json").exists()
  _two_processes(two, data_dir, tmp_path, "two_processes_resumed")

  # Every step once, with the loss of the one-process run. Not bitwise: the gloo all-reduce across the two
  # processes adds the devices' partial sums in another order than the in-process reduction (measured: equal or
  # 1 float32 ulp apart, ~6e-8 relative).
  want, got = _losses(one), _losses(two)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-6)
  # Parameters: rtol 1e-5, atol 1e-8. Adam divides each gradient element by its own running RMS, so elements
  # whose gradient is almost zero (attention key biases, whose exact gradient is zero; early bias steps) take
  # full-size steps on rounding noise: measured at most 1.1e-9 apart after 4 steps, on values of 2.4e-4. A wrong
  # batch, row order or missed step moves them by the learning rate's scale (1e-4) instead.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(_params(one, STEPS)),
                          jax.tree.leaves(_params(two, STEPS))):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8, err_msg=jax.tree_util.keystr(path))
  # The evaluation, embedded across both processes' devices and gathered, gives the same metrics.json.
  assert (one / "metrics.json").read_text() == (two / "metrics.json").read_text()
  # Only process 0 writes the run's files; each process saved its own input-pipeline state in the checkpoint.
  assert sorted(p.name for p in (two / "checkpoints" / str(STEPS) / "data").glob("process_*")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
