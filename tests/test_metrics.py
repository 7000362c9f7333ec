"""Tests of the pure-numpy metric kernels against brute-force references, scikit-learn and hand-worked cases."""

import itertools
import math
import warnings

import numpy as np
import pytest

from medbind_jax.evaluators import metrics


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval.
# ---------------------------------------------------------------------------------------------------------------------


def _brute_force_recall(scores, correct, ks):
  """Sorts each row, breaking score ties with incorrect items first, and finds the first correct position."""
  hits = {k: [] for k in ks}
  for row_scores, row_correct in zip(scores, correct):
    # lexsort sorts by the last key first: descending score, then incorrect (False) before correct.
    order = np.lexsort((row_correct, -row_scores))
    first_correct = int(np.flatnonzero(row_correct[order])[0])
    for k in ks:
      hits[k].append(first_correct < k)
  return {k: float(np.mean(v)) for k, v in hits.items()}


def test_recall_matches_brute_force_with_duplicates_and_ties():
  rng = np.random.default_rng(0)
  num_queries, gallery_size = 60, 25
  # Queries carry text ids with duplicates; the gallery also has repeated texts, so some queries have several
  # correct items. Coarse scores create many ties between correct and incorrect items.
  gallery_text = rng.integers(0, 15, size=gallery_size)
  query_text = gallery_text[rng.integers(0, gallery_size, size=num_queries)]
  correct = query_text[:, None] == gallery_text[None, :]
  assert (correct.sum(axis=1) > 1).any()
  scores = rng.integers(0, 6, size=(num_queries, gallery_size)).astype(np.float32)
  ks = (1, 2, 5, 10)
  expected = _brute_force_recall(scores, correct, ks)
  assert metrics.recall_at_k(scores, correct, ks) == pytest.approx(expected)
  # Blocking over query rows must not change anything.
  assert metrics.recall_at_k(scores, correct, ks, block_elements=3 * gallery_size) == pytest.approx(expected)


def test_recall_tie_between_correct_and_incorrect_is_a_miss():
  scores = np.array([[0.5, 0.5, 0.1]])
  correct = np.array([[True, False, False]])
  assert metrics.recall_at_k(scores, correct, ks=(1, 2)) == {1: 0.0, 2: 1.0}


def test_recall_ties_among_correct_items_do_not_hurt():
  scores = np.array([[0.9, 0.9, 0.1]])
  correct = np.array([[True, True, False]])
  assert metrics.recall_at_k(scores, correct, ks=(1,)) == {1: 1.0}


def test_recall_collapsed_embeddings_score_zero():
  scores = np.zeros((4, 20))
  correct = np.eye(4, 20, dtype=bool)
  assert metrics.recall_at_k(scores, correct, ks=(1, 5, 10)) == {1: 0.0, 5: 0.0, 10: 0.0}


def test_recall_k_larger_than_gallery_is_a_hit():
  scores = np.array([[0.0, 1.0, 2.0], [3.0, 2.0, 1.0]])
  correct = np.array([[True, False, False], [False, False, True]])  # both correct items ranked last
  assert metrics.recall_at_k(scores, correct, ks=(1, 3, 10)) == {1: 0.0, 3: 1.0, 10: 1.0}


def test_recall_rejects_bad_inputs():
  scores = np.zeros((2, 3))
  with pytest.raises(ValueError, match="no correct"):
    metrics.recall_at_k(scores, np.array([[True, False, False], [False, False, False]]))
  with pytest.raises(ValueError, match="shape"):
    metrics.recall_at_k(scores, np.zeros((2, 4), dtype=bool))
  with pytest.raises(ValueError, match="bool"):
    metrics.recall_at_k(scores, np.eye(2, 3))
  with pytest.raises(ValueError, match="non-finite"):
    metrics.recall_at_k(np.array([[np.nan, 0.0]]), np.array([[True, False]]))
  with pytest.raises(ValueError, match="at least one"):
    metrics.recall_at_k(np.zeros((0, 3)), np.zeros((0, 3), dtype=bool))


