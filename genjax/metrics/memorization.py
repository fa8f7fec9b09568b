"""Do samples copy the training set? Distances to the nearest training image, against those of unseen real images.

    ratio = nearest_train_distance_ratio(samples, train_images, held_out_images)
    # ~1: samples sit as close to the training set as unseen real data do; < 1: closer (over-fitting);
    # ~0: copies of training images.

Feature-space scores against the *train* split (FD, KID, precision/recall) cannot tell a model that generalises from
one that replays its training images: a set of training images scores best of all. `experiments/evaluate.py`
reports this ratio and the "memorizer" baseline (training images scored as samples) beside the FD. Distances are
Euclidean in pixel space ([0, 1] images, flattened), exact, float64, computed in row chunks by BLAS
(|a|^2 + |b|^2 - 2ab), so memory stays O(chunk * N).
"""
from __future__ import annotations

import numpy as np
from genjax.errors import UserError

_CHUNK = 1024


def _flat(images, name: str) -> np.ndarray:
  x = np.asarray(images, np.float64)
  if x.ndim < 2 or x.shape[0] == 0:
    raise UserError(f"{name} must be a non-empty batch [N, ...], got shape {x.shape}")
  return x.reshape(x.shape[0], -1)


def nearest_neighbour_distances(queries, references) -> np.ndarray:
  """[N] Euclidean distance from each query row to its nearest reference row (both [N, ...], flattened)."""
  q, r = _flat(queries, "queries"), _flat(references, "references")
  if q.shape[1] != r.shape[1]:
    raise UserError(f"queries have {q.shape[1]} values per row, references {r.shape[1]}")
  r_sq = np.sum(r * r, axis=1)
  out = np.empty(q.shape[0], np.float64)
  for start in range(0, q.shape[0], _CHUNK):
    block = q[start:start + _CHUNK]
    d2 = np.sum(block * block, axis=1)[:, None] + r_sq[None, :] - 2.0 * block @ r.T
    out[start:start + _CHUNK] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
  return out


def nearest_train_distance_ratio(samples, train, held_out) -> float:
  """median nearest-train distance of `samples` / that of `held_out` real images (see module docstring)."""
  held = float(np.median(nearest_neighbour_distances(held_out, train)))
  if held == 0.0:
    raise UserError("every held-out image also appears in the training set: the ratio is undefined")
  return float(np.median(nearest_neighbour_distances(samples, train))) / held
