"""The record schema: one `tf.train.Example` per encounter, and the `dataset_info.json` beside the shards.

Every source (the synthetic world, MIMIC, PTB-XL, ...) is converted into this one schema, so the training and
evaluation pipelines have a single reader. A record holds any subset of the registered modalities
(`medbind_jax.data.codecs`); every feature of modality `m` is prefixed `m/`. Feature keys (schema version 2):

  ids        encounter_id, patient_id, dataset, split (bytes); linked (int64: 1 when the modalities of this
             record come from one encounter and may be bound by `pair` edges)
  m/...      for each modality the record has: the codec's payload features (CXR: image, encoded PNG or JPEG
             bytes; ECG: samples, int16 little-endian bytes [num_samples, num_leads], gain per lead in ADC units
             per mV, leads, sampling_rate, num_samples), and report (UTF-8), labels (float list, one per
             `{m}_label_names`: 1 present, 0 absent, -1 uncertain or unknown), study_id (bytes), time (float,
             seconds since the epoch; NaN when unknown)
  extra/...  optional source-specific float lists (ignored by the training pipeline)

Version 1 (written before modalities were keyed) had the same keys but wrote the CXR and ECG features of every
record, empty for an absent modality; readers accept both versions, so datasets converted then need no
re-conversion. Version 2 writes only the modalities a record has, and dataset_info.json lists them.

Shards are named `{split}.tfrecord-{index:05d}-of-{count:05d}`; beside each, its index `{split}.index-...`
(`medbind_jax.data.shard_index`: each record's position, ids and report texts, so start-up need not read the
records), named in the shard's `dataset_info.json` entry as `"index"`. Readers that do not know indexes ignore both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

from medbind_jax import paths

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
DATASET_INFO = "dataset_info.json"
SPLITS = ("train", "val", "test")
# Canonical 12-lead order; converters map leads by name into this order, never by position.
LEADS_12 = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


@dataclasses.dataclass
class Part:
  """One modality of an encounter: the codec's payload (CXR: encoded image bytes; ECG: `codecs.EcgData`) and
  what the record says about it."""

  data: Any
  report: str = ""
  labels: Sequence[float] = ()
  study_id: str = ""
  time: float = math.nan


@dataclasses.dataclass
class Encounter:
  """One record: ids and the modalities it has (`parts`, keyed by modality name)."""

  encounter_id: str
  patient_id: str
  split: str
  dataset: str
  linked: bool = False
  parts: dict[str, Part] = dataclasses.field(default_factory=dict)
  # Source-specific float values kept beside the schema (e.g. the synthetic world's latent severities),
  # stored as `extra/{name}` float lists; readers that do not know them ignore them.
  extras: Mapping[str, Sequence[float]] = dataclasses.field(default_factory=dict)

  def has(self, modality: str) -> bool:
    return modality in self.parts

  def part(self, modality: str) -> Part:
    if modality not in self.parts:
      raise KeyError(f"encounter {self.encounter_id} has no {modality!r} (it has {sorted(self.parts)})")
    return self.parts[modality]


def bytes_feature(*values: bytes | str) -> tf_feature_pb2.Feature:
  return tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(
      value=[v.encode("utf-8") if isinstance(v, str) else v for v in values]))


def floats_feature(values: Iterable[float]) -> tf_feature_pb2.Feature:
  return tf_feature_pb2.Feature(float_list=tf_feature_pb2.FloatList(value=list(values)))


def ints_feature(values: Iterable[int]) -> tf_feature_pb2.Feature:
  return tf_feature_pb2.Feature(int64_list=tf_feature_pb2.Int64List(value=list(values)))


def feature_str(feats: Mapping[str, tf_feature_pb2.Feature], key: str) -> str:
  values = feats[key].bytes_list.value if key in feats else ()
  return values[0].decode("utf-8") if values else ""


def feature_float(feats: Mapping[str, tf_feature_pb2.Feature], key: str, default: float = math.nan) -> float:
  values = feats[key].float_list.value if key in feats else ()
  return values[0] if values else default


def encode_encounter(enc: Encounter) -> bytes:
  """Serialises an Encounter to `tf.train.Example` bytes, checking what a reader will rely on."""
  from medbind_jax.data import codecs  # pylint: disable=import-outside-toplevel  (codecs build on this module)
  if enc.split not in SPLITS:
    raise ValueError(f"{enc.encounter_id}: split must be one of {SPLITS}, got {enc.split!r}")
  if enc.linked and len(enc.parts) < 2:
    raise ValueError(f"{enc.encounter_id}: linked=True needs at least two modalities, has {sorted(enc.parts)}")
  feats: dict[str, tf_feature_pb2.Feature] = {
      "encounter_id": bytes_feature(enc.encounter_id),
      "patient_id": bytes_feature(enc.patient_id),
      "split": bytes_feature(enc.split),
      "dataset": bytes_feature(enc.dataset),
      "linked": ints_feature([int(enc.linked)]),
  }
  for modality, part in enc.parts.items():
    payload = codecs.get(modality).encode(part.data, name=f"{enc.encounter_id}/{modality}")
    feats.update({f"{modality}/{key}": value for key, value in payload.items()})
    feats.update({
        f"{modality}/report": bytes_feature(part.report),
        f"{modality}/labels": floats_feature(part.labels),
        f"{modality}/study_id": bytes_feature(part.study_id),
        f"{modality}/time": floats_feature([part.time]),
    })
  for name, values in enc.extras.items():
    feats[f"extra/{name}"] = floats_feature(np.atleast_1d(np.asarray(values, np.float32)).tolist())
  example = tf_example_pb2.Example(features=tf_feature_pb2.Features(feature=feats))
  # Deterministic: map fields would otherwise be ordered by a per-process hash seed, giving different bytes
  # for the same record in different processes.
  return example.SerializeToString(deterministic=True)


def parse_features(data: bytes) -> Mapping[str, tf_feature_pb2.Feature]:
  example = tf_example_pb2.Example()
  example.ParseFromString(data)
  return example.features.feature


def decode_encounter(data: bytes, modalities: Iterable[str] | None = None, extras: bool = True) -> Encounter:
  """Parses `tf.train.Example` bytes of either schema version. `modalities`: the ones to decode (default every
  registered codec); a record's other modalities are left out. `extras` False: `Encounter.extras` left empty (the
  training reader's case: two dozen small arrays per record it never reads)."""
  from medbind_jax.data import codecs  # pylint: disable=import-outside-toplevel
  f = parse_features(data)
  parts = {}
  for modality in (codecs.names() if modalities is None else modalities):
    payload = codecs.get(modality).decode(f, prefix=f"{modality}/")
    if payload is None:  # absent (v2: no features; v1: empty payload)
      continue
    parts[modality] = Part(
        data=payload,
        report=feature_str(f, f"{modality}/report"),
        labels=np.asarray(f[f"{modality}/labels"].float_list.value if f"{modality}/labels" in f else (),
                          np.float32),
        study_id=feature_str(f, f"{modality}/study_id"),
        time=feature_float(f, f"{modality}/time"),
    )
  return Encounter(
      encounter_id=feature_str(f, "encounter_id"),
      patient_id=feature_str(f, "patient_id"),
      split=feature_str(f, "split"),
      dataset=feature_str(f, "dataset"),
      linked=bool(f["linked"].int64_list.value[0]),
      parts=parts,
      extras={k[len("extra/"):]: np.asarray(v.float_list.value, np.float32)
              for k, v in f.items() if k.startswith("extra/")} if extras else {},
  )


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}.tfrecord-{index:05d}-of-{count:05d}"


