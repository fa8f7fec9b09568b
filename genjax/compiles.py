"""Counting XLA compilations: the figure behind "changing num_steps compiles nothing".

    from genjax.compiles import CompileCounter
    with CompileCounter() as cc:
      sample(params, rng, num_steps=20)
    print(cc.count, cc.seconds)          # backend compilations in the block, and their summed XLA seconds

Counts `jax.monitoring`'s backend-compile events; a persistent-cache hit is not a compilation.
Used by the benchmarks, `experiments/steps_sweep.py` and the tests.
"""
from __future__ import annotations

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
  """Context manager counting XLA backend compilations (and their seconds) while it is open."""

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    self._open = False

  def _listener(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if self._open and event == BACKEND_COMPILE_EVENT:
      self.count += 1
      self.seconds += float(duration)

  def __enter__(self) -> "CompileCounter":
    self._open = True
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc) -> None:
    self._open = False
    jax.monitoring.unregister_event_duration_listener(self._listener)
