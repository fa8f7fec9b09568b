"""Tests for genjax.metrics: Frechet distance, KID, precision/recall, likelihood metrics, the feature network.

Reference values are closed forms computed in the tests themselves (Gaussian FD, polynomial-kernel MMD from
moments, linear-Gaussian marginal likelihood) or small hand-worked examples, explained where they appear.
"""
import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax import metrics
from genjax.metrics import features as feat
from genjax.metrics import kid as kid_lib

# ----------------------------------------------------------------------------------------------- Frechet distance


def _random_spd(rng, d, scale=1.0):
  m = rng.normal(size=(d, d)) * scale
  return m @ m.T + 0.1 * np.eye(d)


def test_fd_of_a_set_with_itself_is_zero():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, 16)) * rng.uniform(0.1, 5.0, 16) + 3.0
  assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
  # Rank-deficient covariance (N < D, and ReLU features with dead units): still 0.
  y = np.concatenate([rng.normal(size=(10, 24)), np.zeros((10, 8))], axis=1)
  assert metrics.frechet_distance(y, y) == pytest.approx(0.0, abs=1e-8)


def test_fd_from_statistics_matches_closed_forms():
  rng = np.random.default_rng(1)
  # Diagonal (commuting) covariances: FD = |mu_a - mu_b|^2 + sum_i (s_a,i - s_b,i)^2 with s the std devs.
  mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
  s_a, s_b = rng.uniform(0.2, 3.0, 6), rng.uniform(0.2, 3.0, 6)
  expected = np.sum((mu_a - mu_b) ** 2) + np.sum((s_a - s_b) ** 2)
  got = metrics.frechet_distance_from_statistics(mu_a, np.diag(s_a ** 2), mu_b, np.diag(s_b ** 2))
  assert got == pytest.approx(expected, rel=1e-10)
  # General SPD: Tr sqrt(S_a S_b) = sum of sqrt of the (real, positive) eigenvalues of the product S_a S_b.
  sa, sb = _random_spd(rng, 7), _random_spd(rng, 7, 2.0)
  tr_sqrt = np.sum(np.sqrt(np.real(np.linalg.eigvals(sa @ sb))))
  expected = np.sum((mu_a[:1] - mu_b[:1]) ** 2) + np.trace(sa) + np.trace(sb) - 2 * tr_sqrt
  mua, mub = np.full(7, mu_a[0]), np.full(7, mu_a[0])
  mub[0] = mu_b[0]
  got = metrics.frechet_distance_from_statistics(mua, sa, mub, sb)
  assert got == pytest.approx(expected, rel=1e-9)


def test_fd_of_gaussian_samples_approaches_closed_form():
  rng = np.random.default_rng(2)
  n, mu_a, mu_b = 20000, np.array([0.0, 1.0, -1.0]), np.array([0.5, 1.0, 0.0])
  s_a, s_b = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
  a = mu_a + s_a * rng.normal(size=(n, 3))
  b = mu_b + s_b * rng.normal(size=(n, 3))
  expected = np.sum((mu_a - mu_b) ** 2) + np.sum((s_a - s_b) ** 2)   # 1.25 + 1.25 = 2.5
  # Sampling error of the means/covariances at n = 20000 is O(1e-2) here.
  assert metrics.frechet_distance(a, b) == pytest.approx(expected, abs=0.08)


def test_fd_is_symmetric_and_rotation_invariant():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(300, 5)), 0.5 + 2 * rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5))
  q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  fd = metrics.frechet_distance(a, b)
  assert metrics.frechet_distance(b, a) == pytest.approx(fd, rel=1e-9)
  assert metrics.frechet_distance(a @ q, b @ q) == pytest.approx(fd, rel=1e-9)
  assert fd > 1.0


