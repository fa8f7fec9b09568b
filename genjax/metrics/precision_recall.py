"""Precision and recall of generated samples with k-nearest-neighbour manifolds (Kynkaanniemi et al., 2019).

    pr = precision_recall(real_features, fake_features, k=3)
    pr.precision, pr.recall

Each set of [N, D] feature vectors approximates its manifold by the union of balls centred on its points, each
ball's radius the distance to that point's k-th nearest neighbour in its own set (the point itself excluded).
Precision is the fraction of fake points inside the real manifold (are samples realistic?); recall is the fraction
of real points inside the fake manifold (is the data covered?). Identical sets give precision = recall = 1.
Euclidean distances are computed exactly (`scipy.spatial.distance.cdist`, float64) in row chunks, so memory stays
O(chunk * N).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.spatial.distance import cdist

from genjax.metrics.frechet import as_feature_matrix
from genjax.errors import UserError

_CHUNK = 256


class PrecisionRecall(NamedTuple):
  precision: float
  recall: float


def knn_radii(features: np.ndarray, k: int = 3) -> np.ndarray:
  """Distance from each row of [N, D] to its k-th nearest other row (duplicates count at distance 0)."""
  x = as_feature_matrix(features, "features", min_rows=k + 1)
  radii = np.empty(x.shape[0], np.float64)
  for start in range(0, x.shape[0], _CHUNK):
    d = cdist(x[start:start + _CHUNK], x, "euclidean")
    # Index 0 of the partition is the point itself (distance 0); index k is its k-th neighbour.
    radii[start:start + _CHUNK] = np.partition(d, k, axis=1)[:, k]
  return radii


def manifold_coverage(reference: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
  """Fraction of `queries` rows within radii[i] of some reference row i."""
  inside = np.zeros(queries.shape[0], bool)
  for start in range(0, queries.shape[0], _CHUNK):
    d = cdist(queries[start:start + _CHUNK], reference, "euclidean")
    inside[start:start + _CHUNK] = np.any(d <= radii[None, :], axis=1)
  return float(inside.mean())


def precision_recall(real_features, fake_features, k: int = 3) -> PrecisionRecall:
  """Improved precision and recall of `fake_features` [M, D] against `real_features` [N, D] (k-NN radii)."""
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise UserError(f"k must be a positive integer number of neighbours, got {k!r}")
  real = as_feature_matrix(real_features, "real_features", min_rows=k + 1)
  fake = as_feature_matrix(fake_features, "fake_features", min_rows=k + 1)
  if real.shape[1] != fake.shape[1]:
    raise UserError(f"feature dimensions differ: real has D={real.shape[1]}, fake has D={fake.shape[1]}")
  precision = manifold_coverage(real, knn_radii(real, k), fake)
  recall = manifold_coverage(fake, knn_radii(fake, k), real)
  return PrecisionRecall(precision=precision, recall=recall)
