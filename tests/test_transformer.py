"""Tests for the transformer LM family, its KV-cache decoding and the byte tokenizer.

Numbers used below: the pydoc byte stream (CPython's `pydoc_data.topics`, topics joined in sorted key order) has a
byte-unigram entropy of 4.70 bits per byte (computed in `_unigram_bits`); a model that trains "clearly better than
unigram" must get below it.
"""
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import lm as lm_configs
from experiments.configs.common import base_config
from genjax import tokenizer as tok_lib
from genjax.errors import ConfigError
from genjax.models import get_task
from genjax.models import transformer as T
from genjax.samplers import generate

CFG = T.LMConfig(embed_dim=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=40)


@functools.lru_cache(maxsize=None)
def _jitted(cfg):
  """(init, apply, metrics) of TransformerLM(cfg), jitted: eager Flax would compile every op per shape."""
  module = T.TransformerLM(cfg)
  init = jax.jit(lambda key: module.init(key, jnp.zeros((1, 4), jnp.int32))["params"])
  return init, jax.jit(module.apply), jax.jit(functools.partial(T.lm_metrics, module))


def _params(cfg=CFG, seed=0):
  return nn.unbox(_jitted(cfg)[0](jax.random.key(seed)))


def _apply(params, *args, cfg=CFG):
  return _jitted(cfg)[1]({"params": params}, *args)


def _pydoc_bytes() -> np.ndarray:
  from pydoc_data.topics import topics
  return np.frombuffer("".join(topics[k] for k in sorted(topics)).encode("utf-8"), np.uint8)


def _unigram_bits(data: np.ndarray) -> float:
  p = np.bincount(data, minlength=256) / data.size
  p = p[p > 0]
  return float(-(p * np.log2(p)).sum())


# -------------------------------------------------------------------------------------------- tokenizer --------
@pytest.mark.parametrize("text", ["", "hello", "héllo wörld", "日本語のテキスト", "emoji 🦜🧪 and \x00 nul",
                                  "e\u0301 combining", "tabs\tnew\nlines\r\n", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"])
def test_tokenizer_round_trips_utf8(text):
  tok = tok_lib.ByteTokenizer()
  ids = tok.encode(text)
  assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
  assert tok.decode(ids) == text
  assert tok.decode(tok.encode(text, add_bos=True, add_eos=True) + [65]) == text   # specials skipped, EOS stops


def test_tokenizer_random_unicode_and_batches():
  rng = np.random.default_rng(0)
  tok = tok_lib.ByteTokenizer()
  chars = [c for c in map(chr, rng.integers(1, 0x10FFFF, 3000)) if not 0xD800 <= ord(c) < 0xE000]
  text = "".join(chars)
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode([0xE6, 0x97]) == "\ufffd"          # a truncated 3-byte character decodes to U+FFFD
  ids, lengths = tok.encode_batch(["ab", "", "ü"], add_bos=True)
  np.testing.assert_array_equal(lengths, [3, 1, 3])
  np.testing.assert_array_equal(ids, [[257, 97, 98], [257, 256, 256], [257, 195, 188]])
  assert tok_lib.VOCAB_SIZE == 259 and tok_lib.padded_vocab_size(64) == 320 and tok_lib.padded_vocab_size(128) == 384


# ---------------------------------------------------------------------------------------------- modules --------
def test_rope_scores_depend_only_on_relative_position():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 16))
  def score(m, n):
    pm, pn = jnp.array([[m]]), jnp.array([[n]])
    return float(jnp.sum(T.rope(q, pm, 10000.0) * T.rope(k, pn, 10000.0)))
  np.testing.assert_allclose(score(3, 1), score(10, 8), rtol=1e-4)
  np.testing.assert_allclose(score(0, 0), float(jnp.sum(q * k)), rtol=1e-5)   # position 0 is the identity
  assert abs(score(5, 1) - score(5, 2)) > 1e-3


