"""The decoder-only LM's configuration and Flax modules: one config field per architectural choice.

    cfg = LMConfig(embed_dim=64, num_layers=2, num_heads=4, mlp_dim=256)            # genjax's own LM (below)
    cfg = LMConfig(..., norm="layer", norm_eps=1e-5, positions="learned", use_bias=True, tie_embeddings=True)  # GPT-2
    cfg = LMConfig(..., mlp="swiglu", num_kv_heads=2, rope_base=500000.0, norm_eps=1e-5)              # Llama family
    logits, cache = TransformerLM(cfg).apply({"params": params}, tokens, positions, cache)

Defaults are genjax's own LM: RoPE, pre-norm RMSNorm, GELU (tanh approximation) MLP, no biases, untied head.
GPT-2: learned absolute positions, LayerNorm with bias, GELU-tanh MLP, biases on every projection, tied head.
Llama family: RoPE (`rope_base` = HF `rope_theta`, rotate-half form), RMSNorm, SwiGLU MLP, grouped-query attention
(`num_kv_heads` < `num_heads`; query head h reads key/value head h // (num_heads / num_kv_heads)), q/k/v biases only
(`qkv_bias`, as in Qwen2), tied or untied head.

Params carry logical axis names (`nn.with_logical_partitioning`): "vocab", "embed", "heads", "kv", "mlp", "norm"
(the learned position table is (None, "embed")). Params are stored in `param_dtype` (float32 unless a checkpoint is
kept in bfloat16 / float16); activations run in `dtype`; norms, softmax and logits are computed in float32.
`token_vocab_size` > 0 names the real vocabulary of a padded embedding table: the logits of the padding ids are -inf.

How it runs, the same function of the same params up to summation order: `scan_layers` (nn.scan over the blocks;
params stacked on a leading "layers" axis under "blocks", see `stack_layers` / `unstack_layers`; KV cache
[batch, num_layers, ...]), `remat` ("full" or "dots_saveable": `jax.checkpoint` around each block), `attention`
("dot_product": `jax.nn.dot_product_attention`, which XLA or cuDNN implement, instead of the float32 einsum).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from genjax import tokenizer as tok_lib
from genjax.dtypes import COMPUTE_DTYPES, PARAM_DTYPES

DTYPES = COMPUTE_DTYPES                                                          # compute dtypes
NORMS = ("rms", "layer")
MLPS = ("gelu", "swiglu")
POSITIONS = ("rope", "learned")
ATTENTIONS = ("einsum", "dot_product")     # dot_product: jax.nn.dot_product_attention (cuDNN flash on GPU)
REMATS = ("none", "full", "dots_saveable")


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """`config.model` of the lm family (experiments/configs/lm.py), typed by `genjax.models.transformer.lm_config`;
  the defaults are the byte-level `pydoc` model."""
  vocab_size: int = tok_lib.padded_vocab_size(64)
  embed_dim: int = 128
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 512
  max_len: int = 512             # the longest KV cache decoding may use (the learned position table's size);
                                 # training windows are config.dataset.seq_len
  rope_base: float = 10000.0
  dtype: str = "float32"         # compute dtype (DTYPES)
  norm: str = "rms"              # "rms" | "layer" (LayerNorm with bias)
  norm_eps: float = 1e-6
  mlp: str = "gelu"              # "gelu" (tanh approximation) | "swiglu" (silu(gate) * up)
  positions: str = "rope"        # "rope" | "learned" (absolute, a [max_len, embed] table)
  num_kv_heads: int = 0          # 0: as num_heads; fewer: grouped-query attention
  use_bias: bool = False         # biases on every projection (GPT-2)
  qkv_bias: bool = False         # biases on the query/key/value projections only (Qwen2)
  tie_embeddings: bool = False   # the head is the transposed embedding table
  token_vocab_size: int = 0      # 0: the byte tokenizer's ids; > 0: ids >= this are padding (logits -inf)
  param_dtype: str = "float32"   # storage dtype of the params (PARAM_DTYPES)
  context_len: int = 0           # the context the model was trained on (0: unknown); decoding's default limit
  # How it runs (the same function of the same params, up to summation order):
  scan_layers: bool = False      # nn.scan over the blocks (compile time flat in depth): params stacked
                                 # [num_layers, ...] under "blocks"
  remat: str = "none"            # "none" | "full" | "dots_saveable": recompute block activations in the backward
  attention: str = "einsum"      # "einsum" (scores in float32 by hand) | "dot_product" (jax.nn.dot_product_attention)

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  def check(self) -> "LMConfig":
    """Raises ValueError naming the first inconsistent field; returns self."""
    for name, value, choices in (("norm", self.norm, NORMS), ("mlp", self.mlp, MLPS),
                                 ("positions", self.positions, POSITIONS), ("dtype", self.dtype, DTYPES),
                                 ("param_dtype", self.param_dtype, PARAM_DTYPES), ("remat", self.remat, REMATS),
                                 ("attention", self.attention, ATTENTIONS)):
      if value not in choices:
        raise ValueError(f"model.{name}={value!r} is not one of {sorted(choices)}")
    if self.embed_dim % self.num_heads or (self.positions == "rope" and self.head_dim % 2):
      raise ValueError(f"embed_dim={self.embed_dim} must split into num_heads={self.num_heads} heads of "
                       f"{'even ' if self.positions == 'rope' else ''}size")
    if self.num_kv_heads < 0 or self.num_heads % self.kv_heads:
      raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads} (0: as num_heads)")
    if not 0 <= self.token_vocab_size <= self.vocab_size:
      raise ValueError(f"token_vocab_size={self.token_vocab_size} must be in [0, vocab_size={self.vocab_size}]")
    if self.token_vocab_size == 0 and self.vocab_size < tok_lib.VOCAB_SIZE:
      raise ValueError(f"model.vocab_size={self.vocab_size} is smaller than the tokenizer's {tok_lib.VOCAB_SIZE}")
    if self.context_len < 0 or self.context_len > self.max_len:
      raise ValueError(f"context_len={self.context_len} must be in [0, max_len={self.max_len}]")
    return self


REMAT_POLICIES = {"full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable}


def _init(axes, init=None):
  return nn.with_logical_partitioning(init or nn.initializers.lecun_normal(), axes)


def _residual_init(cfg: LMConfig, axes):
  """Projections back into the residual stream: LeCun normal scaled by 1/sqrt(2 num_layers) (GPT-2 style), so the
  residual stream's variance at init does not grow with depth."""
  return _init(axes, nn.initializers.variance_scaling(1.0 / (2 * cfg.num_layers), "fan_in", "truncated_normal"))


