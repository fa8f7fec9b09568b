"""Jitted text decoding for any autoregressive model with a KV cache: `generate` (greedy / sampling with
temperature, top-k, top-p, min-p and penalties; stop sequences; log-probs; n samples per prompt) and
`beam_search`. Imports jax only; a model plugs in through `DecodingModel`, three fields:

    step_fn(params, tokens, positions, cache) -> (logits, cache)
        tokens, positions: int32 [B, T]; logits: float [B, T, V]. Writes the keys/values of the T tokens into
        cache slot == position and lets the query at position q attend to slots <= q only (so stale slots beyond
        a row's position are never read). Called once with the padded prompts (T = prompt width), then with T = 1
        (generate feeds every chosen token but the last; beam_search feeds the last too).
    init_cache(batch_size, cache_len) -> cache      a pytree whose every leaf has the batch on axis 0
    max_len: int | None                             the longest context the model supports (None: no limit)

A model whose cache keeps one write index for the whole batch (Hugging Face Flax, the Flax decode cache) fits by
storing that index once per row and keeping a per-slot position table as its attention mask: see
`benchmarks/hf_gpt2.py` (`gpt2_decoding_model`) for transformers' Flax GPT-2 wrapped this way.

Usage (the transformer LM provides its DecodingModel: `transformer.decoding_model(transformer.lm_config(config))`):

    from genjax.samplers import DecodingSettings, beam_search, generate
    out = generate(model, params, [[257, 72, 105], [257, 79]], rng=rng, max_new_tokens=50, temperature=0.8,
                   top_p=0.9, min_p=0.05, repetition_penalty=1.2, eos_id=258, pad_id=256,
                   stop_sequences=[[10, 10]])
    settings = DecodingSettings(max_new_tokens=50, temperature=0.8, eos_id=258, pad_id=256)
    out = generate(model, params, prompts, rng=rng, settings=settings)              # the same knobs, as one value
    out.tokens      # int32 [B, 50]: new tokens; after a row's EOS or stop sequence, pad_id
    out.lengths     # int32 [B]: new tokens per row (EOS / stop sequence included)
    out.logprobs    # float32 [B, 50]: log p(token) under the model's raw softmax; 0 after the row ends
    out.stop_index  # int32 [B]: which stop sequence ended the row, -1 for none
    best = beam_search(model, params, prompts, num_beams=4, max_new_tokens=50, length_penalty=1.0, eos_id=258)
    best.sequences[:, 0], best.scores[:, 0]       # the best beam of each row

The decoding knobs are the fields of `DecodingSettings` (`genjax.samplers.settings`: validation, which decoder
applies which); each decoder takes `settings=` and/or the fields as keyword arguments, which override it. `rng`,
`prompt_lengths`, `row_ids` and `cache_len` describe the call, not the decoding: they stay keyword arguments.

Prompts are a list of id lists or an int array [B, P] right-padded with `prompt_lengths` [B] (each >= 1); every
prompt id must be in [0, vocabulary size), the number of logits `step_fn` returns (a UserError otherwise). The
longest prompt plus `max_new_tokens` must fit in `model.max_len` (a UserError otherwise: no silent stop).
Each call is one jitted program (prefill + `while_loop` decode) over a preallocated cache of `cache_len` slots
(default: prompt width + max_new_tokens - 1, capped at `model.max_len`). Static: the model, the prompt shape,
max_new_tokens, cache_len, num_beams, num_return_sequences, the stop table's shape, and for `generate` two facts
about the settings: whether any row samples (all rows greedy: argmax only) and whether any penalty is on (all off:
no bookkeeping). Runtime (no recompilation): temperature, top_k, top_p, min_p, min_tokens_to_keep, the penalties,
length_penalty, eos/pad ids, the stop ids — scalars or one value per row. Settings are validated on the host and
packed into two small arrays; nothing but the decode program is compiled for a new batch size.

Beam search follows Hugging Face PyTorch's rules, not HF Flax's: an EOS candidate finishes a hypothesis only when
it ranks among the top `num_beams` candidates of a step, and beams still alive at `max_new_tokens` compete with the
finished ones.

Randomness is per row: row i draws its t-th token with `fold_in(fold_in(fold_in(rng, row_ids[i]), j), t)` for its
j-th return sequence; `row_ids` defaults to `arange(B)`, so passing a row's id makes its output independent of the
rest of the batch.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import UserError
from genjax.samplers import decoding_inputs as inputs
from genjax.samplers import settings as settings_lib
from genjax.samplers.settings import DecodingSettings
from genjax.samplers.logits import (apply_penalties, choose_tokens, filter_logits, min_p_logits,  # noqa: F401
                                    top_k_logits, top_p_logits)

__all__ = ["DecodingModel", "DecodingSettings", "GenerateOutput", "BeamSearchOutput", "generate", "beam_search",
           "top_k_logits", "top_p_logits", "min_p_logits", "filter_logits", "apply_penalties", "choose_tokens"]


class DecodingModel(NamedTuple):
  """The function interface `generate` / `beam_search` / `speculative_generate` drive (see module docstring).
  Hashable: keep one instance per model configuration so that repeated calls reuse the compiled program."""
  step_fn: Callable[[Any, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
  init_cache: Callable[[int, int], Any]
  max_len: Optional[int] = None


class GenerateOutput(NamedTuple):
  """With `num_return_sequences=n > 1` every field gains an axis of n after the batch: [B, n, ...]."""
  tokens: jax.Array      # int32 [B, max_new_tokens], pad_id after a row's EOS / stop sequence
  lengths: jax.Array     # int32 [B], generated tokens per row (EOS / stop sequence included)
  logprobs: jax.Array    # float32 [B, max_new_tokens]: log-softmax of the raw logits at each chosen token; 0 after
  stop_index: jax.Array  # int32 [B]: index of the stop sequence that ended the row (in its list), -1 for none


class BeamSearchOutput(NamedTuple):
  sequences: jax.Array   # int32 [B, num_beams, max_new_tokens], best first, pad_id after EOS
  scores: jax.Array      # float32 [B, num_beams]: sum of log-probs / length ** length_penalty (-inf: no hypothesis)
  lengths: jax.Array     # int32 [B, num_beams], generated tokens (EOS included)


def check_model(model, name: str = "model") -> None:
  if not isinstance(model, DecodingModel):
    raise UserError(f"{name} must be a genjax.samplers.DecodingModel, got {type(model).__name__}")


def prefill(model: DecodingModel, params, prompts, lengths, cache_len: int):
  """Runs the padded prompts through the model; returns (float32 logits at each row's last prompt token, cache)."""
  batch, width = prompts.shape
  cache = model.init_cache(batch, cache_len)
  positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
  logits, cache = model.step_fn(params, prompts, positions, cache)
  last = logits[jnp.arange(batch), lengths - 1].astype(jnp.float32)
  return last, cache


def row_keys(rng, row_ids, num_return_sequences: int) -> jax.Array:
  """[B * n] keys: `fold_in(fold_in(rng, row_ids[i]), j)` for row i's j-th sequence (inside the program)."""
  if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  per_row = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, row_ids)
  sequences = jnp.arange(num_return_sequences, dtype=jnp.int32)
  return jax.vmap(lambda k: jax.vmap(jax.random.fold_in, in_axes=(None, 0))(k, sequences))(per_row).reshape(-1)


