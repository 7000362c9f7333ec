"""The record schema: one `tf.train.Example` per encounter, and the `dataset_info.json` beside the shards.

Every source (the synthetic world, MIMIC, PTB-XL, ...) is converted into this one schema, so the training and
evaluation pipelines have a single reader. Feature keys (schema version 1):

  ids        encounter_id, patient_id, dataset, split (bytes); linked (int64: 1 when the CXR and the ECG of
             this record come from the same encounter and may be bound by EMCL)
  cxr/...    image (encoded PNG or JPEG bytes; empty when the record has no CXR), report (UTF-8), labels
             (float list, one per `cxr_label_names`: 1 present, 0 absent, -1 uncertain or unknown),
             study_id (bytes), time (float, seconds since the epoch; NaN when unknown)
  extra/...  optional source-specific float lists (ignored by the training pipeline)
  ecg/...    samples (int16 little-endian bytes, row-major [num_samples, num_leads]; empty when no ECG),
             gain (float list per lead, ADC units per mV: value_mV = sample / gain), leads (bytes list, lead
             names), sampling_rate (float, Hz), num_samples (int64), report, labels, study_id, time

Shards are named `{split}.tfrecord-{index:05d}-of-{count:05d}`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

SCHEMA_VERSION = 1
DATASET_INFO = "dataset_info.json"
SPLITS = ("train", "val", "test")
# Canonical 12-lead order; converters map leads by name into this order, never by position.
LEADS_12 = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


@dataclasses.dataclass
class Encounter:
  """One record. A modality is absent when its payload (`cxr_image` / `ecg_samples`) is empty/None."""

  encounter_id: str
  patient_id: str
  split: str
  dataset: str
  linked: bool = False
  cxr_image: bytes = b""
  cxr_report: str = ""
  cxr_labels: Sequence[float] = ()
  cxr_study_id: str = ""
  cxr_time: float = math.nan
  ecg_samples: np.ndarray | None = None  # int16 [num_samples, num_leads]
  ecg_gain: Sequence[float] = ()
  ecg_leads: Sequence[str] = LEADS_12
  ecg_sampling_rate: float = 0.0
  ecg_report: str = ""
  ecg_labels: Sequence[float] = ()
  ecg_study_id: str = ""
  ecg_time: float = math.nan
  # Source-specific float values kept beside the schema (e.g. the synthetic world's latent severities),
  # stored as `extra/{name}` float lists; readers that do not know them ignore them.
  extras: Mapping[str, Sequence[float]] = dataclasses.field(default_factory=dict)

  @property
  def has_cxr(self) -> bool:
    return bool(self.cxr_image)

  @property
  def has_ecg(self) -> bool:
    return self.ecg_samples is not None and self.ecg_samples.size > 0


def _bytes(*values: bytes | str) -> tf_feature_pb2.Feature:
  return tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(
      value=[v.encode("utf-8") if isinstance(v, str) else v for v in values]))


def _floats(values: Iterable[float]) -> tf_feature_pb2.Feature:
  return tf_feature_pb2.Feature(float_list=tf_feature_pb2.FloatList(value=list(values)))


def _ints(values: Iterable[int]) -> tf_feature_pb2.Feature:
  return tf_feature_pb2.Feature(int64_list=tf_feature_pb2.Int64List(value=list(values)))


def encode_encounter(enc: Encounter) -> bytes:
  """Serialises an Encounter to `tf.train.Example` bytes, checking what a reader will rely on."""
  if enc.split not in SPLITS:
    raise ValueError(f"{enc.encounter_id}: split must be one of {SPLITS}, got {enc.split!r}")
  if enc.linked and not (enc.has_cxr and enc.has_ecg):
    raise ValueError(f"{enc.encounter_id}: linked=True needs both a CXR and an ECG")
  feats: dict[str, tf_feature_pb2.Feature] = {
      "encounter_id": _bytes(enc.encounter_id),
      "patient_id": _bytes(enc.patient_id),
      "split": _bytes(enc.split),
      "dataset": _bytes(enc.dataset),
      "linked": _ints([int(enc.linked)]),
      "cxr/image": _bytes(enc.cxr_image),
      "cxr/report": _bytes(enc.cxr_report),
      "cxr/labels": _floats(enc.cxr_labels),
      "cxr/study_id": _bytes(enc.cxr_study_id),
      "cxr/time": _floats([enc.cxr_time]),
  }
  if enc.has_ecg:
    samples = np.asarray(enc.ecg_samples)
    if samples.dtype != np.int16 or samples.ndim != 2:
      raise ValueError(f"{enc.encounter_id}: ecg_samples must be int16 [num_samples, num_leads], "
                       f"got {samples.dtype} {samples.shape}")
    if len(enc.ecg_leads) != samples.shape[1] or len(enc.ecg_gain) != samples.shape[1]:
      raise ValueError(f"{enc.encounter_id}: {samples.shape[1]} ECG columns but {len(enc.ecg_leads)} lead "
                       f"names and {len(enc.ecg_gain)} gains")
    if not enc.ecg_sampling_rate > 0:
      raise ValueError(f"{enc.encounter_id}: ecg_sampling_rate must be positive")
    feats.update({
        "ecg/samples": _bytes(samples.astype("<i2", copy=False).tobytes()),
        "ecg/gain": _floats(enc.ecg_gain),
        "ecg/leads": _bytes(*enc.ecg_leads),
        "ecg/sampling_rate": _floats([enc.ecg_sampling_rate]),
        "ecg/num_samples": _ints([samples.shape[0]]),
    })
  else:
    feats.update({"ecg/samples": _bytes(b""), "ecg/gain": _floats([]), "ecg/leads": _bytes(),
                  "ecg/sampling_rate": _floats([0.0]), "ecg/num_samples": _ints([0])})
  feats.update({
      "ecg/report": _bytes(enc.ecg_report),
      "ecg/labels": _floats(enc.ecg_labels),
      "ecg/study_id": _bytes(enc.ecg_study_id),
      "ecg/time": _floats([enc.ecg_time]),
  })
  for name, values in enc.extras.items():
    feats[f"extra/{name}"] = _floats(np.atleast_1d(np.asarray(values, np.float32)).tolist())
  example = tf_example_pb2.Example(features=tf_feature_pb2.Features(feature=feats))
  # Deterministic: map fields would otherwise be ordered by a per-process hash seed, giving different bytes
  # for the same record in different processes.
  return example.SerializeToString(deterministic=True)


def _parse(data: bytes) -> Mapping[str, tf_feature_pb2.Feature]:
  example = tf_example_pb2.Example()
  example.ParseFromString(data)
  return example.features.feature


def _str(feats, key: str) -> str:
  values = feats[key].bytes_list.value
  return values[0].decode("utf-8") if values else ""


def decode_encounter(data: bytes) -> Encounter:
  """Parses `tf.train.Example` bytes written by `encode_encounter` (or any converter of this schema)."""
  f = _parse(data)
  ecg_raw = f["ecg/samples"].bytes_list.value[0] if f["ecg/samples"].bytes_list.value else b""
  leads = tuple(v.decode("utf-8") for v in f["ecg/leads"].bytes_list.value)
  samples = None
  if ecg_raw:
    samples = np.frombuffer(ecg_raw, dtype="<i2").reshape(-1, len(leads))
  return Encounter(
      encounter_id=_str(f, "encounter_id"),
      patient_id=_str(f, "patient_id"),
      split=_str(f, "split"),
      dataset=_str(f, "dataset"),
      linked=bool(f["linked"].int64_list.value[0]),
      cxr_image=f["cxr/image"].bytes_list.value[0] if f["cxr/image"].bytes_list.value else b"",
      cxr_report=_str(f, "cxr/report"),
      cxr_labels=np.asarray(f["cxr/labels"].float_list.value, np.float32),
      cxr_study_id=_str(f, "cxr/study_id"),
      cxr_time=f["cxr/time"].float_list.value[0],
      ecg_samples=samples,
      ecg_gain=np.asarray(f["ecg/gain"].float_list.value, np.float32),
      ecg_leads=leads,
      ecg_sampling_rate=f["ecg/sampling_rate"].float_list.value[0],
      ecg_report=_str(f, "ecg/report"),
      ecg_labels=np.asarray(f["ecg/labels"].float_list.value, np.float32),
      ecg_study_id=_str(f, "ecg/study_id"),
      ecg_time=f["ecg/time"].float_list.value[0],
      extras={k[len("extra/"):]: np.asarray(v.float_list.value, np.float32)
              for k, v in f.items() if k.startswith("extra/")},
  )


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}.tfrecord-{index:05d}-of-{count:05d}"


@dataclasses.dataclass
class ShardStats:
  """Counts of one written shard, as recorded in `dataset_info.json`."""

  file: str
  num_examples: int = 0
  num_cxr: int = 0
  num_ecg: int = 0
  num_linked: int = 0

  def add(self, enc: Encounter) -> None:
    self.num_examples += 1
    self.num_cxr += enc.has_cxr
    self.num_ecg += enc.has_ecg
    self.num_linked += bool(enc.linked)


def write_dataset_info(out_dir: str | os.PathLike, *, name: str, shards: Mapping[str, Sequence[ShardStats]],
                       cxr_label_names: Sequence[str], ecg_label_names: Sequence[str],
                       **extra: Any) -> dict:
  """Writes `dataset_info.json` (atomically) from per-shard counts; extra keys (source, licence, params...)
  are stored as given. Returns the dict written."""
  splits = {}
  for split, stats in shards.items():
    stats = sorted(stats, key=lambda s: s.file)
    splits[split] = {
        "num_examples": sum(s.num_examples for s in stats),
        "num_cxr": sum(s.num_cxr for s in stats),
        "num_ecg": sum(s.num_ecg for s in stats),
        "num_linked": sum(s.num_linked for s in stats),
        "shards": [dataclasses.asdict(s) for s in stats],
    }
  info = {"schema_version": SCHEMA_VERSION, "name": name, "cxr_label_names": list(cxr_label_names),
          "ecg_label_names": list(ecg_label_names), "splits": splits, **extra}
  path = os.path.join(out_dir, DATASET_INFO)
  with open(path + ".tmp", "w") as f:
    json.dump(info, f, indent=2)
  os.replace(path + ".tmp", path)
  return info


def read_dataset_info(data_dir: str | os.PathLike) -> dict:
  path = os.path.join(data_dir, DATASET_INFO)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no {DATASET_INFO} in {data_dir}: is this a MEDBind-JAX data directory? "
                            "Create one with a data_prep converter.")
  with open(path) as f:
    info = json.load(f)
  if info.get("schema_version") != SCHEMA_VERSION:
    raise ValueError(f"{path}: schema_version {info.get('schema_version')} but this code reads "
                     f"{SCHEMA_VERSION}; re-run the converter")
  return info
