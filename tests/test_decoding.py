"""Tests for genjax.samplers decoding: logit filters on closed cases, penalties, generate (greedy reference, batch
invariance, EOS rows, cache limits, no recompilation) and beam search (greedy equivalence, known best sequences).

The model here is a hand-built "bag of tokens" LM in pure jax with a token cache, and an independent numpy
reference: logits at position t = A[x_t] + mean(one_hot(x_0..x_t)) @ Bm. Transformer-specific decoding tests
(cached vs full logits) live in tests/test_transformer.py.
"""
import itertools
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.samplers import beam_search, generate, top_k_logits, top_p_logits
from genjax.samplers.decoding import DecodingModel
from genjax.samplers.logits import apply_penalties, choose_tokens, filter_logits

V = 7
EOS = 6
PAD = 0
NEG = -np.inf


def _bag_step(params, tokens, positions, cache):
  a, bm = params
  rows = jnp.arange(tokens.shape[0])[:, None]
  cache = cache.at[rows, positions].set(tokens)
  mask = jnp.arange(cache.shape[1])[None, None, :] <= positions[:, :, None]           # [B, T, C]
  hist = jax.nn.one_hot(cache, a.shape[0])                                            # [B, C, V]
  ctx = jnp.einsum("btc,bcv->btv", mask.astype(jnp.float32), hist) / (positions[..., None] + 1.0)
  return a[tokens] + ctx @ bm, cache


TRACES = {"n": 0}


def _counting_step(params, tokens, positions, cache):
  TRACES["n"] += 1                        # runs only while jax traces, i.e. once per compilation
  return _bag_step(params, tokens, positions, cache)


BAG = DecodingModel(_bag_step, lambda b, c: jnp.zeros((b, c), jnp.int32), max_len=None)
COUNTING = DecodingModel(_counting_step, lambda b, c: jnp.zeros((b, c), jnp.int32), max_len=None)
LIMITED = DecodingModel(_bag_step, lambda b, c: jnp.zeros((b, c), jnp.int32), max_len=12)


def _params(seed=0, eos_bias=-2.0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(V, V)).astype(np.float32) * 2.0
  bm = rng.normal(size=(V, V)).astype(np.float32) * 2.0
  a[:, EOS] += eos_bias
  return jnp.asarray(a), jnp.asarray(bm)


def _ref_logits(params, seq):
  """numpy: next-token logits after the whole sequence `seq` (full recomputation, no cache)."""
  a, bm = map(np.asarray, params)
  hist = np.eye(V)[seq].mean(0)
  return a[seq[-1]] + hist @ bm


def _ref_greedy(params, prompt, n, eos=None, rep=1.0):
  seq, out = list(prompt), []
  for _ in range(n):
    logits = _ref_logits(params, seq)
    seen = np.zeros(V, bool)
    seen[seq] = True
    logits = np.where(seen, np.where(logits > 0, logits / rep, logits * rep), logits)
    tok = int(np.argmax(logits))
    out.append(tok)
    seq.append(tok)
    if tok == eos:
      break
  return out


PROMPTS = [[1, 2, 3, 4, 5], [2], [5, 4, 1], [3, 3]]
N = 8                                  # max_new_tokens shared by most tests: they share one compilation


def _alone(row):
  """PROMPTS[row] as a batch of one, padded to the batch's width (one compilation serves every row)."""
  tokens = np.full((1, 5), PAD, np.int32)
  tokens[0, :len(PROMPTS[row])] = PROMPTS[row]
  return dict(prompts=tokens, prompt_lengths=[len(PROMPTS[row])])


# ---------------------------------------------------------------------------------------------- filters --------
def test_top_k_uniform_ties_and_large_k():
  uniform = jnp.zeros((10,))
  for k in (1, 3, 10):
    kept = np.isfinite(np.asarray(top_k_logits(uniform, k)))
    assert kept.sum() == k and kept[:k].all()          # exactly k; ties go to the lower indices
  ties = jnp.array([1.0, 3.0, 3.0, 3.0, 0.0])
  np.testing.assert_array_equal(np.isfinite(top_k_logits(ties, 2)), [False, True, True, False, False])
  for k in (5, 6, 1000, 0, -1):                         # k >= V keeps all; k <= 0 is "off"
    np.testing.assert_array_equal(top_k_logits(ties, k), ties)


