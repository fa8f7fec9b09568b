"""Jitted text decoding for any autoregressive model with a KV cache: `generate` (greedy / sampling with
temperature, top-k, top-p and penalties) and `beam_search`. Imports jax only; a model plugs in through
`DecodingModel`, three fields:

    step_fn(params, tokens, positions, cache) -> (logits, cache)
        tokens, positions: int32 [B, T]; logits: float [B, T, V]. Writes the keys/values of the T tokens into
        cache slot == position and lets the query at position q attend to slots <= q only (so stale slots beyond
        a row's position are never read). Called once with the padded prompts (T = prompt width), then with T = 1
        (generate feeds every chosen token, the last one included: one spare step per call).
    init_cache(batch_size, cache_len) -> cache      a pytree whose every leaf has the batch on axis 0
    max_len: int | None                             the longest cache the model supports (None: no limit)

Usage (the transformer LM provides its DecodingModel: `transformer.decoding_model(transformer.lm_config(config))`):

    from genjax.samplers import generate, beam_search, top_k_logits, top_p_logits
    out = generate(model, params, [[257, 72, 105], [257, 79]], rng, max_new_tokens=50, temperature=0.8,
                   top_p=0.9, repetition_penalty=1.2, eos_id=258, pad_id=256)
    out.tokens    # int32 [B, 50]: new tokens; a row that has emitted EOS (or filled its cache) emits pad_id
    out.lengths   # int32 [B]: new tokens per row, EOS included
    best = beam_search(model, params, prompts, num_beams=4, max_new_tokens=50, length_penalty=1.0, eos_id=258)
    best.sequences[:, 0], best.scores[:, 0]       # the best beam of each row

Prompts are a list of id lists or an int array [B, P] right-padded with `prompt_lengths` [B] (each >= 1).
Each call is one jitted program (prefill + `while_loop` decode) over a preallocated cache of `cache_len` slots
(default: prompt width + max_new_tokens - 1, capped at `model.max_len`). Static: the model, the prompt shape,
max_new_tokens, cache_len, num_beams, and for `generate` two facts about the settings: whether any row samples
(all rows greedy: argmax only) and whether any penalty is on (all off: no bookkeeping) — at most four programs,
each compiled once. Runtime (no recompilation): temperature, top_k, top_p, min_tokens_to_keep, the penalties,
length_penalty, eos/pad ids — scalars or one value per row.

Randomness is per row: row i draws its t-th token with `fold_in(fold_in(rng, row_ids[i]), t)`; `row_ids` defaults
to `arange(B)`, so passing a row's id makes its output independent of the rest of the batch.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from genjax.samplers.logits import (apply_penalties, choose_tokens, filter_logits, top_k_logits,  # noqa: F401
                                    top_p_logits)

__all__ = ["DecodingModel", "GenerateOutput", "BeamSearchOutput", "generate", "beam_search", "top_k_logits",
           "top_p_logits", "filter_logits", "apply_penalties", "choose_tokens"]


class DecodingModel(NamedTuple):
  """The function interface `generate` / `beam_search` drive (see module docstring). Hashable: keep one instance
  per model configuration so that repeated calls reuse the compiled program."""
  step_fn: Callable[[Any, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
  init_cache: Callable[[int, int], Any]
  max_len: Optional[int] = None


class GenerateOutput(NamedTuple):
  tokens: jax.Array      # int32 [B, max_new_tokens], pad_id after a row's EOS / cache end
  lengths: jax.Array     # int32 [B], generated tokens per row (EOS included)


class BeamSearchOutput(NamedTuple):
  sequences: jax.Array   # int32 [B, num_beams, max_new_tokens], best first, pad_id after EOS
  scores: jax.Array      # float32 [B, num_beams]: sum of log-probs / length ** length_penalty (-inf: no hypothesis)
  lengths: jax.Array     # int32 [B, num_beams], generated tokens (EOS included)


def _prepare_prompts(prompts, prompt_lengths, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  if isinstance(prompts, (list, tuple)) and (not prompts or not np.isscalar(prompts[0])):
    if prompt_lengths is not None:
      raise ValueError("prompt_lengths is only for array prompts; a list of id lists carries its own lengths")
    if not prompts:
      raise ValueError("prompts is empty; pass at least one prompt")
    lengths = np.array([len(p) for p in prompts], dtype=np.int32)
    tokens = np.full((len(prompts), max(1, int(lengths.max()))), pad_id, dtype=np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = np.asarray(p, dtype=np.int32)
  else:
    tokens = np.asarray(prompts)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"prompts must be int [batch, length] (or a list of id lists), got {tokens.dtype} "
                       f"{tokens.shape}")
    tokens = tokens.astype(np.int32)
    lengths = (np.full((tokens.shape[0],), tokens.shape[1], np.int32) if prompt_lengths is None
               else np.asarray(prompt_lengths, dtype=np.int32))
    if lengths.shape != (tokens.shape[0],):
      raise ValueError(f"prompt_lengths must have shape ({tokens.shape[0]},), got {lengths.shape}")
  if lengths.min() < 1 or lengths.max() > tokens.shape[1]:
    raise ValueError(f"every prompt needs 1..{tokens.shape[1]} tokens (start empty prompts with a BOS id), "
                     f"got lengths {lengths.tolist()}")
  return tokens, lengths


def _cache_len(model: DecodingModel, tokens: np.ndarray, prompt_lengths: np.ndarray, max_new_tokens: int,
               cache_len: Optional[int]) -> int:
  """The cache size: given, or prompt width + max_new_tokens - 1 capped at model.max_len (shape-derived, so
  prompts padded to one width share a compilation)."""
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  longest = int(prompt_lengths.max())
  if cache_len is None:
    cache_len = tokens.shape[1] + int(max_new_tokens) - 1
    if model.max_len is not None:
      cache_len = min(cache_len, int(model.max_len))
  elif model.max_len is not None and cache_len > model.max_len:
    raise ValueError(f"cache_len={cache_len} exceeds the model's max_len={model.max_len}")
  if longest > cache_len:
    raise ValueError(f"a prompt of {longest} tokens is longer than the KV cache ({cache_len} slots"
                     f"{'' if model.max_len is None else f', model max_len={model.max_len}'}); shorten the prompt")
  return int(cache_len)


def _row_vector(value, batch: int, dtype, name: str) -> jax.Array:
  value = jnp.asarray(value, dtype)
  if value.ndim == 0:
    return jnp.broadcast_to(value, (batch,))
  if value.shape != (batch,):
    raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {value.shape}")
  return value


def _prefill(model: DecodingModel, params, prompts, lengths, cache_len: int):
  """Runs the padded prompts through the model; returns (float32 logits at each row's last prompt token, cache)."""
  batch, width = prompts.shape
  cache = model.init_cache(batch, cache_len)
  positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
  logits, cache = model.step_fn(params, prompts, positions, cache)
  last = logits[jnp.arange(batch), lengths - 1].astype(jnp.float32)
  return last, cache


def _generate_impl(model, max_new_tokens, cache_len, sample, penalize, params, prompts, lengths, row_keys, s):
  batch, width = prompts.shape
  rows = jnp.arange(batch)
  logits, cache = _prefill(model, params, prompts, lengths, cache_len)
  vocab = logits.shape[-1]
  in_prompt = jnp.arange(width)[None, :] < lengths[:, None]
  seen = jnp.zeros((batch, vocab), bool).at[rows[:, None], prompts].max(in_prompt)
  counts = jnp.zeros((batch, vocab), jnp.int32)

  # One loop iteration: choose token t of every row from `logits`, then feed it at position lengths + t to get
  # the logits for token t + 1 (the choice code is traced once; the last feed is one spare model step).
  def cond(state):
    t, done = state[0], state[5]
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(state):
    t, out, logits, seen, counts, done, n, cache = state
    if penalize:
      logits = apply_penalties(logits, seen, counts, s["repetition_penalty"], s["presence_penalty"],
                               s["frequency_penalty"])
    if sample:
      keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, t)
      tok = choose_tokens(logits, keys, s["temperature"], s["top_k"], s["top_p"], s["min_tokens_to_keep"])
    else:
      tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    tok = jnp.where(done, s["pad_id"], tok)
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, t))
    if penalize:
      hot = jax.nn.one_hot(tok, vocab, dtype=jnp.int32) * (~done)[:, None]
      seen, counts = seen | (hot > 0), counts + hot
    n = n + (~done).astype(jnp.int32)
    # A row ends at EOS, or when token t's position lengths + t falls outside the cache.
    done = done | (tok == s["eos_id"]) | (lengths + t >= cache_len)
    pos = jnp.minimum(lengths + t, cache_len - 1)
    logits, cache = model.step_fn(params, tok[:, None], pos[:, None], cache)
    return t + 1, out, logits[:, 0].astype(jnp.float32), seen, counts, done, n, cache

  out = jnp.full((batch, max_new_tokens), s["pad_id"], jnp.int32)
  zeros = jnp.zeros((batch,), jnp.int32)
  state = (jnp.int32(0), out, logits, seen, counts, jnp.zeros((batch,), bool), zeros, cache)
  _, out, _, _, _, _, n, _ = jax.lax.while_loop(cond, body, state)
  return GenerateOutput(out, n)