def _stop_match(recent, stops, stop_lengths):
  """(bool [B], int32 [B]): whether the last tokens `recent` [B, L] end with one of the row's stop sequences, and
  the first such index (-1: none)."""
  hit = jnp.all((stops == recent[:, None, :]) | (stops == settings_lib.WILDCARD), axis=-1) & (stop_lengths > 0)
  return jnp.any(hit, axis=-1), jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), -1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------- generate --------
class _GenerateProgram(NamedTuple):
  """What one compiled `generate` program is specialised on (its static argument)."""
  model: DecodingModel
  max_new_tokens: int
  cache_len: int
  num_return_sequences: int
  sample: bool                # some row samples (False: argmax only: no sort, no random draw)
  penalize: bool              # some row has a penalty on (False: no bookkeeping of seen ids)


class _Rows(NamedTuple):
  """Per-row constants of one decode loop (after repeating each prompt's row n times)."""
  settings: settings_lib.RowSettings
  keys: Optional[jax.Array]   # [B] PRNG keys (sampling only)
  eos_id: jax.Array
  pad_id: jax.Array
  stops: Optional[tuple]      # (int32 [B, S, L] stop table, int32 [B, S] lengths) or None
  lengths: jax.Array          # int32 [B] prompt lengths


class _Tracks(NamedTuple):
  """What each chosen token updates: the outputs so far and the bookkeeping of penalties and stop sequences."""
  tokens: jax.Array           # int32 [B, max_new_tokens], pad_id where not yet written / after the row ended
  logprobs: jax.Array         # float32 [B, max_new_tokens]
  done: jax.Array             # bool [B]
  lengths: jax.Array          # int32 [B] tokens generated
  stop_index: jax.Array       # int32 [B] the stop sequence that ended the row, -1 for none
  seen: jax.Array             # bool [B, V] ids in prompt + output (with penalties; else int32 [B, 0])
  counts: jax.Array           # int32 [B, V] generated count of each id (with penalties; else [B, 0])
  recent: jax.Array           # int32 [B, L] the last L tokens, L the longest stop sequence ([B, 0] without)


