"""Shared helpers for the tests: tiny configs and reading a run back."""
from __future__ import annotations

import jax
import numpy as np

from experiments.configs import vae as vae_configs


def tiny_vae_config(**overrides):
  """The digits VAE shrunk to seconds: constant LR so that runs of different lengths share a schedule."""
  c = vae_configs.get_config("digits")
  c.model.latent_dim, c.model.channels, c.model.hidden = 4, (8, 16), 32
  c.batch_size = 16
  c.num_train_steps = 4
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.eval_every_steps = 0
  c.sample_every_steps = 0
  c.num_eval_batches = 1
  c.num_sample_images = 4
  c.optimizer.schedule = "constant"
  c.async_checkpointing = False
  for k, v in overrides.items():
    target = c
    *path, last = k.split(".")
    for p in path:
      target = target[p]
    target[last] = v
  return c


def flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(jax.device_get(tree))])