def test_top_k_matches_sort_and_per_row_k():
  x = jax.random.normal(jax.random.key(0), (6, 50))
  ks = jnp.array([1, 2, 5, 17, 50, 60])
  out = np.asarray(top_k_logits(x, ks))
  for row, k in zip(range(6), np.asarray(ks)):
    kth = np.sort(np.asarray(x[row]))[::-1][min(k, 50) - 1]
    np.testing.assert_array_equal(np.isfinite(out[row]), np.asarray(x[row]) >= kth)


def test_top_p_uniform_keeps_ceil_pv():
  uniform = jnp.zeros((8,))
  # V = 8: masses before each token are multiples of 1/8, exact in float32, so ceil(p V) is exact.
  for p, expect in [(0.5, 4), (0.3, 3), (0.126, 2), (0.125, 1), (0.875, 7), (0.9, 8)]:
    kept = np.isfinite(np.asarray(top_p_logits(uniform, p)))
    assert kept.sum() == expect == math.ceil(p * 8) and kept[:expect].all(), (p, kept)


def test_top_p_limits_and_known_case():
  logits = jnp.log(jnp.array([0.05, 0.5, 0.15, 0.3]))
  # sorted probs 0.5, 0.3, 0.15, 0.05 -> mass before 0, 0.5, 0.8, 0.95
  np.testing.assert_array_equal(np.isfinite(top_p_logits(logits, 0.85)), [False, True, True, True])
  np.testing.assert_array_equal(np.isfinite(top_p_logits(logits, 0.6)), [False, True, False, True])
  np.testing.assert_array_equal(np.isfinite(top_p_logits(logits, 1e-9)), [False, True, False, False])   # p -> 0
  np.testing.assert_array_equal(np.isfinite(top_p_logits(logits, 0.0, min_tokens_to_keep=3)),
                                [False, True, True, True])
  tail = jnp.array([30.0, 0.0, -30.0, -60.0])          # masses before the tail round to 1.0 in float32
  np.testing.assert_array_equal(top_p_logits(tail, 1.0), tail)           # p -> 1 keeps every token
  assert np.isfinite(np.asarray(top_p_logits(tail, 0.999999))).sum() == 1


def test_top_p_matches_numpy_reference():
  x = np.asarray(jax.random.normal(jax.random.key(1), (5, 40))) * 2
  ps = np.array([0.1, 0.5, 0.9, 0.95, 0.99], np.float32)
  out = np.asarray(top_p_logits(jnp.asarray(x), jnp.asarray(ps)))
  for row in range(5):
    order = np.argsort(-x[row], kind="stable")
    probs = np.exp(x[row][order] - x[row].max())
    probs /= probs.sum()
    before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
    keep = np.zeros(40, bool)
    keep[order[(before < ps[row]) | (np.arange(40) < 1)]] = True
    np.testing.assert_array_equal(np.isfinite(out[row]), keep)


def test_temperature_then_top_k_then_top_p():
  logits = jnp.log(jnp.array([0.6, 0.25, 0.1, 0.05]))
  # At T = 1 top-p 0.7 keeps {0, 1}; at T = 0.5 the probabilities sharpen to .83/.14/.02/.006 -> keeps {0} only.
  assert np.isfinite(np.asarray(filter_logits(logits, 1.0, 0, 0.7))).sum() == 2
  out = np.asarray(filter_logits(logits, 0.5, 0, 0.7))
  assert np.isfinite(out).sum() == 1
  np.testing.assert_allclose(out[0], np.log(0.6) / 0.5, rtol=1e-6)
  # top-k before top-p: after keeping 2 the renormalised mass of token 0 is .6/.85 = .71 >= 0.7 -> one token.
  assert np.isfinite(np.asarray(filter_logits(logits, 1.0, 2, 0.7))).sum() == 1


