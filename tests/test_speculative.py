"""Tests for genjax.samplers.speculative: greedy speculative decoding is token-identical to greedy `generate`
(mixed prompt lengths, EOS in some rows: per-row advance and cache rollback), sampling is exact (chi-square of the
output distribution against the target's filtered softmax, with a draft that disagrees often, at the first token,
inside the first target call and after it), log-probs are the target's raw log-softmax, acceptance is 1 for a
draft equal to the target, and bad input is refused naming the value.

Models: the "bag of tokens" LM of test_decoding (context-dependent, a token cache) and bigram tables (logits depend
on the last token only: the output is a Markov chain whose marginals are closed form).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.errors import UserError
from genjax.samplers import DecodingModel, generate, speculative_generate
from genjax.samplers.logits import filter_logits

from tests.test_decoding import BAG, EOS, PAD, PROMPTS, _params

N = 8


def _table_model(table):
  """Logits = table[last token]; the cache is unused but batch-first."""
  table = jnp.asarray(table, jnp.float32)
  return DecodingModel(lambda params, tokens, positions, cache: (table[tokens], cache),
                       lambda b, c: jnp.zeros((b, 1)), max_len=None)


# Logits = params[last token]: one model object for target and draft, so that the sampling tests share one program.
TABLE = DecodingModel(lambda params, tokens, positions, cache: (params[tokens], cache),
                      lambda b, c: jnp.zeros((b, 1)), max_len=None)
V, ROWS = 8, 4000
SAMPLING = dict(max_new_tokens=5, num_draft_tokens=3, temperature=0.9, top_k=6, top_p=0.95, min_p=0.05)


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_speculative_equals_greedy_generate(k):
  target, draft = _params(0, eos_bias=1.0), _params(8, eos_bias=1.0)      # a draft that often disagrees
  plain = generate(BAG, target, PROMPTS, greedy=True, max_new_tokens=N, eos_id=EOS, pad_id=PAD)
  spec = speculative_generate(BAG, target, BAG, draft, PROMPTS, greedy=True, max_new_tokens=N, num_draft_tokens=k,
                              eos_id=EOS, pad_id=PAD)
  lens = np.asarray(plain.lengths)
  assert lens.min() < N and lens.max() == N, lens        # EOS in some rows only
  np.testing.assert_array_equal(spec.tokens, plain.tokens)
  np.testing.assert_array_equal(spec.lengths, plain.lengths)
  np.testing.assert_allclose(spec.logprobs, plain.logprobs, rtol=1e-5, atol=1e-6)
  assert 0.0 < float(spec.acceptance_rate) < 1.0        # some drafts rejected: rollback was exercised
  same = speculative_generate(BAG, target, BAG, target, PROMPTS, greedy=True, max_new_tokens=N, num_draft_tokens=k,
                              eos_id=EOS, pad_id=PAD)
  np.testing.assert_array_equal(same.tokens, plain.tokens)
  assert float(same.acceptance_rate) == 1.0


def _chi_square_pvalue(counts, probs):
  stats = pytest.importorskip("scipy.stats")
  n = counts.sum()
  assert counts[probs == 0].sum() == 0                   # a filtered-out token never appears
  expected = probs * n
  big = expected >= 5                                    # pool the rare cells
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  obs, exp = obs[exp > 0], exp[exp > 0]
  chi2 = ((obs - exp) ** 2 / exp).sum()
  return stats.chi2.sf(chi2, len(obs) - 1)


def test_speculative_sampling_is_exact():
  rng = np.random.default_rng(0)
  target_table = jnp.asarray(rng.normal(size=(V, V)) * 1.5, jnp.float32)
  draft_table = jnp.asarray(rng.normal(size=(V, V)) * 1.5, jnp.float32)     # unrelated: it disagrees often
  out = speculative_generate(TABLE, target_table, TABLE, draft_table, [[3]] * ROWS, rng=jax.random.key(0), **SAMPLING)
  tokens = np.asarray(out.tokens)
  assert 0.1 < float(out.acceptance_rate) < 0.9, float(out.acceptance_rate)
  # The target's filtered transition matrix: the output must be this Markov chain started at token 3.
  P = np.asarray(jax.nn.softmax(filter_logits(target_table, SAMPLING["temperature"], SAMPLING["top_k"],
                                              SAMPLING["top_p"], SAMPLING["min_p"])), np.float64)
  marginal = P[3]
  for t in range(5):     # t = 0: first token; 1, 2: accepted drafts or residual draws; 3, 4: later target calls
    p = _chi_square_pvalue(np.bincount(tokens[:, t], minlength=V), marginal)
    assert p > 1e-4, (t, p)
    marginal = marginal @ P
  joint = (P[3][:, None] * P).reshape(-1)                # (token 0, token 1) pairs
  assert _chi_square_pvalue(np.bincount(tokens[:, 0] * V + tokens[:, 1], minlength=V * V), joint) > 1e-4
  # Log-probs: the target's raw log-softmax of each chosen token.
  raw = np.asarray(jax.nn.log_softmax(target_table))
  prev = np.concatenate([np.full((ROWS, 1), 3), tokens[:, :-1]], axis=1)
  np.testing.assert_allclose(out.logprobs, raw[prev, tokens], rtol=1e-5, atol=1e-6)


def test_identical_draft_accepts_everything_and_pads_after_eos():
  table = jnp.asarray(np.random.default_rng(1).normal(size=(V, V)), jnp.float32)
  out = speculative_generate(TABLE, table, TABLE, table, [[3]] * ROWS, rng=jax.random.key(2), eos_id=5, pad_id=0,
                             **SAMPLING)                 # the same program as the test above
  assert float(out.acceptance_rate) == 1.0
  tokens, lens = np.asarray(out.tokens), np.asarray(out.lengths)
  assert lens.min() < 5 and lens.max() == 5, lens
  ends = tokens[np.arange(ROWS), lens - 1]
  assert (ends[lens < 5] == 5).all() and not (tokens[lens == 5, :4] == 5).any()
  assert (tokens[np.arange(5)[None, :] >= lens[:, None]] == 0).all()


def test_speculative_refuses_bad_input():
  table = _table_model(np.zeros((4, 4)))
  shared = DecodingModel(table.step_fn, lambda b, c: {"index": jnp.zeros((), jnp.int32)})
  with pytest.raises(UserError, match=r"num_draft_tokens=0 must be a positive int"):
    speculative_generate(table, None, table, None, [[1]], greedy=True, max_new_tokens=2, num_draft_tokens=0)
  with pytest.raises(UserError, match=r"draft.init_cache\(1, 6\) leaf \['index'\] has shape \(\)"):
    speculative_generate(table, None, shared, None, [[1]], greedy=True, max_new_tokens=2)
  with pytest.raises(UserError, match=r"top_p=2.0 must be in \(0, 1\]"):
    speculative_generate(table, None, table, None, [[1]], rng=jax.random.key(0), max_new_tokens=2, top_p=2.0)
  limited = table._replace(max_len=4)
  with pytest.raises(UserError, match=r"max_new_tokens=4 = 5 does not fit in the model's context max_len=4"):
    speculative_generate(limited, None, table, None, [[1]], greedy=True, max_new_tokens=4)
  with pytest.raises(UserError, match=r"vocabulary \(5 logits\) differs from the target's \(4\)"):
    speculative_generate(table, None, _table_model(np.zeros((5, 5))), None, [[1]], greedy=True, max_new_tokens=2)
