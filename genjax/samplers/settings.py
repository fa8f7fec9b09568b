"""`DecodingSettings`: every knob of the text decoders (`generate`, `beam_search`, `speculative_generate`) in one
frozen, keyword-only, hashable value, validated once when it is built.

    from genjax.samplers import DecodingSettings, generate, speculative_generate
    s = DecodingSettings(max_new_tokens=64, temperature=0.8, top_p=0.9, eos_id=258, pad_id=256)
    generate(model, params, prompts, rng=rng, settings=s)                      # the same as passing the fields
    generate(model, params, prompts, rng=rng, settings=s, temperature=0.0)     # keyword arguments override fields
    speculative_generate(target, tp, draft, dp, prompts, rng=rng, settings=s, num_draft_tokens=3)
    DecodingSettings(max_new_tokens=8, top_p=1.5)    # UserError: top_p=1.5 must be in (0, 1] (1 = off); got ...

A bad value raises `genjax.errors.UserError` naming the field, the value and the valid range, the same line from
every decoder. Sampling settings and penalties are a scalar or one value per row; their row count is checked
against the batch when a decoder packs them (`sampling_arrays`, `stop_table`). Values are stored in one canonical
type per field (python int / float / bool, nested tuples for per-row values and stop sequences), so that equal
settings are equally valid and the value is a sound `functools.lru_cache` / jit static key: `top_k=1`,
`top_k=1.0` and `top_k=True` build the same settings.

Each decoder applies a subset (`APPLIES`): `generate` everything but num_beams, length_penalty and
num_draft_tokens; `beam_search` max_new_tokens, eos_id, pad_id, num_beams, length_penalty; `speculative_generate`
the sampling filters, greedy, eos_id, pad_id, max_new_tokens and num_draft_tokens. A field it does not apply, set
away from its default, raises UserError naming the decoders that do (`for_decoder`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import UserError, show

FLOAT_SETTINGS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
INT_SETTINGS = ("top_k", "min_tokens_to_keep")
WILDCARD = -2                               # left padding of a right-aligned stop sequence: matches anything

PerRow = Union[float, int, tuple]           # a scalar, or (after canonicalisation) a tuple with one value per row


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodingSettings:
  """The decoding knobs (see the module docstring for which decoder applies which; defaults mean "off")."""
  max_new_tokens: int                       # tokens to generate per row (the longest prompt + this must fit)
  temperature: PerRow = 1.0                 # 0 = greedy (argmax)
  top_k: PerRow = 0                         # 0 = off
  top_p: PerRow = 1.0                       # 1 = off
  min_p: PerRow = 0.0                       # 0 = off
  min_tokens_to_keep: PerRow = 1            # survive every filter
  repetition_penalty: PerRow = 1.0          # 1 = off; over prompt + generated ids
  presence_penalty: PerRow = 0.0            # 0 = off; over generated ids
  frequency_penalty: PerRow = 0.0           # 0 = off; over generated ids
  greedy: bool = False                      # True: argmax whatever the temperature
  eos_id: Optional[int] = None              # a row ends after emitting it
  pad_id: int = 0                           # fills prompts' padding and the output after a row ends
  stop_sequences: Optional[tuple] = None    # token-id lists (one list for every row, or one list per row)
  num_return_sequences: int = 1             # generate: independent continuations per prompt
  num_beams: int = 1                        # beam_search: hypotheses kept per row
  length_penalty: float = 1.0               # beam_search: score = sum(log p) / length ** length_penalty
  num_draft_tokens: int = 4                 # speculative_generate: draft tokens per target call

  def __post_init__(self):
    for name, check in _CHECKS.items():
      object.__setattr__(self, name, check(name, getattr(self, name)))

  def replace(self, **overrides) -> DecodingSettings:
    """A copy with `overrides` (validated like a new value)."""
    return dataclasses.replace(self, **overrides)


COMMON = frozenset({"max_new_tokens", "eos_id", "pad_id"})
SAMPLING = frozenset({"temperature", "top_k", "top_p", "min_p", "min_tokens_to_keep", "greedy"})
PENALTIES = frozenset({"repetition_penalty", "presence_penalty", "frequency_penalty"})
APPLIES = {
    "generate": COMMON | SAMPLING | PENALTIES | {"stop_sequences", "num_return_sequences"},
    "beam_search": COMMON | {"num_beams", "length_penalty"},
    "speculative_generate": COMMON | SAMPLING | {"num_draft_tokens"},
}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DecodingSettings)}


def for_decoder(decoder: str, settings: Optional[DecodingSettings], overrides: dict) -> DecodingSettings:
  """`settings` with the keyword `overrides` (or built from them), checked to set only what `decoder` applies."""
  unknown = sorted(set(overrides) - set(_DEFAULTS))
  if unknown:
    raise TypeError(f"{decoder}() got unexpected keyword arguments {unknown}; decoding settings: {sorted(_DEFAULTS)}")
  if settings is None:
    settings = DecodingSettings(**overrides)
  elif not isinstance(settings, DecodingSettings):
    raise UserError(f"settings={settings!r} must be a genjax.samplers.DecodingSettings (or pass its fields as "
                    f"keyword arguments)")
  elif overrides:
    settings = settings.replace(**overrides)
  for name in sorted(_DEFAULTS.keys() - APPLIES[decoder]):
    if getattr(settings, name) != _DEFAULTS[name]:
      users = [d for d, fields in APPLIES.items() if name in fields]
      raise UserError(f"{name}={_as_lists(getattr(settings, name))!r} does not apply to {decoder}; leave it at its "
                      f"default {_DEFAULTS[name]!r} (used by {', '.join(users)})")
  return settings


# ------------------------------------------------------------------------------------------- field checks ------
def positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise UserError(f"{name}={show(value)} must be a positive int")
  return int(value)


def _number(name: str, value, kinds: str):
  """`value` as a 0-d numpy array whose dtype kind is in `kinds` ("i": ints, "if": ints or floats), or None."""
  if isinstance(value, (bool, np.bool_)):
    return None
  array = concrete(name, value)
  return array if array.ndim == 0 and array.dtype.kind in kinds else None


def _token_id(name: str, value) -> int:
  array = _number(name, value, "iu")
  if array is None:
    raise UserError(f"{name}={show(value)} must be an int token id")
  return int(array)


def _optional_token_id(name: str, value) -> Optional[int]:
  return None if value is None else _token_id(name, value)


def _flag(name: str, value) -> bool:
  if not (isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1))):
    raise UserError(f"{name}={show(value)} must be True or False")
  return bool(value)


def _finite_float(name: str, value) -> float:
  array = _number(name, value, "iuf")
  if array is None or not np.isfinite(array):
    raise UserError(f"{name}={show(value)} must be finite")
  return float(array)


def _as_tuple(value):
  """Nested lists / tuples / arrays as nested tuples of python scalars (a hashable, canonical form)."""
  if isinstance(value, (list, tuple, np.ndarray)):
    return tuple(_as_tuple(v) for v in value)
  return value.item() if isinstance(value, np.generic) else value


def _as_lists(value):
  return [_as_lists(v) for v in value] if isinstance(value, tuple) else value


def concrete(name: str, value) -> np.ndarray:
  try:
    return np.asarray(value)
  except jax.errors.TracerArrayConversionError:
    raise UserError(f"{name} must be concrete (a Python number or array), not a traced value") from None


def _show(array: np.ndarray):
  values = np.asarray(array).tolist()
  return values[0] if len(set(map(str, values))) == 1 else values


# name -> (predicate on a float64 vector, what a valid value is)
_RULES = {
    "temperature": (lambda v: np.isfinite(v) & (v >= 0), "must be >= 0 and finite (0 = greedy)"),
    "top_k": (lambda v: v >= 0, "must be >= 0 (0 = off)"),
    "top_p": (lambda v: (v > 0) & (v <= 1), "must be in (0, 1] (1 = off)"),
    "min_p": (lambda v: (v >= 0) & (v <= 1), "must be in [0, 1] (0 = off)"),
    "min_tokens_to_keep": (lambda v: v >= 1, "must be >= 1"),
    "repetition_penalty": (lambda v: np.isfinite(v) & (v > 0), "must be > 0 and finite (1 = off)"),
    "presence_penalty": (np.isfinite, "must be finite (0 = off)"),
    "frequency_penalty": (np.isfinite, "must be finite (0 = off)"),
}


def check_setting(name: str, value) -> PerRow:
  """A sampling setting (a scalar, or one value per row) checked against its rule; returned canonical (a python
  float / int, or a tuple of them). UserError naming `name`, the value, the valid range and a bad row."""
  array = concrete(name, value)
  dtype = np.int32 if name in INT_SETTINGS else np.float32
  if dtype is np.int32 and not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool
                                or np.all(np.mod(array, 1) == 0)):
    raise UserError(f"{name}={_show(array.reshape(-1))} must be an integer")
  vector = array.astype(dtype).reshape(-1)
  valid, rule = _RULES[name]
  ok = valid(vector.astype(np.float64))
  if not np.all(ok):
    bad = np.flatnonzero(~ok)
    where = "" if vector.size == 1 or array.ndim == 0 else f" (row {int(bad[0])})"
    raise UserError(f"{name}={_show(array.reshape(-1))} {rule}; got {show(vector[bad[0]])}{where}")
  cast = int if dtype is np.int32 else float
  return cast(array.item()) if array.ndim == 0 else _as_tuple(array.astype(np.int64 if cast is int else np.float64))


def _is_sequence(s) -> bool:
  return isinstance(s, tuple) and all(np.isscalar(t) for t in s)


def _bad_stops(value, rows: str = "") -> UserError:
  return UserError(f"stop_sequences={_as_lists(value)!r} must be a list of token-id lists, or one such list per "
                   f"row{rows}")


def check_stop_sequences(name: str, value) -> Optional[tuple]:
  """None (no stop sequences), or a tuple of id tuples shared by every row, or a tuple of such tuples per row."""
  if value is None:
    return None
  value = _as_tuple(concrete(name, value) if isinstance(value, np.ndarray) else value)
  if not isinstance(value, tuple):
    raise _bad_stops(value)
  if len(value) == 0:
    return None
  if all(_is_sequence(s) for s in value):
    rows = [value]
  elif all(isinstance(r, tuple) and all(_is_sequence(s) for s in r) for r in value):
    rows = list(value)
  else:
    raise _bad_stops(value)
  for row in rows:
    for s in row:
      if len(s) == 0 or any(int(t) < 0 for t in s):
        raise UserError(f"stop_sequences contains {_as_lists(s)!r}; each stop sequence needs >= 1 token id >= 0")
  return value


_CHECKS = {
    "max_new_tokens": positive_int,
    **{name: check_setting for name in FLOAT_SETTINGS + INT_SETTINGS},
    "greedy": _flag,
    "eos_id": _optional_token_id,
    "pad_id": _token_id,
    "stop_sequences": check_stop_sequences,
    "num_return_sequences": positive_int,
    "num_beams": positive_int,
    "length_penalty": _finite_float,
    "num_draft_tokens": positive_int,
}


# ------------------------------------------------------------------------------------- packing per batch -------
def host_vector(name: str, value, batch: int, dtype) -> np.ndarray:
  """`value` (a scalar or one per row) as a numpy [batch] vector of `dtype`; UserError on another shape."""
  array = concrete(name, value)
  if array.ndim == 0:
    array = np.broadcast_to(array, (batch,))
  if array.shape != (batch,):
    raise UserError(f"{name} must be a scalar or have shape ({batch},), got shape {array.shape}")
  if np.issubdtype(dtype, np.integer) and not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool
                                              or np.all(np.mod(array, 1) == 0)):
    raise UserError(f"{name}={_show(array)} must be an integer")
  return array.astype(dtype)


def sampling_values(settings: DecodingSettings) -> tuple:
  """The sampling settings and penalties in `FLOAT_SETTINGS + INT_SETTINGS` order (temperature 0 when greedy)."""
  values = {name: getattr(settings, name) for name in FLOAT_SETTINGS + INT_SETTINGS}
  if settings.greedy:
    values["temperature"] = 0.0
  return tuple(values[name] for name in FLOAT_SETTINGS + INT_SETTINGS)


def sampling_arrays(settings: DecodingSettings, batch: int) -> tuple[np.ndarray, np.ndarray]:
  """The sampling settings packed as (float32 [batch, len(FLOAT_SETTINGS)], int32 [batch, len(INT_SETTINGS)]),
  computed once per (batch, values) and shared by later calls: both arrays are read-only."""
  return _pack(batch, sampling_values(settings))


@functools.lru_cache(maxsize=256)
def _pack(batch: int, values: tuple) -> tuple[np.ndarray, np.ndarray]:
  named = dict(zip(FLOAT_SETTINGS + INT_SETTINGS, values))
  floats = np.stack([host_vector(n, named[n], batch, np.float32) for n in FLOAT_SETTINGS], axis=1)
  ints = np.stack([host_vector(n, named[n], batch, np.int32) for n in INT_SETTINGS], axis=1)
  floats.flags.writeable = ints.flags.writeable = False
  return floats, ints


class RowSettings(NamedTuple):
  """The per-row vectors of `sampling_arrays`, by name (inside the jitted program)."""
  temperature: jax.Array
  top_p: jax.Array
  min_p: jax.Array
  repetition_penalty: jax.Array
  presence_penalty: jax.Array
  frequency_penalty: jax.Array
  top_k: jax.Array
  min_tokens_to_keep: jax.Array

  @classmethod
  def unpack(cls, floats, ints) -> RowSettings:
    named = {n: floats[:, i] for i, n in enumerate(FLOAT_SETTINGS)}
    named.update({n: ints[:, i] for i, n in enumerate(INT_SETTINGS)})
    return cls(**named)

  def repeat(self, n: int) -> RowSettings:
    """Each row's settings n times in a row (n sequences per prompt)."""
    return RowSettings(*(jnp.repeat(v, n, axis=0) for v in self))