def _bias(axes):
  return _init(axes, nn.initializers.zeros)


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
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", _init(("norm",), nn.initializers.ones), (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale).astype(self.dtype)


class LayerNorm(nn.Module):
  dtype: Any = jnp.float32
  eps: float = 1e-5
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", _init(("norm",), nn.initializers.ones), (x.shape[-1],), self.param_dtype)
    bias = self.param("bias", _bias(("norm",)), (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale + bias).astype(self.dtype)


def norm(cfg: LMConfig, name: str, dtype=None) -> nn.Module:
  cls = RMSNorm if cfg.norm == "rms" else LayerNorm
  return cls(DTYPES[cfg.dtype] if dtype is None else dtype, cfg.norm_eps, PARAM_DTYPES[cfg.param_dtype], name=name)


class Attention(nn.Module):
  cfg: LMConfig

  @nn.compact
  def __call__(self, x, positions, cache: Optional[dict]):
    cfg, dtype = self.cfg, DTYPES[self.cfg.dtype]
    bias = cfg.use_bias or cfg.qkv_bias
    dense = functools.partial(nn.DenseGeneral, use_bias=bias, dtype=dtype, param_dtype=PARAM_DTYPES[cfg.param_dtype],
                              kernel_init=_init(("embed", "heads", "kv")), bias_init=_bias(("heads", "kv")))
    q = dense((cfg.num_heads, cfg.head_dim), name="query")(x)
    k = dense((cfg.kv_heads, cfg.head_dim), name="key")(x)
    v = dense((cfg.kv_heads, cfg.head_dim), name="value")(x)
    if cfg.positions == "rope":
      q, k = rope(q, positions, cfg.rope_base), rope(k, positions, cfg.rope_base)
    if cache is None:
      keys, values, key_pos = k, v, positions
    else:
      # The cache is [B, kv_heads, S, D]: heads before slots, the layout the score and value products read, so
      # a decode step writes its T slots and reads the cache without transposing all of it (measured: the
      # [B, S, kv_heads, D] layout cost a full cache transpose per layer per step, ~2x decode time at batch 8).
      rows = jnp.arange(x.shape[0])[:, None]
      cache = {"k": cache["k"].at[rows, :, positions].set(k.astype(cache["k"].dtype)),
               "v": cache["v"].at[rows, :, positions].set(v.astype(cache["v"].dtype))}
      keys, values = jnp.swapaxes(cache["k"], 1, 2), jnp.swapaxes(cache["v"], 1, 2)   # [B, S, kv_heads, D] views
      key_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), keys.shape[:2])
    mask = key_pos[:, None, None, :] <= positions[:, None, :, None]
    if cfg.attention == "dot_product":   # grouped-query attention and the mask handled by JAX
      out = jax.nn.dot_product_attention(q, keys.astype(dtype), values.astype(dtype), mask=mask)
    else:
      out = reference_attention(q, keys.astype(dtype), values.astype(dtype), mask)
    out = nn.DenseGeneral(cfg.embed_dim, axis=(-2, -1), use_bias=cfg.use_bias, dtype=dtype,
                          param_dtype=PARAM_DTYPES[cfg.param_dtype], bias_init=_bias(("embed",)),
                          kernel_init=_residual_init(cfg, ("heads", "kv", "embed")), name="out")(out)
    return out, cache


