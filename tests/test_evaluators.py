"""The evaluation suite: each evaluator on constructed embeddings whose answer is known, the protocol file, the
t-SNE, the report files, and `main.py --mode=eval` on a tiny trained run."""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from medbind_jax import evaluators
from medbind_jax.evaluators import common, cross_modal, few_shot, protocol, report, retrieval, tsne, zero_shot

D = 24  # embedding width of the constructed data


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


class FakeData:
  """Duck-typed `common.SplitEmbedder` over given arrays: no model, no files. Record numbers are global across
  modalities (as in a SplitIndex); `patients[r]` is record r's patient."""

  def __init__(self, label_names, emb, labels, patients, text_vectors=None, report_keys=None):
    self.label_names = label_names
    self.modalities = self.report_modalities = sorted(label_names)
    self.num_records = {m: len(emb.get(m, [])) for m in self.modalities}
    self.index = types.SimpleNamespace(split="test", data_dir="constructed")
    self.patients, self.text_vectors = patients, text_vectors or {}
    self._emb, start = {}, 0
    for m in emb:
      n = len(emb[m])
      keys = report_keys[m] if report_keys else np.zeros((n, 2), np.int32)
      self._emb[m] = common.ModalityEmbeddings(emb=np.asarray(emb[m], np.float32), index=np.arange(start, start + n),
                                               text_key=keys, labels=np.asarray(labels[m], np.float32))
      start += n
    self.released = 0

  def modality(self, params, m):
    return self._emb[m]

  def texts(self, params, texts):
    return np.stack([self.text_vectors[t] for t in texts])

  def reports(self, params, m):
    keys = np.unique(self._emb[m].text_key, axis=0)
    return [str(k) for k in keys.tolist()], keys, np.stack([self.text_vectors[str(k)] for k in keys.tolist()])

  def patient_ids(self, record_numbers):
    return [self.patients[int(r)] for r in record_numbers]

  def release(self):
    self.released += 1


def _write_protocol(path, prompts, multiclass=(), cross=()):
  with open(path, "w") as f:
    json.dump({"version": "test_v1", "prompts": prompts, "multiclass_tasks": list(multiclass),
               "cross_modal_tasks": list(cross)}, f)
  return protocol.load(str(path))


def _aligned_world(rng, n=300, names=("cardiomegaly", "edema", "no_finding"), noise=0.05, aligned=True):
  """CXR embeddings built from per-label 'present' (e_c) and 'absent' (n_c) directions; prompts of label c embed to
  e_c (positive) and n_c (negative). With aligned=False the embeddings are random instead."""
  basis = np.linalg.qr(rng.normal(size=(D, D)))[0].T  # orthonormal rows
  present, absent = basis[:len(names)], basis[len(names):2 * len(names)]
  labels = (rng.random((n, len(names))) < 0.3).astype(np.float32)
  labels[:, -1] = labels[:, :-1].sum(1) == 0  # no_finding
  emb = labels @ present + (1 - labels) @ absent + noise * rng.normal(size=(n, D))
  if not aligned:
    emb = rng.normal(size=(n, D))
  text_vectors, prompts = {}, {}
  for i, name in enumerate(names):
    prompts[name] = {"positive": [f"{name} present {j}" for j in range(3)],
                     "negative": [f"{name} absent {j}" for j in range(2)]}
    for j in range(3):
      text_vectors[f"{name} present {j}"] = _unit(present[i] + 0.1 * rng.normal(size=D))
    for j in range(2):
      text_vectors[f"{name} absent {j}"] = _unit(absent[i] + 0.1 * rng.normal(size=D))
  data = FakeData({"cxr": list(names), "ecg": []}, {"cxr": _unit(emb)}, {"cxr": labels},
                  [f"p{i}" for i in range(n)], text_vectors)
  return data, prompts


# ---------------------------------------------------------------------------------------------------------------------
# Zero-shot
# ---------------------------------------------------------------------------------------------------------------------


def test_prototype_is_the_renormalised_mean_of_unit_prompts():
  got = zero_shot.prototype(np.array([[2.0, 0.0], [0.0, 5.0], [0.0, 1.0]]))
  np.testing.assert_allclose(got, _unit(np.array([1.0, 2.0])))


