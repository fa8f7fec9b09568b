"""Host-side checks and packing for the decoding entry points (`generate`, `beam_search`, `speculative_generate`).

Everything here runs once per call on the host, in numpy, before the one jitted program: prompts to a padded int32
array, every setting validated (a bad value raises `genjax.errors.UserError` naming the setting and the value) and
packed into two small arrays, stop sequences into a right-aligned table, the context guard (the longest prompt plus
`max_new_tokens` must fit in `model.max_len`) and the cache contract (every leaf of `init_cache` batch-first).

    from genjax.samplers.decoding_inputs import sampling_settings
    floats, ints = sampling_settings(2, temperature=[0.7, 0.0], top_p=0.9)   # numpy [2, 6] float32, [2, 2] int32
    sampling_settings(1, top_p=1.5)        # UserError: top_p=1.5 must be in (0, 1] (1 = off)
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import numpy as np

from genjax.errors import UserError

FLOAT_SETTINGS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
INT_SETTINGS = ("top_k", "min_tokens_to_keep")
WILDCARD = -2                               # left padding of a right-aligned stop sequence: matches anything


def positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise UserError(f"{name}={value!r} must be a positive int")
  return int(value)


def prepare_prompts(prompts, prompt_lengths, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(int32 [B, P] right-padded prompts, int32 [B] lengths) from a list of id lists or an array + lengths."""
  if isinstance(prompts, (list, tuple)) and (not prompts or not np.isscalar(prompts[0])):
    if prompt_lengths is not None:
      raise UserError("prompt_lengths is only for array prompts; a list of id lists carries its own lengths")
    if not prompts:
      raise UserError("prompts is empty; pass at least one prompt")
    lengths = np.array([len(p) for p in prompts], dtype=np.int32)
    tokens = np.full((len(prompts), max(1, int(lengths.max()))), pad_id, dtype=np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = np.asarray(p, dtype=np.int32)
  else:
    tokens = np.asarray(prompts)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
      raise UserError(f"prompts must be int [batch, length] (or a list of id lists), got {tokens.dtype} "
                      f"{tokens.shape}")
    tokens = tokens.astype(np.int32)
    lengths = (np.full((tokens.shape[0],), tokens.shape[1], np.int32) if prompt_lengths is None
               else np.asarray(prompt_lengths, dtype=np.int32))
    if lengths.shape != (tokens.shape[0],):
      raise UserError(f"prompt_lengths must have shape ({tokens.shape[0]},), got {lengths.shape}")
  if lengths.min() < 1 or lengths.max() > tokens.shape[1]:
    raise UserError(f"every prompt needs 1..{tokens.shape[1]} tokens (start empty prompts with a BOS id), "
                    f"got lengths {lengths.tolist()}")
  return tokens, lengths


def host_vector(name: str, value, batch: int, dtype) -> np.ndarray:
  try:
    array = np.asarray(value)
  except jax.errors.TracerArrayConversionError:
    raise UserError(f"{name} must be concrete (a Python number or array), not a traced value") from None
  if array.ndim == 0:
    array = np.broadcast_to(array, (batch,))
  if array.shape != (batch,):
    raise UserError(f"{name} must be a scalar or have shape ({batch},), got shape {array.shape}")
  if np.issubdtype(dtype, np.integer) and not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool
                                              or np.all(np.mod(array, 1) == 0)):
    raise UserError(f"{name}={_show(array)} must be an integer")
  return array.astype(dtype)


def _show(array: np.ndarray):
  values = np.asarray(array).tolist()
  return values[0] if len(set(map(str, values))) == 1 else values


# name -> (predicate on a float64/int64 vector, what a valid value is)
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


def check_setting(name: str, value, batch: int, dtype=np.float32) -> np.ndarray:
  """`value` (a scalar or one per row) as a [batch] numpy vector; UserError naming `name` and the bad value."""
  vector = host_vector(name, value, batch, dtype)
  valid, rule = _RULES[name]
  ok = valid(vector.astype(np.float64))
  if not np.all(ok):
    bad = np.flatnonzero(~ok)
    where = "" if vector.size == 1 or np.asarray(value).ndim == 0 else f" (row {int(bad[0])})"
    raise UserError(f"{name}={_show(np.asarray(value).reshape(-1))} {rule}; got {vector[bad[0]]!r}{where}")
  return vector


def sampling_settings(batch: int, **settings) -> tuple[np.ndarray, np.ndarray]:
  """Validated settings packed as (float32 [batch, len(FLOAT_SETTINGS)], int32 [batch, len(INT_SETTINGS)]).

  When every setting is a scalar (the common case) the packed pair is computed once per (batch, values) and shared
  by later calls: both arrays are then read-only."""
  if all(isinstance(v, (int, float, np.number)) for v in settings.values()):
    # the type is part of the key: 1, 1.0 and True are equal but are not equally valid for every setting
    return _scalar_settings(batch, tuple(sorted((k, type(v), v) for k, v in settings.items())))
  return _pack(batch, settings)


