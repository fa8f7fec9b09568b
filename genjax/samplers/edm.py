"""EDM / Karras samplers for a VP-trained model: Euler, Heun (with stochastic churn) and Euler-ancestral; jax only.

    from genjax.samplers import NoiseSchedule, euler_sample, heun_sample, euler_ancestral_sample
    schedule = NoiseSchedule.linear(num_timesteps=1000)
    x0 = heun_sample(model_fn, schedule, x_T, num_steps=18)                         # 2 * 18 - 1 model calls
    x0 = heun_sample(model_fn, schedule, x_T, num_steps=18, s_churn=40.0, s_tmin=0.05, s_tmax=50.0, rng=key)
    x0 = euler_sample(model_fn, schedule, x_T, num_steps=30)
    x0 = euler_ancestral_sample(model_fn, schedule, x_T, num_steps=30, rng=key)

Karras et al. (2022) solve the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma in the variance-exploding
variables of the same process: sigma = sqrt((1 - abar) / abar), x = x_t / sqrt(abar), and the denoiser
D(x; sigma) = the model's x0 prediction at x_t = x / sqrt(1 + sigma^2). `heun_sample` is their Algorithm 2 (second
order; the last step, to sigma = 0, is an Euler step, so `num_steps` steps make 2 num_steps - 1 model calls);
`euler_sample` is the first-order method on the same grid (num_steps calls); stochastic churn (Algorithm 2's
gamma_i = min(s_churn / num_steps, sqrt(2) - 1) on steps with s_tmin <= sigma_i <= s_tmax, new noise scaled by
s_noise; needs `rng`) is available on both. `euler_ancestral_sample` takes an Euler step to sigma_down and adds
noise sigma_up (k-diffusion's ancestral step, `eta` = 1 the DDPM posterior's amount, 0 = plain Euler).

Grid: `num_steps` noise levels sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) -
sigma_max^(1/rho)))^rho, then 0 (Karras spacing, rho = 7), by default over the schedule's own range [sigma_0,
sigma_{T-1}] (the largest finite one for a zero-terminal-SNR schedule). x_T (standard normal) is the VP state at the
first level: the samplers start from x = x_T sqrt(1 + sigma_max^2), so x_T -> x0 is comparable with DDIM's map.
Instead of the Karras grid, `timesteps=` (an explicit descending grid of int or float timesteps) or another
`spacing=` of `genjax.samplers.spacing` gives the levels t_to_sigma(t); `dynamic_threshold` / `threshold_max` and
`clip_denoised` act on the x0 prediction as in the other samplers.

The model gets float timesteps. These levels fall between the training timesteps: `model_fn(x, t)` receives float32
t [B] = `schedule.sigma_to_t(sigma)` (log-sigma interpolated linearly between the neighbouring integer timesteps,
k-diffusion's convention), so it must accept float t (a sinusoidal embedding, like genjax's U-Net, does).
`quantize=True` rounds each level to the nearest training timestep (the grid and churned levels snap to
`t_to_sigma(round(t))`) and passes int32 t, for models that accept integers only.

Compilation: one XLA program per (x_T shape/dtype, T, prediction, sampler, quantize, Karras or table grid, clipping
on / off, model_fn); `num_steps`, rho, sigma_min/max, the churn options, eta, clip values and a `timesteps=` grid's
values are runtime values: changing them compiles nothing. Model
functions are keyed as in `genjax.samplers.diffusion` (pass a `jax.tree_util.Partial(apply_fn, params)`).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import UserError, show
from genjax.samplers.diffusion import (_as_key, _concrete, _join_model, _split_model, check_clip, check_threshold,
                                       check_x_T, step_table)
from genjax.samplers.schedules import NoiseSchedule, check_prediction
from genjax.samplers.spacing import check_spacing
from genjax.samplers.steps import denoise

__all__ = ["euler_sample", "heun_sample", "euler_ancestral_sample", "karras_sigmas"]


# --------------------------------------------------------------------------------------------- public samplers
def euler_sample(model_fn: Callable, schedule: NoiseSchedule, x_T, *, num_steps=None, rng=None,
                 prediction: str = "epsilon", clip_denoised: Optional[tuple[float, float]] = None,
                 s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, rho=7.0, sigma_min=None, sigma_max=None,
                 timesteps=None, spacing: str = "karras", steps_offset=0, dynamic_threshold=None,
                 threshold_max=1.0, quantize: bool = False) -> jax.Array:
  """Euler's method on the probability-flow ODE over a Karras sigma grid (first order, num_steps model calls).

  Args:
    model_fn: `(x [B, ...] float32, t float32 [B]) -> prediction` (int32 t with quantize=True).
    schedule: the model's training `NoiseSchedule`.
    x_T: starting noise [B, ...] (standard normal).
    num_steps: number of steps (int >= 1, runtime).
    rng: PRNG key; needed only when s_churn > 0.
    prediction: what model_fn predicts: "epsilon" | "v" | "x0" (or diffusers' "v_prediction" | "sample").
    clip_denoised: optional (lo, hi) clip of the predicted x0 at every model call.
    s_churn, s_tmin, s_tmax, s_noise: stochastic churn (Karras et al. 2022, Algorithm 2); s_churn = 0 is the ODE.
    rho: Karras spacing exponent (> 0).
    sigma_min, sigma_max: the Karras grid's range (None = the schedule's).
    timesteps: an explicit strictly decreasing grid of (int or float) timesteps instead of the Karras grid.
    spacing, steps_offset: "karras" (default; rho, sigma_min, sigma_max apply) or another spacing of
      `genjax.samplers.spacing` ("trailing", "leading", "linspace", "log_snr"), as levels t_to_sigma(t).
    dynamic_threshold, threshold_max: Imagen's dynamic thresholding of x0 (as in `genjax.samplers.diffusion`).
    quantize: snap the levels to training timesteps and pass int32 t.

  Returns:
    float32 samples shaped like x_T.
  """
  return _run("euler", model_fn, schedule, x_T, num_steps, rng, prediction, clip_denoised, dict(
      s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, rho=rho, sigma_min=sigma_min,
      sigma_max=sigma_max, eta=0.0), quantize, (timesteps, spacing, steps_offset),
      (dynamic_threshold, threshold_max), needs_rng=_may_be_positive(s_churn))


def heun_sample(model_fn: Callable, schedule: NoiseSchedule, x_T, *, num_steps=None, rng=None,
                prediction: str = "epsilon", clip_denoised: Optional[tuple[float, float]] = None,
                s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, rho=7.0, sigma_min=None, sigma_max=None,
                timesteps=None, spacing: str = "karras", steps_offset=0, dynamic_threshold=None,
                threshold_max=1.0, quantize: bool = False) -> jax.Array:
  """Heun's second-order method (Karras et al. 2022, Algorithm 2): 2 num_steps - 1 model calls.

  Arguments as in `euler_sample`; the last step (to sigma = 0) is an Euler step.
  """
  return _run("heun", model_fn, schedule, x_T, num_steps, rng, prediction, clip_denoised, dict(
      s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, rho=rho, sigma_min=sigma_min,
      sigma_max=sigma_max, eta=0.0), quantize, (timesteps, spacing, steps_offset),
      (dynamic_threshold, threshold_max), needs_rng=_may_be_positive(s_churn))


def euler_ancestral_sample(model_fn: Callable, schedule: NoiseSchedule, x_T, *, num_steps=None, rng,
                           prediction: str = "epsilon", clip_denoised: Optional[tuple[float, float]] = None,
                           eta=1.0, s_noise=1.0, rho=7.0, sigma_min=None, sigma_max=None, timesteps=None,
                           spacing: str = "karras", steps_offset=0, dynamic_threshold=None, threshold_max=1.0,
                           quantize: bool = False) -> jax.Array:
  """Euler-ancestral sampling over a Karras sigma grid (num_steps model calls, fresh noise every step).

  Each step goes from sigma to sigma_next by an Euler step to sigma_down = sqrt(sigma_next^2 - sigma_up^2) and adds
  noise of std s_noise * sigma_up, sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) /
  sigma^2)). Arguments as in `euler_sample`; `rng` is required; eta in [0, 1] (runtime).
  """
  if rng is None:
    raise UserError("euler_ancestral_sample draws noise at every step and needs rng (a PRNG key); got rng=None")
  e = _concrete(eta)
  if e is not None and (e.ndim != 0 or not 0.0 <= float(e) <= 1.0):
    raise UserError(f"eta must be a scalar in [0, 1], got {show(eta)}")
  return _run("ancestral", model_fn, schedule, x_T, num_steps, rng, prediction, clip_denoised, dict(
      s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=s_noise, rho=rho, sigma_min=sigma_min,
      sigma_max=sigma_max, eta=eta), quantize, (timesteps, spacing, steps_offset),
      (dynamic_threshold, threshold_max), needs_rng=True)


def karras_sigmas(num_steps, sigma_min, sigma_max, rho=7.0) -> jax.Array:
  """float32 [num_steps + 1]: Karras et al.'s levels from sigma_max down to sigma_min, then 0 (num_steps static)."""
  i = jnp.arange(num_steps + 1)
  return _karras_level(i, jnp.asarray(num_steps), jnp.asarray(sigma_min, jnp.float32),
                       jnp.asarray(sigma_max, jnp.float32), jnp.asarray(rho, jnp.float32))