_generate_jit = jax.jit(_generate_impl, static_argnums=(0, 1, 2, 3, 4))


def _everywhere(values: jax.Array, predicate) -> bool:
  """True when `predicate(values)` holds for every row of a concrete vector (False for traced values)."""
  try:
    return bool(np.all(predicate(np.asarray(values))))
  except jax.errors.TracerArrayConversionError:
    return False


def generate(model: DecodingModel, params, prompts, rng=None, *, max_new_tokens: int, prompt_lengths=None,
             temperature=1.0, top_k=0, top_p=1.0, min_tokens_to_keep=1, repetition_penalty=1.0,
             presence_penalty=0.0, frequency_penalty=0.0, greedy: bool = False, eos_id: Optional[int] = None,
             pad_id: int = 0, row_ids=None, cache_len: Optional[int] = None) -> GenerateOutput:
  """Decodes up to `max_new_tokens` per prompt; stops early once every row has emitted `eos_id`.

  Temperature, then top-k (`0` = off), then top-p (`1.0` = off); `temperature <= 0` or `greedy=True` is argmax.
  Penalties act on the raw logits first: `repetition_penalty` over prompt + generated ids, presence/frequency
  over generated ids. `rng` is one PRNG key (needed unless greedy); row i uses `fold_in(rng, row_ids[i])`.
  A row stops when it emits EOS or when its cache is full (prompt length + generated tokens == cache_len).
  See the module docstring for the model interface and what is static vs runtime.
  """
  if not isinstance(model, DecodingModel):
    raise ValueError(f"model must be a genjax.samplers.decoding.DecodingModel, got {type(model).__name__}")
  tokens, lengths = _prepare_prompts(prompts, prompt_lengths, pad_id)
  batch = tokens.shape[0]
  cache_len = _cache_len(model, tokens, lengths, max_new_tokens, cache_len)
  tokens = tokens[:, :cache_len]                   # padding beyond the cache is never read
  if greedy:
    temperature = 0.0
  if rng is None:
    if not (isinstance(temperature, (int, float)) and temperature <= 0):
      raise ValueError("sampling needs an rng key (or pass greedy=True / temperature=0)")
    rng = jax.random.key(0)
  row_ids = jnp.arange(batch, dtype=jnp.int32) if row_ids is None else _row_vector(row_ids, batch, jnp.int32,
                                                                                    "row_ids")
  row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, row_ids)
  settings = dict(
      temperature=_row_vector(temperature, batch, jnp.float32, "temperature"),
      top_k=_row_vector(top_k, batch, jnp.int32, "top_k"),
      top_p=_row_vector(top_p, batch, jnp.float32, "top_p"),
      min_tokens_to_keep=_row_vector(min_tokens_to_keep, batch, jnp.int32, "min_tokens_to_keep"),
      repetition_penalty=_row_vector(repetition_penalty, batch, jnp.float32, "repetition_penalty"),
      presence_penalty=_row_vector(presence_penalty, batch, jnp.float32, "presence_penalty"),
      frequency_penalty=_row_vector(frequency_penalty, batch, jnp.float32, "frequency_penalty"),
      eos_id=jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32),
      pad_id=jnp.asarray(pad_id, jnp.int32))
  # Two specialisations, each compiled once: every row greedy (argmax only: no sort, no random draw) or not;
  # penalties at their defaults in every row (no bookkeeping of seen ids) or not.
  sample = not _everywhere(settings["temperature"], lambda t: t <= 0)
  penalize = not (_everywhere(settings["repetition_penalty"], lambda r: r == 1)
                  and _everywhere(settings["presence_penalty"], lambda p: p == 0)
                  and _everywhere(settings["frequency_penalty"], lambda f: f == 0))
  return _generate_jit(model, int(max_new_tokens), cache_len, sample, penalize, params, jnp.asarray(tokens),
                       jnp.asarray(lengths), row_keys, settings)


