"""Per-example randomness, so that a loss draws the same numbers for an example however the batch is laid out
over devices and processes (pjit == pmap, 1 device == 8 devices, 1 host == 2 hosts).

    noise = per_example(lambda k: jax.random.normal(k, x.shape[1:]), rng, batch)      # [B, ...]

`batch["example_id"]` (the example's position in the global batch) is added by `genjax.data.train_iterator`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax


def example_keys(rng: jax.Array, batch: Mapping[str, Any]) -> jax.Array:
  """One PRNG key per example: fold_in(rng, example_id)."""
  if "example_id" not in batch:
    raise ValueError(f"batch has no 'example_id' (keys: {sorted(batch)}); batches from genjax.data carry it")
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, batch["example_id"])


def per_example(draw: Callable[[jax.Array], Any], rng: jax.Array, batch: Mapping[str, Any]) -> Any:
  """`draw(key)` for every example's key, stacked on a leading batch axis."""
  return jax.vmap(draw)(example_keys(rng, batch))
