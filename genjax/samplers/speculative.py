"""Exact speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes
`num_draft_tokens` tokens, the target scores them all in one call, and each row accepts a prefix by the
rejection rule, so that the output has exactly the target's (filtered) distribution. Imports jax only.

    from genjax.samplers import speculative_generate
    out = speculative_generate(target, target_params, draft, draft_params, prompts, rng=rng, max_new_tokens=128,
                               num_draft_tokens=4, temperature=0.8, top_p=0.95, eos_id=258, pad_id=256)
    out.tokens, out.lengths, out.logprobs   # exactly as `generate` returns them (same lengths, pad after EOS)
    out.acceptance_rate                     # accepted draft tokens / proposed draft tokens (a scalar)

Both models are `DecodingModel`s over one vocabulary (slot == position caches, every leaf batch-first). One jitted
program: prefill both, then a `while_loop` whose every iteration, for all rows at once,
  1. feeds the draft the last two committed tokens (re-syncing its cache after any rejection) and samples k draft
     tokens d_1..d_k from its filtered distribution q (k - 1 more one-token draft calls);
  2. runs the target once on [last committed token, d_1..d_k] -> its filtered distributions p_1..p_{k+1};
  3. accepts d_j while u_j < p_j(d_j) / q_j(d_j) (u_j uniform), a_i tokens for row i; then draws one more token
     from normalise(max(0, p - q)) at the first rejection, or from p_{k+1} when all k were accepted;
  4. commits those a_i + 1 tokens (cut at EOS and at max_new_tokens): rows advance by different amounts.
Caches are rolled back by position alone: a row's next call rewrites the slots after its last committed token,
and a query at position t reads slots <= t only, so a rejected draft token is never attended to.
Greedy (`temperature=0` or `greedy=True`) accepts d_j iff it is the target's argmax: token-identical to greedy
`generate` (up to the float rounding of scoring k + 1 tokens in one call). The filters are `generate`'s
(temperature, top-k, top-p, min-p, runtime per row); penalties and stop sequences are not supported here. The
knobs are `DecodingSettings` fields (`settings=` and/or keyword arguments), as for `generate`.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from genjax.errors import UserError
from genjax.samplers import decoding_inputs as inputs
from genjax.samplers import settings as settings_lib
from genjax.samplers.decoding import DecodingModel, check_model, prefill, row_keys
from genjax.samplers.settings import DecodingSettings
from genjax.samplers.logits import greedy_or_filtered

__all__ = ["SpeculativeOutput", "speculative_generate"]


class SpeculativeOutput(NamedTuple):
  tokens: jax.Array           # int32 [B, max_new_tokens], pad_id after a row's EOS
  lengths: jax.Array          # int32 [B], generated tokens per row (EOS included)
  logprobs: jax.Array         # float32 [B, max_new_tokens]: the target's raw log-softmax at each token; 0 after
  acceptance_rate: jax.Array  # float32 scalar: draft tokens accepted / draft tokens proposed (rows still running)


class _SpeculativeProgram(NamedTuple):
  """What one compiled program is specialised on (its static argument)."""
  target: DecodingModel
  draft: DecodingModel
  max_new_tokens: int
  k: int                      # draft tokens per target call
  cache_len: int
  sample: bool                # some row samples (False: every row greedy)


class _Spec(NamedTuple):
  """Constants of one speculative decoding loop."""
  program: _SpeculativeProgram
  target_params: Any
  draft_params: Any
  settings: settings_lib.RowSettings
  keys: Optional[jax.Array]   # [B] PRNG keys (sampling only)
  eos_id: jax.Array
  pad_id: jax.Array
  lengths: jax.Array          # int32 [B] prompt lengths
  vocab: int


class _SpecState(NamedTuple):
  it: jax.Array               # iteration (seeds its random draws)
  generated: jax.Array        # int32 [B] tokens committed per row
  done: jax.Array             # bool [B]
  prev: jax.Array             # int32 [B] the second-to-last committed token (re-fed to repair the draft's cache)
  last: jax.Array             # int32 [B] the last committed token
  tokens: jax.Array           # int32 [B, max_new_tokens + k + 1] output (room for one iteration past the budget)
  logprobs: jax.Array         # float32 [B, max_new_tokens + k + 1]
  target_cache: Any
  draft_cache: Any
  accepted: jax.Array         # int32 scalar: draft tokens accepted so far (rows still running)
  proposed: jax.Array         # int32 scalar: draft tokens proposed so far


def _log_dist(spec: _Spec, logits):
  """[B, V] raw -> [B, V] log-probs of the distribution drawn from."""
  if not spec.program.sample:
    return jnp.where(jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=bool), 0.0, -jnp.inf)
  s = spec.settings
  return jax.nn.log_softmax(greedy_or_filtered(logits, s.temperature, s.top_k, s.top_p, s.min_p,
                                               s.min_tokens_to_keep), axis=-1)


def _draw(spec: _Spec, step_keys, logp):
  if not spec.program.sample:
    return jnp.argmax(logp, axis=-1).astype(jnp.int32)
  return jax.vmap(jax.random.categorical)(step_keys, logp).astype(jnp.int32)


def _at(x, index):
  """x[b, index[b]]."""
  return jnp.take_along_axis(x, index.reshape((x.shape[0], 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]


def _clamp(spec: _Spec, positions):
  return jnp.minimum(positions, spec.program.cache_len - 1)


def _propose(spec: _Spec, state: _SpecState, committed, it_keys):
  """1. The draft: the last two committed tokens (the first may be a rejected slot to repair), then k - 1 steps.
  Returns (float32 [B, k, V] draft log-distributions q, int32 [B, k] draft tokens, the draft's cache)."""
  draft, k = spec.program.draft, spec.program.k
  pos = _clamp(spec, jnp.stack([jnp.maximum(committed - 2, 0), committed - 1], axis=1))
  logits, cache = draft.step_fn(spec.draft_params, jnp.stack([state.prev, state.last], axis=1), pos,
                                state.draft_cache)
  if logits.shape[-1] != spec.vocab:
    raise UserError(f"the draft's vocabulary ({logits.shape[-1]} logits) differs from the target's ({spec.vocab})")
  q0 = _log_dist(spec, logits[:, 1].astype(jnp.float32))
  d0 = _draw(spec, it_keys[:, 0], q0)

  def draft_step(carry, j):
    d_prev, cache = carry
    logits, cache = draft.step_fn(spec.draft_params, d_prev[:, None], _clamp(spec, committed + j)[:, None], cache)
    q = _log_dist(spec, logits[:, 0].astype(jnp.float32))
    d = _draw(spec, it_keys[:, j + 1], q)
    return (d, cache), (q, d)

  (_, cache), (qs, ds) = jax.lax.scan(draft_step, (d0, cache), jnp.arange(k - 1))
  q = jnp.concatenate([q0[:, None], jnp.moveaxis(qs, 0, 1)], axis=1)                  # [B, k, V]
  drafts = jnp.concatenate([d0[:, None], jnp.moveaxis(ds, 0, 1)], axis=1)             # [B, k]
  return q, drafts, cache


def _verify(spec: _Spec, state: _SpecState, committed, drafts):
  """2. The target: one call over the last committed token and the k drafts. Returns (float32 [B, k+1, V] raw
  logits, [B, k+1, V] its log-distributions p, the target's cache)."""
  fed = jnp.concatenate([state.last[:, None], drafts], axis=1)
  positions = _clamp(spec, committed[:, None] - 1 + jnp.arange(spec.program.k + 1))
  logits, cache = spec.program.target.step_fn(spec.target_params, fed, positions, state.target_cache)
  logits = logits.astype(jnp.float32)
  return logits, jax.vmap(functools.partial(_log_dist, spec), in_axes=1, out_axes=1)(logits), cache


def _accept(spec: _Spec, p, q, drafts, it_keys):
  """3. Accept a prefix, then one token from the residual max(0, p - q) (or from p_{k+1} after k accepts).
  Returns (int32 [B] accepted drafts in 0..k, int32 [B] the extra token)."""
  k = spec.program.k
  p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
  q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
  if spec.program.sample:
    u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(it_keys[:, k])
    accept = jnp.log(u) < p_d - q_d
  else:
    accept = p_d == 0.0                   # the draft token is the target's argmax
  n_accept = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)
  p_next = _at(p, n_accept)
  if not spec.program.sample:
    return n_accept, _draw(spec, None, p_next)
  q_next = _at(jnp.concatenate([q, jnp.full_like(q[:, :1], -jnp.inf)], axis=1), n_accept)
  residual = jnp.maximum(jnp.exp(p_next) - jnp.exp(q_next), 0.0)
  residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, jnp.exp(p_next))
  return n_accept, _draw(spec, it_keys[:, k + 1], jnp.log(residual))


