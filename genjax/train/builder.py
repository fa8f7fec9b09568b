"""The train step and state, built for the devices: one interface for both parallel paths.

    built = build(config, task, example_batch)          # config.parallel: "pjit" (here) or "pmap" (pmap_path.py)
    state = built.init_fn(jax.random.PRNGKey(config.seed))
    state, metrics = built.step_fn(state, built.put_batch(host_batch))
    global_state = built.view(state)                    # one logical state (for eval, sampling, the caller)

The loop (`genjax.train.trainer`), the benchmarks and the tests all get their step from here, so what they time or
check is what users train. "pjit": `jax.jit` with NamedShardings over a ("data", "fsdp", "tensor") mesh, the batch one
global array; optimizer-state leaves follow the params they belong to. "pmap": see `genjax.train.pmap_path`.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import optax

from genjax.errors import ConfigError
from genjax.core.task import Task
from genjax.train import parallel, pmap_path
from genjax.train.parallel import Built, with_shardings
from genjax.train.step import TrainState, abstract_state, init_state, make_train_step, select, shapes_task, step_kwargs


def state_shardings(task: Task, abstract: TrainState, param_sh: Any, repl) -> TrainState:
  """Optimizer-state leaves follow the params they belong to (optax.tree_map_params); the rest is replicated."""
  opt_sh = tuple(
      optax.tree_map_params(ph.optimizer, lambda _, s: s, opt_state, select(param_sh, ph.params_key),
                            transform_non_params=lambda _: repl)
      for ph, opt_state in zip(task.phases, abstract.opt_states))
  ema_sh = None if abstract.ema_params is None else param_sh
  return TrainState(step=repl, params=param_sh, opt_states=opt_sh, ema_params=ema_sh, rng=repl)


def _identity(x):
  return x


def build(config, task: Task, example_batch: dict, mesh: Optional[jax.sharding.Mesh] = None) -> Built:
  """The step, state layout and batch placement for `config.parallel` (`mesh`: pjit only; default from
  `config.mesh` over all devices). Raises ConfigError for a batch that does not split over the devices."""
  if config.parallel == "pmap":
    return pmap_path.build(config, task, example_batch)
  if config.parallel != "pjit":
    raise ConfigError(f"parallel={config.parallel!r} is not one of {parallel.PARALLEL_MODES}")
  mesh = parallel.make_mesh(config.mesh) if mesh is None else mesh
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % batch_devices:
    raise ConfigError(f"batch_size={config.batch_size} must be divisible by data×fsdp={batch_devices}")
  repl, batch_sh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  boxed = jax.eval_shape(shapes_task(task).init, jax.random.PRNGKey(0), example_batch)
  param_sh = parallel.param_shardings(boxed, mesh, config.param_sharding)
  abstract = abstract_state(task, config, example_batch)
  state_sh = state_shardings(task, abstract, param_sh, repl)
  init = jax.jit(functools.partial(init_state, task, ema_decay=float(config.ema_decay)), out_shardings=state_sh)
  step_fn = jax.jit(make_train_step(task, **step_kwargs(config)), in_shardings=(state_sh, batch_sh),
                    out_shardings=(state_sh, repl), donate_argnums=0)
  put_batch = functools.partial(parallel.global_batch, sharding=batch_sh)
  return Built(parallel="pjit", init_fn=lambda rng: init(rng, example_batch), step_fn=step_fn, put_batch=put_batch,
               put_eval_batch=put_batch, restore_target=with_shardings(abstract, state_sh), place=_identity,
               view=_identity, to_save=_identity, shardings=state_sh, mesh=mesh, batch_devices=batch_devices)
