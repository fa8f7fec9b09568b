"""Logit processors for text decoding: penalties, temperature, top-k, top-p, min-p, and the token choice.

Pure jax (no Flax). Every setting is a runtime value (a scalar or one value per row), so changing it inside a
jitted decode loop compiles nothing new. Semantics follow Hugging Face transformers' PyTorch warpers, in their order
(temperature, then top-k, then top-p, then min-p):

    top_k_logits(logits, k)                        # keep exactly k per row (k clamped to V; lower index wins a tie)
    top_p_logits(logits, p, min_tokens_to_keep=1)  # sort descending, keep a token iff the mass *before* it is < p
    min_p_logits(logits, min_p, min_tokens_to_keep=1)   # keep a token iff its prob >= min_p * the top prob
    apply_penalties(logits, seen, counts, repetition_penalty, presence_penalty, frequency_penalty)
    filter_logits(logits, temperature, top_k, top_p, min_p=0.0, min_tokens_to_keep=1)
    choose_tokens(logits, keys, temperature, top_k, top_p, min_p=0.0, ...)   # T <= 0: argmax

`k <= 0`, `p >= 1` and `min_p <= 0` mean "no filtering" (so `top_k=0, top_p=1.0` is plain sampling). Filtered
entries become `-inf`; at least one entry per row always survives, so the result is a valid categorical
distribution. One `min_tokens_to_keep` serves top-k, top-p and min-p, as in transformers' `generate`: the
`min_tokens_to_keep` most likely tokens survive every filter.

All filters share one stable descending sort: `choose_tokens` draws in sorted order and maps the draw back through
the sort permutation, so sampling costs one sort per row and no inverse permutation.

    import jax, jax.numpy as jnp
    from genjax.samplers.logits import filter_logits
    filter_logits(jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05])), 1.0, 0, 1.0, min_p=0.2)   # keeps ids 0, 1, 2
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def _per_row(value, logits: jax.Array, dtype) -> jax.Array:
  """A scalar or a `logits.shape[:-1]` array, shaped to broadcast against `logits` on the last axis."""
  value = jnp.asarray(value, dtype)
  if value.ndim == 0:
    return value
  if value.shape != logits.shape[:-1]:
    raise ValueError(f"a per-row setting must be a scalar or have shape {logits.shape[:-1]}, got {value.shape}")
  return value[..., None]


def sorted_filtered_logits(logits: jax.Array, top_k=0, top_p=1.0, min_p=0.0,
                           min_tokens_to_keep=1) -> tuple[jax.Array, jax.Array]:
  """(filtered logits in descending order, order): `order[..., j]` is the id of the j-th largest logit (a stable
  sort: the lower id first on ties) and the first output holds float32 logits with the filtered ones at -inf.

  Top-k keeps the first max(k, min_tokens_to_keep) positions; top-p measures the probability mass before each
  position after renormalising over those; min-p compares each probability with the top one (a ratio, so
  renormalising changes nothing).
  """
  logits = jnp.asarray(logits, jnp.float32)
  if logits.ndim < 1:
    raise ValueError(f"logits must have a vocabulary axis, got shape {logits.shape}")
  k = _per_row(top_k, logits, jnp.int32)
  p = _per_row(top_p, logits, jnp.float32)
  m = _per_row(min_p, logits, jnp.float32)
  min_keep = _per_row(min_tokens_to_keep, logits, jnp.int32)
  ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  neg_sorted, order = jax.lax.sort((-logits, ids), dimension=logits.ndim - 1, num_keys=1, is_stable=True)
  position = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  in_top_k = (position < jnp.maximum(k, min_keep)) | (k <= 0)
  sorted_logits = jnp.where(in_top_k, -neg_sorted, NEG_INF)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  cum = jnp.cumsum(probs, axis=-1)
  mass_before = jnp.concatenate([jnp.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1)
  forced = position < min_keep
  keep_p = (mass_before < p) | (p >= 1.0)
  keep_min_p = probs >= m * probs[..., :1]
  keep = in_top_k & (keep_p | forced) & (keep_min_p | forced)
  return jnp.where(keep, sorted_logits, NEG_INF), order


def _unsort(sorted_values: jax.Array, order: jax.Array) -> jax.Array:
  """Inverse of the sort: values back at their ids (a second sort, keyed by the permutation)."""
  return jax.lax.sort((order, sorted_values), dimension=order.ndim - 1, num_keys=1)[1]


@jax.jit
def top_k_logits(logits: jax.Array, k) -> jax.Array:
  """All but the `k` largest logits of each row set to -inf.

  Keeps exactly `min(k, V)` entries even when values tie (the lower index wins a tie); `k <= 0` keeps everything.
  `k` may be a traced scalar or one value per row (shape `logits.shape[:-1]`).
  """
  logits = jnp.asarray(logits)
  filtered, order = sorted_filtered_logits(logits, k)
  return jnp.where(jnp.isfinite(_unsort(filtered, order)), logits, NEG_INF)


@jax.jit
def top_p_logits(logits: jax.Array, p, min_tokens_to_keep=1) -> jax.Array:
  """Nucleus filter: logits outside the top-p mass set to -inf.

  Sorts each row descending (lower index first on ties) and keeps a token iff the probability mass of the tokens
  before it is `< p`; the first `min_tokens_to_keep` tokens are always kept and `p >= 1` keeps everything.
  Uniform logits over V therefore keep `ceil(p * V)` tokens. Probabilities are computed in float32.
  """
  logits = jnp.asarray(logits)
  filtered, order = sorted_filtered_logits(logits, 0, p, 0.0, min_tokens_to_keep)
  return jnp.where(jnp.isfinite(_unsort(filtered, order)), logits, NEG_INF)


@jax.jit
def min_p_logits(logits: jax.Array, min_p, min_tokens_to_keep=1) -> jax.Array:
  """Min-p filter (transformers' `MinPLogitsWarper`): a token survives iff its probability is at least `min_p`
  times the most likely token's; the `min_tokens_to_keep` most likely always survive; `min_p = 0` keeps all."""
  logits = jnp.asarray(logits)
  filtered, order = sorted_filtered_logits(logits, 0, 1.0, min_p, min_tokens_to_keep)
  return jnp.where(jnp.isfinite(_unsort(filtered, order)), logits, NEG_INF)


@jax.jit
def apply_temperature(logits: jax.Array, temperature) -> jax.Array:
  """`logits / temperature` in float32 (rows with temperature <= 0 are left unscaled: they are decoded greedily)."""
  logits = jnp.asarray(logits, jnp.float32)
  t = _per_row(temperature, logits, jnp.float32)
  return logits / jnp.where(t > 0, t, 1.0)


@jax.jit
def apply_penalties(logits: jax.Array, seen: jax.Array, counts: jax.Array, repetition_penalty=1.0,
                    presence_penalty=0.0, frequency_penalty=0.0) -> jax.Array:
  """Repetition, presence and frequency penalties (all no-ops at their defaults 1, 0, 0).

  - repetition (HF/CTRL style): for ids with `seen` True, positive logits are divided by the penalty and negative
    ones multiplied by it. `seen` [..., V] bool marks ids in the prompt or generated so far.
  - presence / frequency (OpenAI style): `logit -= presence * (count > 0) + frequency * count`, where `counts`
    [..., V] counts each id among the *generated* tokens only.
  """
  logits = jnp.asarray(logits, jnp.float32)
  if seen.shape != logits.shape or counts.shape != logits.shape:
    raise ValueError(f"seen {seen.shape} and counts {counts.shape} must match logits {logits.shape}")
  rep = _per_row(repetition_penalty, logits, jnp.float32)
  pres = _per_row(presence_penalty, logits, jnp.float32)
  freq = _per_row(frequency_penalty, logits, jnp.float32)
  penalised = jnp.where(logits > 0, logits / rep, logits * rep)
  logits = jnp.where(seen, penalised, logits)
  counts = counts.astype(jnp.float32)
  return logits - pres * (counts > 0) - freq * counts


@jax.jit
def filter_logits(logits: jax.Array, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                  min_tokens_to_keep=1) -> jax.Array:
  """Temperature, then top-k, then top-p, then min-p: the float32 logits a sampler draws from."""
  filtered, order = sorted_filtered_logits(apply_temperature(logits, temperature), top_k, top_p, min_p,
                                           min_tokens_to_keep)
  return _unsort(filtered, order)


def greedy_or_filtered(logits: jax.Array, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                       min_tokens_to_keep=1) -> jax.Array:
  """The logits of the distribution a row draws from, by id: `filter_logits` for rows with temperature > 0 and a
  point mass on the argmax (0 there, -inf elsewhere; lowest id on ties) for rows with temperature <= 0."""
  logits = jnp.asarray(logits, jnp.float32)
  filtered = filter_logits(logits, temperature, top_k, top_p, min_p, min_tokens_to_keep)
  argmax = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=bool)
  greedy = jnp.broadcast_to(_per_row(temperature, logits, jnp.float32) <= 0, logits.shape)
  return jnp.where(greedy, jnp.where(argmax, 0.0, NEG_INF), filtered)


@jax.jit
def choose_tokens(logits: jax.Array, keys: jax.Array, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                  min_tokens_to_keep=1) -> jax.Array:
  """One token id per row of `logits` [B, V] with one PRNG key per row (`keys`: [B] typed or [B, 2] raw keys).

  Rows with `temperature <= 0` take the argmax (lowest id on ties); other rows sample from `filter_logits`.
  Row i's draw depends only on `logits[i]` and `keys[i]`.
  """
  logits = jnp.asarray(logits, jnp.float32)
  if logits.ndim != 2:
    raise ValueError(f"choose_tokens expects logits [B, V], got shape {logits.shape}")
  filtered, order = sorted_filtered_logits(apply_temperature(logits, temperature), top_k, top_p, min_p,
                                           min_tokens_to_keep)
  rank = jax.vmap(jax.random.categorical)(keys, filtered)
  t = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), rank.shape)
  rank = jnp.where(t > 0, rank, 0)              # the first in the stable sort is the argmax, lowest id on ties
  return jnp.take_along_axis(order, rank[:, None], axis=1)[:, 0].astype(jnp.int32)
