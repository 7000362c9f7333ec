"""Trains MEDBind (TMCL + EMCL) and evaluates it (retrieval, zero-shot, few-shot, cross-modal), from one
ml_collections config.

Reads top to bottom: Mesh -> Input -> Model -> Optimiser, state and update step (`build_train_step`) ->
Checkpoint and resume -> Evals -> Loop -> Final evaluation. `train_and_evaluate(config, workdir)` is what
`main.py`, Colab and the tests call; `evaluate_checkpoint(config, workdir)` is `main.py --mode=eval`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any

import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from medbind_jax import config_check, evaluators, loop, losses, metric_writer, optim, paths, runs, sharding, steps
from medbind_jax.data import codecs, mixture, pipeline
from medbind_jax.data import text as text_lib
from medbind_jax.evaluators import common
from medbind_jax.model import MedBind, build_model

log = logging.getLogger(__name__)



@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


# ------------------------------------------------------------------------------------------------------------------
# Helpers (each one step of the recipe below)
# ------------------------------------------------------------------------------------------------------------------


def prepare_data(config) -> str:
  """The data directory; with `config.data.synthetic`, (re)generates the synthetic world there if needed."""
  data_dir = config.data.dir
  if not data_dir:
    raise ValueError("config.data.dir is empty: point it at shards written by a data_prep converter")
  if config.data.get("synthetic"):
    from data_prep import synthetic_world  # pylint: disable=import-outside-toplevel
    fields = {k: v for k, v in config.data.synthetic.to_dict().items() if k != "workers"}
    params = synthetic_world.WorldParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    # Meet first: the first cross-process collective sets up the CPU (gloo) context, whose deadline is 30 s, so
    # it must not be the barrier that waits through process 0's generation.
    multihost_utils.sync_global_devices("synthetic world: start")
    if jax.process_index() == 0:
      synthetic_world.ensure_world(data_dir, params, workers=config.data.synthetic.get("workers"))
    multihost_utils.sync_global_devices("synthetic world ready")
  return data_dir


def load_sources(config, edges, layout: pipeline.Layout, *, seed: int, progress: bool = True):
  """(one SplitIndex over the training sources, pools or None, [(source, first record number)]).

  The sources are `config.data.sources` (`mixture.sources_from_config`), or data.dir's train split alone; for
  one source the pools are left to `pipeline.train_dataset` (None), for several they are `mixture.mixed_pools`."""
  sources = mixture.sources_from_config(config.data)
  indexes = [pipeline.index_split(s.dir, s.split, skip_corrupt=config.data.skip_corrupt, progress=progress)
             for s in sources]
  index, offsets = mixture.combine(indexes)
  if len(sources) == 1 and not config.data.get("sources"):
    return index, None, [(sources[0], 0)]
  per_source = [mixture.source_pools(i, layout) for i in indexes]
  mixture.check_sources(sources, per_source, edges, layout, config.data.linked_per_batch)
  pools = mixture.mixed_pools(sources, per_source, offsets, edges, layout, seed)
  for source, own in zip(sources, per_source):
    log.info("source %s (%s/%s): %s", source.label, source.dir, source.split,
             ", ".join(f"{len(v)} {'linked' if k == mixture.LINKED else k}" for k, v in own.items()))
  return index, pools, list(zip(sources, offsets))


def build_text_table(model: MedBind, text_params, trunk_fingerprint: str, texts: list[str],
                     tokenize: text_lib.Tokenize, cache_dir: str, batch_size: int = 128) -> np.ndarray:
  """[len(texts), width] frozen text-trunk features, computed once per unique text and cached on disk (keyed by
  the texts, the tokenizer and `trunk_fingerprint`, `runs.params_fingerprint` of `text_params`).

  Texts are run shortest first in chunks padded to a multiple of 16 tokens (a handful of compiled shapes, and
  no work spent on padding a short report to the longest one). Fixed order and chunking make the result
  deterministic, so a resumed run gets the same table.
  """
  digest = hashlib.sha256(json.dumps([texts, tokenize.max_length, tokenize.tokenizer_dir]).encode())
  digest.update(trunk_fingerprint.encode())  # the weights themselves, not where they came from
  path = paths.join(cache_dir, f"text_features_{digest.hexdigest()[:20]}.npy")
  if paths.exists(path):
    with paths.open_file(path, "rb") as f:
      return np.load(f)
  trunk = runs.text_trunk_fn(model)
  tokens = tokenize(texts)
  lengths = tokens["attention_mask"].sum(1)
  order = np.argsort(lengths, kind="stable")
  table = np.zeros((len(texts), model.towers[codecs.TEXT].width), np.float32)
  for start in tqdm.trange(0, len(texts), batch_size, desc="text features", unit="batch", leave=False,
                           disable=jax.process_index() != 0):
    rows = order[start:start + batch_size]
    width = min(tokenize.max_length, -(-int(lengths[rows].max()) // 16) * 16)
    chunk = {k: np.zeros((batch_size, width), np.int32) for k in tokens}
    for k in tokens:
      chunk[k][:len(rows)] = tokens[k][rows, :width]
    table[rows] = np.asarray(trunk(text_params, chunk))[:len(rows)]
  if jax.process_index() == 0:
    paths.makedirs(cache_dir)
    buffer = io.BytesIO()
    np.save(buffer, table)
    paths.write_bytes_atomic(path, buffer.getvalue())
  return table


def cache_dir(config, workdir: str) -> str:
  """Where derived data that several runs can share (text features) is kept."""
  return config.get("cache_dir") or paths.join(workdir, "cache")


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                         enable_async_checkpointing=bool(config.get("checkpoint_async", False)))
  return ocp.CheckpointManager(runs.workdir_path(workdir) / runs.CHECKPOINT_DIR, options=options,
                               item_names=("state", "data"),
                               item_handlers={"state": ocp.StandardCheckpointHandler(),
                                              "data": grain.checkpoint.CheckpointHandler()})


def refuse_old_layout(checkpoint_dir, step: int) -> None:
  """Raises when checkpoint `step` has the parameter layout from before keyed modalities: its optimiser state
  cannot be resumed (its parameters can be evaluated and embedded: `runs.restore_params` migrates them)."""
  if runs.is_old_layout(runs.checkpoint_params_tree(checkpoint_dir, step)):
    raise ValueError(
        f"{checkpoint_dir} step {step} was written before modalities were keyed by name (parameters "
        "cxr_encoder/..., logit_scale [3]); training cannot resume from it, as its optimiser state is in the old "
        "layout. It still evaluates (--mode=eval) and embeds (medbind_jax.inference), which migrate its parameters "
        "on load. To train on, start a new workdir.")


NonFiniteLossError = loop.NonFiniteLossError  # a step's loss, gradient or parameter norm is not finite


def build_train_step(config, model: MedBind, layout: pipeline.Layout, text_mode: str, params, mesh,
                     batch_spec: pipeline.BatchSpec, rng: jax.Array):
  """(initial TrainState on the mesh, jitted update step (state, batch, text_table) -> (state, metrics)).

  Parameters and optimiser state are sharded by `config.mesh` (sharding.py), the batch over every device; the
  step's gradient is `steps.loss_and_grads` (exact over `optim.microbatches`), dropout keys fold the step into
  `rng`. The state argument is donated."""
  data_sharding, replicated = sharding.batch_sharding(mesh), NamedSharding(mesh, P())
  tx, schedule = optim.make_optimizer(config, params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  param_shardings = sharding.param_shardings(params, mesh, config.get("mesh", {}))
  state_shardings = TrainState(step=replicated, params=param_shardings,
                               opt_state=sharding.like_params(state.opt_state, params, param_shardings, mesh))
  # Pair edges score only each device's static prefix of linked rows.
  objective = losses.sharded_objective(mesh, runs.edges(config), sharding.BATCH_AXES,
                                       precision=config.loss.get("precision", "highest"),
                                       linked_rows=batch_spec.linked_rows_per_shard)
  microbatches = int(config.optim.get("microbatches", 1))

  def train_step(state: TrainState, batch: dict, text_table: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    (loss, parts, scales), grads = steps.loss_and_grads(
        model, layout, text_mode, objective, state.params, batch, text_table, step_rng, microbatches=microbatches,
        shards=mesh.size, constrain=lambda x: jax.lax.with_sharding_constraint(x, data_sharding))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The norms of the gradient and of the updated parameters: a finite loss can still come with an overflowing
    # gradient or parameters (|x| ~ 1e19 and up overflow a float32 norm), which must not be checkpointed.
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params),
               "learning_rate": schedule(state.step),
               **{(f"logit_{name}" if name.startswith("bias/") else f"logit_scale/{name}"): s
                  for name, s in scales.items()}}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  step = jax.jit(train_step, in_shardings=(state_shardings, data_sharding, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  return jax.device_put(state, state_shardings), step


# ------------------------------------------------------------------------------------------------------------------
# The recipe
# ------------------------------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_step: int | None = None) -> dict[str, float] | None:
  """Trains as `config` says, checkpointing into `workdir` and resuming from it; then evaluates.

  Args:
    config: see configs/medbind.py.
    workdir: checkpoints, metrics.jsonl, TensorBoard events, metrics.json and the eval/ report go here. Local or a
      URI (gs://bucket/run): every file goes through `medbind_jax.paths` (etils.epath), the checkpoints through
      orbax (epath for its metadata, TensorStore's own gs:// driver for the arrays; orbax supports local and
      gs:// checkpoint directories, not s3://). `config.data.dir` and `config.cache_dir` may be URIs as well.
    stop_after_step: stop right after this step without saving, as a pre-emption would (used by the tests).
  Returns:
    The final evaluation metrics (also in workdir/metrics.json), or None when stopped early.
  Raises:
    config_check.ConfigError: a mistake in `config` (batch size, edges, towers, data dir, ...), before anything is
      written or generated.
  """
  config_check.check(config)
  paths.makedirs(workdir)
  is_main = jax.process_index() == 0
  own_steps = runs.checkpoint_steps(workdir)
  if own_steps:  # before anything is written into the workdir
    refuse_old_layout(runs.workdir_path(workdir) / runs.CHECKPOINT_DIR, own_steps[-1])
  if is_main:  # what `--mode=eval` and `medbind_jax.inference` rebuild the model from
    paths.write_text_atomic(paths.join(workdir, runs.CONFIG_FILE),
                            config.to_json_best_effort(indent=2, sort_keys=True))
  writer = metric_writer.MetricWriter(workdir)
  rng = jax.random.key(config.seed)

  # ---- Mesh ------------------------------------------------------------------------------------------------------
  # data x fsdp over every device of every process (config.mesh): batch rows split over both axes, parameters and
  # optimiser state over fsdp (replicated when fsdp = 1).
  mesh = sharding.make_mesh(config.get("mesh", {}))
  data_sharding = sharding.batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  n, m = config.data.batch_size, config.data.linked_per_batch  # checked against the devices by config_check

  # ---- Input -----------------------------------------------------------------------------------------------------
  # The loss edges decide what a batch holds: rows of every modality they use, the reports of the tmcl edges'
  # modalities, and a mask of linked rows per pair edge.
  edges = runs.edges(config)
  layout = pipeline.Layout.from_edges(edges)
  prepare_data(config)
  batch_spec = pipeline.BatchSpec(n, m, jax.process_index(), jax.process_count(), shards=jax.local_device_count())
  # One source (data.dir) or a mixture (data.sources): one index over every source's records, and each pool drawn
  # from the sources that have it.
  train_index, pools, _ = load_sources(config, edges, layout, seed=config.seed, progress=is_main)

  # ---- Model -----------------------------------------------------------------------------------------------------
  model, pretrained = build_model(config)
  rng, _ = jax.random.split(rng)  # the second key is runs.initial_params'
  params = runs.initial_params(config, model, pretrained)
  text_mode = runs.text_mode(config)
  tokenize = runs.make_tokenize(config)
  text_params, text_table = None, jnp.zeros((0,), jnp.float32)
  if text_mode == "cached":
    # The frozen trunk leaves the trained parameters; its output is a table row per unique training report.
    text_params = params["towers"].pop(codecs.TEXT)
    trunk_fingerprint = runs.check_text_trunk(workdir, config, text_params, record=is_main)
    texts = sorted({r.reports[mod] for r in train_index.records for mod in layout.report_modalities if r.has(mod)})
    text_table = build_text_table(model, text_params, trunk_fingerprint, texts, tokenize,
                                  cache_dir(config, workdir))
    text_inputs = text_lib.TableRows({t: i for i, t in enumerate(texts)})
  else:
    text_inputs = tokenize
  dataset = pipeline.train_dataset(train_index, text_inputs, batch_spec, layout, specs=runs.data_specs(config),
                                   seed=config.seed, augment=config.data.augment, pools=pools)
  train_iter = pipeline.train_iterator(dataset, num_threads=config.data.num_threads, prefetch=config.data.prefetch)

  # ---- Optimiser, state and update step --------------------------------------------------------------------------
  state, train_step = build_train_step(config, model, layout, text_mode, params, mesh, batch_spec, rng)
  text_table = jax.device_put(jnp.asarray(text_table), replicated)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  log.info("trainable parameters: %.2fM", num_params / 1e6)

  # ---- Checkpoint and resume -------------------------------------------------------------------------------------
  # Order: this workdir's latest checkpoint, else config.resume (another run's checkpoint directory), else the
  # pretrained tower weights loaded above, else random init.
  manager = checkpoint_manager(workdir, config)
  restore_from = manager if manager.latest_step() is not None else None
  if restore_from is None and config.get("resume"):
    restore_from = ocp.CheckpointManager(runs.workdir_path(config.resume), item_names=("state", "data"),
                                         item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                        "data": grain.checkpoint.CheckpointHandler()})
  if restore_from is not None:
    step = restore_from.latest_step()
    if restore_from is not manager:  # this workdir's own latest checkpoint was checked before anything was written
      refuse_old_layout(restore_from.directory, step)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = restore_from.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(train_iter)))
    state = restored["state"]
    writer.truncate_after(int(state.step))
    log.info("resumed from step %d of %s", int(state.step), restore_from.directory)
  start_step = int(state.step)

  def put(local_batch):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(data_sharding, x), local_batch)

  # ---- Evals -----------------------------------------------------------------------------------------------------
  # Built once (the eval split's index, jitted embedding functions); run every config.eval.every_steps steps (0: only
  # after the last step), each run writing workdir/eval/ and, during training, eval/... to the metric writer.
  suite = make_eval_suite(config, model, text_mode, text_params, tokenize, mesh)
  eval_results = None

  # ---- Loop ------------------------------------------------------------------------------------------------------
  # `loop.run_steps`: a step's loss is read while the next one runs; a non-finite one stops the run unsaved.
  def save(step, state):
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=grain.checkpoint.CheckpointSave(train_iter)))

  def after_step(step, state, final):
    nonlocal eval_results
    if config.eval.every_steps and (step % config.eval.every_steps == 0 or final):
      eval_results = evaluate(config, workdir, suite, state.params, step)
      writer.write(step, {f"eval/{k}": v for k, v in eval_results.items()})

  try:
    state, finished = loop.run_steps(
        state, step_fn=lambda state, batch: train_step(state, batch, text_table),
        next_batch=lambda _: put(next(train_iter)), start_step=start_step, total_steps=config.total_steps,
        manager=manager, save=save, writer=writer, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, examples_per_step=n * len(layout.modalities),
        after_step=after_step, stop_after_step=stop_after_step)
  finally:
    writer.close()
  if not finished:
    return None

  # ---- Final evaluation ------------------------------------------------------------------------------------------
  if eval_results is None:  # not already evaluated after the last step
    eval_results = evaluate(config, workdir, suite, state.params, config.total_steps)
  return {**eval_results, "step": float(config.total_steps)}


def make_eval_suite(config, model: MedBind, text_mode: str, text_params, tokenize,
                    mesh) -> evaluators.Suite | evaluators.MultiSuite:
  """The evaluators `config.eval.evaluators` names, over each evaluation dataset (`config_check.eval_datasets`: a
  Suite for the one default dataset, a MultiSuite for config.eval.datasets), each split indexed once; probes fit
  on the dataset's `support_split` (config.eval.support_split; '': the evaluated split itself). Splits are embedded
  across every device of `mesh` (every process reads and embeds its share; `common.embed_split`), the metrics
  computed on every process from the gathered embeddings."""
  fns = runs.make_embed_fns(model, text_mode, text_params, tokenize, config.eval.batch_size, mesh=mesh)
  edges = runs.edges(config)
  specs = runs.data_specs(config)
  progress = jax.process_index() == 0
  suites = {}
  for entry in config_check.eval_datasets(config):
    index = pipeline.index_split(entry["dir"], entry["split"], skip_corrupt=config.data.skip_corrupt,
                                 progress=progress)
    data = common.SplitEmbedder(fns, index, specs, report_modalities=[e.modality for e in edges if e.uses_text])
    support = None
    if entry["support_split"]:
      fix = (f"The few-shot and linear probes fit on support_split={entry['support_split']!r}: name a split the "
             "data has records in, or '' to draw few-shot support from the evaluated split itself "
             "(config.eval.support_split, or the dataset's entry in config.eval.datasets)")
      try:
        support_index = pipeline.index_split(entry["dir"], entry["support_split"],
                                             skip_corrupt=config.data.skip_corrupt, progress=progress)
      except ValueError as e:
        raise ValueError(f"{e}. {fix}") from None
      support = common.SplitEmbedder(fns, support_index, specs,
                                     max_records=int(config.eval.get("max_support_records", 0)))
      if not any(support.num_records[m] for m in data.modalities if data.num_records[m]):
        raise ValueError(f"{entry['dir']} has no split {entry['support_split']!r} records of the modalities it "
                         f"evaluates ({[m for m in data.modalities if data.num_records[m]]}). {fix}")
    suites[entry["name"]] = evaluators.build(config.eval, data, edges, support=support, protocol=entry["protocol"])
  return suites[""] if "" in suites else evaluators.MultiSuite(suites)


def evaluate(config, workdir: str, suite: evaluators.Suite | evaluators.MultiSuite, params,
             step: int) -> dict[str, float]:
  """Runs `suite` on `params`. Process 0 prints the headline numbers and writes workdir/eval/ (metrics.json,
  report.md, plots) and workdir/metrics.json."""
  is_main = jax.process_index() == 0
  results = suite.run(params, report_dir=paths.join(workdir, "eval") if is_main else None, step=step)
  if is_main:
    where = (f"on {suite.data.index.split}" if isinstance(suite, evaluators.Suite)
             else f"of {len(suite.suites)} datasets")
    print(f"\nEvaluation {where} at step {step} (all numbers: {paths.join(workdir, 'eval', 'report.md')}):\n"
          f"{suite.printed(results)}", flush=True)
    paths.write_text_atomic(paths.join(workdir, "metrics.json"), json.dumps(results, indent=2, sort_keys=True))
  return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """`main.py --mode=eval`: evaluates the latest checkpoint in `workdir`, writing what the end of training writes.

  Model, data and seed come from the run's own config (workdir/config.json, saved by `train_and_evaluate`); the
  evaluation settings (`config.eval`) from `config`, so a finished run can be re-evaluated with other evaluators or
  another protocol.
  """
  if paths.exists(paths.join(workdir, runs.CONFIG_FILE)):
    run_config = runs.load_run_config(workdir)
    run_config.eval = ml_collections.ConfigDict(config.eval.to_dict())
  else:
    log.warning("%s has no config.json: rebuilding the model from --config as given", workdir)
    run_config = config
  config_check.check(run_config, training=False)  # before the world is generated or anything is written
  if not runs.checkpoint_steps(workdir):
    raise FileNotFoundError(f"no finished checkpoint in {paths.join(workdir, runs.CHECKPOINT_DIR)}: train there "
                            "first (--mode=train)")
  prepare_data(run_config)
  # The trained parameters alone (the frozen text trunk, which checkpoints leave out, is rebuilt as the run made it).
  run_config, model, params, text_params, step = runs.load_trained(workdir, config=run_config)
  log.info("evaluating step %d of %s", step, workdir)
  mesh = sharding.make_mesh(run_config.get("mesh", {}))
  params = jax.device_put(params, NamedSharding(mesh, P()))
  suite = make_eval_suite(run_config, model, runs.text_mode(run_config), text_params, runs.make_tokenize(run_config),
                          mesh)
  return {**evaluate(run_config, workdir, suite, params, step), "step": float(step)}
