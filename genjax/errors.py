"""The errors a user can cause, in one family.

Every error that bad input can cause (a flag, a config key or value, a dataset name, a shape, a dtype, a prompt
length, a checkpoint directory) derives from `UserError`, a `ValueError`, and its message is one line that names the
bad value and the valid choices. The command-line launchers catch `UserError` only, print `error: <message>` and
exit with status 2; any other exception is a bug and keeps its traceback.

This module is plain Python (no jax, no Flax) so that every layer, the sampler library included, can raise these.

    from genjax.errors import UserError, check_choice
    check_choice("sampler", "ddmi", ("ddpm", "ddim"))   # UserError: sampler='ddmi' is not one of: ddpm, ddim
"""
from __future__ import annotations

from typing import Any, Iterable


class UserError(ValueError):
  """Bad input from the user: the message names the bad value and what would be valid."""


class ConfigError(UserError):
  """A config key or value that is unknown or out of range."""


class WorkdirError(UserError):
  """A workdir that cannot be used: a file, another family's run, locked by a live process, empty."""


class CheckpointError(UserError):
  """A checkpoint that cannot be loaded as asked: missing, of another model, unreadable."""


def show(value: Any) -> str:
  """`repr(value)` with numpy scalars and arrays as the plain Python numbers / lists they hold (numpy 2 writes
  `np.float32(2.0)`): how a message shows a value the user gave or a check computed."""
  if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
    value = value.tolist()
  return repr(value)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
  """Returns `value` if it is one of `choices`, else raises UserError naming it and the choices."""
  choices = tuple(choices)
  if value not in choices:
    raise UserError(f"{name}={value!r} is not one of: {', '.join(str(c) for c in choices)}")
  return value
