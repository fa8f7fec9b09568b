"""Flow matching (rectified flow): the training objective and a jitted ODE sampler; jax only (no Flax).

    from genjax.samplers import FlowSchedule, flow_sample
    flow = FlowSchedule(shift=1.0)
    t = flow.sample_time(rng, batch)                       # float32 [B] in (0, 1), shifted like the sampler's grid
    x_t = flow.add_noise(x0, eps, t)                       # (1 - t) x0 + t eps
    loss = mean((velocity_fn(x_t, t) - flow.training_target(x0, eps, t)) ** 2)   # target: eps - x0
    x0 = flow_sample(velocity_fn, flow, x_T, num_steps=20, method="heun")         # x_T ~ N(0, I)

The data sits at t = 0 and standard normal noise at t = 1 (Liu et al. 2022; Lipman et al. 2022):
x_t = (1 - t) x0 + t eps, whose velocity dx_t/dt = eps - x0 is what `velocity_fn(x, t)` regresses; its minimiser is
E[eps - x0 | x_t], the drift of an ODE that carries N(0, I) at t = 1 to the data at t = 0. `flow_sample` integrates
that ODE from t = 1 to t = 0 over `num_steps` steps: "euler" (first order, 1 model call a step), "heun"
(trapezoidal, 2 calls) or "midpoint" (2 calls), both second order. `velocity_fn(x, t)` gets x float32 [B, ...] and
t float32 [B] in [0, 1] (scale it inside velocity_fn if the network was trained on another range).

Time shift (Esser et al. 2024, SD3): t -> shift t / (1 + (shift - 1) t) maps a uniform grid to one that spends more
steps at high noise for shift > 1; training with `sample_time` uses the same shift, so both see the same t law.

Compilation: one XLA program per (x_T shape/dtype, method, velocity_fn); `num_steps` and `shift` are runtime
values (the grid is computed inside the loop), so changing them compiles nothing. A pytree `velocity_fn`
(`jax.tree_util.Partial(apply_fn, params)`) has its arrays traced, as in `genjax.samplers.diffusion`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import UserError, check_choice, show
from genjax.samplers.diffusion import _concrete, _join_model, _split_model

__all__ = ["FlowSchedule", "flow_sample", "FLOW_METHODS", "shift_time"]

FLOW_METHODS = ("euler", "heun", "midpoint")


def shift_time(t, shift) -> jax.Array:
  """SD3's time shift shift * t / (1 + (shift - 1) * t): identity at shift = 1, fixes 0 and 1, float32."""
  t = jnp.asarray(t, jnp.float32)
  shift = jnp.asarray(shift, jnp.float32)
  return shift * t / (1.0 + (shift - 1.0) * t)


def _check_shift(shift) -> None:
  value = _concrete(shift)
  if value is not None and value.dtype == object:  # a placeholder leaf of a pytree transformation
    return
  if value is not None and (value.ndim != 0 or not float(value) > 0.0):
    raise UserError(f"flow time shift must be a scalar > 0 (1 = no shift), got {show(shift)}")


def _bcast(t: jax.Array, like: jax.Array) -> jax.Array:
  return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
  """The rectified-flow path x_t = (1 - t) x0 + t eps, t in [0, 1] (a pytree; `shift` is a traced float).

  Attributes:
    shift: SD3-style time shift applied to the uniform training times (`sample_time`) and the sampling grid.
  """
  shift: float = 1.0

  def __post_init__(self):
    _check_shift(self.shift)

  def sample_time(self, rng, batch: int) -> jax.Array:
    """float32 [batch] training times: shift_time(u, shift) with u ~ U(0, 1)."""
    return shift_time(jax.random.uniform(rng, (batch,), jnp.float32), self.shift)

  def add_noise(self, x0, noise, t) -> jax.Array:
    """x_t = (1 - t) x0 + t noise in float32; t float [batch] (or a scalar) in [0, 1]."""
    x0, noise = jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32)
    if x0.shape != noise.shape:
      raise UserError(f"noise has shape {noise.shape}, expected the data's shape {x0.shape}")
    t = _bcast(jnp.asarray(t, jnp.float32), x0)
    return (1.0 - t) * x0 + t * noise

  def training_target(self, x0, noise, t=None) -> jax.Array:
    """The velocity d x_t / dt = noise - x0 (independent of t), float32."""
    del t
    x0, noise = jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32)
    if x0.shape != noise.shape:
      raise UserError(f"noise has shape {noise.shape}, expected the data's shape {x0.shape}")
    return noise - x0

  def split_velocity(self, velocity, x_t, t) -> tuple[jax.Array, jax.Array]:
    """(x0_hat, eps_hat) implied by a velocity at (x_t, t): x0 = x_t - t v, eps = x_t + (1 - t) v."""
    velocity, x_t = jnp.asarray(velocity, jnp.float32), jnp.asarray(x_t, jnp.float32)
    t = _bcast(jnp.asarray(t, jnp.float32), x_t)
    return x_t - t * velocity, x_t + (1.0 - t) * velocity


