"""DDIM, DPM-Solver++ (2M / 3M / SDE) and UniPC against closed forms and against diffusers' PyTorch schedulers.

Gaussian data x0 ~ N(mu, s^2) has an exact data prediction x0_hat(x, t) = mu + sqrt(a) s^2 (x - sqrt(a) mu) / V(a),
V(a) = a s^2 + 1 - a (a = alpha-bar_t), and an exact probability-flow map: x_t stays on x(a) = sqrt(a) mu +
sqrt(V(a) / V(a_T)) (x_T - sqrt(a_T) mu). Every sampler here ends with the data prediction at its last grid point,
so with grids ending at t = 0 the exact answer is x0_hat(x(a_0), 0), an affine function of x_T. Grids are float
timesteps uniform in lambda = log(alpha / sigma) (exactly, not rounded), which also exercises float-t sampling.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from genjax.compiles import CompileCounter
from genjax.errors import UserError
from genjax.samplers import (NoiseSchedule, SamplerState, ddim_sample, dpm_solver_sample, dpm_solver_step,
                             unipc_sample, unipc_step)
from genjax.samplers.steps import lam_of as _lam

MU, S = 0.3, 0.5
SCHEDULES = {"linear": NoiseSchedule.linear(1000, 1e-4, 0.02), "cosine": NoiseSchedule.cosine(1000)}
X_T = jnp.linspace(-2.5, 2.5, 16, dtype=jnp.float32)[:, None]
NS = (10, 20, 40, 80)
T_FIRST = {"linear": 999.0, "cosine": 970.0}  # the cosine schedule's last 30 steps hold no signal (log-SNR < -12)


def gaussian_eps(x, t, schedule):
  """Optimal noise prediction for N(MU, S^2) data (any int / float t), float32."""
  a = (schedule.alpha_sigma(t)[0] ** 2)[:, None]
  return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * S * S + 1 - a)


MODELS = {name: Partial(gaussian_eps, schedule=schedule) for name, schedule in SCHEDULES.items()}


def abar64(schedule, t):
  return float(np.exp(np.float64(schedule.log_alpha_bar(jnp.asarray(t, jnp.float32)))))


def exact_map(schedule, x_T, t_first=999.0):
  """x0_hat(x(a_0), 0) on the exact ODE trajectory from t_first, float64."""
  V = lambda a: a * S * S + 1 - a
  aT, a0 = abar64(schedule, t_first), abar64(schedule, 0.0)
  x = np.sqrt(a0) * MU + np.sqrt(V(a0) / V(aT)) * (np.asarray(x_T, np.float64) - np.sqrt(aT) * MU)
  return MU + np.sqrt(a0) * S * S * (x - np.sqrt(a0) * MU) / V(a0)


def lambda_grid(schedule, n, t_first=999.0):
  """n float timesteps from t_first to 0, uniform in lambda."""
  lam = lambda t: -float(jnp.log(schedule.t_to_sigma(jnp.float32(t))))
  lams = np.linspace(lam(t_first), lam(0.0), n)
  ts = np.array(schedule.sigma_to_t(jnp.exp(-jnp.asarray(lams, jnp.float32))), np.float32)
  ts[0], ts[-1] = t_first, 0.0
  return ts


def errors(sample, sched_name, ns=NS):
  schedule, t_first = SCHEDULES[sched_name], T_FIRST[sched_name]
  want = exact_map(schedule, X_T, t_first)
  return np.array([np.abs(np.asarray(sample(lambda_grid(schedule, n, t_first))) - want).max() for n in ns])


def order_of(errs):
  return -np.polyfit(np.log(NS), np.log(errs), 1)[0]


# --------------------------------------------------------------------------------------------- convergence order
@pytest.mark.parametrize("sched_name", ["linear", "cosine"])
def test_dpm_solver_2m_and_unipc_converge_at_their_order(sched_name):
  m, schedule = MODELS[sched_name], SCHEDULES[sched_name]
  e1 = errors(lambda ts: ddim_sample(m, schedule, X_T, timesteps=ts), sched_name)   # = DPM-Solver++ order 1
  e2 = errors(lambda ts: dpm_solver_sample(m, schedule, X_T, timesteps=ts, order=2), sched_name)
  u2 = errors(lambda ts: unipc_sample(m, schedule, X_T, timesteps=ts, order=2), sched_name)
  # Lu et al. 2022: DPM-Solver++1 is first order, 2M second order. Zhao et al. 2023: UniPC-p has order p + 1.
  assert 0.85 < order_of(e1) < 1.15, e1
  assert 1.7 < order_of(e2) < 2.3, e2
  assert order_of(u2) > 2.6 and u2[-1] < e2[-1] / 5, (u2, e2)


def exact_state(schedule, ts, k):
  """The state after k exact steps on grid ts (x on the exact trajectory, exact x0 history): a warm start that
  removes the lower-order warm-up steps, so that a multistep formula's own order shows."""
  V = lambda a: a * S * S + 1 - a
  aT = abar64(schedule, ts[0])
  def point(t):
    a = abar64(schedule, t)
    x = np.sqrt(a) * MU + np.sqrt(V(a) / V(aT)) * (np.asarray(X_T, np.float64) - np.sqrt(aT) * MU)
    x0 = MU + np.sqrt(a) * S * S * (x - np.sqrt(a) * MU) / V(a)
    return x, x0, 0.5 * np.log(a / (1 - a))
  pts = [point(t) for t in ts[:k + 1]]
  hist = [pts[k - 1 - j] if k - 1 - j >= 0 else pts[0] for j in range(3)]
  x_prev = pts[k - 1][0]
  return SamplerState(x=jnp.asarray(pts[k][0], jnp.float32), step=jnp.int32(k),
                      x0_hist=jnp.asarray(np.stack([h[1] for h in hist]), jnp.float32),
                      lam_hist=jnp.asarray([h[2] for h in hist], jnp.float32),
                      x_prev=jnp.asarray(x_prev, jnp.float32), last_order=jnp.int32(min(k, 3)))