def test_params_have_logical_axes_and_shard_on_a_mesh():
  from genjax.train import parallel
  boxed = _jitted(CFG)[0](jax.random.key(0))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
  allowed = {"vocab", "embed", "heads", "kv", "mlp", "norm"}
  assert {n for x in leaves for n in x.names} <= allowed
  mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  shardings = parallel.param_shardings(boxed, mesh)
  P = jax.sharding.PartitionSpec
  assert shardings["embedding"].spec == P("tensor", "fsdp")
  assert shardings["block_0"]["mlp_in"]["kernel"].spec == P("fsdp", "tensor")
  assert shardings["block_0"]["attention"]["query"]["kernel"].spec == P("fsdp", "tensor", None)
  placed = jax.device_put(nn.unbox(boxed), shardings)
  tokens = jax.random.randint(jax.random.key(1), (8, 9), 0, 256)
  loss = _jitted(CFG)[2](placed, tokens)["loss"]
  np.testing.assert_allclose(loss, _jitted(CFG)[2](nn.unbox(boxed), tokens)["loss"], rtol=1e-5)


def test_loss_metrics_closed_form_with_zero_head():
  params = _params()
  params["head"]["kernel"] = jnp.zeros_like(params["head"]["kernel"])
  tokens = jax.random.randint(jax.random.key(1), (3, 17), 0, 256)
  m = _jitted(CFG)[2](params, tokens)
  # Zero logits are a uniform distribution over the padded vocabulary: loss = ln V, perplexity = V.
  np.testing.assert_allclose(m["loss"], math.log(CFG.vocab_size), rtol=1e-6)
  np.testing.assert_allclose(m["bits_per_byte"], math.log2(CFG.vocab_size), rtol=1e-6)
  np.testing.assert_allclose(m["perplexity"], CFG.vocab_size, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg16 = T.LMConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  params = _params()
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 256)
  l32, _ = _apply(params, tokens)
  l16, _ = _apply(params, tokens, cfg=cfg16)
  shapes = jax.eval_shape(lambda: nn.unbox(T.TransformerLM(cfg16).init(jax.random.key(0), tokens)))
  assert l16.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
  # bf16 has an 8-bit mantissa: logits of order 1 agree to a few 1e-2.
  assert float(jnp.max(jnp.abs(l16 - l32))) < 0.1


# --------------------------------------------------------------------------------------------- decoding --------
def test_cached_logits_equal_full_forward_at_every_position():
  params = _params()
  tokens = jax.random.randint(jax.random.key(3), (3, 20), 0, 256)
  full, _ = _apply(params, tokens)
  # Prefill 7 tokens into a 24-slot cache, then feed the rest one at a time; rows at different offsets.
  cache = T.init_cache(CFG, 3, 24)
  pos = jnp.broadcast_to(jnp.arange(7), (3, 7))
  pre, cache = _apply(params, tokens[:, :7], pos, cache)
  steps = [pre]
  for t in range(7, 20):
    logits, cache = _apply(params, tokens[:, t:t + 1], jnp.full((3, 1), t), cache)
    steps.append(logits)
  cached = jnp.concatenate(steps, axis=1)
  # Tolerance 1e-4 absolute (float32; logits are O(1), differences come only from summation order).
  np.testing.assert_allclose(cached, full, atol=1e-4, rtol=0)


TEXTS = ["The quick brown", "a", "jumps over the"]
IDS, LENGTHS = tok_lib.ByteTokenizer().encode_batch(TEXTS, pad_to=16)
# Both tests below use these shapes and max_new_tokens, so they share one compilation (greedy is a runtime value).
DECODE = dict(max_new_tokens=12, eos_id=tok_lib.EOS_ID, pad_id=tok_lib.PAD_ID)


