"""Tests for genjax.samplers decoding: logit filters on closed cases, penalties, generate (greedy reference, batch
invariance, EOS rows, stop sequences, log-probs, n samples per prompt, the context guard, validation, the cache
contract, no recompilation) and beam search (greedy equivalence, known best sequences).

The model here is a hand-built "bag of tokens" LM in pure jax with a token cache, and an independent numpy
reference: logits at position t = A[x_t] + mean(one_hot(x_0..x_t)) @ Bm. Transformer-specific decoding tests
(cached vs full logits) live in tests/test_transformer.py.
"""
import dataclasses
import itertools
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.compiles import CompileCounter
from genjax.errors import UserError
from genjax.samplers import DecodingModel, DecodingSettings, beam_search, generate, top_k_logits, top_p_logits
from genjax.samplers.logits import apply_penalties, choose_tokens, filter_logits, min_p_logits

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


def test_min_p_closed_case_and_min_tokens_to_keep():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  # threshold 0.2 * 0.5 = 0.1: keeps 0.5, 0.3, 0.15, drops 0.05; min_tokens_to_keep=4 keeps all.
  np.testing.assert_array_equal(np.isfinite(min_p_logits(logits, 0.2)), [[True, True, True, False]])
  np.testing.assert_array_equal(np.isfinite(min_p_logits(logits, 0.2, 4)), [[True] * 4])
  np.testing.assert_array_equal(min_p_logits(logits, 0.0), logits)          # 0 = off
  np.testing.assert_array_equal(np.isfinite(min_p_logits(logits, 1.0)), [[True, False, False, False]])
  # After top-p 0.6 (keeps 0.5, 0.3), min-p 0.7 compares with the top token: 0.3 < 0.35 is dropped.
  np.testing.assert_array_equal(np.isfinite(filter_logits(logits, 1.0, 0, 0.6, 0.7)), [[True, False, False, False]])


def _hf_chain(logits, temperature, top_k, top_p, min_p, min_keep):
  torch = pytest.importorskip("torch")
  lp = pytest.importorskip("transformers.generation.logits_process")
  x = torch.tensor(np.asarray(logits, np.float32))
  warpers = [lp.TemperatureLogitsWarper(temperature)]
  if top_k > 0:
    warpers.append(lp.TopKLogitsWarper(top_k, min_tokens_to_keep=min_keep))
  if top_p < 1:
    warpers.append(lp.TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep))
  warpers.append(lp.MinPLogitsWarper(min_p, min_tokens_to_keep=min_keep))
  for w in warpers:
    x = w(None, x)
  return np.isfinite(x.numpy())


@pytest.mark.parametrize("temperature,top_k,top_p,min_p,min_keep",
                         [(1.0, 0, 1.0, 0.1, 1), (0.7, 0, 1.0, 0.3, 1), (1.3, 20, 0.9, 0.05, 1),
                          (1.0, 0, 0.8, 0.2, 3), (1.0, 3, 1.0, 0.5, 5), (0.5, 0, 1.0, 0.99, 2)])
def test_min_p_chain_matches_transformers_on_random_logits(temperature, top_k, top_p, min_p, min_keep):
  x = np.asarray(jax.random.normal(jax.random.key(11), (16, 50))) * 3
  ours = np.isfinite(np.asarray(filter_logits(x, temperature, top_k, top_p, min_p, min_keep)))
  np.testing.assert_array_equal(ours, _hf_chain(x, temperature, top_k, top_p, min_p, min_keep))