# --------------------------------------------------------------------------------------------- argument handling
def _may_be_positive(value) -> bool:
  """False only for a concrete 0 (a traced value may be positive)."""
  v = _concrete(value)
  return v is None or bool(np.any(v != 0))


def _check_scalar(name, value, ok, want) -> None:
  v = _concrete(value)
  if v is not None and (v.ndim != 0 or not ok(float(v))):
    raise UserError(f"{name} must be a scalar {want}, got {show(value)}")


def _run(method, model_fn, schedule, x_T, num_steps, rng, prediction, clip_denoised, opts, quantize, grid, threshold,
         needs_rng):
  name = {"euler": "euler_sample", "heun": "heun_sample", "ancestral": "euler_ancestral_sample"}[method]
  if not isinstance(schedule, NoiseSchedule):
    raise UserError(f"schedule must be a genjax NoiseSchedule, got {type(schedule)}")
  prediction = check_prediction(prediction)
  if needs_rng and rng is None:
    raise UserError(f"{name} with s_churn={show(opts['s_churn'])} (> 0 or traced) adds noise and needs rng "
                    "(a PRNG key); got rng=None")
  if not isinstance(quantize, bool):
    raise UserError(f"quantize must be True or False, got {quantize!r}")
  timesteps, spacing, steps_offset = grid
  check_spacing(spacing)
  if timesteps is None and num_steps is None:
    raise UserError(f"{name} needs num_steps (an int >= 1) or an explicit timesteps= grid")
  if spacing == "karras" and timesteps is None:  # the Karras formula, computed in the loop: any num_steps >= 1
    n = _concrete(num_steps)
    if n is not None and (n.ndim != 0 or not np.issubdtype(n.dtype, np.integer) or int(n) < 1):
      raise UserError(f"num_steps must be an int >= 1, got {show(num_steps)}")
    table, num_steps = jnp.full((schedule.num_timesteps + 1,), -1.0, jnp.float32), jnp.asarray(num_steps, jnp.int32)
  else:
    table, num_steps = step_table(schedule, num_steps, timesteps, spacing, steps_offset)
  x_T = check_x_T(x_T)
  _check_scalar("s_churn", opts["s_churn"], lambda v: v >= 0, ">= 0")
  _check_scalar("s_noise", opts["s_noise"], lambda v: v >= 0, ">= 0")
  _check_scalar("rho", opts["rho"], lambda v: v > 0, "> 0")
  for key in ("sigma_min", "sigma_max"):
    if opts[key] is not None:
      _check_scalar(key, opts[key], lambda v: 0 < v < math.inf, "in (0, inf)")
  lo_s, hi_s = (_concrete(opts[k]) for k in ("sigma_min", "sigma_max"))
  if lo_s is not None and hi_s is not None and opts["sigma_min"] is not None and opts["sigma_max"] is not None \
      and not float(lo_s) < float(hi_s):
    raise UserError(f"need sigma_min < sigma_max, got sigma_min={show(opts['sigma_min'])}, "
                    f"sigma_max={show(opts['sigma_max'])}")
  clip = check_clip(clip_denoised)
  threshold = check_threshold(*threshold)
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  # sigma_min / sigma_max None -> NaN: the compiled loop substitutes the schedule's range (one program for both).
  floats = {k: f32(np.nan if opts[k] is None else opts[k]) if k.startswith("sigma") else f32(opts[k])
            for k in opts}
  dynamic, static = _split_model(model_fn)
  return _edm_loop(dynamic, schedule, x_T.astype(jnp.float32), _as_key(rng), num_steps, table.astype(jnp.float32),
                   floats, clip, threshold, model_static=static, method=method, prediction=prediction,
                   quantize=quantize, karras=spacing == "karras" and timesteps is None)