def reference_attention(q, keys, values, mask):
  """Softmax attention by hand: q [B, T, H, D], keys/values [B, S, K, D] (K divides H: query head h reads key/value
  head h // (H / K)), mask bool [B, 1, T, S]; scores and softmax in float32."""
  groups = q.shape[2] // keys.shape[2]
  if groups > 1:
    keys, values = jnp.repeat(keys, groups, axis=2), jnp.repeat(values, groups, axis=2)
  scores = jnp.einsum("bthd,bshd->bhts", q, keys, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("bhts,bshd->bthd", probs, values)


def mlp(cfg: LMConfig, x):
  """The feed-forward part; called inside a block's compact method, so its params sit in the block's scope
  (mlp_in, [mlp_gate,] mlp_out)."""
  dense = functools.partial(nn.Dense, use_bias=cfg.use_bias, dtype=DTYPES[cfg.dtype],
                            param_dtype=PARAM_DTYPES[cfg.param_dtype])
  h = dense(cfg.mlp_dim, kernel_init=_init(("embed", "mlp")), bias_init=_bias(("mlp",)), name="mlp_in")(x)
  if cfg.mlp == "swiglu":
    gate = dense(cfg.mlp_dim, kernel_init=_init(("embed", "mlp")), bias_init=_bias(("mlp",)), name="mlp_gate")(x)
    h = nn.silu(gate) * h
  else:
    h = nn.gelu(h)
  return dense(cfg.embed_dim, kernel_init=_residual_init(cfg, ("mlp", "embed")), bias_init=_bias(("embed",)),
               name="mlp_out")(h)


class Block(nn.Module):
  cfg: LMConfig

  @nn.compact
  def __call__(self, x, positions, cache: Optional[dict]):
    cfg = self.cfg
    h, cache = Attention(cfg, name="attention")(norm(cfg, "attention_norm")(x), positions, cache)
    x = x + h
    return x + mlp(cfg, norm(cfg, "mlp_norm")(x)), cache


class TransformerLM(nn.Module):
  """tokens [B, T] int32 (+ positions [B, T], default arange; + cache) -> (float32 logits [B, T, V], cache)."""
  cfg: LMConfig

  @nn.compact
  def __call__(self, tokens, positions=None, cache: Optional[dict] = None):
    cfg, dtype, param_dtype = self.cfg, DTYPES[self.cfg.dtype], PARAM_DTYPES[self.cfg.param_dtype]
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be int [batch, length], got shape {tokens.shape}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    embedding = self.param("embedding", _init(("vocab", "embed"), nn.initializers.normal(1.0)),
                           (cfg.vocab_size, cfg.embed_dim), param_dtype)
    x = jnp.take(embedding, tokens, axis=0).astype(dtype)
    if cfg.positions == "learned":
      table = self.param("position_embedding", _init((None, "embed"), nn.initializers.normal(0.02)),
                         (cfg.max_len, cfg.embed_dim), param_dtype)
      x = x + jnp.take(table, positions, axis=0).astype(dtype)
    block = Block if cfg.remat == "none" else nn.remat(Block, policy=REMAT_POLICIES[cfg.remat])
    if cfg.scan_layers:   # one block's program, params stacked on a leading "layers" axis; cache [B, L, ...]
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.num_layers,
                      in_axes=(nn.broadcast, nn.broadcast if cache is None else 1), out_axes=1,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, blocks_cache = stack(cfg, name="blocks")(x, positions, None if cache is None else cache["blocks"])
      new_cache = {"blocks": blocks_cache}
    else:
      new_cache = {}
      for i in range(cfg.num_layers):
        name = f"block_{i}"
        x, new_cache[name] = block(cfg, name=name)(x, positions, None if cache is None else cache[name])
    x = norm(cfg, "final_norm", jnp.float32)(x)
    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, embedding.astype(jnp.float32))
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=jnp.float32, param_dtype=param_dtype,
                        kernel_init=_init(("embed", "vocab")), name="head")(x)
    if 0 < cfg.token_vocab_size < cfg.vocab_size:
      logits = jnp.where(jnp.arange(cfg.vocab_size) < cfg.token_vocab_size, logits, -jnp.inf)
    return logits, (new_cache if cache is not None else None)


