"""Logit processors for text decoding: penalties, temperature, top-k, top-p, and the token choice built on them.

Pure jax (no Flax). Every setting is a runtime value (a scalar or one value per row), so changing it inside a
jitted decode loop compiles nothing new. Semantics (GUIDE §5, matching the PyTorch/HF conventions):

    top_k_logits(logits, k)                        # keep exactly k per row (k clamped to V; lower index wins a tie)
    top_p_logits(logits, p, min_tokens_to_keep=1)  # sort descending, keep a token iff the mass *before* it is < p
    apply_penalties(logits, seen, counts, repetition_penalty, presence_penalty, frequency_penalty)
    choose_tokens(logits, keys, temperature, top_k, top_p, ...)   # temperature, then top-k, then top-p; T <= 0: argmax

`k <= 0` and `p >= 1` mean "no filtering" (so `top_k=0, top_p=1.0` is plain sampling). Filtered entries become
`-inf`; at least one entry per row always survives, so the result is a valid categorical distribution.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def _descending_order(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(order, ranks): `order[..., j]` is the id of the j-th largest logit (stable: lower id first on ties) and
  `ranks` is its inverse permutation (the rank of each id)."""
  order = jnp.argsort(-logits, axis=-1, stable=True)
  flat = order.reshape(-1, order.shape[-1])
  rows = jnp.arange(flat.shape[0])[:, None]
  ranks = jnp.zeros_like(flat).at[rows, flat].set(jnp.arange(flat.shape[1], dtype=flat.dtype)[None, :])
  return order, ranks.reshape(order.shape)


def _per_row(value, logits: jax.Array, dtype) -> jax.Array:
  """A scalar or a `logits.shape[:-1]` array, shaped to broadcast against `logits` on the last axis."""
  value = jnp.asarray(value, dtype)
  if value.ndim == 0:
    return value
  if value.shape != logits.shape[:-1]:
    raise ValueError(f"a per-row setting must be a scalar or have shape {logits.shape[:-1]}, got {value.shape}")
  return value[..., None]


def _top_k_top_p(logits: jax.Array, k, p, min_tokens_to_keep) -> jax.Array:
  """Top-k then top-p with one sort: in descending order top-k keeps the first k positions, and top-p measures
  the mass before each position after renormalising over those k."""
  if logits.ndim < 1:
    raise ValueError(f"logits must have a vocabulary axis, got shape {logits.shape}")
  k = _per_row(k, logits, jnp.int32)
  p = _per_row(p, logits, jnp.float32)
  min_keep = _per_row(min_tokens_to_keep, logits, jnp.int32)
  order, ranks = _descending_order(logits)
  position = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  in_top_k = (position < k) | (k <= 0)
  sorted_logits = jnp.where(in_top_k, jnp.take_along_axis(logits, order, axis=-1).astype(jnp.float32), NEG_INF)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  cum = jnp.cumsum(probs, axis=-1)
  mass_before = jnp.concatenate([jnp.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1)
  keep_sorted = in_top_k & ((mass_before < p) | (position < min_keep) | (p >= 1.0))
  keep = jnp.take_along_axis(keep_sorted, ranks, axis=-1)
  return jnp.where(keep, logits, NEG_INF)


@jax.jit
def top_k_logits(logits: jax.Array, k) -> jax.Array:
  """All but the `k` largest logits of each row set to -inf.

  Keeps exactly `min(k, V)` entries even when values tie (the lower index wins a tie); `k <= 0` keeps everything.
  `k` may be a traced scalar or one value per row (shape `logits.shape[:-1]`).
  """
  return _top_k_top_p(jnp.asarray(logits), k, 1.0, 1)


@jax.jit
def top_p_logits(logits: jax.Array, p, min_tokens_to_keep=1) -> jax.Array:
  """Nucleus filter: logits outside the top-p mass set to -inf.

  Sorts each row descending (lower index first on ties) and keeps a token iff the probability mass of the tokens
  before it is `< p`; the first `min_tokens_to_keep` tokens are always kept and `p >= 1` keeps everything.
  Uniform logits over V therefore keep `ceil(p * V)` tokens. Probabilities are computed in float32.
  """
  return _top_k_top_p(jnp.asarray(logits), 0, p, min_tokens_to_keep)


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
def filter_logits(logits: jax.Array, temperature=1.0, top_k=0, top_p=1.0, min_tokens_to_keep=1) -> jax.Array:
  """Temperature, then top-k, then top-p: the float32 logits a sampler draws from."""
  return _top_k_top_p(apply_temperature(logits, temperature), top_k, top_p, min_tokens_to_keep)


@jax.jit
def choose_tokens(logits: jax.Array, keys: jax.Array, temperature=1.0, top_k=0, top_p=1.0,
                  min_tokens_to_keep=1) -> jax.Array:
  """One token id per row of `logits` [B, V] with one PRNG key per row (`keys`: [B] typed or [B, 2] raw keys).

  Rows with `temperature <= 0` take the argmax (lowest id on ties); other rows sample from `filter_logits`.
  Row i's draw depends only on `logits[i]` and `keys[i]`.
  """
  logits = jnp.asarray(logits, jnp.float32)
  if logits.ndim != 2:
    raise ValueError(f"choose_tokens expects logits [B, V], got shape {logits.shape}")
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, temperature, top_k, top_p, min_tokens_to_keep)
  sampled = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
  t = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), greedy.shape)
  return jnp.where(t > 0, sampled, greedy)
