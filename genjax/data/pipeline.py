"""Batches for the training loop: seeded shuffling, per-host slices of a fixed global batch, resumable position.

    it = train_iterator(source, global_batch=64, seed=0)          # grain DatasetIterator of numpy dicts
    batch = next(it)                                               # this process's slice of the global batch
    state = it.get_state(); ...; it.set_state(state)               # saved with every checkpoint

Order: a new permutation every epoch (grain `shuffle` then infinite `repeat`), cut into local batches of
`global_batch // process_count`; process p takes local batches p, p + P, p + 2P, ... so that concatenating the
processes' batches of one step gives exactly the global batch a single process would have read. Each process reads
only its own examples. Every batch carries `example_id`: the example's position within the global batch, which
`genjax.train.random.example_keys` turns into per-example PRNG keys (randomness independent of device layout).
"""
from __future__ import annotations

from typing import Any, Iterator

import grain
import numpy as np


def _local_batch_size(global_batch: int, process_count: int) -> int:
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(f"batch_size={global_batch} must be a positive multiple of the process count {process_count}")
  return global_batch // process_count


class _AddExampleId(grain.transforms.Map):
  def __init__(self, offset: int):
    self._offset = offset

  def map(self, batch: dict) -> dict:
    n = len(next(iter(batch.values())))
    return {**batch, "example_id": np.arange(self._offset, self._offset + n, dtype=np.int32)}


def train_iterator(source: Any, *, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
                   num_threads: int = 2, prefetch: int = 4):
  """An endless, checkpointable iterator over this process's slices of shuffled global batches."""
  local = _local_batch_size(global_batch, process_count)
  if len(source) < local:
    raise ValueError(f"the data set has {len(source)} examples, fewer than one local batch of {local}")
  ds = (grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
        .batch(local, drop_remainder=True)[process_index::process_count]
        .map(_AddExampleId(process_index * local)))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))


def eval_batches(source: Any, *, global_batch: int, num_batches: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """The first `num_batches` global batches of the split in order (wrapping around a small split)."""
  local = _local_batch_size(global_batch, process_count)
  n = len(source)
  for b in range(num_batches):
    start = b * global_batch + process_index * local
    examples = [source[(start + j) % n] for j in range(local)]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    batch["example_id"] = np.arange(process_index * local, (process_index + 1) * local, dtype=np.int32)
    yield batch