def samples(floats: np.ndarray) -> bool:
  """Whether any row samples (a temperature > 0); False: every row is argmax."""
  return bool(np.any(floats[:, FLOAT_SETTINGS.index("temperature")] > 0))


def penalizes(floats: np.ndarray) -> bool:
  """Whether any row has a penalty away from its "off" value."""
  column = {n: floats[:, FLOAT_SETTINGS.index(n)] for n in PENALTIES}
  return bool(np.any(column["repetition_penalty"] != 1) or np.any(column["presence_penalty"] != 0)
              or np.any(column["frequency_penalty"] != 0))


def stop_table(settings: DecodingSettings, batch: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
  """(int32 [B, S, L] right-aligned stop sequences, WILDCARD-padded on the left; int32 [B, S] their lengths, 0 for
  an unused slot), or None without stop sequences."""
  stops = settings.stop_sequences
  if stops is None:
    return None
  if all(_is_sequence(s) for s in stops):
    per_row = [list(stops)] * batch
  elif len(stops) == batch:
    per_row = [list(r) for r in stops]
  else:
    raise _bad_stops(stops, f" ({batch} rows)")
  count = max(1, max(len(r) for r in per_row))
  longest = max((len(s) for r in per_row for s in r), default=1)
  table = np.full((batch, count, longest), WILDCARD, np.int32)
  lengths = np.zeros((batch, count), np.int32)
  for b, row in enumerate(per_row):
    for j, s in enumerate(row):
      table[b, j, longest - len(s):] = np.asarray(s, np.int32)
      lengths[b, j] = len(s)
  return table, lengths


def special_ids(settings: DecodingSettings) -> np.ndarray:
  """int32 [eos_id (-1: none), pad_id] (runtime values of the decode programs)."""
  return np.array([-1 if settings.eos_id is None else settings.eos_id, settings.pad_id], np.int32)


def check_rng(rng, floats: np.ndarray) -> None:
  if rng is None and samples(floats):
    raise UserError("sampling needs an rng key (or pass greedy=True / temperature=0)")
