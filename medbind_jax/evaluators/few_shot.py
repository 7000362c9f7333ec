"""Few-shot and label-fraction linear probes on frozen CXR and ECG embeddings.

The probe is closed-form ridge regression to one-hot targets (`metrics.ridge_probe_fit`, an exact linear solve: no
iterations, learning rate or convergence check, so every number is reproducible), not logistic regression; on an
imbalanced support (label fractions) its squared errors are class-balanced (`metrics.balanced_weights`), as balanced
accuracy scores every class alike.

Tasks, per input modality: binary, one per dataset label (finding vs absent; unknown labels left out), scored by
the AUROC of the probe's score difference and the balanced accuracy of its argmax; and multi-class, one per
protocol task, over the examples with exactly one of the task's classes (balanced accuracy, one-vs-rest macro
AUROC). Queries are every example of the evaluated split; the probe is fitted on a support set:

- `FewShotEvaluator` with a support split (`config.eval.support_split`, default the training split, as users
  expect): for each seed (0..seeds-1) and k, k examples per class drawn from the support split
  (`metrics.sample_few_shot`; for one seed the k-shot set is inside the 2k-shot set). A k is skipped where the
  support split has fewer than k examples of a class.
- `FewShotEvaluator` without one (support_split ""): support drawn from the evaluated split itself and scored on
  every example of the *other* patients, so no query shares a patient with the probe's training examples.
- `LinearProbeEvaluator` (MERL's label-fraction protocol): a fraction (1%, 10%, 100%) of the support split's
  examples of each task, stratified by class (at least one per class), one draw per seed (one draw at 100%).

A modality's binary macro averages, per seed, the labels evaluated at every k (or fraction), so a curve compares
like with like. Multi-class classes without examples are dropped (noted), so every k sees the same classes. Each
number is reported as mean and standard deviation over seeds.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

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

  def rows(self, keep: np.ndarray) -> "_Task":
    return dataclasses.replace(self, x=self.x[keep], y=self.y[keep], patient=self.patient[keep])


# A draw: (support embeddings, support classes, query embeddings, query classes), or the reason none can be made.
Draw = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class _Probe:
  """What both probes share: the tasks of each modality, scoring, the binary macro and the markdown table. A
  subclass says what its points are (shots, fractions), how a point is labelled in result keys and how one
  seed's support set is drawn."""

  points: tuple
  what: str  # first sentence of the table

  def __init__(self, data: common.SplitEmbedder, protocol: protocol_lib.Protocol, support, *, seeds: int,
               l2: float, prefix: str):
    if seeds < 1:
      raise ValueError(f"{prefix} needs seeds >= 1, got {seeds}")
    self.data, self.protocol, self.support = data, protocol, support
    self.seeds, self.l2, self.prefix = int(seeds), float(l2), prefix
    self.notes: list[str] = []

  def label(self, point) -> str:
    raise NotImplementedError

  def draws(self, task: _Task, support: _Task | None, point) -> list[Draw] | str:
    raise NotImplementedError

  def _skip(self, message: str) -> None:
    log.info("%s: skipping %s", self.prefix, message)
    self.notes.append(message)

  def run(self, params) -> dict[str, float]:
    self.notes = []
    results: dict[str, float] = {}
    for modality in self.data.modalities:
      if not self.data.num_records[modality]:
        self._skip(f"{modality}: the split has no {modality} records")
        continue
      support_emb = None
      if self.support is not None:
        if not self.support.num_records.get(modality):
          self._skip(f"{modality}: the support split ({self.support.index.split}) has no {modality} records")
          continue
        support_emb = self.support.modality(params, modality)
      emb = self.data.modality(params, modality)
      names = self.data.label_names[modality]
      if support_emb is not None and self.support.label_names[modality] != names:
        raise ValueError(f"the support split's {modality} labels {self.support.label_names[modality]} differ from "
                         f"the evaluated split's {names}: both must come from the same dataset")
      tasks = [(self._binary(emb, column, f"{modality}/{label}"),
                None if support_emb is None else self._binary(support_emb, column, f"{modality}/{label}"))
               for column, label in enumerate(names)]
      per_seed = {task.name.split("/", 1)[1]: self._evaluate(results, task, support) for task, support in tasks}
      self._binary_macro(results, modality, {k: v for k, v in per_seed.items() if v})
      for spec in self.protocol.multiclass_tasks:
        if spec.modality == modality:
          pair = self._multiclass_task(spec, emb, support_emb, names)
          if pair is not None:
            self._evaluate(results, *pair)
    return results

  def _patients(self, data, emb) -> np.ndarray:
    return np.unique(data.patient_ids(emb.index), return_inverse=True)[1].astype(np.int64)

  def _binary(self, emb, column: int, name: str) -> _Task:
    known, positive = common.known_binary(emb.labels[:, column])
    # Patients matter only where support and queries come from the same split.
    patient = self._patients(self.data, emb) if self.support is None else np.zeros(len(emb.emb), np.int64)
    return _Task(name, True, 2, emb.emb, positive.astype(np.int64), patient).rows(known)

  def _multiclass_task(self, spec: protocol_lib.MulticlassTask, emb, support_emb, names) -> tuple | None:
    missing = [c for c in spec.classes if c not in names]
    if missing:
      self._skip(f"task {spec.name}: classes {missing} are not labels of this split")
      return None
    columns = [names.index(c) for c in spec.classes]

    def task_of(e, patient):
      selected, y = common.single_label(e.labels, columns)
      return _Task(spec.name, False, len(spec.classes), e.emb, y, patient).rows(selected)

    if support_emb is None:
      task, support = task_of(emb, self._patients(self.data, emb)), None
      counts = np.bincount(task.y, minlength=len(spec.classes))
      keep = counts >= 2  # one to learn from, one to test
      why = "fewer than 2 examples"
    else:
      task = task_of(emb, np.zeros(len(emb.emb), np.int64))
      support = task_of(support_emb, np.zeros(len(support_emb.emb), np.int64))
      counts = np.bincount(task.y, minlength=len(spec.classes))
      support_counts = np.bincount(support.y, minlength=len(spec.classes))
      keep = (counts >= 1) & (support_counts >= 1)
      why = "no example in the evaluated or the support split (examples in each)"
    if not keep.all():
      self._skip(f"task {spec.name}: classes with {why} left out: "
                 + ", ".join(f"{c} ({counts[i]}" + ("" if support_emb is None else f", {support_counts[i]}") + ")"
                             for i, c in enumerate(spec.classes) if not keep[i]))
    if keep.sum() < 2:
      self._skip(f"task {spec.name}: fewer than 2 classes left")
      return None
    remap = np.cumsum(keep) - 1  # old class -> class among the kept ones

    def kept(t):
      t = t.rows(keep[t.y])
      return dataclasses.replace(t, y=remap[t.y], num_classes=int(keep.sum()))

    return kept(task), None if support is None else kept(support)

  def _evaluate(self, results: dict, task: _Task, support: _Task | None) -> dict:
    """Fills the task's mean/std per point; returns {point: [AUROC per seed]} for the points that ran."""
    counts = np.bincount(task.y, minlength=task.num_classes)
    if counts.min() == 0:
      self._skip(f"{task.name}: {counts.tolist()} examples per class (every class is needed)")
      return {}
    aurocs_by_point, num_queries = {}, []
    for point in self.points:
      draws = self.draws(task, support, point)
      if isinstance(draws, str):
        self._skip(draws)
        continue
      aurocs, accuracies = [], []
      for support_x, support_y, query_x, query_y in draws:
        shots = np.bincount(support_y, minlength=task.num_classes)
        # Class-balanced errors where the support is imbalanced (label fractions), so the argmax is not pulled to
        # the majority class; a k-shot support is balanced and fitted unweighted.
        balance = None if shots.min() == shots.max() else metrics.balanced_weights(support_y, task.num_classes)
        weights, bias = metrics.ridge_probe_fit(support_x, support_y, task.num_classes, self.l2, balance)
        pred, scores = metrics.ridge_probe_predict(query_x, weights, bias)
        accuracies.append(metrics.balanced_accuracy(query_y, pred))
        if task.binary:
          aurocs.append(metrics.auroc(query_y == 1, scores[:, 1] - scores[:, 0]))
        else:
          aurocs.append(metrics.multilabel_auroc(np.eye(task.num_classes, dtype=bool)[query_y], scores)[1])
        num_queries.append(query_y.size)
      base = f"{self.prefix}/{task.name}/{self.label(point)}"
      results.update({f"{base}/auroc_mean": float(np.mean(aurocs)), f"{base}/auroc_std": float(np.std(aurocs)),
                      f"{base}/balanced_accuracy_mean": float(np.mean(accuracies)),
                      f"{base}/balanced_accuracy_std": float(np.std(accuracies))})
      aurocs_by_point[point] = aurocs
    if num_queries:
      results[f"{self.prefix}/{task.name}/num_queries"] = float(np.mean(num_queries))
    if not task.binary:
      results[f"{self.prefix}/{task.name}/num_classes"] = float(task.num_classes)
    return aurocs_by_point

  def _binary_macro(self, results: dict, modality: str, per_seed: dict[str, dict]) -> None:
    complete = [label for label, by_point in per_seed.items() if len(by_point) == len(self.points)]
    if len(complete) < len(per_seed):
      self._skip(f"{modality} macro: leaves out {sorted(set(per_seed) - set(complete))} (not evaluated at every "
                 "point)")
    if not complete:
      return
    for point in self.points:
      # Seeds line up across labels (a 100% probe has one draw: its mean and std are the same either way).
      runs = min(len(per_seed[label][point]) for label in complete)
      macro = np.mean([per_seed[label][point][:runs] for label in complete], axis=0)  # [seeds]
      base = f"{self.prefix}/{modality}/macro/{self.label(point)}"
      results[f"{base}/auroc_mean"], results[f"{base}/auroc_std"] = float(macro.mean()), float(macro.std())
    results[f"{self.prefix}/{modality}/macro/num_labels"] = float(len(complete))

  def summary(self, results: dict[str, float]) -> dict[str, float]:
    """Headline numbers: binary macro AUROC at the first and last point, and each multi-class task's balanced
    accuracy at the last point it was evaluated at."""
    ends = [self.points[0]] + ([self.points[-1]] if len(self.points) > 1 else [])
    keys = [f"{self.prefix}/{m}/macro/{self.label(p)}/auroc_mean" for m in self.data.modalities for p in ends]
    for task in self.protocol.multiclass_tasks:
      ran = [f"{self.prefix}/{task.name}/{self.label(p)}/balanced_accuracy_mean" for p in self.points]
      keys += [key for key in ran if key in results][-1:]
    return {k: results[k] for k in keys if k in results}

  def _source(self) -> str:
    if self.support is None:
      return "drawn from the evaluated split; queries: every other patient's examples"
    return (f"drawn from split `{self.support.index.split}` ("
            + ", ".join(f"{self.support.num_records[m]} {m}" for m in self.support.modalities)
            + " records); queries: every example of the evaluated split")

  def table(self, results: dict[str, float]) -> str:
    """Markdown: mean ± std over seeds per point; the headline rows, then AUROC per binary label."""
    header = ["| task | metric | " + " | ".join(self.label(p) for p in self.points) + " |",
              "|---|---|" + "---:|" * len(self.points)]

    def row(stem: str, label: str, metric: str) -> str | None:
      cells = []
      for point in self.points:
        base = f"{self.prefix}/{stem}/{self.label(point)}/{metric}"
        cells.append(f"{results[base + '_mean']:.3f} ± {results[base + '_std']:.3f}" if base + "_mean" in results
                     else "–")
      return None if set(cells) == {"–"} else f"| {label} | {metric} | " + " | ".join(cells) + " |"

    headline = [row(f"{m}/macro", f"{m} binary macro", "auroc") for m in self.data.modalities]
    headline += [row(t.name, t.name, "balanced_accuracy") for t in self.protocol.multiclass_tasks]
    per_label = [row(f"{m}/{label}", f"{m}/{label}", "auroc") for m in self.data.modalities
                 for label in self.data.label_names[m]]
    lines = [f"{self.what} Ridge probe (closed form, l2={self.l2}) on frozen embeddings; {self.seeds} seeds; "
             f"support {self._source()}.", "", *header, *filter(None, headline)]
    if any(per_label):
      lines += ["", "Per label (binary finding vs absent):", "", *header, *filter(None, per_label)]
    return "\n".join(lines)


