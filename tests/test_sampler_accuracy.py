"""benchmarks/sampler_accuracy.py: its ground truth, its exact mixture models, its call counting and its goals.

The benchmark's figures rest on three things checked here against closed forms: the float64 ODE solution (for one
Gaussian component the probability-flow map is affine: x0 = mu + s z, z = (x_sigma - mu) / sqrt(s^2 + sigma^2)),
the exact noise prediction (equal to -sigma_t grad log p_t, computed here by autodiff of the mixture density), and
the model-call counter. A tiny run checks the record keys and the declared call counts.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import accuracy_report, mixtures, sampler_accuracy
from genjax.samplers.schedules import NoiseSchedule

MU, S = 0.3, 0.5
GAUSS = mixtures.Mixture("gauss", np.array([1.0]), np.array([[MU]]), np.array([S]))
TWO_D = mixtures.Mixture("two", np.array([0.3, 0.7]), np.array([[-0.5, 0.2], [0.6, -0.4]]), np.array([0.2, 0.4]))


@pytest.fixture(scope="module")
def sched():
  return NoiseSchedule.linear(num_timesteps=1000)


def test_ground_truth_is_the_exact_affine_map_for_one_gaussian():
  x_T = np.linspace(-2.5, 2.5, 11)[:, None]
  sigma = 157.0
  z = (x_T * np.sqrt(1 + sigma ** 2) - MU) / np.sqrt(S ** 2 + sigma ** 2)
  x0, change = mixtures.exact_flow_checked(GAUSS, sigma, x_T, num_steps=1000)
  error = np.max(np.abs(x0 - (MU + S * z)))                 # RK4 error; SIGMA_MIN = 1e-6 adds only O(1e-12)
  assert error < 1e-7 and change < 1e-6
  assert error <= change                                    # the halving check bounds the real error
  # Rectified flow: x_t = (1 - t) mu + sqrt((1 - t)^2 s^2 + t^2) z, so x_1 = z maps to mu + s z.
  x0, change = mixtures.exact_rectified_flow_checked(GAUSS, x_T, num_steps=200)
  np.testing.assert_allclose(x0, MU + S * x_T, atol=1e-9)
  assert change < 1e-9


def test_ground_truth_halving_check_sees_a_coarse_solve():
  x_T = np.random.default_rng(0).standard_normal((32, 1))
  _, change = mixtures.exact_flow_checked(mixtures.MIXTURES["narrow_1d"], 157.0, x_T, num_steps=20)
  assert change > sampler_accuracy.GROUND_TRUTH_TOLERANCE    # too few steps: the check must notice


def test_exact_eps_of_one_component_is_the_gaussian_closed_form(sched):
  fn = jax.jit(mixtures.mixture_model_fn(GAUSS, sched, count=False))
  x = jnp.linspace(-3, 3, 7)[:, None]
  for t in (0, 10, 500, 999):
    abar = float(np.exp(np.float64(sched.log_alphas_cumprod[t])))
    expected = np.sqrt(1 - abar) * (np.asarray(x) - np.sqrt(abar) * MU) / (abar * S ** 2 + 1 - abar)
    got = fn(x, jnp.full((7,), t, jnp.int32))
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(fn(x, jnp.full((7,), t, jnp.float32)), got, rtol=1e-6)   # float t = k is int k


def test_exact_eps_of_a_mixture_is_the_score(sched):
  """eps_hat(x, t) = -sigma_t grad_x log p_t(x), p_t the noised mixture, for int and in-between float t."""
  x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 2)), jnp.float32)
  log_sigma = mixtures.log_sigma_table(sched)

  def log_p(xi, abar):
    var = abar * TWO_D.stds ** 2 + 1 - abar
    d2 = jnp.sum((xi[None] - jnp.sqrt(abar) * TWO_D.means) ** 2, -1)
    return jax.scipy.special.logsumexp(jnp.log(TWO_D.weights) - jnp.log(var) - 0.5 * d2 / var)

  fn = jax.jit(mixtures.mixture_model_fn(TWO_D, sched, count=False))
  score_fn = jax.jit(jax.vmap(jax.grad(log_p), in_axes=(0, None)))
  for t in (3, 250, 0.5, 250.5, 998.25):     # at t = 0.5 sigma grows 48% between the neighbours
    lo, hi = int(np.floor(t)), int(np.ceil(t))
    ls = log_sigma[lo] + (t - lo) * (log_sigma[hi] - log_sigma[lo])     # log-sigma interpolation
    abar = 1.0 / (1.0 + np.exp(2 * ls))
    score = score_fn(x, abar)
    t_arr = jnp.full((5,), t, jnp.float32 if t != int(t) else jnp.int32)
    np.testing.assert_allclose(fn(x, t_arr), -np.sqrt(1 - abar) * np.asarray(score), rtol=1e-4, atol=1e-5)


def test_flow_velocity_matches_the_gaussian_closed_form_and_numpy():
  x = np.linspace(-2, 2, 5)[:, None]
  for t in (0.0, 0.3, 0.95, 1.0):
    v = (t - (1 - t) * S ** 2) * (x - (1 - t) * MU) / ((1 - t) ** 2 * S ** 2 + t ** 2) - MU
    np.testing.assert_allclose(mixtures.flow_velocity(GAUSS, x, t), v, atol=1e-12)
  fn = jax.jit(mixtures.flow_velocity_fn(TWO_D, count=False))
  x2 = np.random.default_rng(2).standard_normal((6, 2))
  np.testing.assert_allclose(fn(jnp.asarray(x2, jnp.float32), jnp.full((6,), 0.4)),
                             mixtures.flow_velocity(TWO_D, x2, 0.4), rtol=1e-4, atol=1e-5)


def test_tiny_run_counts_calls_and_writes_the_records(tmp_path):
  result = sampler_accuracy.run(["wide_1d"], ["linear", "flow"], [2, 8], ["ddim", "heun", "flow_euler"],
                                num_points=8, gt_steps=300, peers=False, all_variants=False, log=lambda *_: None)
  recs = {(r["schedule"], r["sampler"], r["nfe"]): r for r in result["records"]}
  assert set(recs) == {("linear", "ddim", 2), ("linear", "ddim", 8), ("linear", "heun", 2), ("linear", "heun", 8),
                       ("flow", "flow_euler", 2), ("flow", "flow_euler", 8)}
  # Heun's last step is Euler (2n - 1 calls): the most steps within NFE 2 is 1 (1 call), within NFE 8 is 4 (7).
  assert [(recs[("linear", "heun", n)]["num_steps"], recs[("linear", "heun", n)]["calls"]) for n in (2, 8)] == \
      [(1, 1), (4, 7)]
  for r in result["records"]:
    assert r["status"] == "ok" and r["calls"] == r["expected_calls"] and r["variant"] == "default"
    assert set(r) >= {"rmse", "max_abs_error", "median_abs_error", "library", "mixture", "label"}
  for key in (("linear", "ddim"), ("flow", "flow_euler")):   # more steps, closer to the exact ODE
    assert recs[(*key, 8)]["rmse"] < recs[(*key, 2)]["rmse"] / 2
  assert [g["rk4_steps"] for g in result["ground_truth"]] == [600, 600]
  assert set(result["goals"]) == set(result["goals_geomean"]) == {"a_default", "a_best", "b", "c"}
  assert result["goals"]["a_default"]["checked"] == 0           # no peers in this run
  md = accuracy_report.markdown(result)
  assert "| genjax | DDIM (eta=0) | default |" in md and "not checked" in md
  json.dumps(accuracy_report.clean_json(result), allow_nan=False)
  accuracy_report.plot(result, str(tmp_path / "acc.png"))
  assert (tmp_path / "acc.png").stat().st_size > 10_000


def _rec(schedule, sampler, variant, nfe, rmse, library="genjax", mixture="m"):
  return dict(schedule=schedule, mixture=mixture, sampler=sampler, label=sampler, variant=variant, library=library,
              nfe=nfe, calls=nfe, rmse=rmse, status="ok")


def test_goals_compare_defaults_best_options_and_ddim_at_twice_the_nfe():
  records = [_rec("linear", "ddim", "default", 10, 0.20), _rec("linear", "ddim", "leading", 10, 0.10),
             _rec("linear", "diffusers_ddim", "default", 10, 0.15, "diffusers"),
             _rec("linear", "diffusers_ddim", "steps_offset=1", 10, 0.12, "diffusers"),
             _rec("linear", "ddim", "default", 20, 0.05), _rec("linear", "dpm_solver_2m", "default", 10, 0.06),
             _rec("linear", "unipc_2", "default", 10, 0.04), _rec("flow", "ddim", "default", 10, 9.0)]
  g = accuracy_report.goals(records)
  assert g["a_default"]["checked"] == 1 and g["a_default"]["failed"][0]["ratio"] == pytest.approx(0.20 / 0.15)
  assert g["a_best"] == {"checked": 1, "failed": []}          # leading 0.10 beats diffusers' best 0.12
  assert g["b"] == {"checked": 1, "failed": []}
  assert g["c"]["checked"] == 2 and [f["sampler"] for f in g["c"]["failed"]] == ["dpm_solver_2m"]   # 0.06 > 0.05
  # Identical arithmetic differs by float32 rounding only: a relative difference below TIE_TOLERANCE is a tie.
  tie = [_rec("cosine", "ddim", "default", 5, 0.1 * (1 + accuracy_report.TIE_TOLERANCE / 2)),
         _rec("cosine", "diffusers_ddim", "default", 5, 0.1, "diffusers")]
  assert accuracy_report.goals(tie)["a_default"] == {"checked": 1, "failed": []}
  # Pooled over mixtures: the geometric mean, only where every mixture ran.
  two = [_rec("linear", "ddim", "default", 5, 0.1, mixture="a"), _rec("linear", "ddim", "default", 5, 0.4, mixture="b"),
         _rec("linear", "unipc_2", "default", 5, 0.3, mixture="a")]
  pooled = accuracy_report.geomean_records(two)
  assert [(r["sampler"], r["mixture"]) for r in pooled] == [("ddim", "geomean")]
  assert pooled[0]["rmse"] == pytest.approx(0.2)


def test_bad_arguments_name_the_choices():
  with pytest.raises(ValueError, match=r"unknown mixtures \['moon'\]; valid: \['ring', 'wide_1d', 'narrow_1d', "):
    sampler_accuracy.run(["moon"], ["linear"], [5])
  with pytest.raises(ValueError, match=r"unknown samplers \['ddmi'\]"):
    sampler_accuracy.run(["ring"], ["linear"], [5], ["ddmi"])
  with pytest.raises(ValueError, match=r"unknown schedules \['sigmoid'\]"):
    sampler_accuracy.run(["ring"], ["sigmoid"], [5])
  assert sampler_accuracy.AccuracyCase("h", "h", "heun").steps_for(50) == 25     # 2 calls a step, the last Euler
