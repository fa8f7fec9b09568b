"""Tests for genjax.samplers.edm (Karras et al. 2022 Euler / Heun with churn, Euler-ancestral) on closed forms.

Gaussian data x0 ~ N(mu, s^2) has the optimal VP noise prediction eps(x, t) = sqrt(1 - a)(x - sqrt(a) mu) /
(a s^2 + 1 - a), a = alpha-bar at (float) t. In EDM variables (x = x_t / sqrt(a), sigma^2 = (1 - a) / a) the
denoiser is D = mu + k (x - mu), k = s^2 / (s^2 + sigma^2), and the probability-flow ODE has the exact solution
x - mu proportional to sqrt(s^2 + sigma^2): the exact map from x_T (the VP state at sigma_max) to x0 is affine,
x0 = mu + s (x_T sqrt(1 + sigma_max^2) - mu) / sqrt(s^2 + sigma_max^2). Every step of every sampler here is affine in
x plus Gaussian noise, so the exact output law of a stochastic sampler is computed below in float64 numpy from the
algorithm's formulas (not from the library), then compared with samples.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from genjax.compiles import CompileCounter
from genjax.errors import UserError
from genjax.samplers.edm import euler_ancestral_sample, euler_sample, heun_sample, karras_sigmas
from genjax.samplers.schedules import NoiseSchedule

MU, S = 0.3, 0.5
SCHED = NoiseSchedule.linear(num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
SIGMA_MIN, SIGMA_MAX = (float(np.exp(SCHED.log_sigmas[i])) for i in (0, -1))


def gaussian_model(mu, s, x, t, prediction="epsilon"):
  """The optimal eps / v / x0 prediction for N(mu, s^2) data at float (or int) timesteps t [B]."""
  a = jnp.exp(SCHED.log_alpha_bar(t)).reshape((-1,) + (1,) * (x.ndim - 1))
  eps = jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * s * s + 1 - a)
  x0 = mu + jnp.sqrt(a) * s * s * (x - jnp.sqrt(a) * mu) / (a * s * s + 1 - a)
  return {"epsilon": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[prediction]


MODEL = Partial(gaussian_model, jnp.float32(MU), jnp.float32(S))
X_LINE = jnp.linspace(-2.5, 2.5, 32, dtype=jnp.float32)[:, None]


def exact_map(x_T, sigma_max=SIGMA_MAX):
  x_sigma = np.asarray(x_T, np.float64) * math.sqrt(1 + sigma_max ** 2)  # the VP state x_T in EDM variables
  return MU + S * (x_sigma - MU) / math.sqrt(S ** 2 + sigma_max ** 2)


def max_error(out, x_T=X_LINE):
  return float(np.max(np.abs(np.asarray(out, np.float64) - exact_map(x_T))))


def slope(ns, errors):
  return -np.polyfit(np.log(ns), np.log(errors), 1)[0]


def test_euler_and_heun_converge_to_the_exact_flow_map_with_orders_one_and_two():
  ns = [10, 20, 40, 80]
  euler, heun = [max_error(euler_sample(MODEL, SCHED, X_LINE, num_steps=5))], []
  with CompileCounter() as cc:  # after euler's first call: heun's program, then nothing for any num_steps
    euler = [max_error(euler_sample(MODEL, SCHED, X_LINE, num_steps=n)) for n in ns]
    heun = [max_error(heun_sample(MODEL, SCHED, X_LINE, num_steps=n)) for n in ns]
  assert cc.count == 1, cc.count
  # Measured: Euler 0.42 -> 0.057 (slope 0.97); Heun 0.38 -> 0.0034 (slope 2.3).
  assert 0.85 < slope(ns, euler) < 1.15, euler
  assert 1.8 < slope(ns, heun) < 2.6, heun
  assert heun[-1] < 0.005 and euler[-1] < 0.07


def test_predictions_and_explicit_grids_agree():
  ref = heun_sample(MODEL, SCHED, X_LINE, num_steps=12)
  for p in ("v", "x0", "v_prediction", "sample"):
    model = Partial(gaussian_model, jnp.float32(MU), jnp.float32(S), prediction={"v_prediction": "v",
                                                                                 "sample": "x0"}.get(p, p))
    np.testing.assert_allclose(heun_sample(model, SCHED, X_LINE, num_steps=12, prediction=p), ref, atol=2e-4)
  # The default grid is Karras et al.'s rho = 7 grid over the schedule's sigma range, as float timesteps.
  sig = np.asarray(karras_sigmas(12, SIGMA_MIN, SIGMA_MAX))
  assert sig[0] == pytest.approx(SIGMA_MAX, rel=1e-5) and sig[11] == pytest.approx(SIGMA_MIN, rel=1e-5)
  assert sig[-1] == 0
  ts = np.asarray(SCHED.sigma_to_t(sig[:-1]))
  np.testing.assert_allclose(heun_sample(MODEL, SCHED, X_LINE, timesteps=ts), ref, atol=2e-3)


def test_quantize_passes_integer_timesteps():
  seen = []

  def int_only(x, t):
    seen.append(t.dtype)
    return MODEL(x, t)

  out = heun_sample(int_only, SCHED, X_LINE, num_steps=40, quantize=True)
  assert set(seen) == {jnp.dtype(jnp.int32)}
  assert max_error(out) < 0.03


def ancestral_law(sigmas, eta=1.0, s_noise=1.0):
  """(mean, var) of euler_ancestral_sample's output for x_T ~ N(0, 1): y = x - mu evolves as
  y' = (1 + (sigma_down - sigma)(1 - k) / sigma) y + s_noise sigma_up z."""
  m, v = -MU, 1.0 + sigmas[0] ** 2
  for sig, nxt in zip(sigmas[:-1], sigmas[1:]):
    up = min(nxt, eta * math.sqrt(nxt ** 2 * (sig ** 2 - nxt ** 2) / sig ** 2))
    down = math.sqrt(nxt ** 2 - up ** 2)
    k = S ** 2 / (S ** 2 + sig ** 2)
    a = 1 + (down - sig) * (1 - k) / sig
    m, v = a * m, a * a * v + (s_noise * up) ** 2
  return MU + m, v


