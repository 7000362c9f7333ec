"""Input pipeline: an index over TFRecord shards, and grain datasets of static-shaped training batches.

Batch layout (one process's share of a global batch of `n` CXR-text and `n` ECG-text pairs):

  cxr            float32 [b, S, S, C]      ecg            float32 [b, T, leads]
  cxr_text       text inputs (see text.py)  ecg_text       text inputs
  cxr_text_key   int32 [b, 2]              ecg_text_key   int32 [b, 2]      (equal key = same report text)
  linked         bool [b]                  rows < m_local hold the CXR and ECG of one linked encounter
  cxr_index      int32 [b]                 ecg_index      int32 [b]         record numbers in the split index

with b = n / process_count. The first m_local rows come from linked encounters; the rest draw a CXR and an ECG
independently from all records with that modality. Each pool is an endless stream, reshuffled every epoch;
global step t takes stream items [t*k, (t+1)*k) of each pool and process p takes its slice of those. So the
global batch at a step does not depend on the number of processes, and the whole order is a function of the
seed: restoring the iterator's position restores the data exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterator, Sequence

import grain
import numpy as np
import tqdm

from medbind_jax.data import preprocess, schema, tfrecord
from medbind_jax.data.preprocess import CxrSpec, EcgSpec

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Index
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RecordMeta:
  ref: tfrecord.FrameRef
  encounter_id: str
  patient_id: str
  has_cxr: bool
  has_ecg: bool
  linked: bool
  cxr_report: str
  ecg_report: str


@dataclasses.dataclass
class SplitIndex:
  """Every readable record of one split, in shard order, and what was skipped to get there."""

  data_dir: str
  split: str
  records: list[RecordMeta]
  info: dict
  skipped: list[tuple[str, int, str]]  # (file, byte offset, reason)
  num_missing: int  # records dataset_info.json promises that could not be read (skip mode only)

  def pool(self, kind: str) -> np.ndarray:
    """Record numbers of the pool `kind` in ('linked', 'cxr', 'ecg')."""
    key = {"linked": "linked", "cxr": "has_cxr", "ecg": "has_ecg"}[kind]
    return np.array([i for i, r in enumerate(self.records) if getattr(r, key)], np.int64)


def index_split(data_dir: str, split: str, *, skip_corrupt: bool = False, progress: bool = True) -> SplitIndex:
  """Reads every shard of `split` once, verifying CRCs and counts against `dataset_info.json`.

  Raises `tfrecord.CorruptRecordError` (file and byte offset) on the first bad record, and ValueError when a
  shard holds fewer or more records than `dataset_info.json` lists, unless `skip_corrupt`: then bad records are
  left out, each is logged, and the totals are kept in `skipped` / `num_missing`. Nothing is dropped silently.
  """
  info = schema.read_dataset_info(data_dir)
  if split not in info["splits"]:
    raise ValueError(f"{data_dir} has no split {split!r}; it has {sorted(info['splits'])}")
  shards = info["splits"][split]["shards"]
  records: list[RecordMeta] = []
  skipped: list[tuple[str, int, str]] = []
  num_missing = 0
  bar = tqdm.tqdm(shards, desc=f"index {split}", unit="shard", disable=not progress, leave=False)
  for shard in bar:
    path = os.path.join(data_dir, shard["file"])
    if not os.path.exists(path):
      if not skip_corrupt:
        raise FileNotFoundError(f"{path} is listed in dataset_info.json but missing")
      log.warning("skipping missing shard %s (%d records)", path, shard["num_examples"])
      skipped.append((path, 0, "missing shard"))
      num_missing += shard["num_examples"]
      continue
    problems: list[tuple[str, int, str]] = []
    found = 0
    for ref, data in tfrecord.iter_records(path, skip_corrupt=skip_corrupt, problems=problems):
      enc = schema.decode_encounter(data)
      records.append(RecordMeta(ref, enc.encounter_id, enc.patient_id, enc.has_cxr, enc.has_ecg, enc.linked,
                                enc.cxr_report, enc.ecg_report))
      found += 1
    skipped.extend(problems)
    if found != shard["num_examples"]:
      message = (f"{path}: dataset_info.json lists {shard['num_examples']} records but {found} could be read"
                 + (f" ({len(problems)} damaged)" if problems else ""))
      if not skip_corrupt:
        raise ValueError(message + "; the shard is truncated or was replaced. Re-run the converter, or set "
                         "config.data.skip_corrupt=True to train on what is readable.")
      log.warning("%s", message)
      num_missing += shard["num_examples"] - found
  if skipped or num_missing:
    log.warning("%s/%s: %d damaged records skipped, %d listed records unreadable in all",
                data_dir, split, len(skipped), num_missing)
  return SplitIndex(data_dir, split, records, info, skipped, num_missing)


# ----------------------------------------------------------------------------------------------------------------
# Example decoding
# ----------------------------------------------------------------------------------------------------------------


class ExampleReader:
  """Random access to decoded model inputs of the records of a SplitIndex. Picklable (for grain workers)."""

  def __init__(self, index: SplitIndex, cxr: CxrSpec, ecg: EcgSpec):
    self.refs = [r.ref for r in index.records]
    self.cxr_spec, self.ecg_spec = cxr, ecg
    self.reader = tfrecord.RecordReader()

  def encounter(self, i: int) -> schema.Encounter:
    return schema.decode_encounter(self.reader.read(self.refs[i]))

  def cxr(self, enc: schema.Encounter, rng) -> np.ndarray:
    return preprocess.preprocess_cxr(enc.cxr_image, self.cxr_spec, rng, name=enc.encounter_id)

  def ecg(self, enc: schema.Encounter, rng) -> np.ndarray:
    return preprocess.preprocess_ecg(preprocess.record_ecg_mv(enc), enc.ecg_sampling_rate, self.ecg_spec,
                                     enc.ecg_leads, rng, name=enc.encounter_id)


# ----------------------------------------------------------------------------------------------------------------
# Training batches
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  global_batch_size: int  # n: CXR-text pairs (and ECG-text pairs) per global batch
  linked_per_batch: int  # m: rows that come from linked encounters
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    n, m, procs = self.global_batch_size, self.linked_per_batch, self.process_count
    if n % procs or m % procs:
      raise ValueError(f"batch_size {n} and linked_per_batch {m} must both divide by the {procs} processes")
    if not 0 <= m <= n:
      raise ValueError(f"linked_per_batch must be in [0, batch_size={n}], got {m}")

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  @property
  def local_linked(self) -> int:
    return self.linked_per_batch // self.process_count


class _AssembleBatch(grain.transforms.Map):
  """Global step index -> this process's batch (see the module docstring for the layout)."""

  def __init__(self, reader: ExampleReader, pools: dict, text_inputs, spec: BatchSpec, seed: int, augment: bool,
               index: SplitIndex):
    self.reader, self.pools, self.text_inputs, self.spec = reader, pools, text_inputs, spec
    self.seed, self.augment = seed, augment
    self.cxr_texts = [r.cxr_report for r in index.records]
    self.ecg_texts = [r.ecg_report for r in index.records]

  def _stream_slice(self, pool: str, step: int, per_step: int, per_process: int) -> list[int]:
    start = step * per_step + self.spec.process_index * per_process
    return [int(self.pools[pool][k]) for k in range(start, start + per_process)]

  def map(self, step: int) -> dict:
    spec = self.spec
    linked = self._stream_slice("linked", step, spec.linked_per_batch, spec.local_linked)
    unlinked = spec.global_batch_size - spec.linked_per_batch
    local_unlinked = spec.local_batch_size - spec.local_linked
    cxr_ids = linked + self._stream_slice("cxr", step, unlinked, local_unlinked)
    ecg_ids = linked + self._stream_slice("ecg", step, unlinked, local_unlinked)
    cxr, ecg = [], []
    for row, (ci, ei) in enumerate(zip(cxr_ids, ecg_ids)):
      # One generator per (step, process, row): augmentation does not depend on thread timing.
      rng = (np.random.default_rng([self.seed, step, spec.process_index, row]) if self.augment else None)
      enc = self.reader.encounter(ci)
      cxr.append(self.reader.cxr(enc, rng))
      if ei != ci:
        enc = self.reader.encounter(ei)
      ecg.append(self.reader.ecg(enc, rng))
    cxr_texts = [self.cxr_texts[i] for i in cxr_ids]
    ecg_texts = [self.ecg_texts[i] for i in ecg_ids]
    return {
        "cxr": np.stack(cxr),
        "ecg": np.stack(ecg),
        "cxr_text": self.text_inputs(cxr_texts),
        "ecg_text": self.text_inputs(ecg_texts),
        "cxr_text_key": np.stack([preprocess.text_key(t) for t in cxr_texts]),
        "ecg_text_key": np.stack([preprocess.text_key(t) for t in ecg_texts]),
        "linked": np.arange(spec.local_batch_size) < spec.local_linked,
        "cxr_index": np.asarray(cxr_ids, np.int32),
        "ecg_index": np.asarray(ecg_ids, np.int32),
    }


