"""Model families. Each module defines Flax modules, their losses and `task(config) -> genjax.train.Task`.

`get_task(config)` looks the family up by `config.family`; the training loop never names a family.
"""
from __future__ import annotations

import importlib
from genjax.errors import UserError

FAMILIES = {
    "vae": "genjax.models.vae",
    "diffusion": "genjax.models.diffusion",
    "gan": "genjax.models.gan",
    "lm": "genjax.models.transformer",
}


def family_module(name: str):
  if name not in FAMILIES:
    raise UserError(f"unknown model family {name!r}; valid: {sorted(FAMILIES)}")
  return importlib.import_module(FAMILIES[name])


def get_task(config):
  """The family's Task for this config (`config.family` picks the family)."""
  return family_module(config.family).task(config)
