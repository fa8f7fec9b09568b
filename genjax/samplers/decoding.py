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

    from genjax.samplers import generate, beam_search
    out = generate(model, params, [[257, 72, 105], [257, 79]], rng, max_new_tokens=50, temperature=0.8,
                   top_p=0.9, min_p=0.05, repetition_penalty=1.2, eos_id=258, pad_id=256,
                   stop_sequences=[[10, 10]])
    out.tokens      # int32 [B, 50]: new tokens; after a row's EOS or stop sequence, pad_id
    out.lengths     # int32 [B]: new tokens per row (EOS / stop sequence included)
    out.logprobs    # float32 [B, 50]: log p(token) under the model's raw softmax; 0 after the row ends
    out.stop_index  # int32 [B]: which stop sequence ended the row, -1 for none
    best = beam_search(model, params, prompts, num_beams=4, max_new_tokens=50, length_penalty=1.0, eos_id=258)
    best.sequences[:, 0], best.scores[:, 0]       # the best beam of each row

Prompts are a list of id lists or an int array [B, P] right-padded with `prompt_lengths` [B] (each >= 1). The
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

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import UserError
from genjax.samplers import decoding_inputs as inputs
from genjax.samplers.logits import (apply_penalties, choose_tokens, filter_logits, min_p_logits,  # noqa: F401
                                    top_k_logits, top_p_logits)

__all__ = ["DecodingModel", "GenerateOutput", "BeamSearchOutput", "generate", "beam_search", "top_k_logits",
           "top_p_logits", "min_p_logits", "filter_logits", "apply_penalties", "choose_tokens"]


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
  hit = jnp.all((stops == recent[:, None, :]) | (stops == inputs.WILDCARD), axis=-1) & (stop_lengths > 0)
  return jnp.any(hit, axis=-1), jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), -1).astype(jnp.int32)


