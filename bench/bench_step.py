r"""Training speed of a config (default: configs/medbind.py, the CPU demo) in one table: the model-only train step,
the trainer's own loop, and the input pipeline alone.

  python -m bench.bench_step
  python -m bench.bench_step --config-arg batch_size=64 --loop-steps 40
  python -m bench.bench_step --set data.num_threads=1

1. Model-only step: the trainer's own update step (`train.build_train_step`: towers, heads, loss, gradient, AdamW
   update, the logged norms; mesh, shardings and buffer donation as in training) on one fixed device-resident
   batch from the input pipeline, with a random table of cached text-trunk features in the place of the real one.
   examples/s = rows x input modalities per step / median step time (the trainer's `examples_per_sec` convention).
   MFU = XLA's cost-analysis FLOPs of the compiled step / median step time, over the float32 matmul rate measured
   in the same run (a 2048^3 matmul, median, timed alternately with the step so that both see the same load).
2. Trainer loop: `train.train_and_evaluate` for `--loop-steps` steps (stopped there, as a pre-emption would: no
   checkpoint, no evaluation) in a temporary workdir; the median `examples_per_sec` of its metrics.jsonl windows
   after the first (which holds the compilation), over the model-only speed. Target: >= 0.9.
3. Input pipeline alone: the training iterator (`pipeline.train_dataset` + `train_iterator` with the config's
   `data.num_threads` and `data.prefetch`) drained as fast as it yields, after a warm-up that empties its prefetch
   buffer; over the model-only step's demand. Target: >= 3x.

The synthetic world is generated into --data-dir on first use and reused (also the frozen text trunk's features,
in --cache-dir). On the shared 2-core CPU machines timings move with the other jobs running there: the MFU and
the ratios, each measured within one run, are the comparable figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import medbind
from medbind_jax import runs, sharding, train
from medbind_jax.data import codecs, pipeline
from medbind_jax.data import text as text_lib
from medbind_jax.model import build_model

TARGET_MFU = 0.45
TARGET_LOOP = 0.90
TARGET_PIPELINE = 3.0
MATMUL_SIZE = 2048


def make_config(args) -> ml_collections.ConfigDict:
  """configs/medbind.py with --config-arg, reading (and generating) the synthetic world in --data-dir."""
  config = medbind.get_config(",".join(args.config_arg) or None)
  config.data.dir = args.data_dir
  config.cache_dir = args.cache_dir or args.data_dir.rstrip("/") + "_cache"
  for item in args.set:  # dotted.path=value, the value parsed as the field's current type
    key, value = item.split("=", 1)
    *parents, leaf = key.split(".")
    target = config
    for name in parents:
      target = target[name]
    current = target[leaf]
    target[leaf] = (value.lower() in ("1", "true", "yes")) if isinstance(current, bool) else type(current)(value)
  return config


def compile_model_step(config, model, layout, params, batch_spec, batch, table_shape):
  """(compiled step, state, device batch, text table, compile seconds) of the trainer's update step
  (`train.build_train_step`), on the mesh, shardings and buffer donation of training."""
  mesh = sharding.make_mesh(config.get("mesh", {}))
  _, rng = jax.random.split(jax.random.key(config.seed))  # as the trainer: the first key drives dropout
  state, step = train.build_train_step(config, model, layout, runs.text_mode(config), params, mesh, batch_spec,
                                       rng)
  batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), x), batch)
  table = jax.device_put(jax.random.normal(jax.random.key(1), table_shape, jnp.float32), NamedSharding(mesh, P()))
  start = time.perf_counter()
  compiled = step.lower(state, batch, table).compile()
  return compiled, state, batch, table, time.perf_counter() - start


def time_model_step(compiled, state, batch, table, reps):
  """(median step seconds, median matmul FLOP/s, the step's FLOPs) of a `compile_model_step` result, the step and
  the matmul timed alternately."""
  cost = compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])

  a = jax.random.normal(jax.random.key(2), (MATMUL_SIZE, MATMUL_SIZE), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(matmul(a, a))
  for _ in range(2):  # warm-up
    state, metrics = compiled(state, batch, table)
    jax.block_until_ready((state, metrics))
  step_s, matmul_s = [], []
  for _ in range(reps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, table)
    jax.block_until_ready((state, metrics))
    step_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    matmul_s.append(time.perf_counter() - start)
  return float(np.median(step_s)), 2 * MATMUL_SIZE ** 3 / float(np.median(matmul_s)), flops


def time_pipeline(iterator, examples_per_batch, warmup, batches):
  """Examples/s of `iterator` drained as fast as it yields, after `warmup` batches (its prefetch buffer)."""
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return examples_per_batch * batches / (time.perf_counter() - start)


def time_trainer_loop(config, steps_to_run, log_every):
  """Median examples_per_sec of the trainer's own log windows after the first, and the windows' data-wait share."""
  config = config.copy_and_resolve_references()
  config.total_steps = max(config.total_steps, steps_to_run + 1)
  config.log_every = log_every
  config.checkpoint_every = 10 ** 9
  config.eval.every_steps = 0
  workdir = tempfile.mkdtemp(prefix="bench_step_")
  try:
    with contextlib.redirect_stderr(io.StringIO()):  # the trainer's progress bars
      train.train_and_evaluate(config, workdir, stop_after_step=steps_to_run)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  windows = [r for r in rows if "examples_per_sec" in r][1:]
  if not windows:
    raise ValueError(f"--loop-steps {steps_to_run} with log_every {log_every} leaves no window after the first")
  return (float(np.median([r["examples_per_sec"] for r in windows])),
          float(np.median([r["data_wait_fraction"] for r in windows])), len(windows))


def add_setup_args(parser: argparse.ArgumentParser) -> None:
  """The arguments that choose the config and the data (shared with bench/profile_step.py)."""
  parser.add_argument("--config-arg", action="append", default=[],
                      help="an argument of configs/medbind.get_config, e.g. batch_size=64 (repeatable)")
  parser.add_argument("--set", action="append", default=[],
                      help="a config field, e.g. data.num_threads=1 (repeatable)")
  parser.add_argument("--data-dir", default="/tmp/bench_world", help="synthetic world (generated on first use)")
  parser.add_argument("--cache-dir", default="", help="frozen text-trunk features (default: <data-dir>_cache)")


def setup(args):
  """Everything the measurements share: (config, model, layout, params, batch spec, training iterator,
  examples per step, text-table shape)."""
  config = make_config(args)
  print(f"devices: {jax.devices()}; config args: {','.join(args.config_arg) or '(default)'}", flush=True)
  edges = runs.edges(config)
  layout = pipeline.Layout.from_edges(edges)
  data_dir = train.prepare_data(config)
  index = pipeline.index_split(data_dir, config.data.train_split, skip_corrupt=config.data.skip_corrupt,
                               progress=False)
  n, m = config.data.batch_size, config.data.linked_per_batch
  batch_spec = pipeline.BatchSpec(n, m, jax.process_index(), jax.process_count(), shards=jax.local_device_count())
  model, pretrained = build_model(config)
  params = runs.initial_params(config, model, pretrained)
  if runs.text_mode(config) != "cached":
    raise ValueError("bench_step measures the cached-text-trunk configs (model.towers.text.trunk = 'cached')")
  params["towers"].pop(codecs.TEXT)
  texts = sorted({r.reports[mod] for r in index.records for mod in layout.report_modalities if r.has(mod)})
  dataset = pipeline.train_dataset(index, text_lib.TableRows({t: i for i, t in enumerate(texts)}), batch_spec,
                                   layout, specs=runs.data_specs(config), seed=config.seed,
                                   augment=config.data.augment)
  iterator = pipeline.train_iterator(dataset, num_threads=config.data.num_threads, prefetch=config.data.prefetch)
  return (config, model, layout, params, batch_spec, iterator, n * len(layout.modalities),
          (len(texts), model.towers[codecs.TEXT].width))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_setup_args(parser)
  parser.add_argument("--step-reps", type=int, default=10, help="timed model-only steps")
  parser.add_argument("--loop-steps", type=int, default=60, help="trainer steps (0: skip the trainer loop)")
  parser.add_argument("--log-every", type=int, default=10, help="the trainer's log window in steps")
  parser.add_argument("--pipeline-batches", type=int, default=24, help="timed pipeline batches (0: skip)")
  args = parser.parse_args()
  config, model, layout, params, batch_spec, iterator, examples_per_step, table_shape = setup(args)
  n = config.data.batch_size

  # 3. The input pipeline alone (first: nothing else runs in this process meanwhile).
  pipeline_rate = None
  if args.pipeline_batches:
    pipeline_rate = time_pipeline(iterator, examples_per_step, warmup=config.data.prefetch + 2,
                                  batches=args.pipeline_batches)
    print(f"input pipeline: {pipeline_rate:.0f} examples/s ({config.data.num_threads} threads)", flush=True)
  batch = next(iterator)
  del iterator

  # 1. The model-only step.
  compiled, state, batch, table, compile_s = compile_model_step(config, model, layout, params, batch_spec, batch,
                                                               table_shape)
  step_s, matmul_rate, flops = time_model_step(compiled, state, batch, table, args.step_reps)
  model_rate = examples_per_step / step_s
  mfu = flops / step_s / matmul_rate
  print(f"model-only step: {step_s * 1e3:.0f} ms, {model_rate:.0f} examples/s, {flops / 1e9:.1f} GFLOP, "
        f"{flops / step_s / 1e9:.1f} GFLOP/s, matmul {matmul_rate / 1e9:.1f} GFLOP/s, MFU {100 * mfu:.1f}% "
        f"(compile {compile_s:.0f} s)", flush=True)

  # 2. The trainer's own loop.
  loop = None
  if args.loop_steps:
    loop = time_trainer_loop(config, args.loop_steps, args.log_every)
    print(f"trainer loop: {loop[0]:.0f} examples/s over {loop[2]} windows, data wait {100 * loop[1]:.0f}%",
          flush=True)

  def row(name, rate, ratio, target, note=""):
    ok = "" if ratio is None else ("yes" if ratio >= target else "NO")
    ratio_s = "-" if ratio is None else f"{ratio:.2f}"
    rate_s = "skipped" if rate is None else f"{rate:.0f}"
    print(f"{name:30s} {rate_s:>11s} {ratio_s:>9s} {target:>7.2f} {ok:>4s}  {note}")

  print(f"\nbatch {n} x {len(layout.modalities)} input modalities = {examples_per_step} examples per step; "
        f"{jax.device_count()} device(s)")
  print(f"{'':30s} {'examples/s':>11s} {'ratio':>9s} {'target':>7s} {'met':>4s}  ratio is")
  row("model-only train step", model_rate, mfu, TARGET_MFU,
      f"MFU: {flops / step_s / 1e9:.1f} of {matmul_rate / 1e9:.1f} GFLOP/s ({MATMUL_SIZE}^3 fp32 matmul)")
  row("trainer loop (steady state)", None if loop is None else loop[0],
      None if loop is None else loop[0] / model_rate, TARGET_LOOP,
      "loop / model-only" + ("" if loop is None else f"; data wait {100 * loop[1]:.0f}% of the loop's time"))
  row("input pipeline alone", pipeline_rate, None if pipeline_rate is None else pipeline_rate / model_rate,
      TARGET_PIPELINE, f"pipeline / model-only demand ({config.data.num_threads} threads)")


if __name__ == "__main__":
  main()