def test_greedy_decode_equals_argmax_over_full_recomputation():
  params = _params(seed=1)
  out = generate(T.decoding_model(CFG), params, IDS, prompt_lengths=LENGTHS, greedy=True, **DECODE)
  allowed = np.zeros(CFG.vocab_size, bool)
  allowed[:256] = allowed[tok_lib.EOS_ID] = True
  for row in range(len(TEXTS)):
    prompt = IDS[row, :LENGTHS[row]].tolist()
    seq = list(prompt)
    for _ in range(12):
      # Full forward over the sequence padded to 28 (causal: the padding cannot change earlier logits).
      logits, _ = _apply(params, jnp.asarray([seq + [0] * (28 - len(seq))]))
      seq.append(int(jnp.argmax(jnp.where(allowed, logits[0, len(seq) - 1], -jnp.inf))))
      if seq[-1] == tok_lib.EOS_ID:
        break
    new = seq[len(prompt):]
    np.testing.assert_array_equal(out.tokens[row, :len(new)], new)
    assert int(out.lengths[row]) == len(new)


def test_transformer_sampling_is_batch_invariant():
  params, model = _params(seed=2), T.decoding_model(CFG)
  kw = dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.2, **DECODE)
  batch = generate(model, params, IDS, rng=jax.random.key(5), prompt_lengths=LENGTHS, **kw)
  for row in range(len(TEXTS)):
    alone = generate(model, params, IDS[row:row + 1], rng=jax.random.key(5), prompt_lengths=LENGTHS[row:row + 1],
                     row_ids=[row], **kw)
    np.testing.assert_array_equal(alone.tokens[0], batch.tokens[row])
  assert not np.array_equal(batch.tokens[0], batch.tokens[2])
  toks = np.asarray(batch.tokens)
  assert np.all((toks < 256) | (toks == tok_lib.EOS_ID) | (toks == tok_lib.PAD_ID))   # BOS/padding ids masked


# ------------------------------------------------------------------------------- scan, remat, attention --------
DEEP = T.LMConfig(embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_len=40)


def _loss_and_grads(cfg, params, tokens):
  return jax.jit(jax.value_and_grad(lambda p: T.lm_metrics(T.TransformerLM(cfg), p, tokens)["loss"]))(params)


def test_scan_remat_and_dot_product_attention_equal_the_unrolled_reference():
  params = _params(DEEP, seed=3)
  tokens = jax.random.randint(jax.random.key(4), (2, 13), 0, 256)
  loss, grads = _loss_and_grads(DEEP, params, tokens)
  for kw in (dict(remat="full"), dict(scan_layers=True, remat="dots_saveable"), dict(attention="dot_product")):
    cfg = T.LMConfig(**{**DEEP.__dict__, **kw})
    stacked = T.stack_layers(params, DEEP.num_layers) if cfg.scan_layers else params
    traced = str(jax.make_jaxpr(jax.grad(lambda p: T.lm_metrics(T.TransformerLM(cfg), p, tokens)["loss"]))(stacked))
    assert ("remat" in traced) == (cfg.remat != "none")      # the backward really recomputes (jax.checkpoint)
    if kw == dict(remat="full"):
      continue        # remat changes what is stored, not the math: its numbers are checked with dots_saveable
    loss2, grads2 = _loss_and_grads(cfg, stacked, tokens)
    if cfg.scan_layers:
      grads2 = T.unstack_layers(grads2, DEEP.num_layers)
    # float32; only the summation order differs (scan: the same ops in a loop; remat: recomputed, not changed).
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), grads2, grads)


def test_scanned_layers_stack_params_on_a_layers_axis_and_decode_like_unrolled():
  from genjax.train import parallel
  cfg = T.LMConfig(**{**DEEP.__dict__, "scan_layers": True, "attention": "dot_product"})
  boxed = _jitted(cfg)[0](jax.random.key(0))
  query = boxed["blocks"]["attention"]["query"]["kernel"]
  assert query.names == ("layers", "embed", "heads", "kv") and query.value.shape == (2, 32, 4, 8)
  mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  spec = parallel.param_shardings(boxed, mesh)["blocks"]["attention"]["query"]["kernel"].spec
  assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  cache = T.init_cache(cfg, 3, 20)
  assert cache["blocks"]["k"].shape == (3, 2, 2, 20, 8)          # batch, layers, kv heads, slots, head dim
  params = _params(DEEP, seed=5)
  kw = dict(prompt_lengths=LENGTHS, greedy=True, **DECODE)
  unrolled = generate(T.decoding_model(DEEP), params, IDS, **kw)
  scanned = generate(T.decoding_model(cfg), T.stack_layers(params, 2), IDS, **kw)
  np.testing.assert_array_equal(scanned.tokens, unrolled.tokens)


