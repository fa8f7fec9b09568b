"""Decoder-only transformer LM family ("lm"): RoPE, pre-norm RMSNorm, causal attention, GELU MLP, byte vocabulary.

    task = genjax.models.get_task(config)        # config.family == "lm"; see experiments/configs/lm.py
    cfg = lm_config(config)                      # frozen LMConfig from config.model.* and config.compute_dtype
    logits, _ = TransformerLM(cfg).apply({"params": params}, tokens)            # full forward, [B, T, V] float32
    logits, cache = TransformerLM(cfg).apply({"params": params}, tok, pos, cache)   # cached step
    out = genjax.samplers.generate(decoding_model(cfg), params, prompts, rng, max_new_tokens=100)

Params carry logical axis names (`nn.with_logical_partitioning`): "vocab", "embed", "heads", "kv", "mlp", "norm";
the loop maps them to mesh axes and unboxes them (the functions here also accept boxed params). Activations run in
`config.compute_dtype` (bfloat16 or float32); params, norms, softmax and logits stay float32.

KV cache: {"block_i": {"k", "v": [B, cache_len, heads, head_dim]}}; a step writes its keys/values at slot ==
position and a query at position q attends to slots <= q, which is the `genjax.samplers.decoding` contract.
Loss: next-byte cross-entropy on `batch["tokens"]` [B, seq_len + 1]; metrics loss, bits_per_byte, perplexity.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from genjax import tokenizer as tok_lib
from genjax.samplers.decoding import DecodingModel, beam_search, generate
from genjax.train.optim import make_optimizer
from genjax.train.task import Phase, Task

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SAMPLE_OPTIONS = {"max_new_tokens": 200, "temperature": 0.8, "top_k": 0, "top_p": 0.95, "repetition_penalty": 1.0,
                  "presence_penalty": 0.0, "frequency_penalty": 0.0, "num_beams": 1, "length_penalty": 1.0}


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab_size: int = tok_lib.padded_vocab_size(64)
  embed_dim: int = 128
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 512
  max_len: int = 512             # the longest KV cache decoding may use (RoPE has no table of its own)
  rope_base: float = 10000.0
  dtype: str = "float32"

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads


def lm_config(config) -> LMConfig:
  """LMConfig from `config.model.*` (missing fields keep their defaults) and `config.compute_dtype`."""
  fields = {f.name for f in dataclasses.fields(LMConfig)} - {"dtype"}
  model = dict(config.model) if "model" in config else {}
  unknown = set(model) - fields
  if unknown:
    raise ValueError(f"unknown config.model fields {sorted(unknown)}; valid: {sorted(fields)}")
  dtype = config.get("compute_dtype", "float32")
  if dtype not in DTYPES:
    raise ValueError(f"compute_dtype={dtype!r} is not one of {sorted(DTYPES)}")
  cfg = LMConfig(**model, dtype=dtype)
  if cfg.embed_dim % cfg.num_heads or cfg.head_dim % 2:
    raise ValueError(f"embed_dim={cfg.embed_dim} must split into num_heads={cfg.num_heads} heads of even size")
  if cfg.vocab_size < tok_lib.VOCAB_SIZE:
    raise ValueError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {tok_lib.VOCAB_SIZE}")
  return cfg


def _init(axes, init=None):
  return nn.with_logical_partitioning(init or nn.initializers.lecun_normal(), axes)


def _residual_init(cfg: "LMConfig", axes):
  """Projections back into the residual stream: LeCun normal scaled by 1/sqrt(2 num_layers) (GPT-2 style), so the
  residual stream's variance at init does not grow with depth."""
  return _init(axes, nn.initializers.variance_scaling(1.0 / (2 * cfg.num_layers), "fan_in", "truncated_normal"))


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding of x [B, T, H, D] at int positions [B, T] (rotate-half form, float32 math)."""
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, :, None, None] * freqs
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
  dtype: Any = jnp.float32
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", _init(("norm",), nn.initializers.ones), (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale).astype(self.dtype)


class Attention(nn.Module):
  cfg: LMConfig

  @nn.compact
  def __call__(self, x, positions, cache: Optional[dict]):
    cfg, dtype = self.cfg, DTYPES[self.cfg.dtype]
    shape = (cfg.num_heads, cfg.head_dim)
    dense = functools.partial(nn.DenseGeneral, features=shape, use_bias=False, dtype=dtype,
                              param_dtype=jnp.float32, kernel_init=_init(("embed", "heads", "kv")))
    q = rope(dense(name="query")(x), positions, cfg.rope_base)
    k = rope(dense(name="key")(x), positions, cfg.rope_base)
    v = dense(name="value")(x)
    if cache is None:
      keys, values, key_pos = k, v, positions
    else:
      rows = jnp.arange(x.shape[0])[:, None]
      keys = cache["k"].at[rows, positions].set(k.astype(cache["k"].dtype))
      values = cache["v"].at[rows, positions].set(v.astype(cache["v"].dtype))
      key_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), keys.shape[:2])
      cache = {"k": keys, "v": values}
    scores = jnp.einsum("bthd,bshd->bhts", q, keys.astype(dtype),
                        preferred_element_type=jnp.float32) / math.sqrt(cfg.head_dim)
    mask = key_pos[:, None, None, :] <= positions[:, None, :, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bhts,bshd->bthd", probs, values.astype(dtype))
    out = nn.DenseGeneral(cfg.embed_dim, axis=(-2, -1), use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                          kernel_init=_residual_init(cfg, ("heads", "kv", "embed")), name="out")(out)
    return out, cache


class Block(nn.Module):
  cfg: LMConfig

  @nn.compact
  def __call__(self, x, positions, cache: Optional[dict]):
    cfg, dtype = self.cfg, DTYPES[self.cfg.dtype]
    h, cache = Attention(cfg, name="attention")(RMSNorm(dtype, name="attention_norm")(x), positions, cache)
    x = x + h
    h = RMSNorm(dtype, name="mlp_norm")(x)
    h = nn.Dense(cfg.mlp_dim, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=_init(("embed", "mlp")), name="mlp_in")(h)
    h = nn.Dense(cfg.embed_dim, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=_residual_init(cfg, ("mlp", "embed")), name="mlp_out")(nn.gelu(h))
    return x + h, cache


class TransformerLM(nn.Module):
  """tokens [B, T] int32 (+ positions [B, T], default arange; + cache) -> (float32 logits [B, T, V], cache)."""
  cfg: LMConfig

  @nn.compact
  def __call__(self, tokens, positions=None, cache: Optional[dict] = None):
    cfg, dtype = self.cfg, DTYPES[self.cfg.dtype]
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be int [batch, length], got shape {tokens.shape}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    embedding = self.param("embedding", _init(("vocab", "embed"), nn.initializers.normal(1.0)),
                           (cfg.vocab_size, cfg.embed_dim), jnp.float32)
    x = jnp.take(embedding, tokens, axis=0).astype(dtype)
    new_cache = {}
    for i in range(cfg.num_layers):
      name = f"block_{i}"
      x, new_cache[name] = Block(cfg, name=name)(x, positions, None if cache is None else cache[name])
    x = RMSNorm(jnp.float32, name="final_norm")(x)
    logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                      kernel_init=_init(("embed", "vocab")), name="head")(x)
    return logits, (new_cache if cache is not None else None)


def init_cache(cfg: LMConfig, batch_size: int, cache_len: int) -> dict:
  shape = (batch_size, cache_len, cfg.num_heads, cfg.head_dim)
  zeros = lambda: jnp.zeros(shape, DTYPES[cfg.dtype])
  return {f"block_{i}": {"k": zeros(), "v": zeros()} for i in range(cfg.num_layers)}


@functools.lru_cache(maxsize=None)
def decoding_model(cfg: LMConfig) -> DecodingModel:
  """The `genjax.samplers.decoding` interface for this LM (one instance per config, so compilations are reused).

  Logits of ids the tokenizer never produces (PAD, BOS, the vocabulary padding) are -inf: only bytes and EOS are
  generated.
  """
  module = TransformerLM(cfg)
  allowed = np.zeros((cfg.vocab_size,), bool)
  allowed[:tok_lib.NUM_BYTES] = True
  allowed[tok_lib.EOS_ID] = True

  def step_fn(params, tokens, positions, cache):
    logits, cache = module.apply({"params": params}, tokens, positions, cache)
    return jnp.where(jnp.asarray(allowed), logits, -jnp.inf), cache

  return DecodingModel(step_fn=step_fn, init_cache=functools.partial(init_cache, cfg), max_len=cfg.max_len)


def lm_metrics(module: TransformerLM, params, tokens: jax.Array) -> dict:
  """Mean next-token cross-entropy (nats) of tokens [B, L+1] and its bits per byte and perplexity."""
  logits, _ = module.apply({"params": nn.unbox(params)}, tokens[:, :-1])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  return {"loss": loss, "bits_per_byte": loss / math.log(2.0), "perplexity": jnp.exp(loss)}


def sample_text(cfg: LMConfig, params, prompts, rng, **options) -> list[str]:
  """Continuations of text prompts (an empty prompt starts from a newline). Options and defaults:
  `SAMPLE_OPTIONS`; `num_beams > 1` returns the best beam (deterministic). A row stops early at EOS or when
  prompt + continuation fill `max_len` positions; a prompt longer than `max_len` bytes is a ValueError."""
  unknown = set(options) - set(SAMPLE_OPTIONS)
  if unknown:
    raise ValueError(f"unknown sampling options {sorted(unknown)}; valid: {sorted(SAMPLE_OPTIONS)}")
  if isinstance(prompts, str) or not prompts:
    raise ValueError(f"prompts must be a non-empty list of str, got {prompts!r}")
  o = {**SAMPLE_OPTIONS, **options}
  tokenizer = tok_lib.ByteTokenizer()
  ids = [tokenizer.encode(p) or [ord("\n")] for p in prompts]
  width = -(-max(len(i) for i in ids) // 64) * 64          # bucket the prompt width: fewer compilations
  tokens = np.full((len(ids), width), tok_lib.PAD_ID, np.int32)
  for r, i in enumerate(ids):
    tokens[r, :len(i)] = i
  lengths = np.array([len(i) for i in ids], np.int32)
  model, params = decoding_model(cfg), nn.unbox(params)
  new = int(o["max_new_tokens"])
  cache_len = min(cfg.max_len, width + new - 1)
  if int(o["num_beams"]) > 1:
    out = beam_search(model, params, tokens, prompt_lengths=lengths, num_beams=int(o["num_beams"]),
                      max_new_tokens=new, length_penalty=o["length_penalty"], eos_id=tok_lib.EOS_ID,
                      pad_id=tok_lib.PAD_ID, cache_len=cache_len)
    generated = np.asarray(out.sequences[:, 0])
  else:
    out = generate(model, params, tokens, rng, prompt_lengths=lengths, max_new_tokens=new,
                   temperature=o["temperature"], top_k=o["top_k"], top_p=o["top_p"],
                   repetition_penalty=o["repetition_penalty"], presence_penalty=o["presence_penalty"],
                   frequency_penalty=o["frequency_penalty"], eos_id=tok_lib.EOS_ID, pad_id=tok_lib.PAD_ID,
                   cache_len=cache_len)
    generated = np.asarray(out.tokens)
  return [tokenizer.decode(row) for row in generated]


def task(config) -> Task:
  """The "lm" family: one phase minimising next-byte cross-entropy."""
  cfg = lm_config(config)
  module = TransformerLM(cfg)

  def init(rng, example_batch):
    tokens = jnp.asarray(example_batch["tokens"])
    if tokens.ndim != 2 or tokens.shape[1] < 2:
      raise ValueError(f"batch['tokens'] must be int [batch, seq_len + 1], got shape {tokens.shape}")
    return module.init(rng, tokens[:1, :-1])["params"]

  def loss_fn(params, batch, rng, step):
    del rng, step
    metrics = lm_metrics(module, params, batch["tokens"])
    return metrics["loss"], metrics

  def evaluate(params, batch, rng):
    del rng
    return lm_metrics(module, params, batch["tokens"])

  phase = Phase("lm", loss_fn, optimizer=make_optimizer(config.optimizer, config.num_train_steps))
  return Task(init=init, phases=(phase,), sample_text=functools.partial(sample_text, cfg), evaluate=evaluate)