def heun_churn_law(sigmas, s_churn, s_tmin, s_tmax, s_noise=1.0):
  """(mean, var) of heun_sample's output with churn (Algorithm 2), x_T ~ N(0, 1)."""
  n = len(sigmas) - 1
  m, v = -MU, 1.0 + sigmas[0] ** 2
  for i, (sig, nxt) in enumerate(zip(sigmas[:-1], sigmas[1:])):
    gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sig <= s_tmax else 0.0
    hat = sig * (1 + gamma)
    v = v + (hat ** 2 - sig ** 2) * s_noise ** 2
    k_hat = S ** 2 / (S ** 2 + hat ** 2)
    d1 = (1 - k_hat) / hat
    if i == n - 1:  # Euler to sigma = 0
      a = 1 + (nxt - hat) * d1
    else:
      k_next = S ** 2 / (S ** 2 + nxt ** 2)
      a = 1 + (nxt - hat) * 0.5 * (d1 + (1 - k_next) / nxt * (1 + (nxt - hat) * d1))
    m, v = a * m, a * a * v
  return MU + m, v


N_DRAWS = 20000
X_DRAWS = jax.random.normal(jax.random.key(0), (N_DRAWS, 1), jnp.float32)


def check_law(out, mean, var):
  out = np.asarray(out, np.float64)[:, 0]
  se_mean, se_var = math.sqrt(var / N_DRAWS), var * math.sqrt(2.0 / N_DRAWS)
  assert abs(out.mean() - mean) < 4 * se_mean + 1e-4, (out.mean(), mean)
  assert abs(out.var() - var) < 4 * se_var, (out.var(), var)


def test_euler_ancestral_has_the_exact_chain_law_and_tends_to_the_data_law():
  for n in (10, 40):
    sig = np.asarray(karras_sigmas(n, SIGMA_MIN, SIGMA_MAX), np.float64)
    out = euler_ancestral_sample(MODEL, SCHED, X_DRAWS, num_steps=n, rng=jax.random.key(n))
    check_law(out, *ancestral_law(sig))
  # The chain law tends to N(mu, s^2) as steps grow (first order: var 0.087 / 0.165 / 0.223 / 0.246 at
  # 10 / 40 / 160 / 1000 steps).
  laws = [ancestral_law(np.asarray(karras_sigmas(n, SIGMA_MIN, SIGMA_MAX), np.float64))[1] for n in (40, 160, 1000)]
  assert S ** 2 - laws[0] > S ** 2 - laws[1] > S ** 2 - laws[2] and abs(laws[2] - S ** 2) < 0.01


def test_heun_churn_has_the_exact_chain_law_and_tends_to_the_data_law():
  churn = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0)
  for n in (8, 30):
    sig = np.asarray(karras_sigmas(n, SIGMA_MIN, SIGMA_MAX), np.float64)
    out = heun_sample(MODEL, SCHED, X_DRAWS, num_steps=n, rng=jax.random.key(n), **churn)
    check_law(out, *heun_churn_law(sig, **churn))
  big = heun_sample(MODEL, SCHED, X_DRAWS, num_steps=200, rng=jax.random.key(1), **churn)
  assert abs(float(big.mean()) - MU) < 0.01 and abs(float(big.std()) - S) < 0.01
  # s_churn = 0 is the deterministic ODE whatever the rng.
  np.testing.assert_allclose(heun_sample(MODEL, SCHED, X_LINE, num_steps=10, rng=jax.random.key(3)),
                             heun_sample(MODEL, SCHED, X_LINE, num_steps=10), atol=1e-6)


