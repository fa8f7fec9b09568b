"""Typed model configs: a family's `config.model` section read into a frozen dataclass, once, with clear errors.

    @dataclasses.dataclass(frozen=True)
    class VAEConfig:
      latent_dim: int = 16
      channels: tuple[int, ...] = (32, 64)

    cfg = from_config(VAEConfig, config.model)         # ConfigError for an unknown field or a value of the wrong type

Every field of the dataclass is declared with its default in one place; the family then reads attributes
(`cfg.latent_dim`), never `config.model.get(key, default)`. A value is converted to the field's declared type
(int, float, bool, str, tuple[...]) and a value that does not convert names the field, the value and the type.
"""
from __future__ import annotations

import dataclasses
import numbers
import typing
from typing import Any, Mapping, TypeVar

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
