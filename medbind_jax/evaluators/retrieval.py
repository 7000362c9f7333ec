"""Top-K retrieval along the run's edges: M->text and text->M for every tmcl edge, A->B and B->A for every pair
edge (MEDBind: CXR->text, ECG->text, text->CXR, text->ECG, CXR->ECG, ECG->CXR).

- modality->text: the gallery is the split's de-duplicated set of that modality's reports; a query is correct
  at K when the text identical (after normalising case and space) to its own report is in the top K.
- text->modality: each distinct report is a query; correct when any record with that report is in the top K.
- A<->B (pair edge): the linked records of the split that have both; correct when the partner from the same
  encounter is in the top K.
- A<->B within findings (`retrieval_within_findings/...`): the same linked queries, but the gallery is only
  the partners whose report states exactly the findings of the true partner's (same label vector), so the
  reports cannot tell them apart and only what the two signals share beyond their reports (continuous severity,
  in the synthetic world) can rank the true one first. R@1 with its chance level, and the pairwise accuracy: the
  fraction of same-findings impostors the true partner outscores (chance 0.5; queries whose group is the partner
  alone are left out).

Each R@K is reported next to the recall a random ranking would get (`chance@K`), and RSUM (percent).

Exact-report retrieval has a ceiling below 100 where several reports state the same findings: a model that knew
each image's findings exactly could still not tell those reports apart. So every modality<->text direction also
reports, where the split has labels:

- `class_P@K`: class-level precision@K, the fraction of the top K that state the query's findings (a hit is a
  report, or a record, whose label vector equals the query's);
- `oracle_R@K`: the exact-report R@K of an oracle that ranks by the true findings, every item with the query's
  label vector first in random order (expected value: the chance level within that group).
"""

from __future__ import annotations

import numpy as np

from medbind_jax.evaluators import common, metrics


