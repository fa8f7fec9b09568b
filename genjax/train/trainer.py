"""The one training loop. `experiments/train.py` calls `train_and_evaluate(config, workdir, task)`.

Sections, in order: setup (devices, data, step functions) → state (restore the latest checkpoint, or init) →
loop (step; every N steps: log, evaluate, sample a PNG grid, checkpoint) → finish (final eval, grid, checkpoint).
Nothing here knows which family it trains: the Task (genjax.train.task) says what to optimise.

Two parallel paths give the same trajectory: "pjit" — `jax.jit` with NamedShardings over a ("data", "fsdp",
"tensor") mesh, the batch one global array; "pmap" — `jax.pmap` over the local devices with the state replicated
and gradients averaged with `lax.pmean`. Multi-host works for both (call `jax.distributed.initialize` first, as
`experiments/train.py --multihost` does); process 0 writes logs, grids and config.
"""
from __future__ import annotations

import fcntl
import functools
import os
import signal
from typing import Any

import jax
import numpy as np
import optax
from absl import logging

from genjax import data as gdata
from genjax.train import parallel
from genjax.train.checkpoint import Checkpointer, load_config, save_config
from genjax.train.report import MetricsWriter, Progress, quiet_library_logs, save_image_grid
from genjax.train.step import TrainState, init_state, make_train_step, select
from genjax.train.task import Task


COMPUTE_DTYPES = ("float32", "bfloat16")


class NonFiniteLossError(FloatingPointError):
  """A loss or gradient became NaN/Inf; the message names the step and the last good checkpoint."""


def state_shardings(task: Task, abstract_state: TrainState, param_sh: Any, repl) -> TrainState:
  """Optimizer-state leaves follow the params they belong to (optax.tree_map_params); the rest is replicated."""
  opt_sh = tuple(
      optax.tree_map_params(ph.optimizer, lambda _, s: s, opt_state, select(param_sh, ph.params_key),
                            transform_non_params=lambda _: repl)
      for ph, opt_state in zip(task.phases, abstract_state.opt_states))
  ema_sh = None if abstract_state.ema_params is None else param_sh
  return TrainState(step=repl, params=param_sh, opt_states=opt_sh, ema_params=ema_sh, rng=repl)


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _unreplicate(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.addressable_data(0).reshape(x.shape[1:]), tree)


def _replicate(tree: Any, devices) -> Any:
  """One copy per local device, stacked on a leading axis, as `jax.pmap` takes it."""
  host = jax.device_get(tree)
  return jax.pmap(lambda x: x, devices=devices)(
      jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)), host))