def _beam_search_impl(model, num_beams, max_new_tokens, cache_len, params, prompts, lengths, length_penalty,
                      eos_id, pad_id):
  batch = prompts.shape[0]
  k, n = num_beams, max_new_tokens
  logits, cache = _prefill(model, params, prompts, lengths, cache_len)
  vocab = logits.shape[-1]
  logp = jnp.broadcast_to(jax.nn.log_softmax(logits)[:, None, :], (batch, k, vocab))
  cache = jax.tree_util.tree_map(lambda x: jnp.repeat(x, k, axis=0), cache)
  beam_lengths = jnp.repeat(lengths, k)
  neg = jnp.float32(-jnp.inf)
  alive_logp = jnp.full((batch, k), neg).at[:, 0].set(0.0)   # all beams start equal; keep one copy alive
  alive_seq = jnp.full((batch, k, n), pad_id, jnp.int32)
  fin_seq, fin_score = alive_seq, jnp.full((batch, k), neg)
  fin_len = jnp.zeros((batch, k), jnp.int32)
  num_cand = min(2 * k, k * vocab)

  def norm(logp, length):
    return logp / jnp.power(length.astype(jnp.float32), length_penalty)

  def top_k_merge(scores, seqs, lens):
    best, idx = jax.lax.top_k(scores, k)
    take = lambda x: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
    return best, take(seqs), take(lens)

  def cond(state):
    t, done = state[0], state[-1]
    return (t < n) & ~jnp.all(done)

  def body(state):
    t, logp, alive_logp, alive_seq, fin_seq, fin_score, fin_len, cache, _ = state
    total = (alive_logp[:, :, None] + logp).reshape(batch, k * vocab)
    vals, idx = jax.lax.top_k(total, num_cand)
    beam, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(alive_seq, beam[:, :, None], axis=1)
    seqs = jax.lax.dynamic_update_slice(seqs, tok[:, :, None], (0, 0, t))
    # An EOS candidate finishes only if it ranks among the top num_beams candidates (so 1 beam == greedy);
    # the best num_beams non-EOS candidates stay alive.
    is_eos = tok == eos_id
    finishes = is_eos & (jnp.arange(num_cand) < k)[None, :]
    length = jnp.full(vals.shape, t + 1, jnp.int32)
    fin_score, fin_seq, fin_len = top_k_merge(
        jnp.concatenate([fin_score, jnp.where(finishes & (vals > neg), norm(vals, length), neg)], axis=1),
        jnp.concatenate([fin_seq, seqs], axis=1), jnp.concatenate([fin_len, length], axis=1))
    alive_logp, sel = jax.lax.top_k(jnp.where(is_eos, neg, vals), k)
    alive_seq = jnp.take_along_axis(seqs, sel[:, :, None], axis=1)
    parent = jnp.take_along_axis(beam, sel, axis=1)
    new_tok = jnp.take_along_axis(tok, sel, axis=1).reshape(batch * k)
    flat_parent = (jnp.arange(batch)[:, None] * k + parent).reshape(batch * k)
    cache = jax.tree_util.tree_map(lambda x: x[flat_parent], cache)
    pos = jnp.minimum(beam_lengths + t, cache_len - 1)
    logits, cache = model.step_fn(params, new_tok[:, None], pos[:, None], cache)
    logp = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32)).reshape(batch, k, vocab)
    # A row is done when its finished pool is full and no alive beam can still beat the worst finished score
    # (log-probs only fall; the score of a beam of best log-prob a is at most max(a / (t+1)^lp, a / n^lp)).
    best_alive = alive_logp[:, 0]
    bound = jnp.maximum(norm(best_alive, jnp.int32(t + 1)), norm(best_alive, jnp.int32(n)))
    done = (fin_score[:, -1] > neg) & (bound < fin_score[:, -1])
    return t + 1, logp, alive_logp, alive_seq, fin_seq, fin_score, fin_len, cache, done

  state = (jnp.int32(0), logp, alive_logp, alive_seq, fin_seq, fin_score, fin_len, cache, jnp.zeros((batch,), bool))
  t, _, alive_logp, alive_seq, fin_seq, fin_score, fin_len, _, _ = jax.lax.while_loop(cond, body, state)
  # Beams still alive at the end compete as hypotheses of their current length.
  alive_len = jnp.full((batch, k), t, jnp.int32)
  scores, seqs, lens = top_k_merge(
      jnp.concatenate([fin_score, jnp.where(alive_logp > neg, norm(alive_logp, alive_len), neg)], axis=1),
      jnp.concatenate([fin_seq, alive_seq], axis=1), jnp.concatenate([fin_len, alive_len], axis=1))
  return BeamSearchOutput(seqs, scores, lens)


