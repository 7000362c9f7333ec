"""Pure-numpy metric kernels for retrieval, zero-shot, few-shot and cross-modal evaluation (DESIGN.md section 7).

Every function takes numpy arrays (anything `np.asarray` accepts) and returns Python floats or numpy arrays. Nothing
here knows about models, JAX or datasets, so each kernel is tested on its own against scikit-learn or a hand-worked
example. Bad shapes and empty inputs raise `ValueError` with a message that says what was expected.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

# Rows of the [Q, G] score matrix are processed in blocks of about this many elements, so that Q = G = 20000 needs a
# few tens of MB of temporaries on top of the caller's matrix instead of several full-size boolean copies.
_RETRIEVAL_BLOCK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------------------------------------
# Validation helpers.
# ---------------------------------------------------------------------------------------------------------------------


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
  ks = tuple(int(k) for k in ks)
  if not ks:
    raise ValueError("ks must name at least one K, e.g. (1, 5, 10).")
  if min(ks) < 1:
    raise ValueError(f"Every K must be >= 1, got ks={ks}.")
  return ks


def _check_1d(name: str, values: np.ndarray) -> np.ndarray:
  values = np.asarray(values)
  if values.ndim != 1:
    raise ValueError(f"{name} must be 1-D [N], got shape {values.shape}.")
  if values.shape[0] == 0:
    raise ValueError(f"{name} is empty; need at least one example.")
  return values


def _check_binary_labels(name: str, y_true: np.ndarray) -> np.ndarray:
  """Returns `y_true` as bool, accepting bool or {0, 1} values."""
  if y_true.dtype == bool:
    return y_true
  unexpected = np.setdiff1d(np.unique(y_true), [0, 1])
  if unexpected.size:
    raise ValueError(f"{name} must be binary (bool or 0/1), found values {unexpected[:5].tolist()}.")
  return y_true.astype(bool)


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval.
# ---------------------------------------------------------------------------------------------------------------------


def recall_at_k(
    scores: np.ndarray,
    correct: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    *,
    block_elements: int = _RETRIEVAL_BLOCK_ELEMENTS,
) -> dict[int, float]:
  """Recall@K of a query-by-gallery similarity matrix, with pessimistic tie handling.

  A query is a hit at K iff fewer than K *incorrect* gallery items score >= its best-scoring correct item. A correct
  item tied with an incorrect one therefore counts as ranked below it, so a collapsed model (all scores equal) gets
  recall 0 rather than a lucky tie-break; ties among correct items never hurt. K larger than the gallery needs no
  special case: at most G - 1 items can outrank the best correct one, so every query is a hit.

  Args:
    scores: [Q, G] float similarities, higher is better. Must be finite.
    correct: [Q, G] bool, True where the gallery item is a correct answer for the query (a query may have several,
      e.g. duplicate report texts). Every query needs at least one; filter the others out before calling.
    ks: the K values to report.
    block_elements: rows are processed in blocks of about this many matrix elements (memory bound, not a result knob).

  Returns:
    {K: fraction of queries that are hits at K}, fractions in [0, 1].
  """
  ks = _check_ks(ks)
  scores = np.asarray(scores)
  correct = np.asarray(correct)
  if scores.ndim != 2:
    raise ValueError(f"scores must be 2-D [Q, G], got shape {scores.shape}.")
  if correct.shape != scores.shape:
    raise ValueError(f"correct must have the shape of scores {scores.shape}, got {correct.shape}.")
  if correct.dtype != bool:
    raise ValueError(f"correct must be a bool array (e.g. `query_ids[:, None] == gallery_ids[None, :]`), "
                     f"got dtype {correct.dtype}.")
  num_queries, gallery_size = scores.shape
  if num_queries == 0 or gallery_size == 0:
    raise ValueError(f"Need at least one query and one gallery item, got scores of shape {scores.shape}.")

  rows_per_block = max(1, block_elements // gallery_size)
  # Number of incorrect gallery items scoring >= the query's best correct item, i.e. its 0-based pessimistic rank.
  num_outranking = np.empty(num_queries, dtype=np.int64)
  for start in range(0, num_queries, rows_per_block):
    stop = min(start + rows_per_block, num_queries)
    block_scores = scores[start:stop]
    block_correct = correct[start:stop]
    if not np.all(np.isfinite(block_scores)):
      bad_row = start + int(np.flatnonzero(~np.all(np.isfinite(block_scores), axis=1))[0])
      raise ValueError(f"scores has a non-finite value in query row {bad_row}; NaN/inf would make ranks meaningless.")
    has_correct = block_correct.any(axis=1)
    if not has_correct.all():
      missing = start + np.flatnonzero(~has_correct)
      raise ValueError(f"{missing.size} quer(ies) in rows [{start}, {stop}) have no correct gallery item "
                       f"(first: {missing[:5].tolist()}); filter them out before computing recall.")
    best_correct = np.where(block_correct, block_scores, -np.inf).max(axis=1, keepdims=True)
    num_outranking[start:stop] = np.count_nonzero((block_scores >= best_correct) & ~block_correct, axis=1)

  return {k: float(np.mean(num_outranking < k)) for k in ks}


def chance_recall_at_k(
    num_correct: np.ndarray | Sequence[int] | int,
    gallery_size: int,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[int, float]:
  """Expected recall@K of a uniformly random ranking, averaged over queries.

  A query with c correct items among G misses at K iff all K top slots hold incorrect items, with probability
  C(G - c, K) / C(G, K) = prod_{i<K} (1 - c / (G - i)). The product is summed in log space with log1p, which is exact
  for small numbers and neither overflows nor loses the small miss probabilities that binomials of large G would.
  K is clamped to G (if K > G - c every ranking is a hit).

  Args:
    num_correct: [Q] ints (or one int), number of correct gallery items per query, each in [1, G].
    gallery_size: G, number of gallery items.
    ks: the K values to report.

  Returns:
    {K: expected recall@K}, fractions in [0, 1].
  """
  ks = _check_ks(ks)
  num_correct = np.atleast_1d(np.asarray(num_correct))
  num_correct = _check_1d("num_correct", num_correct)
  gallery_size = int(gallery_size)
  if gallery_size < 1:
    raise ValueError(f"gallery_size must be >= 1, got {gallery_size}.")
  if not np.issubdtype(num_correct.dtype, np.integer):
    raise ValueError(f"num_correct must hold integers, got dtype {num_correct.dtype}.")
  if num_correct.min() < 1 or num_correct.max() > gallery_size:
    raise ValueError(f"Every num_correct must be in [1, gallery_size={gallery_size}], "
                     f"got range [{num_correct.min()}, {num_correct.max()}].")

  max_k = min(max(ks), gallery_size)
  offsets = np.arange(max_k, dtype=np.float64)
  results = {}
  unique_counts, multiplicity = np.unique(num_correct, return_counts=True)
  recall_by_count = np.empty((unique_counts.size, len(ks)))
  for row, count in enumerate(unique_counts):
    # Terms i < G - c are positive; from i = G - c on the product is zero (a correct item must be in the top K).
    num_positive_terms = min(max_k, gallery_size - int(count))
    log_miss = np.full(max_k, -np.inf)
    log_miss[:num_positive_terms] = np.cumsum(
        np.log1p(-count / (gallery_size - offsets[:num_positive_terms])))
    for col, k in enumerate(ks):
      # recall = 1 - exp(log_miss); -expm1 keeps precision when the miss probability is close to 1.
      recall_by_count[row, col] = -np.expm1(log_miss[min(k, gallery_size) - 1])
  weights = multiplicity / num_correct.size
  for col, k in enumerate(ks):
    results[k] = float(np.sum(weights * recall_by_count[:, col]))
  return results


def rsum(recalls_by_direction: Mapping[str, Mapping[int, float]], ks: Sequence[int] = (1, 5, 10)) -> float:
  """RSUM: the sum of R@1, R@5 and R@10 over all retrieval directions, in PERCENT (the literature's convention).

  Args:
    recalls_by_direction: {direction name: {K: recall as a fraction in [0, 1]}}, e.g. the outputs of `recall_at_k`
      for "cxr->text" and "text->cxr".
    ks: the Ks to sum; each must be present for every direction.

  Returns:
    sum over directions and ks of 100 * recall, in [0, 100 * len(ks) * num_directions].
  """
  ks = _check_ks(ks)
  if not recalls_by_direction:
    raise ValueError("recalls_by_direction is empty; need at least one direction.")
  total = 0.0
  for direction, recalls in recalls_by_direction.items():
    missing = [k for k in ks if k not in recalls]
    if missing:
      raise ValueError(f"Direction {direction!r} lacks recall@K for K={missing}; it has {sorted(recalls)}.")
    total += sum(100.0 * float(recalls[k]) for k in ks)
  return total


# ---------------------------------------------------------------------------------------------------------------------
# Classification metrics.
# ---------------------------------------------------------------------------------------------------------------------


def _average_ranks(values: np.ndarray) -> np.ndarray:
  """1-based ranks of a 1-D array, tied values sharing the mean of their ranks."""
  order = np.argsort(values, kind="stable")
  sorted_values = values[order]
  # Start index of each run of equal values in the sorted array, plus the end sentinel.
  run_starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1], True])
  run_lengths = np.diff(run_starts)
  # A run occupying 0-based sorted positions [s, s + n) has mean 1-based rank s + (n + 1) / 2.
  run_ranks = run_starts[:-1] + (run_lengths + 1) / 2.0
  ranks = np.empty(values.size, dtype=np.float64)
  ranks[order] = np.repeat(run_ranks, run_lengths)
  return ranks


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve of a binary problem, ties handled exactly as scikit-learn.

  Uses the Mann-Whitney identity AUROC = (sum of positive ranks - P (P + 1) / 2) / (P N) with tied scores given their
  average rank; this equals the trapezoidal area under the ROC curve (a tie between a positive and a negative counts
  one half), which is what `sklearn.metrics.roc_auc_score` computes.

  Args:
    y_true: [N] bool or {0, 1} labels; both classes must be present.
    scores: [N] float scores, higher means more likely positive. Must be finite.

  Returns:
    AUROC in [0, 1].
  """
  y_true = _check_binary_labels("y_true", _check_1d("y_true", y_true))
  scores = _check_1d("scores", scores)
  if scores.shape != y_true.shape:
    raise ValueError(f"scores shape {scores.shape} differs from y_true shape {y_true.shape}.")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contains NaN or inf.")
  num_positive = int(np.count_nonzero(y_true))
  num_negative = y_true.size - num_positive
  if num_positive == 0 or num_negative == 0:
    raise ValueError("AUROC is undefined when y_true holds a single class; both positives and negatives are needed.")
  ranks = _average_ranks(scores)
  positive_rank_sum = float(ranks[y_true].sum())
  return (positive_rank_sum - num_positive * (num_positive + 1) / 2.0) / (num_positive * num_negative)


def multilabel_auroc(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, float]:
  """Per-class and macro AUROC of a multi-label problem.

  Args:
    y_true: [N, C] bool or {0, 1} labels.
    scores: [N, C] float scores.

  Returns:
    per_class: [C] float64 AUROC; NaN for a class whose labels hold a single value (AUROC undefined).
    macro: mean of the defined per-class values; NaN if no class is defined.
  """
  y_true = np.asarray(y_true)
  scores = np.asarray(scores)
  if y_true.ndim != 2:
    raise ValueError(f"y_true must be 2-D [N, C], got shape {y_true.shape}.")
  if scores.shape != y_true.shape:
    raise ValueError(f"scores shape {scores.shape} differs from y_true shape {y_true.shape}.")
  if y_true.shape[0] == 0 or y_true.shape[1] == 0:
    raise ValueError(f"Need at least one example and one class, got shape {y_true.shape}.")
  y_true = _check_binary_labels("y_true", y_true)
  num_classes = y_true.shape[1]
  per_class = np.full(num_classes, np.nan)
  for c in range(num_classes):
    column = y_true[:, c]
    if column.all() or not column.any():
      continue
    per_class[c] = auroc(column, scores[:, c])
  defined = per_class[~np.isnan(per_class)]
  macro = float(defined.mean()) if defined.size else float("nan")
  return per_class, macro


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int | None = None) -> float:
  """Mean per-class recall over the classes present in `y_true` (matches `sklearn.metrics.balanced_accuracy_score`).

  Predictions of classes absent from `y_true` count as errors but add no class to the mean.

  Args:
    y_true: [N] integer class labels.
    y_pred: [N] integer predicted labels.
    num_classes: if given, every label must lie in [0, num_classes).

  Returns:
    balanced accuracy in [0, 1].
  """
  y_true = _check_1d("y_true", y_true)
  y_pred = _check_1d("y_pred", y_pred)
  if y_pred.shape != y_true.shape:
    raise ValueError(f"y_pred shape {y_pred.shape} differs from y_true shape {y_true.shape}.")
  if num_classes is not None:
    for name, labels in (("y_true", y_true), ("y_pred", y_pred)):
      if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{name} has labels outside [0, num_classes={num_classes}): "
                         f"range [{labels.min()}, {labels.max()}].")
  classes, class_index = np.unique(y_true, return_inverse=True)
  hits_per_class = np.bincount(class_index, weights=(y_pred == y_true).astype(np.float64), minlength=classes.size)
  count_per_class = np.bincount(class_index, minlength=classes.size)
  return float(np.mean(hits_per_class / count_per_class))


