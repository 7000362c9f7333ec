"""Trains MEDBind (TMCL + EMCL) and evaluates it (retrieval, zero-shot, few-shot, cross-modal), from one
ml_collections config.

Reads top to bottom: Mesh -> Input -> Model -> Optimiser and state -> Checkpoint and resume -> Update step ->
Evals -> Loop -> Final evaluation. `train_and_evaluate(config, workdir)` is what `main.py`, Colab and the tests
call; `evaluate_checkpoint(config, workdir)` is `main.py --mode=eval`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
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
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from medbind_jax import evaluators, losses, metric_writer, optim
from medbind_jax.data import pipeline, preprocess, schema
from medbind_jax.data import text as text_lib
from medbind_jax.evaluators import common, retrieval
from medbind_jax.model import MedBind, build_model, init_params

log = logging.getLogger(__name__)

DATA_AXIS = "data"
CONFIG_FILE = "config.json"  # the run's config, saved in its workdir


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


# ------------------------------------------------------------------------------------------------------------------
# Helpers (each one step of the recipe below)
# ------------------------------------------------------------------------------------------------------------------


def data_specs(config) -> tuple[preprocess.CxrSpec, preprocess.EcgSpec]:
  cxr = config.data.cxr
  ecg = config.data.ecg
  return (preprocess.CxrSpec(image_size=cxr.image_size, channels=cxr.channels, mean=cxr.mean, std=cxr.std,
                             crop_scale=tuple(cxr.crop_scale), jitter=cxr.jitter),
          preprocess.EcgSpec(sampling_rate=ecg.sampling_rate, num_samples=ecg.num_samples, scale_mv=ecg.scale_mv,
                             amplitude_jitter=ecg.amplitude_jitter, noise_mv=ecg.noise_mv))


def prepare_data(config) -> str:
  """The data directory; with `config.data.synthetic`, (re)generates the synthetic world there if needed."""
  data_dir = config.data.dir
  if not data_dir:
    raise ValueError("config.data.dir is empty: point it at shards written by a data_prep converter")
  if config.data.get("synthetic"):
    from data_prep import synthetic_world  # pylint: disable=import-outside-toplevel
    fields = {k: v for k, v in config.data.synthetic.to_dict().items() if k != "workers"}
    params = synthetic_world.WorldParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    if jax.process_index() == 0:
      synthetic_world.ensure_world(data_dir, params, workers=config.data.synthetic.get("workers"))
    multihost_utils.sync_global_devices("synthetic world ready")
  return data_dir


def text_trunk_fn(model: MedBind):
  """jit(params of the text tower, token inputs) -> pooled features [B, width]."""
  return jax.jit(lambda text_params, tokens: model.text_encoder.apply({"params": text_params}, tokens)["pooled"])


def build_text_table(model: MedBind, text_params, texts: list[str], tokenize: text_lib.Tokenize, cache_dir: str,
                     batch_size: int = 128) -> np.ndarray:
  """[len(texts), width] frozen text-trunk features, computed once per unique text and cached on disk.

  Texts are run shortest first in chunks padded to a multiple of 16 tokens (a handful of compiled shapes, and
  no work spent on padding a short report to the longest one). Fixed order and chunking make the result
  deterministic, so a resumed run gets the same table.
  """
  digest = hashlib.sha256(json.dumps([texts, tokenize.max_length, tokenize.tokenizer_dir]).encode())
  for leaf in jax.tree.leaves(text_params):  # the weights themselves, not just where they came from
    digest.update(np.ascontiguousarray(leaf).tobytes())
  path = os.path.join(cache_dir, f"text_features_{digest.hexdigest()[:20]}.npy")
  if os.path.exists(path):
    return np.load(path)
  trunk = text_trunk_fn(model)
  tokens = tokenize(texts)
  lengths = tokens["attention_mask"].sum(1)
  order = np.argsort(lengths, kind="stable")
  table = np.zeros((len(texts), model.text_encoder.width), np.float32)
  for start in tqdm.trange(0, len(texts), batch_size, desc="text features", unit="batch", leave=False,
                           disable=jax.process_index() != 0):
    rows = order[start:start + batch_size]
    width = min(tokenize.max_length, -(-int(lengths[rows].max()) // 16) * 16)
    chunk = {k: np.zeros((batch_size, width), np.int32) for k in tokens}
    for k in tokens:
      chunk[k][:len(rows)] = tokens[k][rows, :width]
    table[rows] = np.asarray(trunk(text_params, chunk))[:len(rows)]
  if jax.process_index() == 0:
    os.makedirs(cache_dir, exist_ok=True)
    np.save(path + ".tmp.npy", table)
    os.replace(path + ".tmp.npy", path)
  return table


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config `train_and_evaluate` saved in `workdir` (JSON: tuples come back as lists)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir!r} the workdir of a training run?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def initial_params(config, model: MedBind, pretrained) -> dict:
  """The parameters a run of `config` starts from: pretrained towers as loaded, the rest drawn from the second
  key of `key(config.seed)` split in two (the first drives dropout). Evaluation and inference rebuild a frozen
  text trunk, which checkpoints leave out, from here."""
  _, init_rng = jax.random.split(jax.random.key(config.seed))
  return init_params(model, init_rng, pretrained)


def make_tokenize(config) -> text_lib.Tokenize:
  tokenizer_dir = config.model.text.get("tokenizer") or config.model.text.init
  if not tokenizer_dir:
    raise ValueError("set model.text.init (pretrained text tower) or model.text.tokenizer (a local tokenizer dir)")
  return text_lib.Tokenize(text_lib.resolve_pretrained(tokenizer_dir), config.data.text_max_length)


def cache_dir(config, workdir: str) -> str:
  """Where derived data that several runs can share (text features) is kept."""
  return config.get("cache_dir") or os.path.join(workdir, "cache")


def make_embed_fns(model: MedBind, text_mode: str, text_params, tokenize: text_lib.Tokenize,
                   batch_size: int) -> common.EmbedFns:
  """Evaluation embedding functions of `params` (the trainable tree; frozen text trunk params held here)."""
  embed_cxr = jax.jit(lambda p, x: model.apply({"params": p}, "cxr", x, method=MedBind.embed))
  embed_ecg = jax.jit(lambda p, x: model.apply({"params": p}, "ecg", x, method=MedBind.embed))
  if text_mode == "cached":
    trunk = text_trunk_fn(model)
    project = jax.jit(lambda p, f: model.apply({"params": p}, "text", f, method=MedBind.project))
    embed_text = lambda p, texts: project(p, trunk(text_params, tokenize(texts)))
  else:
    embed_tokens = jax.jit(lambda p, t: model.apply({"params": p}, "text", t, method=MedBind.embed))
    embed_text = lambda p, texts: embed_tokens(p, tokenize(texts))
  return common.EmbedFns(cxr=embed_cxr, ecg=embed_ecg, text=embed_text, batch_size=batch_size)


def local_copy(tree):
  """A replicated global pytree as arrays on this process's first device (evaluation runs per process)."""
  return jax.tree.map(lambda a: a.addressable_data(0), tree)


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
                               item_names=("state", "data"),
                               item_handlers={"state": ocp.StandardCheckpointHandler(),
                                              "data": grain.checkpoint.CheckpointHandler()})


