"""Input pipeline: an index over TFRecord shards, and grain datasets of static-shaped training batches.

Batch layout (one process's share of a global batch of `n` rows of every modality the edges use):

  inputs     {modality: float32 [b, ...]}  the codec's model input per row
  reports    {modality: text inputs}       the rows' report texts (see text.py), for modalities of tmcl edges
  text_key   {modality: int32 [b, 2]}      equal key = same report text
  pair_mask  {pair edge: bool [b]}         rows that hold the two modalities of one linked encounter
  index      {modality: int32 [b]}         record numbers in the split index

with b = n / process_count. The process's rows are split into `shards` equal consecutive blocks, one per local
device, and the m_local linked rows (from linked encounters that have every modality of the pair edges; those
modalities of a row are one encounter's) sit at the start of the blocks, dealt round-robin: block s holds linked
rows s, s + shards, ... So every device's linked rows are a static prefix of `linked_rows_per_shard` rows
(the last prefix slots of some blocks hold unlinked rows, masked out, when m_local does not divide by
`shards`), and a pair edge scores only that prefix. Every other row and modality draws independently from all
records with that modality. With one shard the first m_local rows are the linked ones. Each pool is an endless
stream, reshuffled every epoch;
global step t takes stream items [t*k, (t+1)*k) of each pool and process p takes its slice of those. So the
global batch at a step does not depend on the number of processes, and the whole order is a function of the
seed: restoring the iterator's position restores the data exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np
import tqdm

from medbind_jax.data import codecs, preprocess, schema, tfrecord

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Index
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RecordMeta:
  ref: tfrecord.FrameRef
  encounter_id: str
  patient_id: str
  linked: bool
  modalities: tuple[str, ...]  # the registered modalities the record has
  reports: Mapping[str, str]  # modality -> report text

  def has(self, modality: str) -> bool:
    return modality in self.modalities


@dataclasses.dataclass
class SplitIndex:
  """Every readable record of one split, in shard order, and what was skipped to get there."""

  data_dir: str
  split: str
  records: list[RecordMeta]
  info: dict
  skipped: list[tuple[str, int, str]]  # (file, byte offset, reason)
  num_missing: int  # records dataset_info.json promises that could not be read (skip mode only)

  def pool(self, modality: str) -> np.ndarray:
    """Record numbers of the records that have `modality`."""
    return np.array([i for i, r in enumerate(self.records) if r.has(modality)], np.int64)

  def linked_pool(self, modalities: Sequence[str]) -> np.ndarray:
    """Record numbers of the linked records that have every one of `modalities`."""
    return np.array([i for i, r in enumerate(self.records) if r.linked and all(r.has(m) for m in modalities)],
                    np.int64)


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
      records.append(RecordMeta(ref, enc.encounter_id, enc.patient_id, enc.linked, tuple(sorted(enc.parts)),
                                {m: part.report for m, part in enc.parts.items()}))
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

  def __init__(self, index: SplitIndex, specs: Mapping[str, Any]):
    """`specs`: modality -> its codec's preprocessing spec, for the modalities to read."""
    self.refs = [r.ref for r in index.records]
    self.specs = dict(specs)
    self.reader = tfrecord.RecordReader()

  def encounter(self, i: int) -> schema.Encounter:
    return schema.decode_encounter(self.reader.read(self.refs[i]), modalities=self.specs)

  def input(self, enc: schema.Encounter, modality: str, rng) -> np.ndarray:
    return codecs.get(modality).preprocess(enc.part(modality).data, self.specs[modality], rng,
                                           name=enc.encounter_id)


# ----------------------------------------------------------------------------------------------------------------
# Training batches
# ----------------------------------------------------------------------------------------------------------------