jax.tree_util.register_dataclass(FlowSchedule, data_fields=["shift"], meta_fields=[])


def flow_sample(velocity_fn: Callable, schedule: FlowSchedule, x_T, *, num_steps, method: str = "euler",
                rng=None) -> jax.Array:
  """Integrates dx/dt = velocity_fn(x, t) from t = 1 (x_T, noise) to t = 0 (data).

  Args:
    velocity_fn: `(x float32 [B, ...], t float32 [B] in [0, 1]) -> velocity` shaped like x (any float dtype).
    schedule: the model's `FlowSchedule`; its `shift` (runtime) sets the grid t_i = shift_time(1 - i / num_steps).
    x_T: starting noise [B, ...] (standard normal) at t = 1.
    num_steps: number of steps (>= 1; runtime).
    method: "euler" (1 model call a step, order 1) | "heun" | "midpoint" (2 calls a step, order 2).
    rng: unused (the ODE is deterministic); accepted for the samplers' uniform call shape.

  Returns:
    float32 samples shaped like x_T.
  """
  del rng
  check_choice("method", method, FLOW_METHODS)
  if not isinstance(schedule, FlowSchedule):
    raise UserError(f"schedule must be a genjax FlowSchedule, got {type(schedule)}")
  n = _concrete(num_steps)
  if n is not None and (n.ndim != 0 or not np.issubdtype(n.dtype, np.integer) or int(n) < 1):
    raise UserError(f"num_steps must be an int >= 1, got {show(num_steps)}")
  x_T = jnp.asarray(x_T) if not isinstance(x_T, jax.Array) else x_T
  if x_T.ndim < 1 or not jnp.issubdtype(x_T.dtype, jnp.floating):
    raise UserError(f"x_T must be a float array [batch, ...], got dtype {x_T.dtype} shape {x_T.shape}")
  dynamic, static = _split_model(velocity_fn)
  return _flow_loop(dynamic, x_T.astype(jnp.float32), jnp.asarray(num_steps, jnp.int32),
                    jnp.asarray(schedule.shift, jnp.float32), model_static=static, method=method)


@functools.partial(jax.jit, static_argnames=("model_static", "method"))
def _flow_loop(model_dynamic, x_T, num_steps, shift, *, model_static, method):
  velocity_fn = _join_model(model_dynamic, model_static)
  num_steps = jnp.maximum(num_steps, 1)
  batch = x_T.shape[0]

  def velocity(x, t):
    v = velocity_fn(x, jnp.full((batch,), t, jnp.float32))
    if getattr(v, "shape", None) != x.shape:
      raise ValueError(f"velocity_fn returned shape {getattr(v, 'shape', type(v))}, expected x's shape {x.shape}")
    return v.astype(jnp.float32)

  def time(i):
    return shift_time(1.0 - i.astype(jnp.float32) / num_steps.astype(jnp.float32), shift)

  def step(i, x):
    t, t_next = time(i), time(i + 1)
    h = t_next - t  # negative: integrating towards the data
    v = velocity(x, t)
    if method == "euler":
      return x + h * v
    if method == "heun":
      v_end = velocity(x + h * v, t_next)
      return x + 0.5 * h * (v + v_end)
    return x + h * velocity(x + 0.5 * h * v, t + 0.5 * h)  # midpoint

  return jax.lax.fori_loop(0, num_steps, step, x_T)
