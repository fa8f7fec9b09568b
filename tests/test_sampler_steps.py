"""Step placement, the step-level API, DDPM variances, dynamic thresholding, guidance extras and the call shape.

Closed forms: the DDPM posterior q(x_t' | x_t, x0) (mean and variance written out here in float64), Imagen's
thresholding rule (numpy quantiles), diffusers' timestep grids and guidance rescale (computed as diffusers does).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from genjax.compiles import CompileCounter
from genjax.errors import UserError
from genjax.samplers import (NoiseSchedule, SamplerState, classifier_free_guidance, ddim_sample, ddim_step,
                             ddpm_sample, ddpm_step, denoise, dpm_solver_sample, dpm_solver_step, make_timesteps,
                             unipc_sample)

MU, S = 0.3, 0.5
SCHED = NoiseSchedule.linear(1000, 1e-4, 0.02)
ABAR64 = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
X_T = jax.random.normal(jax.random.key(0), (8, 1))


def gaussian_eps(x, t, schedule=SCHED):
  a = (schedule.alpha_sigma(t)[0] ** 2).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * S * S + 1 - a)


MODEL = Partial(gaussian_eps)


# --------------------------------------------------------------------------------------------- spacings
def test_spacings_match_diffusers_grids():
  """diffusers' DDIMScheduler grids, written out as diffusers computes them (numpy, float64)."""
  T = 1000
  for n in (1, 7, 10, 50):
    leading = (np.arange(0, n) * (T // n)).round()[::-1] + 1
    trailing = np.round(np.arange(T, 0, -T / n)) - 1
    linspace = np.linspace(0, T - 1, n).round()[::-1]
    np.testing.assert_array_equal(make_timesteps(SCHED, n, "leading", steps_offset=1), leading)
    np.testing.assert_array_equal(make_timesteps(SCHED, n, "trailing"), trailing)
    np.testing.assert_array_equal(make_timesteps(SCHED, n, "linspace"), linspace)


def test_karras_spacing_is_rho_7_in_sigma():
  ts = make_timesteps(SCHED, 12, "karras")
  assert ts.dtype == jnp.float32 and float(ts[0]) == 999.0
  sig = np.asarray(SCHED.t_to_sigma(ts), np.float64)
  smax, smin = np.exp(np.float64(SCHED.log_sigmas[-1])), np.exp(np.float64(SCHED.log_sigmas[0]))
  ramp = np.linspace(0, 1, 12)
  want = (smax ** (1 / 7) + ramp * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7  # Karras et al. 2022, eq. 5
  np.testing.assert_allclose(sig, want, rtol=2e-4)


def test_explicit_timesteps_equal_the_spacing_they_spell():
  for spacing in ("leading", "log_snr"):
    ts = np.asarray(make_timesteps(SCHED, 9, spacing, steps_offset=1 if spacing == "leading" else 0))
    np.testing.assert_array_equal(
        ddim_sample(MODEL, SCHED, X_T, timesteps=ts),
        ddim_sample(MODEL, SCHED, X_T, num_steps=9, spacing=spacing, steps_offset=1 if spacing == "leading" else 0))
  # int grid == the same grid as floats (float t = k is int k)
  ts = np.array([999, 700, 400, 120, 3])
  np.testing.assert_allclose(dpm_solver_sample(MODEL, SCHED, X_T, timesteps=ts),
                             dpm_solver_sample(MODEL, SCHED, X_T, timesteps=ts.astype(np.float32)), atol=1e-5)
  for bad in ([5, 10], [999, 999], [1000, 3], [[999, 3]]):
    with pytest.raises(UserError, match="timesteps"):
      ddim_sample(MODEL, SCHED, X_T, timesteps=np.array(bad))
  with pytest.raises(UserError, match="disagrees"):
    ddim_sample(MODEL, SCHED, X_T, timesteps=ts, num_steps=4)
  with pytest.raises(UserError, match="spacing='uniform' is not one of"):
    ddim_sample(MODEL, SCHED, X_T, spacing="uniform")
  with pytest.raises(UserError, match="steps_offset"):
    ddim_sample(MODEL, SCHED, X_T, num_steps=1000, spacing="leading", steps_offset=1)


# --------------------------------------------------------------------------------------------- hand-written loops
def test_hand_written_loops_equal_the_samplers():
  ts = make_timesteps(SCHED, 12, "log_snr")
  for step, sample, kw in ((ddim_step, ddim_sample, {}), (dpm_solver_step, dpm_solver_sample, {"order": 2})):
    state = SamplerState.init(X_T)
    for i in range(len(ts)):
      t, t_next = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
      state = step(SCHED, state, MODEL(state.x, jnp.full((8,), t)), t, t_next, **kw)
    want = sample(MODEL, SCHED, X_T, timesteps=np.asarray(ts), **({"lower_order_final": False} if kw else {}))
    np.testing.assert_allclose(state.x, want, atol=1e-5)


# --------------------------------------------------------------------------------------------- DDPM variances
def test_ddpm_step_is_the_posterior_with_each_variance():
  x = jnp.linspace(-1.5, 1.5, 8)[:, None]
  x0 = jnp.full((8, 1), 0.4)
  t, t_next = 600, 450
  a, an = ABAR64[t], ABAR64[t_next]
  beta = 1 - a / an
  mean = (np.sqrt(an) * beta * 0.4 + np.sqrt(a / an) * (1 - an) * np.asarray(x)) / (1 - a)  # Ho et al. eq. 7
  small = beta * (1 - an) / (1 - a)
  state = SamplerState.init(x)
  run = lambda variance, noise, out=x0: ddpm_step(SCHED, state, out, jnp.int32(t), jnp.int32(t_next), noise=noise,
                                                  prediction="x0", variance=variance).x
  zeros, ones = jnp.zeros_like(x), jnp.ones_like(x)
  for variance, var in (("fixed_small", small), ("fixed_large", beta)):
    np.testing.assert_allclose(run(variance, zeros), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run(variance, ones) - run(variance, zeros), np.sqrt(var), rtol=1e-4)
  for v, var in ((-1.0, small), (1.0, beta), (0.0, np.sqrt(small * beta))):  # log-linear in (v + 1) / 2
    out = jnp.concatenate([x0, jnp.full_like(x0, v)], axis=-1)
    np.testing.assert_allclose(run("learned_range", ones, out) - run("learned_range", zeros, out), np.sqrt(var),
                               rtol=1e-4)
  # The step to the clean sample adds no noise whatever the variance type.
  last = ddpm_step(SCHED, state, x0, jnp.int32(3), jnp.int32(-1), noise=ones, prediction="x0",
                   variance="fixed_large")
  np.testing.assert_allclose(last.x, x0)


def test_ddpm_learned_range_sampler_matches_fixed_variances():
  key = jax.random.key(5)
  for v, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
    learned = Partial(lambda v, x, t: jnp.concatenate([gaussian_eps(x, t), jnp.full_like(x, v)], -1), v)
    np.testing.assert_allclose(ddpm_sample(learned, SCHED, X_T, rng=key, num_steps=30, variance="learned_range"),
                               ddpm_sample(MODEL, SCHED, X_T, rng=key, num_steps=30, variance=fixed), atol=1e-5)
  with pytest.raises(UserError, match="variance='fixed' is not one of"):
    ddpm_sample(MODEL, SCHED, X_T, rng=key, variance="fixed")
  with pytest.raises(UserError, match="learned_range"):
    ddpm_sample(MODEL, SCHED, X_T, rng=key, num_steps=3, variance="learned_range")


def test_fixed_large_ddpm_reproduces_the_gaussian_roughly():
  x_T = jax.random.normal(jax.random.key(1), (20000, 1))
  x0 = np.asarray(ddpm_sample(MODEL, SCHED, x_T, rng=jax.random.key(2), variance="fixed_large"))
  # Ho et al. 2020: both fixed variances give the data distribution as steps grow; at T = 1000 the larger one is
  # a little wide (measured std 0.507).
  assert abs(x0.mean() - MU) < 0.012 and abs(x0.std() - S) < 0.015, (x0.mean(), x0.std())


# --------------------------------------------------------------------------------------------- thresholding
def test_dynamic_threshold_is_imagens_rule_on_a_0_1_scale():
  rows = np.stack([np.linspace(-3, 3, 50), np.linspace(-0.5, 0.8, 50), np.linspace(-9, 1, 50)])[..., None]
  x = jnp.zeros_like(jnp.asarray(rows, jnp.float32))
  x0, eps = denoise(SCHED, jnp.asarray(rows, jnp.float32), x, jnp.int32(10), prediction="x0",
                    dynamic_threshold=0.9, threshold_max=5.0)
  s = np.clip(np.quantile(np.abs(rows.reshape(3, -1)), 0.9, axis=1), 1.0, 5.0)[:, None, None]
  np.testing.assert_allclose(x0, np.clip(rows, -s, s) / s, rtol=1e-5)
  assert float(s[1, 0, 0]) == 1.0 and float(s[2, 0, 0]) == 5.0  # the clamp to [1, threshold_max] is exercised
  alpha, sigma = np.sqrt(ABAR64[10]), np.sqrt(1 - ABAR64[10])
  np.testing.assert_allclose(eps, (0 - alpha * np.asarray(x0)) / sigma, rtol=1e-5)  # eps consistent with x0
  with pytest.raises(UserError, match="0.995, not 99.5"):
    ddim_sample(MODEL, SCHED, X_T, dynamic_threshold=99.5)
  out = ddim_sample(MODEL, SCHED, 4 * X_T, num_steps=10, dynamic_threshold=0.9)
  assert np.abs(np.asarray(out)).max() <= 1.0 + 1e-6


# --------------------------------------------------------------------------------------------- guidance extras
def cond_model(x, t, labels):
  lab = labels[:, None].astype(jnp.float32)
  return x * (0.5 + 0.2 * lab) + lab + t[:, None].astype(jnp.float32) * 1e-3


def test_guidance_rescale_and_interval():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6)), jnp.float32)
  labels = jnp.arange(4)
  c = np.asarray(cond_model(x, jnp.full((4,), 500), labels))
  u = np.asarray(cond_model(x, jnp.full((4,), 500), jnp.full((4,), -1)))
  g = u + 3.0 * (c - u)
  # diffusers' rescale_noise_cfg: per-example std over the non-batch axes, then a phi-blend.
  rescaled = g * c.std(axis=1, keepdims=True) / g.std(axis=1, keepdims=True)
  for phi in (0.0, 0.7, 1.0):
    got = classifier_free_guidance(cond_model, 3.0, -1, labels, rescale=phi)(x, jnp.full((4,), 500))
    np.testing.assert_allclose(got, phi * rescaled + (1 - phi) * g, rtol=1e-5, atol=1e-5)
  windowed = classifier_free_guidance(cond_model, 3.0, -1, labels, interval=(100, 600))
  np.testing.assert_allclose(windowed(x, jnp.full((4,), 500)), g, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(windowed(x, jnp.full((4,), 700)), cond_model(x, jnp.full((4,), 700), labels),
                             rtol=1e-6)
  with pytest.raises(UserError, match="rescale"):
    classifier_free_guidance(cond_model, 3.0, -1, labels, rescale=1.5)
  with pytest.raises(UserError, match="t_lo <= t_hi"):
    classifier_free_guidance(cond_model, 3.0, -1, labels, interval=(600, 100))


# --------------------------------------------------------------------------------------------- runtime options
def test_float_options_grids_and_guidance_extras_compile_nothing():
  cond = Partial(cond_model)
  key = jax.random.key(3)
  calls = [
      lambda i: ddim_sample(MODEL, SCHED, X_T, num_steps=(5, 9, 30)[i], spacing="leading",
                            steps_offset=(1, 0, 2)[i], eta=(0.0, 0.5, 1.0)[i], rng=key,
                            dynamic_threshold=(0.9, 0.99, 0.995)[i], threshold_max=(1.0, 2.0, 3.0)[i]),
      lambda i: ddpm_sample(MODEL, SCHED, X_T, rng=key, timesteps=[(999, 500, 3), (999, 1), (700, 600, 5, 2)][i],
                            variance="fixed_large", clip_denoised=(-1.0 - i, 1.0 + i)),
      lambda i: unipc_sample(MODEL, SCHED, X_T, num_steps=(4, 8, 16)[i], spacing="karras"),
      lambda i: ddim_sample(classifier_free_guidance(cond, (1.0, 3.0, 7.5)[i], -1, jnp.arange(8) % 3,
                                                     rescale=(0.0, 0.5, 0.7)[i], interval=(0, (200, 500, 999)[i])),
                            SCHED, X_T, num_steps=(5, 10, 20)[i]),
  ]
  for call in calls:
    call(0).block_until_ready()
  with CompileCounter() as compiles:
    for call in calls:
      for i in (1, 2):
        call(i).block_until_ready()
  assert compiles.count == 0


def test_one_call_shape_keyword_only_and_rng_where_noise_is_drawn():
  with pytest.raises(TypeError):
    ddpm_sample(MODEL, SCHED, X_T, jax.random.key(0))  # rng is keyword-only
  with pytest.raises(UserError, match="needs rng"):
    ddpm_sample(MODEL, SCHED, X_T)
  with pytest.raises(UserError, match="order=5 is not one of"):
    unipc_sample(MODEL, SCHED, X_T, order=5)
  for v in ("v_prediction", "sample"):  # diffusers' names
    pred = {"v_prediction": "v", "sample": "x0"}[v]
    model = Partial(lambda p, x, t: SCHED.convert_prediction(gaussian_eps(x, t), x, t, "epsilon", p), pred)
    np.testing.assert_allclose(ddim_sample(model, SCHED, X_T, num_steps=10, prediction=v),
                               ddim_sample(MODEL, SCHED, X_T, num_steps=10), atol=1e-4)


def test_zero_terminal_snr_schedule_samples_with_v_prediction():
  zsnr = NoiseSchedule.linear(1000, 1e-4, 0.02, zero_terminal_snr=True)
  def v_model(x, t):
    a, s = zsnr.alpha_sigma(t)
    a, s = a[:, None], s[:, None]
    var = a * a * S * S + s * s
    x0 = MU + a * S * S * (x - a * MU) / var
    eps = s * (x - a * MU) / var
    return a * eps - s * x0
  x_T = jnp.linspace(-2, 2, 9)[:, None]
  slopes = []
  for n in (25, 100):
    x0 = np.asarray(ddim_sample(v_model, zsnr, x_T, num_steps=n, prediction="v"))
    assert np.all(np.isfinite(x0))
    slope, icpt = np.polyfit(np.asarray(x_T).ravel(), x0.ravel(), 1)
    slopes.append(slope)
    assert abs(icpt - MU) < 0.01, icpt
  # From pure noise (abar = 0) the exact flow is x0 = MU + S x_T; DDIM's first-order error shrinks ~4x.
  e25, e100 = abs(slopes[0] - S), abs(slopes[1] - S)
  assert e100 < 0.02 and e100 < e25 / 3, slopes  # measured 0.056 -> 0.015
  with pytest.raises(UserError, match="zero-terminal-SNR"):
    ddim_sample(MODEL, zsnr, x_T)