def test_zero_shot_is_perfect_when_prompts_align_with_the_class_directions(tmp_path):
  data, prompts = _aligned_world(np.random.default_rng(0))
  proto = _write_protocol(tmp_path / "p.json", {"cxr": prompts}, multiclass=[
      {"name": "single", "modality": "cxr", "classes": ["cardiomegaly", "edema", "no_finding"]}])
  results = zero_shot.ZeroShotEvaluator(data, proto).run(params=None)
  for name in ("cardiomegaly", "edema", "no_finding"):
    assert results[f"zero_shot/cxr/{name}/auroc"] == 1.0
    assert results[f"zero_shot/cxr/{name}/balanced_accuracy"] == 1.0
  assert results["zero_shot/cxr/macro_auroc"] == 1.0 and results["zero_shot/cxr/num_labels"] == 3
  # Multi-class over the single-finding rows: every row with exactly one label (no_finding rows included).
  single = data.modality(None, "cxr").labels.sum(1) == 1
  assert results["zero_shot/single/num_examples"] == single.sum()
  assert results["zero_shot/single/balanced_accuracy"] == 1.0
  assert results["zero_shot/single/chance_balanced_accuracy"] == pytest.approx(1 / 3)


def test_zero_shot_swapped_prompts_score_zero_and_random_embeddings_score_chance(tmp_path):
  data, prompts = _aligned_world(np.random.default_rng(1))
  swapped = {k: {"positive": v["negative"], "negative": v["positive"]} for k, v in prompts.items()}
  results = zero_shot.ZeroShotEvaluator(data, _write_protocol(tmp_path / "s.json", {"cxr": swapped})).run(None)
  assert results["zero_shot/cxr/macro_auroc"] == 0.0

  data, prompts = _aligned_world(np.random.default_rng(2), n=3000, aligned=False)
  results = zero_shot.ZeroShotEvaluator(data, _write_protocol(tmp_path / "r.json", {"cxr": prompts})).run(None)
  for name in ("cardiomegaly", "edema", "no_finding"):
    assert abs(results[f"zero_shot/cxr/{name}/auroc"] - 0.5) < 0.05
    assert abs(results[f"zero_shot/cxr/{name}/balanced_accuracy"] - 0.5) < 0.05


def test_zero_shot_skips_labels_without_prompts_or_positives_and_ignores_unknown_labels(tmp_path):
  data, prompts = _aligned_world(np.random.default_rng(3))
  labels = data.modality(None, "cxr").labels
  labels[:, 1] = 0.0  # no edema anywhere
  labels[:10, 0] = -1.0  # cardiomegaly unknown for ten rows
  del prompts["no_finding"]
  evaluator = zero_shot.ZeroShotEvaluator(data, _write_protocol(tmp_path / "p.json", {"cxr": prompts}))
  results = evaluator.run(None)
  assert set(results) == {"zero_shot/cxr/cardiomegaly/auroc", "zero_shot/cxr/cardiomegaly/balanced_accuracy",
                          "zero_shot/cxr/cardiomegaly/num_positive", "zero_shot/cxr/cardiomegaly/num_examples",
                          "zero_shot/cxr/macro_auroc", "zero_shot/cxr/macro_balanced_accuracy",
                          "zero_shot/cxr/num_labels"}
  assert results["zero_shot/cxr/cardiomegaly/num_examples"] == len(labels) - 10
  notes = " ".join(evaluator.notes)
  assert "cxr/edema: 0 positive" in notes and "cxr/no_finding: protocol test_v1 has no prompts" in notes
  assert "ecg: the split has no ecg records" in notes


# ---------------------------------------------------------------------------------------------------------------------
# Few-shot
# ---------------------------------------------------------------------------------------------------------------------


def _two_class_world(rng, n=400, separable=True):
  labels = (rng.random((n, 1)) < 0.4).astype(np.float32)
  direction = _unit(rng.normal(size=(2, D)))
  emb = direction[labels[:, 0].astype(int)] + 0.1 * rng.normal(size=(n, D)) if separable else rng.normal(size=(n, D))
  return FakeData({"cxr": ["finding"], "ecg": []}, {"cxr": _unit(emb)}, {"cxr": labels},
                  [f"patient{i // 2}" for i in range(n)])  # two records per patient


def test_few_shot_separable_classes_reach_one_and_random_ones_stay_at_chance():
  proto = protocol.Protocol("none", {}, (), ())
  results = few_shot.FewShotEvaluator(_two_class_world(np.random.default_rng(0)), proto, seeds=5).run(None)
  for k in (1, 2, 4, 8, 16):
    assert results[f"few_shot/cxr/finding/{k}-shot/auroc_mean"] > 0.99
    assert results[f"few_shot/cxr/finding/{k}-shot/balanced_accuracy_mean"] > 0.95
  assert results["few_shot/cxr/macro/16-shot/auroc_mean"] == pytest.approx(
      results["few_shot/cxr/finding/16-shot/auroc_mean"])

  results = few_shot.FewShotEvaluator(_two_class_world(np.random.default_rng(1), n=2000, separable=False), proto,
                                      seeds=5).run(None)
  for k in (1, 16):
    assert abs(results[f"few_shot/cxr/finding/{k}-shot/auroc_mean"] - 0.5) < 0.06