@jax.jit
def _finish(schedule, state, ts, k, order):
  """Runs the remaining steps of a float grid from `state` (hand-written loop over the step functions)."""
  def body(i, st):
    t, t_next = ts[i], jnp.where(i + 1 < ts.shape[0], ts[jnp.minimum(i + 1, ts.shape[0] - 1)], -1.0)
    pred = gaussian_eps(st.x, jnp.full((st.x.shape[0],), t), schedule)
    return dpm_solver_step(schedule, st, pred, t, t_next, order=order)
  return jax.lax.fori_loop(k, ts.shape[0], body, state).x


def test_dpm_solver_3m_is_third_order():
  """3M's third-order term has the Taylor-consistent weight (see `dpm_solver_step`): the sampler converges at
  order >= 3 (measured 3.5 here: 4.4e-3, 2.7e-4, 1.5e-5 at 20 / 40 / 80 steps), and so does the multistep formula
  from exact starting values. With the weight halved, as in diffusers, both fall to order ~2.5."""
  m, schedule = MODELS["linear"], SCHEDULES["linear"]
  e2 = errors(lambda ts: dpm_solver_sample(m, schedule, X_T, timesteps=ts, order=2), "linear", NS[1:])
  e3 = errors(lambda ts: dpm_solver_sample(m, schedule, X_T, timesteps=ts, order=3), "linear", NS[1:])
  u3 = errors(lambda ts: unipc_sample(m, schedule, X_T, timesteps=ts, order=3), "linear", NS[1:])
  fit = lambda e: -np.polyfit(np.log(NS[1:]), np.log(e), 1)[0]
  assert fit(e3) > 3.0 and fit(u3) > 3.0 and 1.7 < fit(e2) < 2.3, (e3, u3, e2)
  assert np.all(e3 < e2 / 4), (e3, e2)
  want = exact_map(schedule, X_T)
  warm = []
  for n in NS[1:]:
    ts = lambda_grid(schedule, n)
    warm.append(np.abs(np.asarray(_finish(schedule, exact_state(schedule, ts, 2), jnp.asarray(ts), 2, 3)) - want).max())
  assert fit(np.array(warm)) > 3.0, warm