class _GenerateState(NamedTuple):
  t: jax.Array                # the index of the next token to choose
  token: jax.Array            # int32 [B] the last chosen token, fed to the model next
  tracks: _Tracks
  cache: Any


def _repeat_rows(n: int, logits, cache, prompts, lengths, s, stops):
  """Each prompt's row n times in a row: n samples per prompt share the prefill."""
  rep = lambda x: jnp.repeat(x, n, axis=0)
  stops = None if stops is None else tuple(rep(x) for x in stops)
  return rep(logits), jax.tree_util.tree_map(rep, cache), rep(prompts), rep(lengths), s.repeat(n), stops


def _initial_tracks(program: _GenerateProgram, rows: _Rows, prompts, vocab: int) -> _Tracks:
  batch, width = prompts.shape
  lengths = rows.lengths
  if program.penalize:
    in_prompt = jnp.arange(width)[None, :] < lengths[:, None]
    seen = jnp.zeros((batch, vocab), bool).at[jnp.arange(batch)[:, None], prompts].max(in_prompt)
    counts = jnp.zeros((batch, vocab), jnp.int32)
  else:
    seen = counts = jnp.zeros((batch, 0), jnp.int32)
  if rows.stops is not None:
    span = rows.stops[0].shape[-1]
    idx = lengths[:, None] - span + jnp.arange(span)[None, :]
    recent = jnp.where(idx >= 0, jnp.take_along_axis(prompts, jnp.maximum(idx, 0), axis=1), -1)
  else:
    recent = jnp.zeros((batch, 0), jnp.int32)
  zeros = jnp.zeros((batch,), jnp.int32)
  n = program.max_new_tokens
  return _Tracks(jnp.full((batch, n), rows.pad_id, jnp.int32), jnp.zeros((batch, n), jnp.float32),
                 jnp.zeros((batch,), bool), zeros, zeros - 1, seen, counts, recent)