def test_chance_recall_matches_enumeration_of_all_rankings():
  gallery_size, num_correct = 6, 2
  ks = tuple(range(1, 8))
  # Place the correct items at every possible pair of positions (all rankings are equally likely).
  positions = list(itertools.combinations(range(gallery_size), num_correct))
  expected = {k: float(np.mean([min(p) < k for p in positions])) for k in ks}
  assert metrics.chance_recall_at_k(num_correct, gallery_size, ks) == pytest.approx(expected, abs=1e-12)


def test_chance_recall_single_correct_is_k_over_g_and_averages_queries():
  assert metrics.chance_recall_at_k([1, 1], 50, (1, 5, 10, 80)) == pytest.approx({1: 0.02, 5: 0.1, 10: 0.2, 80: 1.0})
  one, three = (metrics.chance_recall_at_k(c, 50, (5,))[5] for c in (1, 3))
  assert metrics.chance_recall_at_k([1, 3, 3], 50, (5,))[5] == pytest.approx((one + 2 * three) / 3)


def test_chance_recall_large_gallery_matches_exact_binomials():
  gallery_size, num_correct, k = 20000, 3, 10
  exact = 1 - math.comb(gallery_size - num_correct, k) / math.comb(gallery_size, k)
  assert metrics.chance_recall_at_k(num_correct, gallery_size, (k,))[k] == pytest.approx(exact, rel=1e-12)


def test_chance_recall_rejects_bad_counts():
  with pytest.raises(ValueError, match="num_correct"):
    metrics.chance_recall_at_k([0, 1], 10)
  with pytest.raises(ValueError, match="num_correct"):
    metrics.chance_recall_at_k([11], 10)


def test_rsum_is_in_percent():
  recalls = {"cxr->text": {1: 0.1, 5: 0.2, 10: 0.3}, "text->cxr": {1: 0.05, 5: 0.15, 10: 0.25}}
  assert metrics.rsum(recalls) == pytest.approx(105.0)
  with pytest.raises(ValueError, match="lacks"):
    metrics.rsum({"cxr->text": {1: 0.1}})


# ---------------------------------------------------------------------------------------------------------------------
# Classification metrics vs scikit-learn.
# ---------------------------------------------------------------------------------------------------------------------


def test_auroc_matches_sklearn_with_ties():
  sklearn_metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(1)
  for trial in range(20):
    n = int(rng.integers(5, 200))
    y_true = rng.random(n) < rng.uniform(0.1, 0.9)
    y_true[:2] = [True, False]
    scores = rng.integers(0, 4 + trial, size=n).astype(np.float64)  # heavy ties
    assert metrics.auroc(y_true, scores) == pytest.approx(sklearn_metrics.roc_auc_score(y_true, scores), abs=1e-12)


def test_auroc_hand_worked():
  # Pairs (pos, neg): 0.8>0.5 (1), 0.8>0.1 (1), 0.5=0.5 (1/2), 0.5>0.1 (1) -> 3.5 / 4.
  assert metrics.auroc([1, 0, 1, 0], [0.8, 0.5, 0.5, 0.1]) == pytest.approx(0.875)
  with pytest.raises(ValueError, match="single class"):
    metrics.auroc([1, 1], [0.1, 0.2])
  with pytest.raises(ValueError, match="binary"):
    metrics.auroc([0, 2], [0.1, 0.2])