LINKED = "/linked"  # the pool of linked encounters ('/' keeps it apart from every modality name)


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a batch holds, from the loss edges: `modalities` (rows of inputs), `report_modalities` (whose reports
  are embedded: the tmcl edges'), `pair_edges` (name -> its two modalities)."""

  modalities: tuple[str, ...]
  report_modalities: tuple[str, ...]
  pair_edges: Mapping[str, tuple[str, str]]

  @classmethod
  def from_edges(cls, edges: Sequence) -> Layout:
    """From `losses.Edge`s."""
    rows = sorted({m for e in edges for m in e.modalities if m != codecs.TEXT})
    return cls(tuple(rows), tuple(sorted({e.modality for e in edges if e.uses_text})),
               {e.name: tuple(e.modalities) for e in edges if e.kind == "pair"})

  @property
  def linked_modalities(self) -> tuple[str, ...]:
    """The modalities a linked row takes from its one encounter."""
    return tuple(sorted({m for pair in self.pair_edges.values() for m in pair}))


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  global_batch_size: int  # n: rows of every modality per global batch
  linked_per_batch: int  # m: rows that come from linked encounters
  process_index: int = 0
  process_count: int = 1
  shards: int = 1  # the devices of this process its rows are split over, in order

  def __post_init__(self):
    n, m, procs = self.global_batch_size, self.linked_per_batch, self.process_count
    if n % procs or m % procs:
      raise ValueError(f"batch_size {n} and linked_per_batch {m} must both divide by the {procs} processes")
    if not 0 <= m <= n:
      raise ValueError(f"linked_per_batch must be in [0, batch_size={n}], got {m}")
    if self.shards < 1 or self.local_batch_size % self.shards:
      raise ValueError(f"batch_size {n} must divide by the {procs * self.shards} devices "
                       f"({self.shards} per process)")

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  @property
  def local_linked(self) -> int:
    return self.linked_per_batch // self.process_count

  @property
  def linked_rows_per_shard(self) -> int:
    """The static prefix of every device's rows that can hold linked rows (ceil(m_local / shards))."""
    return -(-self.local_linked // self.shards)

  def linked_slots(self) -> np.ndarray:
    """[b] int: the linked row (0..m_local-1) each local row holds, -1 for unlinked rows (see module docstring)."""
    rows = self.local_batch_size // self.shards
    position, shard = np.arange(self.local_batch_size) % rows, np.arange(self.local_batch_size) // rows
    slot = position * self.shards + shard
    return np.where((position < self.linked_rows_per_shard) & (slot < self.local_linked), slot, -1)


class _AssembleBatch(grain.transforms.Map):
  """Global step index -> this process's batch (see the module docstring for the layout)."""

  def __init__(self, reader: ExampleReader, pools: dict, text_inputs, spec: BatchSpec, layout: Layout, seed: int,
               augment: bool, index: SplitIndex):
    self.reader, self.pools, self.text_inputs, self.spec, self.layout = reader, pools, text_inputs, spec, layout
    self.seed, self.augment = seed, augment
    self.reports = {m: [r.reports.get(m, "") for r in index.records] for m in layout.report_modalities}

  def _stream_slice(self, pool: str, step: int, per_step: int, per_process: int) -> list[int]:
    start = step * per_step + self.spec.process_index * per_process
    return [int(self.pools[pool][k]) for k in range(start, start + per_process)]

  def map(self, step: int) -> dict:
    spec, layout = self.spec, self.layout
    linked = self._stream_slice(LINKED, step, spec.linked_per_batch, spec.local_linked)
    unlinked = spec.global_batch_size - spec.linked_per_batch
    local_unlinked = spec.local_batch_size - spec.local_linked
    slots = spec.linked_slots()
    ids = {}
    for m in layout.modalities:
      if m in layout.linked_modalities:
        others = iter(self._stream_slice(m, step, unlinked, local_unlinked))
        ids[m] = [linked[j] if j >= 0 else next(others) for j in slots]
      else:  # not bound to a partner: every row draws from the modality's own pool
        ids[m] = self._stream_slice(m, step, spec.global_batch_size, spec.local_batch_size)
    inputs = {m: [] for m in layout.modalities}
    for row in range(spec.local_batch_size):
      # One generator per (step, process, row): augmentation does not depend on thread timing.
      rng = (np.random.default_rng([self.seed, step, spec.process_index, row]) if self.augment else None)
      decoded: dict[int, schema.Encounter] = {}  # a linked row's modalities share one decoded record
      for m in layout.modalities:
        record = ids[m][row]
        if record not in decoded:
          decoded[record] = self.reader.encounter(record)
        inputs[m].append(self.reader.input(decoded[record], m, rng))
    texts = {m: [self.reports[m][i] for i in ids[m]] for m in layout.report_modalities}
    pair_mask = slots >= 0
    return {
        "inputs": {m: np.stack(x) for m, x in inputs.items()},
        "reports": {m: self.text_inputs(t) for m, t in texts.items()},
        "text_key": {m: np.stack([preprocess.text_key(x) for x in t]) for m, t in texts.items()},
        "pair_mask": {name: pair_mask for name in layout.pair_edges},
        "index": {m: np.asarray(i, np.int32) for m, i in ids.items()},
    }


def train_dataset(index: SplitIndex, text_inputs, spec: BatchSpec, layout: Layout, *, specs: Mapping[str, Any],
                  seed: int, augment: bool = True) -> grain.MapDataset:
  """MapDataset whose item t is this process's batch for global step t (endless). `specs`: modality -> codec
  preprocessing spec, for every modality of `layout`."""
  if spec.linked_per_batch and not layout.pair_edges:
    raise ValueError(f"linked_per_batch={spec.linked_per_batch} but no pair edge uses linked rows; set "
                     "data.linked_per_batch=0 or add a pair edge to config.loss.edges")
  pools = {}
  for kind in (LINKED,) + layout.modalities:
    if kind == LINKED:
      records = index.linked_pool(layout.linked_modalities) if layout.pair_edges else np.zeros(0, np.int64)
      needed = spec.linked_per_batch > 0
      what = f"linked records with {', '.join(layout.linked_modalities)}"
    else:
      records, needed, what = index.pool(kind), True, f"records with {kind}"
    if len(records) == 0 and needed:
      raise ValueError(f"{index.data_dir}/{index.split} has no {what} (the {kind!r} pool; "
                       f"linked_per_batch={spec.linked_per_batch})")
    # Each pool gets its own seed stream; reshuffled every epoch.
    pools[kind] = (grain.MapDataset.source(records).shuffle(seed=seed * (1 + len(layout.modalities)) + len(pools))
                   .repeat() if len(records) else [])
  reader = ExampleReader(index, {m: specs[m] for m in layout.modalities})
  assemble = _AssembleBatch(reader, pools, text_inputs, spec, layout, seed, augment, index)
  return grain.MapDataset.range(0, 1 << 62).map(assemble)


def train_iterator(dataset: grain.MapDataset, *, num_threads: int, prefetch: int) -> grain.DatasetIterator:
  """A checkpointable iterator over `dataset` with `num_threads` reader threads (grain's state = next step)."""
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(dataset.to_iter_dataset(read))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation batches
# ----------------------------------------------------------------------------------------------------------------


def eval_batches(index: SplitIndex, modality: str, batch_size: int, spec: Any, *,
                 records: Sequence[int] | None = None, num_threads: int = 2) -> Iterator[dict]:
  """Fixed-size batches over the records with `modality`, in index order, the last padded. Each batch has
  `inputs` [batch_size, ...] (the codec's model input, no augmentation; `spec` its preprocessing), `valid`
  [batch_size] bool, `index` (record numbers), `labels` and `text_key` (the report's)."""
  if records is None:
    records = index.pool(modality)
  records = np.asarray(records, np.int64)
  reader = ExampleReader(index, {modality: spec})
  example = codecs.get(modality).example_input(spec)

  def load(batch_start: int) -> dict:
    ids = records[batch_start:batch_start + batch_size]
    encs = [reader.encounter(int(i)) for i in ids]
    inputs = [reader.input(e, modality, None) for e in encs]
    labels = [np.asarray(e.part(modality).labels, np.float32) for e in encs]
    num_labels = len(labels[0])
    pad = batch_size - len(ids)
    batch_texts = [e.part(modality).report for e in encs] + [""] * pad
    return {
        "inputs": np.concatenate([np.stack(inputs), np.zeros((pad,) + example.shape, np.float32)]),
        "valid": np.arange(batch_size) < len(ids),
        "index": np.concatenate([ids, np.full(pad, -1)]).astype(np.int32),
        "labels": np.concatenate([np.stack(labels), np.zeros((pad, num_labels), np.float32)]),
        "text_key": np.stack([preprocess.text_key(t) for t in batch_texts]),
    }

  starts = grain.MapDataset.source(list(range(0, len(records), batch_size))).map(load)
  yield from starts.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4))