# --------------------------------------------------------------------------------------------- the compiled loop
def _karras_level(i, n, sigma_min, sigma_max, rho):
  """Level i of n (i = n and beyond -> 0)."""
  i = jnp.asarray(i)
  frac = i.astype(jnp.float32) / jnp.maximum(n - 1, 1).astype(jnp.float32)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return jnp.where(i < n, (hi + frac * (lo - hi)) ** rho, 0.0)


def _sigma_range(schedule: NoiseSchedule):
  """(sigma_0, the largest finite sigma) of the schedule, float32 scalars."""
  ls = schedule.log_sigmas
  finite_max = jnp.max(jnp.where(jnp.isfinite(ls), ls, -jnp.inf))
  return jnp.exp(ls[0]), jnp.exp(finite_max)


def _snap(schedule: NoiseSchedule, sigma, quantize: bool):
  """quantize=True: the nearest training timestep's level (0 stays 0); else sigma itself."""
  if not quantize:
    return sigma
  t = jnp.round(schedule.sigma_to_t(jnp.maximum(sigma, 1e-30))).astype(jnp.int32)
  return jnp.where(sigma > 0, schedule.t_to_sigma(t), 0.0)


def _level_fn(schedule: NoiseSchedule, table, n, opts, *, quantize: bool, karras: bool) -> Callable:
  """`level(i)`: the noise level of step i (0 from step n on), from the Karras formula or the timestep table."""
  default_min, default_max = _sigma_range(schedule)
  sigma_min = jnp.where(jnp.isnan(opts["sigma_min"]), default_min, opts["sigma_min"])
  sigma_max = jnp.where(jnp.isnan(opts["sigma_max"]), default_max, opts["sigma_max"])

  def level(i):
    if karras:
      return _snap(schedule, _karras_level(i, n, sigma_min, sigma_max, opts["rho"]), quantize)
    t = table[jnp.minimum(i, table.shape[0] - 1)]
    return _snap(schedule, jnp.where((t >= 0) & (i < n), schedule.t_to_sigma(jnp.maximum(t, 0.0)), 0.0), quantize)

  return level


