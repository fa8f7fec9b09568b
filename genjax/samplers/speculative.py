"""Exact speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes
`num_draft_tokens` tokens, the target scores them all in one call, and each row accepts a prefix by the
rejection rule, so that the output has exactly the target's (filtered) distribution. Imports jax only.

    from genjax.samplers import speculative_generate
    out = speculative_generate(target, target_params, draft, draft_params, prompts, rng, max_new_tokens=128,
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
(temperature, top-k, top-p, min-p, runtime per row); penalties and stop sequences are not supported here.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import UserError
from genjax.samplers import decoding_inputs as inputs
from genjax.samplers.decoding import DecodingModel, check_model, prefill, row_keys
from genjax.samplers.logits import greedy_or_filtered

__all__ = ["SpeculativeOutput", "speculative_generate"]


class SpeculativeOutput(NamedTuple):
  tokens: jax.Array           # int32 [B, max_new_tokens], pad_id after a row's EOS
  lengths: jax.Array          # int32 [B], generated tokens per row (EOS included)
  logprobs: jax.Array         # float32 [B, max_new_tokens]: the target's raw log-softmax at each token; 0 after
  acceptance_rate: jax.Array  # float32 scalar: draft tokens accepted / draft tokens proposed (rows still running)


def _speculative_impl(target, draft, max_new_tokens, k, cache_len, sample, target_params, draft_params, prompts,
                      lengths, rng, row_ids, floats, ints, ids):
  s = inputs.unpack_settings(floats, ints)
  eos_id, pad_id = ids[0], ids[1]
  batch = prompts.shape[0]
  rows = jnp.arange(batch)
  target_last, target_cache = prefill(target, target_params, prompts, lengths, cache_len)
  vocab = target_last.shape[-1]
  _, draft_cache = prefill(draft, draft_params, prompts, lengths, cache_len)
  keys = row_keys(rng, row_ids, 1) if sample else None
  settings = (s["temperature"], s["top_k"], s["top_p"], s["min_p"], s["min_tokens_to_keep"])

  def log_dist(logits):                     # [B, V] raw -> [B, V] log-probs of the distribution drawn from
    if not sample:
      return jnp.where(jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=bool), 0.0, -jnp.inf)
    return jax.nn.log_softmax(greedy_or_filtered(logits, *settings), axis=-1)

  def draw(step_keys, logp):
    if not sample:
      return jnp.argmax(logp, axis=-1).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(step_keys, logp).astype(jnp.int32)

  def at(x, index):                         # x[b, index[b]]
    return jnp.take_along_axis(x, index.reshape((batch, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]

  def cond(state):
    return ~jnp.all(state[2])

  def body(state):
    it, generated, done, prev, last, out, out_logp, target_cache, draft_cache, accepted, proposed = state
    committed = lengths + generated
    clamp = lambda p: jnp.minimum(p, cache_len - 1)
    if sample:
      it_keys = jax.vmap(lambda key: jax.random.split(jax.random.fold_in(key, it), k + 2))(keys)   # [B, k+2]
    else:
      it_keys = jnp.zeros((batch, k + 2), jnp.int32)
    # 1. Draft: the last two committed tokens (the first may be a rejected slot to repair), then k - 1 steps.
    pos = clamp(jnp.stack([jnp.maximum(committed - 2, 0), committed - 1], axis=1))
    logits, draft_cache = draft.step_fn(draft_params, jnp.stack([prev, last], axis=1), pos, draft_cache)
    if logits.shape[-1] != vocab:
      raise UserError(f"the draft's vocabulary ({logits.shape[-1]} logits) differs from the target's ({vocab})")
    q0 = log_dist(logits[:, 1].astype(jnp.float32))
    d0 = draw(it_keys[:, 0], q0)

    def draft_step(carry, j):
      d_prev, cache = carry
      logits, cache = draft.step_fn(draft_params, d_prev[:, None], clamp(committed + j)[:, None], cache)
      q = log_dist(logits[:, 0].astype(jnp.float32))
      d = draw(it_keys[:, j + 1], q)
      return (d, cache), (q, d)

    (_, draft_cache), (qs, ds) = jax.lax.scan(draft_step, (d0, draft_cache), jnp.arange(k - 1))
    q = jnp.concatenate([q0[:, None], jnp.moveaxis(qs, 0, 1)], axis=1)                  # [B, k, V]
    drafts = jnp.concatenate([d0[:, None], jnp.moveaxis(ds, 0, 1)], axis=1)             # [B, k]
    # 2. Target: one call over the last committed token and the k drafts -> k + 1 distributions.
    fed = jnp.concatenate([last[:, None], drafts], axis=1)
    logits, target_cache = target.step_fn(target_params, fed, clamp(committed[:, None] - 1 + jnp.arange(k + 1)),
                                          target_cache)
    logits = logits.astype(jnp.float32)                                                # [B, k+1, V]
    p = jax.vmap(log_dist, in_axes=1, out_axes=1)(logits)
    # 3. Accept a prefix, then one token from the residual max(0, p - q) (or from p_{k+1} after k accepts).
    p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    if sample:
      u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(it_keys[:, k])
      accept = jnp.log(u) < p_d - q_d
    else:
      accept = p_d == 0.0                   # the draft token is the target's argmax
    n_accept = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)          # [B] in 0..k
    p_next = at(p, n_accept)
    if sample:
      q_next = at(jnp.concatenate([q, jnp.full_like(q[:, :1], -jnp.inf)], axis=1), n_accept)
      residual = jnp.maximum(jnp.exp(p_next) - jnp.exp(q_next), 0.0)
      residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, jnp.exp(p_next))
      extra = draw(it_keys[:, k + 1], jnp.log(residual))
    else:
      extra = draw(None, p_next)
    # 4. Commit a + 1 tokens per row, cut at the first EOS and at the token budget.
    span = jnp.arange(k + 1)
    cand = jnp.where(span[None, :] < n_accept[:, None], jnp.concatenate([drafts, drafts[:, :1]], axis=1),
                     extra[:, None])
    count = n_accept + 1
    is_eos = (cand == eos_id) & (span[None, :] < count[:, None])
    count = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, count)
    count = jnp.where(done, 0, jnp.minimum(count, max_new_tokens - generated))
    logp = jnp.take_along_axis(logits, cand[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
    keep = span[None, :] < count[:, None]
    slots = generated[:, None] + span[None, :]
    out = out.at[rows[:, None], slots].set(jnp.where(keep, cand, pad_id))
    out_logp = out_logp.at[rows[:, None], slots].set(jnp.where(keep, logp, 0.0))
    active = ~done
    accepted = accepted + jnp.sum(jnp.where(active, n_accept, 0))
    proposed = proposed + k * jnp.sum(active.astype(jnp.int32))
    new_last = at(cand, jnp.maximum(count - 1, 0))
    new_prev = jnp.where(count >= 2, at(cand, jnp.maximum(count - 2, 0)), last)
    last = jnp.where(count >= 1, new_last, last)
    prev = jnp.where(count >= 1, new_prev, prev)
    generated = generated + count
    done = done | jnp.any(is_eos & keep, axis=1) | (generated >= max_new_tokens)
    return (it + 1, generated, done, prev, last, out, out_logp, target_cache, draft_cache, accepted, proposed)

  last = at(prompts, lengths - 1)
  prev = at(prompts, jnp.maximum(lengths - 2, 0))
  width = max_new_tokens + k + 1             # room for a full iteration's writes past the budget
  zeros = jnp.zeros((batch,), jnp.int32)
  state = (jnp.int32(0), zeros, jnp.zeros((batch,), bool), prev, last, jnp.full((batch, width), pad_id, jnp.int32),
           jnp.zeros((batch, width), jnp.float32), target_cache, draft_cache, jnp.int32(0), jnp.int32(0))
  state = jax.lax.while_loop(cond, body, state)
  generated, out, out_logp, accepted, proposed = state[1], state[5], state[6], state[9], state[10]
  valid = jnp.arange(max_new_tokens)[None, :] < generated[:, None]
  return SpeculativeOutput(jnp.where(valid, out[:, :max_new_tokens], pad_id),
                           generated, jnp.where(valid, out_logp[:, :max_new_tokens], 0.0),
                           accepted.astype(jnp.float32) / jnp.maximum(proposed, 1).astype(jnp.float32))


_speculative_jit = jax.jit(_speculative_impl, static_argnums=(0, 1, 2, 3, 4, 5))


def speculative_generate(target: DecodingModel, target_params, draft: DecodingModel, draft_params, prompts,
                         rng=None, *, max_new_tokens: int, num_draft_tokens: int = 4, prompt_lengths=None,
                         temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, min_tokens_to_keep=1, greedy: bool = False,
                         eos_id: Optional[int] = None, pad_id: int = 0, row_ids=None) -> SpeculativeOutput:
  """Samples from the target exactly as `generate` would (same filters, same output fields), with the draft
  proposing `num_draft_tokens` tokens per target call. See the module docstring."""
  check_model(target, "target")
  check_model(draft, "draft")
  k = inputs.positive_int("num_draft_tokens", num_draft_tokens)
  tokens, lengths = inputs.prepare_prompts(prompts, prompt_lengths, pad_id)
  batch = tokens.shape[0]
  cache_len = inputs.check_context(target, lengths, max_new_tokens, None, tokens.shape[1], extra=k)
  cache_len = min(cache_len, inputs.check_context(draft, lengths, max_new_tokens, None, tokens.shape[1], extra=k))
  inputs.check_cache_batch_axis(target, batch, cache_len, "target")
  inputs.check_cache_batch_axis(draft, batch, cache_len, "draft")
  tokens = tokens[:, :cache_len]
  floats, ints = inputs.sampling_settings(
      batch, temperature=0.0 if greedy else temperature, top_k=top_k, top_p=top_p, min_p=min_p,
      min_tokens_to_keep=min_tokens_to_keep, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
  sample = bool(np.any(floats[:, 0] > 0))
  if sample and rng is None:
    raise UserError("sampling needs an rng key (or pass greedy=True / temperature=0)")
  row_ids = (np.arange(batch, dtype=np.int32) if row_ids is None
             else inputs.host_vector("row_ids", row_ids, batch, np.int32))
  ids = np.array([-1 if eos_id is None else eos_id, pad_id], np.int32)
  return _speculative_jit(target, draft, inputs.positive_int("max_new_tokens", max_new_tokens), k, cache_len,
                          sample, target_params, draft_params, tokens, lengths, rng if sample else None, row_ids,
                          floats, ints, ids)