@dataclasses.dataclass
class ShardStats:
  """Counts of one written shard, as recorded in `dataset_info.json` (`num_{modality}` per modality)."""

  file: str
  num_examples: int = 0
  num_linked: int = 0
  num_by_modality: dict[str, int] = dataclasses.field(default_factory=dict)
  index: str = ""  # the shard's index file (`shard_index`), when one was written

  def add(self, enc: Encounter) -> None:
    self.num_examples += 1
    self.num_linked += bool(enc.linked)
    for modality in enc.parts:
      self.num_by_modality[modality] = self.num_by_modality.get(modality, 0) + 1

  def to_json(self, modalities: Sequence[str]) -> dict:
    return {"file": self.file, "num_examples": self.num_examples,
            **{f"num_{m}": self.num_by_modality.get(m, 0) for m in modalities}, "num_linked": self.num_linked,
            **({"index": self.index} if self.index else {})}

  @classmethod
  def from_json(cls, entry: Mapping[str, Any], modalities: Sequence[str]) -> ShardStats:
    return cls(entry["file"], entry["num_examples"], entry["num_linked"],
               {m: entry.get(f"num_{m}", 0) for m in modalities}, entry.get("index", ""))


def write_dataset_info(out_dir: str | os.PathLike, *, name: str, shards: Mapping[str, Sequence[ShardStats]],
                       label_names: Mapping[str, Sequence[str]], **extra: Any) -> dict:
  """Writes `dataset_info.json` (atomically) from per-shard counts; `label_names` maps each modality the
  dataset may hold to its label columns (stored as `{modality}_label_names`); extra keys (source, licence,
  params...) are stored as given. Returns the dict written."""
  modalities = list(label_names)
  splits = {}
  for split, stats in shards.items():
    stats = sorted(stats, key=lambda s: s.file)
    entries = [s.to_json(modalities) for s in stats]
    splits[split] = {
        "num_examples": sum(e["num_examples"] for e in entries),
        **{f"num_{m}": sum(e[f"num_{m}"] for e in entries) for m in modalities},
        "num_linked": sum(e["num_linked"] for e in entries),
        "shards": entries,
    }
  info = {"schema_version": SCHEMA_VERSION, "name": name, "modalities": modalities,
          **{f"{m}_label_names": list(names) for m, names in label_names.items()}, "splits": splits, **extra}
  paths.write_text_atomic(paths.join(out_dir, DATASET_INFO), json.dumps(info, indent=2))
  return info