def init_cache(cfg: LMConfig, batch_size: int, cache_len: int) -> dict:
  """{"block_i": {"k", "v": [batch, kv_heads, cache_len, head_dim]}} zeros in the compute dtype (batch first)."""
  shape = (batch_size, cfg.kv_heads, cache_len, cfg.head_dim)
  if cfg.scan_layers:      # {"blocks": {"k", "v": [batch, num_layers, kv_heads, cache_len, head_dim]}}
    shape = (batch_size, cfg.num_layers) + shape[1:]
    return {"blocks": {"k": jnp.zeros(shape, DTYPES[cfg.dtype]), "v": jnp.zeros(shape, DTYPES[cfg.dtype])}}
  zeros = lambda: jnp.zeros(shape, DTYPES[cfg.dtype])
  return {f"block_{i}": {"k": zeros(), "v": zeros()} for i in range(cfg.num_layers)}


def stack_layers(params: dict, num_layers: int) -> dict:
  """Unrolled params ({"block_i": ...}) -> the `scan_layers` layout ({"blocks": leaves stacked on axis 0})."""
  blocks = [params[f"block_{i}"] for i in range(num_layers)]
  rest = {k: v for k, v in params.items() if not k.startswith("block_")}
  return {**rest, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_layers(params: dict, num_layers: int) -> dict:
  """The inverse of `stack_layers`."""
  rest = {k: v for k, v in params.items() if k != "blocks"}
  return {**rest, **{f"block_{i}": jax.tree.map(lambda x: x[i], params["blocks"]) for i in range(num_layers)}}
