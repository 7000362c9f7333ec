"""Config mistakes, found before a run does any work.

`check(config)` reads the config, the device count and the data directory's `dataset_info.json` (nothing else:
no shard is opened, nothing is written) and raises `ConfigError` on the first mistake, with one paragraph that says
what is wrong and how to fix it. `train.train_and_evaluate` and `train.evaluate_checkpoint` call it first, so a
mistake leaves no workdir, no generated synthetic world and no half-built run behind; `main.py` prints the message
alone (no traceback) and exits with status 2.

What is checked, in order:

  edges      config.loss.edges parse (kinds, modalities); every modality they name has a codec (or is 'text')
             and a tower in config.model.towers
  towers     each tower the edges use names a registered encoder (medbind_jax.models.ENCODERS); the text tower
             has a valid `trunk` and a tokenizer (`init` or `tokenizer`)
  batch      (training) data.batch_size splits over the devices and config.mesh fits them; optim.microbatches
             divides the rows per device; data.linked_per_batch is in [0, batch_size], non-zero exactly when a
             pair edge is active (it may be any such value: `pipeline.BatchSpec` deals linked rows round-robin
             over the devices and masks the prefix slots left over, so it need not divide by the device count)
  data       data.dir is set; it holds a dataset_info.json, unless data.synthetic asks for the synthetic world
             to be generated there (then it must not hold another dataset); the train split (training) and the
             eval split have records; (training) the train split has records of every modality the edges use,
             and linked records for a pair edge (counts from dataset_info.json; whether the linked records have
             the pair's two modalities is left to the pipeline's pool check); with a training mixture
             (data.sources) the same per source: each has records in its split and serves at least one edge, and
             every edge has a source; every dataset of
             config.eval.datasets has a dataset_info.json and records in its split; the probes' support split
             (eval.support_split, or a dataset's own) has records
"""

from __future__ import annotations

import json
import math

import jax

from medbind_jax import paths, runs, sharding
from medbind_jax.data import codecs, schema

TEXT = codecs.TEXT


class ConfigError(ValueError):
  """A mistake in a run's config (or in what it points at): the message says what and names the fix."""


def check(config, *, training: bool = True) -> None:
  """Raises ConfigError on the first mistake in `config` (see the module docstring). `training` False (evaluating
  a trained run's checkpoint): the batch checks and the train split's are skipped (the devices may differ from
  the run's; evaluation covers what the eval split has)."""
  edges = _edges(config)
  _check_towers(config, edges)
  if training:
    _check_batch(config, edges)
  _check_data(config, edges, training)


# ------------------------------------------------------------------------------------------------------------------
# Edges and towers
# ------------------------------------------------------------------------------------------------------------------


def _edges(config):
  if not config.get("loss") or not config.loss.get("edges"):
    raise ConfigError("config.loss.edges is empty: a run needs at least one contrastive edge. Use the default "
                      "edges of configs/medbind.py, or keep some with its edges= argument (e.g. edges=ecg_text).")
  try:
    edges = runs.edges(config)
  except TypeError as err:  # an unknown or missing edge field
    raise ConfigError(f"config.loss.edges: {err}. An edge has the fields modalities, kind, weight and optionally "
                      "logit_scale, negatives, chunk; fix the edge's fields.") from None
  except ValueError as err:
    raise ConfigError(f"{err}; fix that edge in config.loss.edges.") from None
  known = codecs.names()
  for edge in edges:
    for modality in edge.modalities:
      if modality != TEXT and modality not in known:
        raise ConfigError(
            f"loss.edges.{edge.name} names modality {modality!r}, which has no codec (registered: "
            f"{', '.join(known)}, and {TEXT!r} for the reports): fix the modality's name, or register its codec "
            "(medbind_jax.data.codecs.register, see docs/adding_a_modality.md) before the run starts.")
      if modality not in config.model.towers:
        raise ConfigError(
            f"loss.edges.{edge.name} uses modality {modality!r}, but config.model.towers has no {modality!r} "
            f"tower (it has {', '.join(sorted(config.model.towers))}): add config.model.towers.{modality}, or "
            "drop the edge (configs/medbind.py:edges=... keeps only the edges named).")
  return edges


