"""Decoder-only transformer LM family ("lm"): genjax's byte LM, GPT-2 and the Llama family, decoding and training.

    task = genjax.models.get_task(config)        # config.family == "lm"; see experiments/configs/lm.py
    cfg = lm_config(config)                      # frozen LMConfig from config.model.* and config.compute_dtype
    logits, _ = TransformerLM(cfg).apply({"params": params}, tokens)            # full forward, [B, T, V] float32
    logits, cache = TransformerLM(cfg).apply({"params": params}, tok, pos, cache)   # cached step
    out = genjax.samplers.generate(decoding_model(cfg), params, prompts, rng=rng, max_new_tokens=100)

The architecture is chosen by `LMConfig` fields (`genjax/models/lm_layers.py`): the default is genjax's own byte LM
(RoPE, pre-norm RMSNorm, GELU MLP); GPT-2 and Llama-family checkpoints come from `genjax.interop.hf.load_lm`, and
`config.model.init_from=DIR` fine-tunes one through the shared loop (read by `genjax.interop`, passed down as
`task(config, pretrained=...)`) (its tokenizer then tokenizes the data via
`config.dataset.tokenizer`). Params carry logical axis names (`nn.with_logical_partitioning`): "vocab", "embed",
"heads", "kv", "mlp", "norm" (+ "layers" with `scan_layers`); the loop maps them to mesh axes and unboxes them (the
functions here also accept boxed params). Activations run in `config.compute_dtype`; norms, softmax and logits in
float32.

KV cache: {"block_i": {"k", "v": [B, kv_heads, cache_len, head_dim]}} ({"blocks": [B, num_layers, ...]} with
`scan_layers`); a step writes its keys/values at slot == position and a query at position q attends to slots <= q,
which is the `genjax.samplers.decoding` contract. `decoding_model(cfg).max_len` is the context the model was trained
on (`config.dataset.seq_len`) unless `decoding_model(cfg, max_len=...)` asks for longer.
Loss: next-token cross-entropy on `batch["tokens"]` [B, seq_len + 1]; metrics loss, bits_per_byte (bits_per_token
for a checkpoint's vocabulary), perplexity.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from genjax import tokenizer as tok_lib
from genjax.dtypes import compute_dtype
from genjax.errors import ConfigError, UserError
from genjax.models.fields import from_config
from genjax.models.lm_layers import (LMConfig, TransformerLM, init_cache, rope, stack_layers,  # noqa: F401
                                     unstack_layers)
from genjax.samplers.decoding import DecodingModel, DecodingSettings, beam_search, generate
from genjax.core.optim import make_optimizer
from genjax.core.task import Export, Phase, Pretrained, Task

SAMPLE_OPTIONS = {"max_new_tokens": 200, "temperature": 0.8, "top_k": 0, "top_p": 0.95, "repetition_penalty": 1.0,
                  "presence_penalty": 0.0, "frequency_penalty": 0.0, "num_beams": 1, "length_penalty": 1.0,
                  "min_p": 0.0, "stop": (), "allow_longer_context": None}


# LMConfig fields a config does not set: they follow config.compute_dtype, config.dataset.seq_len and float32
# training params.
DERIVED_FIELDS = ("dtype", "context_len", "param_dtype")
# LMConfig fields a fine-tuning config (model.init_from) may set: how it runs; the architecture is the checkpoint's.
RUN_FIELDS = ("remat", "attention")


def _declared(section, key: str, where: str):
  """`section.<key>`, or a ConfigError naming the field when the config does not declare it."""
  if key not in section:
    raise ConfigError(f"{where}.{key} is not set; the lm family needs it: declare it in the config "
                      f"(experiments/configs/lm.py declares every lm field)")
  return section[key]


def lm_config(config, pretrained: Optional[Pretrained] = None) -> LMConfig:
  """LMConfig from `config.model.*` (fields it does not set keep LMConfig's defaults), `config.compute_dtype` and
  the trained context `config.dataset.seq_len` (decoding's default length limit). `config.model.init_from` is ""
  (train from scratch) or a Hugging Face checkpoint directory, whose architecture is then the model's: a launcher
  reads it with `genjax.interop.hf.pretrained_for(config)` and passes it as `pretrained`."""
  dtype = config.compute_dtype
  compute_dtype(dtype)                                     # ConfigError naming the value and the valid names
  model = dict(config.model)
  init_from = _declared(config.model, "init_from", "config.model")
  del model["init_from"]
  if init_from is None:                                    # hf_finetune's default: the checkpoint must be given
    raise ConfigError("config.model.init_from is not set: give the Hugging Face checkpoint directory to fine-tune, "
                      "--config.model.init_from=DIR")
  if init_from:
    if pretrained is None:
      raise ConfigError(f"config.model.init_from={init_from!r} is read by genjax.interop: pass "
                        f"pretrained=genjax.interop.hf.pretrained_for(config)")
    run = {k: model.pop(k) for k in RUN_FIELDS if k in model}     # how it runs may be chosen
    # the checkpoint's own architecture; params stay float32 for training
    cfg = dataclasses.replace(pretrained.model_config, dtype=dtype, param_dtype="float32", **run)
    extra = {k for k, v in model.items() if v != getattr(cfg, k, v)}
    if extra:
      raise UserError(f"config.model fields {sorted(extra)} contradict the checkpoint model.init_from={init_from!r}"
                      f"; remove them (the architecture is the checkpoint's)")
    return cfg.check()
  fields = {f.name for f in dataclasses.fields(LMConfig)} - set(DERIVED_FIELDS)
  unknown = set(model) - fields
  if unknown:
    raise ConfigError(f"unknown config.model fields {sorted(unknown)}; valid: {sorted(fields | {'init_from'})}")
  seq_len = int(_declared(config.dataset, "seq_len", "config.dataset"))
  cfg = from_config(LMConfig, {**model, "dtype": dtype})
  try:
    return dataclasses.replace(cfg, context_len=min(seq_len, cfg.max_len)).check()
  except ValueError as e:
    raise ConfigError(str(e)) from None


@functools.lru_cache(maxsize=None)
def decoding_model(cfg: LMConfig, max_len: Optional[int] = None) -> DecodingModel:
  """The `genjax.samplers.decoding` interface for this LM (one instance per (config, max_len), so compilations are
  reused). Its `max_len` is the context the model was trained on (`cfg.context_len`, else `cfg.max_len`); pass a
  longer `max_len` (at most `cfg.max_len`, the cache and position-table limit) to decode past it knowingly.

  Byte-tokenizer models (`token_vocab_size == 0`): logits of ids the tokenizer never produces (PAD, BOS, the
  vocabulary padding) are -inf, so only bytes and EOS are generated. Checkpoint vocabularies
  (`token_vocab_size > 0`): every real id can be generated; the padding ids are -inf in the model itself.
  """
  limit = cfg.context_len or cfg.max_len
  if max_len is not None:
    if not 1 <= int(max_len) <= cfg.max_len:
      raise UserError(f"max_len={max_len} must be in [1, model max_len={cfg.max_len}] (the cache and position "
                      f"limit; the model was trained on {limit} positions)")
    limit = int(max_len)
  module = TransformerLM(cfg)
  allowed = None
  if cfg.token_vocab_size == 0:
    allowed = np.zeros((cfg.vocab_size,), bool)
    allowed[:tok_lib.NUM_BYTES] = True
    allowed[tok_lib.EOS_ID] = True

  def step_fn(params, tokens, positions, cache):
    logits, cache = module.apply({"params": params}, tokens, positions, cache)
    if allowed is not None:
      logits = jnp.where(jnp.asarray(allowed), logits, -jnp.inf)
    return logits, cache

  return DecodingModel(step_fn=step_fn, init_cache=functools.partial(init_cache, cfg), max_len=limit)


def lm_metrics(module: TransformerLM, params, tokens: jax.Array) -> dict:
  """Mean next-token cross-entropy (nats) of tokens [B, L+1], its bits per token (bits per byte for the byte
  tokenizer) and perplexity."""
  logits, _ = module.apply({"params": nn.unbox(params)}, tokens[:, :-1])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  bits = "bits_per_token" if module.cfg.token_vocab_size else "bits_per_byte"
  return {"loss": loss, bits: loss / math.log(2.0), "perplexity": jnp.exp(loss)}


def sample_text(cfg: LMConfig, params, prompts, rng, *, tokenizer=None, max_len: Optional[int] = None,
                **options) -> list[str]:
  """Continuations of text prompts (an empty prompt starts from a newline). Options and defaults:
  `SAMPLE_OPTIONS`; `num_beams > 1` returns the best beam (deterministic). `tokenizer` (default the byte
  tokenizer; `genjax.interop.hf.load_tokenizer(...)` for a checkpoint's) encodes and decodes and gives the EOS/pad
  ids; `max_len` (default the trained context) is passed to `decoding_model`. Without `max_new_tokens`, the
  default (200) is cut to what fits in the context after the longest prompt."""
  unknown = set(options) - set(SAMPLE_OPTIONS)
  if unknown:
    raise UserError(f"unknown sampling options {sorted(unknown)}; valid: {sorted(SAMPLE_OPTIONS)}")
  if isinstance(prompts, str) or not prompts:
    raise UserError(f"prompts must be a non-empty list of str, got {prompts!r}")
  o = {**SAMPLE_OPTIONS, **options}
  tokenizer = tok_lib.ByteTokenizer() if tokenizer is None else tokenizer
  eos_id = tokenizer.eos_id
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (eos_id if eos_id is not None else 0)
  ids = [tokenizer.encode(p) or tokenizer.encode("\n") for p in prompts]
  width = -(-max(len(i) for i in ids) // 64) * 64          # bucket the prompt width: fewer compilations
  tokens = np.full((len(ids), width), pad_id, np.int32)
  for r, i in enumerate(ids):
    tokens[r, :len(i)] = i
  lengths = np.array([len(i) for i in ids], np.int32)
  if o["allow_longer_context"] is not None:   # decode past the trained context, knowingly (at most cfg.max_len)
    max_len = int(o["allow_longer_context"])
  stops = [o["stop"]] if isinstance(o["stop"], str) else list(o["stop"])
  if any(not isinstance(st, str) or not st for st in stops):
    raise UserError(f"stop={o['stop']!r}: each stop must be a non-empty string")
  plain = getattr(tokenizer, "encode_plain", tokenizer.encode)   # stop strings: ids without BOS / special tokens
  model, params = decoding_model(cfg, max_len), nn.unbox(params)
  new = o["max_new_tokens"]
  if "max_new_tokens" not in options:        # the default never asks for more than the context holds
    new = max(1, min(int(new), model.max_len - int(lengths.max())))
  # Every option through the decoders' own checks (DecodingSettings), whichever decoder then runs.
  common = dict(max_new_tokens=new, eos_id=eos_id, pad_id=pad_id)
  sampling = dict(temperature=o["temperature"], top_k=o["top_k"], top_p=o["top_p"], min_p=o["min_p"],
                  repetition_penalty=o["repetition_penalty"], presence_penalty=o["presence_penalty"],
                  frequency_penalty=o["frequency_penalty"], stop_sequences=[plain(st) for st in stops] or None)
  beams = dict(num_beams=o["num_beams"], length_penalty=o["length_penalty"])
  settings = DecodingSettings(**common, **sampling, **beams)
  if stops and settings.num_beams > 1:
    raise UserError(f"stop strings apply to sampling / greedy decoding, not to beam search (num_beams="
                    f"{settings.num_beams})")
  cache_len = min(model.max_len, width + settings.max_new_tokens - 1)
  if settings.num_beams > 1:
    out = beam_search(model, params, tokens, prompt_lengths=lengths, cache_len=cache_len,
                      settings=DecodingSettings(**common, **beams))
    generated = np.asarray(out.sequences[:, 0])
  else:
    out = generate(model, params, tokens, rng=rng, prompt_lengths=lengths, cache_len=cache_len,
                   settings=DecodingSettings(**common, **sampling))
    generated = np.asarray(out.tokens)
  return [tokenizer.decode(row[:n]) for row, n in zip(generated, np.asarray(out.lengths).reshape(len(ids), -1)[:, 0])]


def task(config, pretrained: Optional[Pretrained] = None) -> Task:
  """The "lm" family: one phase minimising next-token cross-entropy; with `config.model.init_from=DIR` the params
  start from that Hugging Face checkpoint (`pretrained`, read by `genjax.interop.hf.pretrained_for`) and
  `sample_text` uses its tokenizer. Every LM can be exported (`Export("huggingface", ...)`); the converter refuses
  an architecture Hugging Face has no equivalent of."""
  cfg = lm_config(config, pretrained)
  module = TransformerLM(cfg)
  init_from = config.model.init_from       # lm_config checked it: "" or a checkpoint directory (then pretrained)
  tokenizer = pretrained.tokenizer if init_from else None

  def init(rng, example_batch):
    tokens = jnp.asarray(example_batch["tokens"])
    if tokens.ndim != 2 or tokens.shape[1] < 2:
      raise ValueError(f"batch['tokens'] must be int [batch, seq_len + 1], got shape {tokens.shape}")
    if init_from:
      return pretrained.load_params(cfg)
    return module.init(rng, tokens[:1, :-1])["params"]

  def loss_fn(params, batch, rng, step):
    del rng, step
    metrics = lm_metrics(module, params, batch["tokens"])
    return metrics["loss"], metrics

  def evaluate(params, batch, rng):
    del rng
    return lm_metrics(module, params, batch["tokens"])

  phase = Phase("lm", loss_fn, optimizer=make_optimizer(config.optimizer, config.num_train_steps))
  return Task(init=init, phases=(phase,), sample_text=functools.partial(sample_text, cfg, tokenizer=tokenizer),
              evaluate=evaluate, export=Export("huggingface", cfg, assets=init_from or None), init_from=init_from)
