"""CXR<->ECG zero-shot classification: queries of one modality classified with support examples of the other.

For each protocol task (e.g. CXRs labelled cardiomegaly, supported by ECGs labelled LVH): the support modality's
examples from one half of the patients form two prototypes (mean unit embedding of the support label's positives and
of its negatives, `metrics.prototype_classify`), and every query-modality example of the other half is assigned the
nearer one. Ground truth is the query's own label, so the score measures how well the shared space carries a finding
from one modality to the linked finding of the other. Reported: balanced accuracy (chance 0.5) and the AUROC of
cos(query, positive prototype) - cos(query, negative prototype). Queries and supports never share a patient.
"""

from __future__ import annotations

import logging

import numpy as np

from medbind_jax.evaluators import common, metrics
from medbind_jax.evaluators import protocol as protocol_lib

log = logging.getLogger(__name__)


class CrossModalEvaluator:
  """`CrossModalEvaluator(data, protocol).run(params) -> {'cross_modal/<task>/balanced_accuracy': ..., ...}`."""

  def __init__(self, data: common.SplitEmbedder, protocol: protocol_lib.Protocol, *, prefix: str = "cross_modal"):
    self.data, self.protocol, self.prefix = data, protocol, prefix
    self.notes: list[str] = []

  def _skip(self, message: str) -> None:
    log.info("cross-modal: skipping %s", message)
    self.notes.append(message)

  def _side(self, params, modality: str, label: str, support_half: bool):
    """(embeddings, bool labels) of the `modality` examples in one patient half whose `label` is known."""
    emb = self.data.modality(params, modality)
    known, positive = common.known_binary(emb.labels[:, self.data.label_names[modality].index(label)])
    rows = known & (common.in_support_half(self.data.patient_ids(emb.index)) == support_half)
    return emb.emb[rows], positive[rows]

  def run(self, params) -> dict[str, float]:
    self.notes = []
    results: dict[str, float] = {}
    for task in self.protocol.cross_modal_tasks:
      problems = [f"the run has no {m} modality" for m in (task.query, task.support) if m not in self.data.modalities]
      if not problems:
        problems = [f"{m} has no label {label!r}" for m, label in ((task.query, task.query_label),
                                                                    (task.support, task.support_label))
                    if label not in self.data.label_names[m]]
        problems += [f"the split has no {m} records" for m in (task.query, task.support)
                     if not self.data.num_records[m]]
      if problems:
        self._skip(f"task {task.name}: " + "; ".join(problems))
        continue
      support_emb, support_y = self._side(params, task.support, task.support_label, support_half=True)
      query_emb, query_y = self._side(params, task.query, task.query_label, support_half=False)
      counts = {"support": (int(support_y.sum()), int((~support_y).sum())),
                "query": (int(query_y.sum()), int((~query_y).sum()))}
      if min(counts["support"] + counts["query"]) == 0:
        self._skip(f"task {task.name}: needs positives and negatives on both sides, got (positive, negative) "
                   f"{counts}")
        continue
      pred, scores = metrics.prototype_classify(query_emb, support_emb, support_y.astype(np.int64), 2)
      base = f"{self.prefix}/{task.name}"
      results.update({
          f"{base}/balanced_accuracy": metrics.balanced_accuracy(query_y.astype(np.int64), pred),
          f"{base}/auroc": metrics.auroc(query_y, scores[:, 1] - scores[:, 0]),
          f"{base}/num_queries": float(query_y.size),
          f"{base}/num_support": float(support_y.size),
      })
    return results

  def summary(self, results: dict[str, float]) -> dict[str, float]:
    """Headline numbers: balanced accuracy per task."""
    return {k: v for k, v in results.items() if k.startswith(self.prefix + "/") and k.endswith("/balanced_accuracy")}

  def table(self, results: dict[str, float]) -> str:
    lines = ["Queries classified by the nearer prototype of the other modality's support examples (chance 0.5).", "",
             "| task | queries (label) | support (label) | balanced acc. | AUROC |", "|---|---|---|---:|---:|"]
    for task in self.protocol.cross_modal_tasks:
      base = f"{self.prefix}/{task.name}"
      if f"{base}/balanced_accuracy" in results:
        lines.append(f"| {task.name} | {results[f'{base}/num_queries']:.0f} {task.query} ({task.query_label}) | "
                     f"{results[f'{base}/num_support']:.0f} {task.support} ({task.support_label}) | "
                     f"{results[f'{base}/balanced_accuracy']:.3f} | {results[f'{base}/auroc']:.3f} |")
    return "\n".join(lines)