_beam_search_jit = jax.jit(_beam_search_impl, static_argnums=(0, 1, 2, 3))


def beam_search(model: DecodingModel, params, prompts, *, num_beams: int, max_new_tokens: int,
                prompt_lengths=None, length_penalty=1.0, eos_id: Optional[int] = None, pad_id: int = 0,
                cache_len: Optional[int] = None) -> BeamSearchOutput:
  """Beam search: the `num_beams` best continuations of each prompt, best first.

  A hypothesis ends at `eos_id` (included in its length) or after `max_new_tokens`; its score is
  `sum(log p) / generated_length ** length_penalty`. A row stops early once no alive beam can beat its worst
  finished hypothesis. With `num_beams=1` and `length_penalty=0` this is greedy decoding. The cache must hold
  every prompt plus `max_new_tokens - 1` tokens.
  """
  if not isinstance(model, DecodingModel):
    raise ValueError(f"model must be a genjax.samplers.decoding.DecodingModel, got {type(model).__name__}")
  if not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
    raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
  tokens, lengths = _prepare_prompts(prompts, prompt_lengths, pad_id)
  cache_len = _cache_len(model, tokens, lengths, max_new_tokens, cache_len)
  tokens = tokens[:, :cache_len]                   # padding beyond the cache is never read
  needed = int(lengths.max()) + int(max_new_tokens) - 1
  if needed > cache_len:
    raise ValueError(f"beam search needs a cache of {needed} slots (longest prompt {int(lengths.max())} + "
                     f"max_new_tokens {max_new_tokens} - 1) but cache_len={cache_len}")
  return _beam_search_jit(model, int(num_beams), int(max_new_tokens), cache_len, params, jnp.asarray(tokens),
                          jnp.asarray(lengths), jnp.float32(length_penalty),
                          jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id))