class NonFiniteLossError(FloatingPointError):
  pass


# ------------------------------------------------------------------------------------------------------------------
# The recipe
# ------------------------------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_step: int | None = None) -> dict[str, float] | None:
  """Trains as `config` says, checkpointing into `workdir` and resuming from it; then evaluates.

  Args:
    config: see configs/medbind.py.
    workdir: checkpoints, metrics.jsonl, TensorBoard events, metrics.json and the eval/ report go here.
    stop_after_step: stop right after this step without saving, as a pre-emption would (used by the tests).
  Returns:
    The final evaluation metrics (also in workdir/metrics.json), or None when stopped early.
  """
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:  # what `--mode=eval` and `medbind_jax.inference` rebuild the model from
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  writer = metric_writer.MetricWriter(workdir)
  rng = jax.random.key(config.seed)

  # ---- Mesh ------------------------------------------------------------------------------------------------------
  # One data-parallel axis over every device of every process; parameters are replicated.
  mesh = jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))
  data_sharding = NamedSharding(mesh, P(DATA_AXIS))
  replicated = NamedSharding(mesh, P())
  n, m = config.data.batch_size, config.data.linked_per_batch
  if n % jax.device_count():
    raise ValueError(f"data.batch_size={n} must be divisible by the number of devices ({jax.device_count()})")

  # ---- Input -----------------------------------------------------------------------------------------------------
  data_dir = prepare_data(config)
  train_index = pipeline.index_split(data_dir, config.data.train_split, skip_corrupt=config.data.skip_corrupt,
                                     progress=is_main)
  cxr_spec, ecg_spec = data_specs(config)
  batch_spec = pipeline.BatchSpec(n, m, jax.process_index(), jax.process_count())

  # ---- Model -----------------------------------------------------------------------------------------------------
  model, pretrained = build_model(config.model)
  rng, _ = jax.random.split(rng)  # the second key is initial_params'
  params = initial_params(config, model, pretrained)
  text_mode = config.model.text.trunk
  if text_mode not in ("cached", "train"):
    raise ValueError(f"model.text.trunk must be 'cached' or 'train', got {text_mode!r}")
  tokenize = make_tokenize(config)
  text_params, text_table = None, jnp.zeros((0,), jnp.float32)
  if text_mode == "cached":
    # The frozen trunk leaves the trained parameters; its output is a table row per unique training report.
    text_params = params.pop("text_encoder")
    texts = sorted({r.cxr_report for r in train_index.records if r.has_cxr}
                   | {r.ecg_report for r in train_index.records if r.has_ecg})
    text_table = build_text_table(model, text_params, texts, tokenize, cache_dir(config, workdir))
    text_inputs = text_lib.TableRows({t: i for i, t in enumerate(texts)})
  else:
    text_inputs = tokenize
  dataset = pipeline.train_dataset(train_index, text_inputs, batch_spec, cxr=cxr_spec, ecg=ecg_spec,
                                   seed=config.seed, augment=config.data.augment)
  train_iter = pipeline.train_iterator(dataset, num_threads=config.data.num_threads, prefetch=config.data.prefetch)

  # ---- Optimiser and state ---------------------------------------------------------------------------------------
  tx, schedule = optim.make_optimizer(config, params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  state = jax.device_put(state, replicated)
  text_table = jax.device_put(jnp.asarray(text_table), replicated)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  log.info("trainable parameters: %.2fM", num_params / 1e6)

  # ---- Checkpoint and resume -------------------------------------------------------------------------------------
  # Order: this workdir's latest checkpoint, else config.resume (another run's checkpoint directory), else the
  # pretrained tower weights loaded above, else random init.
  manager = checkpoint_manager(workdir, config)
  restore_from = manager if manager.latest_step() is not None else None
  if restore_from is None and config.get("resume"):
    restore_from = ocp.CheckpointManager(config.resume, item_names=("state", "data"),
                                         item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                        "data": grain.checkpoint.CheckpointHandler()})
  if restore_from is not None:
    step = restore_from.latest_step()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = restore_from.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(train_iter)))
    state = restored["state"]
    writer.truncate_after(int(state.step))
    log.info("resumed from step %d of %s", int(state.step), restore_from.directory)
  start_step = int(state.step)

  # ---- Update step -----------------------------------------------------------------------------------------------
  loss_config = losses.LossConfig(emcl_weight=config.loss.emcl_weight, emcl_negatives=config.loss.emcl_negatives)
  sharded_loss = losses.sharded_medbind_loss(mesh, loss_config, DATA_AXIS)

  def train_step(state: TrainState, batch: dict, text_table: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
      variables = {"params": params}

      def embed(modality, inputs, salt):
        return model.apply(variables, modality, inputs, True, method=MedBind.embed,
                           rngs={"dropout": jax.random.fold_in(step_rng, salt)})

      if text_mode == "cached":
        text_feats = text_table[jnp.concatenate([batch["cxr_text"]["row"], batch["ecg_text"]["row"]])]
        text_emb = model.apply(variables, "text", text_feats, method=MedBind.project)
      else:  # one pass of the text tower over both report batches
        text_emb = embed("text", jax.tree.map(lambda a, b: jnp.concatenate([a, b]), batch["cxr_text"],
                                              batch["ecg_text"]), 2)
      cxr_text, ecg_text = jnp.split(text_emb, 2)
      emb = {"cxr": embed("cxr", batch["cxr"], 0), "ecg": embed("ecg", batch["ecg"], 1),
             "cxr_text": cxr_text, "ecg_text": ecg_text}
      scales = model.apply(variables, method=MedBind.logit_scales)
      loss, parts = sharded_loss(emb, {k: batch[k] for k in ("cxr_text_key", "ecg_text_key", "linked")}, scales)
      return loss, (parts, scales)

    (loss, (parts, scales)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step),
               **{f"logit_scale/{edge}": s for edge, s in scales.items()}}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  train_step = jax.jit(train_step, in_shardings=(replicated, data_sharding, replicated),
                       out_shardings=(replicated, replicated), donate_argnums=(0,))

  def put(local_batch):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(data_sharding, x), local_batch)

  # ---- Evals -----------------------------------------------------------------------------------------------------
  # Built once (the eval split's index, jitted embedding functions); run every config.eval.every_steps steps (0: only
  # after the last step), each run writing workdir/eval/ and, during training, eval/... to the metric writer.
  suite = make_eval_suite(config, model, text_mode, text_params, tokenize)
  eval_results = None

  # ---- Loop ------------------------------------------------------------------------------------------------------
  # The loss of step s is read while step s+1 runs, so checking it never stalls the device.
  examples_per_step = 2 * n  # n CXR-text pairs and n ECG-text pairs
  pending: tuple[int, Any] | None = None
  history: list[dict[str, float]] = []
  timer = {"data": 0.0, "start": time.perf_counter(), "steps": 0}
  bar = tqdm.tqdm(total=config.total_steps, initial=start_step, desc="train", unit="step", disable=not is_main,
                  dynamic_ncols=True)

  def check(entry):
    step, metrics = entry
    values = jax.device_get(metrics)
    if not np.isfinite(values["loss"]):
      raise NonFiniteLossError(
          f"loss is {values['loss']} at step {step}; stopping. The last good checkpoint "
          f"(step {manager.latest_step()}) is kept in {manager.directory}. Lower optim.learning_rate or raise "
          "optim.warmup_steps, then run again to resume from it.")
    history.append({k: float(v) for k, v in values.items()})

  def report(step):
    elapsed = time.perf_counter() - timer["start"]
    summary = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
    summary["examples_per_sec"] = examples_per_step * timer["steps"] / max(elapsed, 1e-9)
    summary["data_wait_fraction"] = timer["data"] / max(elapsed, 1e-9)
    writer.write(step, summary)
    bar.set_postfix(loss=f"{summary['loss']:.3f}", ex_s=f"{summary['examples_per_sec']:.0f}",
                    data_wait=f"{100 * summary['data_wait_fraction']:.0f}%")
    history.clear()
    timer.update(data=0.0, start=time.perf_counter(), steps=0)

  try:
    for step in range(start_step + 1, config.total_steps + 1):
      t0 = time.perf_counter()
      local_batch = next(train_iter)
      timer["data"] += time.perf_counter() - t0
      state, metrics = train_step(state, put(local_batch), text_table)
      timer["steps"] += 1
      if pending is not None:
        check(pending)
      pending = (step, metrics)
      bar.update(1)
      final = step == config.total_steps
      if step % config.checkpoint_every == 0 or final:
        check(pending)  # never save a state whose loss was not finite
        pending = None
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=grain.checkpoint.CheckpointSave(train_iter)))
      if step % config.log_every == 0 or final:
        if pending is not None:
          check(pending)
          pending = None
        report(step)
      if config.eval.every_steps and (step % config.eval.every_steps == 0 or final):
        eval_results = evaluate(config, workdir, suite, local_copy(state.params), step)
        writer.write(step, {f"eval/{k}": v for k, v in eval_results.items()})
      if stop_after_step is not None and step >= stop_after_step:
        log.info("stopping after step %d as asked (stop_after_step)", step)
        return None
    if pending is not None:
      check(pending)
  finally:
    bar.close()
    manager.wait_until_finished()
    writer.close()

  # ---- Final evaluation ------------------------------------------------------------------------------------------
  if eval_results is None:  # not already evaluated after the last step
    eval_results = evaluate(config, workdir, suite, local_copy(state.params), config.total_steps)
  return {**eval_results, "step": float(config.total_steps)}