@pytest.mark.parametrize("a,b,match", [
    (np.zeros((5, 3)), np.zeros((5, 4)), "dimensions differ"),
    (np.zeros(5), np.zeros((5, 1)), r"\[N, D\]"),
    (np.zeros((1, 3)), np.zeros((5, 3)), "at least 2"),
    (np.full((4, 2), np.nan), np.zeros((5, 2)), "non-finite"),
])
def test_fd_rejects_bad_inputs(a, b, match):
  with pytest.raises(ValueError, match=match):
    metrics.frechet_distance(a, b)


# --------------------------------------------------------------------------------------------------------------- KID


def test_mmd2_unbiased_matches_power_sum_formula():
  # In 1-D, (xy + 1)^3 = sum_j c_j x^j y^j with c = (1, 3, 3, 1), so the double sums are power sums:
  # sum_{i != j} k(a_i, a_j) = sum_j c_j [(sum_i a_i^j)^2 - sum_i a_i^(2j)], sum_{i,j} k(a_i, b_j) = sum_j c_j A_j B_j.
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=37), rng.normal(0.3, 1.2, size=37)
  c, m = np.array([1.0, 3.0, 3.0, 1.0]), 37
  def within(x):
    return sum(c[j] * (np.sum(x ** j) ** 2 - np.sum(x ** (2 * j))) for j in range(4))
  cross = sum(c[j] * np.sum(a ** j) * np.sum(b ** j) for j in range(4))
  expected = (within(a) + within(b)) / (m * (m - 1)) - 2 * cross / m ** 2
  assert kid_lib.mmd2_unbiased(a[:, None], b[:, None]) == pytest.approx(expected, rel=1e-9)


def test_kid_estimator_is_unbiased_for_one_distribution():
  # Mean of 300 independent small-sample estimates; the biased (V-statistic) version would sit near
  # 2 (E k(x,x) - E k(x,y)) / m > 0, about 0.3 here, far outside the tolerance.
  rng = np.random.default_rng(5)
  vals = [kid_lib.mmd2_unbiased(rng.normal(size=(16, 4)), rng.normal(size=(16, 4))) for _ in range(300)]
  mean, stderr = np.mean(vals), np.std(vals, ddof=1) / math.sqrt(len(vals))
  assert abs(mean) < 4 * stderr
  a, b = rng.normal(size=(1200, 8)), rng.normal(size=(1200, 8))
  same = metrics.kernel_distance(a, b, num_subsets=20, subset_size=400, seed=0)
  shifted = metrics.kernel_distance(a, b + 0.5, num_subsets=20, subset_size=400, seed=0)
  assert abs(same.mean) < 3 * same.std and abs(same.mean) < 0.02 * shifted.mean
  assert same.subset_size == 400 and same.stderr == pytest.approx(same.std / math.sqrt(20))


def test_kid_approaches_population_mmd_of_two_gaussians():
  # 1-D feature map of (xy + 1)^3 is (1, sqrt3 x, sqrt3 x^2, x^3), so population MMD^2 =
  # 3 (dm1)^2 + 3 (dm2)^2 + (dm3)^2 with raw moments of N(mu, 1): m1 = mu, m2 = mu^2 + 1, m3 = mu^3 + 3 mu.
  mu = 0.5
  expected = 3 * mu ** 2 + 3 * (mu ** 2) ** 2 + (mu ** 3 + 3 * mu) ** 2    # 3.578125
  rng = np.random.default_rng(6)
  reps = [metrics.kernel_distance(rng.normal(size=(2000, 1)), rng.normal(mu, 1.0, size=(2000, 1)),
                                  num_subsets=1, subset_size=2000).mean for _ in range(6)]
  assert abs(np.mean(reps) - expected) < 4 * np.std(reps, ddof=1) / math.sqrt(len(reps))
  assert np.mean(reps) == pytest.approx(expected, rel=0.2)


def test_kid_subsets_are_reproducible_and_capped():
  rng = np.random.default_rng(7)
  a, b = rng.normal(size=(50, 3)), rng.normal(size=(80, 3))
  r1 = metrics.kernel_distance(a, b, num_subsets=5, subset_size=1000, seed=3)
  r2 = metrics.kernel_distance(a, b, num_subsets=5, subset_size=1000, seed=3)
  assert r1 == r2 and r1.subset_size == 50
  with pytest.raises(ValueError, match="num_subsets"):
    metrics.kernel_distance(a, b, num_subsets=0)


