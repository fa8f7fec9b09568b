"""Kernel distance (KID): the unbiased squared MMD with a cubic polynomial kernel, averaged over subsets.

    result = kernel_distance(features_a, features_b, num_subsets=100, subset_size=1000, seed=0)
    result.mean, result.std, result.stderr

Kernel k(x, y) = (x.y / D + 1)^3 on [N, D] feature vectors. Each subset draws `subset_size` rows of each set
without replacement (capped at the smaller set) and computes the unbiased estimator

    MMD^2_u = sum_{i!=j} k(a_i, a_j) / (m(m-1)) + sum_{i!=j} k(b_i, b_j) / (m(m-1)) - 2 sum_{i,j} k(a_i, b_j) / m^2

so two samples of one distribution give values scattered around 0 (negative values are legitimate). `mean` is the
average over subsets, `std` their spread and `stderr = std / sqrt(num_subsets)` the standard error of the mean;
when the subsets overlap (num_subsets * subset_size > N) `stderr` understates the true uncertainty, which is then
closer to `std`. Float64 numpy on the host; the subsets are reproducible from `seed`.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from genjax.metrics.frechet import as_feature_matrix
from genjax.errors import UserError


class KIDResult(NamedTuple):
  mean: float            # KID estimate: mean of the per-subset unbiased MMD^2
  std: float             # standard deviation of the per-subset estimates
  stderr: float          # std / sqrt(num_subsets)
  num_subsets: int
  subset_size: int


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
  """k(x, y) = (x.y / D + coef0)^degree for every pair of rows: [N, D] x [M, D] -> [N, M]."""
  base = x @ y.T / x.shape[1] + coef0
  out = base
  for _ in range(int(degree) - 1):     # repeated products: several times faster than float ** int in numpy
    out = out * base
  return out


def mmd2_unbiased(a: np.ndarray, b: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
  """Unbiased MMD^2 between two equal-size sets of rows [m, D] under the polynomial kernel."""
  m = a.shape[0]
  if b.shape[0] != m or m < 2:
    raise UserError(f"mmd2_unbiased needs two sets of equal size >= 2, got {a.shape[0]} and {b.shape[0]} rows")
  k_aa = polynomial_kernel(a, a, degree, coef0)
  k_bb = polynomial_kernel(b, b, degree, coef0)
  k_ab = polynomial_kernel(a, b, degree, coef0)
  within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
  return float(within - 2.0 * k_ab.sum() / (m * m))


def kernel_distance(features_a, features_b, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0,
                    degree: int = 3, coef0: float = 1.0) -> KIDResult:
  """KID between two feature sets [N, D] and [M, D] (see module docstring)."""
  a = as_feature_matrix(features_a, "features_a")
  b = as_feature_matrix(features_b, "features_b")
  if a.shape[1] != b.shape[1]:
    raise UserError(f"feature dimensions differ: features_a has D={a.shape[1]}, features_b has D={b.shape[1]}")
  if int(degree) != degree or degree < 1:
    raise UserError(f"degree must be a positive integer, got {degree}")
  if num_subsets < 1:
    raise UserError(f"num_subsets must be >= 1, got {num_subsets}")
  if subset_size < 2:
    raise UserError(f"subset_size must be >= 2, got {subset_size}")
  m = min(subset_size, a.shape[0], b.shape[0])
  rng = np.random.default_rng(seed)
  values = np.empty(num_subsets, np.float64)
  for s in range(num_subsets):
    ia = rng.choice(a.shape[0], m, replace=False)
    ib = rng.choice(b.shape[0], m, replace=False)
    values[s] = mmd2_unbiased(a[ia], b[ib], degree, coef0)
  std = float(values.std(ddof=1)) if num_subsets > 1 else float("nan")
  return KIDResult(mean=float(values.mean()), std=std, stderr=float(std / np.sqrt(num_subsets)),
                   num_subsets=num_subsets, subset_size=m)
