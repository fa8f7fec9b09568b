"""diffusers' Flax schedulers as peers for `benchmarks.sampler_accuracy`: the same model_fn, x_T and NFE.

    runners = peer_runners()        # {} when diffusers (a release with Flax schedulers, e.g. 0.39) is not importable
    for r in runners: x0 = r.sample(model_fn, schedule, x_T, num_steps)

Each runner is one scheduler class with one set of options, stepped in a jitted `lax.fori_loop` (num_steps static,
as their API requires; one program per step count). Options swept, each scheduler's default first:

  FlaxDDIMScheduler                 steps_offset 0 | 1, set_alpha_to_one True | False ("leading" grid, its only one)
  FlaxDPMSolverMultistepScheduler   solver_order 2 | 3, timestep_spacing "linspace" | "leading" | "trailing",
                                    solver_type "midpoint" | "heun" (lower_order_final=True, its default)

Every runner gets `clip_sample=False` / `thresholding=False` (genjax's samplers do not clip by default either; the
mixtures' data is not confined to [-1, 1]) and the schedule's own betas (`trained_betas`), `prediction_type`
"epsilon". An option that fails inside diffusers (e.g. "leading" in the DPM scheduler) is reported, not hidden.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class SchedulerCarry(NamedTuple):
  """The loop state of a diffusers Flax scheduler stepped in `lax.fori_loop`: the sample and the scheduler state."""
  x: jax.Array
  state: Any


@dataclasses.dataclass(frozen=True)
class PeerRunner:
  key: str                 # "diffusers_ddim" | "diffusers_dpm_2m" | "diffusers_dpm_3m": the sampler it is compared to
  variant: str             # "default" or the options that differ from the default, e.g. "steps_offset=1"
  scheduler_cls: type
  options: tuple           # ((name, value), ...) passed to the scheduler's constructor

  def _scheduler(self, schedule):
    betas = np.asarray(schedule.betas, np.float32)
    return self.scheduler_cls(num_train_timesteps=schedule.num_timesteps, trained_betas=betas,
                              prediction_type="epsilon", **dict(self.options))

  def sample(self, model_fn: Callable, schedule, x_T, num_steps: int) -> jax.Array:
    """x0 from x_T after `num_steps` scheduler steps (one model call each)."""
    scheduler = self._scheduler(schedule)
    state = scheduler.create_state()
    return _loop(self, schedule.num_timesteps)(state, model_fn, jnp.asarray(x_T, jnp.float32), num_steps)


@functools.lru_cache(maxsize=None)
def _loop(runner: PeerRunner, num_timesteps: int):
  """The jitted sampling loop of one runner (its step logic reads only the options, not the betas)."""
  scheduler = runner.scheduler_cls(num_train_timesteps=num_timesteps, trained_betas=np.full(num_timesteps, 0.01),
                                   prediction_type="epsilon", **dict(runner.options))

  @functools.partial(jax.jit, static_argnames="num_steps")
  def sample(state, model_fn, x_T, num_steps):
    state = scheduler.set_timesteps(state, num_steps, x_T.shape)

    def body(i, carry: SchedulerCarry) -> SchedulerCarry:
      x, state = carry.x, carry.state
      t = state.timesteps[i]
      eps = model_fn(x, jnp.full((x.shape[0],), t, jnp.int32))
      x, state = scheduler.step(state, eps, t, x, return_dict=False)[:2]
      return SchedulerCarry(x, state)

    return jax.lax.fori_loop(0, num_steps, body, SchedulerCarry(x_T, state)).x

  return sample


def peer_runners() -> list[PeerRunner]:
  """Every (scheduler, options) runner, defaults first; [] when diffusers' Flax schedulers cannot be imported."""
  try:
    from diffusers import FlaxDDIMScheduler, FlaxDPMSolverMultistepScheduler
  except (ImportError, RuntimeError):  # absent or no Flax schedulers; RuntimeError: diffusers' lazy import failed
    return []
  runners = []
  for offset, to_one in ((0, True), (1, True), (0, False), (1, False)):
    changed = [s for s, on in ((f"steps_offset={offset}", offset != 0), ("set_alpha_to_one=False", not to_one)) if on]
    runners.append(PeerRunner("diffusers_ddim", ",".join(changed) or "default", FlaxDDIMScheduler,
                              (("clip_sample", False), ("steps_offset", offset), ("set_alpha_to_one", to_one))))
  for order in (2, 3):
    for spacing in ("linspace", "leading", "trailing"):
      for solver_type in ("midpoint", "heun"):
        changed = [s for s, on in ((spacing, spacing != "linspace"), (f"solver_type={solver_type}",
                                                                        solver_type != "midpoint")) if on]
        runners.append(PeerRunner(f"diffusers_dpm_{order}m", ",".join(changed) or "default",
                                  FlaxDPMSolverMultistepScheduler,
                                  (("solver_order", order), ("timestep_spacing", spacing),
                                   ("solver_type", solver_type), ("thresholding", False))))
  return runners


LABELS = {"diffusers_ddim": "FlaxDDIMScheduler", "diffusers_dpm_2m": "FlaxDPMSolverMultistep 2M",
          "diffusers_dpm_3m": "FlaxDPMSolverMultistep 3M"}
# The genjax sampler each peer is compared with (goal (a) of the accuracy benchmark).
PEER_OF = {"diffusers_ddim": "ddim", "diffusers_dpm_2m": "dpm_solver_2m", "diffusers_dpm_3m": "dpm_solver_3m"}