class FewShotEvaluator(_Probe):
  """`FewShotEvaluator(data, protocol, support=train_data, seeds=5).run(params)
  -> {'few_shot/<task>/<k>-shot/<metric>_mean': ...}` (support None: from `data` itself, other patients queried)."""

  what = "k examples per class, drawn per seed."

  def __init__(self, data: common.SplitEmbedder, protocol: protocol_lib.Protocol, *, support=None,
               shots: Sequence[int] = (1, 2, 4, 8, 16), seeds: int = 5, l2: float = 0.1, prefix: str = "few_shot"):
    if not shots or min(shots) < 1:
      raise ValueError(f"few-shot needs shots >= 1, got shots={shots}")
    super().__init__(data, protocol, support, seeds=seeds, l2=l2, prefix=prefix)
    self.shots = self.points = tuple(sorted(shots))

  def label(self, point) -> str:
    return f"{point}-shot"

  def draws(self, task: _Task, support: _Task | None, k: int) -> list[Draw] | str:
    if support is not None:
      counts = np.bincount(support.y, minlength=task.num_classes)
      if counts.min() < k:
        return (f"{task.name} at {k} shots: the support split ({self.support.index.split}) has {counts.tolist()} "
                "examples per class")
      chosen = [metrics.sample_few_shot(support.y, k, seed, num_classes=task.num_classes) for seed in range(self.seeds)]
      return [(support.x[c], support.y[c], task.x, task.y) for c in chosen]
    counts = np.bincount(task.y, minlength=task.num_classes)
    out = []
    for seed in range(self.seeds):
      chosen = metrics.sample_few_shot(task.y, k, seed, num_classes=task.num_classes) if counts.min() >= k else None
      query = None if chosen is None else ~np.isin(task.patient, task.patient[chosen])
      if query is None or np.bincount(task.y[query], minlength=task.num_classes).min() == 0:
        return (f"{task.name} at {k} shots: the rarest class has {counts.min()} example(s), too few for {k} "
                "support examples and a query from another patient")
      out.append((task.x[chosen], task.y[chosen], task.x[query], task.y[query]))
    return out

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


