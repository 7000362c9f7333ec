"""Zero-shot classification of CXRs and ECGs by prompt ensembles (the protocol's `prompts`).

Each class's prompts are embedded with the text tower and averaged (mean of unit vectors, re-normalised): a
"positive" prototype stating the finding and a "negative" one stating its absence.

- Binary, per label: score = cos(x, positive) - cos(x, negative); AUROC of the score, and balanced accuracy of
  "closer to the positive prototype" (score > 0). Examples whose label is unknown (-1) are left out; a label with no
  positive or no negative example in the split is skipped with a logged reason. Macro = mean over evaluated labels.
- Multi-class, per protocol task: the examples where exactly one of the task's classes is positive, predicted as the
  class with the nearest positive prototype; balanced accuracy and one-vs-rest macro AUROC of the cosine scores.
"""

from __future__ import annotations

import logging

import numpy as np

from medbind_jax.evaluators import common, metrics
from medbind_jax.evaluators import protocol as protocol_lib

log = logging.getLogger(__name__)


def prototype(embeddings: np.ndarray) -> np.ndarray:
  """Mean direction of a prompt ensemble: [P, d] -> [d] unit vector."""
  unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=-1, keepdims=True), 1e-12)
  mean = unit.mean(axis=0)
  return mean / max(float(np.linalg.norm(mean)), 1e-12)


