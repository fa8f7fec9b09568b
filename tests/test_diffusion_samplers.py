"""Tests for genjax.samplers (diffusion): schedules, DDPM / DDIM / DPM-Solver++(2M), guidance, compilation.

Driven by the closed-form optimal denoiser for Gaussian data x0 ~ N(mu, s^2):
eps_hat(x, t) = sqrt(1 - a)(x - sqrt(a) mu) / (a s^2 + 1 - a), a = alpha-bar_t. With it every step is affine in x,
so the exact output law of each sampler (as a chain of affine-Gaussian steps) is computed here in float64 numpy,
independently of the library, and the exact target of a perfect sampler is N(mu, s^2).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax.tree_util import Partial

from genjax.compiles import CompileCounter
from genjax.samplers import (NoiseSchedule, classifier_free_guidance, ddim_sample, ddpm_sample,
                             dpm_solver_sample)
from genjax.samplers.spacing import spacing_table

MU, S = 0.3, 0.5
SCHED = NoiseSchedule.linear(num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
ABAR64 = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


def _bc(a, x):
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def gaussian_model(params, x, t, prediction="epsilon", dtype=jnp.float32):
  """Optimal eps / v / x0 prediction for x0 ~ N(params["mu"], params["s"]^2), written out independently and
  computed in `dtype` (bfloat16 mimics a bf16 network)."""
  params = jax.tree_util.tree_map(lambda v: v.astype(dtype), params)
  x = x.astype(dtype)
  a = _bc(params["abar"][t], x)
  mu, s2 = params["mu"], params["s"] ** 2
  eps = jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * s2 + 1 - a)
  x0 = mu + jnp.sqrt(a) * s2 * (x - jnp.sqrt(a) * mu) / (a * s2 + 1 - a)
  return {"epsilon": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[prediction]


def gaussian_params(mu=MU, s=S, schedule=SCHED):
  return {"abar": schedule.alphas_cumprod, "mu": jnp.asarray(mu, jnp.float32), "s": jnp.asarray(s, jnp.float32)}


MODELS = {p: Partial(gaussian_model, prediction=p) for p in ("epsilon", "v", "x0")}
BF16_MODELS = {p: Partial(gaussian_model, prediction=p, dtype=jnp.bfloat16) for p in ("epsilon", "v", "x0")}
EPS_MODEL = Partial(MODELS["epsilon"], gaussian_params())
# Most tests share one x_T shape (and the stable model functions above), so they share compiled programs.
B = 64
X_LINE = jnp.linspace(-2.5, 2.5, B, dtype=jnp.float32)[:, None]


def chain_law(ts, eta, mu=MU, s=S, abar=ABAR64):
  """(slope, intercept, noise var) of the sampler's output as an affine-Gaussian map of x_T, float64 reference.

  DDIM step t -> t' with the optimal x0_hat = mu + k (x - sqrt(a) mu): x' = sqrt(a') x0 + d eps + sigma z.
  eta = 1 is the DDPM posterior q(x_t' | x_t, x0_hat); t' = the next *visited* timestep, -1 = clean.
  """
  A, b, v = 1.0, 0.0, 0.0
  for t, tn in zip(ts, list(ts[1:]) + [-1]):
    a, an = abar[t], (abar[tn] if tn >= 0 else 1.0)
    k = np.sqrt(a) * s * s / (a * s * s + 1 - a)
    x0_slope, x0_icpt = k, mu - k * np.sqrt(a) * mu
    var = eta ** 2 * (1 - an) / (1 - a) * (1 - a / an)
    d = np.sqrt(max(1 - an - var, 0.0))
    slope = np.sqrt(an) * x0_slope + d * (1 - np.sqrt(a) * x0_slope) / np.sqrt(1 - a)
    icpt = np.sqrt(an) * x0_icpt - d * np.sqrt(a) * x0_icpt / np.sqrt(1 - a)
    A, b, v = slope * A, slope * b + icpt, slope ** 2 * v + var
  return A, b, v


def strided(n, T=1000):
  """diffusers' "trailing" grid, written as diffusers computes it (round half to even, in float64)."""
  return (np.round(T - np.arange(n) * (T / n)) - 1).astype(int).tolist()


def exact_slope(s=S):
  """The probability-flow ODE maps x_T ~ N(sqrt(abar_T) mu, abar_T s^2 + 1 - abar_T) onto N(mu, s^2)."""
  return s / np.sqrt(ABAR64[-1] * s * s + 1 - ABAR64[-1])


def affine_fit(x_T, x0):
  slope, icpt = np.polyfit(np.asarray(x_T).ravel(), np.asarray(x0).ravel(), 1)
  resid = np.asarray(x0).ravel() - (slope * np.asarray(x_T).ravel() + icpt)
  return slope, icpt, np.abs(resid).max()





# ------------------------------------------------------------------------------------------------ schedules
def test_linear_and_cosine_schedules():
  assert SCHED.alphas_cumprod.dtype == jnp.float32 and SCHED.num_timesteps == 1000
  np.testing.assert_allclose(np.asarray(SCHED.betas)[[0, -1]], [1e-4, 0.02], rtol=1e-6)
  np.testing.assert_allclose(SCHED.alphas_cumprod, ABAR64, rtol=1e-5)
  np.testing.assert_allclose(1 - np.exp(np.float64(SCHED.log_alphas_cumprod[0])), 1e-4, rtol=1e-5)
  cos = NoiseSchedule.cosine(num_timesteps=100, s=0.008)
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # Nichol & Dhariwal 2021, eq. 17
  np.testing.assert_allclose(cos.alphas_cumprod[:90], f(np.arange(1, 91) / 100) / f(0), rtol=1e-5)
  assert np.all(np.diff(np.asarray(cos.log_snr)) < 0) and np.all(np.isfinite(cos.log_snr))
  for bad in (lambda: NoiseSchedule.linear(0), lambda: NoiseSchedule.linear(10, 0.02, 1e-4),
              lambda: NoiseSchedule.cosine(10, s=0.0), lambda: NoiseSchedule.from_betas([0.1, 1.0])):
    with pytest.raises(ValueError):
      bad()


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_training_targets_and_conversions_round_trip(prediction):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  x0 = jax.random.normal(k1, (6, 3, 2))
  noise = jax.random.normal(k2, (6, 3, 2))
  t = jax.random.randint(k3, (6,), 0, 1000)
  x_t = SCHED.add_noise(x0, noise, t)
  a = ABAR64[np.asarray(t)][:, None, None]
  np.testing.assert_allclose(x_t, np.sqrt(a) * x0 + np.sqrt(1 - a) * noise, rtol=1e-5, atol=1e-6)
  target = SCHED.training_target(x0, noise, t, prediction)
  x0_hat, eps_hat = SCHED.split_prediction(target, x_t, t, prediction)
  np.testing.assert_allclose(eps_hat, noise, atol=2e-3)  # x0-prediction at t~0 divides by sigma ~ 1e-2
  np.testing.assert_allclose(x0_hat, x0, atol=2e-3 if prediction != "x0" else 0)
  for dest in ("epsilon", "v", "x0"):
    np.testing.assert_allclose(SCHED.convert_prediction(target, x_t, t, prediction, dest),
                               SCHED.training_target(x0, noise, t, dest), atol=2e-3)
  with pytest.raises(ValueError, match="not one of"):
    SCHED.training_target(x0, noise, t, "score")


def test_timestep_tables():
  for n in (1, 7, 20, 50, 1000):
    ts = np.asarray(spacing_table(SCHED, jnp.int32(n), "trailing"))
    np.testing.assert_array_equal(ts[:n], strided(n))
    assert np.all(ts[n:] == -1) and ts[0] == 999 and np.all(np.diff(ts[:n]) < 0)
    ls = np.asarray(spacing_table(SCHED, jnp.int32(n), "log_snr"))
    assert ls[0] == 999 and np.all(ls[n:] == -1) and np.all(np.diff(ls[:n]) < 0) and ls[n - 1] >= 0
    if n > 1:
      assert ls[n - 1] == 0
  lam = np.log(ABAR64 / (1 - ABAR64))
  steps = np.diff(lam[np.asarray(spacing_table(SCHED, jnp.int32(20), "log_snr"))[:20]])
  # T-1 (log-SNR -10.1), then uniform from the floor (-6) up to lambda_0, up to integer rounding.
  assert np.allclose(steps[1:], steps[1:].mean(), rtol=0.1) and abs(lam[999] + 10.1) < 0.05, steps
  np.testing.assert_allclose(steps[1:].mean(), (lam[0] + 6.0) / 19, rtol=0.01)  # the floor is grid point 0


# ------------------------------------------------------------------------------------------------ closed forms
def test_ddim_is_the_exact_affine_map():
  """Deterministic DDIM == the float64 chain of its own steps, and -> slope s / sd(x_T) = 0.5 with many steps."""
  slopes = {}
  for n in (1000, 50, 20):
    x0 = ddim_sample(EPS_MODEL, SCHED, X_LINE, num_steps=n, spacing="trailing")
    assert x0.dtype == jnp.float32 and x0.shape == X_LINE.shape
    slope, icpt, resid = affine_fit(X_LINE, x0)
    A, b, _ = chain_law(strided(n), eta=0.0)
    assert resid < 1e-4 and abs(slope - A) < 2e-4 and abs(icpt - b) < 2e-4, (n, slope, A, icpt, b)
    slopes[n] = slope
  # Measured (docs/samplers.md): 0.4985 / 0.4714 / 0.4314 for 1000 / 50 / 20 steps.
  assert abs(slopes[1000] - exact_slope()) < 3e-3 and 0.46 < slopes[50] < 0.48 and 0.42 < slopes[20] < 0.44


def test_dpm_solver_markedly_beats_ddim_at_20_steps():
  dpm = affine_fit(X_LINE, dpm_solver_sample(EPS_MODEL, SCHED, X_LINE, num_steps=20))
  ddim = affine_fit(X_LINE, ddim_sample(EPS_MODEL, SCHED, X_LINE, num_steps=20))
  exact_b = MU - exact_slope() * np.sqrt(ABAR64[-1]) * MU
  assert dpm[2] < 1e-4 and abs(dpm[1] - exact_b) < 1e-3
  assert abs(dpm[0] - exact_slope()) < 0.008  # measured 0.5042 with log-SNR spacing (docs/samplers.md)
  assert abs(dpm[0] - exact_slope()) < abs(ddim[0] - exact_slope()) / 5


def test_dpm_solver_grid_skips_the_empty_tail_of_the_cosine_schedule():
  """The cosine schedule ends at log-SNR -19.8: a grid uniform from there spent 2 of 5 steps on t = 999 -> 998 ->
  943, where nothing changes (slope 0.338 at 5 steps, measured before the floor). From max(lambda_T, -6) it
  reaches the linear schedule's accuracy (measured 0.445 at 5 steps, 0.505 at 20; exact 0.5; with the floor at
  -10.5 it was 0.400 / 0.508)."""
  cosine = NoiseSchedule.cosine(1000)
  ts = np.asarray(spacing_table(cosine, jnp.int32(5), "log_snr"))[:5]
  assert ts[0] == 999 and ts[1] < 990 and ts[-1] == 0, ts
  model = Partial(MODELS["epsilon"], gaussian_params(schedule=cosine))
  for n, tol in ((5, 0.07), (20, 0.008)):
    slope = affine_fit(X_LINE, dpm_solver_sample(model, cosine, X_LINE, num_steps=n))[0]
    assert abs(slope - exact_slope()) < tol, (n, slope)
  # The linear schedule (lambda_T = -10.1): T-1, then uniform in log-SNR from -6 (measured table).
  assert np.asarray(spacing_table(SCHED, jnp.int32(5), "log_snr"))[:5].tolist() == [999, 475, 130, 16, 0]


@pytest.mark.parametrize("n", [1000, 50])
def test_ddpm_reproduces_the_gaussian_in_distribution(n):
  """Full DDPM ~ N(mu, s^2); strided DDPM == the law of the strided posterior chain (prev = previous visited t)."""
  x_T = jax.random.normal(jax.random.PRNGKey(1), (40000, 1))
  x0 = np.asarray(ddpm_sample(EPS_MODEL, SCHED, x_T, rng=jax.random.PRNGKey(2), num_steps=None if n == 1000 else n))
  A, b, v = chain_law(strided(n), eta=1.0)
  mean, sd = b + A * np.sqrt(ABAR64[-1]) * MU, np.sqrt(A * A * (1 - ABAR64[-1] * (1 - S * S)) + v)
  assert abs(x0.mean() - mean) < 0.012 and abs(x0.std() - sd) < 0.01, (x0.mean(), mean, x0.std(), sd)
  if n == 1000:
    assert abs(x0.mean() - MU) < 0.012 and abs(x0.std() - S) < 0.012
    assert abs(np.mean(np.abs(x0 - MU) < S) - 0.6827) < 0.01  # Gaussian mass within one sd


def test_parameterisations_give_the_same_samples():
  params = gaussian_params()
  x_T = jax.random.normal(jax.random.PRNGKey(3), (B, 1))
  rng = jax.random.PRNGKey(4)
  runs = {p: (ddim_sample(Partial(MODELS[p], params), SCHED, x_T, num_steps=50, prediction=p),
              dpm_solver_sample(Partial(MODELS[p], params), SCHED, x_T, num_steps=20, prediction=p),
              ddpm_sample(Partial(MODELS[p], params), SCHED, x_T, rng=rng, num_steps=100, prediction=p))
          for p in MODELS}
  for p in ("v", "x0"):
    for ref, got in zip(runs["epsilon"], runs[p]):
      np.testing.assert_allclose(got, ref, atol=2e-5)


def test_eta_adds_noise_from_rng():
  x_T = jax.random.normal(jax.random.PRNGKey(5), (40000, 1))
  det = ddim_sample(EPS_MODEL, SCHED, x_T, num_steps=50, spacing="trailing", eta=0.0)
  k1, k2 = jax.random.PRNGKey(6), jax.random.PRNGKey(7)
  a = ddim_sample(EPS_MODEL, SCHED, x_T, num_steps=50, spacing="trailing", eta=0.5, rng=k1)
  again = lambda k: ddim_sample(EPS_MODEL, SCHED, x_T, num_steps=50, spacing="trailing", eta=0.5, rng=k)
  np.testing.assert_array_equal(a, again(k1))
  assert np.abs(a - again(k2)).mean() > 0.05
  assert np.abs(a - det).mean() > 0.05
  np.testing.assert_allclose(ddim_sample(EPS_MODEL, SCHED, x_T, num_steps=50, spacing="trailing", eta=0.0, rng=k1),
                             det, atol=1e-6)
  A, b, v = chain_law(strided(50), eta=0.5)
  sd = np.sqrt(A * A * (1 - ABAR64[-1] * (1 - S * S)) + v)
  assert abs(np.std(a) - sd) < 0.01 and v > 0.01, (np.std(a), sd, v)
  # eta = 1 is DDPM on the same strided steps.
  np.testing.assert_allclose(ddim_sample(EPS_MODEL, SCHED, x_T, num_steps=50, spacing="trailing", eta=1.0, rng=k1),
                             ddpm_sample(EPS_MODEL, SCHED, x_T, rng=k1, num_steps=50), atol=1e-6)
  with pytest.raises(ValueError, match="rng"):
    ddim_sample(EPS_MODEL, SCHED, x_T, num_steps=50, eta=0.5)
  with pytest.raises(ValueError, match="rng"):
    ddpm_sample(EPS_MODEL, SCHED, x_T, rng=None)


def test_clip_denoised_bounds_the_prediction():
  x_T = jax.random.normal(jax.random.PRNGKey(8), (B, 1)) * 3
  for sample in (lambda **kw: ddim_sample(EPS_MODEL, SCHED, x_T, num_steps=20, **kw),
                 lambda **kw: dpm_solver_sample(EPS_MODEL, SCHED, x_T, num_steps=20, **kw),
                 lambda **kw: ddpm_sample(EPS_MODEL, SCHED, x_T, rng=jax.random.PRNGKey(9), num_steps=20, **kw)):
    free, clipped = np.asarray(sample()), np.asarray(sample(clip_denoised=(0.0, 0.5)))
    assert free.min() < -0.1 and free.max() > 0.7
    assert clipped.min() >= 0.0 and clipped.max() <= 0.5
  with pytest.raises(ValueError, match="lo < hi"):
    ddim_sample(EPS_MODEL, SCHED, x_T, clip_denoised=(1.0, -1.0))


def test_bf16_model_gives_finite_samples():
  """A bf16 network with float32 sampler arithmetic: finite on the cosine schedule (alpha-bar_T ~ 2e-9, which
  bf16 schedule arithmetic turns into sigma = 0 / NaN), and close to the float32 model on the linear schedule."""
  cos = NoiseSchedule.cosine(1000)
  x_T = jax.random.normal(jax.random.PRNGKey(10), (B, 1))
  for prediction, samplers in (("epsilon", "ddim dpm"), ("v", "dpm"), ("x0", "ddim")):
    for name in samplers.split():
      run = {"ddim": lambda m, sch: ddim_sample(m, sch, x_T, num_steps=50, prediction=prediction),
             "dpm": lambda m, sch: dpm_solver_sample(m, sch, x_T, num_steps=20, prediction=prediction)}[name]
      got = run(Partial(BF16_MODELS[prediction], gaussian_params(schedule=cos)), cos)
      assert got.dtype == jnp.float32 and np.all(np.isfinite(got)), (prediction, name)
      got = run(Partial(BF16_MODELS[prediction], gaussian_params()), SCHED)
      want = run(Partial(MODELS[prediction], gaussian_params()), SCHED)
      assert np.abs(got - want).max() < 0.05, (prediction, name, np.abs(got - want).max())


# ------------------------------------------------------------------------------------------------ guidance
def cond_model(params, x, t, labels):
  """Class-conditional optimal eps model: label y >= 0 -> mean 0.1 y; the null label -1 -> mean 0."""
  mu = jnp.where(labels >= 0, 0.1 * labels, 0.0).astype(jnp.float32)
  return gaussian_model({**params, "mu": _bc(mu, x)}, x, t)


def test_guidance_scale_0_1_and_extrapolation():
  params = gaussian_params()
  cond = Partial(cond_model, params)
  x_T = jax.random.normal(jax.random.PRNGKey(12), (B, 1))
  labels = jnp.arange(B, dtype=jnp.int32) % 10
  rng = jax.random.PRNGKey(13)
  for sample in (lambda m: ddim_sample(m, SCHED, x_T, num_steps=20),
                 lambda m: dpm_solver_sample(m, SCHED, x_T, num_steps=20),
                 lambda m: ddpm_sample(m, SCHED, x_T, rng=rng, num_steps=50)):
    def with_mean(mu):
      return sample(Partial(MODELS["epsilon"], {**params, "mu": jnp.asarray(mu, jnp.float32)[:, None]}))
    mus = 0.1 * (np.arange(B) % 10)
    np.testing.assert_allclose(sample(classifier_free_guidance(cond, 0.0, -1, labels)), with_mean(0 * mus),
                               atol=1e-5)
    np.testing.assert_allclose(sample(classifier_free_guidance(cond, 1.0, -1, labels)), with_mean(mus), atol=1e-4)
    # eps_hat is affine in mu, so scale w is exactly the model with mean mu_u + w (mu_c - mu_u).
    np.testing.assert_allclose(sample(classifier_free_guidance(cond, 3.0, -1, labels)), with_mean(3 * mus),
                               atol=1e-4)
    per_row = classifier_free_guidance(cond, jnp.linspace(0, 2, B), -1, jnp.full((B,), 5))
    np.testing.assert_allclose(sample(per_row), with_mean(0.5 * np.linspace(0, 2, B)), atol=1e-4)


# ------------------------------------------------------------------------------------------------ compilation
def test_no_recompile_for_steps_eta_guidance_or_params():
  x_T = jax.random.normal(jax.random.PRNGKey(14), (B, 1))
  rng = jax.random.PRNGKey(15)
  labels = jnp.arange(B) % 3
  cond = Partial(cond_model, gaussian_params())
  calls = [
      lambda i: ddim_sample(EPS_MODEL, SCHED, x_T, num_steps=(10, 20, 50)[i], eta=(0.0, 0.3, 1.0)[i], rng=rng),
      lambda i: ddim_sample(EPS_MODEL, SCHED, x_T, num_steps=(10, 20, 50)[i]),
      lambda i: ddpm_sample(Partial(MODELS["epsilon"], gaussian_params(mu=0.1 * i)), SCHED, x_T,
                            rng=jax.random.PRNGKey(i), num_steps=(None, 100, 7)[i]),
      lambda i: dpm_solver_sample(EPS_MODEL, SCHED, x_T, num_steps=(20, 5, 12)[i], clip_denoised=(-1.0, 1.0 + i)),
      lambda i: ddim_sample(classifier_free_guidance(cond, (1.0, 3.0, 7.5)[i], -1, (labels + i) % 3), SCHED, x_T,
                            num_steps=(20, 10, 30)[i]),
  ]
  for call in calls:
    call(0).block_until_ready()  # warm up: compiles each program once
  with CompileCounter() as compiles:
    for call in calls:
      for i in (1, 2):
        call(i).block_until_ready()
  assert compiles.count == 0, f"{compiles.count} new compilations"


def test_traceable_inside_user_jit_without_recompiles():
  @jax.jit
  def user_sample(params, x, n, eta, scale, key):
    guided = classifier_free_guidance(Partial(cond_model, params), scale, -1, jnp.full((x.shape[0],), 4))
    return ddim_sample(guided, SCHED, x, num_steps=n, eta=eta, rng=key)

  x_T = jax.random.normal(jax.random.PRNGKey(16), (B, 1))
  args = lambda n, eta, w: (gaussian_params(), x_T, jnp.int32(n), jnp.float32(eta), jnp.float32(w),
                            jax.random.PRNGKey(0))
  ref = user_sample(*args(20, 0.0, 1.0))
  np.testing.assert_allclose(ref, ddim_sample(Partial(MODELS["epsilon"], gaussian_params(mu=0.4)), SCHED, x_T,
                                              num_steps=20), atol=1e-5)
  with CompileCounter() as compiles:
    user_sample(*args(50, 0.5, 2.0)).block_until_ready()
    user_sample(*args(5, 1.0, 0.0)).block_until_ready()
  assert compiles.count == 0
  with pytest.raises(ValueError, match="traced eta"):
    jax.jit(lambda e: ddim_sample(EPS_MODEL, SCHED, x_T, eta=e))(0.0)


def test_a_new_model_compiles_exactly_one_program():
  """One program per (model, shape): here images [8, 2, 2, 2] and an elementwise model (so values must equal the
  [64, 1] run); the num_steps change after it compiles nothing."""
  ref = ddim_sample(EPS_MODEL, SCHED, X_LINE, num_steps=9)  # also warms the eager argument helpers
  model = lambda x, t: gaussian_model(gaussian_params(), x, t)
  images = X_LINE.reshape(8, 2, 2, 2)
  with CompileCounter() as compiles:
    ddim_sample(model, SCHED, images, num_steps=3).block_until_ready()
    got = ddim_sample(model, SCHED, images, num_steps=9)
  assert compiles.count == 1
  np.testing.assert_allclose(got.reshape(B, 1), ref, atol=1e-6)


# ------------------------------------------------------------------------------------------------ vmap / mesh
def test_vmap_over_rng_matches_a_loop():
  x_T = jax.random.normal(jax.random.PRNGKey(17), (B, 1))
  keys = jax.random.split(jax.random.PRNGKey(18), 3)
  batched = jax.vmap(lambda k: ddpm_sample(EPS_MODEL, SCHED, x_T, rng=k, num_steps=30))(keys)
  for i in range(3):
    np.testing.assert_allclose(batched[i], ddpm_sample(EPS_MODEL, SCHED, x_T, rng=keys[i], num_steps=30), atol=1e-5)
  stack = jax.random.normal(jax.random.PRNGKey(19), (3, B, 1))
  batched = jax.vmap(lambda x: dpm_solver_sample(EPS_MODEL, SCHED, x, num_steps=10))(stack)
  for i in range(3):
    np.testing.assert_allclose(batched[i], dpm_solver_sample(EPS_MODEL, SCHED, stack[i], num_steps=10), atol=1e-5)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs >= 4 (simulated) devices")
def test_batch_sharded_over_a_mesh_matches_unsharded():
  n_dev = 8 if jax.device_count() >= 8 else 4
  mesh = Mesh(np.array(jax.devices()[:n_dev]), ("data",))
  x_T = jax.random.normal(jax.random.PRNGKey(20), (B, 1))
  x_sharded = jax.device_put(x_T, NamedSharding(mesh, P("data")))
  rng = jax.random.PRNGKey(21)
  for sample in (lambda x: ddim_sample(EPS_MODEL, SCHED, x, num_steps=20, eta=0.7, rng=rng),
                 lambda x: dpm_solver_sample(EPS_MODEL, SCHED, x, num_steps=20),
                 lambda x: ddpm_sample(EPS_MODEL, SCHED, x, rng=rng, num_steps=25)):
    got = sample(x_sharded)
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), got.ndim)
    np.testing.assert_allclose(got, sample(x_T), atol=1e-5)


# ------------------------------------------------------------------------------------------------ errors
def test_bad_arguments_name_the_problem():
  x_T = jnp.zeros((2, 1))
  with pytest.raises(ValueError, match="not one of"):
    ddim_sample(EPS_MODEL, SCHED, x_T, prediction="noise")
  for n in (0, 1001, 2.5):
    with pytest.raises(ValueError, match="num_steps"):
      ddim_sample(EPS_MODEL, SCHED, x_T, num_steps=n)
  with pytest.raises(ValueError, match="eta"):
    ddim_sample(EPS_MODEL, SCHED, x_T, eta=1.5, rng=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="shape"):
    dpm_solver_sample(lambda x, t: x[:, :0], SCHED, x_T)
  with pytest.raises(ValueError, match="x_T"):
    ddim_sample(EPS_MODEL, SCHED, jnp.zeros((2, 1), jnp.int32))
