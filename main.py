r"""MEDBind-JAX entry point: parses flags and hands the config to `train.train_and_evaluate` (or, with
--mode=eval, to `train.evaluate_checkpoint`).

  python main.py --config=configs/medbind.py --workdir=workdirs/medbind
  python main.py --config=configs/medbind.py --mode=eval --workdir=workdirs/medbind  # latest checkpoint again
"""

import logging

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from medbind_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':arguments'.", lock_config=True)
flags.DEFINE_string("workdir", "workdirs/medbind", "Checkpoints, metrics and evaluation outputs go here.")
flags.DEFINE_enum("mode", "train", ["train", "eval"],
                  "train: train (or resume) then evaluate. eval: evaluate the latest checkpoint in --workdir with the "
                  "run's saved config and the evaluation settings (config.eval) of --config; writes workdir/eval/.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (one process per host of a pod "
                  "slice or GPU cluster; the cluster is discovered from the environment).")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  if FLAGS.multihost:
    jax.distributed.initialize()
  absl_logging.set_verbosity(absl_logging.WARNING)  # libraries' INFO chatter (e.g. every orbax write) off
  logging.getLogger("medbind_jax").setLevel(logging.INFO)
  logging.getLogger("data_prep").setLevel(logging.INFO)
  if FLAGS.mode == "eval":
    train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
  else:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