def test_penalties_closed_values():
  logits = jnp.array([[2.0, -2.0, 1.0, 0.5]])
  seen = jnp.array([[True, True, False, False]])
  counts = jnp.array([[0, 0, 0, 3]])
  np.testing.assert_allclose(apply_penalties(logits, seen, counts, 2.0), [[1.0, -4.0, 1.0, 0.5]])
  np.testing.assert_allclose(apply_penalties(logits, seen, counts, 1.0, 0.5, 0.25), [[2.0, -2.0, 1.0, -0.75]])
  np.testing.assert_array_equal(apply_penalties(logits, seen, counts), logits)   # defaults are exact no-ops


def test_sampling_frequencies_match_filtered_softmax():
  logits = jnp.array([1.0, 2.0, 0.5, -1.0, 1.5])
  n = 20000
  keys = jax.random.split(jax.random.key(3), n)
  toks = np.asarray(choose_tokens(jnp.broadcast_to(logits, (n, 5)), keys, 0.7, 3, 1.0))
  probs = np.asarray(jax.nn.softmax(filter_logits(logits, 0.7, 3)))
  freq = np.bincount(toks, minlength=5) / n
  assert freq[2] == 0 and freq[3] == 0                 # outside the top 3
  np.testing.assert_allclose(freq, probs, atol=0.015)  # ~4 standard errors at n = 20000


# --------------------------------------------------------------------------------------------- generate --------
def test_greedy_equals_full_recompute_argmax_with_eos_rows():
  params = _params(0, eos_bias=1.0)
  out = generate(BAG, params, PROMPTS, greedy=True, max_new_tokens=N, eos_id=EOS, pad_id=PAD)
  refs = [_ref_greedy(params, p, N, eos=EOS) for p in PROMPTS]
  assert any(len(r) < N for r in refs) and any(len(r) == N for r in refs), refs   # EOS in some rows only
  for row, ref in enumerate(refs):
    assert int(out.lengths[row]) == len(ref)
    np.testing.assert_array_equal(out.tokens[row], ref + [PAD] * (N - len(ref)))


def test_repetition_penalty_matches_reference():
  params = _params(1)
  out = generate(BAG, params, PROMPTS, temperature=0.0, repetition_penalty=3.0, max_new_tokens=N)
  plain = generate(BAG, params, PROMPTS, temperature=0.0, max_new_tokens=N)
  for row, p in enumerate(PROMPTS):
    np.testing.assert_array_equal(out.tokens[row], _ref_greedy(params, p, N, rep=3.0))
  assert not np.array_equal(out.tokens, plain.tokens)


def test_temperature_to_zero_is_greedy():
  params = _params(2)
  greedy = generate(BAG, params, PROMPTS, greedy=True, max_new_tokens=N)
  cold = generate(BAG, params, PROMPTS, jax.random.key(0), temperature=1e-6, top_p=0.9, max_new_tokens=N)
  np.testing.assert_array_equal(cold.tokens, greedy.tokens)


def test_batch_invariance_with_row_ids_and_eos():
  params, rng = _params(3, eos_bias=0.0), jax.random.key(42)
  kw = dict(max_new_tokens=N, temperature=1.3, top_p=0.95, eos_id=EOS, pad_id=PAD)
  batch = generate(BAG, params, PROMPTS, rng, **kw)
  lens = np.asarray(batch.lengths)
  assert lens.min() < N and lens.max() == N, lens      # EOS in some rows, not all
  for row in range(len(PROMPTS)):
    alone = generate(BAG, params, rng=rng, row_ids=[row], **_alone(row), **kw)
    np.testing.assert_array_equal(alone.tokens[0], batch.tokens[row])
  reordered = generate(BAG, params, PROMPTS[::-1], rng, row_ids=np.arange(4)[::-1], **kw)
  np.testing.assert_array_equal(reordered.tokens[::-1], batch.tokens)
  # Different row ids give different draws (the key really is per row).
  same = generate(BAG, params, [PROMPTS[0]] * 4, rng, **kw)
  assert len({tuple(r) for r in np.asarray(same.tokens)}) > 1


def test_generate_sampling_distribution_of_first_token():
  params = _params(4)
  n = 2000
  out = generate(BAG, params, [[1, 2]] * n, jax.random.key(7), max_new_tokens=1, temperature=0.8, top_k=4)
  probs = np.asarray(jax.nn.softmax(filter_logits(jnp.asarray(_ref_logits(params, [1, 2])), 0.8, 4)))
  freq = np.bincount(np.asarray(out.tokens[:, 0]), minlength=V) / n
  np.testing.assert_allclose(freq, probs, atol=0.04)    # ~4 standard errors at n = 2000
  assert freq[probs == 0].sum() == 0


