"""The one table of dtype names a config may use, shared by the loop, every family and the checkpoint readers.

    from genjax.dtypes import compute_dtype, COMPUTE_DTYPES, PARAM_DTYPES
    dtype = compute_dtype(config.compute_dtype)      # "float32" | "bfloat16" -> a jnp dtype; ConfigError otherwise

Compute dtypes are what activations run in (params stay float32 for training; norms, softmax, losses and the
samplers' arithmetic stay float32 whatever this says). Param dtypes are what a checkpoint may store.
"""
from __future__ import annotations

import jax.numpy as jnp

from genjax.errors import ConfigError

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str, where: str = "compute_dtype"):
  """The jnp dtype of a compute-dtype name; ConfigError naming `where`, the value and the valid names."""
  if name not in COMPUTE_DTYPES:
    raise ConfigError(f"{where}={name!r} is not one of {sorted(COMPUTE_DTYPES)}")
  return COMPUTE_DTYPES[name]
