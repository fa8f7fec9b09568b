"""Sample-quality and likelihood metrics, offline: Frechet distance, KID and precision/recall on the features of
an in-repo classifier, bits/dim, importance-weighted NLL, perplexity and bits per byte.

    from genjax import metrics
    fx = metrics.load_feature_extractor("digits")          # trains + caches the feature net on first use
    real, fake = fx(real_images), fx(generated_images)     # [N, D] features
    metrics.frechet_distance(real, fake)                   # report as fx.metric_name("FD") == "FD-digits"
    metrics.kernel_distance(real, fake).mean               # "KID-digits"
    metrics.precision_recall(real, fake, k=3)
    metrics.feature_metrics(real, fake, "digits")          # all of them, named "FD-digits", "KID-digits", ...
    metrics.nearest_train_distance_ratio(images, train_images, test_images)   # < 1: closer to train than unseen data

The statistics are host numpy in float64; the likelihood helpers are jax.numpy (usable inside jit). The feature
network (`genjax.metrics.features`, Flax) is imported lazily, so the statistics work without Flax.
"""
from genjax.metrics.frechet import feature_statistics, frechet_distance, frechet_distance_from_statistics
from genjax.metrics.kid import KIDResult, kernel_distance, mmd2_unbiased
from genjax.metrics.likelihood import (bits_per_byte, bits_per_dim, importance_weighted_nll, negative_elbo,
                                       perplexity, unigram_cross_entropy_bits, unigram_entropy_bits)
from genjax.metrics.memorization import nearest_neighbour_distances, nearest_train_distance_ratio
from genjax.metrics.precision_recall import PrecisionRecall, precision_recall
from genjax.metrics.suite import feature_metrics

_LAZY = {"load_feature_extractor", "build_feature_extractor", "FeatureExtractor"}

__all__ = ["frechet_distance", "frechet_distance_from_statistics", "feature_statistics", "kernel_distance",
           "mmd2_unbiased", "KIDResult", "precision_recall", "PrecisionRecall", "bits_per_dim",
           "importance_weighted_nll", "negative_elbo", "perplexity", "bits_per_byte", "unigram_entropy_bits",
           "unigram_cross_entropy_bits", "feature_metrics", "nearest_neighbour_distances",
           "nearest_train_distance_ratio",
           *sorted(_LAZY)]


def __getattr__(name):
  if name in _LAZY:
    from genjax.metrics import features
    return getattr(features, name)
  raise AttributeError(f"module 'genjax.metrics' has no attribute {name!r}")
