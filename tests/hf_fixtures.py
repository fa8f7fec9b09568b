"""A tiny Hugging Face checkpoint made without torch: a random Llama-architecture LM written by genjax's own
`save_lm`, with a byte-level BPE tokenizer trained by `tokenizers` on pydoc text (CPython's `pydoc_data`).

transformers loads it (tests/test_interop_hf.py checks the round trip); tests of the fine-tuning config use it
where torch is not installed.
"""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]          # ids 0..3


def train_tokenizer(directory: str, vocab_size: int = 300) -> str:
  """tokenizer.json + tokenizer_config.json of a byte-level BPE trained on 60 pydoc topics; returns directory."""
  from pydoc_data.topics import topics
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  bpe = Tokenizer(models.BPE(unk_token="<unk>"))
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator([topics[k] for k in sorted(topics)[:60]],
                          trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(directory, exist_ok=True)
  bpe.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "bos_token": "<s>",
               "eos_token": "</s>", "unk_token": "<unk>"}, f)
  return directory


def tiny_checkpoint(directory: str, seed: int = 0) -> str:
  """A random 2-layer Llama-family LM (GQA 4/2 heads, untied head) + tokenizer in `directory`; returns it."""
  from genjax.interop import hf
  from genjax.models.lm_layers import LMConfig, TransformerLM
  tokenizer_dir = train_tokenizer(directory + "_tokenizer")
  cfg = LMConfig(vocab_size=300, token_vocab_size=300, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 mlp_dim=64, max_len=128, norm="rms", norm_eps=1e-5, mlp="swiglu", context_len=128)
  init = jax.jit(lambda key: TransformerLM(cfg).init(key, jax.numpy.zeros((1, 4), jax.numpy.int32))["params"])
  return hf.save_lm(cfg, nn.unbox(init(jax.random.key(seed))), directory, tokenizer=tokenizer_dir)