def _check_towers(config, edges) -> None:
  from medbind_jax import models  # pylint: disable=import-outside-toplevel  (flax modules: only when checking)
  for modality in sorted({m for edge in edges for m in edge.modalities}):
    name = config.model.towers[modality].get("name")
    if name not in models.ENCODERS:
      raise ConfigError(
          f"model.towers.{modality}.name={name!r} is not a known encoder; known: {', '.join(sorted(models.ENCODERS))}. "
          f"Set --config.model.towers.{modality}.name to one of them (a new encoder is registered with "
          "medbind_jax.models.register_encoder).")
  if any(TEXT in edge.modalities for edge in edges):
    text = config.model.towers[TEXT]
    trunk = text.get("trunk", "train")
    if trunk not in ("cached", "train"):
      raise ConfigError(f"model.towers.text.trunk={trunk!r}: it must be 'cached' (frozen, its features computed "
                        "once per report) or 'train' (trained end to end); set --config.model.towers.text.trunk.")
    if not (text.get("tokenizer") or text.get("init")):
      raise ConfigError("the text tower has no tokenizer: model.towers.text.init (a pretrained tower: a local "
                        "Hugging Face directory, or 'minilm') and model.towers.text.tokenizer (a local tokenizer "
                        "directory) are both empty. Set one of them, e.g. configs/medbind.py:text_init=DIR.")


# ------------------------------------------------------------------------------------------------------------------
# Batch and devices
# ------------------------------------------------------------------------------------------------------------------


def _check_batch(config, edges) -> None:
  devices = jax.device_count()
  n, m = int(config.data.batch_size), int(config.data.linked_per_batch)
  if n < 1 or n % devices:
    fit = max(1, math.ceil(n / devices)) * devices
    raise ConfigError(
        f"data.batch_size={n} does not split over the {devices} devices (every device takes the same number of "
        f"rows): set it to a multiple of {devices}, e.g. configs/medbind.py:batch_size={fit} or "
        f"--config.data.batch_size={fit}.")
  try:
    sharding.mesh_shape(config.get("mesh", {}), devices)
  except ValueError as err:
    raise ConfigError(f"{err}: set config.mesh so that data x fsdp is the {devices} devices (--config.mesh.fsdp, "
                      "with --config.mesh.data=-1 for the rest).") from None
  rows = n // devices
  k = int(config.optim.get("microbatches", 1))
  if k < 1 or rows % k:
    divisors = [d for d in range(1, rows + 1) if rows % d == 0]
    raise ConfigError(
        f"optim.microbatches={k} must divide the {rows} rows per device (data.batch_size={n} over {devices} "
        f"devices): set --config.optim.microbatches to one of {divisors}, or change the batch size.")
  pair_edges = [edge.name for edge in edges if edge.kind == "pair"]
  if not 0 <= m <= n:
    raise ConfigError(f"data.linked_per_batch={m} must be between 0 and data.batch_size={n}: set "
                      f"configs/medbind.py:linked_per_batch=... (default: batch_size / 4 with a pair edge, else 0).")
  if m and not pair_edges:
    raise ConfigError(
        f"data.linked_per_batch={m}, but no pair edge is active (edges: {', '.join(e.name for e in edges)}): those "
        "rows would be drawn from linked records and scored by no edge. Set linked_per_batch=0 (the default "
        "without a pair edge: leave linked_per_batch out of the config argument), or add a pair edge.")
  if pair_edges and not m:
    raise ConfigError(
        f"data.linked_per_batch=0, so the pair edge(s) {', '.join(pair_edges)} would score no rows (a pair edge "
        "only sees linked rows): set linked_per_batch > 0 (e.g. configs/medbind.py:linked_per_batch="
        f"{max(1, n // 4)}), or drop the edge (configs/medbind.py:edges=... without it).")


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------


def _check_data(config, edges, training: bool) -> None:
  data_dir = config.data.get("dir") or ""
  if not data_dir:
    raise ConfigError(
        "config.data.dir is empty, so there is no data to train on: point it at a directory written by a "
        "data_prep converter (configs/medbind.py:data_dir=DIR, or --config.data.dir=DIR), or leave out `paper` "
        "and data_dir to train on the synthetic world.")
  name, modalities, splits = _dataset(data_dir, synthetic=bool(config.data.get("synthetic")))
  if training and config.data.get("sources"):
    _check_sources(config, edges)
  elif training:
    _check_split(data_dir, name, splits, config.data.train_split, "data.train_split")
    _check_edges_have_data(config, edges, data_dir, name, modalities, splits[config.data.train_split])
  # The evaluation data (eval_datasets: config.eval.datasets, else data.eval_split of data.dir); the probes'
  # support split ('': none) must have records too.
  for i, entry in enumerate(eval_datasets(config)):
    where = f"eval.datasets[{i}]" if entry["name"] else ""
    if entry["dir"] == data_dir:
      eval_name, eval_splits = name, splits
    else:
      eval_name, _, eval_splits = _dataset(entry["dir"], synthetic=False, field=f"config.{where}.dir")
    _check_split(entry["dir"], eval_name, eval_splits, entry["split"],
                 f"{where}.split" if where else "data.eval_split")
    if entry["support_split"]:
      _check_split(entry["dir"], eval_name, eval_splits, entry["support_split"],
                   f"{where}.support_split" if where else "eval.support_split", _SUPPORT_FIX)