def test_dpm_solver_3m_local_error_is_fourth_order():
  """One 3M step with exact history on a model whose data prediction is x0(lambda) = sin(lambda) (ignores x):
  the exact step is sigma'/sigma x + alpha' int_0^h e^-(h-u) sin(lambda + u) du (float64 quadrature). Halving h
  must divide the local error by ~16 (order-4 local error = third-order method); halving the D2 weight gives
  ratios 12.9, 12.0, 10.8 -> 8 (measured in float64)."""
  schedule = SCHEDULES["linear"]
  lam0 = 0.3
  errs = []
  for h in (0.4, 0.2, 0.1):
    lams = np.array([lam0 - 2 * h, lam0 - h, lam0, lam0 + h])
    ts = schedule.sigma_to_t(jnp.exp(-jnp.asarray(lams, jnp.float32)))
    lam = np.array([float(_lam(schedule, t)) for t in ts], np.float64)  # the lambdas the library really uses
    x = jnp.full((2, 1), 0.7, jnp.float32)
    state = SamplerState(x=x, step=jnp.int32(2), x0_hist=jnp.asarray(np.sin(lam[[1, 0, 0]])[:, None, None]
                                                                       * np.ones((3, 2, 1)), jnp.float32),
                         lam_hist=jnp.asarray(lam[[1, 0, 0]], jnp.float32), x_prev=x, last_order=jnp.int32(2))
    out = dpm_solver_step(schedule, state, jnp.full((2, 1), np.sin(lam[2]), jnp.float32), ts[2], ts[3],
                          prediction="x0", order=3)
    hh = lam[3] - lam[2]
    u = np.linspace(0.0, hh, 200001)
    integral = np.trapezoid(np.exp(-(hh - u)) * np.sin(lam[2] + u), u)
    sig = lambda l: np.sqrt(1.0 / (1.0 + np.exp(2 * l)))
    alpha_next = np.sqrt(1.0 / (1.0 + np.exp(-2 * lam[3])))
    exact = sig(lam[3]) / sig(lam[2]) * 0.7 + alpha_next * integral
    errs.append(abs(float(out.x[0, 0]) - exact))
  ratios = np.array(errs[:-1]) / np.array(errs[1:])
  assert np.all(ratios > 14.0), (errs, ratios)


def test_sde_solver_reproduces_the_gaussian_in_distribution():
  schedule = SCHEDULES["linear"]
  x_T = jax.random.normal(jax.random.key(1), (20000, 1))
  for order in (2, 3):
    x0 = np.asarray(dpm_solver_sample(MODELS["linear"], schedule, x_T, num_steps=50, order=order, stochastic=True,
                                      rng=jax.random.key(2)))
    assert abs(x0.mean() - MU) < 0.012 and abs(x0.std() - S) < 0.01, (order, x0.mean(), x0.std())
    assert abs(np.mean(np.abs(x0 - MU) < S) - 0.6827) < 0.012  # Gaussian mass within one sd
  ode = dpm_solver_sample(MODELS["linear"], schedule, x_T[:64], num_steps=50)
  sde = dpm_solver_sample(MODELS["linear"], schedule, x_T[:64], num_steps=50, stochastic=True, rng=jax.random.key(2))
  assert np.abs(np.asarray(ode - sde)).mean() > 0.1  # the SDE really adds noise
  with pytest.raises(UserError, match="rng"):
    dpm_solver_sample(MODELS["linear"], schedule, x_T, stochastic=True)


# --------------------------------------------------------------------------------------------- diffusers oracle
def _diffusers_run(scheduler, n, noise_key=None):
  torch = pytest.importorskip("torch")
  schedule = SCHEDULES["linear"]
  scheduler.set_timesteps(n)
  x = torch.tensor(np.asarray(X_T), dtype=torch.float64)
  for i, t in enumerate(scheduler.timesteps):
    out = torch.tensor(np.asarray(gaussian_eps(jnp.asarray(x.numpy(), jnp.float32), jnp.full((16,), int(t)),
                                               schedule)), dtype=torch.float64)
    kw = {}
    if noise_key is not None:  # the same per-step noise the genjax loop draws: normal(fold_in(rng, step))
      noise = jax.random.normal(jax.random.fold_in(noise_key, i), X_T.shape, jnp.float32)
      kw["variance_noise"] = torch.tensor(np.asarray(noise), dtype=torch.float64)
    x = scheduler.step(out, t, x, **kw).prev_sample
  return x.numpy(), np.asarray(scheduler.timesteps).astype(np.int32)


CFG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
           timestep_spacing="trailing", final_sigmas_type="zero")