def _pack(batch: int, settings: dict) -> tuple[np.ndarray, np.ndarray]:
  floats = np.stack([check_setting(n, settings[n], batch, np.float32) for n in FLOAT_SETTINGS], axis=1)
  ints = np.stack([check_setting(n, settings[n], batch, np.int32) for n in INT_SETTINGS], axis=1)
  return floats, ints


@functools.lru_cache(maxsize=256)
def _scalar_settings(batch: int, items: tuple) -> tuple[np.ndarray, np.ndarray]:
  floats, ints = _pack(batch, {k: v for k, _, v in items})
  floats.flags.writeable = ints.flags.writeable = False
  return floats, ints


def unpack_settings(floats, ints) -> dict:
  """The per-row vectors of `sampling_settings`' arrays, by name (inside the jitted program)."""
  out = {n: floats[:, i] for i, n in enumerate(FLOAT_SETTINGS)}
  out.update({n: ints[:, i] for i, n in enumerate(INT_SETTINGS)})
  return out


def stop_table(stop_sequences, batch: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
  """(int32 [B, S, L] right-aligned stop sequences, WILDCARD-padded on the left; int32 [B, S] their lengths, 0 for
  an unused slot), or None. `stop_sequences`: one list of id lists for every row, or one such list per row."""
  if stop_sequences is None or len(stop_sequences) == 0:
    return None
  def is_sequence(s):
    return isinstance(s, (list, tuple, np.ndarray)) and all(np.isscalar(t) for t in s)
  if all(is_sequence(s) for s in stop_sequences):
    per_row = [list(stop_sequences)] * batch
  elif len(stop_sequences) == batch and all(isinstance(r, (list, tuple)) and all(is_sequence(s) for s in r)
                                            for r in stop_sequences):
    per_row = [list(r) for r in stop_sequences]
  else:
    raise UserError(f"stop_sequences={stop_sequences!r} must be a list of token-id lists, or one such list per "
                    f"row ({batch} rows)")
  for row in per_row:
    for s in row:
      if len(s) == 0 or any(int(t) < 0 for t in s):
        raise UserError(f"stop_sequences contains {list(s)!r}; each stop sequence needs >= 1 token id >= 0")
  count = max(1, max(len(r) for r in per_row))
  longest = max((len(s) for r in per_row for s in r), default=1)
  table = np.full((batch, count, longest), WILDCARD, np.int32)
  lengths = np.zeros((batch, count), np.int32)
  for b, row in enumerate(per_row):
    for j, s in enumerate(row):
      table[b, j, longest - len(s):] = np.asarray(s, np.int32)
      lengths[b, j] = len(s)
  return table, lengths


def check_context(model, lengths: np.ndarray, max_new_tokens: int, cache_len: Optional[int], width: int,
                  extra: int = 0) -> int:
  """The KV cache size for a run, after the context guard.

  The longest prompt plus `max_new_tokens` must fit in `model.max_len` (the context the model supports); an explicit
  `cache_len` must hold the longest prompt plus `max_new_tokens - 1` tokens (every token but the last is fed back).
  Default cache: prompt width + max_new_tokens - 1 + `extra`, capped at `model.max_len`.
  """
  max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
  longest = int(lengths.max())
  max_len = None if model.max_len is None else int(model.max_len)
  if max_len is not None and longest + max_new_tokens > max_len:
    raise UserError(f"the longest prompt ({longest} tokens) + max_new_tokens={max_new_tokens} = "
                    f"{longest + max_new_tokens} does not fit in the model's context max_len={max_len}; shorten the "
                    f"prompt, lower max_new_tokens, or knowingly decode past the context with a longer max_len (the "
                    f"LM: decoding_model(cfg, max_len=...); the sample CLI: --allow_longer_context)")
  needed = longest + max_new_tokens - 1
  if cache_len is None:
    cache_len = width + max_new_tokens - 1 + extra
    if max_len is not None:
      cache_len = min(cache_len, max_len)
  else:
    cache_len = positive_int("cache_len", cache_len)
    if max_len is not None and cache_len > max_len:
      raise UserError(f"cache_len={cache_len} exceeds the model's max_len={max_len}")
    if cache_len < needed:
      raise UserError(f"cache_len={cache_len} is too small: the longest prompt ({longest}) + max_new_tokens "
                      f"({max_new_tokens}) - 1 needs {needed} slots")
  return int(cache_len)


@functools.lru_cache(maxsize=256)
def check_cache_batch_axis(model, batch: int, cache_len: int, name: str = "model") -> None:
  """Every leaf of `model.init_cache(batch, cache_len)` must carry the batch on axis 0 (decoding repeats, reorders
  and rolls back caches per row); a leaf without it (a shared write index) raises UserError naming its path."""
  for b in (batch, batch + 1):      # two sizes, so that a leaf whose axis 0 equals the batch by chance is caught
    shapes = jax.eval_shape(lambda: model.init_cache(b, cache_len))
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
      if len(leaf.shape) == 0 or leaf.shape[0] != b:
        raise UserError(f"{name}.init_cache({b}, {cache_len}) leaf {jax.tree_util.keystr(path) or '<root>'} has "
                        f"shape {tuple(leaf.shape)}; every cache leaf needs the batch ({b}) on axis 0 (store a "
                        f"shared write index once per row, e.g. as an int32 [batch] vector)")