def eval_datasets(config) -> list[dict]:
  """The evaluation datasets: `config.eval.datasets` (each {name, dir, split, protocol, support_split}; split,
  protocol and support_split default to config.data.eval_split, config.eval.protocol and
  config.eval.support_split), or, when it is empty, the training data's eval split as one unnamed dataset."""
  defaults = dict(split=config.data.eval_split, protocol=config.eval.protocol,
                  support_split=config.eval.get("support_split", ""))
  entries = [dict(e) for e in (config.eval.get("datasets") or ())]
  if not entries:
    return [dict(defaults, name="", dir=config.data.dir)]
  out, known = [], {"name", "dir", "split", "protocol", "support_split"}
  for i, entry in enumerate(entries):
    unknown = sorted(set(entry) - known)
    name = entry.get("name", "")
    if unknown or not entry.get("dir") or not name or not all(c.isalnum() or c in "_-." for c in name):
      raise ConfigError(
          f"config.eval.datasets[{i}] = {entry}: each entry needs a 'name' (letters, digits, '_', '-', '.'; it "
          f"prefixes the dataset's metrics) and a 'dir' (a converted data directory), and may set 'split', "
          f"'protocol' and 'support_split'" + (f"; unknown keys {unknown}" if unknown else ""))
    out.append({**defaults, **{k: v for k, v in entry.items() if v is not None}})
  names = [e["name"] for e in out]
  if len(set(names)) != len(names):
    raise ConfigError(f"config.eval.datasets: names must be unique, got {names}")
  return out


def _check_sources(config, edges) -> None:
  """A training mixture (config.data.sources): each source is a dataset with records in its split and serves at
  least one edge; every edge has a source (counts from each dataset_info.json; medbind_jax/data/mixture.py
  checks the same on the records' index)."""
  from medbind_jax.data import mixture  # pylint: disable=import-outside-toplevel
  try:
    sources = mixture.sources_from_config(config.data)
  except ValueError as err:
    raise ConfigError(str(err)) from None
  names = [e.name for e in edges]
  served: dict[str, list[str]] = {e.name: [] for e in edges}
  for i, source in enumerate(sources):
    name, modalities, splits = _dataset(source.dir, synthetic=False, field=f"config.data.sources[{i}].dir")
    _check_split(source.dir, name, splits, source.split, f"data.sources[{i}].split")
    counts = splits[source.split]
    unknown = sorted(set(source.weights) - set(names))
    if unknown:
      raise ConfigError(f"config.data.sources[{i}] ({source.label}) weights edges {unknown} that the run does not "
                        f"have (its edges: {', '.join(names)}): fix the names in its 'weights'.")

    def has(m):
      return m == TEXT or (m in modalities and counts.get(f"num_{m}", 1) > 0)

    serves = [e.name for e in edges if all(has(m) for m in e.modalities)
              and (e.kind != "pair" or counts.get("num_linked", 1) > 0)]
    if not serves:
      raise ConfigError(
          f"config.data.sources[{i}] ({source.label}: {source.dir}, split {source.split}, dataset {name!r} with "
          f"{', '.join(modalities) or 'no modalities'}) serves none of the run's edges ("
          + ", ".join(f"{e.name}: {'+'.join(e.modalities)}" for e in edges)
          + "): remove it from config.data.sources, or add an edge for its modalities.")
    for edge in serves:
      served[edge].append(source.label)
  for edge in edges:
    if not served[edge.name] and not (edge.kind == "pair" and not config.data.linked_per_batch):
      what = ("linked records with " + " and ".join(edge.modalities) if edge.kind == "pair"
              else f"{edge.modality} records with reports")
      raise ConfigError(
          f"loss.edges.{edge.name} has no source: none of the training sources ({', '.join(s.label for s in sources)}"
          f") has {what}. Add a source that has them to config.data.sources, or drop the edge (configs/medbind.py:"
          f"edges={'+'.join(n for n in names if n != edge.name)}).")


