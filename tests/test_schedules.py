"""Tests for genjax.samplers.schedules: sigma <-> t maps, float timesteps, scaled_linear, zero terminal SNR,
prediction aliases. References are float64 numpy written out here from the formulas, not from the library."""

import jax.numpy as jnp
import numpy as np
import pytest

from genjax.errors import UserError
from genjax.samplers.schedules import NoiseSchedule, check_prediction

LIN = NoiseSchedule.linear(1000, 1e-4, 0.02)
ABAR64 = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
LOG_SIGMA64 = 0.5 * np.log((1.0 - ABAR64) / ABAR64)


def test_t_to_sigma_integer_timesteps_match_formula():
  t = np.array([0, 1, 17, 500, 998, 999])
  np.testing.assert_allclose(np.asarray(LIN.t_to_sigma(jnp.asarray(t))), np.exp(LOG_SIGMA64[t]), rtol=2e-5)


def test_t_to_sigma_float_timesteps_interpolate_log_sigma():
  # k-diffusion's convention: log sigma linear in t between the neighbouring integer timesteps.
  t = np.array([0.25, 3.5, 499.9, 998.75])
  lo = np.floor(t).astype(int)
  w = t - lo
  want = np.exp((1 - w) * LOG_SIGMA64[lo] + w * LOG_SIGMA64[lo + 1])
  np.testing.assert_allclose(np.asarray(LIN.t_to_sigma(jnp.asarray(t, jnp.float32))), want, rtol=2e-5)


def test_sigma_to_t_inverts_t_to_sigma_and_clamps():
  t = jnp.asarray([0.0, 0.5, 12.25, 640.0, 998.5, 999.0], jnp.float32)
  back = LIN.sigma_to_t(LIN.t_to_sigma(t))
  assert back.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(back), np.asarray(t), atol=2e-3)
  assert LIN.sigma_to_t(1e-6) == 0.0 and LIN.sigma_to_t(1e6) == 999.0


def test_float_t_alpha_sigma_matches_integer_table_and_sigma():
  ti = jnp.asarray([0, 250, 999])
  ai, si = LIN.alpha_sigma(ti)
  af, sf = LIN.alpha_sigma(ti.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(af), np.asarray(ai), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sf), np.asarray(si), rtol=1e-5)
  tf = jnp.asarray([10.5, 700.3], jnp.float32)
  a, s = LIN.alpha_sigma(tf)
  np.testing.assert_allclose(np.asarray(s / a), np.asarray(LIN.t_to_sigma(tf)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(a ** 2 + s ** 2), 1.0, rtol=1e-6)
  a, s = LIN.alpha_sigma(jnp.asarray([-1.0]))  # negative = clean data
  assert float(a[0]) == 1.0 and float(s[0]) == 0.0


def test_scaled_linear_is_stable_diffusions_schedule():
  sched = NoiseSchedule.scaled_linear()
  # Stable Diffusion's scheduler config: beta_start 0.00085, beta_end 0.012, betas linear in sqrt(beta).
  want = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
  np.testing.assert_allclose(np.asarray(sched.betas), want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), np.cumprod(1 - want), rtol=1e-5)


def test_zero_terminal_snr_rescaling_lin_et_al():
  plain = NoiseSchedule.scaled_linear()
  z = NoiseSchedule.scaled_linear(zero_terminal_snr=True)
  # Lin et al. 2024, Algorithm 1, in float64: shift sqrt(abar) to end at 0, scale to keep sqrt(abar_0).
  r = np.sqrt(np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2))
  r = (r - r[-1]) * r[0] / (r[0] - r[-1])
  np.testing.assert_allclose(np.asarray(z.alphas_cumprod), r ** 2, rtol=1e-4, atol=1e-12)
  assert float(z.alphas_cumprod[-1]) == 0.0 and float(z.betas[-1]) == 1.0
  assert float(z.log_snr[-1]) == -np.inf and np.isfinite(np.asarray(z.log_snr[:-1])).all()
  np.testing.assert_allclose(float(z.alphas_cumprod[0]), float(plain.alphas_cumprod[0]), rtol=1e-6)
  a, s = z.alpha_sigma(jnp.asarray([999]))
  assert float(a[0]) == 0.0 and float(s[0]) == 1.0
  # v-prediction stays well defined at the pure-noise end: x0 = alpha x - sigma v = -v.
  x0, eps = z.split_prediction(jnp.full((1, 2), 0.7), jnp.ones((1, 2)), jnp.asarray([999]), "v_prediction")
  np.testing.assert_allclose(np.asarray(x0), -0.7)
  np.testing.assert_allclose(np.asarray(eps), 1.0)


def test_prediction_aliases_and_errors():
  assert check_prediction("v_prediction") == "v" and check_prediction("sample") == "x0"
  assert check_prediction("epsilon") == "epsilon"
  x0 = jnp.full((2, 3), 0.2)
  noise = jnp.ones((2, 3))
  t = jnp.asarray([5, 900])
  np.testing.assert_array_equal(np.asarray(LIN.training_target(x0, noise, t, "v_prediction")),
                                np.asarray(LIN.training_target(x0, noise, t, "v")))
  with pytest.raises(UserError, match="prediction='eps'.*epsilon, v, x0, v_prediction, sample"):
    check_prediction("eps")
  with pytest.raises(UserError, match="beta_start"):
    NoiseSchedule.scaled_linear(beta_start=0.1, beta_end=0.01)
