"""What every evaluator shares: the embedding functions of a model and the embeddings of one split.

An evaluator is built once with a `SplitEmbedder` (the split's records and the model's embedding functions, pure
functions of params), then `evaluator.run(params) -> {name: value}` can be called at any step, during training or
standalone. Evaluators run on the same params share the embedder's cache, so each record is embedded once.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medbind_jax.data import pipeline, preprocess, schema

EmbedFn = Callable[..., np.ndarray]


@dataclasses.dataclass
class EmbedFns:
  """Embedding functions of the trainable params: `inputs[m](params, batch)` for each input modality (a
  fixed-size batch of model inputs) and `text(params, texts)` (a list of strings); each returns float32 [B, d]
  unit vectors.

  With a `mesh` (`runs.make_embed_fns(..., mesh=)`), every process of a multi-process run calls them together:
  `inputs[m](params, batch, *extras)` takes global arrays whose rows are split over all devices (`rows`), and
  returns the embeddings and `extras` replicated (so every process gets every row: an all-gather), and
  `text(params, texts)` takes the same full list of texts on every process. `embed_split` and `texts` then run
  the split across every device of every process."""

  inputs: Mapping[str, EmbedFn]
  text: EmbedFn
  batch_size: int
  mesh: Mesh | None = None

  @property
  def global_batch(self) -> int:
    """Rows per call: `batch_size`, rounded up to a multiple of the mesh's devices."""
    if self.mesh is None:
      return self.batch_size
    return -(-self.batch_size // self.mesh.size) * self.mesh.size

  @property
  def row_sharding(self) -> NamedSharding:
    """Batch rows split over every device of the mesh."""
    return NamedSharding(self.mesh, P(self.mesh.axis_names))

  def rows(self, local: np.ndarray) -> jax.Array:
    """A global array [global_batch, ...] from this process's consecutive block of rows."""
    return jax.make_array_from_process_local_data(self.row_sharding, local)

  def texts(self, params, texts: list[str]) -> np.ndarray:
    """Embeds any number of texts in fixed-size (padded) batches."""
    out, size = [], self.global_batch
    for start in range(0, len(texts), size):
      chunk = texts[start:start + size]
      emb = np.asarray(self.text(params, chunk + [""] * (size - len(chunk))))
      out.append(emb[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclasses.dataclass
class ModalityEmbeddings:
  """Embeddings of every record of a split that has the modality, in index order."""

  emb: np.ndarray  # [N, d]
  index: np.ndarray  # [N] record numbers in the SplitIndex
  text_key: np.ndarray  # [N, 2] key of each record's report
  labels: np.ndarray  # [N, num_labels]


def process_rows(records: np.ndarray, global_batch: int, process_index: int, process_count: int) -> np.ndarray:
  """This process's share of `records` read in global batches of `global_batch` rows: of batch k, the rows
  [k * B + p * b, k * B + (p + 1) * b) with b = B / process_count, -1 past the end. Concatenated over the
  processes, each global batch is records[k * B:(k + 1) * B] in order, so every row lands on the same device
  as in a one-process run."""
  per_process = global_batch // process_count
  num_batches = -(-len(records) // global_batch)
  padded = np.full(num_batches * global_batch, -1, np.int64)
  padded[:len(records)] = records
  return padded.reshape(num_batches, process_count, per_process)[:, process_index].reshape(-1)


def embed_split(fns: EmbedFns, params, index: pipeline.SplitIndex, modality: str, spec,
                records: np.ndarray | None = None) -> ModalityEmbeddings:
  """Embeddings of the `modality` records of `index` (`records`: record numbers, default all that have it; `spec`:
  the codec's preprocessing); with `fns.mesh`, each process reads and embeds its share and every process gets all
  of them."""
  fn = fns.inputs[modality]
  parts: dict[str, list] = {"emb": [], "index": [], "text_key": [], "labels": []}
  records = index.pool(modality) if records is None else records
  if not len(records):
    raise ValueError(f"{index.data_dir}/{index.split} has no {modality} records to evaluate")
  if fns.mesh is None:
    batches = pipeline.eval_batches(index, modality, fns.batch_size, spec, records=records)
  else:
    size, count = fns.global_batch, jax.process_count()
    mine = process_rows(records, size, jax.process_index(), count)
    batches = pipeline.eval_batches(index, modality, size // count, spec, records=mine)
  for batch in batches:
    extras = (batch["valid"], batch["index"], batch["text_key"], batch["labels"])
    if fns.mesh is None:
      emb = fn(params, batch["inputs"])
    else:
      emb, *extras = fn(params, fns.rows(batch["inputs"]), *map(fns.rows, extras))
    valid, ids, keys, labels = map(np.asarray, extras)
    parts["emb"].append(np.asarray(emb)[valid])
    parts["index"].append(ids[valid])
    parts["text_key"].append(keys[valid])
    parts["labels"].append(labels[valid])
  return ModalityEmbeddings(**{k: np.concatenate(v) for k, v in parts.items()})


def subsample(records: np.ndarray, max_records: int) -> np.ndarray:
  """`records` when `max_records` <= 0 or there are no more; else a fixed random subset (seed 0) in order."""
  if max_records <= 0 or len(records) <= max_records:
    return records
  return np.sort(np.random.default_rng(0).choice(records, max_records, replace=False))


def unique_texts(index: pipeline.SplitIndex, modality: str,
                 records: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
  """The distinct `modality` reports (one representative per normalised text) of the split (or of its `records`)
  and their keys."""
  seen: dict[str, str] = {}
  for i in (index.pool(modality) if records is None else records):
    text = index.records[int(i)].reports[modality]
    seen.setdefault(preprocess.normalize_text(text), text)
  texts = list(seen.values())
  keys = np.stack([preprocess.text_key(t) for t in texts]) if texts else np.zeros((0, 2), np.int32)
  return texts, keys


def same_key(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[len(a), len(b)] bool: equal text keys."""
  return np.all(a[:, None, :] == b[None, :, :], axis=-1)


def known_binary(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Label column values 1 (present), 0 (absent), -1 (uncertain/unknown) -> (known mask, positive) [N] bool."""
  known = (labels == 0) | (labels == 1)
  return known, labels == 1


def single_label(labels: np.ndarray, columns: list[int]) -> tuple[np.ndarray, np.ndarray]:
  """Rows of a multi-label matrix [N, L] where exactly one of `columns` is positive and none is unknown.

  Returns (selected [N] bool, class [N] int64: position in `columns` of the positive one; -1 where not selected).
  """
  if not columns:  # a dataset without labels for this modality: no row has a class
    return np.zeros(len(labels), bool), np.full(len(labels), -1, np.int64)
  sub = labels[:, columns]
  selected = np.all((sub == 0) | (sub == 1), axis=1) & ((sub == 1).sum(axis=1) == 1)
  return selected, np.where(selected, np.argmax(sub == 1, axis=1), -1).astype(np.int64)


def in_support_half(patient_ids: list[str]) -> np.ndarray:
  """[N] bool: the patient falls in the split's support half (a fixed hash of the patient id).

  Cross-modal evaluation draws support examples from one half of the patients and scores queries of the other
  half, so a query's own patient (e.g. the linked partner of a CXR query) never supports its class.
  """
  return np.array([hashlib.blake2b(p.encode("utf-8"), digest_size=1).digest()[0] % 2 == 0 for p in patient_ids],
                  dtype=bool)


class SplitEmbedder:
  """The records of one evaluation split and the embeddings of a model's params on them.

  `modality(params, m)` and `reports(params, m)` are computed once per params object: the cache keeps the params it
  was filled for (compared by identity; holding the reference means the identity cannot be reused by another
  tree), and `release()` drops it. Prompt texts (`texts`) are embedded on every call.
  """

  def __init__(self, fns: EmbedFns, index: pipeline.SplitIndex, specs: Mapping[str, Any], *,
               report_modalities: Sequence[str] | None = None, max_records: int = 0):
    """`specs`: modality -> codec preprocessing spec, for the input modalities to evaluate;
    `report_modalities`: those whose reports the model embeds (default: all of them); `max_records` > 0: at most
    that many records per modality, a fixed random subset (seed 0) kept in index order."""
    self.fns, self.index, self.specs = fns, index, dict(specs)
    self.modalities = sorted(self.specs)
    self.report_modalities = self.modalities if report_modalities is None else sorted(report_modalities)
    self.label_names = {m: schema.label_names(index.info, m) for m in self.modalities}
    self.pools = {m: subsample(index.pool(m), max_records) for m in self.modalities}
    self.num_records = {m: len(self.pools[m]) for m in self.modalities}
    self._params, self._cache = None, {}

  def _cached(self, params, key, compute):
    if params is not self._params:
      self._params, self._cache = params, {}
    if key not in self._cache:
      self._cache[key] = compute()
    return self._cache[key]

  def modality(self, params, modality: str) -> ModalityEmbeddings:
    """Embeddings, record numbers, report keys and labels of every record with `modality`, in index order."""
    return self._cached(params, ("modality", modality), lambda: embed_split(
        self.fns, params, self.index, modality, self.specs[modality], self.pools[modality]))

  def reports(self, params, modality: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The distinct `modality` reports of the records evaluated, their text keys [G, 2] and embeddings [G, d]."""
    def compute():
      texts, keys = unique_texts(self.index, modality, self.pools[modality])
      return texts, keys, self.fns.texts(params, texts)
    return self._cached(params, ("reports", modality), compute)

  def texts(self, params, texts: list[str]) -> np.ndarray:
    return self.fns.texts(params, texts)

  def patient_ids(self, record_numbers: np.ndarray) -> list[str]:
    return [self.index.records[int(i)].patient_id for i in record_numbers]

  def release(self) -> None:
    self._params, self._cache = None, {}
