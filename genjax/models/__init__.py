"""Model families. Each module defines Flax modules, their losses and `task(config) -> genjax.core.task.Task`.

    task = get_task(config)                          # config.family picks the module in FAMILIES
    task = get_task(config, pretrained=weights)      # a family that starts from outside weights (lm + init_from)

Launchers never name a family: what a family can do is the Task's members (`Task.capabilities()`). Adding a family
is one module here (its `task(config)`, plus `pretrained=` if it can start from a `genjax.core.task.Pretrained`)
and one config file in experiments/configs/.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Optional

from genjax.core.task import Pretrained, Task
from genjax.errors import ConfigError, UserError

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


def get_task(config, pretrained: Optional[Pretrained] = None) -> Task:
  """The family's Task for this config (`config.family` picks the family); `pretrained`: the weights
  `config.model.init_from` names, resolved by `genjax.interop.hf.pretrained_for(config)`."""
  make = family_module(config.family).task
  if pretrained is None:
    return make(config)
  if "pretrained" not in inspect.signature(make).parameters:
    raise ConfigError(f"the {config.family!r} family cannot start from outside weights ({pretrained.source!r})")
  return make(config, pretrained=pretrained)
