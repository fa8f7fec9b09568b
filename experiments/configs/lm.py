"""Transformer LM configs (family "lm", byte vocabulary).

  python -m experiments.train --config=experiments/configs/lm.py:pydoc --workdir=runs/lm   # offline, 2 CPU cores
  --config=experiments/configs/lm.py:pydoc_draft           # 1-layer draft of pydoc (speculative decoding)
  --config=experiments/configs/lm.py:tiny_shakespeare      # TFDS tiny_shakespeare (needs the data or internet)
  --config=experiments/configs/lm.py:gpt_small             # ~85M params, bf16, fsdp mesh: one or more GPUs/TPUs
  --config=experiments/configs/lm.py:hf_finetune --config.model.init_from=DIR   # fine-tune a Hugging Face LM

`gpt_small` shards params with their logical axes (embed -> fsdp; heads, mlp, vocab -> tensor); on several devices
add `--config.mesh.tensor=2` (or 4) to also split heads/MLP/vocab, e.g. mesh data=1, fsdp=-1, tensor=2.
"""
import ml_collections

from experiments.configs.common import pick_variant
from genjax.tokenizer import padded_vocab_size


def _lm_defaults(c, init_from=""):
  """The fields every lm variant declares besides the architecture: the text fields of `dataset` and
  `model.init_from`."""
  c.family = "lm"
  c.dataset.seq_len = 128              # tokens per training window; also the context decoding is limited to
  c.dataset.tokenizer = ""             # "" = UTF-8 bytes; a Hugging Face model directory = its tokenizer.json
  c.model.init_from = init_from        # "" = train from scratch; a Hugging Face checkpoint directory = fine-tune it


def _model(c, embed_dim, num_layers, num_heads, mlp_dim, max_len, vocab_multiple=64):
  c.model.vocab_size = padded_vocab_size(vocab_multiple)
  c.model.embed_dim = embed_dim
  c.model.num_layers = num_layers
  c.model.num_heads = num_heads
  c.model.mlp_dim = mlp_dim
  c.model.max_len = max_len            # longest KV cache for sampling (training uses dataset.seq_len)
  c.model.rope_base = 10000.0
  c.model.norm = "rms"                 # "rms" | "layer" (LayerNorm with bias)
  c.model.norm_eps = 1e-6
  c.model.mlp = "gelu"                 # "gelu" (tanh approximation) | "swiglu"
  c.model.positions = "rope"           # "rope" | "learned" (a [max_len, embed] table)
  c.model.num_kv_heads = 0             # 0: as num_heads; fewer: grouped-query attention
  c.model.use_bias = False             # biases on every projection (GPT-2)
  c.model.qkv_bias = False             # biases on the query/key/value projections only (Qwen2)
  c.model.tie_embeddings = False       # the head is the transposed embedding table
  c.model.token_vocab_size = 0         # 0: the byte tokenizer's ids; > 0: ids >= this are padding
  # compute dtype, trained context and param dtype follow compute_dtype, dataset.seq_len and float32 training.
  c.model.scan_layers = False          # True: nn.scan over the blocks (compile time flat in depth)
  c.model.remat = "none"               # "none" | "full" | "dots_saveable": recompute activations in the backward
  c.model.attention = "einsum"         # "einsum" | "dot_product" (jax.nn.dot_product_attention)


def pydoc(c):
  # ~0.5M params; ~0.4 CPU-s per step on this 2-core machine, so 600 steps take a few minutes. Measured bits per
  # byte are in the README (the byte-unigram entropy of the corpus is 4.70 bits).
  _lm_defaults(c)
  _model(c, embed_dim=128, num_layers=2, num_heads=4, mlp_dim=512, max_len=512)
  c.dataset.name = "pydoc"
  c.dataset.seq_len = 128
  c.batch_size = 32
  c.num_train_steps = 600
  c.log_every_steps = 50
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200
  c.num_eval_batches = 8
  c.sample_every_steps = 0
  c.ema_decay = 0.99
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 3e-3
  c.optimizer.weight_decay = 0.01
  c.optimizer.schedule = "warmup_cosine"
  c.optimizer.warmup_steps = 50


def pydoc_draft(c):
  # A 1-layer, 64-wide draft for speculative decoding of `pydoc` (same data and byte vocabulary): ~0.1M params.
  pydoc(c)
  _model(c, embed_dim=64, num_layers=1, num_heads=2, mlp_dim=256, max_len=512)


def tiny_shakespeare(c):
  _lm_defaults(c)
  _model(c, embed_dim=256, num_layers=6, num_heads=8, mlp_dim=1024, max_len=1024)
  c.dataset.name = "tiny_shakespeare"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.seq_len = 256
  c.batch_size = 64
  c.num_train_steps = 10_000
  c.log_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.sample_every_steps = 0
  c.ema_decay = 0.999
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.1
  c.optimizer.b2 = 0.99
  c.optimizer.schedule = "warmup_cosine"
  c.optimizer.warmup_steps = 500


def gpt_small(c):
  # 12 x (4·768² attention + 2·768·3072 MLP) + 2·384·768 embeddings ≈ 85.5M params.
  _lm_defaults(c)
  _model(c, embed_dim=768, num_layers=12, num_heads=12, mlp_dim=3072, max_len=2048, vocab_multiple=128)
  c.dataset.name = "tiny_shakespeare"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.seq_len = 1024
  c.batch_size = 32
  c.compute_dtype = "bfloat16"
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.num_train_steps = 20_000
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 2000
  c.sample_every_steps = 0
  c.ema_decay = 0.0
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 6e-4
  c.optimizer.weight_decay = 0.1
  c.optimizer.b2 = 0.95
  c.optimizer.schedule = "warmup_cosine"
  c.optimizer.warmup_steps = 1000


def hf_finetune(c):
  # A Hugging Face checkpoint (GPT-2 / Llama / Mistral / Qwen2, a directory as save_pretrained writes it) fine-tuned
  # on pydoc tokenized with its own tokenizer: --config.model.init_from=DIR (required). The architecture and
  # vocabulary are the checkpoint's; export the result with `python -m experiments.export --workdir=... --out=DIR`.
  _lm_defaults(c, init_from=ml_collections.FieldReference(None, field_type=str))   # None: must be given
  c.model.remat = "none"               # how it runs may be chosen; the architecture is the checkpoint's
  c.model.attention = "einsum"
  c.dataset.name = "pydoc"
  c.dataset.tokenizer = c.model.get_ref("init_from")    # follows --config.model.init_from
  c.dataset.seq_len = 128
  c.batch_size = 8
  c.num_train_steps = 200
  c.log_every_steps = 20
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  c.num_eval_batches = 4
  c.sample_every_steps = 0
  c.ema_decay = 0.0
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-4
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "warmup_cosine"
  c.optimizer.warmup_steps = 20


VARIANTS = {"pydoc": pydoc, "pydoc_draft": pydoc_draft, "tiny_shakespeare": tiny_shakespeare, "gpt_small": gpt_small,
            "hf_finetune": hf_finetune}


def get_config(arg=None):
  return pick_variant("lm.py", arg, VARIANTS)