# -------------------------------------------------------------------------------------- task and configs --------
def _config(**model):
  c = base_config()
  c.family = "lm"
  c.num_train_steps = 200
  c.dataset.update(seq_len=40, tokenizer="")      # the text fields experiments/configs/lm.py declares
  c.model = ml_collections.ConfigDict(dict(init_from="", embed_dim=32, num_layers=2, num_heads=4, mlp_dim=64,
                                           max_len=40, **model))
  return c


def test_sample_text_options_and_errors():
  c = _config()
  task = get_task(c)
  params = _params()
  out = task.sample_text(params, ["Hi", ""], jax.random.key(0), max_new_tokens=5, temperature=0.0)
  assert len(out) == 2 and all(isinstance(s, str) for s in out)
  assert task.sample_text(params, ["Hi", ""], jax.random.key(1), max_new_tokens=5, temperature=0.0) == out
  sampled = task.sample_text(params, ["Hi", ""], jax.random.key(1), max_new_tokens=5, top_k=50)
  assert sampled != out and len(sampled) == 2
  beams = task.sample_text(params, ["Hi"], jax.random.key(0), max_new_tokens=4, num_beams=3)
  assert len(beams) == 1
  with pytest.raises(ValueError, match=r"unknown sampling options \['sampler'\]"):
    task.sample_text(params, ["Hi"], jax.random.key(0), sampler="ddim")
  with pytest.raises(ValueError, match=r"41 tokens.*max_len=40"):
    task.sample_text(params, ["x" * 41], jax.random.key(0), max_new_tokens=3)
  with pytest.raises(ValueError, match="unknown config.model fields"):
    get_task(_config(hidden=3))


def test_config_variants():
  for name in ("pydoc", "tiny_shakespeare", "gpt_small"):
    c = lm_configs.get_config(name)
    cfg = T.lm_config(c)
    assert c.family == "lm" and c.dataset.seq_len <= cfg.max_len
  c = lm_configs.get_config("gpt_small")
  assert c.compute_dtype == "bfloat16" and c.mesh.fsdp == -1
  shapes = jax.eval_shape(lambda: _params(T.lm_config(c)))
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert 80e6 < n < 110e6, n
  with pytest.raises(ValueError, match="unknown variant"):
    lm_configs.get_config("gpt_huge")


def test_every_lm_variant_declares_the_fields_lm_config_and_the_data_read():
  declared = {f.name: f.default for f in dataclasses.fields(T.LMConfig) if f.name not in T.DERIVED_FIELDS}
  for name in lm_configs.VARIANTS:
    c = lm_configs.get_config(name)
    assert {"seq_len", "tokenizer"} <= set(c.dataset) and "init_from" in c.model, name
    if name != "hf_finetune":                                    # every LMConfig field, as lm_config reads it
      assert set(c.model) == set(declared) | {"init_from"}, name
  chosen = ("embed_dim", "num_layers", "num_heads", "mlp_dim", "max_len")      # what pydoc sets; the rest: defaults
  c = lm_configs.get_config("pydoc")
  assert {k: c.model[k] for k in declared if k not in chosen} == {k: declared[k] for k in declared if k not in chosen}
  with pytest.raises(ConfigError, match=r"config.model.init_from is not set: .*--config.model.init_from=DIR"):
    T.lm_config(lm_configs.get_config("hf_finetune"))            # fine-tuning needs its checkpoint
  c = _config()
  del c.dataset["seq_len"]
  with pytest.raises(ConfigError, match=r"^config.dataset.seq_len is not set; the lm family needs it"):
    T.lm_config(c)
  c = _config()
  c.compute_dtype = "float16"
  with pytest.raises(ConfigError, match=r"compute_dtype='float16' is not one of \['bfloat16', 'float32'\]"):
    T.lm_config(c)
  c.compute_dtype = "float32"
  c.model = ml_collections.ConfigDict(dict(c.model, num_layers="2"))
  with pytest.raises(ConfigError, match=r"config.model.num_layers='2' must be an int"):
    T.lm_config(c)
  assert T.lm_config(_config(rope_base=500)).rope_base == 500.0     # converted to the field's type