def _diffusers_karras(scheduler_cls, num_steps):
  """diffusers' PyTorch Euler / Heun scheduler (Karras sigmas) driven by the same model from the same start."""
  import torch
  sch = scheduler_cls(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                      use_karras_sigmas=True)
  sch.set_timesteps(num_steps)
  x = torch.tensor(np.asarray(X_LINE), dtype=torch.float64) * float(np.sqrt(1 + float(sch.sigmas[0]) ** 2))
  for t in sch.timesteps:
    x_in = sch.scale_model_input(x, t).numpy()
    eps = MODEL(jnp.asarray(x_in, jnp.float32), jnp.full((x_in.shape[0],), float(t), jnp.float32))
    x = sch.step(torch.tensor(np.asarray(eps), dtype=torch.float64), t, x).prev_sample
  return x.numpy(), len(sch.timesteps)


def test_euler_and_heun_equal_diffusers_karras_schedulers():
  diffusers = pytest.importorskip("diffusers")
  for cls, fn, calls in ((diffusers.EulerDiscreteScheduler, euler_sample, 12),
                         (diffusers.HeunDiscreteScheduler, heun_sample, 23)):
    ref, n_calls = _diffusers_karras(cls, 12)
    assert n_calls == calls  # Heun: 2 n - 1 model calls, the last step Euler's, in diffusers too
    # Measured: 1.5e-6 (Euler), 5e-7 (Heun): same sigmas, same float-t convention, same update.
    np.testing.assert_allclose(fn(MODEL, SCHED, X_LINE, num_steps=12), ref, atol=2e-5)


def test_model_calls_per_step():
  calls = []

  def counting(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return MODEL(x, t)

  for fn, kw, expected in [(euler_sample, {}, 7), (heun_sample, {}, 13),
                           (euler_ancestral_sample, {"rng": jax.random.key(0)}, 7)]:
    calls.clear()
    jax.block_until_ready(fn(counting, SCHED, X_LINE, num_steps=7, **kw))
    jax.effects_barrier()
    assert len(calls) == expected, (fn.__name__, len(calls))


def test_runtime_options_compile_nothing():
  key = jax.random.key(0)
  heun_sample(MODEL, SCHED, X_LINE, num_steps=5, rng=key, s_churn=1.0)
  euler_ancestral_sample(MODEL, SCHED, X_LINE, num_steps=5, rng=key)
  keys = [jax.random.fold_in(key, i) for i in range(3)]
  with CompileCounter() as cc:
    for i, n in enumerate((3, 9, 17)):
      heun_sample(MODEL, SCHED, X_LINE, num_steps=n, rng=keys[i], s_churn=10.0 * i,
                  s_tmin=0.01 * i, s_tmax=10.0 + i, s_noise=1.0 + 0.01 * i, rho=5.0 + i, sigma_min=0.02 + 0.01 * i,
                  sigma_max=80.0 + i)
      euler_ancestral_sample(MODEL, SCHED, X_LINE, num_steps=n, rng=key, eta=0.5 + 0.2 * i, s_noise=0.9 + 0.05 * i)
  assert cc.count == 0


@pytest.mark.parametrize("call, match", [
    (lambda: heun_sample(MODEL, SCHED, X_LINE, num_steps=5, s_churn=1.0), "needs rng"),
    (lambda: euler_ancestral_sample(MODEL, SCHED, X_LINE, num_steps=5, rng=None), "needs rng"),
    (lambda: euler_sample(MODEL, SCHED, X_LINE, num_steps=0), "num_steps must be an int >= 1"),
    (lambda: euler_sample(MODEL, SCHED, X_LINE), "needs num_steps"),
    (lambda: heun_sample(MODEL, SCHED, X_LINE, num_steps=5, s_churn=-1.0, rng=jax.random.key(0)), "s_churn"),
    (lambda: heun_sample(MODEL, SCHED, X_LINE, num_steps=5, sigma_min=2.0, sigma_max=1.0), "sigma_min < sigma_max"),
    (lambda: heun_sample(MODEL, SCHED, X_LINE, num_steps=5, spacing="karas"), "karras"),
    (lambda: heun_sample(MODEL, SCHED, X_LINE, num_steps=5, quantize=1), "quantize"),
    (lambda: euler_ancestral_sample(MODEL, SCHED, X_LINE, num_steps=5, rng=jax.random.key(0), eta=2.0), "eta"),
])
def test_bad_arguments_raise_one_clear_error(call, match):
  with pytest.raises(UserError, match=match):
    call()