class RetrievalEvaluator:
  """`RetrievalEvaluator(data, text_modalities, pairs, ks=(1, 5, 10)).run(params) -> {'retrieval/<dir>/R@K': ...}`.

  `text_modalities`: modalities retrieved against their reports; `pairs`: (A, B) modality pairs retrieved across
  linked records."""

  def __init__(self, data: common.SplitEmbedder, text_modalities, pairs, *, ks=(1, 5, 10),
               prefix: str = "retrieval"):
    self.data, self.index = data, data.index
    self.text_modalities = [m for m in text_modalities if m in data.modalities]
    self.pairs = [tuple(p) for p in pairs if set(p) <= set(data.modalities)]
    self.ks, self.prefix = tuple(ks), prefix
    self.notes: list[str] = []

  def run(self, params) -> dict[str, float]:
    self.notes = []
    emb = {m: self.data.modality(params, m) for m in self.data.modalities if self.data.num_records[m]}
    results: dict[str, float] = {}
    recalls = {}
    for m in self.text_modalities:
      if m not in emb:
        self.notes.append(f"{m}<->text: the split has no {m} records")
        continue
      _, keys, text_emb = self.data.reports(params, m)
      correct = common.same_key(emb[m].text_key, keys)  # [N, G]
      scores = emb[m].emb @ text_emb.T
      recalls[f"{m}_to_text"] = self._direction(results, f"{m}_to_text", scores, correct)
      recalls[f"text_to_{m}"] = self._direction(results, f"text_to_{m}", scores.T, correct.T)
      if emb[m].labels.shape[1]:  # findings known: class-level precision and the oracle's ceiling
        labels = emb[m].labels
        report_labels = labels[np.argmax(correct, axis=0)]  # [G, L]: each report's findings (a record of it)
        same = np.all(labels[:, None, :] == report_labels[None, :, :], axis=-1)  # [N, G]
        self._findings(results, f"{m}_to_text", scores, same, correct)
        self._findings(results, f"text_to_{m}", scores.T, same.T, correct.T)
    for a, b in self.pairs:
      linked = self.index.linked_pool((a, b))
      if not len(linked):
        self.notes.append(f"{a}<->{b}: the split has no linked records with both")
        continue
      rows = {m: _rows_of(emb[m].index, linked) for m in (a, b)}
      scores = emb[a].emb[rows[a]] @ emb[b].emb[rows[b]].T
      identity = np.eye(len(linked), dtype=bool)
      recalls[f"{a}_to_{b}"] = self._direction(results, f"{a}_to_{b}", scores, identity)
      recalls[f"{b}_to_{a}"] = self._direction(results, f"{b}_to_{a}", scores.T, identity)
      findings = {m: np.array([" ".join(map(str, row)) for row in emb[m].labels[rows[m]].astype(int)])
                  for m in (a, b)}
      for name, pair_scores, partner in ((f"{a}_to_{b}", scores, b), (f"{b}_to_{a}", scores.T, a)):
        results.update(within_groups(pair_scores, findings[partner], f"retrieval_within_findings/{name}"))
    if recalls:
      results[f"{self.prefix}/rsum"] = metrics.rsum(recalls, self.ks)
    return results

  def summary(self, results: dict[str, float]) -> dict[str, float]:
    """Headline numbers: RSUM and R@1 of every direction."""
    return {k: v for k, v in results.items()
            if k.startswith(self.prefix + "/") and (k.endswith("/rsum") or k.endswith(f"/R@{self.ks[0]}"))}

  def table(self, results: dict[str, float]) -> str:
    lines = ["R@K in %, chance level in brackets.", "", format_table(results, self.prefix, self.ks)]
    if self.pairs:
      lines[0] += " Pair directions rank the linked partner among the split's linked records."
    with_findings = sorted({k.split("/")[1] for k in results if k.startswith(self.prefix + "/") and "/oracle_R@" in k})
    if with_findings:
      lines += ["", "Against the findings: class-level precision@K (the top K's share of items stating the query's "
                "findings) and the exact-report R@K of an oracle ranking by the true findings (the ceiling where "
                "several reports state the same findings), in %:", "",
                "| direction | " + " | ".join(f"class P@{k}" for k in self.ks) + " | "
                + " | ".join(f"oracle R@{k}" for k in self.ks) + " |", "|---|" + "---:|" * (2 * len(self.ks))]
      for d in with_findings:
        base = f"{self.prefix}/{d}"
        cells = [f"{100 * results[f'{base}/class_P@{k}']:.1f}" for k in self.ks]
        cells += [f"{100 * results[f'{base}/oracle_R@{k}']:.1f}" for k in self.ks]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    within = sorted({k.split("/")[1] for k in results if k.startswith("retrieval_within_findings/")})
    if within:
      lines += ["", "Linked pairs within same-findings galleries (what the signals share beyond their reports):",
                "", "| direction | queries (with impostors) | R@1 (chance) | pairwise accuracy (chance 50) |",
                "|---|---:|---:|---:|"]
      for d in within:
        base = f"retrieval_within_findings/{d}"
        pairwise = results.get(f"{base}/pairwise_accuracy")
        queries = f"{results[f'{base}/num_queries']:.0f} ({results[f'{base}/num_queries_with_impostors']:.0f})"
        lines.append(f"| {d} | {queries} | {100 * results[f'{base}/R@1']:.1f} ({100 * results[f'{base}/chance@1']:.1f})"
                     " | " + ("–" if pairwise is None else f"{100 * pairwise:.1f}") + " |")
    return "\n".join(lines)

  def _direction(self, results: dict, name: str, scores: np.ndarray, correct: np.ndarray) -> dict[int, float]:
    recall = metrics.recall_at_k(scores, correct, self.ks)
    chance = metrics.chance_recall_at_k(correct.sum(1), correct.shape[1], self.ks)
    for k in self.ks:
      results[f"{self.prefix}/{name}/R@{k}"] = recall[k]
      results[f"{self.prefix}/{name}/chance@{k}"] = chance[k]
    results[f"{self.prefix}/{name}/num_queries"] = float(scores.shape[0])
    results[f"{self.prefix}/{name}/gallery_size"] = float(scores.shape[1])
    return recall


  def _findings(self, results: dict, name: str, scores: np.ndarray, same: np.ndarray, correct: np.ndarray) -> None:
    """class_P@K and oracle_R@K of one direction (see the module docstring); `same` [Q, G]: gallery item states
    the query's findings; `correct` [Q, G]: exact matches (a subset of `same`)."""
    base = f"{self.prefix}/{name}"
    for k, value in class_precision_at_k(scores, same, self.ks).items():
      results[f"{base}/class_P@{k}"] = value
    for k, value in oracle_recall_at_k(same, correct, self.ks).items():
      results[f"{base}/oracle_R@{k}"] = value