def test_few_shot_is_deterministic_per_seed_and_queries_come_from_the_other_patients(monkeypatch):
  proto = protocol.Protocol("none", {}, (), ())
  data = _two_class_world(np.random.default_rng(2), separable=False)
  first = few_shot.FewShotEvaluator(data, proto, seeds=5).run(None)
  assert few_shot.FewShotEvaluator(data, proto, seeds=5).run(None) == first
  one_seed = few_shot.FewShotEvaluator(data, proto, seeds=1).run(None)
  assert one_seed["few_shot/cxr/finding/4-shot/auroc_std"] == 0.0
  assert first["few_shot/cxr/finding/4-shot/auroc_std"] > 0.0  # other seeds draw other supports

  # Which records the probe is fitted on and scored on: every record of a support patient (two per patient here)
  # is kept out of the queries, and every other record is a query.
  emb = data.modality(None, "cxr").emb
  record_of = {row.tobytes(): i for i, row in enumerate(np.asarray(emb, np.float64))}
  calls = []
  fit, predict = few_shot.metrics.ridge_probe_fit, few_shot.metrics.ridge_probe_predict
  monkeypatch.setattr(few_shot.metrics, "ridge_probe_fit", lambda x, *a: calls.append(("fit", x)) or fit(x, *a))
  monkeypatch.setattr(few_shot.metrics, "ridge_probe_predict",
                      lambda x, *a: calls.append(("predict", x)) or predict(x, *a))
  few_shot.FewShotEvaluator(data, proto, shots=(1, 4), seeds=2).run(None)
  assert [c[0] for c in calls] == ["fit", "predict"] * 4
  for (_, support_x), (_, query_x) in zip(calls[::2], calls[1::2]):
    support = {record_of[np.asarray(r, np.float64).tobytes()] for r in support_x}
    query = {record_of[np.asarray(r, np.float64).tobytes()] for r in query_x}
    support_patients = {data.patients[i] for i in support}
    assert len(support) in (2, 8) and not support_patients & {data.patients[i] for i in query}
    assert len(query) == len(emb) - 2 * len(support_patients)


def test_few_shot_multiclass_drops_classes_without_examples_and_stops_at_the_rarest_class():
  rng = np.random.default_rng(3)
  n = 400
  names = ["a", "b", "c", "d"]
  cls = rng.choice(3, size=n, p=(0.6, 0.37, 0.03))  # class c is rare; d never occurs
  rare = int((cls == 2).sum())
  assert 2 <= rare <= 16
  labels = np.eye(len(names), dtype=np.float32)[cls]
  emb = _unit(np.eye(D)[cls] + 0.05 * rng.normal(size=(n, D)))
  data = FakeData({"cxr": names, "ecg": []}, {"cxr": emb}, {"cxr": labels}, [f"q{i}" for i in range(n)])
  proto = protocol.Protocol("none", {}, (protocol.MulticlassTask("abcd", "cxr", tuple(names)),), ())
  evaluator = few_shot.FewShotEvaluator(data, proto, seeds=3)
  results = evaluator.run(None)
  ran = [k for k in (1, 2, 4, 8, 16) if f"few_shot/abcd/{k}-shot/balanced_accuracy_mean" in results]
  assert ran == [k for k in (1, 2, 4, 8, 16) if k < rare]  # k support examples of c, and at least one c query
  assert results["few_shot/abcd/num_classes"] == 3
  assert all(results[f"few_shot/abcd/{k}-shot/balanced_accuracy_mean"] == 1.0 for k in ran)
  assert any("fewer than 2 examples left out: d (0)" in note for note in evaluator.notes)
  assert any("cxr/d: [400, 0] examples per class" in note for note in evaluator.notes)
  curves = evaluator.curves(results)["cxr"]
  assert [c.label for c in curves] == ["cxr binary macro AUROC", "abcd balanced acc."]
  assert curves[1].shots == ran and curves[1].chance == pytest.approx(1 / 3)


# Two class directions shared by every split below (one embedding space, as one model's).
_DIRECTIONS = _unit(np.random.default_rng(99).normal(size=(2, D)))