class ZeroShotEvaluator:
  """`ZeroShotEvaluator(data, protocol).run(params) -> {'zero_shot/<modality>/<label>/auroc': ..., ...}`."""

  def __init__(self, data: common.SplitEmbedder, protocol: protocol_lib.Protocol, *, prefix: str = "zero_shot"):
    self.data, self.protocol, self.prefix = data, protocol, prefix
    self.notes: list[str] = []

  def _skip(self, message: str) -> None:
    log.info("zero-shot: skipping %s", message)
    self.notes.append(message)

  def _prototypes(self, params, labels: dict[str, list[str]]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{modality: {label: (positive prototype, negative prototype)}}; every prompt embedded in one pass."""
    entries = [(m, label, self.protocol.prompts[m][label]) for m, names in labels.items() for label in names]
    emb = self.data.texts(params, [t for _, _, p in entries for t in p.positive + p.negative])
    out: dict[str, dict] = {m: {} for m in labels}
    start = 0
    for modality, label, prompts in entries:
      middle, stop = start + len(prompts.positive), start + len(prompts.positive) + len(prompts.negative)
      out[modality][label] = (prototype(emb[start:middle]), prototype(emb[middle:stop]))
      start = stop
    return out

  def run(self, params) -> dict[str, float]:
    self.notes = []
    labels = {}
    for modality in self.data.modalities:
      prompts = self.protocol.prompts.get(modality, {})
      if not self.data.num_records[modality]:
        self._skip(f"{modality}: the split has no {modality} records")
        continue
      for name in self.data.label_names[modality]:
        if name not in prompts:
          self._skip(f"{modality}/{name}: protocol {self.protocol.version} has no prompts for it")
      labels[modality] = [n for n in self.data.label_names[modality] if n in prompts]
    labels = {m: names for m, names in labels.items() if names}
    results: dict[str, float] = {}
    if not labels:
      return results
    protos = self._prototypes(params, labels)
    for modality in labels:
      emb = self.data.modality(params, modality)
      names = self.data.label_names[modality]
      self._binary(results, modality, emb, protos[modality], names)
      for task in self.protocol.multiclass_tasks:
        if task.modality == modality:
          self._multiclass(results, task, emb, protos[modality], names)
    return results

  def _binary(self, results, modality, emb: common.ModalityEmbeddings, protos, names) -> None:
    aurocs, accuracies = [], []
    for label, (positive, negative) in protos.items():
      known, is_positive = common.known_binary(emb.labels[:, names.index(label)])
      y = is_positive[known]
      if y.all() or not y.any():
        self._skip(f"{modality}/{label}: {int(y.sum())} positive and {int((~y).sum())} negative examples "
                   "(AUROC needs both)")
        continue
      score = emb.emb[known] @ positive - emb.emb[known] @ negative
      aurocs.append(metrics.auroc(y, score))
      accuracies.append(metrics.balanced_accuracy(y.astype(np.int64), (score > 0).astype(np.int64)))
      base = f"{self.prefix}/{modality}/{label}"
      results.update({f"{base}/auroc": aurocs[-1], f"{base}/balanced_accuracy": accuracies[-1],
                      f"{base}/num_positive": float(y.sum()), f"{base}/num_examples": float(y.size)})
    if aurocs:
      results[f"{self.prefix}/{modality}/macro_auroc"] = float(np.mean(aurocs))
      results[f"{self.prefix}/{modality}/macro_balanced_accuracy"] = float(np.mean(accuracies))
      results[f"{self.prefix}/{modality}/num_labels"] = float(len(aurocs))

  def _multiclass(self, results, task: protocol_lib.MulticlassTask, emb: common.ModalityEmbeddings, protos,
                  names) -> None:
    missing = [c for c in task.classes if c not in protos]
    if missing:
      self._skip(f"task {task.name}: classes {missing} are not labels of this split or have no prompts")
      return
    selected, y = common.single_label(emb.labels, [names.index(c) for c in task.classes])
    y = y[selected]
    present = np.unique(y)
    if present.size < 2:
      self._skip(f"task {task.name}: {int(selected.sum())} single-label examples cover {present.size} class(es)")
      return
    scores = emb.emb[selected] @ np.stack([protos[c][0] for c in task.classes]).T  # [N, C]
    base = f"{self.prefix}/{task.name}"
    results[f"{base}/balanced_accuracy"] = metrics.balanced_accuracy(y, scores.argmax(axis=1))
    results[f"{base}/chance_balanced_accuracy"] = 1.0 / present.size
    _, results[f"{base}/macro_auroc"] = metrics.multilabel_auroc(np.eye(len(task.classes), dtype=bool)[y], scores)
    results[f"{base}/num_examples"] = float(y.size)
    results[f"{base}/num_classes"] = float(present.size)

  def summary(self, results: dict[str, float]) -> dict[str, float]:
    """Headline numbers: macro AUROC per modality, balanced accuracy per multi-class task."""
    keys = [f"{self.prefix}/{m}/macro_auroc" for m in self.data.modalities]
    keys += [f"{self.prefix}/{t.name}/balanced_accuracy" for t in self.protocol.multiclass_tasks]
    return {k: results[k] for k in keys if k in results}

  def table(self, results: dict[str, float]) -> str:
    """Markdown: per-label binary AUROC / balanced accuracy per modality, then the multi-class tasks."""
    lines = [f"Prompts: protocol `{self.protocol.version}`. Binary: finding vs absent prompt ensembles.", "",
             "| modality | label | positives / examples | AUROC | balanced acc. |", "|---|---|---:|---:|---:|"]
    for modality in self.data.modalities:
      for label in self.data.label_names[modality]:
        base = f"{self.prefix}/{modality}/{label}"
        if f"{base}/auroc" in results:
          lines.append(f"| {modality} | {label} | {results[f'{base}/num_positive']:.0f} / "
                       f"{results[f'{base}/num_examples']:.0f} | {results[f'{base}/auroc']:.3f} | "
                       f"{results[f'{base}/balanced_accuracy']:.3f} |")
      base = f"{self.prefix}/{modality}"
      if f"{base}/macro_auroc" in results:
        lines.append(f"| {modality} | **macro** ({results[f'{base}/num_labels']:.0f} labels) | | "
                     f"**{results[f'{base}/macro_auroc']:.3f}** | "
                     f"**{results[f'{base}/macro_balanced_accuracy']:.3f}** |")
    tasks = [t for t in self.protocol.multiclass_tasks if f"{self.prefix}/{t.name}/balanced_accuracy" in results]
    if tasks:
      lines += ["", "| multi-class task | examples | classes | balanced acc. (chance) | macro AUROC |",
                "|---|---:|---:|---:|---:|"]
      for task in tasks:
        base = f"{self.prefix}/{task.name}"
        lines.append(f"| {task.name} | {results[f'{base}/num_examples']:.0f} | {results[f'{base}/num_classes']:.0f} | "
                     f"{results[f'{base}/balanced_accuracy']:.3f} ({results[f'{base}/chance_balanced_accuracy']:.3f}) "
                     f"| {results[f'{base}/macro_auroc']:.3f} |")
    return "\n".join(lines)