def test_multilabel_auroc_matches_sklearn_and_skips_constant_classes():
  sklearn_metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(2)
  y_true = rng.random((80, 5)) < 0.4
  y_true[:, 1] = False  # undefined: no positives
  y_true[:, 3] = True  # undefined: no negatives
  scores = np.round(rng.random((80, 5)), 1)
  per_class, macro = metrics.multilabel_auroc(y_true, scores)
  assert np.isnan(per_class[[1, 3]]).all()
  defined = [0, 2, 4]
  expected = [sklearn_metrics.roc_auc_score(y_true[:, c], scores[:, c]) for c in defined]
  np.testing.assert_allclose(per_class[defined], expected, atol=1e-12)
  assert macro == pytest.approx(np.mean(expected))
  _, all_undefined = metrics.multilabel_auroc(np.ones((3, 2)), np.zeros((3, 2)))
  assert np.isnan(all_undefined)


def test_balanced_accuracy_matches_sklearn():
  sklearn_metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(3)
  for _ in range(20):
    n = int(rng.integers(2, 100))
    y_true = rng.integers(0, 4, size=n)
    y_pred = rng.integers(0, 6, size=n)  # may predict classes absent from y_true
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      expected = sklearn_metrics.balanced_accuracy_score(y_true, y_pred)
    assert metrics.balanced_accuracy(y_true, y_pred) == pytest.approx(expected, abs=1e-12)


