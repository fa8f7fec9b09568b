"""Frechet distance between two feature sets, each summarised by a Gaussian (mean and covariance).

    fd = frechet_distance(features_a, features_b)          # [N, D] and [M, D] arrays -> float

FD = |mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr sqrt(S_a S_b). The matrix square root is taken in the symmetric
form Tr sqrt(S_a S_b) = Tr sqrt(A S_b A) with A = sqrt(S_a), both through `numpy.linalg.eigh` in float64 on the
host (no `scipy.linalg.sqrtm`, whose `disp` argument is gone in scipy 1.18, and no complex round-off). Negative
eigenvalues from round-off are clipped to zero, so the result is a real number >= 0 up to float64 precision.

This is the statistic behind "FID"; genjax computes it in the feature space of its own classifier
(`genjax.metrics.features`) and names it after that network ("FD-digits"), never "FID".
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from genjax.errors import UserError


def as_feature_matrix(features, name: str = "features", min_rows: int = 2) -> np.ndarray:
  """`features` as a float64 [N, D] host array; a ValueError names the bad shape or values."""
  x = np.asarray(features, dtype=np.float64)
  if x.ndim != 2:
    raise UserError(f"{name} must be a [N, D] array of feature vectors, got shape {x.shape}")
  if x.shape[0] < min_rows:
    raise UserError(f"{name} needs at least {min_rows} rows (feature vectors), got {x.shape[0]}")
  if x.shape[1] < 1:
    raise UserError(f"{name} has no feature columns: shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise UserError(f"{name} contains {int(np.sum(~np.isfinite(x)))} non-finite values (NaN or inf)")
  return x


def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
  """Mean [D] and unbiased covariance [D, D] (divides by N - 1) of a [N, D] feature array, in float64."""
  x = as_feature_matrix(features)
  mu = x.mean(axis=0)
  centred = x - mu
  sigma = centred.T @ centred / (x.shape[0] - 1)
  return mu, sigma


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
  w, v = np.linalg.eigh((sigma + sigma.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
  """Tr sqrt(S_a S_b) for symmetric PSD S_a, S_b, as Tr sqrt(A S_b A) with A = sqrt(S_a)."""
  a = _psd_sqrt(sigma_a)
  m = a @ sigma_b @ a
  w = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def frechet_distance_from_statistics(mu_a, sigma_a, mu_b, sigma_b) -> float:
  """Frechet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b): means [D], covariances [D, D]."""
  mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
  sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
  if mu_a.ndim != 1 or mu_a.shape != mu_b.shape:
    raise UserError(f"means must be [D] vectors of one length, got shapes {mu_a.shape} and {mu_b.shape}")
  d = mu_a.shape[0]
  for name, s in (("sigma_a", sigma_a), ("sigma_b", sigma_b)):
    if s.shape != (d, d):
      raise UserError(f"{name} must be a [{d}, {d}] covariance matching the means, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
      raise UserError(f"{name} contains non-finite values")
  diff = mu_a - mu_b
  fd = float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_sqrt_product(sigma_a, sigma_b))
  # Round-off can leave a tiny negative number when the two Gaussians coincide.
  return max(fd, 0.0)


def frechet_distance(features_a, features_b) -> float:
  """Frechet distance between Gaussians fitted to two feature sets [N, D] and [M, D] (float64, host)."""
  a = as_feature_matrix(features_a, "features_a")
  b = as_feature_matrix(features_b, "features_b")
  if a.shape[1] != b.shape[1]:
    raise UserError(f"feature dimensions differ: features_a has D={a.shape[1]}, features_b has D={b.shape[1]}")
  mu_a, sigma_a = feature_statistics(a)
  mu_b, sigma_b = feature_statistics(b)
  return frechet_distance_from_statistics(mu_a, sigma_a, mu_b, sigma_b)