def test_task_starts_from_the_pretrained_it_is_given_and_exports():
  """The models never read a checkpoint themselves: `init_from` needs the `Pretrained` a launcher resolved (with
  genjax.interop.hf.pretrained_for); its architecture, params and tokenizer are the task's."""
  from genjax.core.task import Pretrained
  from genjax.errors import UserError
  c = _config()
  c.model = ml_collections.ConfigDict({"init_from": "a_checkpoint"})      # the architecture is the checkpoint's
  with pytest.raises(ConfigError, match=r"init_from='a_checkpoint' is read by genjax.interop: pass pretrained="):
    get_task(c)
  arch = dataclasses.replace(T.lm_config(_config()), param_dtype="bfloat16")
  tok = tok_lib.ByteTokenizer()
  pretrained = Pretrained("a_checkpoint", arch, load_params=lambda cfg: {"from": cfg}, tokenizer=tok)
  task = get_task(c, pretrained=pretrained)
  params = task.init(jax.random.key(0), {"tokens": np.zeros((1, 17), np.int32)})
  assert params["from"] == dataclasses.replace(arch, param_dtype="float32")    # trained with float32 params
  assert task.sample_text.keywords["tokenizer"] is tok
  assert (task.export.format, task.export.model_config, task.export.assets) == ("huggingface", params["from"],
                                                                                "a_checkpoint")
  assert get_task(_config()).export.assets is None and get_task(_config()).capabilities() == (
      "sample_text", "evaluate", "export")
  c.model.num_layers = 7
  with pytest.raises(UserError, match=r"config.model fields \['num_layers'\] contradict the checkpoint"):
    get_task(c, pretrained=pretrained)
  with pytest.raises(ConfigError, match="the 'vae' family cannot start from outside weights"):
    from tests.util import tiny_vae_config
    get_task(tiny_vae_config(), pretrained=pretrained)


def test_decoding_limit_is_the_trained_context_unless_asked_for_longer():
  c = lm_configs.get_config("pydoc")
  cfg = T.lm_config(c)
  assert (cfg.context_len, cfg.max_len) == (c.dataset.seq_len, 512) == (128, 512)
  assert T.decoding_model(cfg).max_len == 128
  assert T.decoding_model(cfg, max_len=512).max_len == 512
  with pytest.raises(ValueError, match=r"max_len=513 must be in \[1, model max_len=512\]"):
    T.decoding_model(cfg, max_len=513)
  assert T.decoding_model(CFG).max_len == CFG.max_len      # no trained context recorded: the cache limit


def test_trains_below_unigram_entropy_on_pydoc():
  data = _pydoc_bytes()
  unigram = _unigram_bits(data)
  assert abs(unigram - 4.70) < 0.01
  c = _config()
  c.optimizer.learning_rate = 3e-3
  task = get_task(c)
  seq, batch = 32, 16
  held_out = data[-(8 * (seq + 1)):].reshape(8, seq + 1).astype(np.int32)
  starts = np.random.default_rng(0).integers(0, data.size - held_out.size - seq - 1, (150, batch))
  windows = data[starts[..., None] + np.arange(seq + 1)].astype(np.int32)
  params = nn.unbox(jax.jit(task.init)(jax.random.key(0), {"tokens": windows[0]}))
  tx = task.phases[0].optimizer
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, tokens):
    (loss, m), g = jax.value_and_grad(task.phases[0].loss_fn, has_aux=True)(params, {"tokens": tokens}, None, 0)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, m

  for tokens in windows:
    params, opt, m = step(params, opt, tokens)
  bits = float(jax.jit(task.evaluate)(params, {"tokens": held_out}, None)["bits_per_byte"])
  assert bits < unigram - 0.3, (bits, unigram)