def _dataset(data_dir: str, *, synthetic: bool, field: str = "data.dir") -> tuple[str, list[str], dict]:
  """(name, declared modalities, splits of dataset_info.json) of `data_dir`; with `synthetic`, of the synthetic
  world that will be generated there (refusing a directory that holds another dataset)."""
  info_path = paths.join(data_dir, schema.DATASET_INFO)
  if synthetic:
    from data_prep import synthetic_world  # pylint: disable=import-outside-toplevel
    if paths.exists(info_path):
      name = json.loads(paths.read_text(info_path)).get("name")
      if name != synthetic_world.DATASET_NAME:
        raise ConfigError(
            f"data.dir={data_dir} holds dataset {name!r}, but config.data.synthetic asks for the synthetic world "
            f"to be generated there. To train on {data_dir}, give it as the config argument "
            f"(configs/medbind.py:data_dir={data_dir}), which turns the synthetic world off; to train on the "
            "synthetic world, choose another data.dir.")
    # What the generated world will hold: CXR and ECG of linked encounters, with reports, in every split.
    return synthetic_world.DATASET_NAME, ["cxr", "ecg"], {s: {"num_examples": 1, "num_linked": 1}
                                                          for s in schema.SPLITS}
  try:
    info = schema.read_dataset_info(data_dir)
  except FileNotFoundError:
    absent = "" if paths.exists(data_dir) else " (the directory does not exist)"
    raise ConfigError(
        f"{field}={data_dir} has no {schema.DATASET_INFO}{absent}, so it is not a MEDBind-JAX data directory: "
        f"convert a dataset into it with a data_prep converter (e.g. python -m data_prep.ptbxl --src PTBXL_DIR "
        f"--out {data_dir}), or point {field} at one (for training data: configs/medbind.py:data_dir=DIR, or "
        "--config.data.dir=DIR).") from None
  except ValueError as err:  # a schema version this code does not read
    raise ConfigError(str(err)) from None
  return info.get("name"), list(info.get("modalities") or ()), info.get("splits", {})


def _has_records(splits: dict, split: str) -> bool:
  return split in splits and splits[split].get("num_examples", 1) > 0


_SUPPORT_FIX = " (the few-shot and linear probes fit on it), or to '' to draw few-shot support from the evaluated split"


def _check_split(data_dir: str, name: str, splits: dict, split: str, field: str, fix: str = "") -> None:
  if not _has_records(splits, split):
    available = [s for s in splits if _has_records(splits, s)]
    raise ConfigError(
        f"{data_dir} (dataset {name!r}) has no records in split {split!r} ({field}); its splits with records: "
        f"{', '.join(available) or 'none'}. Set {'config.' if '[' in field else '--config.'}{field} to one of them"
        f"{fix}.")


def _check_edges_have_data(config, edges, data_dir: str, name: str, modalities: list[str], train: dict) -> None:
  """Every edge has records of its modalities in the train split (`train`: its dataset_info.json entry), and a pair
  edge linked records."""
  split = config.data.train_split

  def missing(edge) -> list[str]:
    return [m for m in edge.modalities if m != TEXT and (m not in modalities or train.get(f"num_{m}", 1) == 0)]

  def servable(edge) -> bool:
    return not missing(edge) and (edge.kind != "pair" or train.get("num_linked", 1) > 0)

  keep = "+".join(edge.name for edge in edges if servable(edge))
  fix = (f"keep only the edges it can train (configs/medbind.py:edges={keep}, or remove the others from "
         "config.loss.edges)" if keep else "none of the configured edges can train on it")
  for edge in edges:
    absent = missing(edge)
    if absent:
      present = [f"{m} ({train.get(f'num_{m}', '?')})" for m in modalities if train.get(f"num_{m}", 1)]
      raise ConfigError(
          f"loss.edges.{edge.name} needs {' and '.join(absent)} records, but the {split} split of {data_dir} "
          f"(dataset {name!r}) has {', '.join(present) or 'no records of any modality'}: {fix}; or train on data "
          f"with {' and '.join(absent)}.")
    if edge.kind == "pair" and train.get("num_linked", 1) == 0:
      raise ConfigError(
          f"the pair edge {edge.name} binds {edge.modalities[0]} and {edge.modalities[1]} of linked records (one "
          f"encounter's), but the {split} split of {data_dir} (dataset {name!r}) has no linked records: {fix}; or "
          "train on linked data (python -m data_prep.mimic links MIMIC CXR and ECG studies).")
