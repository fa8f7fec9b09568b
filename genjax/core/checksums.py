"""Checksums that prove a checkpoint reads back bit for bit, whatever the device layout that wrote or reads it.

    sums = array_checksums({"params": params})      # {"params/dense/kernel": [s1, s2], ...}, JSON-ready
    digest = json_sha256({"next_index": 128})       # SHA-256 of a JSON value (key order does not matter)

An array's checksum is two wrap-around uint32 sums, of its raw bits and of a hash of each element's bits mixed with
its flat index: exact integer arithmetic, so sharding and reduction order do not change it; any changed element
changes it; it is computed on the devices (elementwise + reduce), so a sharded array is never gathered.
`genjax.core.checkpoint` stores them with every save and compares them on every restore.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CHECKSUM_ALGORITHM = "uint32-sum+fmix32-sum/v1"


# ---- integrity ------------------------------------------------------------------------------------------------

def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def leaves_by_path(tree: Any, is_leaf=None) -> dict:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {_path_str(p): leaf for p, leaf in flat}


def _raw_bits(x: jax.Array) -> jax.Array:
  """The array's bit patterns as uint32 (64-bit values become two words on a new last axis)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 that scatters every input bit over the output."""
  for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
    h = (h ^ (h >> shift)) * jnp.uint32(mult)
  return h ^ (h >> 16)


def _array_checksum(x: jax.Array) -> jax.Array:
  """[Σ bits, Σ fmix32(bits ^ fmix32(flat index))] mod 2**32. Exact integer arithmetic, so the result does not
  depend on sharding or reduction order; a changed element always changes the second sum (fmix32 is a bijection)
  and several changes or a reordering cancel only by a 2**-32 coincidence. Elementwise + reduce only, so a
  sharded array is never gathered."""
  u = _raw_bits(jnp.asarray(x))
  index, stride = jnp.zeros(u.shape, jnp.uint32), 1
  for d in reversed(range(u.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % 2**32)
    stride *= u.shape[d]
  mixed = _fmix32(u ^ _fmix32(index))
  return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(mixed, dtype=jnp.uint32)])


_checksums_jit = jax.jit(lambda tree: jax.tree.map(_array_checksum, tree))


def array_checksums(tree: Any) -> dict[str, list[int]]:
  """{"params/enc_0/kernel": [s1, s2], ...} for every array leaf of `tree` (see `_array_checksum`)."""
  sums = jax.device_get(_checksums_jit(tree))
  return {k: [int(v) for v in np.asarray(s)] for k, s in leaves_by_path(sums).items()}


def json_sha256(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
