"""VAE: the ELBO pieces against the closed forms of a linear-Gaussian model; IW-NLL bounds; model shapes."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.models import vae
from tests.util import tiny_vae_config

D, K, SIGMA = 6, 3, 0.5


def _linear_gaussian(seed=0):
  """p(z) = N(0, I), p(x|z) = N(Wz + b, σ²I) with orthogonal columns of W so the true posterior is diagonal."""
  r = np.random.default_rng(seed)
  q, _ = np.linalg.qr(r.normal(size=(D, K)))
  scales = np.array([2.0, 1.0, 0.5])
  w, b = q * scales, r.normal(size=D)
  x = r.normal(size=(4, D)) * 1.5
  post_var = 1.0 / (1.0 + scales ** 2 / SIGMA ** 2)
  post_mean = (x - b) @ w * post_var / SIGMA ** 2
  marginal_cov = w @ w.T + SIGMA ** 2 * np.eye(D)
  sign, logdet = np.linalg.slogdet(marginal_cov)
  diff = x - b
  log_px = -0.5 * (np.einsum("nd,de,ne->n", diff, np.linalg.inv(marginal_cov), diff) + logdet + D * math.log(2 * math.pi))
  decode = lambda z: z @ jnp.asarray(w.T, jnp.float32) + jnp.asarray(b, jnp.float32)   # noqa: E731
  return x, w, b, post_mean, post_var, log_px, decode


def test_kl_matches_closed_form():
  mean, logvar = np.array([[0.3, -1.0]]), np.array([[0.2, -0.7]])
  var = np.exp(logvar)
  expected = 0.5 * np.sum(var + mean ** 2 - 1 - logvar)         # KL(N(m, v) || N(0, 1)), textbook form
  np.testing.assert_allclose(vae.gaussian_kl(jnp.asarray(mean), jnp.asarray(logvar)), [expected], rtol=1e-6)


def test_elbo_equals_closed_form_of_linear_gaussian_model():
  x, w, b, _, _, _, decode = _linear_gaussian()
  mean = np.array([[0.2, -0.1, 0.4]] * len(x))
  logvar = np.log(np.array([[0.3, 0.5, 0.9]] * len(x)))
  # E_q log N(x; Wz + b, σ²I) = -D/2 log(2πσ²) - (|x - Wm - b|² + Σ_j v_j |W_j|²) / (2σ²); minus the analytic KL.
  resid = x - mean @ w.T - b
  expected_ll = (-0.5 * D * math.log(2 * math.pi * SIGMA ** 2)
                 - (np.sum(resid ** 2, 1) + np.exp(logvar) @ np.sum(w ** 2, 0)) / (2 * SIGMA ** 2))
  expected = expected_ll - 0.5 * np.sum(np.exp(logvar) + mean ** 2 - 1 - logvar, 1)
  eps = jax.random.normal(jax.random.PRNGKey(0), (200_000, 1, K))
  ll, kl = jax.vmap(lambda e: vae.elbo_terms(jnp.asarray(x, jnp.float32), jnp.asarray(mean, jnp.float32),
                                             jnp.asarray(logvar, jnp.float32), decode, e, "gaussian", SIGMA))(eps)
  estimate = np.asarray(jnp.mean(ll - kl, axis=0))
  np.testing.assert_allclose(estimate, expected, atol=0.05)   # Monte Carlo s.e. ≈ 0.01 at 200k samples


def test_importance_weight_with_true_posterior_is_exact_log_likelihood():
  x, _, _, post_mean, post_var, log_px, decode = _linear_gaussian()
  for seed in range(3):   # any eps: with q = p(z|x) every weight equals p(x)
    eps = jax.random.normal(jax.random.PRNGKey(seed), (len(x), K))
    log_w = vae.log_importance_weight(jnp.asarray(x, jnp.float32), jnp.asarray(post_mean, jnp.float32),
                                      jnp.asarray(np.log(post_var) * np.ones_like(post_mean), jnp.float32),
                                      decode, eps, "gaussian", SIGMA)
    np.testing.assert_allclose(np.asarray(log_w), log_px, atol=2e-4)


def test_bernoulli_likelihood_matches_formula():
  x = jnp.array([[[[0.0], [1.0]], [[0.25], [0.6]]]])
  logits = jnp.array([[[[0.5], [-1.0]], [[2.0], [0.0]]]])
  p = 1 / (1 + np.exp(-np.asarray(logits)))
  expected = np.sum(np.asarray(x) * np.log(p) + (1 - np.asarray(x)) * np.log(1 - p))
  np.testing.assert_allclose(vae.log_likelihood(x, logits, "bernoulli"), [expected], rtol=1e-6)


def test_task_iw_nll_bounds_negative_elbo():
  c = tiny_vae_config()
  c.model.iw_samples = 256
  task = vae.task(c)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(8, 8, 8, 1)), jnp.float32)
  batch = {"image": x, "label": jnp.zeros(8, jnp.int32), "example_id": jnp.arange(8)}
  params = task.init(jax.random.PRNGKey(0), batch)
  m = task.evaluate(params, batch, jax.random.PRNGKey(1))
  assert m["iw_nll_nats"] <= -m["elbo_nats"] + 1e-3
  np.testing.assert_allclose(m["bits_per_dim"], -m["elbo_nats"] / (64 * math.log(2)), rtol=1e-6)


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_model_shapes(shape):
  model = vae.VAE(image_shape=shape, latent_dim=5, channels=(8, 16), hidden=16)
  x = jnp.zeros((2,) + shape)
  params = model.init(jax.random.PRNGKey(0), x, jnp.zeros((2, 5)))["params"]
  mean, logvar = model.apply({"params": params}, x, method="encode")
  assert mean.shape == logvar.shape == (2, 5)
  assert model.apply({"params": params}, mean, method="decode").shape == (2,) + shape


def test_indivisible_image_is_a_clear_error():
  model = vae.VAE(image_shape=(28, 28, 1), channels=(8, 16, 32))
  with pytest.raises(ValueError, match="not divisible by 2\\*\\*len\\(channels\\)=8"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1, 16)))


def test_task_interpolates_between_test_images_and_says_what_it_cannot_do():
  from genjax.errors import UserError
  c = tiny_vae_config()
  task = vae.task(c)
  x = jnp.zeros((1, 8, 8, 1))
  params = task.init(jax.random.PRNGKey(0), {"image": x})
  grid, cols = task.interpolate(params, jax.random.PRNGKey(1))
  assert cols == 8 and grid.shape == (64, 8, 8, 1)
  expect, _ = vae.interpolation_images(c, params, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(grid, expect)
  with pytest.raises(UserError, match=r"interpolation grid takes no options, got \['label'\]"):
    task.interpolate(params, jax.random.PRNGKey(1), label=3)
  assert task.capabilities() == ("sample_images", "interpolate", "evaluate")
  with pytest.raises(UserError, match=r"^--init_image needs a model that can edit images; this run's can: sample "
                                      r"images, interpolate, evaluate$"):
    task.require("edit", "--init_image")