# ------------------------------------------------------------------------------------------------ precision/recall


def test_precision_recall_identical_sets_are_one():
  x = np.random.default_rng(8).normal(size=(200, 10))
  assert metrics.precision_recall(x, x, k=3) == (1.0, 1.0)


def test_precision_recall_hand_worked_example():
  # k = 1. Real {0, 1, 2, 3, 4}: every nearest-neighbour radius is 1. Fake {0.5, 10}: 0.5 is within 0.5 of 0
  # (inside), 10 is 6 from the nearest real point 4 (outside) -> precision 1/2. Fake radii: |10 - 0.5| = 9.5 each;
  # every real point is within 9.5 of 0.5 -> recall 1.
  real, fake = np.arange(5.0)[:, None], np.array([[0.5], [10.0]])
  assert metrics.precision_recall(real, fake, k=1) == (0.5, 1.0)


def test_precision_recall_detect_mode_dropping_and_disjoint_sets():
  rng = np.random.default_rng(9)
  mode_a, mode_b = rng.normal(size=(300, 2)), 20.0 + rng.normal(size=(300, 2))
  real = np.concatenate([mode_a, mode_b])
  pr = metrics.precision_recall(real, rng.normal(size=(300, 2)), k=3)   # samples from mode a only
  assert pr.precision > 0.95 and 0.4 < pr.recall < 0.55
  assert metrics.precision_recall(mode_a, mode_b, k=3) == (0.0, 0.0)
  with pytest.raises(ValueError, match="k must be"):
    metrics.precision_recall(real, real, k=0)


# ------------------------------------------------------------------------------------------------------ likelihoods


def _linear_gaussian_log_weights(rng, x, k, posterior_exact):
  """Model z ~ N(0, 1), x | z ~ N(z, s^2) with s = 0.5; encoder q(z | x) = N(m x, v).

  Exact marginal: x ~ N(0, 1 + s^2). Exact posterior: m = 1 / (1 + s^2), v = s^2 / (1 + s^2).
  Returns log w = log p(x, z) - log q(z | x) for z ~ q, shape [len(x), k], float64.
  """
  s2 = 0.25
  m, v = 1 / (1 + s2), s2 / (1 + s2)
  if not posterior_exact:
    m, v = 0.6 * m, 3.0 * v
  z = m * x[:, None] + math.sqrt(v) * rng.normal(size=(len(x), k))
  log_n = lambda y, mean, var: -0.5 * (np.log(2 * np.pi * var) + (y - mean) ** 2 / var)
  return log_n(z, 0.0, 1.0) + log_n(x[:, None], z, s2) - log_n(z, m * x[:, None], v), (m, v, s2)