def test_runtime_settings_compile_nothing_new():
  params = _params(5)
  kw = dict(max_new_tokens=N, eos_id=EOS)
  settings = [dict(temperature=0.5), dict(top_k=3, top_p=0.5), dict(temperature=0.0, top_k=1),
              dict(repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.1, min_tokens_to_keep=2),
              dict(greedy=True, row_ids=[5, 6, 7, 8]), dict(temperature=[0.1, 0.2, 1.0, 0.0], eos_id=3),
              dict(greedy=True, repetition_penalty=1.2)]
  for setting in settings:   # compiles the four specialisations: all rows greedy or not x penalties off or not
    generate(COUNTING, params, PROMPTS, jax.random.key(1), **{**kw, **setting})
  traces = TRACES["n"]
  assert traces > 0
  for setting in settings + [dict(temperature=0.9, top_p=0.8, top_k=2), dict(greedy=True, frequency_penalty=0.5)]:
    generate(COUNTING, params, PROMPTS, jax.random.key(2), **{**kw, **setting})
  assert TRACES["n"] == traces
  generate(COUNTING, params, PROMPTS, jax.random.key(1), max_new_tokens=N + 1)   # a new output shape compiles
  assert TRACES["n"] > traces


def test_greedy_and_penalty_free_specialisations_agree_with_the_general_program():
  params = _params(5)
  kw = dict(max_new_tokens=N, eos_id=EOS)
  greedy = generate(COUNTING, params, PROMPTS, **kw, greedy=True)                         # argmax-only program
  mixed = generate(COUNTING, params, PROMPTS, jax.random.key(3), **kw, temperature=[0.0, 0.0, 0.0, 1.0])
  np.testing.assert_array_equal(mixed.tokens[:3], greedy.tokens[:3])                      # the greedy rows
  penalised = generate(COUNTING, params, PROMPTS, **kw, greedy=True, repetition_penalty=[1.0, 1.0, 1.0, 1.5])
  np.testing.assert_array_equal(penalised.tokens[:3], greedy.tokens[:3])                  # rows at the defaults
  sampled = generate(COUNTING, params, PROMPTS, jax.random.key(4), **kw, temperature=0.8, top_p=0.9)
  also = generate(COUNTING, params, PROMPTS, jax.random.key(4), **kw, temperature=0.8, top_p=0.9,
                  presence_penalty=[0.0, 0.0, 0.0, 0.5])
  np.testing.assert_array_equal(also.tokens[:3], sampled.tokens[:3])


def test_cache_limits():
  params = _params(6)
  full = list(range(1, 6)) * 2 + [1, 2]                 # 12 tokens == LIMITED.max_len
  out = generate(LIMITED, params, [full, [1, 2]], greedy=True, max_new_tokens=20, pad_id=PAD)
  # The full row gets exactly one token (from the prefill), the other fills its cache: 12 - 2 + 1 tokens.
  np.testing.assert_array_equal(out.lengths, [1, 11])
  np.testing.assert_array_equal(out.tokens[0, :1], _ref_greedy(params, full, 1))
  assert (np.asarray(out.tokens[0, 1:]) == PAD).all()
  np.testing.assert_array_equal(out.tokens[1, :11], _ref_greedy(params, [1, 2], 11))
  with pytest.raises(ValueError, match=r"13 tokens is longer than the KV cache \(12 slots"):
    generate(LIMITED, params, [full + [3], [1]], greedy=True, max_new_tokens=2)
  with pytest.raises(ValueError, match=r"6 tokens is longer than the KV cache \(5 slots"):
    generate(BAG, params, [[1] * 6], greedy=True, max_new_tokens=2, cache_len=5)
  with pytest.raises(ValueError, match="every prompt needs 1"):
    generate(BAG, params, [[1], []], greedy=True, max_new_tokens=2)
  with pytest.raises(ValueError, match="rng"):
    generate(BAG, params, [[1]], max_new_tokens=2)


