"""Exact t-SNE in numpy, for the 2-D map of the joint embedding space in the evaluation report.

Our own rather than a library's: scikit-learn is a test-only dependency and scipy has no t-SNE, and at the ~1000
points a report plots the exact O(N^2) gradient takes a few seconds, so Barnes-Hut approximations are not needed.
Deterministic: PCA initialisation, no random numbers.
"""

from __future__ import annotations

import numpy as np


def pca(x: np.ndarray, dims: int) -> np.ndarray:
  """[N, D] -> [N, min(dims, N, D)] principal component scores (signs fixed: largest loading positive)."""
  centred = x - x.mean(axis=0)
  u, s, vt = np.linalg.svd(centred, full_matrices=False)
  dims = min(dims, s.size)
  signs = np.sign(vt[np.arange(dims), np.argmax(np.abs(vt[:dims]), axis=1)])
  return u[:, :dims] * s[:dims] * signs


def squared_distances(x: np.ndarray) -> np.ndarray:
  sq = np.sum(x * x, axis=1)
  return np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)


def conditional_probabilities(dist_sq: np.ndarray, perplexity: float, iters: int = 64) -> np.ndarray:
  """P[i, j] = p(j | i) with a Gaussian bandwidth per row such that the row's entropy is log(perplexity).

  The precisions beta_i are found by bisection on all rows at once (entropy falls monotonically in beta). Distances
  are shifted by each row's smallest off-diagonal one before exp, which leaves p unchanged (it cancels in the
  normalisation) and keeps the nearest neighbour's weight at 1, so no row underflows to all zeros.
  """
  n = dist_sq.shape[0]
  off = ~np.eye(n, dtype=bool)
  shifted = np.where(off, dist_sq - np.min(np.where(off, dist_sq, np.inf), axis=1, keepdims=True), 0.0)
  target = np.log(perplexity)
  beta, lo, hi = np.ones(n), np.zeros(n), np.full(n, np.inf)
  for _ in range(iters):
    p = np.exp(-shifted * beta[:, None]) * off
    total = p.sum(axis=1)
    # H = log Z + beta * E_p[d]: natural-log entropy of the row.
    entropy = np.log(total) + beta * np.sum(p * shifted, axis=1) / total
    too_flat = entropy > target  # raise beta (narrower Gaussian)
    lo = np.where(too_flat, beta, lo)
    hi = np.where(too_flat, hi, beta)
    beta = np.where(np.isinf(hi), beta * 2.0, (lo + hi) / 2.0)
  p = np.exp(-shifted * beta[:, None]) * off
  return p / p.sum(axis=1, keepdims=True)


def tsne(x: np.ndarray, *, perplexity: float = 30.0, num_iters: int = 500, pca_dims: int = 50) -> np.ndarray:
  """[N, D] points -> [N, 2] t-SNE map (van der Maaten & Hinton 2008, with early exaggeration and gains).

  Perplexity is capped at (N - 1) / 3 so that small sets still work. The affinities are computed in float64, the
  gradient descent runs in float32 (the map's precision does not need more, and it halves the memory traffic).
  """
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  if n < 4:
    raise ValueError(f"t-SNE needs at least 4 points, got {n}")
  reduced = pca(x, pca_dims)
  perplexity = min(perplexity, (n - 1) / 3.0)
  p = conditional_probabilities(squared_distances(reduced), perplexity)
  p = np.maximum((p + p.T) / (2.0 * n), 1e-12).astype(np.float32)
  y = reduced[:, :2].copy() if reduced.shape[1] >= 2 else np.c_[reduced, np.zeros(n)]
  y = (y * 1e-4 / max(float(np.std(y[:, 0])), 1e-12)).astype(np.float32)
  learning_rate = max(n / 12.0 / 4.0, 50.0)
  update, gains = np.zeros_like(y), np.ones_like(y)
  exaggeration_iters = min(250, num_iters // 3)
  for it in range(num_iters):
    exaggeration, momentum = (12.0, 0.5) if it < exaggeration_iters else (1.0, 0.8)
    kernel = 1.0 / (1.0 + squared_distances(y))  # Student-t with one degree of freedom
    np.fill_diagonal(kernel, 0.0)
    weights = (exaggeration * p - kernel / kernel.sum()) * kernel  # (P - Q) * kernel
    grad = 4.0 * (weights.sum(axis=1, keepdims=True) * y - weights @ y)
    # Delta-bar-delta gains: grow a step size while the gradient keeps its sign against the last update.
    gains = np.where(np.sign(grad) != np.sign(update), gains + 0.2, gains * 0.8).clip(0.01)
    update = momentum * update - learning_rate * gains * grad
    y += update
  return y - y.mean(axis=0)
