"""The one training loop: `train_and_evaluate(config, workdir, task)`.

    from genjax.models import get_task
    from genjax.train.trainer import train_and_evaluate
    state = train_and_evaluate(config, "runs/vae", get_task)      # a Task, or config -> Task (checked config first)

Order: check the inputs (config, workdir, data set, device layout) before writing anything → lock the workdir →
restore the latest checkpoint or init → loop (step; every N steps: log, evaluate, sample, checkpoint) → finish.
Nothing here knows which family it trains: the Task (genjax.core.task) says what to optimise, the builder
(genjax.train.builder) how the step runs on the devices. SIGINT/SIGTERM stop at an agreed step after a checkpoint
(genjax.train.preemption). Process 0 writes logs, grids and config.

Injection points: `writer` (a MetricsWriter-like object), `train_iter` (an iterator of this process's batches with
get_state/set_state/close, e.g. a wrapped `genjax.data.train_iterator`), and `hooks`: callables
`hook(event, step, info)` called on every process after each event — "log" (info: the logged metrics), "eval"
(the eval metrics), "sample" ({"images": ...} or {"text": [...]}), "checkpoint" ({"directory": ...}).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterable, Optional, Union

import jax
import numpy as np
from absl import logging

from genjax import data as gdata
from genjax.dtypes import compute_dtype
from genjax.errors import ConfigError, WorkdirError
from genjax.train import parallel
from genjax.train.builder import Built, build
from genjax.core.checkpoint import Checkpointer, load_config, save_config
from genjax.core.optim import make_schedule
from genjax.train.preemption import Interrupted, StopSignals
from genjax.train.report import MetricsWriter, Progress, image_grid, log_line, save_image_grid, setup_logging
from genjax.train.step import TrainState
from genjax.core.task import Task
from genjax.train.throughput import layout_summary, params_summary, peak_flops_per_device, step_flops
from genjax.train.workdir import WorkdirLock, check_workdir

__all__ = ["train_and_evaluate", "check_config", "NonFiniteLossError", "Interrupted"]

# fold_in offsets of the evaluation and sampling keys: far from the training steps' keys (fold_in(rng, step)).
EVAL_KEY_OFFSET = 10_000_019
SAMPLE_KEY_OFFSET = 20_000_003
Hook = Callable[[str, int, dict], None]


class NonFiniteLossError(FloatingPointError):
  """A loss or gradient became NaN/Inf; the message names the step and the last good checkpoint."""


def parse_profile_steps(value: str) -> Optional[tuple[int, int]]:
  """`"a,b"` → (a, b): trace steps a+1..b; "" → None."""
  if not str(value).strip():
    return None
  try:
    a, b = (int(v) for v in str(value).split(","))
  except ValueError:
    raise ConfigError(f"profile_steps={value!r} must be 'first,last' steps, e.g. '10,20'") from None
  if not 0 <= a < b:
    raise ConfigError(f"profile_steps={value!r} needs 0 <= first < last")
  return a, b


def check_config(config) -> None:
  """The shared fields' values; raises ConfigError naming the bad one and the valid choices."""
  if config.parallel not in parallel.PARALLEL_MODES:
    raise ConfigError(f"parallel={config.parallel!r} is not one of {parallel.PARALLEL_MODES}")
  for key in ("num_train_steps", "batch_size", "log_every_steps", "grad_accum_steps", "keep_checkpoints"):
    if int(config[key]) < 1:
      raise ConfigError(f"{key}={config[key]!r} must be >= 1")
  if int(config.batch_size) % int(config.grad_accum_steps):
    raise ConfigError(f"batch_size={config.batch_size} must be divisible by grad_accum_steps="
                      f"{config.grad_accum_steps} (each step averages that many equal micro-batches); valid "
                      f"grad_accum_steps: the divisors of {config.batch_size}")
  if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
    raise ConfigError(f"seed={config.seed!r} must be an int >= 0")
  compute_dtype(config.compute_dtype)
  if not 0.0 <= float(config.ema_decay) < 1.0:
    raise ConfigError(f"ema_decay={config.ema_decay!r} must be in [0, 1)")
  if float(config.peak_flops) < 0:
    raise ConfigError(f"peak_flops={config.peak_flops!r} must be >= 0 (0 = the device table's value)")
  parse_profile_steps(config.profile_steps)


def use_compilation_cache(directory: str) -> None:
  """Keeps XLA's compiled programs in `directory` (JAX's persistent compilation cache), so a rerun or a resume of the
  same program on the same devices loads its executables instead of compiling them."""
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _due(step: int, every: int, last: int) -> bool:
  """Every `every` steps and at the last step; 0 = only at the last step; negative = never."""
  return every >= 0 and (step == last or (every > 0 and step % every == 0))


