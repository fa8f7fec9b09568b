"""All the feature-space sample-quality metrics at once, named after the feature network.

    m = feature_metrics(real_features, fake_features, "digits")
    # {"FD-digits": ..., "KID-digits": ..., "KID-digits_stderr": ..., "precision-digits": ..., "recall-digits": ...}

Used by `experiments/evaluate.py` for the samples and for the real-vs-real floor (the same call with a second real
split in place of the samples), so both columns of a results table are computed identically.
"""
from __future__ import annotations

from typing import Dict

from genjax.metrics.frechet import frechet_distance
from genjax.metrics.kid import kernel_distance
from genjax.metrics.precision_recall import precision_recall
from genjax.errors import UserError


def feature_metrics(real_features, fake_features, name: str, *, kid_subsets: int = 100,
                    kid_subset_size: int = 1000, k: int = 3, seed: int = 0) -> Dict[str, float]:
  """FD, KID (mean and standard error), precision and recall (k-NN) of `fake_features` against `real_features`."""
  if not name:
    raise UserError("name the feature network the metrics are computed in (e.g. 'digits')")
  kid = kernel_distance(real_features, fake_features, num_subsets=kid_subsets, subset_size=kid_subset_size,
                        seed=seed)
  pr = precision_recall(real_features, fake_features, k=k)
  return {f"FD-{name}": frechet_distance(real_features, fake_features), f"KID-{name}": kid.mean,
          f"KID-{name}_stderr": kid.stderr, f"precision-{name}": pr.precision, f"recall-{name}": pr.recall}