def _generate_impl(model, max_new_tokens, cache_len, n, sample, penalize, params, prompts, lengths, rng, row_ids,
                   floats, ints, ids, stops):
  s = inputs.unpack_settings(floats, ints)
  eos_id, pad_id = ids[0], ids[1]
  logits, cache = prefill(model, params, prompts, lengths, cache_len)
  if n > 1:                                      # n samples per prompt share the prefill
    rep = lambda x: jnp.repeat(x, n, axis=0)
    logits, cache, prompts, lengths = rep(logits), jax.tree_util.tree_map(rep, cache), rep(prompts), rep(lengths)
    s = {k: rep(v) for k, v in s.items()}
    stops = None if stops is None else tuple(rep(x) for x in stops)
  batch, width = prompts.shape
  rows = jnp.arange(batch)
  keys = row_keys(rng, row_ids, n) if sample else None
  vocab = logits.shape[-1]
  in_prompt = jnp.arange(width)[None, :] < lengths[:, None]
  if penalize:
    seen = jnp.zeros((batch, vocab), bool).at[rows[:, None], prompts].max(in_prompt)
    counts = jnp.zeros((batch, vocab), jnp.int32)
  else:
    seen = counts = jnp.zeros((batch, 0), jnp.int32)
  if stops is not None:
    span = stops[0].shape[-1]
    idx = lengths[:, None] - span + jnp.arange(span)[None, :]
    recent = jnp.where(idx >= 0, jnp.take_along_axis(prompts, jnp.maximum(idx, 0), axis=1), -1)
  else:
    recent = jnp.zeros((batch, 0), jnp.int32)

  # choose(t, logits, carry): token t of every row from the logits of its previous position, with its
  # bookkeeping. It runs once on the prefill logits, then once per loop iteration after feeding token t - 1 (so
  # the loop carries one token per row, not the logits, and never runs a model step whose output is unused).
  def choose(t, logits, carry):
    out, out_logp, done, n_out, stop_index, seen, counts, recent = carry
    chosen = logits
    if penalize:
      chosen = apply_penalties(logits, seen, counts, s["repetition_penalty"], s["presence_penalty"],
                               s["frequency_penalty"])
    if sample:
      step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t)
      tok = choose_tokens(chosen, step_keys, s["temperature"], s["top_k"], s["top_p"], s["min_p"],
                          s["min_tokens_to_keep"])
      logp = jnp.take_along_axis(logits, tok[:, None], axis=1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)
    elif penalize:
      tok = jnp.argmax(chosen, axis=-1).astype(jnp.int32)
      logp = jnp.take_along_axis(logits, tok[:, None], axis=1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)
    else:                                        # the argmax's own logit is the max: log p = -log sum exp(l - max)
      tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      top = jnp.max(logits, axis=-1, keepdims=True)
      logp = -jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
    tok = jnp.where(done, pad_id, tok)
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, t))
    out_logp = jax.lax.dynamic_update_slice(out_logp, jnp.where(done, 0.0, logp)[:, None], (0, t))
    if penalize:
      hot = jax.nn.one_hot(tok, vocab, dtype=jnp.int32) * (~done)[:, None]
      seen, counts = seen | (hot > 0), counts + hot
    n_out = n_out + (~done).astype(jnp.int32)
    stopped = jnp.zeros_like(done)
    if stops is not None:
      recent = jnp.concatenate([recent[:, 1:], tok[:, None]], axis=1)
      stopped, which = _stop_match(recent, *stops)
      stopped = stopped & ~done
      stop_index = jnp.where(stopped, which, stop_index)
    done = done | (tok == eos_id) | stopped
    return tok, (out, out_logp, done, n_out, stop_index, seen, counts, recent)

  def cond(state):
    t, done = state[0], state[2][2]
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(state):
    t, tok, carry, cache = state
    pos = jnp.minimum(lengths + t - 1, cache_len - 1)
    logits, cache = model.step_fn(params, tok[:, None], pos[:, None], cache)
    tok, carry = choose(t, logits[:, 0].astype(jnp.float32), carry)
    return t + 1, tok, carry, cache

  zeros = jnp.zeros((batch,), jnp.int32)
  carry = (jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros((batch, max_new_tokens), jnp.float32),
           jnp.zeros((batch,), bool), zeros, zeros - 1, seen, counts, recent)
  tok, carry = choose(jnp.int32(0), logits, carry)
  _, _, carry, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, carry, cache))
  out, out_logp, _, n_out, stop_index, *_ = carry
  if n > 1:
    split = lambda x: x.reshape((batch // n, n) + x.shape[1:])
    return GenerateOutput(split(out), split(n_out), split(out_logp), split(stop_index))
  return GenerateOutput(out, n_out, out_logp, stop_index)


_generate_jit = jax.jit(_generate_impl, static_argnums=(0, 1, 2, 3, 4, 5))


def generate(model: DecodingModel, params, prompts, rng=None, *, max_new_tokens: int, prompt_lengths=None,
             temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, min_tokens_to_keep=1, repetition_penalty=1.0,
             presence_penalty=0.0, frequency_penalty=0.0, greedy: bool = False, eos_id: Optional[int] = None,
             pad_id: int = 0, stop_sequences=None, num_return_sequences: int = 1, row_ids=None,
             cache_len: Optional[int] = None) -> GenerateOutput:
  """Decodes up to `max_new_tokens` per prompt; stops early once every row has ended.

  Temperature, then top-k (`0` = off), then top-p (`1.0` = off), then min-p (`0.0` = off; transformers'
  `MinPLogitsWarper`); `temperature == 0` or `greedy=True` is argmax. Penalties act on the raw logits first:
  `repetition_penalty` over prompt + generated ids, presence/frequency over generated ids. `rng` is one PRNG key
  (needed unless greedy). A row ends when it emits `eos_id` or when its prompt + output ends with one of
  `stop_sequences` (token-id lists, one list for every row or one list per row; the match may start in the
  prompt). `num_return_sequences=n` draws n independent continuations per prompt from one prefill (every output
  field then has shape [B, n, ...]). A bad setting raises `genjax.errors.UserError` naming it.
  See the module docstring for the model interface and what is static vs runtime.
  """
  check_model(model)
  tokens, lengths = inputs.prepare_prompts(prompts, prompt_lengths, pad_id)
  batch = tokens.shape[0]
  n = inputs.positive_int("num_return_sequences", num_return_sequences)
  cache_len = inputs.check_context(model, lengths, max_new_tokens, cache_len, tokens.shape[1])
  inputs.check_cache_batch_axis(model, batch, cache_len)
  tokens = tokens[:, :cache_len]                   # padding beyond the cache is never read
  floats, ints = inputs.sampling_settings(
      batch, temperature=0.0 if greedy else temperature, top_k=top_k, top_p=top_p, min_p=min_p,
      min_tokens_to_keep=min_tokens_to_keep, repetition_penalty=repetition_penalty,
      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
  # Two specialisations, each compiled once: every row greedy (argmax only: no sort, no random draw) or not;
  # penalties at their defaults in every row (no bookkeeping of seen ids) or not.
  sample = bool(np.any(floats[:, 0] > 0))
  penalize = bool(np.any(floats[:, 3] != 1) or np.any(floats[:, 4:6] != 0))
  if sample and rng is None:
    raise UserError("sampling needs an rng key (or pass greedy=True / temperature=0)")
  row_ids = (np.arange(batch, dtype=np.int32) if row_ids is None
             else inputs.host_vector("row_ids", row_ids, batch, np.int32))
  ids = np.array([-1 if eos_id is None else eos_id, pad_id], np.int32)
  stops = inputs.stop_table(stop_sequences, batch)
  return _generate_jit(model, inputs.positive_int("max_new_tokens", max_new_tokens), cache_len, n, sample,
                       penalize, params, tokens, lengths, rng if sample else None, row_ids, floats, ints, ids, stops)


def _beam_search_impl(model, num_beams, max_new_tokens, cache_len, params, prompts, lengths, length_penalty,
                      eos_id, pad_id):
  batch = prompts.shape[0]
  k, n = num_beams, max_new_tokens
  logits, cache = prefill(model, params, prompts, lengths, cache_len)
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
  """Beam search: the `num_beams` best continuations of each prompt, best first (HF PyTorch's rules).

  A hypothesis ends at `eos_id` (included in its length) or after `max_new_tokens`; its score is
  `sum(log p) / generated_length ** length_penalty`. A row stops early once no alive beam can beat its worst
  finished hypothesis. With `num_beams=1` and `length_penalty=0` this is greedy decoding. The longest prompt plus
  `max_new_tokens` must fit in `model.max_len`.
  """
  check_model(model)
  num_beams = inputs.positive_int("num_beams", num_beams)
  if not np.isfinite(float(length_penalty)):
    raise UserError(f"length_penalty={length_penalty!r} must be finite")
  tokens, lengths = inputs.prepare_prompts(prompts, prompt_lengths, pad_id)
  cache_len = inputs.check_context(model, lengths, max_new_tokens, cache_len, tokens.shape[1])
  inputs.check_cache_batch_axis(model, tokens.shape[0], cache_len)
  tokens = tokens[:, :cache_len]                   # padding beyond the cache is never read
  return _beam_search_jit(model, num_beams, int(max_new_tokens), cache_len, params, tokens, lengths,
                          np.float32(length_penalty), np.int32(-1 if eos_id is None else eos_id), np.int32(pad_id))