def test_importance_weighted_nll_bounds_and_tightens_toward_exact_nll():
  rng = np.random.default_rng(10)
  x = rng.normal(0, math.sqrt(1.25), size=400)
  exact_nll = np.mean(0.5 * (np.log(2 * np.pi * 1.25) + x ** 2 / 1.25))
  lw, (m, v, s2) = _linear_gaussian_log_weights(rng, x, 2000, posterior_exact=False)
  # Closed-form ELBO of the linear-Gaussian model with q = N(m x, v):
  # E_q[log p(z)] + E_q[log p(x|z)] + H(q).
  elbo = np.mean(-0.5 * (np.log(2 * np.pi) + (m * x) ** 2 + v)
                 - 0.5 * (np.log(2 * np.pi * s2) + ((x - m * x) ** 2 + v) / s2)
                 + 0.5 * np.log(2 * np.pi * np.e * v))
  neg_elbo = float(jnp.mean(metrics.negative_elbo(lw)))
  assert neg_elbo == pytest.approx(-elbo, abs=0.01)
  iw = {}
  for k in (1, 5, 50, 2000):
    # Split the 2000 samples into 2000 // k independent K-sample estimates and average them.
    groups = lw[:, : (2000 // k) * k].reshape(len(x), 2000 // k, k)
    iw[k] = float(jnp.mean(metrics.importance_weighted_nll(groups)))
  assert iw[1] == pytest.approx(neg_elbo, abs=1e-4)          # K = 1 is the ELBO itself
  assert iw[1] > iw[5] > iw[50] > iw[2000] >= exact_nll - 0.01
  assert neg_elbo - exact_nll > 0.1                          # the encoder is deliberately poor ...
  assert iw[2000] == pytest.approx(exact_nll, abs=0.02)      # ... yet K = 2000 almost closes the gap


def test_importance_weighted_nll_is_exact_with_the_true_posterior():
  rng = np.random.default_rng(11)
  x = rng.normal(size=8)
  lw, _ = _linear_gaussian_log_weights(rng, x, 16, posterior_exact=True)
  exact = 0.5 * (np.log(2 * np.pi * 1.25) + x ** 2 / 1.25)
  np.testing.assert_allclose(metrics.importance_weighted_nll(lw), exact, atol=1e-5)
  np.testing.assert_allclose(jax.jit(metrics.importance_weighted_nll)(lw), exact, atol=1e-5)


def test_unit_conversions_known_values():
  ln2 = math.log(2)
  assert float(metrics.bits_per_dim(64 * ln2, num_dims=64)) == pytest.approx(1.0)
  # A density on [0, 1] data with 1/256 grid cells: + log2(256) = 8 bits per dimension.
  assert float(metrics.bits_per_dim(64 * ln2, 64, bin_width=1 / 256)) == pytest.approx(9.0)
  assert float(metrics.perplexity(math.log(10.0))) == pytest.approx(10.0, rel=1e-6)
  assert float(metrics.bits_per_byte(ln2)) == pytest.approx(1.0)
  assert float(metrics.bits_per_byte(ln2, bytes_per_token=4.0)) == pytest.approx(0.25)
  assert metrics.unigram_entropy_bits(b"abab") == pytest.approx(1.0)
  assert metrics.unigram_entropy_bits(bytes(range(256)) * 3) == pytest.approx(8.0)
  assert metrics.unigram_entropy_bits("aaaa") == 0.0
  with pytest.raises(ValueError, match="num_dims"):
    metrics.bits_per_dim(1.0, 0)
  with pytest.raises(ValueError, match="byte ids"):
    metrics.unigram_entropy_bits(np.array([0, 300]))


def test_statistics_import_without_flax():
  code = "import sys, genjax.metrics as m; m.frechet_distance; print('flax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.strip() == "False"


# -------------------------------------------------------------------------------------------------- feature network

_SHORT = 60   # training steps for the fast tests (the full digits recipe is 920 steps)


@pytest.fixture(scope="module")
def short_net(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("features"))
  return feat.build_feature_extractor("digits", cache_dir=cache, num_steps=_SHORT), cache


def test_feature_net_learns_and_gives_features(short_net):
  fx, _ = short_net
  from genjax.data import load_arrays
  test = load_arrays("digits", "test")
  f = fx(test["image"])
  assert f.shape == (297, 128) and f.dtype == np.float32 and np.all(f >= 0)   # ReLU features
  # 60 Adam steps already separate the classes well above chance (0.1); the full recipe reaches ~0.98.
  assert fx.meta["test_accuracy"] > 0.6
  acc = np.mean(np.argmax(fx.logits(test["image"]), -1) == test["label"])
  assert acc == pytest.approx(fx.test_accuracy)
  assert fx.metric_name("FD") == "FD-digits" and fx.metric_name("KID") == "KID-digits"
  # A row's features do not depend on the batch it is in (fixed, padded evaluation batches).
  np.testing.assert_array_equal(fx(test["image"][:7]), f[:7])
  with pytest.raises(ValueError, match="8, 8, 1"):
    fx(np.zeros((3, 28, 28, 1), np.float32))


def test_feature_net_training_is_reproducible_and_cached(short_net, tmp_path, monkeypatch):
  fx, cache = short_net
  again = feat.build_feature_extractor("digits", cache_dir=str(tmp_path), num_steps=_SHORT)
  chex.assert_trees_all_equal(fx.params, again.params)
  # Arrays-only cache: loads with pickling disabled.
  with np.load(os.path.join(cache, "digits", "params.npz"), allow_pickle=False) as z:
    assert "Dense_0/kernel" in z.files and all(z[k].dtype == np.float32 for k in z.files)

  def no_training(*a, **k):
    raise AssertionError("retrained although a matching cache exists")
  monkeypatch.setattr(feat, "train_feature_net", no_training)
  cached = feat.build_feature_extractor("digits", cache_dir=cache, num_steps=_SHORT)
  assert cached.meta == fx.meta
  # The short-trained cache is not the full recipe, so the default loader retrains rather than reuse it.
  with pytest.raises(AssertionError, match="retrained"):
    metrics.load_feature_extractor("digits", cache_dir=cache)
  with pytest.raises(ValueError, match="available"):
    metrics.load_feature_extractor("svhn", cache_dir=cache)


@pytest.mark.parametrize("shape,widths,flat", [((28, 28, 1), (32, 64), 7 * 7 * 64),
                                               ((32, 32, 3), (32, 64, 128), 4 * 4 * 128)])
def test_feature_net_shapes_for_tfds_image_sizes(shape, widths, flat):
  # The mnist / cifar10 recipes pool 28 -> 14 -> 7 and 32 -> 16 -> 8 -> 4; the features stay 128-wide.
  model = feat.FeatureNet(10, widths, 128)
  params = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1,) + shape))["params"], jax.random.PRNGKey(0))
  logits, features = jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((5,) + shape)), params)
  assert logits.shape == (5, 10) and features.shape == (5, 128)
  assert params["Dense_0"]["kernel"].shape == (flat, 128)
  assert tuple(feat.SPECS["mnist" if shape[-1] == 1 else "cifar10"]["widths"]) == widths