def _binary_split(rng, n, positives, split):
  """A one-label CXR split with `positives` findings, embedded along `_DIRECTIONS`; one patient per record."""
  labels = np.zeros((n, 1), np.float32)
  labels[rng.choice(n, positives, replace=False), 0] = 1.0
  direction = _DIRECTIONS
  emb = _unit(direction[labels[:, 0].astype(int)] + 0.1 * rng.normal(size=(n, D)))
  data = FakeData({"cxr": ["finding"], "ecg": []}, {"cxr": emb}, {"cxr": labels},
                  [f"{split}{i}" for i in range(n)])
  data.index = types.SimpleNamespace(split=split, data_dir="constructed")
  return data


def _record_probe_calls(monkeypatch):
  calls = []
  fit, predict = few_shot.metrics.ridge_probe_fit, few_shot.metrics.ridge_probe_predict
  monkeypatch.setattr(few_shot.metrics, "ridge_probe_fit",
                      lambda x, y, *a: calls.append(("fit", x, y)) or fit(x, y, *a))
  monkeypatch.setattr(few_shot.metrics, "ridge_probe_predict",
                      lambda x, *a: calls.append(("predict", x, None)) or predict(x, *a))
  return calls


def test_few_shot_support_from_the_training_split_reaches_every_k_and_queries_every_record(monkeypatch):
  rng = np.random.default_rng(4)
  proto = protocol.Protocol("none", {}, (), ())
  test = _binary_split(rng, 300, positives=3, split="test")  # a rare finding: 3 examples in the evaluated split
  train = _binary_split(rng, 400, positives=120, split="train")
  alone = few_shot.FewShotEvaluator(test, proto, seeds=3)
  results = alone.run(None)
  assert "few_shot/cxr/finding/2-shot/auroc_mean" in results and "few_shot/cxr/finding/4-shot/auroc_mean" not in results
  assert any("at 4 shots: the rarest class has 3 example(s)" in n for n in alone.notes)

  calls = _record_probe_calls(monkeypatch)
  evaluator = few_shot.FewShotEvaluator(test, proto, support=train, seeds=3)
  results = evaluator.run(None)
  for k in (1, 2, 4, 8, 16):  # every k, though the evaluated split has 3 positives
    assert results[f"few_shot/cxr/finding/{k}-shot/auroc_mean"] > 0.99
  assert results["few_shot/cxr/finding/num_queries"] == 300
  train_rows = {r.tobytes() for r in train.modality(None, "cxr").emb}
  test_rows = test.modality(None, "cxr").emb
  fits = [(x, y) for kind, x, y in calls if kind == "fit"]
  predicts = [x for kind, x, _ in calls if kind == "predict"]
  assert len(fits) == len(predicts) == 5 * 3
  for (x, y), query in zip(fits, predicts):
    assert all(r.tobytes() in train_rows for r in x)  # the support: training records only
    assert np.bincount(y, minlength=2).tolist() == [len(x) // 2] * 2  # k per class
    np.testing.assert_array_equal(query, test_rows)  # the queries: the whole evaluated split
  assert "support drawn from split `train` (400 cxr, 0 ecg records)" in evaluator.table(results)

  scarce = _binary_split(np.random.default_rng(5), 400, positives=10, split="train")
  evaluator = few_shot.FewShotEvaluator(test, proto, support=scarce, seeds=2)
  results = evaluator.run(None)
  assert "few_shot/cxr/finding/8-shot/auroc_mean" in results
  assert "few_shot/cxr/finding/16-shot/auroc_mean" not in results
  assert any("at 16 shots: the support split (train) has [390, 10] examples per class" in n for n in evaluator.notes)


def test_linear_probe_fits_stratified_label_fractions_of_the_support_split(monkeypatch):
  rng = np.random.default_rng(6)
  proto = protocol.Protocol("none", {}, (), ())
  test = _binary_split(rng, 200, positives=60, split="test")
  train = _binary_split(rng, 1000, positives=300, split="train")
  calls = _record_probe_calls(monkeypatch)
  balanced = []
  fit = few_shot.metrics.ridge_probe_fit
  monkeypatch.setattr(few_shot.metrics, "ridge_probe_fit",
                      lambda x, y, c, l2, w=None: balanced.append(w is not None) or fit(x, y, c, l2, w))
  evaluator = few_shot.LinearProbeEvaluator(test, proto, support=train, fractions=(1.0, 0.01, 0.1), seeds=3)
  results = evaluator.run(None)
  sizes = [np.bincount(y, minlength=2).tolist() for kind, _, y in calls if kind == "fit"]
  # Per seed at 1% and 10% (classes drawn in proportion, at least one each); one fit on everything at 100%.
  assert sizes == [[7, 3]] * 3 + [[70, 30]] * 3 + [[700, 300]]
  assert balanced == [True] * 7  # imbalanced supports are fitted with class-balanced errors
  for pct in ("1pct", "10pct", "100pct"):
    assert results[f"linear_probe/cxr/finding/{pct}/auroc_mean"] > 0.99
    assert results[f"linear_probe/cxr/macro/{pct}/auroc_mean"] == results[f"linear_probe/cxr/finding/{pct}/auroc_mean"]
  assert results["linear_probe/cxr/finding/100pct/auroc_std"] == 0.0
  assert results["linear_probe/cxr/finding/num_queries"] == 200
  draws = [x for kind, x, _ in calls if kind == "fit"][:3]
  assert not np.array_equal(draws[0], draws[1])  # seeds draw different subsets

  rare = _binary_split(rng, 1000, positives=2, split="train")  # 1% of 2 positives still keeps one
  calls.clear()
  few_shot.LinearProbeEvaluator(test, proto, support=rare, fractions=(0.01,), seeds=1).run(None)
  assert [np.bincount(y, minlength=2).tolist() for kind, _, y in calls if kind == "fit"] == [[10, 1]]

  alone = few_shot.LinearProbeEvaluator(test, proto, support=None)
  assert alone.run(None) == {} and "support_split" in alone.notes[0]


# ---------------------------------------------------------------------------------------------------------------------
# Cross-modal
# ---------------------------------------------------------------------------------------------------------------------


def _cross_world(rng, n=400, ecg_label_flipped=False):
  """Encounters with a latent 'big heart'; CXR cardiomegaly and ECG LVH both follow it, and both embeddings point
  along a shared direction when it is present."""
  heart = rng.random(n) < 0.4
  shared, healthy = _unit(rng.normal(size=(2, D)))
  cxr = _unit(np.where(heart[:, None], shared, healthy) + 0.3 * rng.normal(size=(n, D)))
  ecg = _unit(np.where(heart[:, None], shared, healthy) + 0.3 * rng.normal(size=(n, D)))
  lvh = ~heart if ecg_label_flipped else heart
  cxr_labels = heart[:, None].astype(np.float32)
  cxr_labels[:7] = -1.0  # unknown: left out of the queries/support
  patients = [f"e{i}" for i in range(n)] * 2  # records 0..n-1 are CXRs, n..2n-1 the ECGs of the same encounters
  data = FakeData({"cxr": ["cardiomegaly"], "ecg": ["lvh"]}, {"cxr": cxr, "ecg": ecg},
                  {"cxr": cxr_labels, "ecg": lvh[:, None].astype(np.float32)}, patients)
  tasks = (protocol.CrossModalTask("cxr_by_ecg", "cxr", "cardiomegaly", "ecg", "lvh"),
           protocol.CrossModalTask("ecg_by_cxr", "ecg", "lvh", "cxr", "cardiomegaly"),
           protocol.CrossModalTask("missing", "ecg", "rbbb", "cxr", "cardiomegaly"))
  return data, protocol.Protocol("none", {}, (), tasks)


def test_cross_modal_prototypes_carry_the_linked_finding_across_modalities():
  data, proto = _cross_world(np.random.default_rng(0))
  evaluator = cross_modal.CrossModalEvaluator(data, proto)
  results = evaluator.run(None)
  for task in ("cxr_by_ecg", "ecg_by_cxr"):
    assert results[f"cross_modal/{task}/balanced_accuracy"] > 0.97
    assert results[f"cross_modal/{task}/auroc"] > 0.99
  # Queries from one half of the encounters' patients, support from the other; unknown labels left out.
  half = common.in_support_half([f"e{i}" for i in range(400)])
  known = np.arange(400) >= 7
  assert results["cross_modal/cxr_by_ecg/num_queries"] == (~half & known).sum()
  assert results["cross_modal/cxr_by_ecg/num_support"] == half.sum()
  assert results["cross_modal/ecg_by_cxr/num_support"] == (half & known).sum()
  assert not any(k.startswith("cross_modal/missing/") for k in results)
  assert any("ecg has no label 'rbbb'" in note for note in evaluator.notes)

  data, proto = _cross_world(np.random.default_rng(0), ecg_label_flipped=True)
  results = cross_modal.CrossModalEvaluator(data, proto).run(None)
  assert results["cross_modal/cxr_by_ecg/balanced_accuracy"] < 0.03


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval through the shared embedder
# ---------------------------------------------------------------------------------------------------------------------


def test_retrieval_on_identical_text_and_modality_embeddings_is_perfect():
  rng = np.random.default_rng(0)
  n = 12
  keys = np.stack([[i % 4, 0] for i in range(n)]).astype(np.int32)  # four distinct reports, three records each
  report_vectors = {str(k): _unit(rng.normal(size=D)) for k in np.unique(keys, axis=0).tolist()}
  emb = np.stack([report_vectors[str(k)] for k in keys.tolist()])
  data = FakeData({"cxr": [], "ecg": []}, {"cxr": emb, "ecg": emb}, {"cxr": np.zeros((n, 0)), "ecg": np.zeros((n, 0))},
                  [str(i) for i in range(2 * n)], report_vectors, {"cxr": keys, "ecg": keys})
  data.index.linked_pool = lambda modalities: np.zeros(0, np.int64)  # no linked records
  evaluator = retrieval.RetrievalEvaluator(data, ["cxr", "ecg"], [("cxr", "ecg")], ks=(1,))
  results = evaluator.run(None)
  assert results["retrieval/cxr_to_text/R@1"] == 1.0 and results["retrieval/text_to_ecg/R@1"] == 1.0
  assert results["retrieval/cxr_to_text/gallery_size"] == 4
  assert results["retrieval/rsum"] == 400.0
  # The pair edge's directions are left out with the reason, not scored on an empty gallery.
  assert not any("cxr_to_ecg" in k for k in results) and evaluator.notes == [
      "cxr<->ecg: the split has no linked records with both"]


def test_class_precision_counts_same_findings_in_the_top_k():
  # Query 0's findings are shared by gallery items 0 and 2; query 1's by item 1 only.
  same = np.array([[True, False, True, False], [False, True, False, False]])
  scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
  got = retrieval.class_precision_at_k(scores, same, ks=(1, 2, 3, 10))
  # Query 0 ranks 0, 1, 2, 3: hits 1, 1/2, 2/3, 2/4. Query 1 ranks 3, 2, 1, 0: hits 0, 0, 1/3, 1/4.
  assert got == pytest.approx({1: 0.5, 2: 0.25, 3: 0.5, 10: 0.375})


def test_oracle_recall_is_the_chance_level_within_the_findings_group():
  # Query 0: 3 reports share its findings, 1 of them its own -> R@1 = 1/3, R@2 = 2/3, R@5 = 1. Query 1: alone in its
  # group -> 1 at every K. Query 2: its own text also appears with other labels (not in `same`): still counted.
  same = np.array([[1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]], bool)
  correct = np.array([[1, 0, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]], bool)
  got = retrieval.oracle_recall_at_k(same, correct, ks=(1, 2, 5))
  assert got == pytest.approx({1: (1 / 3 + 1 + 1) / 3, 2: (2 / 3 + 1 + 1) / 3, 5: 1.0})


def test_retrieval_reports_class_precision_and_the_oracle_when_labels_exist():
  rng = np.random.default_rng(1)
  n = 12
  keys = np.stack([[i % 4, 0] for i in range(n)]).astype(np.int32)  # four reports, three records each
  labels = np.array([[float(i % 2)] for i in range(n)])  # reports 0 and 2 state one finding set, 1 and 3 the other
  report_vectors = {str(k): _unit(rng.normal(size=D)) for k in np.unique(keys, axis=0).tolist()}
  emb = np.stack([report_vectors[str(k)] for k in keys.tolist()])
  data = FakeData({"cxr": []}, {"cxr": emb}, {"cxr": labels}, [str(i) for i in range(n)], report_vectors,
                  {"cxr": keys})
  results = retrieval.RetrievalEvaluator(data, ["cxr"], [], ks=(1, 2)).run(None)
  # Each image's own report ranks first (class P@1 = 1); the second is any other report (1 in 3 shares findings).
  assert results["retrieval/cxr_to_text/class_P@1"] == 1.0
  assert 0.5 <= results["retrieval/cxr_to_text/class_P@2"] <= 1.0
  # Two reports per finding set: the oracle's exact R@1 is 1/2, R@2 is 1.
  assert results["retrieval/cxr_to_text/oracle_R@1"] == pytest.approx(0.5)
  assert results["retrieval/cxr_to_text/oracle_R@2"] == pytest.approx(1.0)
  # text -> cxr: six records share each finding set, three of them carry the exact report: R@1 = 1/2.
  assert results["retrieval/text_to_cxr/oracle_R@1"] == pytest.approx(0.5)
  assert "retrieval/cxr_to_text/class_P@1" not in retrieval.RetrievalEvaluator(
      data, ["cxr"], [], ks=(1,)).summary(results)


# ---------------------------------------------------------------------------------------------------------------------
# Protocol file, t-SNE, report
# ---------------------------------------------------------------------------------------------------------------------


def test_packaged_protocol_matches_the_synthetic_world_labels_and_report_wording():
  from data_prep import synthetic_world as world  # pylint: disable=import-outside-toplevel
  proto = protocol.load("synthetic_v1")
  assert proto.version == "synthetic_v1"
  for modality, names, labeller in (("cxr", world.CXR_LABELS, world.label_cxr_report),
                                    ("ecg", world.ECG_LABELS, world.label_ecg_report)):
    assert set(proto.prompts[modality]) == set(names)
    for label, prompts in proto.prompts[modality].items():
      # The world's own rule-based labeller reads each positive prompt as stating the finding, each negative not.
      column = names.index(label)
      assert all(labeller(t)[column] == 1 for t in prompts.positive), label
      assert all(labeller(t)[column] == 0 for t in prompts.negative), label
  for task in proto.multiclass_tasks:
    assert set(task.classes) <= set(world.CXR_LABELS if task.modality == "cxr" else world.ECG_LABELS)
  for task in proto.cross_modal_tasks:
    labels = {"cxr": world.CXR_LABELS, "ecg": world.ECG_LABELS}
    assert task.query_label in labels[task.query] and task.support_label in labels[task.support]


def test_protocol_and_suite_reject_bad_input_with_clear_messages(tmp_path):
  (tmp_path / "bad.json").write_text(json.dumps({"prompts": {}}))
  with pytest.raises(ValueError, match="version"):
    protocol.load(str(tmp_path / "bad.json"))
  with pytest.raises(FileNotFoundError, match="synthetic_v1"):
    protocol.load("no_such_protocol")
  cfg = types.SimpleNamespace(evaluators=("retrieval", "zero_shoot"), protocol="synthetic_v1")
  known = r"\['cross_modal', 'few_shot', 'linear_probe', 'retrieval', 'zero_shot'\]"
  with pytest.raises(ValueError, match=r"zero_shoot.*known: " + known):
    evaluators.build(cfg, data=None)


def test_tsne_keeps_clusters_apart_and_calibrates_perplexity():
  rng = np.random.default_rng(0)
  cluster = np.repeat(np.arange(4), 40)
  x = 2.0 * rng.normal(size=(4, 30))[cluster] + rng.normal(size=(160, 30))
  p = tsne.conditional_probabilities(tsne.squared_distances(x), perplexity=15.0)
  entropy = -np.sum(p * np.log(np.where(p > 0, p, 1.0)), axis=1)
  np.testing.assert_allclose(entropy, np.log(15.0), atol=1e-6)
  y = tsne.tsne(x, perplexity=15.0, num_iters=300)
  assert y.shape == (160, 2) and np.all(np.isfinite(y))
  dist = tsne.squared_distances(y)
  np.fill_diagonal(dist, np.inf)
  neighbours = np.argsort(dist, axis=1)[:, :5]
  assert (cluster[neighbours] == cluster[:, None]).mean() > 0.95


def test_suite_writes_metrics_json_markdown_and_readable_plots(tmp_path):
  rng = np.random.default_rng(0)
  data, prompts = _aligned_world(rng, n=120)
  keys = np.stack([[i % 10, 1] for i in range(120)]).astype(np.int32)
  data._emb["cxr"].text_key[:] = keys  # pylint: disable=protected-access
  data.text_vectors.update({str(k): _unit(rng.normal(size=D)) for k in np.unique(keys, axis=0).tolist()})
  proto = _write_protocol(tmp_path / "p.json", {"cxr": prompts}, multiclass=[
      {"name": "single", "modality": "cxr", "classes": ["cardiomegaly", "edema", "no_finding"]}])
  suite = evaluators.Suite({"zero_shot": zero_shot.ZeroShotEvaluator(data, proto),
                            "few_shot": few_shot.FewShotEvaluator(data, proto, shots=(1, 2, 4), seeds=2)},
                           data, proto, plot_points=80)
  results = suite.run(None, report_dir=str(tmp_path / "eval"), step=7)
  assert data.released == 1  # the embedding cache is dropped after every run
  with open(tmp_path / "eval" / report.METRICS_FILE) as f:
    assert json.load(f) == {"step": 7, **results}
  markdown = (tmp_path / "eval" / report.REPORT_FILE).read_text()
  assert markdown.startswith("# MEDBind evaluation at step 7")
  for heading in ("## Summary", "## Zero-shot classification", "## Few-shot linear probe", "## Skipped",
                  "](embedding_map.png)", "](few_shot_curves.png)"):
    assert heading in markdown
  assert "| zero_shot/cxr/macro_auroc | 1 |" in markdown
  for name in (report.MAP_FILE, report.FEW_SHOT_FILE):
    with open(tmp_path / "eval" / name, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(tmp_path / "eval" / name) > 20_000


# ---------------------------------------------------------------------------------------------------------------------
# End to end: periodic evaluation in training, then `main.py --mode=eval` on the checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def test_training_evaluates_every_n_steps_and_mode_eval_reproduces_the_final_numbers(tmp_path):
  from medbind_jax import train  # pylint: disable=import-outside-toplevel
  from test_train import tiny_config  # pylint: disable=import-outside-toplevel
  from tiny_data import write_tiny_dataset  # pylint: disable=import-outside-toplevel
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  write_tiny_dataset(data_dir, num_records=32, num_shards=2, splits=("train", "test"))
  workdir = tmp_path / "run"
  config = tiny_config(str(data_dir), total_steps=4, **{"eval.every_steps": 2, "eval.plot_points": 20,
                                                        "eval.few_shot.seeds": 2})
  final = train.train_and_evaluate(config, str(workdir))

  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "eval/retrieval/rsum" in r] == [2, 4]
  with open(workdir / "eval" / "metrics.json") as f:
    assert json.load(f)["step"] == 4
  # The tiny data's labels ("a", "b") are not the synthetic world's: zero-shot and cross-modal say why they skip.
  markdown = (workdir / "eval" / "report.md").read_text()
  assert "has no prompts for it" in markdown and "has no label 'cardiomegaly'" in markdown
  assert "few_shot/cxr/a/1-shot/auroc_mean" in final
  assert 0 <= final["retrieval_within_findings/cxr_to_ecg/R@1"] <= 1  # every tiny record is linked
  assert "within same-findings galleries" in markdown

  os.remove(workdir / "eval" / "metrics.json")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, "main.py", "--config=configs/medbind.py", "--mode=eval",
                         f"--workdir={workdir}", "--config.eval.batch_size=16", "--config.eval.plot_points=20",
                         "--config.eval.few_shot.seeds=2"],
                        capture_output=True, text=True, timeout=300, cwd=root, check=False,
                        # The session's compilation cache (conftest.py): the embedding programs are already in it.
                        env=dict(os.environ, PYTHONPATH=root,
                                 JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
                                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5"))
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Evaluation on test at step 4" in done.stdout
  with open(workdir / "eval" / "metrics.json") as f:
    evaluated = json.load(f)
  assert evaluated.pop("step") == 4
  assert evaluated.keys() == {k for k in final if k != "step"}
  for key, value in evaluated.items():
    assert value == pytest.approx(final[key], abs=1e-5), key
  for name in (report.REPORT_FILE, report.MAP_FILE, report.FEW_SHOT_FILE):
    assert os.path.getsize(workdir / "eval" / name) > 0


def test_single_label_with_no_label_columns_selects_nothing():
  # A converted dataset may carry no labels for a modality (e.g. MIMIC-IV-ECG): no class, no crash.
  selected, which = common.single_label(np.zeros((3, 0), np.float32), [])
  assert not selected.any() and (which == -1).all()
  selected, which = common.single_label(np.array([[1, 0], [1, 1], [0, -1]], np.float32), [0, 1])
  assert selected.tolist() == [True, False, False] and which.tolist() == [0, -1, -1]


def test_within_groups_retrieval_ranks_only_among_same_group_partners():
  # Partners 0-2 share a group (e.g. the same findings), 3 has its own. Query 0's partner beats impostor 1 but not 2; query 1 beats both;
  # query 2 loses to 0 by a tie (ties count against); query 3 has no impostor. Cross-report scores are ignored.
  scores = np.array([[0.5, 0.4, 0.6, 9.0],
                     [0.1, 0.8, 0.2, 9.0],
                     [0.3, 0.0, 0.3, 9.0],
                     [9.0, 9.0, 9.0, 0.0]])
  reports = np.array(["A", "A", "A", "B"])
  got = retrieval.within_groups(scores, reports, "w")
  assert got["w/R@1"] == pytest.approx(2 / 4)  # queries 1 and 3
  assert got["w/chance@1"] == pytest.approx((1 / 3 * 3 + 1) / 4)
  assert got["w/num_queries_with_impostors"] == 3
  assert got["w/pairwise_accuracy"] == pytest.approx((1 / 2 + 2 / 2 + 1 / 2) / 3)
