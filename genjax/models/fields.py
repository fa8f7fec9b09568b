"""Typed model configs: a family's `config.model` section read into a frozen dataclass, once, with clear errors.

    @dataclasses.dataclass(frozen=True)
    class VAEConfig:
      latent_dim: int = 16
      channels: tuple[int, ...] = (32, 64)

    cfg = from_config(VAEConfig, config.model)         # ConfigError for an unknown field or a value of the wrong type
    c.model = config_section(VAEConfig)                # in a config file: every field at its default, then
    c.model.update(latent_dim=8)                       # the variant sets only what it changes

Every field is declared with its default in one place, the dataclass: config files start from `config_section` and
the family reads attributes (`cfg.latent_dim`), never `config.model.get(key, default)`. A value is converted to the
field's declared type (int, float, bool, str, tuple[...]) and a value that does not convert names the field, the
value and the type.
"""
from __future__ import annotations

import dataclasses
import numbers
import typing
from typing import Any, Iterable, Mapping, TypeVar

import ml_collections

from genjax.errors import ConfigError

T = TypeVar("T")


def _convert(where: str, name: str, value: Any, kind: Any) -> Any:
  origin = typing.get_origin(kind)
  if origin is tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
      raise ConfigError(f"{where}.{name}={value!r} must be a tuple")
    args = typing.get_args(kind)
    item = args[0] if args else Any
    return tuple(_convert(where, name, v, item) for v in value)
  if kind is Any:
    return value
  if kind is bool:
    if not isinstance(value, (bool, int)) or value not in (0, 1):
      raise ConfigError(f"{where}.{name}={value!r} must be True or False")
    return bool(value)
  if kind is int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
      raise ConfigError(f"{where}.{name}={value!r} must be an int")
    return int(value)
  if kind is float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      raise ConfigError(f"{where}.{name}={value!r} must be a number")
    return float(value)
  if kind is str:
    if not isinstance(value, str):
      raise ConfigError(f"{where}.{name}={value!r} must be a string")
    return value
  return value


def from_config(cls: type[T], section: Mapping[str, Any], where: str = "config.model") -> T:
  """`cls(**section)` with every value converted to its field's type; unknown fields name the valid ones."""
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls) if f.init}
  values = dict(section)
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ConfigError(f"unknown {where} fields {unknown}; valid: {sorted(fields)}")
  return cls(**{k: _convert(where, k, v, hints[k]) for k, v in values.items()})


def to_dict(cfg: Any) -> dict:
  """The dataclass as plain config values (tuples kept): the inverse of `from_config`."""
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}


def config_section(cls: type, *, only: Iterable[str] | None = None,
                   exclude: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """A config section holding the default of every field of the dataclass `cls` (those in `only`, when given, and
  not in `exclude`), in declaration order; a field whose default is a dataclass becomes a nested section."""
  names = [f.name for f in dataclasses.fields(cls) if f.init]
  chosen = set(names if only is None else only) - set(exclude)
  unknown = sorted(chosen - set(names))
  if unknown:
    raise ConfigError(f"{cls.__name__} has no fields {unknown}; valid: {sorted(names)}")
  return _section(cls(), chosen)


def _section(cfg: Any, names: set[str] | None = None) -> ml_collections.ConfigDict:
  """The dataclass instance `cfg` (its fields in `names`; all when None) as a config section, nested ones too."""
  section = ml_collections.ConfigDict()
  for name, value in to_dict(cfg).items():
    if names is None or name in names:
      section[name] = _section(value) if dataclasses.is_dataclass(value) else value
  return section
