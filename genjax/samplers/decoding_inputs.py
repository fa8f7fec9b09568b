"""Host-side checks of what the decoding entry points (`generate`, `beam_search`, `speculative_generate`) decode
from: the prompts, the context and the model's cache. (What to decode, the settings, is `genjax.samplers.settings`.)

Everything here runs once per call on the host, in numpy, before the one jitted program: prompts to a padded int32
array, the context guard (the longest prompt plus `max_new_tokens` must fit in `model.max_len`) and the cache
contract (every leaf of `init_cache` batch-first). A bad input raises `genjax.errors.UserError` naming it.

    from genjax.samplers.decoding_inputs import check_context, prepare_prompts
    tokens, lengths = prepare_prompts([[257, 72], [257]], None, pad_id=0)     # int32 [2, 2], int32 [2]
    cache_len = check_context(model, lengths, max_new_tokens=16, cache_len=None, width=tokens.shape[1])
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import numpy as np

from genjax.errors import UserError
from genjax.samplers.settings import host_vector, positive_int


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


def check_prompt_ids(tokens: np.ndarray, lengths: np.ndarray, vocab: int) -> None:
  """Every prompt token (each row's first `lengths[row]` ids; the padding after them is never read, so it may hold
  any pad id) must be in [0, vocab): the embedding gather would clamp a bad id into a wrong token, silently."""
  real = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
  bad = real & ((tokens < 0) | (tokens >= vocab))
  if bad.any():
    row, position = (int(i[0]) for i in np.nonzero(bad))
    raise UserError(f"prompt token id {int(tokens[row, position])} (row {row}, position {position}) is outside the "
                    f"model's vocabulary [0, {vocab}) (vocabulary size {vocab})")


def vocab_size(model, params) -> int:
  """The number of logits `model.step_fn` returns with `params`: its vocabulary size, from shapes alone
  (`jax.eval_shape` of one token, computed once per model and params shapes)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  return _vocab_size(model, treedef, tuple(jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)) for x in leaves))


@functools.lru_cache(maxsize=256)
def _vocab_size(model, treedef, leaves: tuple) -> int:
  def logits(params):
    token = jax.numpy.zeros((1, 1), jax.numpy.int32)
    return model.step_fn(params, token, token, model.init_cache(1, 1))[0]
  return int(jax.eval_shape(logits, jax.tree_util.tree_unflatten(treedef, leaves)).shape[-1])


def check_context(model, lengths: np.ndarray, max_new_tokens: int, cache_len: Optional[int], width: int,
                  extra: int = 0) -> int:
  """The KV cache size for a run, after the context guard.

  The longest prompt plus `max_new_tokens` must fit in `model.max_len` (the context the model supports); an explicit
  `cache_len` must hold the longest prompt plus `max_new_tokens - 1` tokens (every token but the last is fed back).
  Default cache: prompt width + max_new_tokens - 1 + `extra`, capped at `model.max_len`. `max_new_tokens`: a
  positive int (a `DecodingSettings` field, validated there).
  """
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


def prepare_row_ids(row_ids, batch: int) -> np.ndarray:
  """int32 [batch] ids that seed each row's randomness: `arange(batch)` by default."""
  return np.arange(batch, dtype=np.int32) if row_ids is None else host_vector("row_ids", row_ids, batch, np.int32)