def record_shard_indexes(data_dir: str | os.PathLike, indexes: Mapping[str, str]) -> bool:
  """Names each shard's index in `dataset_info.json` (`indexes`: shard file -> index file), rewriting the file
  atomically and leaving every other key as it was (a version-1 file stays version 1). Returns whether anything
  changed. Several processes may call this at once: each writes through its own temporary file, and a lost update
  costs nothing, since readers also look for an index under its default name."""
  path = paths.join(data_dir, DATASET_INFO)
  info = json.loads(paths.read_text(path))
  changed = False
  for split in info.get("splits", {}).values():
    for shard in split.get("shards", []):
      name = indexes.get(shard.get("file"))
      if name and shard.get("index") != name:
        shard["index"], changed = name, True
  if changed:
    paths.write_text_atomic(path, json.dumps(info, indent=2))
  return changed


def read_dataset_info(data_dir: str | os.PathLike) -> dict:
  """dataset_info.json of `data_dir`, either schema version; a version-1 file gets its `modalities` ('cxr',
  'ecg') filled in, so readers see one form."""
  path = paths.join(data_dir, DATASET_INFO)
  if not paths.exists(path):
    raise FileNotFoundError(f"no {DATASET_INFO} in {data_dir}: is this a MEDBind-JAX data directory? "
                            "Create one with a data_prep converter.")
  info = json.loads(paths.read_text(path))
  version = info.get("schema_version")
  if version not in READABLE_VERSIONS:
    raise ValueError(f"{path}: schema_version {version} but this code reads versions {READABLE_VERSIONS}; "
                     + ("update MEDBind-JAX" if isinstance(version, int) and version > SCHEMA_VERSION
                        else "re-run the converter"))
  if version == 1:
    info["modalities"] = ["cxr", "ecg"]
  return info


def label_names(info: Mapping[str, Any], modality: str) -> list[str]:
  """The label columns `info` (dataset_info.json) declares for `modality` (empty when it has none)."""
  return list(info.get(f"{modality}_label_names", []))