def _pick(program: _GenerateProgram, rows: _Rows, t, logits, tracks: _Tracks):
  """(int32 [B] token t of every row, float32 [B] its log-prob under the raw logits)."""
  s = rows.settings
  chosen = logits
  if program.penalize:
    chosen = apply_penalties(logits, tracks.seen, tracks.counts, s.repetition_penalty, s.presence_penalty,
                             s.frequency_penalty)
  if program.sample:
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(rows.keys, t)
    tok = choose_tokens(chosen, step_keys, s.temperature, s.top_k, s.top_p, s.min_p, s.min_tokens_to_keep)
  elif program.penalize:
    tok = jnp.argmax(chosen, axis=-1).astype(jnp.int32)
  else:                                          # the argmax's own logit is the max: log p = -log sum exp(l - max)
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    return tok, -jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
  return tok, jnp.take_along_axis(logits, tok[:, None], axis=1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)


def _choose(program: _GenerateProgram, rows: _Rows, t, logits, tracks: _Tracks):
  """Token t of every row from the logits of its previous position, with its bookkeeping. It runs once on the
  prefill logits, then once per loop iteration after feeding token t - 1 (so the loop carries one token per row,
  not the logits, and never runs a model step whose output is unused)."""
  tok, logp = _pick(program, rows, t, logits, tracks)
  done = tracks.done
  tok = jnp.where(done, rows.pad_id, tok)
  out = jax.lax.dynamic_update_slice(tracks.tokens, tok[:, None], (0, t))
  out_logp = jax.lax.dynamic_update_slice(tracks.logprobs, jnp.where(done, 0.0, logp)[:, None], (0, t))
  seen, counts, recent, stop_index = tracks.seen, tracks.counts, tracks.recent, tracks.stop_index
  if program.penalize:
    hot = jax.nn.one_hot(tok, logits.shape[-1], dtype=jnp.int32) * (~done)[:, None]
    seen, counts = seen | (hot > 0), counts + hot
  n_out = tracks.lengths + (~done).astype(jnp.int32)
  stopped = jnp.zeros_like(done)
  if rows.stops is not None:
    recent = jnp.concatenate([recent[:, 1:], tok[:, None]], axis=1)
    stopped, which = _stop_match(recent, *rows.stops)
    stopped = stopped & ~done
    stop_index = jnp.where(stopped, which, stop_index)
  done = done | (tok == rows.eos_id) | stopped
  return tok, _Tracks(out, out_logp, done, n_out, stop_index, seen, counts, recent)


def _generate_cond(program: _GenerateProgram, state: _GenerateState):
  return (state.t < program.max_new_tokens) & ~jnp.all(state.tracks.done)


def _generate_body(program: _GenerateProgram, rows: _Rows, params, state: _GenerateState) -> _GenerateState:
  pos = jnp.minimum(rows.lengths + state.t - 1, program.cache_len - 1)
  logits, cache = program.model.step_fn(params, state.token[:, None], pos[:, None], state.cache)
  tok, tracks = _choose(program, rows, state.t, logits[:, 0].astype(jnp.float32), state.tracks)
  return _GenerateState(state.t + 1, tok, tracks, cache)


