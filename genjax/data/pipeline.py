"""Batches for the training loop: seeded shuffling, per-host slices of a fixed global batch, resumable position.

    it = train_iterator(source, global_batch=64, seed=0)          # endless iterator of numpy dicts
    batch = next(it)                                               # this process's slice of the global batch
    state = it.get_state(); ...; it.set_state(state)               # saved with every checkpoint

Order: the examples of epoch e in the order `np.random.default_rng([seed, e]).permutation(N)`, epochs back to back,
cut into global batches of `global_batch` (a batch may span two epochs); process p of P takes rows
[p·L, (p+1)·L) of each global batch, L = global_batch / P, so concatenating the processes' batches of one step gives
exactly the global batch a single process would have read. Each process reads only its own examples. Every batch
carries `example_id`: the example's row within the global batch, which `genjax.core.random.example_keys` turns
into per-example PRNG keys (randomness independent of device layout).

Batch b is a pure function of (seed, b), so the state is one number (`next_index`: batches handed out) and a
background thread can read the next `prefetch` batches while the current step runs. A batch is read with one
`get_batch(indices)` call on the source (one fancy-indexing op for in-memory data; a read per record for TFDS, in
the prefetch thread): per-example Python work in the loop would cost more than a small model's step.
"""
from __future__ import annotations

import collections
import concurrent.futures
from typing import Any, Iterator

import numpy as np

from genjax.data.registry import get_examples
from genjax.errors import UserError


def _local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch < 1 or global_batch % process_count:
    raise UserError(f"batch_size={global_batch} must be a positive multiple of the process count {process_count}")
  return global_batch // process_count


class TrainIterator:
  """An endless, checkpointable iterator over this process's slices of shuffled global batches (module docstring)."""

  def __init__(self, source: Any, *, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
               prefetch: int = 2):
    self._local = _local_batch_size(global_batch, process_count)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise UserError(f"seed={seed!r} must be an int >= 0")
    if len(source) < self._local:
      raise UserError(f"the data set has {len(source)} examples, fewer than one local batch of {self._local}")
    self._source, self._size, self._seed = source, len(source), int(seed)
    self._global, self._row0 = int(global_batch), process_index * self._local
    self._next = 0
    self._permutations: dict[int, np.ndarray] = {}
    self._prefetch = int(prefetch)
    self._pool = concurrent.futures.ThreadPoolExecutor(1, "genjax-data") if prefetch > 0 else None
    self._ahead: collections.deque = collections.deque()       # (batch index, future), in order

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._permutations:
      self._permutations = {e: p for e, p in self._permutations.items() if e >= epoch - 1}
      self._permutations[epoch] = np.random.default_rng([self._seed, epoch]).permutation(self._size)
    return self._permutations[epoch]

  def indices(self, b: int) -> np.ndarray:
    """The source indices of this process's rows of global batch `b`."""
    position = b * self._global + self._row0 + np.arange(self._local, dtype=np.int64)
    epoch, within = np.divmod(position, self._size)
    out = np.empty(self._local, np.int64)
    for e in np.unique(epoch):
      rows = epoch == e
      out[rows] = self._permutation(int(e))[within[rows]]
    return out

  def _load(self, b: int) -> dict:
    batch = get_examples(self._source, self.indices(b))
    batch["example_id"] = np.arange(self._row0, self._row0 + self._local, dtype=np.int32)
    return batch

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict:
    b = self._next
    if self._pool is None:
      batch = self._load(b)
    else:
      while len(self._ahead) <= self._prefetch:
        k = self._ahead[-1][0] + 1 if self._ahead else b
        self._ahead.append((k, self._pool.submit(self._load, k)))
      _, future = self._ahead.popleft()
      batch = future.result()
    self._next = b + 1
    return batch

  def get_state(self) -> dict:
    return {"next_index": self._next}

  def set_state(self, state: dict) -> None:
    if not isinstance(state, dict) or not isinstance(state.get("next_index"), int) or state["next_index"] < 0:
      raise UserError(f"data iterator state must be {{'next_index': int >= 0}}, got {state!r}")
    for _, future in self._ahead:
      future.cancel()
    self._ahead.clear()
    self._next = state["next_index"]

  def close(self) -> None:
    """Stops the prefetch thread (the iterator can still be used, without prefetching)."""
    if self._pool is not None:
      for _, future in self._ahead:
        future.cancel()
      self._ahead.clear()
      self._pool.shutdown(wait=True)
      self._pool = None


def train_iterator(source: Any, *, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
                   prefetch: int = 2) -> TrainIterator:
  """An endless, checkpointable iterator over this process's slices of shuffled global batches."""
  return TrainIterator(source, global_batch=global_batch, seed=seed, process_index=process_index,
                       process_count=process_count, prefetch=prefetch)


def eval_batches(source: Any, *, global_batch: int, num_batches: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """The first `num_batches` global batches of the split in order (wrapping around a small split)."""
  local = _local_batch_size(global_batch, process_count)
  for b in range(num_batches):
    start = b * global_batch + process_index * local
    batch = get_examples(source, (start + np.arange(local)) % len(source))
    batch["example_id"] = np.arange(process_index * local, (process_index + 1) * local, dtype=np.int32)
    yield batch
