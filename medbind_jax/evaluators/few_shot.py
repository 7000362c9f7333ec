"""Few-shot linear probes on frozen CXR and ECG embeddings.

The probe is closed-form ridge regression to one-hot targets (`metrics.ridge_probe_fit`, an exact linear solve: no
iterations, learning rate or convergence check, so every number is reproducible), not logistic regression.

For each seed (0..seeds-1) and k, k examples per class are drawn from the split (`metrics.sample_few_shot`; for one
seed the k-shot set is inside the 2k-shot set) and the probe is scored on every example of the *other* patients, so
no query shares a patient with the probe's training examples (e.g. a patient's other encounter).

- Binary, per dataset label (finding vs absent; unknown labels left out): AUROC of the probe's score difference and
  balanced accuracy of its argmax. A k is skipped where a class has too few examples to leave a query of every
  class; the modality's macro averages, per seed, the labels evaluated at every k (so the curve compares like with
  like).
- Multi-class, per protocol task: examples with exactly one of the task's classes; classes with fewer than 2
  examples are dropped (noted), so every k sees the same classes. Balanced accuracy and one-vs-rest macro AUROC.

Each number is reported as mean and standard deviation over seeds.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from medbind_jax.evaluators import common, metrics
from medbind_jax.evaluators import protocol as protocol_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Curve:
  """One line of the few-shot plot: mean and std over seeds of a metric per number of shots."""

  label: str
  shots: list[int]
  mean: list[float]
  std: list[float]
  chance: float


@dataclasses.dataclass
class _Task:
  name: str  # result key stem, e.g. "cxr/cardiomegaly" or "cxr_single_finding"
  binary: bool
  num_classes: int
  x: np.ndarray  # [N, d] embeddings
  y: np.ndarray  # [N] int64 classes
  patient: np.ndarray  # [N] int64 patient codes (equal code = same patient)


class FewShotEvaluator:
  """`FewShotEvaluator(data, protocol, seeds=5).run(params) -> {'few_shot/<task>/<k>-shot/<metric>_mean': ...}`."""

  def __init__(self, data: common.SplitEmbedder, protocol: protocol_lib.Protocol, *, shots=(1, 2, 4, 8, 16),
               seeds: int = 5, l2: float = 0.1, prefix: str = "few_shot"):
    if seeds < 1 or not shots or min(shots) < 1:
      raise ValueError(f"few-shot needs seeds >= 1 and shots >= 1, got seeds={seeds}, shots={shots}")
    self.data, self.protocol = data, protocol
    self.shots, self.seeds, self.l2, self.prefix = tuple(sorted(shots)), int(seeds), float(l2), prefix
    self.notes: list[str] = []

  def _skip(self, message: str) -> None:
    log.info("few-shot: skipping %s", message)
    self.notes.append(message)

  def run(self, params) -> dict[str, float]:
    self.notes = []
    results: dict[str, float] = {}
    for modality in self.data.modalities:
      if not self.data.num_records[modality]:
        self._skip(f"{modality}: the split has no {modality} records")
        continue
      emb = self.data.modality(params, modality)
      patient = np.unique(self.data.patient_ids(emb.index), return_inverse=True)[1].astype(np.int64)
      names = self.data.label_names[modality]
      per_seed = {}  # label -> {k: [auroc per seed]}, for the macro
      for column, label in enumerate(names):
        known, positive = common.known_binary(emb.labels[:, column])
        task = _Task(f"{modality}/{label}", True, 2, emb.emb[known], positive[known].astype(np.int64),
                     patient[known])
        per_seed[label] = self._evaluate(results, task)
      self._binary_macro(results, modality, {k: v for k, v in per_seed.items() if v})
      for spec in self.protocol.multiclass_tasks:
        if spec.modality == modality:
          task = self._multiclass_task(spec, emb, names, patient)
          if task is not None:
            self._evaluate(results, task)
    return results

  def _multiclass_task(self, spec: protocol_lib.MulticlassTask, emb, names, patient) -> _Task | None:
    missing = [c for c in spec.classes if c not in names]
    if missing:
      self._skip(f"task {spec.name}: classes {missing} are not labels of this split")
      return None
    selected, y = common.single_label(emb.labels, [names.index(c) for c in spec.classes])
    counts = np.bincount(y[selected], minlength=len(spec.classes))
    keep = counts >= 2  # one to learn from, one to test
    if not keep.all():
      self._skip(f"task {spec.name}: classes with fewer than 2 examples left out: "
                 + ", ".join(f"{c} ({counts[i]})" for i, c in enumerate(spec.classes) if not keep[i]))
    if keep.sum() < 2:
      self._skip(f"task {spec.name}: fewer than 2 classes left")
      return None
    rows = selected & keep[np.maximum(y, 0)]
    remap = np.cumsum(keep) - 1  # old class -> class among the kept ones
    return _Task(spec.name, False, int(keep.sum()), emb.emb[rows], remap[y[rows]], patient[rows])

  def _evaluate(self, results: dict, task: _Task) -> dict[int, list[float]]:
    """Fills the task's mean/std per k; returns {k: [AUROC per seed]} for the ks that ran."""
    counts = np.bincount(task.y, minlength=task.num_classes)
    if counts.min() == 0:
      self._skip(f"{task.name}: {counts.tolist()} examples per class (every class is needed)")
      return {}
    aurocs_by_k, num_queries = {}, []
    for k in self.shots:
      runs = []
      for seed in range(self.seeds):
        chosen = metrics.sample_few_shot(task.y, k, seed, num_classes=task.num_classes) if counts.min() >= k else None
        query = None if chosen is None else ~np.isin(task.patient, task.patient[chosen])
        if query is None or np.bincount(task.y[query], minlength=task.num_classes).min() == 0:
          break
        runs.append((chosen, query))
      if len(runs) < self.seeds:
        self._skip(f"{task.name} at {k} shots: the rarest class has {counts.min()} example(s), too few for {k} "
                   "support examples and a query from another patient")
        continue
      aurocs, accuracies = [], []
      for chosen, query in runs:
        weights, bias = metrics.ridge_probe_fit(task.x[chosen], task.y[chosen], task.num_classes, self.l2)
        pred, scores = metrics.ridge_probe_predict(task.x[query], weights, bias)
        y_query = task.y[query]
        accuracies.append(metrics.balanced_accuracy(y_query, pred))
        if task.binary:
          aurocs.append(metrics.auroc(y_query == 1, scores[:, 1] - scores[:, 0]))
        else:
          aurocs.append(metrics.multilabel_auroc(np.eye(task.num_classes, dtype=bool)[y_query], scores)[1])
        num_queries.append(y_query.size)
      base = f"{self.prefix}/{task.name}/{k}-shot"
      results.update({f"{base}/auroc_mean": float(np.mean(aurocs)), f"{base}/auroc_std": float(np.std(aurocs)),
                      f"{base}/balanced_accuracy_mean": float(np.mean(accuracies)),
                      f"{base}/balanced_accuracy_std": float(np.std(accuracies))})
      aurocs_by_k[k] = aurocs
    if num_queries:
      results[f"{self.prefix}/{task.name}/num_queries"] = float(np.mean(num_queries))
    if not task.binary:
      results[f"{self.prefix}/{task.name}/num_classes"] = float(task.num_classes)
    return aurocs_by_k

  def _binary_macro(self, results: dict, modality: str, per_seed: dict[str, dict[int, list[float]]]) -> None:
    complete = [label for label, by_k in per_seed.items() if len(by_k) == len(self.shots)]
    if len(complete) < len(per_seed):
      self._skip(f"{modality} macro: leaves out {sorted(set(per_seed) - set(complete))} (not evaluated at every k)")
    if not complete:
      return
    for k in self.shots:
      macro = np.mean([per_seed[label][k] for label in complete], axis=0)  # [seeds]
      base = f"{self.prefix}/{modality}/macro/{k}-shot"
      results[f"{base}/auroc_mean"], results[f"{base}/auroc_std"] = float(macro.mean()), float(macro.std())
    results[f"{self.prefix}/{modality}/macro/num_labels"] = float(len(complete))

  def curves(self, results: dict[str, float]) -> dict[str, list[Curve]]:
    """{modality: [Curve]}: binary macro AUROC (or, for a modality without a macro, each label's AUROC) and each
    multi-class task's balanced accuracy, for the plot."""
    out: dict[str, list[Curve]] = {m: [] for m in self.data.modalities}
    lines = []
    for m in self.data.modalities:
      if f"{self.prefix}/{m}/macro/num_labels" in results:
        lines.append((m, f"{m}/macro", f"{m} binary macro AUROC", "auroc"))
      else:
        lines += [(m, f"{m}/{label}", f"{m}/{label} AUROC", "auroc") for label in self.data.label_names[m]]
    lines += [(t.modality, t.name, f"{t.name} balanced acc.", "balanced_accuracy")
              for t in self.protocol.multiclass_tasks]
    for modality, stem, label, metric in lines:
      base = f"{self.prefix}/{stem}"
      ks = [k for k in self.shots if f"{base}/{k}-shot/{metric}_mean" in results]
      if ks:
        chance = 0.5 if metric == "auroc" else 1.0 / results[f"{base}/num_classes"]
        out[modality].append(Curve(label, ks, [results[f"{base}/{k}-shot/{metric}_mean"] for k in ks],
                                   [results[f"{base}/{k}-shot/{metric}_std"] for k in ks], chance))
    return {m: v for m, v in out.items() if v}

  def summary(self, results: dict[str, float]) -> dict[str, float]:
    """Headline numbers: binary macro AUROC at the fewest and most shots, and each multi-class task's balanced
    accuracy at the most shots it was evaluated with."""
    keys = [f"{self.prefix}/{m}/macro/{k}-shot/auroc_mean" for m in self.data.modalities
            for k in sorted({self.shots[0], self.shots[-1]})]
    for task in self.protocol.multiclass_tasks:
      ran = [f"{self.prefix}/{task.name}/{k}-shot/balanced_accuracy_mean" for k in self.shots]
      keys += [key for key in ran if key in results][-1:]
    return {k: results[k] for k in keys if k in results}

  def table(self, results: dict[str, float]) -> str:
    """Markdown: mean ± std over seeds per k; the headline rows, then AUROC per binary label."""
    header = ["| task | metric | " + " | ".join(f"{k}-shot" for k in self.shots) + " |",
              "|---|---|" + "---:|" * len(self.shots)]

    def row(stem: str, label: str, metric: str) -> str | None:
      cells = []
      for k in self.shots:
        base = f"{self.prefix}/{stem}/{k}-shot/{metric}"
        cells.append(f"{results[base + '_mean']:.3f} ± {results[base + '_std']:.3f}" if base + "_mean" in results
                     else "–")
      return None if set(cells) == {"–"} else f"| {label} | {metric} | " + " | ".join(cells) + " |"

    headline = [row(f"{m}/macro", f"{m} binary macro", "auroc") for m in self.data.modalities]
    headline += [row(t.name, t.name, "balanced_accuracy") for t in self.protocol.multiclass_tasks]
    per_label = [row(f"{m}/{label}", f"{m}/{label}", "auroc") for m in self.data.modalities
                 for label in self.data.label_names[m]]
    lines = [f"Ridge probe (closed form, l2={self.l2}) on frozen embeddings; {self.seeds} seeds; k examples per "
             "class drawn per seed, queries from every other patient.", "", *header, *filter(None, headline)]
    if any(per_label):
      lines += ["", "Per label (binary finding vs absent):", "", *header, *filter(None, per_label)]
    return "\n".join(lines)