class _Lock:
  """One run per workdir: a second process on the same workdir gets a clear error instead of interleaved writes."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self._f = open(self.path, "a+")
    try:
      fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._f.seek(0)
      holder = self._f.read().strip() or "another process"
      self._f.close()
      raise RuntimeError(f"workdir {workdir!r} is in use by another training run ({holder}; lock {self.path}); "
                         "wait for it to finish or choose another --workdir") from None
    # Who holds it, for the message above. The kernel drops the lock when the process dies (even by kill -9).
    import time
    self._f.seek(0)
    self._f.truncate()
    self._f.write(f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    self._f.flush()

  def release(self):
    fcntl.flock(self._f, fcntl.LOCK_UN)
    self._f.close()


def _due(step: int, every: int, last: int) -> bool:
  """Every `every` steps and at the last step; 0 = only at the last step; negative = never."""
  return every >= 0 and (step == last or (every > 0 and step % every == 0))


def check_config(config) -> None:
  if config.parallel not in parallel.PARALLEL_MODES:
    raise ValueError(f"parallel={config.parallel!r} is not one of {parallel.PARALLEL_MODES}")
  for key in ("num_train_steps", "batch_size", "log_every_steps", "grad_accum_steps", "keep_checkpoints"):
    if int(config[key]) < 1:
      raise ValueError(f"{key}={config[key]!r} must be >= 1")
  if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
    raise ValueError(f"seed={config.seed!r} must be an int >= 0")
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype={config.compute_dtype!r} is not one of {COMPUTE_DTYPES}")
  if not 0.0 <= float(config.ema_decay) < 1.0:
    raise ValueError(f"ema_decay={config.ema_decay!r} must be in [0, 1)")


def train_and_evaluate(config, workdir: str, task: Task) -> TrainState:
  """Trains `task` as `config` says, in `workdir`; resumes from the latest checkpoint there."""
  # ---- setup -------------------------------------------------------------------------------------------------
  check_config(config)
  quiet_library_logs()
  pid, nproc = jax.process_index(), jax.process_count()
  os.makedirs(workdir, exist_ok=True)
  if not os.access(workdir, os.W_OK):
    raise PermissionError(f"workdir {workdir!r} is not writable")
  lock = _Lock(workdir) if pid == 0 else None
  try:
    return _train(config, workdir, task, pid, nproc)
  finally:
    if lock:
      lock.release()


def _train(config, workdir: str, task: Task, pid: int, nproc: int) -> TrainState:
  if os.path.exists(os.path.join(workdir, "config.json")):
    old = load_config(workdir)
    if old.get("family") != config.family:
      raise ValueError(f"workdir {workdir!r} holds a {old.get('family')!r} run; this config trains "
                       f"{config.family!r}. Use another --workdir.")
  train_src = gdata.get_source(config.dataset, config.dataset.train_split)
  train_it = gdata.train_iterator(train_src, global_batch=config.batch_size, seed=config.seed,
                                  process_index=pid, process_count=nproc)
  example = next(gdata.eval_batches(train_src, global_batch=nproc, num_batches=1, process_index=0,
                                    process_count=nproc))
  rng = jax.random.PRNGKey(config.seed)
  ema_decay = float(config.ema_decay)
  init_fn = functools.partial(init_state, task, ema_decay=ema_decay)
  abstract_state = jax.eval_shape(init_fn, rng, example)
  step_kwargs = dict(ema_decay=ema_decay, grad_accum_steps=int(config.grad_accum_steps))

  if config.parallel == "pjit":
    mesh = parallel.make_mesh(config.mesh)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % batch_devices:
      raise ValueError(f"batch_size={config.batch_size} must be divisible by data×fsdp={batch_devices}")
    repl, batch_sh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    boxed = jax.eval_shape(task.init, rng, example)
    param_sh = parallel.param_shardings(boxed, mesh, config.param_sharding)
    state_sh = state_shardings(task, abstract_state, param_sh, repl)
    restore_target = _with_shardings(abstract_state, state_sh)
    init_jit = jax.jit(init_fn, out_shardings=state_sh)
    step_fn = jax.jit(make_train_step(task, **step_kwargs), in_shardings=(state_sh, batch_sh),
                      out_shardings=(state_sh, repl), donate_argnums=0)
    put_batch = functools.partial(parallel.global_batch, sharding=batch_sh)
    eval_view = lambda s: s            # noqa: E731  (sharded arrays go straight into jitted eval/sample)
    place = lambda s: s                # noqa: E731
    put_eval_batch = put_batch
  else:
    devices = jax.local_devices()
    dev0 = jax.sharding.SingleDeviceSharding(devices[0])
    restore_target = _with_shardings(abstract_state, jax.tree.map(lambda _: dev0, abstract_state))
    init_jit = jax.jit(init_fn)
    step_fn = jax.pmap(make_train_step(task, axis_name="batch", **step_kwargs), axis_name="batch",
                       donate_argnums=0)
    put_batch = functools.partial(parallel.split_for_pmap, num_local_devices=len(devices))
    eval_view = _unreplicate
    place = functools.partial(_replicate, devices=devices)
    put_eval_batch = lambda b: b       # noqa: E731  (evaluated on the first local device)

  ckpt = Checkpointer(workdir, keep=int(config.keep_checkpoints), async_save=bool(config.async_checkpointing))
  writer = MetricsWriter(workdir, enabled=pid == 0)

  # ---- state: resume or init ---------------------------------------------------------------------------------
  restored = ckpt.restore_latest(restore_target, expect_meta={"family": config.family})
  if restored is not None:
    start, state, data_state, meta = restored
    if meta.get("family") != config.family:
      raise ValueError(f"checkpoint in {ckpt.directory} is from family {meta.get('family')!r}, config trains "
                       f"{config.family!r}")
    train_it.set_state(data_state)
    logging.info("Resuming from step %d (checkpoint in %s)", start, ckpt.directory)
  else:
    start, state = 0, init_jit(rng, example)
    logging.info("Starting from scratch: no checkpoint in %s", ckpt.directory)
  state = place(state)

  eval_jit = jax.jit(task.evaluate) if task.evaluate else None
  sample_jit = (jax.jit(lambda p, r: task.sample_images(p, r, int(config.num_sample_images)))
                if task.sample_images else None)
  meta = {"family": config.family, "variant": config.get("variant", ""), "parallel": config.parallel}
  total = int(config.num_train_steps)

  config_saved = []

  def save(step):
    if pid == 0 and not config_saved:  # config.json is replaced only by a config that got as far as a checkpoint
      save_config(workdir, config)
      config_saved.append(True)
    # pmap: one replica as host numpy arrays (host-local device arrays cannot be saved by several processes).
    ckpt.save(step, jax.device_get(eval_view(state)) if config.parallel == "pmap" else state,
              train_it.get_state(), meta)

  def evaluate(step):
    if eval_jit is None:
      return
    src = gdata.get_source(config.dataset, config.dataset.eval_split)
    sums, n = {}, 0
    params = eval_view(state).eval_params
    for i, b in enumerate(gdata.eval_batches(src, global_batch=config.batch_size,
                                             num_batches=int(config.num_eval_batches), process_index=pid,
                                             process_count=nproc)):
      m = jax.device_get(eval_jit(params, put_eval_batch(b), jax.random.fold_in(rng, 10_000_019 + i)))
      sums = {k: sums.get(k, 0.0) + float(v) for k, v in m.items()}
      n += 1
    means = {f"eval/{k}": v / n for k, v in sums.items()}
    writer.write(step, means)
    logging.info("eval at step %d: %s", step, " | ".join(f"{k} {v:.4g}" for k, v in means.items()))

  def sample_grid(step):
    if sample_jit is None:
      return
    images = sample_jit(eval_view(state).eval_params, jax.random.fold_in(rng, 20_000_003 + step))
    if pid == 0:
      os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
      save_image_grid(np.asarray(jax.device_get(images)), os.path.join(workdir, "samples", f"step_{step:07d}.png"))

  pending: list[tuple[int, Any]] = []

  def drain(step, progress):
    """Fetches pending metrics, stops on a non-finite loss, logs the interval's means."""
    ckpt.check()                       # a background save that failed stops the run here, not at the next save
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      if np.any(np.asarray(m["finite"]) < 1):
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {s}; stopped. Last good checkpoint: step "
            f"{max(ckpt.all_steps(), default='none')} in {ckpt.directory}")
    means = {k: float(np.mean([np.mean(m[k]) for m in fetched])) for k in fetched[0]}
    pending.clear()
    writer.write(step, means)
    logging.info(progress.line(step, means))

  # ---- loop --------------------------------------------------------------------------------------------------
  preempted = []
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True)) \
      if threading_is_main() else None
  progress = Progress(start, total)
  step = start
  try:
    while step < total:
      if preempted:
        drain(step, progress)
        save(step)
        ckpt.wait()
        logging.warning("SIGTERM: saved a checkpoint at step %d and stopped; rerun to resume", step)
        break
      state, metrics = step_fn(state, put_batch(next(train_it)))
      step += 1
      pending.append((step, metrics))
      if _due(step, int(config.log_every_steps), total):
        drain(step, progress)
      if _due(step, int(config.eval_every_steps), total):
        evaluate(step)
      if _due(step, int(config.sample_every_steps), total):
        sample_grid(step)
      if _due(step, int(config.checkpoint_every_steps), total):
        drain(step, progress)
        save(step)
    ckpt.wait()
  finally:
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
    ckpt.close()
    writer.close()
    train_it.close()
  return eval_view(state) if config.parallel == "pmap" else state


def threading_is_main() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()
