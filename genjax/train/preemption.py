"""Stopping on a signal at a step every process agrees on: SIGTERM (a scheduler's pre-emption notice) and SIGINT
(Ctrl-C) both finish the running step, save a checkpoint and end the run with `Interrupted`.

    with StopSignals() as stop:
      for step in ...:
        state = train_step(state)
        if stop.should_stop(step):            # the same answer on every process at the same step
          save(step); raise stop.interrupted(step)

One process: a handler records the signal; `should_stop` is true at the next step boundary. Several processes
(`jax.distributed.initialize`): a notice reaches only some hosts, and a host that stops alone leaves the others
blocked in a collective. JAX's pre-emption service (on by default in `jax.distributed`) catches SIGTERM in every
process and agrees on a step over the coordination service; `should_stop` asks it
(`multihost_utils.reached_preemption_sync_point`), so every host stops, and saves, at that same step. SIGINT is
forwarded to it as a SIGTERM of this process. A second SIGINT exits at once (status 130) without saving.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

import jax
from absl import logging
from jax.experimental import multihost_utils

INTERRUPTED_EXIT_CODE = {signal.SIGINT: 130, signal.SIGTERM: 143}     # 128 + signal number, as a shell reports


class Interrupted(Exception):
  """The run stopped on a signal after saving a checkpoint at `step`; rerun to resume. `exit_code`: 130 (SIGINT)
  or 143 (SIGTERM), so that a scheduler sees a run that did not finish."""

  def __init__(self, step: int, signum: int, checkpoint_dir: str):
    self.step, self.signum = step, signum
    self.exit_code = INTERRUPTED_EXIT_CODE.get(signum, 128 + int(signum))
    super().__init__(f"{signal.Signals(signum).name}: saved a checkpoint at step {step} in {checkpoint_dir} and "
                     "stopped; rerun the same command to resume")


def _multi_process() -> bool:
  return jax.process_count() > 1 and jax.distributed.is_initialized()


class StopSignals:
  """Context manager that turns SIGINT/SIGTERM into a stop at an agreed step (see module docstring)."""

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous: dict = {}
    self._multi = _multi_process()

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is not threading.main_thread():
      return self                       # Python delivers signals to the main thread only
    self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)
    if not self._multi:                 # multi-process: JAX's pre-emption notifier owns SIGTERM
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _on_signal(self, signum, frame) -> None:
    if self.signum is not None and signum == signal.SIGINT:
      print(f"second {signal.Signals(signum).name}: exiting now without saving", file=sys.stderr, flush=True)
      os._exit(INTERRUPTED_EXIT_CODE[signal.SIGINT])
    if self.signum is None:
      self.signum = signum             # the loop says what it did once it saved (one line)
    if self._multi and signum == signal.SIGINT:
      os.kill(os.getpid(), signal.SIGTERM)    # tell JAX's pre-emption service, which tells the other processes

  def should_stop(self, step: int) -> bool:
    """Call after every step on every process; true on all of them at the same step once any got a signal."""
    if self._multi:
      if multihost_utils.reached_preemption_sync_point(step):
        if self.signum is None:
          self.signum = signal.SIGTERM        # the notice reached another process
        return True
      return False
    return self.signum is not None

  def interrupted(self, step: int, checkpoint_dir: str) -> Interrupted:
    error = Interrupted(step, self.signum or signal.SIGTERM, checkpoint_dir)
    logging.warning("%s", error)
    return error