def test_balanced_accuracy_hand_worked_and_label_range():
  # Class 0: 2 of 3 right; class 1: 1 of 1 right -> (2/3 + 1) / 2.
  assert metrics.balanced_accuracy([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx(5 / 6)
  with pytest.raises(ValueError, match="outside"):
    metrics.balanced_accuracy([0, 1], [0, 2], num_classes=2)


# ---------------------------------------------------------------------------------------------------------------------
# Few-shot sampling and the ridge probe.
# ---------------------------------------------------------------------------------------------------------------------


def test_sample_few_shot_counts_determinism_and_nesting():
  labels = np.repeat(np.arange(4), [5, 9, 20, 16])
  first = metrics.sample_few_shot(labels, k=4, seed=7)
  np.testing.assert_array_equal(first, metrics.sample_few_shot(labels, k=4, seed=7))
  np.testing.assert_array_equal(np.bincount(labels[first]), [4, 4, 4, 4])
  assert len(np.unique(first)) == first.size
  assert not np.array_equal(first, metrics.sample_few_shot(labels, k=4, seed=8))
  # For a fixed seed the 2-shot set is inside the 4-shot set.
  assert set(metrics.sample_few_shot(labels, k=2, seed=7)) <= set(first)
  with pytest.raises(ValueError, match="Class 0 has 5"):
    metrics.sample_few_shot(labels, k=6, seed=0)
  with pytest.raises(ValueError, match="Class 4 has 0"):
    metrics.sample_few_shot(labels, k=1, seed=0, num_classes=5)


@pytest.mark.parametrize("num_examples,dim", [(40, 6), (8, 30)])  # primal and dual paths
def test_ridge_probe_matches_sklearn_ridge(num_examples, dim):
  linear_model = pytest.importorskip("sklearn.linear_model")
  rng = np.random.default_rng(4)
  num_classes, l2 = 3, 0.7
  x = rng.normal(size=(num_examples, dim)) + 2.0  # off-centre so the bias matters
  y = rng.integers(0, num_classes, size=num_examples)
  weights, bias = metrics.ridge_probe_fit(x, y, num_classes, l2)
  reference = linear_model.Ridge(alpha=l2, fit_intercept=True).fit(x, np.eye(num_classes)[y])
  np.testing.assert_allclose(weights, reference.coef_.T, atol=1e-9)
  np.testing.assert_allclose(bias, reference.intercept_, atol=1e-9)
  pred, scores = metrics.ridge_probe_predict(x, weights, bias)
  np.testing.assert_allclose(scores, reference.predict(x), atol=1e-9)
  np.testing.assert_array_equal(pred, scores.argmax(axis=1))


@pytest.mark.parametrize("num_examples,dim", [(60, 5), (9, 25)])
def test_weighted_ridge_probe_matches_sklearn_with_sample_weight(num_examples, dim):
  linear_model = pytest.importorskip("sklearn.linear_model")
  rng = np.random.default_rng(6)
  num_classes, l2 = 3, 0.4
  x = rng.normal(size=(num_examples, dim)) + 1.5
  y = np.minimum(rng.geometric(0.5, size=num_examples) - 1, num_classes - 1)  # imbalanced classes
  y[:num_classes] = np.arange(num_classes)
  w = metrics.balanced_weights(y, num_classes)
  counts = np.bincount(y, minlength=num_classes)
  np.testing.assert_allclose(np.bincount(y, weights=w, minlength=num_classes), num_examples / num_classes)
  assert w.mean() == pytest.approx(1.0) and counts.min() < counts.max()
  weights, bias = metrics.ridge_probe_fit(x, y, num_classes, l2, w)
  reference = linear_model.Ridge(alpha=l2, fit_intercept=True).fit(x, np.eye(num_classes)[y], sample_weight=w)
  np.testing.assert_allclose(weights, reference.coef_.T, atol=1e-9)
  np.testing.assert_allclose(bias, reference.intercept_, atol=1e-9)
  unweighted = metrics.ridge_probe_fit(x, y, num_classes, l2)[0]
  assert not np.allclose(weights, unweighted)  # the weights change the fit
  with pytest.raises(ValueError, match="sample_weight"):
    metrics.ridge_probe_fit(x, y, num_classes, l2, -w)


@pytest.mark.parametrize("num_examples,dim", [(40, 6), (8, 30)])
def test_ridge_probe_satisfies_optimality_conditions(num_examples, dim):
  rng = np.random.default_rng(5)
  num_classes, l2 = 4, 0.3
  x = rng.normal(size=(num_examples, dim)) + 1.0
  y = rng.integers(0, num_classes, size=num_examples)
  weights, bias = metrics.ridge_probe_fit(x, y, num_classes, l2)
  residual = x @ weights + bias - np.eye(num_classes)[y]
  # Gradient of |x W + b - T|^2 + l2 |W|^2 vanishes in W and in the unpenalised b.
  np.testing.assert_allclose(x.T @ residual + l2 * weights, 0.0, atol=1e-9)
  np.testing.assert_allclose(residual.sum(axis=0), 0.0, atol=1e-9)


def test_ridge_probe_rejects_bad_inputs():
  with pytest.raises(ValueError, match="l2"):
    metrics.ridge_probe_fit(np.zeros((3, 2)), np.array([0, 1, 0]), 2, 0.0)
  with pytest.raises(ValueError, match="num_classes"):
    metrics.ridge_probe_fit(np.zeros((3, 2)), np.array([0, 1, 2]), 2, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Prototype classification.
# ---------------------------------------------------------------------------------------------------------------------


def test_prototype_classify_hand_worked():
  # Class 0 support: (1, 0) and (0, 10) -> normalised (1, 0), (0, 1) -> prototype (1, 1) / sqrt(2).
  # Class 1 support: (-3, 0) -> prototype (-1, 0). The large norm of (0, 10) must not pull the centroid.
  support = np.array([[1.0, 0.0], [0.0, 10.0], [-3.0, 0.0]])
  support_labels = np.array([0, 0, 1])
  queries = np.array([[2.0, 0.0], [-1.0, 0.1], [0.0, -1.0]])
  pred, scores = metrics.prototype_classify(queries, support, support_labels, num_classes=2)
  inv_sqrt2 = 1 / np.sqrt(2)
  query_unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  expected = np.stack([query_unit @ [inv_sqrt2, inv_sqrt2], query_unit @ [-1.0, 0.0]], axis=1)
  np.testing.assert_allclose(scores, expected, atol=1e-12)
  np.testing.assert_array_equal(pred, [0, 1, 1])  # (0, -1): -0.707 for class 0 < 0 for class 1
  with pytest.raises(ValueError, match="no support"):
    metrics.prototype_classify(queries, support, support_labels, num_classes=3)