# ---------------------------------------------------------------------------------------------------------------------
# Few-shot: support sampling and a linear probe on frozen embeddings.
# ---------------------------------------------------------------------------------------------------------------------


def sample_few_shot(labels: np.ndarray, k: int, seed: int, num_classes: int | None = None) -> np.ndarray:
  """Indices of k examples per class, deterministic in `seed`.

  Each class's members are shuffled by a generator seeded with `seed` and the first k are taken, so for a fixed seed
  the k-shot set is contained in the 2k-shot set (few-shot curves then differ only by the added shots).

  Args:
    labels: [N] integer single-label classes of the pool to sample from.
    k: shots per class, >= 1.
    seed: integer seed.
    num_classes: if given, classes are 0..num_classes-1 and each must have at least k examples; otherwise the
      classes are those present in `labels`.

  Returns:
    [num_classes * k] int64 indices into `labels`, sorted ascending.
  """
  labels = _check_1d("labels", labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}.")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")
  classes = np.unique(labels) if num_classes is None else np.arange(num_classes)
  rng = np.random.default_rng(seed)
  chosen = []
  for c in classes:
    members = np.flatnonzero(labels == c)
    if members.size < k:
      raise ValueError(f"Class {int(c)} has {members.size} example(s), fewer than k={k} shots.")
    chosen.append(members[rng.permutation(members.size)[:k]])
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def ridge_probe_fit(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float,
                    sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Closed-form ridge regression from features to one-hot class targets, with an unpenalised bias.

  Ridge rather than logistic regression: one exact linear solve per (k, seed), no iterations, learning rate or
  convergence check, and so fully reproducible.

  The bias is removed by centring: with x_c = x - mean(x) and t_c = onehot(y) - mean(onehot(y)),
  W = argmin |x_c W - t_c|^2 + l2 |W|^2 and b = mean(t) - mean(x) W (scikit-learn's `Ridge(fit_intercept=True)`).
  W is found from the smaller system: primal (x_c^T x_c + l2 I_D) W = x_c^T t_c when D <= N, otherwise the dual
  W = x_c^T A with (x_c x_c^T + l2 I_N) A = t_c; both give the same W by the push-through identity. With
  `sample_weight` w the squared errors are weighted (scikit-learn's `sample_weight`): the means are w-weighted and
  the rows of x_c and t_c scaled by sqrt(w) before the same solve.

  Args:
    x: [N, D] float features.
    y: [N] integer labels in [0, num_classes).
    num_classes: C.
    l2: ridge penalty, > 0 (the centred Gram matrix is singular for few shots).
    sample_weight: optional [N] positive weights of the examples' squared errors (e.g. `balanced_weights`).

  Returns:
    W: [D, C] float64 weights.
    b: [C] float64 bias.
  """
  x = np.asarray(x, dtype=np.float64)
  y = _check_1d("y", y)
  if x.ndim != 2:
    raise ValueError(f"x must be 2-D [N, D], got shape {x.shape}.")
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]} labels.")
  if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
    raise ValueError(f"y must be integer labels in [0, num_classes={num_classes}).")
  if not l2 > 0:
    raise ValueError(f"l2 must be > 0, got {l2}.")
  num_examples, dim = x.shape
  targets = np.eye(num_classes)[y]
  if sample_weight is None:
    x_mean = x.mean(axis=0)
    target_mean = targets.mean(axis=0)
    x_centred = x - x_mean
    targets_centred = targets - target_mean
  else:
    w = np.asarray(sample_weight, np.float64)
    if w.shape != (num_examples,) or not np.all(w > 0):
      raise ValueError(f"sample_weight must be [{num_examples}] positive weights, got shape {w.shape}.")
    x_mean, target_mean = w @ x / w.sum(), w @ targets / w.sum()
    root = np.sqrt(w)[:, None]
    x_centred, targets_centred = root * (x - x_mean), root * (targets - target_mean)
  if dim <= num_examples:
    weights = np.linalg.solve(x_centred.T @ x_centred + l2 * np.eye(dim), x_centred.T @ targets_centred)
  else:
    dual = np.linalg.solve(x_centred @ x_centred.T + l2 * np.eye(num_examples), targets_centred)
    weights = x_centred.T @ dual
  bias = target_mean - x_mean @ weights
  return weights, bias


def balanced_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
  """[N] weights N / (C * count(class)) (scikit-learn's class_weight='balanced'): every class weighs the same in
  total, so a probe fitted on imbalanced data is not pulled to the majority class (mean weight 1)."""
  counts = np.bincount(y, minlength=num_classes).astype(np.float64)
  present = counts > 0
  return (len(y) / (present.sum() * counts[y])).astype(np.float64)


def ridge_probe_predict(x: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Applies a ridge probe.

  Args:
    x: [N, D] float features.
    weights: [D, C] from `ridge_probe_fit`.
    bias: [C] from `ridge_probe_fit`.

  Returns:
    pred: [N] int64 argmax class.
    scores: [N, C] float64 regression outputs.
  """
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2 or x.shape[1] != weights.shape[0]:
    raise ValueError(f"x must be [N, {weights.shape[0]}], got shape {x.shape}.")
  scores = x @ weights + bias
  return scores.argmax(axis=1).astype(np.int64), scores


# ---------------------------------------------------------------------------------------------------------------------
# Prototype (nearest class centroid) classification, used for CXR<->ECG cross-modal transfer.
# ---------------------------------------------------------------------------------------------------------------------


def _l2_normalise(vectors: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
  return vectors / np.maximum(norms, 1e-12)


def prototype_classify(
    query_emb: np.ndarray,
    support_emb: np.ndarray,
    support_labels: np.ndarray,
    num_classes: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Nearest class centroid by cosine similarity.

  Support embeddings are L2-normalised, averaged per class and the means re-normalised; each query is scored by its
  cosine similarity to every class prototype.

  Args:
    query_emb: [Q, D] float query embeddings.
    support_emb: [S, D] float support embeddings (may come from another modality in the shared space).
    support_labels: [S] integer labels in [0, num_classes); every class needs at least one support example.
    num_classes: C.

  Returns:
    pred: [Q] int64 predicted class.
    scores: [Q, C] float64 cosine similarities in [-1, 1].
  """
  query_emb = np.asarray(query_emb, dtype=np.float64)
  support_emb = np.asarray(support_emb, dtype=np.float64)
  support_labels = _check_1d("support_labels", support_labels)
  if query_emb.ndim != 2 or support_emb.ndim != 2:
    raise ValueError(f"query_emb and support_emb must be 2-D, got {query_emb.shape} and {support_emb.shape}.")
  if query_emb.shape[0] == 0:
    raise ValueError("query_emb is empty; need at least one query.")
  if query_emb.shape[1] != support_emb.shape[1]:
    raise ValueError(f"Embedding widths differ: queries {query_emb.shape[1]}, support {support_emb.shape[1]}.")
  if support_emb.shape[0] != support_labels.shape[0]:
    raise ValueError(f"support_emb has {support_emb.shape[0]} rows but support_labels has {support_labels.shape[0]}.")
  if not np.issubdtype(support_labels.dtype, np.integer):
    raise ValueError(f"support_labels must be integer class ids, got dtype {support_labels.dtype}.")
  if support_labels.min() < 0 or support_labels.max() >= num_classes:
    raise ValueError(f"support_labels must lie in [0, num_classes={num_classes}).")
  counts = np.bincount(support_labels, minlength=num_classes)
  if np.any(counts == 0):
    raise ValueError(f"Classes {np.flatnonzero(counts == 0).tolist()} have no support example; "
                     "a prototype needs at least one.")
  class_sums = np.zeros((num_classes, support_emb.shape[1]))
  np.add.at(class_sums, support_labels, _l2_normalise(support_emb))
  # Normalising the sum equals normalising the mean, so the per-class counts drop out.
  prototypes = _l2_normalise(class_sums)
  scores = _l2_normalise(query_emb) @ prototypes.T
  return scores.argmax(axis=1).astype(np.int64), scores