@pytest.mark.parametrize("order", [2, 3])
def test_matches_diffusers_dpm_solver_and_unipc(order):
  diffusers = pytest.importorskip("diffusers")
  schedule, m = SCHEDULES["linear"], MODELS["linear"]
  key = jax.random.key(3)
  for n in (7,):  # < 15 steps: diffusers applies lower_order_final to the last two steps, as genjax always does
    ref, ts = _diffusers_run(diffusers.UniPCMultistepScheduler(**CFG, solver_order=order), n)
    np.testing.assert_allclose(unipc_sample(m, schedule, X_T, timesteps=ts, order=order), ref, atol=2e-6)
    if order == 3:
      continue  # genjax's 3M weights its third-order term correctly, diffusers' does not (see the 3M tests)
    ref, ts = _diffusers_run(diffusers.DPMSolverMultistepScheduler(**CFG, solver_order=order), n)
    np.testing.assert_allclose(dpm_solver_sample(m, schedule, X_T, timesteps=ts, order=order), ref, atol=2e-6)
    ref, ts = _diffusers_run(diffusers.DPMSolverMultistepScheduler(**CFG, solver_order=order,
                                                                   algorithm_type="sde-dpmsolver++"), n, key)
    np.testing.assert_allclose(dpm_solver_sample(m, schedule, X_T, timesteps=ts, order=order, stochastic=True,
                                                 rng=key), ref, atol=2e-6)
  if order == 2:  # 16 steps: past diffusers' lower_order_final threshold (15)
    ref, ts = _diffusers_run(diffusers.DPMSolverMultistepScheduler(**CFG, solver_order=2), 16)
    np.testing.assert_allclose(dpm_solver_sample(m, schedule, X_T, timesteps=ts, lower_order_final=False), ref,
                               atol=2e-6)


def test_unipc_bh1_matches_diffusers_in_a_hand_written_loop():
  """bh1 with diffusers' final_sigmas_type="zero" is NaN in diffusers (B(h) = h = inf at sigma 0), so compare
  with "sigma_min": the last step goes to t = 0 without a model call there, which a hand loop expresses."""
  diffusers = pytest.importorskip("diffusers")
  schedule = SCHEDULES["linear"]
  cfg = {**CFG, "final_sigmas_type": "sigma_min"}
  for order in (2, 3):
    ref, ts = _diffusers_run(diffusers.UniPCMultistepScheduler(**cfg, solver_order=order, solver_type="bh1"), 8)
    state = SamplerState.init(X_T)
    for i, t in enumerate(ts):
      t_next = ts[i + 1] if i + 1 < len(ts) else 0
      p = min(order, len(ts) - i)  # diffusers' lower_order_final
      pred = gaussian_eps(state.x, jnp.full((16,), t), schedule)
      state = unipc_step(schedule, state, pred, jnp.int32(t), jnp.int32(t_next), order=p, variant="bh1")
    np.testing.assert_allclose(state.x, ref, atol=2e-6)


# --------------------------------------------------------------------------------------------- compiles, errors
def test_steps_order_and_grids_are_runtime_values():
  schedule, m = SCHEDULES["cosine"], MODELS["cosine"]
  key = jax.random.key(0)
  grids = [lambda_grid(schedule, n) for n in (6, 9, 30)]
  calls = [
      lambda i: dpm_solver_sample(m, schedule, X_T, num_steps=(7, 12, 25)[i], order=(2, 3, 1)[i],
                                  lower_order_final=(True, False, True)[i]),
      lambda i: dpm_solver_sample(m, schedule, X_T, timesteps=grids[i], order=(2, 3, 3)[i]),
      lambda i: dpm_solver_sample(m, schedule, X_T, num_steps=(7, 12, 25)[i], stochastic=True, rng=key),
      lambda i: unipc_sample(m, schedule, X_T, num_steps=(7, 12, 25)[i], order=(2, 3, 1)[i]),
  ]
  for call in calls:
    call(0).block_until_ready()
  with CompileCounter() as compiles:
    for call in calls:
      for i in (1, 2):
        call(i).block_until_ready()
  assert compiles.count == 0


def test_bad_options_name_the_choices():
  schedule, m = SCHEDULES["linear"], MODELS["linear"]
  with pytest.raises(UserError, match="order=4 is not one of: 1, 2, 3"):
    dpm_solver_sample(m, schedule, X_T, order=4)
  with pytest.raises(UserError, match="variant='bh3' is not one of: bh1, bh2"):
    unipc_sample(m, schedule, X_T, variant="bh3")
  with pytest.raises(TypeError):
    dpm_solver_sample(m, schedule, X_T, 20)  # everything after x_T is keyword-only