def make_eval_suite(config, model: MedBind, text_mode: str, text_params, tokenize) -> evaluators.Suite:
  """The evaluators `config.eval.evaluators` names, over `config.data.eval_split` (indexed once)."""
  cxr_spec, ecg_spec = data_specs(config)
  index = pipeline.index_split(config.data.dir, config.data.eval_split, skip_corrupt=config.data.skip_corrupt,
                               progress=jax.process_index() == 0)
  fns = make_embed_fns(model, text_mode, text_params, tokenize, config.eval.batch_size)
  return evaluators.build(config.eval, common.SplitEmbedder(fns, index, cxr=cxr_spec, ecg=ecg_spec))


def evaluate(config, workdir: str, suite: evaluators.Suite, params, step: int) -> dict[str, float]:
  """Runs `suite` on `params`. Process 0 prints the headline numbers and writes workdir/eval/ (metrics.json,
  report.md, plots) and workdir/metrics.json."""
  is_main = jax.process_index() == 0
  results = suite.run(params, report_dir=os.path.join(workdir, "eval") if is_main else None, step=step)
  if is_main:
    print(f"\nEvaluation on {config.data.eval_split} at step {step} (all numbers: "
          f"{os.path.join(workdir, 'eval', 'report.md')}):\n{suite.summary_table(results)}", flush=True)
    if "retrieval" in suite.evaluators:
      print(f"\nRetrieval on {config.data.eval_split} (R@K in %, chance level in brackets):\n"
            + retrieval.format_table(results, ks=config.eval.ks), flush=True)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
  return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """`main.py --mode=eval`: evaluates the latest checkpoint in `workdir`, writing what the end of training writes.

  Model, data and seed come from the run's own config (workdir/config.json, saved by `train_and_evaluate`); the
  evaluation settings (`config.eval`) from `config`, so a finished run can be re-evaluated with other evaluators or
  another protocol.
  """
  if os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    run_config = load_run_config(workdir)
    run_config.eval = ml_collections.ConfigDict(config.eval.to_dict())
  else:
    log.warning("%s has no config.json: rebuilding the model from --config as given", workdir)
    run_config = config
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"no checkpoints in {workdir}: train there first (--mode=train)")
  manager = checkpoint_manager(workdir, run_config)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no finished checkpoint in {manager.directory}")
  prepare_data(run_config)

  # The parameters the run started from, as train_and_evaluate made them: the frozen text trunk (model.text.trunk =
  # "cached") is not in the checkpoint and comes from here. Then the checkpoint's state, on this process's device.
  model, pretrained = build_model(run_config.model)
  params = initial_params(run_config, model, pretrained)
  text_mode = run_config.model.text.trunk
  text_params = params.pop("text_encoder") if text_mode == "cached" else None
  tx, _ = optim.make_optimizer(run_config, params)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                            params)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
  log.info("evaluating step %d of %s", step, manager.directory)

  suite = make_eval_suite(run_config, model, text_mode, text_params, make_tokenize(run_config))
  return {**evaluate(run_config, workdir, suite, state.params, step), "step": float(step)}
