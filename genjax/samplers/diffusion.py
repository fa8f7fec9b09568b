"""Jitted diffusion samplers: DDPM, DDIM and DPM-Solver++(2M), for any `model_fn(x, t)`; jax only (no Flax).

    from genjax.samplers import NoiseSchedule, ddpm_sample, ddim_sample, dpm_solver_sample
    sched = NoiseSchedule.linear(num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    x0 = ddpm_sample(model_fn, sched, x_T, rng, num_steps=None)          # None = all T steps; fewer = strided
    x0 = ddim_sample(model_fn, sched, x_T, num_steps=50, eta=0.0, rng=None)
    x0 = dpm_solver_sample(model_fn, sched, x_T, num_steps=20)           # DPM-Solver++ (2M)

`model_fn(x, t) -> prediction`: x float32 [batch, ...], t int32 [batch] training timesteps in [0, T); the output
(any float dtype, e.g. bfloat16) has x's shape and is read as `prediction="epsilon" | "v" | "x0"`. Every sampler
takes `clip_denoised=(lo, hi)` (clip the predicted x0 each step, e.g. (-1, 1) for images) and returns float32 x0.
All schedule and update arithmetic is float32 whatever the model's dtype.

Step placement. DDPM/DDIM visit `num_steps` timesteps evenly spaced from T-1 downwards ("trailing" spacing:
t_i = T-1 - floor(i T / n)); DPM-Solver++ visits timesteps uniform in log-SNR from T-1 to 0. In every sampler the
last step goes to the clean sample (alpha-bar = 1), i.e. returns the predicted x0. DDPM with fewer steps is the
exact strided posterior q(x_{t'} | x_t, x0_hat) with t' the previous *visited* timestep (DDIM with eta = 1).
DDIM's eta > 0 draws fresh noise from `rng` (folded with the step index) and needs `rng`.

Compilation. A sampler's whole loop is one XLA program: a `lax.fori_loop` over a timestep table padded to T + 1
entries with the step count as data, so `num_steps`, `eta`, `clip_denoised`, the schedule's values, x_T's values and
the rng are runtime values: changing them compiles nothing new (DDPM and DDIM share one program). What *is* part of
the compiled program's key: x_T's shape/dtype/sharding, T, `prediction`, the sampler family, and the model function:

  * array leaves of a pytree `model_fn` are traced: pass `jax.tree_util.Partial(apply_fn, params)` and new params
    (a new checkpoint, EMA weights) or a new guidance scale / label (`classifier_free_guidance` returns such a
    Partial) reuse the compiled program as long as `apply_fn` is the same function object;
  * any other `model_fn` (a plain function or closure) is keyed by identity: build it once and reuse it; a fresh
    `lambda x, t: apply(params, x, t)` on every call compiles every call;
  * or call the sampler inside your own `jax.jit` (it is traceable; num_steps / eta may then be tracers, clamped to
    [1, T] and used as given): everything then lives in your program and is compiled once with it.

Vmappable (e.g. over rng or a stack of x_T), and sharding-transparent: place x_T with a `NamedSharding` over a
device mesh (batch axis sharded) and the loop runs data-parallel with the same result as on one device.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from genjax.samplers.guidance import classifier_free_guidance
from genjax.samplers.schedules import PREDICTIONS, NoiseSchedule, check_prediction

__all__ = ["NoiseSchedule", "ddpm_sample", "ddim_sample", "dpm_solver_sample", "classifier_free_guidance",
           "PREDICTIONS", "uniform_timesteps", "log_snr_timesteps"]

_MAX_T = 46340  # T * (T + 1) must fit int32 for the exact integer timestep table.


# --------------------------------------------------------------------------------------------- public samplers
def ddpm_sample(model_fn: Callable, sched: NoiseSchedule, x_T, rng, num_steps=None, *,
                prediction: str = "epsilon", clip_denoised: Optional[tuple[float, float]] = None) -> jax.Array:
  """Ancestral DDPM sampling (posterior variance), exact on strided steps.

  Args:
    model_fn: `(x [B, ...] float32, t int32 [B]) -> prediction` (see module docstring for compile caching).
    sched: the model's training `NoiseSchedule` (T timesteps).
    x_T: starting noise [B, ...] (standard normal).
    rng: PRNG key (legacy uint32[2] or typed) for the per-step noise; required.
    num_steps: number of model calls, 1..T; None = T (every training step); fewer = evenly strided.
    prediction: what model_fn predicts: "epsilon" | "v" | "x0".
    clip_denoised: optional (lo, hi) clip of the predicted x0 at every step.

  Returns:
    float32 samples shaped like x_T.
  """
  if rng is None:
    raise ValueError("ddpm_sample needs rng (a PRNG key) for its per-step noise; got rng=None")
  steps = sched.num_timesteps if num_steps is None else num_steps
  return _run_sampler("ddim", model_fn, sched, x_T, rng, steps, 1.0, prediction, clip_denoised)


def ddim_sample(model_fn: Callable, sched: NoiseSchedule, x_T, num_steps=50, eta=0.0, rng=None, *,
                prediction: str = "epsilon", clip_denoised: Optional[tuple[float, float]] = None) -> jax.Array:
  """DDIM sampling (Song et al. 2021): eta = 0 deterministic, eta = 1 equals strided DDPM.

  Args:
    model_fn, sched, x_T, prediction, clip_denoised: as in `ddpm_sample`.
    num_steps: number of model calls, 1..T (evenly strided, last step to the clean sample).
    eta: noise level in [0, 1]; > 0 draws noise from `rng` (required then; also when eta is a traced value).
    rng: PRNG key, or None for deterministic sampling (eta = 0).

  Returns:
    float32 samples shaped like x_T.
  """
  if rng is None:
    eta_value = _concrete(eta)
    if eta_value is None:
      raise ValueError("ddim_sample got a traced eta and rng=None: pass rng (a PRNG key) when eta may be > 0")
    if np.any(eta_value != 0):
      raise ValueError(f"ddim_sample with eta={eta_value} > 0 adds noise and needs rng (a PRNG key); got rng=None")
  return _run_sampler("ddim", model_fn, sched, x_T, rng, num_steps, eta, prediction, clip_denoised)


def dpm_solver_sample(model_fn: Callable, sched: NoiseSchedule, x_T, num_steps=20, *,
                      prediction: str = "epsilon", clip_denoised: Optional[tuple[float, float]] = None) -> jax.Array:
  """DPM-Solver++(2M) (Lu et al. 2022), deterministic multistep solver on the data prediction.

  `num_steps` model calls at timesteps uniform in log-SNR from T-1 to 0; second-order multistep updates, the first
  step and the final step to the clean sample first order.

  Args:
    model_fn, sched, x_T, prediction, clip_denoised: as in `ddpm_sample`.
    num_steps: number of model calls, 1..T.

  Returns:
    float32 samples shaped like x_T.
  """
  return _run_sampler("dpm", model_fn, sched, x_T, None, num_steps, 0.0, prediction, clip_denoised)


# --------------------------------------------------------------------------------------------- argument handling
def _concrete(value) -> Optional[np.ndarray]:
  """The host value of `value`, or None when it is a tracer (inside the caller's jit / vmap)."""
  try:
    return np.asarray(value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _is_array(leaf) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _split_model(model_fn):
  """(array leaves to trace, hashable static rest) of a possibly-pytree callable (see module docstring)."""
  if not callable(model_fn):
    raise ValueError(f"model_fn must be callable (x, t) -> prediction, got {type(model_fn)}")
  leaves, treedef = jax.tree_util.tree_flatten(model_fn)
  # Weak-typed leaves (from Python scalars) are made strong so that they share the strong leaves' program.
  dynamic = tuple((leaf.astype(leaf.dtype) if getattr(leaf, "weak_type", False) else leaf) if _is_array(leaf)
                  else None for leaf in leaves)
  static = (treedef, tuple(None if _is_array(leaf) else leaf for leaf in leaves))
  try:
    hash(static)
  except TypeError as e:
    raise ValueError(f"model_fn has an unhashable non-array part ({e}); wrap arrays/params in a "
                     "jax.tree_util.Partial or close over them in a function built once") from None
  return dynamic, static


def _join_model(dynamic, static):
  treedef, static_leaves = static
  leaves = [d if s is None else s for d, s in zip(dynamic, static_leaves)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _as_key(rng):
  """A typed PRNG key (legacy uint32[2] keys are wrapped) so that every call shares one compiled program."""
  if rng is None:
    return jax.random.key(0)  # unused: eta is 0 on this path (checked by the caller)
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  if rng.dtype != jnp.uint32 or rng.shape[-1:] != (2,):
    raise ValueError(f"rng must be a PRNG key (jax.random.key or PRNGKey), got dtype {rng.dtype} shape {rng.shape}")
  return jax.random.wrap_key_data(rng)


def _run_sampler(method, model_fn, sched, x_T, rng, num_steps, eta, prediction, clip_denoised):
  """Validates the public arguments, normalises them to fixed-dtype arrays and calls the jitted loop."""
  if not isinstance(sched, NoiseSchedule):
    raise ValueError(f"sched must be a genjax NoiseSchedule, got {type(sched)}")
  check_prediction(prediction)
  T = sched.num_timesteps
  if T > _MAX_T:
    raise ValueError(f"schedules longer than {_MAX_T} timesteps are not supported, got T={T}")
  x_T = jnp.asarray(x_T) if not isinstance(x_T, jax.Array) else x_T
  if x_T.ndim < 1 or not jnp.issubdtype(x_T.dtype, jnp.floating):
    raise ValueError(f"x_T must be a float array [batch, ...], got dtype {x_T.dtype} shape {x_T.shape}")
  n = _concrete(num_steps)
  if n is not None and (n.ndim != 0 or not np.issubdtype(n.dtype, np.integer) or not 1 <= int(n) <= T):
    raise ValueError(f"num_steps must be an int in [1, {T}] (the schedule length), got {num_steps!r}")
  e = _concrete(eta)
  if e is not None and (e.ndim != 0 or not 0.0 <= float(e) <= 1.0):
    raise ValueError(f"eta must be a scalar in [0, 1], got {eta!r}")
  if clip_denoised is None:
    lo, hi = -np.inf, np.inf
  else:
    if len(clip_denoised) != 2:
      raise ValueError(f"clip_denoised must be None or a (lo, hi) pair, got {clip_denoised!r}")
    lo, hi = clip_denoised
    lo_c, hi_c = _concrete(lo), _concrete(hi)
    if lo_c is not None and hi_c is not None and not np.all(lo_c < hi_c):
      raise ValueError(f"clip_denoised needs lo < hi, got {clip_denoised!r}")
  dynamic, static = _split_model(model_fn)
  return _sample_loop(dynamic, sched, x_T.astype(jnp.float32), _as_key(rng), jnp.asarray(num_steps, jnp.int32),
                      jnp.asarray(eta, jnp.float32), jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32),
                      model_static=static, method=method, prediction=prediction)


# --------------------------------------------------------------------------------------------- timestep tables
def uniform_timesteps(num_steps, num_timesteps: int) -> jax.Array:
  """int32 [T + 1]: `num_steps` timesteps T-1 - floor(i T / n), strictly decreasing, then -1 (clean) padding."""
  i = jnp.arange(num_timesteps + 1, dtype=jnp.int32)
  ts = (num_timesteps - 1) - (i * num_timesteps) // num_steps
  return jnp.where(i < num_steps, ts, -1)


# The log-SNR grid starts no lower than this. Below it (SNR < 3e-5) the data term of x_t is lost in the noise and a
# step changes nothing: the linear DDPM schedule ends at -10.1, but the cosine schedule at -19.8, where a grid
# uniform from lambda_T would spend 2 of 5 steps (t = 999 -> 998 -> 943). DPM-Solver's reference code truncates
# its cosine schedule at t = 0.9946 (lambda ~ -9.6) for the same reason. The first step still starts at T - 1.
LOG_SNR_FLOOR = -10.5


def log_snr_timesteps(sched: NoiseSchedule, num_steps) -> jax.Array:
  """int32 [T + 1]: `num_steps` timesteps from T-1 to 0, the ones after T-1 uniform in log-SNR between
  max(lambda_{T-1}, LOG_SNR_FLOOR) and lambda_0 (rounded to integers, made strictly decreasing), then -1 (clean)
  padding."""
  T = sched.num_timesteps
  lam = sched.log_snr  # decreasing in t
  i = jnp.arange(T + 1, dtype=jnp.int32)
  frac = i.astype(jnp.float32) / jnp.maximum(num_steps - 1, 1).astype(jnp.float32)
  start = jnp.maximum(lam[T - 1], LOG_SNR_FLOOR)
  target = start + frac * (lam[0] - start)
  t = jnp.round(jnp.interp(-target, -lam, jnp.arange(T, dtype=jnp.float32))).astype(jnp.int32)
  t = jnp.where(i == 0, T - 1, t)
  t = jnp.maximum(t, num_steps - 1 - i)  # leave room for the remaining steps ...
  t = jax.lax.cummin(t + i) - i  # ... and make the table strictly decreasing
  return jnp.where(i < num_steps, t, -1)


# --------------------------------------------------------------------------------------------- the compiled loop
def _log_abar(sched: NoiseSchedule, t) -> jax.Array:
  """log(alpha-bar_t) for a scalar int timestep; t = -1 is the clean sample (log 1 = 0)."""
  return jnp.where(t >= 0, sched.log_alphas_cumprod[jnp.maximum(t, 0)], 0.0)


def _predict_x0_eps(model_fn, sched, x, t, prediction, lo, hi):
  """(clipped x0_hat, eps_hat consistent with it) from one model call at scalar timestep t, in float32."""
  pred = model_fn(x, jnp.full((x.shape[0],), t, jnp.int32))
  if getattr(pred, "shape", None) != x.shape:
    raise ValueError(f"model_fn returned shape {getattr(pred, 'shape', type(pred))}, expected x's shape {x.shape}")
  x0, eps = sched.split_prediction(pred.astype(jnp.float32), x, t, prediction)
  x0_clipped = jnp.clip(x0, lo, hi)
  eps = jnp.where(x0_clipped == x0, eps, sched.eps_from_x0(x0_clipped, x, t))
  return x0_clipped, eps


@functools.partial(jax.jit, static_argnames=("model_static", "method", "prediction"))
def _sample_loop(model_dynamic, sched, x_T, rng, num_steps, eta, lo, hi, *, model_static, method, prediction):
  model_fn = _join_model(model_dynamic, model_static)
  T = sched.num_timesteps
  num_steps = jnp.clip(num_steps, 1, T)
  if method == "ddim":
    ts = uniform_timesteps(num_steps, T)

    def ddim_step(i, x):
      t, t_next = ts[i], ts[i + 1]
      x0, eps = _predict_x0_eps(model_fn, sched, x, t, prediction, lo, hi)
      la, la_next = _log_abar(sched, t), _log_abar(sched, t_next)
      one_minus, one_minus_next = -jnp.expm1(la), -jnp.expm1(la_next)
      # sigma_t(eta)^2 = eta^2 (1 - abar') / (1 - abar) (1 - abar / abar'), abar' the next visited timestep's.
      var = eta ** 2 * (one_minus_next / one_minus) * -jnp.expm1(la - la_next)
      direction = jnp.sqrt(jnp.maximum(one_minus_next - var, 0.0))
      noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
      return jnp.exp(0.5 * la_next) * x0 + direction * eps + jnp.sqrt(var) * noise

    return jax.lax.fori_loop(0, num_steps, ddim_step, x_T)

  ts = log_snr_timesteps(sched, num_steps)

  def dpm_step(i, carry):
    x, x0_prev, h_prev = carry
    t, t_next = ts[i], ts[i + 1]
    x0, _ = _predict_x0_eps(model_fn, sched, x, t, prediction, lo, hi)
    clean = t_next < 0
    la, la_next = _log_abar(sched, t), _log_abar(sched, jnp.where(clean, 0, t_next))
    lam = 0.5 * (la - jnp.log(-jnp.expm1(la)))  # lambda = log(alpha / sigma)
    lam_next = 0.5 * (la_next - jnp.log(-jnp.expm1(la_next)))
    h = jnp.where(clean, 1.0, lam_next - lam)
    # 2M: D = x0 + (h / 2 h_prev) (x0 - x0_prev); first order on the first step and the final step to clean.
    second = (i > 0) & ~clean
    d = x0 + jnp.where(second, h / (2.0 * h_prev), 0.0) * (x0 - x0_prev)
    sigma_ratio = jnp.exp(0.5 * (jnp.log(-jnp.expm1(la_next)) - jnp.log(-jnp.expm1(la))))
    coef_x = jnp.where(clean, 0.0, sigma_ratio)
    coef_d = jnp.where(clean, 1.0, -jnp.exp(0.5 * la_next) * jnp.expm1(-h))
    return coef_x * x + coef_d * d, x0, h

  init = (x_T, jnp.zeros_like(x_T), jnp.ones((), jnp.float32))
  return jax.lax.fori_loop(0, num_steps, dpm_step, init)[0]