def _check_family(config, workdir: str) -> None:
  if os.path.isfile(os.path.join(workdir, "config.json")):
    old = load_config(workdir)
    if old.family != config.family:
      raise WorkdirError(f"workdir {workdir!r} holds a {old.family!r} run; this config trains {config.family!r}. "
                         "Use another --workdir.")


def _flat(tree: Any, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
  return {prefix[:-1]: tuple(tree) if isinstance(tree, list) else tree}


def start_message(task: Task) -> str:
  """How a run without a checkpoint of its own starts: from the weights its Task names, or from scratch."""
  return f"starting from the weights in {task.init_from}" if task.init_from else "starting from scratch"


def config_differences(stored, config) -> list[str]:
  """Dotted names of the fields whose values differ between two configs (JSON-comparable)."""
  a, b = _flat(json.loads(stored.to_json_best_effort())), _flat(json.loads(config.to_json_best_effort()))
  return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def make_train_iterator(config, source=None):
  """This process's rows of the training batches, as the loop reads them (resumable: get_state/set_state)."""
  source = gdata.get_source(config.dataset, config.dataset.train_split) if source is None else source
  return gdata.train_iterator(source, global_batch=config.batch_size, seed=config.seed,
                              process_index=jax.process_index(), process_count=jax.process_count())


def train_and_evaluate(config, workdir: str, task: Union[Task, Callable[[Any], Task]], *,
                       writer: Optional[MetricsWriter] = None, train_iter=None,
                       hooks: Iterable[Hook] = ()) -> TrainState:
  """Trains `task` as `config` says, in `workdir`; resumes from the latest checkpoint there. Returns the final
  TrainState (one logical state whatever the parallel path). Raises `Interrupted` after saving on SIGINT/SIGTERM."""
  check_config(config)
  setup_logging()
  if config.compilation_cache_dir:
    use_compilation_cache(config.compilation_cache_dir)
  task = task if isinstance(task, Task) else task(config)   # the family's own checks come before the workdir's
  check_workdir(workdir)
  _check_family(config, workdir)
  pid, nproc = jax.process_index(), jax.process_count()
  logging.info("training %s:%s in %s on %d %s device(s) (process %d of %d), parallel=%s", config.family,
               config.variant, os.path.abspath(workdir), jax.device_count(), jax.devices()[0].platform, pid, nproc,
               config.parallel)
  train_src = gdata.get_source(config.dataset, config.dataset.train_split)
  example = next(gdata.eval_batches(train_src, global_batch=nproc, num_batches=1, process_index=0,
                                    process_count=nproc))
  built = build(config, task, example)
  logging.info("layout: %s", layout_summary(built))
  with WorkdirLock(workdir, enabled=pid == 0):
    train_iter = make_train_iterator(config, train_src) if train_iter is None else train_iter
    loop = _Loop(config, workdir, task, built, train_iter, writer, tuple(hooks))
    return loop.run()


class _Loop:
  """One run's state between the loop's events; every method is one event."""

  def __init__(self, config, workdir: str, task: Task, built: Built, train_iter, writer, hooks):
    self.config, self.workdir, self.task, self.built = config, workdir, task, built
    self.train_iter, self.hooks, self.pid = train_iter, hooks, jax.process_index()
    self.total = int(config.num_train_steps)
    self.rng = jax.random.PRNGKey(config.seed)
    self.ckpt = Checkpointer(workdir, keep=int(config.keep_checkpoints), async_save=bool(config.async_checkpointing))
    self.writer = writer
    self.pending: list[tuple[int, Any]] = []
    self.config_saved = False
    self.schedule = make_schedule(config.optimizer, self.total)
    self.eval_jit = jax.jit(task.evaluate) if task.evaluate else None
    self.sample_jit = (jax.jit(lambda p, r: task.sample_images(p, r, int(config.num_sample_images)))
                       if task.sample_images else None)
    self.flops = self.peak_total = self.tokens_per_example = None
    self.profile = parse_profile_steps(config.profile_steps)

  def _emit(self, event: str, step: int, info: dict) -> None:
    for hook in self.hooks:
      hook(event, step, info)

  def run(self) -> TrainState:
    """Restore or init, then step to num_train_steps (logging, evaluating, sampling, saving when due)."""
    try:
      step, state = self._restore_or_init()
      if self.writer is None:
        self.writer = MetricsWriter(self.workdir, enabled=self.pid == 0, resume_step=step)
      if step >= self.total:
        self._already_complete(step)
        return self.built.view(state)
      logging.info("params: %s", params_summary(self.task, self.built.view(state).params))
      start, progress, step_fn = step, Progress(step, self.total), None
      with StopSignals() as stop:
        while step < self.total:
          host_batch = next(self.train_iter)
          batch = self.built.put_batch(host_batch)
          step_fn = step_fn or self._compile(state, batch, host_batch)
          self._profile(step)
          state, metrics = step_fn(state, batch)
          step += 1
          self.pending.append((step, metrics))
          if step == start + 1:
            jax.block_until_ready(metrics)
            progress.start(step)              # the first step holds the compile: the clock starts after it
          self._periodic(step, state, progress)
          if stop.should_stop(step) and step < self.total:
            self._interrupt(step, state, progress, stop)
      self._profile(step)
      self.ckpt.wait()
      logging.info("done: step %d of %d; outputs in %s (checkpoints/, metrics.jsonl, tensorboard/%s)", self.total,
                   self.total, os.path.abspath(self.workdir), ", samples/" if self.sample_jit else "")
      return self.built.view(state)
    finally:
      try:
        self.ckpt.close()
      finally:
        if self.writer is not None:
          self.writer.close()
        self.train_iter.close()

  def _restore_or_init(self) -> tuple[int, TrainState]:
    if self.ckpt.all_steps():
      logging.info("loading the latest checkpoint in %s ...", self.ckpt.directory)
    restored = self.ckpt.restore_latest(self.built.restore_target, expect_meta={"family": self.config.family})
    if restored is None:
      logging.info("%s: no checkpoint in %s", start_message(self.task), self.ckpt.directory)
      return 0, self.built.init_fn(self.rng)
    start, state, data_state, _ = restored
    self.train_iter.set_state(data_state)
    logging.info("resuming from step %d (checkpoint in %s)", start, self.ckpt.directory)
    return start, self.built.place(state)

  def _already_complete(self, step: int) -> None:
    ignored = config_differences(load_config(self.workdir), self.config) \
        if os.path.isfile(os.path.join(self.workdir, "config.json")) else []
    note = f"; these config fields differ from the stored run and are ignored: {', '.join(ignored)}" if ignored else ""
    logging.warning("already complete at step %d (num_train_steps=%d) in %s: nothing to train%s", step, self.total,
                    os.path.abspath(self.workdir), note)

  def _compile(self, state, batch, host_batch: dict):
    tokens = host_batch.get("tokens")
    self.tokens_per_example = None if tokens is None else int(np.shape(tokens)[1]) - 1
    logging.info("compiling the train step (%s) ...", self.built.parallel)
    t0 = time.perf_counter()
    devices = self.built.mesh.devices.size if self.built.mesh is not None else jax.device_count()
    if self.built.parallel == "pmap" and jax.process_count() > 1:
      # A multi-process pmap executable compiled ahead of time expects the global device axis but is called with
      # this process's part: step with the pmap itself (it compiles on the first call) and report no FLOPs.
      self.flops, self.peak_total = None, None
      logging.info("FLOPs per step: n/a (multi-process pmap)")
      return self.built.step_fn
    compiled = self.built.step_fn.lower(state, batch).compile()
    self.flops, peak = step_flops(compiled, devices), peak_flops_per_device(self.config.peak_flops)
    self.peak_total = None if peak is None else peak * devices
    flops = "n/a" if self.flops is None else f"{self.flops:.3g}"
    logging.info("compiled in %.1f s; %s FLOPs per step (XLA cost analysis)", time.perf_counter() - t0, flops)
    return compiled

  def _interrupt(self, step: int, state, progress: Progress, stop: StopSignals) -> None:
    """SIGINT/SIGTERM: every process saves the agreed step, then `Interrupted` ends the run."""
    self._drain(step, progress)
    self._save(step, state)
    self.ckpt.wait()
    raise stop.interrupted(step, self.ckpt.directory)

  def _profile(self, step: int) -> None:
    if self.profile is None:
      return
    if step == self.profile[0]:
      path = os.path.join(self.workdir, "profile")
      logging.info("profiling steps %d..%d into %s", self.profile[0] + 1, self.profile[1], path)
      jax.profiler.start_trace(path)
    elif step == self.profile[1] or (step == self.total and self.profile[0] < step < self.profile[1]):
      jax.profiler.stop_trace()
      self.profile = None

  def _periodic(self, step: int, state, progress: Progress):
    c = self.config
    if _due(step, int(c.log_every_steps), self.total):
      self._drain(step, progress)
    t1 = time.perf_counter()
    if _due(step, int(c.eval_every_steps), self.total):
      self._evaluate(step, state)
    if _due(step, int(c.sample_every_steps), self.total):
      self._sample(step, state)
    if _due(step, int(c.checkpoint_every_steps), self.total):
      self._drain(step, progress)
      self._save(step, state)
    progress.exclude(time.perf_counter() - t1)     # evaluation, sampling and saving are not step time

  def _rates(self, interval: dict) -> dict:
    rates = dict(interval)
    if "steps_per_second" in rates:
      rate = rates["steps_per_second"]
      rates["examples_per_second"] = rate * int(self.config.batch_size)
      if self.tokens_per_example:
        rates["tokens_per_second"] = rates["examples_per_second"] * self.tokens_per_example
      if self.flops is not None:
        rates["flops_per_step"] = self.flops
        if self.peak_total:
          rates["mfu"] = self.flops * rate / self.peak_total
    return rates

  def _drain(self, step: int, progress: Progress) -> None:
    """Fetches pending metrics, stops on a non-finite loss, logs the interval's means."""
    self.ckpt.check()                   # a background save that failed stops the run here, not at the next save
    if not self.pending:
      return
    fetched = jax.device_get([m for _, m in self.pending])
    for (s, _), m in zip(self.pending, fetched):
      if np.any(np.asarray(m["finite"]) < 1):
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {s}; stopped. Last good checkpoint: step "
            f"{max(self.ckpt.all_steps(), default='none')} in {self.ckpt.directory}")
    means = {k: float(np.mean([np.mean(m[k]) for m in fetched])) for k in fetched[0]}
    self.pending.clear()
    means["lr"] = float(self.schedule(step - 1))          # config.optimizer's rate used by the last step
    rates = self._rates(progress.interval(step))
    record = {**means, **{k: v for k, v in rates.items() if k != "eta_seconds"}}
    self.writer.write(step, record)
    logging.info("%s", log_line(step, self.total, means, rates))
    self._emit("log", step, record)

  def _evaluate(self, step: int, state) -> None:
    if self.eval_jit is None:
      return
    c, nproc = self.config, jax.process_count()
    src = gdata.get_source(c.dataset, c.dataset.eval_split)
    logging.info("evaluating on %d %r batches ...", int(c.num_eval_batches), c.dataset.eval_split)
    sums, n = {}, 0
    params = self.built.view(state).eval_params
    for i, b in enumerate(gdata.eval_batches(src, global_batch=c.batch_size, num_batches=int(c.num_eval_batches),
                                             process_index=self.pid, process_count=nproc)):
      m = jax.device_get(self.eval_jit(params, self.built.put_eval_batch(b),
                                       jax.random.fold_in(self.rng, EVAL_KEY_OFFSET + i)))
      sums = {k: sums.get(k, 0.0) + float(v) for k, v in m.items()}
      n += 1
    means = {f"eval/{k}": v / n for k, v in sums.items()}
    self.writer.write(step, means)
    logging.info("eval at step %d: %s", step, " | ".join(f"{k} {v:.4g}" for k, v in means.items()))
    self._emit("eval", step, means)

  def _sample(self, step: int, state) -> None:
    params, rng = self.built.view(state).eval_params, jax.random.fold_in(self.rng, SAMPLE_KEY_OFFSET + step)
    if self.pid == 0:
      os.makedirs(os.path.join(self.workdir, "samples"), exist_ok=True)
    if self.sample_jit is not None:
      images = np.asarray(jax.device_get(self.sample_jit(params, rng)))
      if self.pid == 0:
        save_image_grid(images, os.path.join(self.workdir, "samples", f"step_{step:07d}.png"))
        self.writer.write_images(step, "samples", image_grid(images))
      self._emit("sample", step, {"images": images})
    if self.task.sample_text is not None:
      text = self.task.sample_text(params, [""], rng)
      if self.pid == 0:
        with open(os.path.join(self.workdir, "samples", f"step_{step:07d}.txt"), "w") as f:
          f.write(text[0])
        self.writer.write_text(step, "samples", text[0])
      self._emit("sample", step, {"text": text})

  def _save(self, step: int, state) -> None:
    if self.pid == 0 and not self.config_saved:   # config.json is replaced only by a config that reached a save
      save_config(self.workdir, self.config)
      self.config_saved = True
    meta = {"family": self.config.family, "variant": self.config.variant, "parallel": self.config.parallel}
    self.ckpt.save(step, self.built.to_save(state), self.train_iter.get_state(), meta)
    self._emit("checkpoint", step, {"directory": self.ckpt.directory})