@pytest.mark.skipif(not os.environ.get("GENJAX_SLOW_TESTS"), reason="full recipe (~30 s CPU); GENJAX_SLOW_TESTS=1")
def test_full_digits_feature_net_accuracy(tmp_path):
  fx = metrics.load_feature_extractor("digits", cache_dir=str(tmp_path))
  assert fx.test_accuracy >= 0.97


def test_unigram_cross_entropy_and_feature_metric_names():
  # Train unigram {a: 3, b: 1} with add-1 smoothing over 256 bytes: p(a) = 4/260; test "a" -> -log2(4/260).
  assert metrics.unigram_cross_entropy_bits(b"aaab", b"a") == pytest.approx(-math.log2(4 / 260))
  text = bytes(np.random.default_rng(12).integers(0, 256, 50000, dtype=np.uint8))
  # A held-out sample of the same source costs at least its own entropy (Gibbs), and about the same here.
  h = metrics.unigram_entropy_bits(text[:25000])
  assert h - 0.02 < metrics.unigram_cross_entropy_bits(text[25000:], text[:25000]) < h + 0.05
  x = np.random.default_rng(13).normal(size=(40, 4))
  m = metrics.feature_metrics(x, x, "digits", kid_subsets=3, kid_subset_size=20)
  assert sorted(m) == ["FD-digits", "KID-digits", "KID-digits_stderr", "precision-digits", "recall-digits"]
  assert m["FD-digits"] == pytest.approx(0.0, abs=1e-8) and m["precision-digits"] == m["recall-digits"] == 1.0


# ------------------------------------------------------------------------------------------ experiments/evaluate.py