def _generate_impl(program: _GenerateProgram, params, prompts, lengths, rng, row_ids, floats, ints, ids,
                   stops) -> GenerateOutput:
  s = settings_lib.RowSettings.unpack(floats, ints)
  logits, cache = prefill(program.model, params, prompts, lengths, program.cache_len)
  n = program.num_return_sequences
  if n > 1:
    logits, cache, prompts, lengths, s, stops = _repeat_rows(n, logits, cache, prompts, lengths, s, stops)
  keys = row_keys(rng, row_ids, n) if program.sample else None
  rows = _Rows(s, keys, ids[0], ids[1], stops, lengths)
  tok, tracks = _choose(program, rows, jnp.int32(0), logits,
                        _initial_tracks(program, rows, prompts, logits.shape[-1]))
  state = jax.lax.while_loop(functools.partial(_generate_cond, program),
                             functools.partial(_generate_body, program, rows, params),
                             _GenerateState(jnp.int32(1), tok, tracks, cache))
  out = GenerateOutput(state.tracks.tokens, state.tracks.lengths, state.tracks.logprobs, state.tracks.stop_index)
  if n > 1:
    return GenerateOutput(*(x.reshape((x.shape[0] // n, n) + x.shape[1:]) for x in out))
  return out


_generate_jit = jax.jit(_generate_impl, static_argnums=(0,))


def generate(model: DecodingModel, params, prompts, *, rng=None, settings: Optional[DecodingSettings] = None,
             prompt_lengths=None, row_ids=None, cache_len: Optional[int] = None, **overrides) -> GenerateOutput:
  """Decodes up to `max_new_tokens` per prompt; stops early once every row has ended.

  `settings` (a `DecodingSettings`) and/or its fields as keyword arguments (they override `settings`):
  temperature, then top-k (`0` = off), then top-p (`1.0` = off), then min-p (`0.0` = off; transformers'
  `MinPLogitsWarper`); `temperature == 0` or `greedy=True` is argmax. Penalties act on the raw logits first:
  `repetition_penalty` over prompt + generated ids, presence/frequency over generated ids. `rng` is one PRNG key
  (needed unless greedy). A row ends when it emits `eos_id` or when its prompt + output ends with one of
  `stop_sequences` (token-id lists, one list for every row or one list per row; the match may start in the
  prompt). `num_return_sequences=n` draws n independent continuations per prompt from one prefill (every output
  field then has shape [B, n, ...]). `prompt_lengths` (array prompts), `row_ids` and `cache_len` describe the call,
  not the decoding. A bad setting raises `genjax.errors.UserError` naming it.
  See the module docstring for the model interface and what is static vs runtime.
  """
  check_model(model)
  settings = settings_lib.for_decoder("generate", settings, overrides)
  tokens, lengths = inputs.prepare_prompts(prompts, prompt_lengths, settings.pad_id)
  batch = tokens.shape[0]
  cache_len = inputs.check_context(model, lengths, settings.max_new_tokens, cache_len, tokens.shape[1])
  inputs.check_cache_batch_axis(model, batch, cache_len)
  inputs.check_prompt_ids(tokens, lengths, inputs.vocab_size(model, params))
  tokens = tokens[:, :cache_len]                   # padding beyond the cache is never read
  floats, ints = settings_lib.sampling_arrays(settings, batch)
  settings_lib.check_rng(rng, floats)
  # Each specialisation compiles once: every row greedy (argmax only) or not; penalties off in every row or not.
  program = _GenerateProgram(model, settings.max_new_tokens, cache_len, settings.num_return_sequences,
                             settings_lib.samples(floats), settings_lib.penalizes(floats))
  return _generate_jit(program, params, tokens, lengths, rng if program.sample else None,
                       inputs.prepare_row_ids(row_ids, batch), floats, ints, settings_lib.special_ids(settings),
                       settings_lib.stop_table(settings, batch))


# ------------------------------------------------------------------------------------------ beam search --------
class _BeamProgram(NamedTuple):
  """What one compiled `beam_search` program is specialised on (its static argument)."""
  model: DecodingModel
  num_beams: int
  max_new_tokens: int
  cache_len: int


class _Beams(NamedTuple):
  """Constants of one beam search loop."""
  program: _BeamProgram
  length_penalty: jax.Array
  eos_id: jax.Array
  beam_lengths: jax.Array     # int32 [B * num_beams] prompt lengths
  num_candidates: int         # candidates ranked per step: min(2 * num_beams, num_beams * V)


class _BeamState(NamedTuple):
  t: jax.Array
  logp: jax.Array             # float32 [B, k, V] next-token log-probs of each alive beam
  alive_logp: jax.Array       # float32 [B, k] summed log-probs of the alive beams (-inf: none)
  alive_seq: jax.Array        # int32 [B, k, max_new_tokens]
  fin_seq: jax.Array          # int32 [B, k, max_new_tokens] the best finished hypotheses, best first
  fin_score: jax.Array        # float32 [B, k] their scores (-inf: none)
  fin_len: jax.Array          # int32 [B, k] their lengths
  cache: Any
  done: jax.Array             # bool [B]: no alive beam can beat the worst finished hypothesis


_NEG = np.float32(-np.inf)


def _norm(beams: _Beams, logp, length):
  return logp / jnp.power(length.astype(jnp.float32), beams.length_penalty)


def _top_k_merge(k: int, scores, seqs, lens):
  """The k best of `scores` [B, M] with their `seqs` [B, M, T] and `lens` [B, M], best first."""
  best, idx = jax.lax.top_k(scores, k)
  take = lambda x: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
  return best, take(seqs), take(lens)


def _beam_finish(beams: _Beams, state: _BeamState, vals, tok, seqs):
  """(fin_score, fin_seq, fin_len) after this step's EOS candidates. An EOS candidate finishes only if it ranks among
  the top num_beams candidates (so 1 beam == greedy)."""
  k = beams.program.num_beams
  finishes = (tok == beams.eos_id) & (jnp.arange(beams.num_candidates) < k)[None, :]
  length = jnp.full(vals.shape, state.t + 1, jnp.int32)
  return _top_k_merge(
      k, jnp.concatenate([state.fin_score, jnp.where(finishes & (vals > _NEG), _norm(beams, vals, length), _NEG)],
                         axis=1),
      jnp.concatenate([state.fin_seq, seqs], axis=1), jnp.concatenate([state.fin_len, length], axis=1))


def _beam_body(beams: _Beams, params, state: _BeamState) -> _BeamState:
  program, t = beams.program, state.t
  batch, k, vocab = state.logp.shape
  total = (state.alive_logp[:, :, None] + state.logp).reshape(batch, k * vocab)
  vals, idx = jax.lax.top_k(total, beams.num_candidates)
  beam, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
  seqs = jnp.take_along_axis(state.alive_seq, beam[:, :, None], axis=1)
  seqs = jax.lax.dynamic_update_slice(seqs, tok[:, :, None], (0, 0, t))
  fin_score, fin_seq, fin_len = _beam_finish(beams, state, vals, tok, seqs)
  # The best num_beams non-EOS candidates stay alive.
  alive_logp, sel = jax.lax.top_k(jnp.where(tok == beams.eos_id, _NEG, vals), k)
  alive_seq = jnp.take_along_axis(seqs, sel[:, :, None], axis=1)
  parent = jnp.take_along_axis(beam, sel, axis=1)
  new_tok = jnp.take_along_axis(tok, sel, axis=1).reshape(batch * k)
  flat_parent = (jnp.arange(batch)[:, None] * k + parent).reshape(batch * k)
  cache = jax.tree_util.tree_map(lambda x: x[flat_parent], state.cache)
  pos = jnp.minimum(beams.beam_lengths + t, program.cache_len - 1)
  logits, cache = program.model.step_fn(params, new_tok[:, None], pos[:, None], cache)
  logp = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32)).reshape(batch, k, vocab)
  # A row is done when its finished pool is full and no alive beam can still beat the worst finished score
  # (log-probs only fall; the score of a beam of best log-prob a is at most max(a / (t+1)^lp, a / n^lp)).
  best_alive = alive_logp[:, 0]
  bound = jnp.maximum(_norm(beams, best_alive, jnp.int32(t + 1)),
                      _norm(beams, best_alive, jnp.int32(program.max_new_tokens)))
  done = (fin_score[:, -1] > _NEG) & (bound < fin_score[:, -1])
  return _BeamState(t + 1, logp, alive_logp, alive_seq, fin_seq, fin_score, fin_len, cache, done)


def _beam_cond(program: _BeamProgram, state: _BeamState):
  return (state.t < program.max_new_tokens) & ~jnp.all(state.done)


def _initial_beams(program: _BeamProgram, logits, cache, pad_id) -> _BeamState:
  batch, vocab = logits.shape
  k, n = program.num_beams, program.max_new_tokens
  logp = jnp.broadcast_to(jax.nn.log_softmax(logits)[:, None, :], (batch, k, vocab))
  cache = jax.tree_util.tree_map(lambda x: jnp.repeat(x, k, axis=0), cache)
  alive_logp = jnp.full((batch, k), _NEG).at[:, 0].set(0.0)   # all beams start equal; keep one copy alive
  alive_seq = jnp.full((batch, k, n), pad_id, jnp.int32)
  return _BeamState(jnp.int32(0), logp, alive_logp, alive_seq, alive_seq, jnp.full((batch, k), _NEG),
                    jnp.zeros((batch, k), jnp.int32), cache, jnp.zeros((batch,), bool))


def _beam_search_impl(program: _BeamProgram, params, prompts, lengths, length_penalty, eos_id,
                      pad_id) -> BeamSearchOutput:
  logits, cache = prefill(program.model, params, prompts, lengths, program.cache_len)
  k = program.num_beams
  beams = _Beams(program, length_penalty, eos_id, jnp.repeat(lengths, k), min(2 * k, k * logits.shape[-1]))
  state = jax.lax.while_loop(functools.partial(_beam_cond, program), functools.partial(_beam_body, beams, params),
                             _initial_beams(program, logits, cache, pad_id))
  # Beams still alive at the end compete as hypotheses of their current length.
  alive_len = jnp.full(state.alive_logp.shape, state.t, jnp.int32)
  alive_score = jnp.where(state.alive_logp > _NEG, _norm(beams, state.alive_logp, alive_len), _NEG)
  scores, seqs, lens = _top_k_merge(
      k, jnp.concatenate([state.fin_score, alive_score], axis=1),
      jnp.concatenate([state.fin_seq, state.alive_seq], axis=1), jnp.concatenate([state.fin_len, alive_len], axis=1))
  return BeamSearchOutput(seqs, scores, lens)


_beam_search_jit = jax.jit(_beam_search_impl, static_argnums=(0,))


def beam_search(model: DecodingModel, params, prompts, *, settings: Optional[DecodingSettings] = None,
                prompt_lengths=None, cache_len: Optional[int] = None, **overrides) -> BeamSearchOutput:
  """Beam search: the `num_beams` best continuations of each prompt, best first (HF PyTorch's rules).

  `settings` (a `DecodingSettings`) and/or its fields as keyword arguments: num_beams, max_new_tokens,
  length_penalty, eos_id, pad_id (the sampling fields do not apply). A hypothesis ends at `eos_id` (included in its
  length) or after `max_new_tokens`; its score is `sum(log p) / generated_length ** length_penalty`. A row stops
  early once no alive beam can beat its worst finished hypothesis. With `num_beams=1` and `length_penalty=0` this
  is greedy decoding. The longest prompt plus `max_new_tokens` must fit in `model.max_len`.
  """
  check_model(model)
  settings = settings_lib.for_decoder("beam_search", settings, overrides)
  tokens, lengths = inputs.prepare_prompts(prompts, prompt_lengths, settings.pad_id)
  cache_len = inputs.check_context(model, lengths, settings.max_new_tokens, cache_len, tokens.shape[1])
  inputs.check_cache_batch_axis(model, tokens.shape[0], cache_len)
  inputs.check_prompt_ids(tokens, lengths, inputs.vocab_size(model, params))
  tokens = tokens[:, :cache_len]                   # padding beyond the cache is never read
  eos_id, pad_id = settings_lib.special_ids(settings)
  program = _BeamProgram(model, settings.num_beams, settings.max_new_tokens, cache_len)
  return _beam_search_jit(program, params, tokens, lengths, np.float32(settings.length_penalty), eos_id, pad_id)