# ------------------------------------------------------------------------------------------ beam search --------
def test_one_beam_is_greedy():
  params = _params(0, eos_bias=1.0)
  beams = beam_search(BAG, params, PROMPTS, num_beams=1, max_new_tokens=8, length_penalty=0.0, eos_id=EOS,
                      pad_id=PAD)
  greedy = generate(BAG, params, PROMPTS, greedy=True, max_new_tokens=8, eos_id=EOS, pad_id=PAD)
  np.testing.assert_array_equal(beams.sequences[:, 0], greedy.tokens)
  np.testing.assert_array_equal(beams.lengths[:, 0], greedy.lengths)


def _bigram_model(table):
  """Logits depend only on the last token: log-probs `table[last]`; the cache is unused (batch on axis 0)."""
  table = jnp.asarray(table, jnp.float32)
  return DecodingModel(lambda params, tokens, positions, cache: (table[tokens], cache),
                       lambda b, c: jnp.zeros((b, 1)), max_len=None)


def test_beam_finds_hand_built_best_sequence():
  # From token 0: P(1) = 0.6, P(2) = 0.4. After 1 everything is uniform (0.25 each), after 2 token 3 has 0.9.
  # Greedy takes 1 then some 0.25 token: 0.15; the best two-token sequence is (2, 3): 0.36.
  table = np.log(np.array([[1e-9, 0.6, 0.4, 1e-9],
                           [0.25, 0.25, 0.25, 0.25],
                           [0.05, 0.025, 0.025, 0.9],
                           [0.25, 0.25, 0.25, 0.25]]))
  model = _bigram_model(table)
  greedy = generate(model, None, [[0]], greedy=True, max_new_tokens=2)
  assert greedy.tokens[0, 0] == 1
  out = beam_search(model, None, [[0]], num_beams=2, max_new_tokens=2, length_penalty=0.0)
  np.testing.assert_array_equal(out.sequences[0, 0], [2, 3])
  np.testing.assert_allclose(out.scores[0, 0], np.log(0.36), rtol=1e-5)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_wide_beam_equals_exhaustive_search(length_penalty):
  rng = np.random.default_rng(int(length_penalty * 10))
  vocab, eos, n = 4, 3, 4
  table = np.log(rng.dirichlet(np.ones(vocab) * 0.7, size=vocab))
  hyps = []                                            # every sequence that ends in EOS or has n tokens
  for length in range(1, n + 1):
    for seq in itertools.product(range(vocab), repeat=length):
      if eos in seq[:-1] or (length < n and seq[-1] != eos):
        continue
      logp = sum(table[a, b] for a, b in zip((0,) + seq[:-1], seq))
      hyps.append((logp / length ** length_penalty, seq))
  hyps.sort(key=lambda h: -h[0])
  out = beam_search(_bigram_model(table), None, [[0]], num_beams=64, max_new_tokens=n,
                    length_penalty=length_penalty, eos_id=eos, pad_id=0)
  for j in range(5):
    score, seq = hyps[j]
    np.testing.assert_allclose(out.scores[0, j], score, rtol=1e-5)
    assert tuple(np.asarray(out.sequences[0, j, :len(seq)])) == seq and out.lengths[0, j] == len(seq)


def test_beam_search_batch_rows_are_independent():
  params = _params(7, eos_bias=0.5)
  kw = dict(num_beams=3, max_new_tokens=6, eos_id=EOS, pad_id=PAD)
  batch = beam_search(BAG, params, PROMPTS, **kw)
  for row in range(len(PROMPTS)):
    alone = beam_search(BAG, params, **_alone(row), **kw)
    np.testing.assert_array_equal(alone.sequences[0], batch.sequences[row])
    np.testing.assert_allclose(alone.scores[0], batch.scores[row], rtol=1e-6)
  assert np.all(np.diff(np.asarray(batch.scores), axis=1) <= 0)     # best first
  with pytest.raises(ValueError, match="beam search needs a cache of 11 slots"):
    beam_search(BAG, params, PROMPTS, num_beams=2, max_new_tokens=7, cache_len=10)


def test_decoding_imports_without_flax():
  code = "import sys, genjax.samplers.decoding; assert 'flax' not in sys.modules, 'flax was imported'"
  subprocess.run([sys.executable, "-c", code], check=True)
