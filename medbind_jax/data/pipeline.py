"""Input pipeline: an index over TFRecord shards, and grain datasets of static-shaped training batches.

Batch layout (one process's share of a global batch of `n` rows of every modality the edges use):

  inputs     {modality: float32 [b, ...]}  the codec's model input per row
  reports    {modality: text inputs}       the rows' report texts (see text.py), for modalities of tmcl edges
  text_key   {modality: int32 [b, 2]}      equal key = same report text
  pair_mask  {pair edge: bool [b]}         rows that hold the two modalities of one linked encounter
  index      {modality: int32 [b]}         record numbers in the split index

with b = n / process_count. The global batch is split into D = process_count x shards equal consecutive blocks,
one per device (process p holds blocks p * shards ... (p + 1) * shards - 1, i.e. global rows [p * b, (p + 1) * b)),
and the m linked rows (from linked encounters that have every modality of the pair edges; those modalities of a
row are one encounter's) sit at the start of the blocks, dealt round-robin: block s holds linked rows s, s + D,
... So every device's linked rows are a static prefix of `linked_rows_per_shard` = ceil(m / D) rows (the last
prefix slots of some blocks hold unlinked rows, masked out, when m does not divide by D), and a pair edge scores
only that prefix. Every other row and modality draws independently from all records with that modality. On one
device the first m rows are the linked ones. Each pool is an endless stream, reshuffled every epoch; global step
t takes stream items [t*k, (t+1)*k) of each pool, and every process computes the global batch's record ids and
reads its own rows. Augmentation is seeded by (seed, step, global row). So the global batch, row for row and
device for device, depends only on the seed, the step and D, not on how the devices split into processes; and
restoring the iterator's position restores the data exactly.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np
import tqdm

from medbind_jax import paths
from medbind_jax.data import codecs, preprocess, schema, shard_index, tfrecord

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


ADD_INDEX_COMMAND = "python -m data_prep.add_index"  # writes the shard indexes of a data dir (data_prep/add_index.py)


def index_split(data_dir: str, split: str, *, skip_corrupt: bool = False, progress: bool = True,
                verify: bool = False, write_indexes: bool = True) -> SplitIndex:
  """Every record of `split`, from the shards' index files: one small file per shard, no record read.

  Start-up cost: `dataset_info.json` and each shard's index (`shard_index`: every record's frame position, ids,
  linked flag and report texts) are read; the shards are only stat'ed (opened later by `tfrecord.RecordReader`, on
  a record's first read). So it grows with the number of shards and with the records' metadata (a few
  microseconds per record to parse the index and build its RecordMeta), not with the shards' bytes.

  An index is used when its CRC32C is intact, it names the shard, the shard's size is the one recorded, and it was
  made with every registered codec of the dataset's modalities; `verify=True` also compares the CRC32C of each
  whole shard (reads the shards sequentially, no decoding). A shard without a usable index (converted before
  indexes existed, index damaged, shard replaced: the last two with a warning, never trusted silently) is read in
  full as before, and, when it reads clean with the count `dataset_info.json` lists, its index is written beside
  it (temporary file + rename) and recorded in `dataset_info.json` (`write_indexes=False`: neither), so the next
  start reads only the index. Where the data dir is not writable the shards are read at every start, with a
  warning naming the command that adds the indexes (`python -m data_prep.add_index DATA_DIR`).

  Errors. ValueError when a shard holds fewer or more records than `dataset_info.json` lists, unless
  `skip_corrupt`: then the difference is logged and counted in `num_missing`. A shard read here raises
  `tfrecord.CorruptRecordError` (file and byte offset) on its first bad record, or with `skip_corrupt` leaves bad
  records out, each logged and kept in `skipped` (such a shard gets no index). Nothing is dropped silently.
  Changed by the indexes: the records of an indexed shard are not read here, so damage inside a record that
  happened after the shard was indexed is found when the record is read (`RecordReader.read` checks the frame
  header and both CRCs and raises CorruptRecordError naming file and offset; in `skip_corrupt` mode too, the
  record being in the index); so is a shard replaced by one of the same size, unless its frames happen to line up
  with the indexed ones. `verify=True` finds both here instead: the shard's CRC32C no longer matches, so the shard
  is read in full with the rules above (and its stale index removed when it does not read clean).
  """
  info = schema.read_dataset_info(data_dir)
  if split not in info["splits"]:
    raise ValueError(f"{data_dir} has no split {split!r}; it has {sorted(info['splits'])}")
  shards = info["splits"][split]["shards"]
  registered = set(codecs.names())
  records: list[RecordMeta] = []
  skipped: list[tuple[str, int, str]] = []
  num_missing = 0
  written: dict[str, str] = {}  # shard file -> index file written here
  num_read = 0  # shards read in full
  unwritable: OSError | None = None
  bar = tqdm.tqdm(shards, desc=f"index {split}", unit="shard", disable=not progress, leave=False)
  for shard in bar:
    path = paths.join(data_dir, shard["file"])
    if not paths.exists(path):
      if not skip_corrupt:
        raise FileNotFoundError(f"{path} is listed in dataset_info.json but missing")
      log.warning("skipping missing shard %s (%d records)", path, shard["num_examples"])
      skipped.append((path, 0, "missing shard"))
      num_missing += shard["num_examples"]
      continue
    index_file = shard.get("index") or shard_index.index_name(shard["file"])
    index_path = paths.join(data_dir, index_file)
    problems: list[tuple[str, int, str]] = []
    index, built = shard_index.load_or_build(path, index_path, modalities=info.get("modalities"), verify=verify,
                                             skip_corrupt=skip_corrupt, problems=problems)
    if built:
      num_read += 1
      clean = not problems and index.num_records == shard["num_examples"]
      if write_indexes and unwritable is None and (clean or paths.exists(index_path)):  # or a stale one
        try:
          if clean:
            shard_index.write_index(index_path, index)
            written[shard["file"]] = index_file
          else:  # a stale index of a shard that no longer reads clean: the next start must read the shard too
            paths.remove(index_path)
        except OSError as err:
          unwritable = err
    records.extend(_record_metas(path, index, registered))
    found = index.num_records
    skipped.extend(problems)
    if found != shard["num_examples"]:
      message = (f"{path}: dataset_info.json lists {shard['num_examples']} records but {found} could be read"
                 + (f" ({len(problems)} damaged)" if problems else ""))
      if not skip_corrupt:
        raise ValueError(message + "; the shard is truncated or was replaced. Re-run the converter, or set "
                         "config.data.skip_corrupt=True to train on what is readable.")
      log.warning("%s", message)
      num_missing += shard["num_examples"] - found
  if written:
    try:
      schema.record_shard_indexes(data_dir, written)
    except OSError as err:
      log.warning("could not record the new shard indexes in %s (%s); they are found by name all the same",
                  paths.join(data_dir, schema.DATASET_INFO), err)
    log.info("%s/%s: read %d shard(s) in full and wrote their indexes; later starts read only the indexes",
             data_dir, split, len(written))
  if unwritable is not None:
    log.warning("%s/%s: %d shard(s) have no usable index and it could not be written (%s), so every start reads "
                "them in full. Add the indexes with: %s %s", data_dir, split, num_read, unwritable,
                ADD_INDEX_COMMAND, data_dir)
  if skipped or num_missing:
    log.warning("%s/%s: %d damaged records skipped, %d listed records unreadable in all",
                data_dir, split, len(skipped), num_missing)
  return SplitIndex(data_dir, split, records, info, skipped, num_missing)


def _record_metas(path: str, index: shard_index.ShardIndex, registered: set[str]) -> list[RecordMeta]:
  """RecordMetas of one shard's index (`path`: the shard). Modalities of codecs not registered in this process
  are left out, as `schema.decode_encounter` leaves them out of a record read here."""
  columns = [(m, index.reports[m]) for m in sorted(index.reports) if m in registered]
  metas = []
  for i, (offset, length) in enumerate(zip(index.offsets, index.lengths)):
    reports = {m: texts[i] for m, texts in columns if texts[i] is not None}
    metas.append(RecordMeta(tfrecord.FrameRef(path, offset, length), index.encounter_ids[i], index.patient_ids[i],
                            index.linked[i], tuple(reports), reports))
  return metas


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
    return schema.decode_encounter(self.reader.read(self.refs[i]), modalities=self.specs, extras=False)

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
  shards: int = 1  # the devices of this process its rows are split over, in order (the same on every process)

  def __post_init__(self):
    n, m, procs = self.global_batch_size, self.linked_per_batch, self.process_count
    if not 0 <= m <= n:
      raise ValueError(f"linked_per_batch must be in [0, batch_size={n}], got {m}")
    if self.shards < 1 or n % (procs * self.shards):
      raise ValueError(f"batch_size {n} must divide by the {procs * self.shards} devices "
                       f"({procs} process(es) x {self.shards} devices)")
    if not 0 <= self.process_index < procs:
      raise ValueError(f"process_index {self.process_index} is not in [0, {procs})")

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  @property
  def devices(self) -> int:
    """Devices over all processes: the global batch is split into this many equal consecutive blocks."""
    return self.process_count * self.shards

  @property
  def linked_rows_per_shard(self) -> int:
    """The static prefix of every device's rows that can hold linked rows (ceil(m / devices))."""
    return -(-self.linked_per_batch // self.devices)

  def global_linked_slots(self) -> np.ndarray:
    """[n] int: the linked row (0..m-1) each row of the global batch holds, -1 for unlinked rows: linked row j
    sits in device block j % devices, at position j // devices (see the module docstring)."""
    rows = self.global_batch_size // self.devices
    position, block = np.arange(self.global_batch_size) % rows, np.arange(self.global_batch_size) // rows
    slot = position * self.devices + block
    return np.where((position < self.linked_rows_per_shard) & (slot < self.linked_per_batch), slot, -1)

  def local_rows(self) -> slice:
    """This process's rows of the global batch (its devices' blocks)."""
    return slice(self.process_index * self.local_batch_size, (self.process_index + 1) * self.local_batch_size)

  def linked_slots(self) -> np.ndarray:
    """[b] int: the linked row (0..m-1 of the global batch) each of this process's rows holds, -1 for unlinked
    rows."""
    return self.global_linked_slots()[self.local_rows()]


class _AssembleBatch(grain.transforms.Map):
  """Global step index -> this process's batch (see the module docstring for the layout)."""

  def __init__(self, reader: ExampleReader, pools: dict, text_inputs, spec: BatchSpec, layout: Layout, seed: int,
               augment: bool, index: SplitIndex):
    self.reader, self.pools, self.text_inputs, self.spec, self.layout = reader, pools, text_inputs, spec, layout
    self.seed, self.augment = seed, augment
    self.reports = {m: [r.reports.get(m, "") for r in index.records] for m in layout.report_modalities}

  def _stream(self, pool: str, step: int, per_step: int) -> list[int]:
    """The pool's stream items of global step `step` (`per_step` of them)."""
    return [int(self.pools[pool][k]) for k in range(step * per_step, (step + 1) * per_step)]

  def map(self, step: int) -> dict:
    spec, layout = self.spec, self.layout
    n, m = spec.global_batch_size, spec.linked_per_batch
    # The global batch's record ids (a few ints per row, cheap to compute on every process), then this process's
    # rows of it: the batch depends only on the seed, the step and the total number of devices.
    slots = spec.global_linked_slots()
    linked = self._stream(LINKED, step, m) if m else []
    ids = {}
    for mod in layout.modalities:
      if mod in layout.linked_modalities:
        others = iter(self._stream(mod, step, n - m))
        ids[mod] = [linked[j] if j >= 0 else next(others) for j in slots]
      else:  # not bound to a partner: every row draws from the modality's own pool
        ids[mod] = self._stream(mod, step, n)
    rows = spec.local_rows()
    ids = {mod: i[rows] for mod, i in ids.items()}
    inputs = {mod: [] for mod in layout.modalities}
    for row in range(rows.start, rows.stop):
      # One generator per (step, global row): augmentation depends neither on thread timing nor on the number
      # of processes.
      rng = np.random.default_rng([self.seed, step, row]) if self.augment else None
      decoded: dict[int, schema.Encounter] = {}  # a linked row's modalities share one decoded record
      for mod in layout.modalities:
        record = ids[mod][row - rows.start]
        if record not in decoded:
          decoded[record] = self.reader.encounter(record)
        inputs[mod].append(self.reader.input(decoded[record], mod, rng))
    texts = {mod: [self.reports[mod][i] for i in ids[mod]] for mod in layout.report_modalities}
    pair_mask = slots[rows] >= 0
    return {
        "inputs": {mod: np.stack(x) for mod, x in inputs.items()},
        "reports": {mod: self.text_inputs(t) for mod, t in texts.items()},
        "text_key": {mod: np.stack([preprocess.text_key(x) for x in t]) for mod, t in texts.items()},
        "pair_mask": {name: pair_mask for name in layout.pair_edges},
        "index": {mod: np.asarray(i, np.int32) for mod, i in ids.items()},
    }


def train_dataset(index: SplitIndex, text_inputs, spec: BatchSpec, layout: Layout, *, specs: Mapping[str, Any],
                  seed: int, augment: bool = True, pools: Mapping[str, Any] | None = None) -> grain.MapDataset:
  """MapDataset whose item t is this process's batch for global step t (endless). `specs`: modality -> codec
  preprocessing spec, for every modality of `layout`. `pools`: pool (LINKED or a modality) -> an endless indexable
  stream of record numbers of `index` (`mixture.mixed_pools`, for several sources); default: each pool's records
  of `index`, shuffled with its own seed and reshuffled every epoch."""
  if spec.linked_per_batch and not layout.pair_edges:
    raise ValueError(f"linked_per_batch={spec.linked_per_batch} but no pair edge uses linked rows; set "
                     "data.linked_per_batch=0 or add a pair edge to config.loss.edges")
  own = {}
  for kind in (LINKED,) + layout.modalities:
    if pools is not None:
      records = pools.get(kind, [])
    elif kind == LINKED:
      records = index.linked_pool(layout.linked_modalities) if layout.pair_edges else np.zeros(0, np.int64)
    else:
      records = index.pool(kind)
    needed = spec.linked_per_batch > 0 if kind == LINKED else True
    what = f"linked records with {', '.join(layout.linked_modalities)}" if kind == LINKED else f"records with {kind}"
    if len(records) == 0 and needed:
      raise ValueError(f"{index.data_dir}/{index.split} has no {what} (the {kind!r} pool; "
                       f"linked_per_batch={spec.linked_per_batch})")
    if pools is not None or not len(records):
      own[kind] = records
    else:  # each pool its own seed stream, reshuffled every epoch (mixture.mixed_pools gives source 0 the same)
      own[kind] = (grain.MapDataset.source(records).shuffle(seed=seed * (1 + len(layout.modalities)) + len(own))
                   .repeat())
  pools = own
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
  """Fixed-size batches over the records with `modality` (or `records`, in that order; -1 entries are padding
  rows), the last padded. Each batch has `inputs` [batch_size, ...] (the codec's model input, no augmentation;
  `spec` its preprocessing), `valid` [batch_size] bool, `index` (record numbers, -1 on padding rows), `labels`
  and `text_key` (the report's)."""
  if records is None:
    records = index.pool(modality)
  records = np.asarray(records, np.int64)
  reader = ExampleReader(index, {modality: spec})
  example = codecs.get(modality).example_input(spec)
  num_labels = len(schema.label_names(index.info, modality))

  def load(batch_start: int) -> dict:
    ids = np.full(batch_size, -1, np.int64)
    chunk = records[batch_start:batch_start + batch_size]
    ids[:len(chunk)] = chunk
    valid = ids >= 0
    encs = {int(i): reader.encounter(int(i)) for i in ids[valid]}
    inputs = np.zeros((batch_size,) + example.shape, np.float32)
    labels = np.zeros((batch_size, num_labels), np.float32)
    texts = [""] * batch_size
    for row in np.flatnonzero(valid):
      enc = encs[int(ids[row])]
      inputs[row] = reader.input(enc, modality, None)
      row_labels = np.asarray(enc.part(modality).labels, np.float32)
      if row_labels.shape != (num_labels,):
        raise ValueError(f"{index.data_dir}/{index.split} record {enc.encounter_id}: {row_labels.size} {modality} "
                         f"labels, but dataset_info.json declares {num_labels} ({modality}_label_names)")
      labels[row] = row_labels
      texts[row] = enc.part(modality).report
    return {"inputs": inputs, "valid": valid, "index": ids.astype(np.int32), "labels": labels,
            "text_key": np.stack([preprocess.text_key(t) for t in texts])}

  starts = grain.MapDataset.source(list(range(0, len(records), batch_size))).map(load)
  yield from starts.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4))
