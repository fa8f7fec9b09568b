"""Transformer LM configs (family "lm", byte vocabulary).

  python -m experiments.train --config=experiments/configs/lm.py:pydoc --workdir=runs/lm   # offline, 2 CPU cores
  --config=experiments/configs/lm.py:pydoc_draft           # 1-layer draft of pydoc (speculative decoding)
  --config=experiments/configs/lm.py:tiny_shakespeare      # TFDS tiny_shakespeare (needs the data or internet)
  --config=experiments/configs/lm.py:gpt_small             # ~85M params, bf16, fsdp mesh: one or more GPUs/TPUs
  --config=experiments/configs/lm.py:hf_finetune --config.model.init_from=DIR   # fine-tune a Hugging Face LM

`gpt_small` shards params with their logical axes (embed -> fsdp; heads, mlp, vocab -> tensor); on several devices
add `--config.mesh.tensor=2` (or 4) to also split heads/MLP/vocab, e.g. mesh data=1, fsdp=-1, tensor=2.

Model fields (`config.model`): `genjax.models.lm_layers.LMConfig` declares each one, its default (the pydoc model)
and its meaning; a variant sets only what it changes. The compute dtype, trained context and param dtype are not
set here: they follow compute_dtype, dataset.seq_len and float32 training (`transformer.DERIVED_FIELDS`).
"""
import ml_collections

from experiments.configs.common import every, pick_variant
from genjax.models.fields import config_section
from genjax.models.lm_layers import LMConfig
from genjax.models.transformer import DERIVED_FIELDS, RUN_FIELDS
from genjax.tokenizer import padded_vocab_size


def _lm(c, dataset: str, every_steps: int) -> None:
  """The lm family on `dataset`: LMConfig's defaults trained from scratch on byte tokens, AdamW with warmup and
  cosine decay; checkpoint and evaluate every `every_steps` steps, no sample grid (text)."""
  c.family = "lm"
  c.dataset.name = dataset
  c.dataset.seq_len = 128              # tokens per training window; also the context decoding is limited to
  c.dataset.tokenizer = ""             # "" = UTF-8 bytes; a Hugging Face model directory = its tokenizer.json
  c.model = config_section(LMConfig, exclude=DERIVED_FIELDS)
  c.model.init_from = ""               # "" = train from scratch; a Hugging Face checkpoint directory = fine-tune it
  c.optimizer.update(name="adamw", schedule="warmup_cosine")
  every(c, every_steps, sample=0)


def pydoc(c):
  # ~0.5M params; ~0.4 CPU-s per step on this 2-core machine, so 600 steps take a few minutes. Measured bits per
  # byte are in docs/results.md (the byte-unigram entropy of the corpus is 4.70 bits).
  _lm(c, "pydoc", every_steps=200)
  c.update(batch_size=32, num_train_steps=600, num_eval_batches=8, ema_decay=0.99)
  c.optimizer.update(learning_rate=3e-3, weight_decay=0.01, warmup_steps=50)


def pydoc_draft(c):
  # A 1-layer, 64-wide draft for speculative decoding of `pydoc` (same data and byte vocabulary): ~0.1M params.
  pydoc(c)
  c.model.update(embed_dim=64, num_layers=1, num_heads=2, mlp_dim=256)


def tiny_shakespeare(c):
  _lm(c, "tiny_shakespeare", every_steps=1000)
  c.dataset.update(eval_split="validation", seq_len=256)
  c.model.update(embed_dim=256, num_layers=6, num_heads=8, mlp_dim=1024, max_len=1024)
  c.update(num_train_steps=10_000, log_every_steps=100)
  c.optimizer.update(weight_decay=0.1, b2=0.99, warmup_steps=500)


def gpt_small(c):
  # 12 x (4·768² attention + 2·768·3072 MLP) + 2·384·768 embeddings ≈ 85.5M params.
  _lm(c, "tiny_shakespeare", every_steps=2000)
  c.dataset.update(eval_split="validation", seq_len=1024)
  c.model.update(vocab_size=padded_vocab_size(128), embed_dim=768, num_layers=12, num_heads=12, mlp_dim=3072,
                 max_len=2048)
  c.update(batch_size=32, compute_dtype="bfloat16", num_train_steps=20_000, log_every_steps=100, ema_decay=0.0)
  c.mesh.update(data=1, fsdp=-1)
  c.optimizer.update(learning_rate=6e-4, weight_decay=0.1, b2=0.95, warmup_steps=1000)


def hf_finetune(c):
  # A Hugging Face checkpoint (GPT-2 / Llama / Mistral / Qwen2, a directory as save_pretrained writes it) fine-tuned
  # on pydoc tokenized with its own tokenizer: --config.model.init_from=DIR (required). The architecture and
  # vocabulary are the checkpoint's (only how it runs may be chosen); export the result with
  # `python -m experiments.export --workdir=... --out=DIR`.
  _lm(c, "pydoc", every_steps=100)
  c.model = config_section(LMConfig, only=RUN_FIELDS)
  c.model.init_from = ml_collections.FieldReference(None, field_type=str)   # None: must be given
  c.dataset.tokenizer = c.model.get_ref("init_from")    # follows --config.model.init_from
  c.update(batch_size=8, num_train_steps=200, log_every_steps=20, ema_decay=0.0)
  c.optimizer.update(learning_rate=1e-4, warmup_steps=20)


VARIANTS = {"pydoc": pydoc, "pydoc_draft": pydoc_draft, "tiny_shakespeare": tiny_shakespeare, "gpt_small": gpt_small,
            "hf_finetune": hf_finetune}


def get_config(arg=None):
  return pick_variant("lm.py", arg, VARIANTS)