def _commit(spec: _Spec, state: _SpecState, logits, drafts, n_accept, extra):
  """4. Commit a + 1 tokens per row, cut at the first EOS and at the token budget. Returns the state's fields
  generated, done, prev, last, tokens, logprobs, accepted, proposed (as a dict)."""
  k, budget = spec.program.k, spec.program.max_new_tokens
  span = jnp.arange(k + 1)
  cand = jnp.where(span[None, :] < n_accept[:, None], jnp.concatenate([drafts, drafts[:, :1]], axis=1),
                   extra[:, None])
  count = n_accept + 1
  is_eos = (cand == spec.eos_id) & (span[None, :] < count[:, None])
  count = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, count)
  count = jnp.where(state.done, 0, jnp.minimum(count, budget - state.generated))
  logp = jnp.take_along_axis(logits, cand[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
  keep = span[None, :] < count[:, None]
  rows, slots = jnp.arange(cand.shape[0])[:, None], state.generated[:, None] + span[None, :]
  active = ~state.done
  generated = state.generated + count
  return dict(
      generated=generated, done=state.done | jnp.any(is_eos & keep, axis=1) | (generated >= budget),
      prev=jnp.where(count >= 1, jnp.where(count >= 2, _at(cand, jnp.maximum(count - 2, 0)), state.last),
                     state.prev),
      last=jnp.where(count >= 1, _at(cand, jnp.maximum(count - 1, 0)), state.last),
      tokens=state.tokens.at[rows, slots].set(jnp.where(keep, cand, spec.pad_id)),
      logprobs=state.logprobs.at[rows, slots].set(jnp.where(keep, logp, 0.0)),
      accepted=state.accepted + jnp.sum(jnp.where(active, n_accept, 0)),
      proposed=state.proposed + k * jnp.sum(active.astype(jnp.int32)))


def _speculative_body(spec: _Spec, state: _SpecState) -> _SpecState:
  k = spec.program.k
  committed = spec.lengths + state.generated
  if spec.program.sample:
    it_keys = jax.vmap(lambda key: jax.random.split(jax.random.fold_in(key, state.it), k + 2))(spec.keys)  # [B, k+2]
  else:
    it_keys = jnp.zeros((committed.shape[0], k + 2), jnp.int32)
  q, drafts, draft_cache = _propose(spec, state, committed, it_keys)
  logits, p, target_cache = _verify(spec, state, committed, drafts)
  n_accept, extra = _accept(spec, p, q, drafts, it_keys)
  return state._replace(it=state.it + 1, target_cache=target_cache, draft_cache=draft_cache,
                        **_commit(spec, state, logits, drafts, n_accept, extra))


def _speculative_impl(program: _SpeculativeProgram, target_params, draft_params, prompts, lengths, rng, row_ids,
                      floats, ints, ids) -> SpeculativeOutput:
  target_last, target_cache = prefill(program.target, target_params, prompts, lengths, program.cache_len)
  _, draft_cache = prefill(program.draft, draft_params, prompts, lengths, program.cache_len)
  keys = row_keys(rng, row_ids, 1) if program.sample else None
  spec = _Spec(program, target_params, draft_params, settings_lib.RowSettings.unpack(floats, ints), keys, ids[0],
               ids[1], lengths, target_last.shape[-1])
  batch, n = prompts.shape[0], program.max_new_tokens
  width = n + program.k + 1                  # room for a full iteration's writes past the budget
  zeros = jnp.zeros((batch,), jnp.int32)
  state = _SpecState(jnp.int32(0), zeros, jnp.zeros((batch,), bool), _at(prompts, jnp.maximum(lengths - 2, 0)),
                     _at(prompts, lengths - 1), jnp.full((batch, width), spec.pad_id, jnp.int32),
                     jnp.zeros((batch, width), jnp.float32), target_cache, draft_cache, jnp.int32(0), jnp.int32(0))
  state = jax.lax.while_loop(lambda state: ~jnp.all(state.done), functools.partial(_speculative_body, spec), state)
  valid = jnp.arange(n)[None, :] < state.generated[:, None]
  return SpeculativeOutput(jnp.where(valid, state.tokens[:, :n], spec.pad_id), state.generated,
                           jnp.where(valid, state.logprobs[:, :n], 0.0),
                           state.accepted.astype(jnp.float32) / jnp.maximum(state.proposed, 1).astype(jnp.float32))


_speculative_jit = jax.jit(_speculative_impl, static_argnums=(0,))


def speculative_generate(target: DecodingModel, target_params, draft: DecodingModel, draft_params, prompts, *,
                         rng=None, settings: Optional[DecodingSettings] = None, prompt_lengths=None, row_ids=None,
                         **overrides) -> SpeculativeOutput:
  """Samples from the target exactly as `generate` would (same filters, same output fields), with the draft
  proposing `num_draft_tokens` tokens per target call. `settings` (a `DecodingSettings`) and/or its fields as
  keyword arguments: max_new_tokens, num_draft_tokens, the sampling filters, greedy, eos_id, pad_id (penalties and
  stop sequences do not apply). See the module docstring."""
  check_model(target, "target")
  check_model(draft, "draft")
  settings = settings_lib.for_decoder("speculative_generate", settings, overrides)
  k, n = settings.num_draft_tokens, settings.max_new_tokens
  tokens, lengths = inputs.prepare_prompts(prompts, prompt_lengths, settings.pad_id)
  batch = tokens.shape[0]
  cache_len = inputs.check_context(target, lengths, n, None, tokens.shape[1], extra=k)
  cache_len = min(cache_len, inputs.check_context(draft, lengths, n, None, tokens.shape[1], extra=k))
  inputs.check_cache_batch_axis(target, batch, cache_len, "target")
  inputs.check_cache_batch_axis(draft, batch, cache_len, "draft")
  inputs.check_prompt_ids(tokens, lengths, inputs.vocab_size(target, target_params))
  tokens = tokens[:, :cache_len]
  floats, ints = settings_lib.sampling_arrays(settings, batch)
  settings_lib.check_rng(rng, floats)
  program = _SpeculativeProgram(target, draft, n, k, cache_len, settings_lib.samples(floats))
  return _speculative_jit(program, target_params, draft_params, tokens, lengths, rng if program.sample else None,
                          inputs.prepare_row_ids(row_ids, batch), floats, ints, settings_lib.special_ids(settings))