def _denoiser_fn(model_fn, schedule: NoiseSchedule, batch: int, clip, threshold, *, prediction: str,
                 quantize: bool) -> Callable:
  """`denoiser(x, sigma)`: D(x; sigma), the model's (clipped / thresholded) x0 prediction at x_t = x / sqrt(1 +
  sigma^2), t(sigma)."""

  def denoiser(x, sigma):
    t = schedule.sigma_to_t(sigma)
    t = jnp.round(t).astype(jnp.int32) if quantize else t
    x_t = jax.lax.rsqrt(1.0 + sigma * sigma) * x
    pred = model_fn(x_t, jnp.full((batch,), t, t.dtype))
    x0, _ = denoise(schedule, pred, x_t, t, prediction=prediction, clip_denoised=clip,
                    dynamic_threshold=None if threshold is None else threshold[0],
                    threshold_max=1.0 if threshold is None else threshold[1])
    return x0

  return denoiser


@functools.partial(jax.jit, static_argnames=("model_static", "method", "prediction", "quantize", "karras"))
def _edm_loop(model_dynamic, schedule, x_T, rng, num_steps, table, opts, clip, threshold, *, model_static, method,
              prediction, quantize, karras):
  n = jnp.maximum(num_steps, 1)
  level = _level_fn(schedule, table, n, opts, quantize=quantize, karras=karras)
  denoiser = _denoiser_fn(_join_model(model_dynamic, model_static), schedule, x_T.shape[0], clip, threshold,
                          prediction=prediction, quantize=quantize)

  def churn(i, x):
    """(x_hat, sigma_hat): Algorithm 2's temporary noise increase at step i."""
    sigma = level(i)
    in_range = (sigma >= opts["s_tmin"]) & (sigma <= opts["s_tmax"])
    gamma = jnp.where(in_range, jnp.minimum(opts["s_churn"] / n.astype(jnp.float32), math.sqrt(2.0) - 1.0), 0.0)
    sigma_hat = _snap(schedule, sigma * (1.0 + gamma), quantize)
    noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
    # sqrt(sigma_hat^2 - sigma^2), exactly 0 at gamma = 0 (the difference of squares would leave sqrt(rounding)).
    extra = jnp.sqrt(jnp.maximum(sigma_hat ** 2 - sigma ** 2, 0.0)) if quantize else sigma * jnp.sqrt(
        gamma * (2.0 + gamma))
    extra = jnp.where(gamma > 0, extra, 0.0) * opts["s_noise"]
    return x + extra * noise, sigma_hat

  def euler_step(i, x):
    x_hat, sigma_hat = churn(i, x)
    d = (x_hat - denoiser(x_hat, sigma_hat)) / sigma_hat
    return x_hat + (level(i + 1) - sigma_hat) * d

  def heun_step(i, x):  # never the last step (sigma_next > 0)
    x_hat, sigma_hat = churn(i, x)
    sigma_next = level(i + 1)
    d = (x_hat - denoiser(x_hat, sigma_hat)) / sigma_hat
    x_euler = x_hat + (sigma_next - sigma_hat) * d
    d_next = (x_euler - denoiser(x_euler, sigma_next)) / sigma_next
    return x_hat + (sigma_next - sigma_hat) * 0.5 * (d + d_next)

  def ancestral_step(i, x):
    sigma, sigma_next = level(i), level(i + 1)
    d = (x - denoiser(x, sigma)) / sigma
    sigma_up = jnp.minimum(sigma_next, opts["eta"] * jnp.sqrt(
        jnp.maximum(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2, 0.0)))
    sigma_down = jnp.sqrt(jnp.maximum(sigma_next ** 2 - sigma_up ** 2, 0.0))
    noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
    return x + (sigma_down - sigma) * d + opts["s_noise"] * sigma_up * noise

  x = x_T * jnp.sqrt(1.0 + level(0) ** 2)  # the VP state x_T at the first level, in EDM variables
  if method == "euler":
    return jax.lax.fori_loop(0, n, euler_step, x)
  if method == "ancestral":
    return jax.lax.fori_loop(0, n, ancestral_step, x)
  x = jax.lax.fori_loop(0, n - 1, heun_step, x)
  return euler_step(n - 1, x)  # the last step, to sigma = 0, is Euler's