def test_min_p_matches_transformers_on_tied_logits():
  # Ties at the top all survive; ties below the threshold go together (min_tokens_to_keep cuts no tie here).
  x = np.array([[2.0, 2.0, 1.0, 1.0, 0.0, 0.0, -3.0],
                [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                [1.0, 3.0, 1.0, 3.0, 3.0, -1.0, 1.0]], np.float32)
  for min_p, keep in ((0.3, 1), (0.5, 1), (0.1, 2), (1.0, 1), (0.05, 1)):
    ours = np.isfinite(np.asarray(min_p_logits(x, min_p, keep)))
    np.testing.assert_array_equal(ours, _hf_chain(x, 1.0, 0, 1.0, min_p, keep), err_msg=str((min_p, keep)))


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
  cold = generate(BAG, params, PROMPTS, rng=jax.random.key(0), temperature=1e-6, top_p=0.9, max_new_tokens=N)
  np.testing.assert_array_equal(cold.tokens, greedy.tokens)


def test_batch_invariance_with_row_ids_and_eos():
  params, rng = _params(3, eos_bias=0.0), jax.random.key(42)
  kw = dict(max_new_tokens=N, temperature=1.3, top_p=0.95, eos_id=EOS, pad_id=PAD)
  batch = generate(BAG, params, PROMPTS, rng=rng, **kw)
  lens = np.asarray(batch.lengths)
  assert lens.min() < N and lens.max() == N, lens      # EOS in some rows, not all
  for row in range(len(PROMPTS)):
    alone = generate(BAG, params, rng=rng, row_ids=[row], **_alone(row), **kw)
    np.testing.assert_array_equal(alone.tokens[0], batch.tokens[row])
  reordered = generate(BAG, params, PROMPTS[::-1], rng=rng, row_ids=np.arange(4)[::-1], **kw)
  np.testing.assert_array_equal(reordered.tokens[::-1], batch.tokens)
  # Different row ids give different draws (the key really is per row).
  same = generate(BAG, params, [PROMPTS[0]] * 4, rng=rng, **kw)
  assert len({tuple(r) for r in np.asarray(same.tokens)}) > 1


def test_generate_sampling_distribution_of_first_token():
  params = _params(4)
  n = 2000
  out = generate(BAG, params, [[1, 2]] * n, rng=jax.random.key(7), max_new_tokens=1, temperature=0.8, top_k=4)
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
    generate(COUNTING, params, PROMPTS, rng=jax.random.key(1), **{**kw, **setting})
  traces = TRACES["n"]
  assert traces > 0
  for setting in settings + [dict(temperature=0.9, top_p=0.8, top_k=2), dict(greedy=True, frequency_penalty=0.5)]:
    generate(COUNTING, params, PROMPTS, rng=jax.random.key(2), **{**kw, **setting})
  assert TRACES["n"] == traces
  generate(COUNTING, params, PROMPTS, rng=jax.random.key(1), max_new_tokens=N + 1)   # a new output shape compiles
  assert TRACES["n"] > traces


def test_greedy_and_penalty_free_specialisations_agree_with_the_general_program():
  params = _params(5)
  kw = dict(max_new_tokens=N, eos_id=EOS)
  greedy = generate(COUNTING, params, PROMPTS, **kw, greedy=True)                         # argmax-only program
  mixed = generate(COUNTING, params, PROMPTS, rng=jax.random.key(3), **kw, temperature=[0.0, 0.0, 0.0, 1.0])
  np.testing.assert_array_equal(mixed.tokens[:3], greedy.tokens[:3])                      # the greedy rows
  penalised = generate(COUNTING, params, PROMPTS, **kw, greedy=True, repetition_penalty=[1.0, 1.0, 1.0, 1.5])
  np.testing.assert_array_equal(penalised.tokens[:3], greedy.tokens[:3])                  # rows at the defaults
  sampled = generate(COUNTING, params, PROMPTS, rng=jax.random.key(4), **kw, temperature=0.8, top_p=0.9)
  also = generate(COUNTING, params, PROMPTS, rng=jax.random.key(4), **kw, temperature=0.8, top_p=0.9,
                  presence_penalty=[0.0, 0.0, 0.0, 0.5])
  np.testing.assert_array_equal(also.tokens[:3], sampled.tokens[:3])


def test_context_guard_replaces_the_silent_stop():
  params = _params(6)
  full = list(range(1, 6)) * 2 + [1, 2]                 # 12 tokens == LIMITED.max_len
  # prompt + max_new_tokens == max_len fits exactly: every row gets all its tokens (no silent stop).
  out = generate(LIMITED, params, [full[:10], [1, 2]], greedy=True, max_new_tokens=2, pad_id=PAD)
  np.testing.assert_array_equal(out.lengths, [2, 2])
  np.testing.assert_array_equal(out.tokens[0], _ref_greedy(params, full[:10], 2))
  for call in (lambda: generate(LIMITED, params, [full, [1, 2]], greedy=True, max_new_tokens=1),
               lambda: beam_search(LIMITED, params, [full[:11]], num_beams=2, max_new_tokens=2)):
    with pytest.raises(UserError, match=r"longest prompt \(1[12] tokens\) \+ max_new_tokens=[12] = 13 does not fit "
                                        r"in the model's context max_len=12"):
      call()
  with pytest.raises(UserError, match=r"cache_len=5 is too small: the longest prompt \(6\) \+ max_new_tokens \(2\)"):
    generate(BAG, params, [[1] * 6], greedy=True, max_new_tokens=2, cache_len=5)
  with pytest.raises(UserError, match="every prompt needs 1"):
    generate(BAG, params, [[1], []], greedy=True, max_new_tokens=2)
  with pytest.raises(UserError, match="rng"):
    generate(BAG, params, [[1]], max_new_tokens=2)


BAD_SETTINGS = [
    (dict(temperature=-0.5), r"temperature=-0.5 must be >= 0"),
    (dict(temperature=float("nan")), r"temperature=nan must be >= 0 and finite"),
    (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(top_p=[0.9, 0.9, 1.2, 0.9]), r"top_p=\[0.9, 0.9, 1.2, 0.9\] must be in \(0, 1\].*\(row 2\)"),
    (dict(top_k=-1), r"top_k=-1 must be >= 0"),
    (dict(top_k=2.5), r"top_k=2.5 must be an integer"),
    (dict(min_p=1.5), r"min_p=1.5 must be in \[0, 1\]"),
    (dict(min_p=-0.1), r"min_p=-0.1 must be in \[0, 1\]"),
    (dict(min_tokens_to_keep=0), r"min_tokens_to_keep=0 must be >= 1"),
    (dict(repetition_penalty=0.0), r"repetition_penalty=0.0 must be > 0"),
    (dict(repetition_penalty=float("inf")), r"repetition_penalty=inf must be > 0 and finite"),
    (dict(presence_penalty=float("nan")), r"presence_penalty=nan must be finite"),
    (dict(frequency_penalty=float("-inf")), r"frequency_penalty=-inf must be finite"),
    (dict(num_return_sequences=0), r"num_return_sequences=0 must be a positive int"),
    (dict(max_new_tokens=0), r"max_new_tokens=0 must be a positive int"),
    (dict(stop_sequences=[[]]), r"stop_sequences contains \[\]"),
    (dict(stop_sequences=[[[1]], [[2]]]), r"one such list per row \(4 rows\)"),
]


@pytest.mark.parametrize("setting,message", BAD_SETTINGS, ids=[str(b[0]) for b in BAD_SETTINGS])
def test_bad_settings_raise_naming_the_setting_and_value(setting, message):
  kw = {"max_new_tokens": 2, **setting}
  with pytest.raises(UserError, match=message):       # raised on the host, before anything compiles
    generate(BAG, _params(0), PROMPTS, rng=jax.random.key(0), **kw)


def test_bad_beam_settings():
  for bad, message in ((0, r"num_beams=0 must be a positive int"), (2.0, r"num_beams=2.0 must be a positive int")):
    with pytest.raises(UserError, match=message):
      beam_search(BAG, _params(0), PROMPTS, num_beams=bad, max_new_tokens=2)
  with pytest.raises(UserError, match=r"length_penalty=nan must be finite"):
    beam_search(BAG, _params(0), PROMPTS, num_beams=2, max_new_tokens=2, length_penalty=float("nan"))


def test_cache_leaf_without_the_batch_axis_is_named():
  # A shared write index (a scalar leaf, as in Hugging Face Flax caches) cannot be repeated, reordered or rolled
  # back per row: refused up front, naming the leaf.
  shared = DecodingModel(lambda p, t, pos, c: _bag_step(p, t, pos, c["tokens"]),
                         lambda b, c: {"tokens": jnp.zeros((b, c), jnp.int32), "index": jnp.zeros((), jnp.int32)})
  for call in (lambda: generate(shared, _params(0), PROMPTS, greedy=True, max_new_tokens=2),
               lambda: beam_search(shared, _params(0), PROMPTS, num_beams=2, max_new_tokens=2)):
    with pytest.raises(UserError, match=r"leaf \['index'\] has shape \(\); every cache leaf needs the batch"):
      call()
  # A leaf whose axis 0 equals the batch by chance is caught too (checked at two batch sizes).
  fixed = DecodingModel(_bag_step, lambda b, c: jnp.zeros((4, c), jnp.int32))
  with pytest.raises(UserError, match=r"leaf <root> has shape \(4, 12\)"):
    generate(fixed, _params(0), PROMPTS, greedy=True, max_new_tokens=8)


def _first_stop(prompt, continuation, stops):
  """numpy reference: (tokens kept, index of the stop that matched or -1) — the first t at which prompt +
  continuation[:t + 1] ends with a stop sequence."""
  seq = list(prompt)
  for t, tok in enumerate(continuation):
    seq.append(tok)
    for j, stop in enumerate(stops):
      if len(seq) >= len(stop) and seq[-len(stop):] == list(stop):
        return t + 1, j
  return len(continuation), -1


def test_stop_sequences_end_exactly_at_the_match_per_row():
  params = _params(0)
  free = generate(BAG, params, PROMPTS, greedy=True, max_new_tokens=N)
  refs = [list(np.asarray(free.tokens[r])) for r in range(len(PROMPTS))]
  # Row 0: a stop spanning the prompt boundary (last prompt token + first new one); row 1: two stops, the second
  # inside the continuation; row 2: a stop that never occurs; row 3: a one-token stop.
  per_row = [[[PROMPTS[0][-1], refs[0][0]]], [[V + 5], refs[1][2:5]], [[V + 1, V + 2]], [[refs[3][3]]]]
  out = generate(BAG, params, PROMPTS, greedy=True, max_new_tokens=N, stop_sequences=per_row, pad_id=PAD)
  expected = [_first_stop(PROMPTS[r], refs[r], per_row[r]) for r in range(4)]
  assert expected[0] == (1, 0) and expected[2] == (N, -1) and expected[1][1] == 1, expected
  for r, (length, which) in enumerate(expected):
    assert (int(out.lengths[r]), int(out.stop_index[r])) == (length, which), r
    np.testing.assert_array_equal(out.tokens[r], refs[r][:length] + [PAD] * (N - length))
  # One list for every row: the same table broadcast.
  shared = generate(BAG, params, PROMPTS, greedy=True, max_new_tokens=N, stop_sequences=[refs[1][2:5], [V + 5]])
  for r in range(4):
    length, which = _first_stop(PROMPTS[r], refs[r], [refs[1][2:5], [V + 5]])
    assert (int(shared.lengths[r]), int(shared.stop_index[r])) == (length, which)


def test_logprobs_equal_a_full_forward_log_softmax():
  params = _params(3, eos_bias=0.0)
  out = generate(BAG, params, PROMPTS, rng=jax.random.key(5), max_new_tokens=N, temperature=1.3, top_p=0.9, min_p=0.05,
                 repetition_penalty=1.5, eos_id=EOS, pad_id=PAD)
  lens = np.asarray(out.lengths)
  assert lens.min() < N, lens                           # some row ends early: zeros after it
  for r, prompt in enumerate(PROMPTS):
    toks = list(np.asarray(out.tokens[r, :lens[r]]))
    for t, tok in enumerate(toks):                      # raw log-softmax: before penalties, temperature, filters
      logits = _ref_logits(params, prompt + toks[:t])
      expect = logits[tok] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
      np.testing.assert_allclose(out.logprobs[r, t], expect, rtol=1e-5, atol=1e-5)
    assert (np.asarray(out.logprobs[r, lens[r]:]) == 0).all()


def test_greedy_logprobs_equal_a_full_forward_log_softmax():
  params = _params(3, eos_bias=0.0)                    # the argmax-only program computes log p from the max logit
  out = generate(BAG, params, PROMPTS, max_new_tokens=N, greedy=True, eos_id=EOS, pad_id=PAD)
  lens = np.asarray(out.lengths)
  for r, prompt in enumerate(PROMPTS):
    toks = list(np.asarray(out.tokens[r, :lens[r]]))
    for t, tok in enumerate(toks):
      logits = _ref_logits(params, prompt + toks[:t])
      assert tok == int(np.argmax(logits))
      expect = logits[tok] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
      np.testing.assert_allclose(out.logprobs[r, t], expect, rtol=1e-5, atol=1e-5)
    assert (np.asarray(out.logprobs[r, lens[r]:]) == 0).all()


def test_settings_are_packed_once_and_vectors_still_checked():
  from genjax.samplers.settings import sampling_arrays
  kw = dict(max_new_tokens=2, temperature=0.7, top_k=3, top_p=0.9)
  floats, ints = sampling_arrays(DecodingSettings(**kw), 4)
  again = sampling_arrays(DecodingSettings(**kw), 4)
  assert again[0] is floats and again[1] is ints         # cached: no host work on a repeated call
  assert not floats.flags.writeable and not ints.flags.writeable
  np.testing.assert_allclose(floats[:, 0], 0.7, rtol=1e-7)
  np.testing.assert_array_equal(ints[:, 0], 3)
  with pytest.raises(UserError, match=r"top_p=1.5 must be in \(0, 1\]"):
    DecodingSettings(**{**kw, "top_p": 1.5})
  rows = sampling_arrays(DecodingSettings(**{**kw, "temperature": [0.1, 0.2, 0.0, 1.0]}), 4)[0]
  np.testing.assert_allclose(rows[:, 0], [0.1, 0.2, 0.0, 1.0], rtol=1e-7)
  with pytest.raises(UserError, match=r"temperature=\[0.1, -1.0, 0.0, 1.0\] must be >= 0"):
    DecodingSettings(**{**kw, "temperature": [0.1, -1.0, 0.0, 1.0]})
  with pytest.raises(UserError, match=r"temperature must be a scalar or have shape \(4,\), got shape \(3,\)"):
    sampling_arrays(DecodingSettings(**{**kw, "temperature": [0.1, 0.2, 0.0]}), 4)


def test_settings_are_one_canonical_hashable_value():
  # 1, 1.0, True and numpy scalars of one value build equal settings of one type: a sound cache / jit key.
  same = [DecodingSettings(max_new_tokens=4, top_k=k, temperature=t, top_p=p, stop_sequences=stops)
          for k, t, p, stops in ((1, 1, np.float32(0.5), [[1, 2]]), (1.0, True, 0.5, ((1, 2),)),
                                 (True, 1.0, 0.5, [np.array([1, 2])]))]
  assert len(set(same)) == 1 and all(s == same[0] for s in same)
  assert type(same[0].top_k) is int and type(same[0].temperature) is float
  per_row = DecodingSettings(max_new_tokens=4, temperature=np.array([0.5, 0.0]))
  assert per_row.temperature == (0.5, 0.0) and hash(per_row) == hash(per_row.replace())
  assert per_row.replace(top_p=0.9) != per_row and per_row.replace(top_p=0.9).temperature == (0.5, 0.0)
  with pytest.raises(dataclasses.FrozenInstanceError):
    per_row.top_p = 0.5
  with pytest.raises(TypeError):
    DecodingSettings(4)                                  # keyword-only


def test_settings_object_equals_its_keyword_arguments_bitwise():
  params, rng = _params(3, eos_bias=0.0), jax.random.key(11)
  fields = dict(max_new_tokens=N, temperature=[0.9, 0.0, 1.3, 0.7], top_k=5, min_p=0.05, repetition_penalty=1.2,
                eos_id=EOS, pad_id=PAD, stop_sequences=[[3, 4]], num_return_sequences=2)
  by_value = generate(BAG, params, PROMPTS, rng=rng, settings=DecodingSettings(**fields))
  by_keywords = generate(BAG, params, PROMPTS, rng=rng, **fields)
  overridden = generate(BAG, params, PROMPTS, rng=rng, settings=DecodingSettings(**{**fields, "top_k": 2}), top_k=5)
  for out in (by_keywords, overridden):
    for a, b in zip(by_value, out):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  beams = DecodingSettings(max_new_tokens=4, num_beams=2, eos_id=EOS, pad_id=PAD)
  for a, b in zip(beam_search(BAG, params, PROMPTS, settings=beams),
                  beam_search(BAG, params, PROMPTS, max_new_tokens=4, num_beams=2, eos_id=EOS, pad_id=PAD)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_three_decoders_reject_a_bad_setting_alike():
  from genjax.samplers import speculative_generate
  decoders = {"generate": lambda **kw: generate(BAG, _params(0), PROMPTS, rng=jax.random.key(0), **kw),
              "beam_search": lambda **kw: beam_search(BAG, _params(0), PROMPTS, **kw),
              "speculative_generate": lambda **kw: speculative_generate(BAG, _params(0), BAG, _params(1), PROMPTS,
                                                                        rng=jax.random.key(0), **kw)}
  for bad in (dict(top_p=1.5), dict(max_new_tokens=0), dict(pad_id=1.5), dict(eos_id=True),
              dict(length_penalty=float("nan")), dict(num_beams=0), dict(num_draft_tokens=2.0)):
    messages = set()
    for name, call in decoders.items():
      with pytest.raises(UserError) as error:
        call(**{"max_new_tokens": 2, **bad})
      messages.add(str(error.value))
    (message,) = messages                                # the same error from every decoder
    assert "\n" not in message and f"{next(iter(bad))}=" in message, message
  # A knob a decoder does not apply is refused, naming the decoders that do; a wrong type of settings too.
  with pytest.raises(UserError, match=r"^num_beams=3 does not apply to generate; .*\(used by beam_search\)$"):
    decoders["generate"](max_new_tokens=2, num_beams=3)
  with pytest.raises(UserError, match=r"^temperature=0.5 does not apply to beam_search; .*generate, "
                                      r"speculative_generate\)$"):
    decoders["beam_search"](max_new_tokens=2, temperature=0.5)
  with pytest.raises(UserError, match=r"^stop_sequences=\[\[1\]\] does not apply to speculative_generate"):
    decoders["speculative_generate"](max_new_tokens=2, stop_sequences=[[1]])
  with pytest.raises(UserError, match=r"settings=\{'max_new_tokens': 2\} must be a genjax.samplers.DecodingSett"):
    decoders["beam_search"](settings={"max_new_tokens": 2})
  with pytest.raises(TypeError, match=r"unexpected keyword arguments \['temprature'\]"):
    decoders["generate"](max_new_tokens=2, temprature=0.5)


def test_num_return_sequences_share_the_prefill():
  params, rng = _params(3, eos_bias=0.0), jax.random.key(9)
  kw = dict(max_new_tokens=N, temperature=1.0, eos_id=EOS, pad_id=PAD)
  one = generate(BAG, params, PROMPTS, rng=rng, **kw)
  three = generate(BAG, params, PROMPTS, rng=rng, num_return_sequences=3, **kw)
  assert three.tokens.shape == (4, 3, N) and three.lengths.shape == (4, 3) and three.stop_index.shape == (4, 3)
  for field in ("tokens", "lengths", "stop_index"):     # sequence 0 of n is the n = 1 draw
    np.testing.assert_array_equal(getattr(three, field)[:, 0], getattr(one, field))
  np.testing.assert_allclose(three.logprobs[:, 0], one.logprobs, rtol=1e-5)      # another program: float rounding
  assert len({tuple(np.asarray(three.tokens[0, j])) for j in range(3)}) > 1     # independent draws
  greedy = generate(BAG, params, PROMPTS, greedy=True, max_new_tokens=N, num_return_sequences=2)
  np.testing.assert_array_equal(greedy.tokens[:, 0], greedy.tokens[:, 1])
  np.testing.assert_array_equal(greedy.tokens[:, 0], generate(BAG, params, PROMPTS, greedy=True,
                                                              max_new_tokens=N).tokens)


def test_a_new_batch_size_compiles_one_program_per_specialisation():
  params = _params(5)
  for setting in (dict(greedy=True), dict(temperature=0.7, top_p=0.9)):
    generate(BAG, params, PROMPTS, rng=jax.random.key(0), max_new_tokens=N, **setting)     # warm: batch 4
    with CompileCounter() as cc:
      generate(BAG, params, PROMPTS[:3], rng=jax.random.key(0), max_new_tokens=N, **setting)   # batch 3, new
    assert cc.count == 1, (setting, cc.count)
    with CompileCounter() as cc:
      generate(BAG, params, PROMPTS[:3], rng=jax.random.key(1), max_new_tokens=N, **{**setting, "min_p": 0.1})
    assert cc.count == 0


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
  with pytest.raises(UserError, match="cache_len=10 is too small"):
    beam_search(BAG, params, PROMPTS, num_beams=2, max_new_tokens=7, cache_len=10)


def test_decoding_imports_without_flax():
  code = "import sys, genjax.samplers.decoding; assert 'flax' not in sys.modules, 'flax was imported'"
  subprocess.run([sys.executable, "-c", code], check=True)


def test_lm_sample_text_stop_min_p_and_longer_context(capsys):
  """The LM's sample_text / the sample CLI: --stop strings end a row at their match (and the CLI says which),
  --min_p reaches the filter, --allow_longer_context lifts the trained-context guard knowingly."""
  from experiments.sample import print_texts
  from genjax.models import get_task
  from tests.test_transformer import _config, _params as lm_params
  c = _config()
  c.dataset.seq_len = 16                                 # the trained context: 8-byte prompt + 12 new is past it
  task, params, prompt = get_task(c), lm_params(), ["Hi there"]
  kw = dict(max_new_tokens=12, temperature=0.0, allow_longer_context=40)
  with pytest.raises(UserError, match=r"\(8 tokens\) \+ max_new_tokens=12 = 20 does not fit in the model's context "
                                      r"max_len=16"):
    task.sample_text(params, prompt, jax.random.key(0), max_new_tokens=12)
  free = task.sample_text(params, prompt, jax.random.key(0), **kw)[0]
  ascii_chars = [ch for ch in free[1:] if ord(ch) < 128]
  assert ascii_chars, free                               # random bytes: some are ASCII (a one-byte stop string)
  stop = ascii_chars[0]
  cut = task.sample_text(params, prompt, jax.random.key(0), stop=[stop, "\x00\x00"], **kw)[0]
  assert cut == free[:free.index(stop, 1) + 1] and len(cut) < len(free), (free, cut)
  print_texts(prompt, [cut], ["\x00\x00", stop])
  assert f"--- stopped at --stop={stop!r}" in capsys.readouterr().out
  # min_p = 1 keeps only the most likely byte: sampling at any temperature is then greedy.
  assert task.sample_text(params, prompt, jax.random.key(3), **{**kw, "temperature": 1.5}, min_p=1.0,
                          top_p=1.0)[0] == free


def test_prompt_ids_outside_the_vocabulary_are_refused_by_every_decoder():
  """The embedding gather would clamp a bad id (a wrong output, no error): each decoder refuses it on the host, with
  one message naming the id, its row and the vocabulary size (V, the number of logits the model returns)."""
  from genjax.samplers import speculative_generate
  params = _params()
  decoders = {
      "generate": lambda prompts: generate(BAG, params, prompts, max_new_tokens=2, greedy=True),
      "beam_search": lambda prompts: beam_search(BAG, params, prompts, max_new_tokens=2, num_beams=2),
      "speculative_generate": lambda prompts: speculative_generate(BAG, params, BAG, params, prompts,
                                                                   max_new_tokens=2, greedy=True),
  }
  for prompts, bad, row, position in (([[1, 2], [3, V]], V, 1, 1), ([[-1, 2]], -1, 0, 0)):
    message = (rf"^prompt token id {bad} \(row {row}, position {position}\) is outside the model's vocabulary "
               rf"\[0, {V}\) \(vocabulary size {V}\)$")
    for name, decode in decoders.items():
      with pytest.raises(UserError, match=message):
        decode(prompts)
  # The padding after a row's length is never read: any pad id there (here -1) is accepted.
  padded = np.array([[1, 2, 3], [4, -1, -1]], np.int32)
  out = generate(BAG, params, padded, prompt_lengths=[3, 1], max_new_tokens=2, greedy=True, pad_id=-1)
  assert out.tokens.shape == (2, 2)


def test_setting_messages_show_plain_numbers():
  """numpy 2 writes a float32 as `np.float32(2.0)`: messages show the number the user gave."""
  with pytest.raises(UserError) as e:
    DecodingSettings(max_new_tokens=4, top_p=2.0)
  assert str(e.value) == "top_p=2.0 must be in (0, 1] (1 = off); got 2.0"
  with pytest.raises(UserError, match=r"^num_beams=0 must be a positive int$"):
    DecodingSettings(max_new_tokens=4, num_beams=np.int64(0))