def train_dataset(index: SplitIndex, text_inputs, spec: BatchSpec, *, cxr: CxrSpec, ecg: EcgSpec, seed: int,
                  augment: bool = True) -> grain.MapDataset:
  """MapDataset whose item t is this process's batch for global step t (endless)."""
  pools = {}
  for kind in ("linked", "cxr", "ecg"):
    records = index.pool(kind)
    if len(records) == 0 and (kind != "linked" or spec.linked_per_batch):
      raise ValueError(f"{index.data_dir}/{index.split} has no records for the {kind!r} pool "
                       f"(linked_per_batch={spec.linked_per_batch})")
    # Each pool gets its own seed stream; reshuffled every epoch.
    pools[kind] = (grain.MapDataset.source(records).shuffle(seed=seed * 3 + len(pools)).repeat()
                   if len(records) else [])
  assemble = _AssembleBatch(ExampleReader(index, cxr, ecg), pools, text_inputs, spec, seed, augment, index)
  return grain.MapDataset.range(0, 1 << 62).map(assemble)


def train_iterator(dataset: grain.MapDataset, *, num_threads: int, prefetch: int) -> grain.DatasetIterator:
  """A checkpointable iterator over `dataset` with `num_threads` reader threads (grain's state = next step)."""
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(dataset.to_iter_dataset(read))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation batches
# ----------------------------------------------------------------------------------------------------------------