def _toy_task():
  import optax
  from genjax.core.task import Phase, Task

  def sample_images(params, rng, n, shift=0.0, **unknown):
    if unknown:
      raise ValueError(f"unknown options {sorted(unknown)}; valid: ['shift']")
    return jax.random.uniform(rng, (n, 8, 8, 1)) * 1.5 - 0.25 + shift + params["b"]

  def evaluate(params, batch, rng):
    return {"mean_pixel": jnp.mean(batch["image"]), "mean_label": jnp.mean(batch["label"].astype(jnp.float32))}

  return Task(init=lambda rng, b: {"b": jnp.zeros(())}, phases=(Phase("p", lambda *a: (0.0, {}), optax.sgd(1.0)),),
              sample_images=sample_images, evaluate=evaluate)


def test_evaluate_draws_batched_samples_and_averages_the_whole_split():
  import ml_collections
  from experiments import evaluate as ev
  from genjax.data import load_arrays
  assert ev.parse_options({"sampler": "ddim", "num_steps": 20, "eta": None}, ["truncation=0.7", "label=3",
                                                                               "name=abc"]) == \
      {"sampler": "ddim", "num_steps": 20, "truncation": 0.7, "label": 3, "name": "abc"}
  with pytest.raises(ValueError, match="key=value"):
    ev.parse_options({}, ["truncation"])
  task, params, rng = _toy_task(), {"b": jnp.zeros(())}, jax.random.PRNGKey(0)
  images, (lo, hi) = ev.draw_samples(task, params, rng, 10, 4, {"shift": 0.1})
  assert images.shape == (10, 8, 8, 1) and images.min() >= 0.0 and images.max() <= 1.0
  assert lo < 0.0 and hi > 1.0                                  # the raw range is reported before clipping
  np.testing.assert_array_equal(images, ev.draw_samples(task, params, rng, 10, 4, {"shift": 0.1})[0])
  with pytest.raises(ValueError, match="unknown options"):
    ev.draw_samples(task, params, rng, 4, 4, {"sampler": "ddim"})
  # 297 test images in batches of 100, 100, 97: the size-weighted mean equals the plain mean over the split.
  config = ml_collections.ConfigDict({"dataset": {"name": "digits", "data_dir": None}})
  got = ev.evaluate_split(task, params, config, "test", 100, rng)
  test = load_arrays("digits", "test")
  assert got["num_examples"] == 297
  assert got["mean_pixel"] == pytest.approx(float(test["image"].mean()), rel=1e-5)
  assert got["mean_label"] == pytest.approx(float(test["label"].mean()), rel=1e-5)


# ------------------------------------------------------------------------------------------------- memorization


def test_nearest_neighbour_distances_match_brute_force():
  rng = np.random.default_rng(20)
  q, r = rng.uniform(size=(1100, 4, 4, 1)), rng.uniform(size=(300, 4, 4, 1))   # > one 1024-row chunk
  brute = np.sqrt(((q.reshape(1100, 1, 16) - r.reshape(1, 300, 16)) ** 2).sum(-1)).min(1)
  np.testing.assert_allclose(metrics.nearest_neighbour_distances(q, r), brute, rtol=1e-9, atol=1e-9)
  with pytest.raises(ValueError, match="16 values per row, references 9"):
    metrics.nearest_neighbour_distances(q, r[:, :3, :3])


def test_nearest_train_distance_ratio_tells_copies_from_new_draws():
  rng = np.random.default_rng(21)
  train, held_out, fresh = (rng.uniform(size=(n, 8, 8, 1)) for n in (600, 200, 200))
  assert metrics.nearest_train_distance_ratio(train[:200], train, held_out) == 0.0   # exact copies
  # New draws from the data distribution sit as far from the training set as held-out data do.
  assert metrics.nearest_train_distance_ratio(fresh, train, held_out) == pytest.approx(1.0, abs=0.05)
  # Training images plus small noise (a near-copier) sit much closer than held-out data.
  assert metrics.nearest_train_distance_ratio(train[:200] + 0.01 * rng.normal(size=train[:200].shape), train,
                                              held_out) < 0.1
  with pytest.raises(ValueError, match="undefined"):
    metrics.nearest_train_distance_ratio(fresh, train, train[:10])
