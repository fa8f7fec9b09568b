"""Where a diffusion sampler's steps go: timestep grids ("spacings") and explicit user grids, as padded tables.

    from genjax.samplers import NoiseSchedule, make_timesteps
    schedule = NoiseSchedule.linear()
    make_timesteps(schedule, 10, spacing="trailing")      # [999 899 799 699 599 499 399 299 199  99]
    make_timesteps(schedule, 10, spacing="leading", steps_offset=1)   # [901 801 ... 101 1]
    make_timesteps(schedule, 10, spacing="karras")        # float32 timesteps (the model then gets float t)

A grid is `num_steps` strictly decreasing timesteps in [0, T-1] (the points where the model is called); every
sampler then takes one more step from the last of them to the clean sample (alpha-bar = 1), i.e. returns the
predicted x0 there. Spacings, for n = num_steps (diffusers' names and formulas where diffusers has them):

  * "trailing": round(T - i T / n) - 1, i = 0..n-1: from T-1 down to about T/n - 1 (diffusers' "trailing",
    Lin et al. 2024); for n dividing T the even stride T-1, T-1 - T/n, ...
  * "leading": (n-1-i) * (T // n) + steps_offset (diffusers' "leading": Stable Diffusion uses steps_offset=1; an
    offset is capped where the first step would pass T-1). It rarely visits T-1: the first step treats x_T as a
    sample at a slightly lower noise level, which measures as slightly *more* accurate for DDIM (see
    `ddim_sample`).
  * "linspace": round((T-1) (n-1-i) / (n-1)): from T-1 to 0 inclusive (diffusers DDIM's "linspace").
  * "log_snr": T-1, then uniform in log-SNR lambda = log(abar / (1 - abar)) from max(lambda_{T-1}, LOG_SNR_FLOOR)
    to lambda_0, rounded (DPM-Solver's "logSNR" grid, Lu et al. 2022; the floor is measured, see below).
  * "karras": sigma_i = (sigma_max^(1/7) + i/(n-1) (sigma_min^(1/7) - sigma_max^(1/7)))^7 (Karras et al. 2022,
    rho = 7) between the schedule's sigma at T-1 and at 0, as float timesteps `schedule.sigma_to_t(sigma_i)`.

Inside the samplers a grid is a table of length T + 1 padded with -1 (the clean sample), so that the step count is
a runtime value: `spacing_table` builds it from a traced `num_steps`, `explicit_table` pads a user's `timesteps=`.
Integer grids give the model int32 `t`; float grids ("karras", or float `timesteps=`) give it float32 `t`, the
noise level whose log-sigma interpolates the neighbouring training timesteps' (`NoiseSchedule.t_to_sigma`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import UserError
from genjax.samplers.schedules import NoiseSchedule

SPACINGS = ("trailing", "leading", "linspace", "log_snr", "karras")

# The log-SNR grid's uniform part starts no lower than this (the first step still starts at T-1). Measured on
# Gaussian-mixture ODEs (benchmarks.sampler_accuracy: a ring, wide and narrow 1-D mixtures; linear and cosine
# schedules), RMSE of DPM-Solver++ 2M at NFE 5 / 10 / 20 / 50 with the floor at -10.5 / -6: linear 0.110 / 0.049 /
# 5.7e-3 / 1.1e-3 vs 0.089 / 0.021 / 3.3e-3 / 7.0e-4; cosine 0.121 / 0.055 / 6.4e-3 / 9.7e-4 vs 0.120 / 0.022 /
# 3.4e-3 / 5.8e-4 (UniPC and 3M alike). Below it (SNR < 2.5e-3) the data prediction is nearly constant and one
# step crosses it; the cosine schedule ends at -19.8, the linear at -10.1. -6 is also below Stable Diffusion's
# own end (-5.4), so no grid starts above a schedule's noisiest training level by more than that first step.
LOG_SNR_FLOOR = -6.0
KARRAS_RHO = 7.0


def check_spacing(spacing: str) -> str:
  if spacing not in SPACINGS:
    raise UserError(f"spacing={spacing!r} is not one of: {', '.join(SPACINGS)}")
  return spacing


def _round_div(a, b):
  """round(a / b) for int32 arrays a >= 0, b > 0, halves to even (numpy's rounding), exact."""
  q, r = a // b, a % b
  return q + ((2 * r > b) | ((2 * r == b) & (q % 2 == 1))).astype(a.dtype)


@functools.partial(jax.jit, static_argnames=("spacing",))
def spacing_table(schedule: NoiseSchedule, num_steps, spacing: str, steps_offset=0) -> jax.Array:
  """The grid of `spacing` as a table [T + 1] padded with -1: int32, or float32 for "karras". `num_steps` (and
  `steps_offset`) may be traced; num_steps is clamped to [1, T]."""
  check_spacing(spacing)
  T = schedule.num_timesteps
  n = jnp.clip(jnp.asarray(num_steps, jnp.int32), 1, T)
  i = jnp.arange(T + 1, dtype=jnp.int32)
  k = jnp.minimum(i, n - 1)  # valid index; padded rows are overwritten below
  if spacing == "trailing":
    t = T - _round_div(k * T, n) - 1
  elif spacing == "leading":
    room = (T - 1) - (n - 1) * (T // n)  # the largest offset that keeps the first step at or below T-1
    t = (n - 1 - k) * (T // n) + jnp.minimum(jnp.asarray(steps_offset, jnp.int32), room)
  elif spacing == "linspace":
    t = _round_div((T - 1) * (n - 1 - k), jnp.maximum(n - 1, 1))
  elif spacing == "log_snr":
    t = _log_snr_grid(schedule, n, i)
  else:
    ls = schedule.log_sigmas
    finite_max = jnp.max(jnp.where(jnp.isfinite(ls), ls, -jnp.inf))  # a zero-terminal-SNR end has sigma = inf
    hi, lo = jnp.exp(finite_max / KARRAS_RHO), jnp.exp(ls[0] / KARRAS_RHO)
    frac = k.astype(jnp.float32) / jnp.maximum(n - 1, 1).astype(jnp.float32)
    t = schedule.sigma_to_t((hi + frac * (lo - hi)) ** KARRAS_RHO)
    t = jnp.where(k == 0, jnp.where(jnp.isfinite(ls[-1]), T - 1.0, t), t)
    return jnp.where(i < n, t, -1.0).astype(jnp.float32)
  return jnp.where(i < n, t, -1).astype(jnp.int32)


def _log_snr_grid(schedule, n, i):
  T = schedule.num_timesteps
  lam = schedule.log_snr  # decreasing in t
  frac = i.astype(jnp.float32) / jnp.maximum(n - 1, 1).astype(jnp.float32)
  start = jnp.maximum(lam[T - 1], LOG_SNR_FLOOR)
  target = start + frac * (lam[0] - start)
  t = jnp.round(jnp.interp(-target, -lam, jnp.arange(T, dtype=jnp.float32))).astype(jnp.int32)
  t = jnp.where(i == 0, T - 1, t)
  t = jnp.maximum(t, n - 1 - i)  # leave room for the remaining steps ...
  return jax.lax.cummin(t + i) - i  # ... and make the table strictly decreasing


def explicit_table(schedule: NoiseSchedule, timesteps) -> tuple[jax.Array, int]:
  """(table [T + 1] padded with -1, num_steps) for a user grid `timesteps`: concrete, 1-D, strictly decreasing,
  in [0, T-1]; int grids stay int32, float grids become float32."""
  T = schedule.num_timesteps
  ts = np.asarray(timesteps)
  if ts.ndim != 1 or not 1 <= ts.shape[0] <= T:
    raise UserError(f"timesteps must be a 1-D grid of 1..{T} timesteps, got shape {ts.shape}")
  if not (np.issubdtype(ts.dtype, np.integer) or np.issubdtype(ts.dtype, np.floating)):
    raise UserError(f"timesteps must be ints or floats, got dtype {ts.dtype}")
  if not (np.all(np.diff(ts) < 0) and ts[-1] >= 0 and ts[0] <= T - 1):
    raise UserError(f"timesteps must be strictly decreasing within [0, {T - 1}], got {ts.tolist()}")
  dtype = np.int32 if np.issubdtype(ts.dtype, np.integer) else np.float32
  table = np.full((T + 1,), -1, dtype)
  table[:ts.shape[0]] = ts  # padded on the host: any grid length is the same [T + 1] program input
  return jnp.asarray(table), int(ts.shape[0])


def make_timesteps(schedule: NoiseSchedule, num_steps: int, spacing: str = "trailing", *,
                   steps_offset: int = 0) -> jax.Array:
  """The `num_steps` timesteps of `spacing` (see module docstring), for hand-written sampling loops."""
  if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= schedule.num_timesteps:
    raise UserError(f"num_steps must be an int in [1, {schedule.num_timesteps}], got {num_steps!r}")
  return jnp.asarray(np.asarray(spacing_table(schedule, num_steps, spacing, steps_offset))[:num_steps])