class LinearProbeEvaluator(_Probe):
  """`LinearProbeEvaluator(data, protocol, support=train_data, fractions=(0.01, 0.1, 1.0)).run(params)
  -> {'linear_probe/<task>/<pct>pct/<metric>_mean': ...}`: MERL's label-fraction protocol."""

  what = "A fraction of the support split's examples of each task, stratified by class (at least one per class)."

  def __init__(self, data: common.SplitEmbedder, protocol: protocol_lib.Protocol, *, support,
               fractions: Sequence[float] = (0.01, 0.1, 1.0), seeds: int = 5, l2: float = 0.1,
               prefix: str = "linear_probe"):
    if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
      raise ValueError(f"linear-probe fractions must lie in (0, 1], got {fractions}")
    super().__init__(data, protocol, support, seeds=seeds, l2=l2, prefix=prefix)
    self.points = tuple(sorted(float(f) for f in fractions))

  def label(self, fraction: float) -> str:
    return f"{100 * fraction:g}pct"

  def run(self, params) -> dict[str, float]:
    if self.support is None:  # e.g. an evaluation-only dataset (one split) among several
      self.notes = ["no support split to fit on (support_split is ''): set config.eval.support_split, or the "
                    "dataset's support_split in config.eval.datasets, to a split of the data such as 'train'"]
      log.info("linear_probe: skipping: %s", self.notes[0])
      return {}
    return super().run(params)

  def draws(self, task: _Task, support: _Task, fraction: float) -> list[Draw] | str:
    members = [np.flatnonzero(support.y == c) for c in range(task.num_classes)]
    if min(len(m) for m in members) == 0:
      return (f"{task.name} at {self.label(fraction)}: the support split ({self.support.index.split}) has "
              f"{[len(m) for m in members]} examples per class")
    out = []
    for seed in range(1 if fraction == 1.0 else self.seeds):
      rng = np.random.default_rng(seed)
      rows = np.sort(np.concatenate([m[rng.permutation(len(m))[:max(1, round(fraction * len(m)))]]
                                     for m in members]))
      out.append((support.x[rows], support.y[rows], task.x, task.y))
    return out
