"""The pmap path behind `genjax.train.builder.build`'s interface (`config.parallel = "pmap"`).

`jax.pmap` over this process's devices: the state is replicated (one copy per local device, stacked on a leading
axis), each device takes `batch / local devices` rows and gradients are averaged with `lax.pmean` over the "batch"
axis, so the trajectory equals the pjit path's. Evaluation and sampling use the first device's copy; checkpoints hold
one copy as host arrays (host-local device arrays cannot be saved by several processes).
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from genjax.core.task import Task
from genjax.train import parallel
from genjax.train.parallel import Built, with_shardings
from genjax.train.step import abstract_state, init_state, make_train_step, step_kwargs

AXIS_NAME = "batch"


def unreplicate(tree):
  """The first local device's copy, without the leading device axis."""
  return jax.tree.map(lambda x: x.addressable_data(0).reshape(x.shape[1:]), tree)


def replicate(tree, devices):
  """One copy per local device, stacked on a leading axis, as `jax.pmap` takes it."""
  host = jax.device_get(tree)
  return jax.pmap(lambda x: x, devices=devices)(
      jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)), host))


def build(config, task: Task, example_batch: dict) -> Built:
  devices = jax.local_devices()
  dev0 = jax.sharding.SingleDeviceSharding(devices[0])
  abstract = abstract_state(task, config, example_batch)
  place = functools.partial(replicate, devices=devices)
  init = jax.jit(functools.partial(init_state, task, ema_decay=float(config.ema_decay)))
  # No `devices=`: the step spans every process's devices, so `pmean` averages across hosts too (given only the
  # local devices, each host would average its own gradients and the hosts would drift apart).
  step_fn = jax.pmap(make_train_step(task, axis_name=AXIS_NAME, **step_kwargs(config)), axis_name=AXIS_NAME,
                     donate_argnums=0)
  return Built(parallel="pmap", init_fn=lambda rng: place(init(rng, example_batch)), step_fn=step_fn,
               put_batch=functools.partial(parallel.split_for_pmap, num_local_devices=len(devices)),
               put_eval_batch=lambda b: b,    # evaluated on the first local device
               restore_target=with_shardings(abstract, jax.tree.map(lambda _: dev0, abstract)), place=place,
               view=unreplicate, to_save=lambda s: jax.device_get(unreplicate(s)), shardings=None, mesh=None,
               batch_devices=jax.device_count())