def class_precision_at_k(scores: np.ndarray, relevant: np.ndarray, ks=(1, 5, 10)) -> dict[int, float]:
  """Mean over queries of the fraction of the top K (K clamped to the gallery) that are `relevant` [Q, G]; ties
  broken by gallery order (a stable sort of -scores)."""
  order = np.argsort(-scores, axis=1, kind="stable")
  hits = np.take_along_axis(relevant, order, axis=1)
  return {k: float(hits[:, :min(k, hits.shape[1])].mean()) for k in ks}


def oracle_recall_at_k(same: np.ndarray, correct: np.ndarray, ks=(1, 5, 10)) -> dict[int, float]:
  """Expected R@K of a ranking that puts every gallery item of the query's findings (`same` [Q, G]) and its
  `correct` ones first in random order: the chance level within that group, averaged over queries."""
  same = same | correct  # one text with two label vectors (label extraction noise): its exact matches still count
  group, num_correct = same.sum(1), correct.sum(1)
  out = {k: 0.0 for k in ks}
  for size in np.unique(group):  # chance_recall_at_k takes one gallery size
    rows = group == size
    for k, value in metrics.chance_recall_at_k(num_correct[rows], int(size), ks).items():
      out[k] += value * rows.sum() / len(group)
  return out


def within_groups(scores: np.ndarray, partner_groups: np.ndarray, prefix: str) -> dict[str, float]:
  """Linked retrieval restricted to same-group galleries: `scores` [N, N] with the true partner of query i at
  column i, `partner_groups` [N] the partners' groups (e.g. their findings). See the module docstring."""
  same = partner_groups[None, :] == partner_groups[:, None]  # [N, N]: gallery j is in query i's partner's group
  own = np.diag(scores)[:, None]
  impostors = same & ~np.eye(len(scores), dtype=bool)
  outranked = (impostors & (scores >= own)).sum(1)  # ties count against the query, as in recall_at_k
  group = same.sum(1)
  has_impostors = group > 1
  out = {f"{prefix}/R@1": float(np.mean(outranked == 0)), f"{prefix}/chance@1": float(np.mean(1 / group)),
         f"{prefix}/num_queries": float(len(scores)),
         f"{prefix}/num_queries_with_impostors": float(has_impostors.sum())}
  if has_impostors.any():
    beaten = (impostors & (scores < own)).sum(1)
    out[f"{prefix}/pairwise_accuracy"] = float(np.mean(beaten[has_impostors] / (group[has_impostors] - 1)))
  return out


def _rows_of(record_numbers: np.ndarray, wanted: np.ndarray) -> np.ndarray:
  """Positions in `record_numbers` of each of `wanted` (all must be present)."""
  position = {int(r): i for i, r in enumerate(record_numbers)}
  return np.array([position[int(r)] for r in wanted], np.int64)


def format_table(results: dict[str, float], prefix: str = "retrieval", ks=(1, 5, 10)) -> str:
  """Markdown table: one row per direction, R@K (chance) in percent."""
  directions = sorted({k.split("/")[1] for k in results if k.startswith(prefix + "/") and k.count("/") == 2})
  lines = ["| direction | queries | gallery | " + " | ".join(f"R@{k} (chance)" for k in ks) + " |",
           "|---|---:|---:|" + "---:|" * len(ks)]
  for d in directions:
    base = f"{prefix}/{d}"
    cells = [f"{100 * results[f'{base}/R@{k}']:.1f} ({100 * results[f'{base}/chance@{k}']:.1f})" for k in ks]
    lines.append(f"| {d} | {results[f'{base}/num_queries']:.0f} | {results[f'{base}/gallery_size']:.0f} | "
                 + " | ".join(cells) + " |")
  if f"{prefix}/rsum" in results:
    lines.append(f"\nRSUM: {results[f'{prefix}/rsum']:.1f}")
  return "\n".join(lines)
