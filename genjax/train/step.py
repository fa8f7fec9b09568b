"""The train state and the one jitted train step, for any Task.

    state = init_state(task, rng, example_batch, ema_decay)        # pure; the trainer jits it with shardings
    step_fn = make_train_step(task, ema_decay=0.999, grad_accum_steps=1, axis_name=None)
    state, metrics = step_fn(state, batch)                          # pjit path: jax.jit; pmap path: axis_name set
    abstract = abstract_state(task, config, example_batch)         # shapes and dtypes only, for shardings / restore
    step_fn = make_train_step(task, **step_kwargs(config))          # the step's settings from a run config

Inside one step the phases run in order; phase i differentiates its loss w.r.t. `params[phase.params_key]` only
and updates that sub-tree with its own optimizer. Gradients are averaged over micro-batches (a scan) when
`grad_accum_steps > 1`, and over devices with `lax.pmean` on the pmap path (the pjit path needs nothing: the loss
is already a mean over the global batch). Metrics: each phase's loss and aux metrics and `grad_norm` (prefixed
"<phase>/" when there are several phases), and `finite` (1.0 when every loss and gradient was finite).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from genjax.core.task import Task


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar: number of updates applied
  params: Any
  opt_states: tuple          # one optimizer state per phase
  ema_params: Any            # None when EMA is off
  rng: jax.Array             # raw uint32[2] key; the step's key is fold_in(rng, step)

  @property
  def eval_params(self):
    """The params sampling and evaluation use: the EMA when there is one."""
    return self.params if self.ema_params is None else self.ema_params


def select(params: Any, key: Optional[str]) -> Any:
  return params if key is None else params[key]


def merge(params: Any, key: Optional[str], sub: Any) -> Any:
  return sub if key is None else {**params, key: sub}


def init_state(task: Task, rng: jax.Array, example_batch: dict, ema_decay: float) -> TrainState:
  init_rng, train_rng = jax.random.split(rng)
  params = nn.unbox(task.init(init_rng, example_batch))
  opt_states = tuple(ph.optimizer.init(select(params, ph.params_key)) for ph in task.phases)
  ema = jax.tree.map(jnp.copy, params) if ema_decay > 0 else None
  return TrainState(jnp.zeros((), jnp.int32), params, opt_states, ema, train_rng)


def shapes_task(task: Task) -> Task:
  """The task whose init the abstract evaluations trace: `task.shape_init` in place of init when it has one."""
  return task if task.shape_init is None else dataclasses.replace(task, init=task.shape_init)


def abstract_state(task: Task, config, example_batch: dict) -> TrainState:
  """Shapes and dtypes of the TrainState (no arrays allocated; `task.shape_init` when given)."""
  init_fn = functools.partial(init_state, shapes_task(task), ema_decay=float(config.ema_decay))
  return jax.eval_shape(init_fn, jax.random.PRNGKey(0), example_batch)


def step_kwargs(config) -> dict:
  """`make_train_step`'s settings from a run config (`ema_decay`, `grad_accum_steps`)."""
  return dict(ema_decay=float(config.ema_decay), grad_accum_steps=int(config.grad_accum_steps))


def check_batch(batch: dict) -> None:
  """Every field of a batch has the same rows (checked while tracing: a chex error naming the field, not a
  broadcasting error deep inside a loss)."""
  leaves = jax.tree.leaves(batch)
  if leaves:
    chex.assert_tree_shape_prefix(batch, leaves[0].shape[:1])


def _micro_batches(batch: dict, k: int) -> dict:
  """[B, ...] → [k, B/k, ...], micro-batch j = rows j, j+k, ... so each stays spread over the devices."""
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} is not divisible by grad_accum_steps={k}")
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def _accumulated(grad_fn, sub, batch, k: int):
  """((loss, aux), grads) averaged over k micro-batches, one at a time (a scan: activations of one in memory)."""
  def body(carry, micro):
    return jax.tree.map(jnp.add, carry, grad_fn(sub, micro)), None

  micro = _micro_batches(batch, k)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(grad_fn, sub, jax.tree.map(lambda x: x[0], micro)))
  total, _ = jax.lax.scan(body, zeros, micro)
  return jax.tree.map(lambda x: x / k, total)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(task: Task, *, ema_decay: float, grad_accum_steps: int = 1, axis_name: Optional[str] = None):
  """The pure step function `(state, batch) -> (state, metrics)`; the caller jits or pmaps it."""
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
  several = len(task.phases) > 1

  def step_fn(state: TrainState, batch: dict):
    check_batch(batch)
    rng = jax.random.fold_in(state.rng, state.step)
    params, opt_states, metrics, finite = state.params, [], {}, jnp.array(True)
    for i, phase in enumerate(task.phases):
      phase_rng = jax.random.fold_in(rng, i)
      sub = select(params, phase.params_key)

      def loss_of(sub, b, params=params, phase=phase, phase_rng=phase_rng):
        return phase.loss_fn(merge(params, phase.params_key, sub), b, phase_rng, state.step)

      grad_fn = jax.value_and_grad(loss_of, has_aux=True)
      (loss, aux), grads = (grad_fn(sub, batch) if grad_accum_steps == 1
                            else _accumulated(grad_fn, sub, batch, grad_accum_steps))
      if axis_name is not None:
        loss, aux, grads = jax.lax.pmean((loss, aux, grads), axis_name)
      finite = finite & _all_finite((loss, grads))
      updates, opt_state = phase.optimizer.update(grads, state.opt_states[i], sub)
      params = merge(params, phase.params_key, optax.apply_updates(sub, updates))
      opt_states.append(opt_state)
      prefix = f"{phase.name}/" if several else ""
      metrics.update({f"{prefix}{k}": v for k, v in {**aux, "loss": loss, "grad_norm": optax.tree.norm(grads)}.items()})
    ema = state.ema_params
    if ema is not None:
      # Warm-up (1 + t) / (10 + t) so short runs get a useful average; `ema_decay` once t is large.
      decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
      ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
    metrics["finite"] = finite.astype(jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_states=tuple(opt_states), ema_params=ema)
    return new_state, metrics

  return step_fn
