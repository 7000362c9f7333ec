"""What every evaluator shares: the embedding functions of a model and the embeddings of one split.

An evaluator is built once with `EmbedFns` (pure functions of params) and the data it reads, then
`evaluator.run(params) -> {name: value}` can be called at any step, during training or standalone.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from medbind_jax.data import pipeline, preprocess

EmbedFn = Callable[..., np.ndarray]


@dataclasses.dataclass
class EmbedFns:
  """Per-modality embedding functions: `cxr(params, images)`, `ecg(params, signals)`, `text(params, texts)`,
  each returning float32 [B, d] unit vectors for a fixed-size batch (texts: a list of strings)."""

  cxr: EmbedFn
  ecg: EmbedFn
  text: EmbedFn
  batch_size: int

  def texts(self, params, texts: list[str]) -> np.ndarray:
    """Embeds any number of texts in fixed-size (padded) batches."""
    out = []
    for start in range(0, len(texts), self.batch_size):
      chunk = texts[start:start + self.batch_size]
      emb = np.asarray(self.text(params, chunk + [""] * (self.batch_size - len(chunk))))
      out.append(emb[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclasses.dataclass
class ModalityEmbeddings:
  """Embeddings of every record of a split that has the modality, in index order."""

  emb: np.ndarray  # [N, d]
  index: np.ndarray  # [N] record numbers in the SplitIndex
  text_key: np.ndarray  # [N, 2] key of each record's report
  labels: np.ndarray  # [N, num_labels]


def embed_split(fns: EmbedFns, params, index: pipeline.SplitIndex, modality: str, *,
                cxr: preprocess.CxrSpec, ecg: preprocess.EcgSpec) -> ModalityEmbeddings:
  fn = fns.cxr if modality == "cxr" else fns.ecg
  parts: dict[str, list] = {"emb": [], "index": [], "text_key": [], "labels": []}
  for batch in pipeline.eval_batches(index, modality, fns.batch_size, cxr=cxr, ecg=ecg):
    valid = batch["valid"]
    parts["emb"].append(np.asarray(fn(params, batch[modality]))[valid])
    parts["index"].append(batch["index"][valid])
    parts["text_key"].append(batch["text_key"][valid])
    parts["labels"].append(batch["labels"][valid])
  if not parts["emb"]:
    raise ValueError(f"{index.data_dir}/{index.split} has no {modality} records to evaluate")
  return ModalityEmbeddings(**{k: np.concatenate(v) for k, v in parts.items()})


def unique_texts(index: pipeline.SplitIndex, modality: str) -> tuple[list[str], np.ndarray]:
  """The split's distinct `modality` reports (one representative per normalised text) and their keys."""
  seen: dict[str, str] = {}
  for record in index.records:
    if getattr(record, f"has_{modality}"):
      text = getattr(record, f"{modality}_report")
      seen.setdefault(preprocess.normalize_text(text), text)
  texts = list(seen.values())
  keys = np.stack([preprocess.text_key(t) for t in texts]) if texts else np.zeros((0, 2), np.int32)
  return texts, keys


def same_key(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[len(a), len(b)] bool: equal text keys."""
  return np.all(a[:, None, :] == b[None, :, :], axis=-1)
