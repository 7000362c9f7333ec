r"""MEDBind-JAX entry point: parses flags and hands the config to `train.train_and_evaluate` (or, with
--mode=eval, to `train.evaluate_checkpoint`). A config with `task = "prompt_tuning"` (configs/prompt_tuning.py) goes
to the same two functions of `medbind_jax.llm.prompt_tuning` instead.

  python main.py --config=configs/medbind.py --workdir=workdirs/medbind
  python main.py --config=configs/medbind.py --mode=eval --workdir=workdirs/medbind  # latest checkpoint again
  python main.py --config=configs/prompt_tuning.py:medbind_workdir=workdirs/medbind --workdir=workdirs/pt

Several processes (one per host of a TPU pod slice or GPU cluster; `launch.sh` starts them): --multihost calls
jax.distributed.initialize() before anything else. On a Cloud TPU pod or under SLURM the processes find each
other from the environment; elsewhere give --coordinator_address (host:port of process 0), --num_processes and
--process_id (0 .. num_processes-1) explicitly. They are only accepted together with --multihost. E.g. two
processes on this machine, four fake CPU devices each (logs in a temporary directory the launcher prints):

  ./launch.sh local --devices-per-process 4 2 workdirs/two_procs --config=configs/medbind.py:steps=10

which runs, for i in 0 and 1,

  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu python main.py --multihost \
      --coordinator_address=localhost:PORT --num_processes=2 --process_id=i --workdir=workdirs/two_procs \
      --config=configs/medbind.py:steps=10

CPU processes exchange collectives through gloo (set here when JAX_PLATFORMS=cpu and --num_processes > 1, unless
JAX_CPU_COLLECTIVES_IMPLEMENTATION says otherwise).

A mistake in the config (`medbind_jax.config_check`: missing data dir, unknown encoder or modality, an edge the data
cannot train, a batch size the devices cannot split, ...; for prompt tuning `prompt_tuning.check_config`: an unknown
prompt part, outcome or scoring mode, no MEDBind run, a label word that is not one token, ...) stops the run before
any work: its message alone (no traceback) goes to stderr and the exit status is 2.
"""

import logging
import os
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':arguments'.", lock_config=True)
flags.DEFINE_string("workdir", "workdirs/medbind", "Checkpoints, metrics and evaluation outputs go here.")
flags.DEFINE_enum("mode", "train", ["train", "eval"],
                  "train: train (or resume) then evaluate. eval: evaluate the latest checkpoint in --workdir with the "
                  "run's saved config and the evaluation settings (config.eval) of --config; writes workdir/eval/.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (one process per host of a pod "
                  "slice or GPU cluster). Without the three flags below the cluster is discovered from the "
                  "environment (Cloud TPU, SLURM, ...).")
flags.DEFINE_string("coordinator_address", None, "With --multihost: host:port of process 0's coordination "
                    "service, e.g. localhost:12345. Default: discovered from the environment.")
flags.DEFINE_integer("num_processes", None, "With --multihost: how many processes take part. Default: discovered "
                     "from the environment.", lower_bound=1)
flags.DEFINE_integer("process_id", None, "With --multihost: this process's index, 0 .. num_processes-1. Default: "
                     "discovered from the environment.", lower_bound=0)
flags.DEFINE_integer("stop_after_step", None, "Stop right after this training step without saving, as a "
                     "pre-emption would (for testing resumption); the next run resumes from the last checkpoint.",
                     lower_bound=1)
flags.mark_flags_as_required(["config"])

_DISTRIBUTED_FLAGS = ("coordinator_address", "num_processes", "process_id")


@flags.multi_flags_validator(("multihost",) + _DISTRIBUTED_FLAGS,
                             message="--coordinator_address, --num_processes and --process_id only apply with "
                                     "--multihost (they are passed to jax.distributed.initialize()); add --multihost "
                                     "or drop them.")
def _distributed_flags_need_multihost(values):
  return values["multihost"] or all(values[name] is None for name in _DISTRIBUTED_FLAGS)


@flags.multi_flags_validator(("num_processes", "process_id"),
                             message="--process_id must be smaller than --num_processes.")
def _process_id_in_range(values):
  return None in (values["num_processes"], values["process_id"]) or values["process_id"] < values["num_processes"]


def _initialize_distributed():
  kwargs = {name: getattr(FLAGS, name) for name in _DISTRIBUTED_FLAGS if getattr(FLAGS, name) is not None}
  platforms = (jax.config.jax_platforms or "").split(",")
  if (platforms[0].strip() == "cpu" and (FLAGS.num_processes or 1) > 1
      and not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION")):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
  jax.distributed.initialize(**kwargs)


def main(argv):
  del argv
  if FLAGS.multihost:
    _initialize_distributed()
  from medbind_jax import config_check, train  # after initialize: nothing may touch a backend before it

  absl_logging.set_verbosity(absl_logging.WARNING)  # libraries' INFO chatter (e.g. every orbax write) off
  logging.getLogger("medbind_jax").setLevel(logging.INFO)
  logging.getLogger("data_prep").setLevel(logging.INFO)
  trainer = train
  if FLAGS.config.get("task") == "prompt_tuning":  # configs/prompt_tuning.py: the LLM trainer, same flags
    from medbind_jax.llm import prompt_tuning as trainer  # pylint: disable=import-outside-toplevel
  try:
    if FLAGS.mode == "eval":
      trainer.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
    else:
      trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir, stop_after_step=FLAGS.stop_after_step)
  except config_check.ConfigError as err:
    # A config mistake, found before any work: the message says what and how to fix it; a traceback adds nothing.
    print(err, file=sys.stderr, flush=True)
    sys.exit(2)  # SystemExit passes through absl's app.run without a traceback


def _parse_flags(argv):
  """absl's flag parsing, except that a config file whose get_config raised (e.g. an unknown `edges=` name in
  `--config=configs/medbind.py:...`) prints that error's own message alone, not the traceback ml_collections
  embeds in the flag error, and exits with status 2 like any other config mistake."""
  try:
    return FLAGS(argv)
  except flags.Error as err:
    if "Error whilst parsing config file" in str(err):
      lines = [line.strip() for line in str(err).splitlines() if line.strip()]
      print(f"--config: {lines[-1]}", file=sys.stderr, flush=True)
      sys.exit(2)
    print(f"FATAL Flags parsing error: {err}\nPass --helpshort or --helpfull to see help on flags.", file=sys.stderr,
          flush=True)  # absl's own wording (app.parse_flags_with_usage)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
