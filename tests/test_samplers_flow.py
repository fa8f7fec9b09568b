"""Tests for genjax.samplers.flow (rectified flow / flow matching) on the closed form for Gaussian data.

For x0 ~ N(mu, s^2) and x_t = (1 - t) x0 + t eps, x_t ~ N((1 - t) mu, V), V = (1 - t)^2 s^2 + t^2, and the exact
velocity E[eps - x0 | x_t] = (t - (1 - t) s^2)(x - (1 - t) mu) / V - mu. Its ODE carries x_1 to x0 = mu + s x_1
(an affine map with slope s): the flow's marginals are the Gaussians above, and the ODE solution is monotone.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from genjax.compiles import CompileCounter
from genjax.errors import UserError
from genjax.samplers.flow import FlowSchedule, flow_sample, shift_time

MU, S = 0.3, 0.5


def exact_velocity(mu, s, x, t):
  t = t.reshape((-1,) + (1,) * (x.ndim - 1))
  var = (1 - t) ** 2 * s * s + t * t
  return (t - (1 - t) * s * s) * (x - (1 - t) * mu) / var - mu


VELOCITY = Partial(exact_velocity, jnp.float32(MU), jnp.float32(S))
X_LINE = jnp.linspace(-2.5, 2.5, 32, dtype=jnp.float32)[:, None]
EXACT = MU + S * np.asarray(X_LINE, np.float64)


def error(method, n, shift=1.0):
  return float(np.max(np.abs(np.asarray(flow_sample(VELOCITY, FlowSchedule(shift), X_LINE, num_steps=n, method=method),
                                        np.float64) - EXACT)))


def slope(ns, errors):
  return -np.polyfit(np.log(ns), np.log(errors), 1)[0]


def test_euler_heun_midpoint_converge_to_the_exact_map_with_their_orders():
  ns = [10, 20, 40, 80]
  errs = {m: [error(m, 5)] for m in ("euler", "heun", "midpoint")}  # compile each method once
  with CompileCounter() as cc:
    errs = {m: [error(m, n) for n in ns] for m in errs}
  assert cc.count == 0, cc.count  # num_steps is a runtime value
  # Measured: Euler 0.21 -> 0.028 (slope 0.97), Heun 5.2e-3 -> 1.1e-4 (1.9), midpoint 3.5e-4 -> 7e-7 (3.0: this
  # linear-Gaussian ODE is kinder to it than the general second-order bound).
  assert 0.9 < slope(ns, errs["euler"]) < 1.1, errs
  assert 1.7 < slope(ns, errs["heun"]) < 2.3, errs
  assert slope(ns, errs["midpoint"]) > 1.8, errs
  assert errs["heun"][-1] < 2e-4 and errs["midpoint"][-1] < 2e-5


def test_time_shift_moves_the_grid_but_not_the_limit():
  assert float(shift_time(0.5, 3.0)) == pytest.approx(0.75)
  np.testing.assert_allclose(shift_time(jnp.array([0.0, 1.0]), 3.0), [0.0, 1.0])
  error("heun", 5), error("euler", 5)  # compile each method here: under xdist this test may run in a fresh worker
  with CompileCounter() as cc:
    shifted, plain = error("heun", 40, shift=3.0), error("heun", 40)
    coarse_shifted, coarse_plain = error("euler", 4, shift=3.0), error("euler", 4)
  assert cc.count == 0  # shift is a runtime value
  assert shifted < 5e-3 and plain < 1e-3
  assert coarse_shifted != pytest.approx(coarse_plain, rel=1e-3)


def test_model_calls_per_step():
  calls = []

  def counting(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return VELOCITY(x, t)

  for method, expected in (("euler", 6), ("heun", 12), ("midpoint", 12)):
    calls.clear()
    jax.block_until_ready(flow_sample(counting, FlowSchedule(), X_LINE, num_steps=6, method=method))
    jax.effects_barrier()
    assert len(calls) == expected, (method, len(calls))


def test_flow_schedule_training_side():
  flow = FlowSchedule(shift=1.0)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x0 = MU + S * jax.random.normal(k1, (20000, 1))
  eps = jax.random.normal(k2, (20000, 1))
  t = flow.sample_time(k3, 20000)
  assert float(t.min()) >= 0 and float(t.max()) <= 1 and abs(float(t.mean()) - 0.5) < 0.01
  x_t = flow.add_noise(x0, eps, t)
  target = flow.training_target(x0, eps, t)
  np.testing.assert_allclose(x_t, (1 - t[:, None]) * x0 + t[:, None] * eps, atol=1e-6)
  # The target is d x_t / dt, and the exact velocity is its conditional mean: the regression residual of the target
  # on the exact velocity has mean 0 and is uncorrelated with it.
  np.testing.assert_allclose(flow.add_noise(x0, eps, t + 1e-3) - x_t, 1e-3 * target, atol=1e-5)
  resid = np.asarray(target - VELOCITY(x_t, t))[:, 0]
  v = np.asarray(VELOCITY(x_t, t))[:, 0]
  assert abs(resid.mean()) < 0.02 and abs(np.corrcoef(resid, v)[0, 1]) < 0.03
  x0_hat, eps_hat = flow.split_velocity(target, x_t, t)
  np.testing.assert_allclose(x0_hat, x0, atol=1e-5)
  np.testing.assert_allclose(eps_hat, eps, atol=1e-5)
  # shift > 1 puts more training times at high noise: P(t > 1/2) = P(u > 1 / (1 + shift)) = 3/4 at shift 3.
  shifted = FlowSchedule(shift=3.0).sample_time(k3, 20000)
  assert abs(float(jnp.mean(shifted > 0.5)) - 0.75) < 0.01


@pytest.mark.parametrize("call, match", [
    (lambda: flow_sample(VELOCITY, FlowSchedule(), X_LINE, num_steps=4, method="rk4"), "method='rk4' is not one of"),
    (lambda: flow_sample(VELOCITY, FlowSchedule(), X_LINE, num_steps=0), "num_steps must be an int >= 1"),
    (lambda: flow_sample(VELOCITY, 3.0, X_LINE, num_steps=4), "schedule must be a genjax FlowSchedule"),
    (lambda: FlowSchedule(shift=0.0), "shift must be a scalar > 0"),
    (lambda: FlowSchedule(shift=-1.0), "shift must be a scalar > 0"),
    (lambda: flow_sample(VELOCITY, FlowSchedule(), jnp.zeros((4,), jnp.int32), num_steps=4),
     "x_T must be a float array"),
])
def test_bad_arguments_raise_one_clear_error(call, match):
  with pytest.raises(UserError, match=match):
    call()


def test_the_diffusion_familys_flow_matching_loss():
  from genjax.models.diffusion import diffusion_loss
  k1, k2 = jax.random.split(jax.random.key(1))
  x0, noise = jax.random.normal(k1, (4, 3)), jax.random.normal(k2, (4, 3))
  t = jnp.array([0.1, 0.4, 0.7, 1.0])
  seen = {}

  def apply_fn(x_t, tt, label, keys):
    seen["x_t"], seen["t"] = x_t, tt
    return 0.5 * x_t

  loss, _ = diffusion_loss(apply_fn, FlowSchedule(), x0, jax.random.key(0), t=t, noise=noise)
  x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
  np.testing.assert_allclose(seen["x_t"], x_t, atol=1e-6)
  np.testing.assert_allclose(seen["t"], t)  # float t in [0, 1]: the task scales it for the U-Net
  np.testing.assert_allclose(loss, np.mean((0.5 * x_t - (noise - x0)) ** 2), rtol=1e-5)
  diffusion_loss(apply_fn, FlowSchedule(shift=3.0), x0, jax.random.key(0))  # t drawn by the schedule
  assert seen["t"].dtype == jnp.float32 and 0 <= float(seen["t"].min()) and float(seen["t"].max()) <= 1