def eval_batches(index: SplitIndex, modality: str, batch_size: int, *, cxr: CxrSpec, ecg: EcgSpec,
                 text_inputs=None, records: Sequence[int] | None = None,
                 num_threads: int = 2) -> Iterator[dict]:
  """Fixed-size batches over the records with `modality` ('cxr', 'ecg' or 'text' = CXR and ECG reports is not
  meant; use 'cxr' / 'ecg' and read the text fields), in index order, the last padded. Each batch has `valid`
  [batch_size] bool, `index` (record numbers), `labels`, the modality input and its report's text inputs."""
  if modality not in ("cxr", "ecg"):
    raise ValueError(f"modality must be 'cxr' or 'ecg', got {modality!r}")
  if records is None:
    records = index.pool(modality)
  records = np.asarray(records, np.int64)
  reader = ExampleReader(index, cxr, ecg)
  texts = [getattr(r, f"{modality}_report") for r in index.records]

  def load(batch_start: int) -> dict:
    ids = records[batch_start:batch_start + batch_size]
    encs = [reader.encounter(int(i)) for i in ids]
    inputs = [reader.cxr(e, None) if modality == "cxr" else reader.ecg(e, None) for e in encs]
    labels = [np.asarray(getattr(e, f"{modality}_labels"), np.float32) for e in encs]
    pad = batch_size - len(ids)
    batch_texts = [texts[i] for i in ids] + [""] * pad
    out = {
        modality: np.concatenate([np.stack(inputs), np.zeros((pad,) + inputs[0].shape, np.float32)]),
        "valid": np.arange(batch_size) < len(ids),
        "index": np.concatenate([ids, np.full(pad, -1)]).astype(np.int32),
        "labels": np.concatenate([np.stack(labels), np.zeros((pad,) + labels[0].shape, np.float32)]),
        "text_key": np.stack([preprocess.text_key(t) for t in batch_texts]),
    }
    if text_inputs is not None:
      out["text"] = text_inputs(batch_texts)
    return out

  starts = grain.MapDataset.source(list(range(0, len(records), batch_size))).map(load)
  yield from starts.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4))
