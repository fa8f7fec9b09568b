"""Fields every config shares (flax-examples names), the loop's periods, and the variant picker every config file uses.

A config file `experiments/configs/<family>.py` defines `get_config(arg)`; `arg` is the variant after the colon in
`--config=experiments/configs/vae.py:digits`. Each variant starts from `base_config()` and its family's model
section (`genjax.models.fields.config_section` of the family's typed config: every model default is declared there,
once) and sets only what it changes; tests/test_configs.py fails on a setting that restates the value it already has.
"""
from __future__ import annotations

from typing import Callable, Mapping

import ml_collections
from genjax.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.family = ""                      # key into genjax.models.FAMILIES
  c.variant = ""                     # set by pick_variant: the name after the colon in --config=<file>:<variant>
  c.seed = 0
  c.batch_size = 64                  # global batch, split over processes and devices
  c.num_train_steps = 1000
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.sample_every_steps = 500         # PNG grid of samples (image families); 0 = only at the end; -1 = never
  c.num_sample_images = 64
  c.eval_every_steps = 500           # test-split metrics; 0 = only at the end; -1 = never
  c.num_eval_batches = 4
  c.parallel = "pjit"                # "pjit" (jax.jit + NamedSharding) | "pmap"
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))   # -1 = the remaining devices
  c.param_sharding = "replicated"    # "replicated" | "fsdp" (largest divisible dim over the fsdp axis)
  c.ema_decay = 0.999                # 0 = no EMA (sampling/eval then use the raw params)
  c.grad_accum_steps = 1             # micro-batches per step; the global batch stays `batch_size`
  c.compute_dtype = "float32"        # "float32" | "bfloat16"; params always float32
  c.async_checkpointing = True
  c.peak_flops = 0.0                 # per-device peak FLOP/s for the MFU figure; 0 = known accelerators' table
  c.profile_steps = ""               # "a,b": jax.profiler trace of steps a+1..b into <workdir>/profile
  c.compilation_cache_dir = ""       # JAX's persistent compilation cache (reruns skip compiling); "" = off
  # Every data set's fields (genjax.data.get_source reads them as declared; a missing one is a ConfigError).
  # download: let TFDS fetch and prepare a data set that is not under data_dir (needs internet and TensorFlow).
  # Text data sets also need seq_len and tokenizer: experiments/configs/lm.py declares them.
  # data_dir: None = the TFDS default; a str placeholder so that --config.dataset.data_dir=DIR can override it.
  c.dataset = ml_collections.ConfigDict(dict(name="", data_dir=ml_collections.config_dict.placeholder(str),
                                             train_split="train", eval_split="test", download=False))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-3, schedule="constant", warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.0, grad_clip_norm=1.0))
  c.model = ml_collections.ConfigDict()
  return c


def every(c: ml_collections.ConfigDict, steps: int, *, sample: int | None = None) -> None:
  """Checkpoint and evaluate every `steps` steps; the sample grid every `sample` steps (default: `steps` too)."""
  c.checkpoint_every_steps = c.eval_every_steps = steps
  c.sample_every_steps = steps if sample is None else sample


def pick_variant(config_file: str, arg: str | None,
                 variants: Mapping[str, Callable[[ml_collections.ConfigDict], None]]) -> ml_collections.ConfigDict:
  """Returns base_config() updated by `variants[arg]`; an unknown variant names the valid ones."""
  if not arg:
    raise ConfigError(f"{config_file} needs a variant, e.g. {config_file}:{next(iter(variants))}; "
                     f"valid: {sorted(variants)}")
  if arg not in variants:
    raise ConfigError(f"unknown variant {arg!r} for {config_file}; valid: {sorted(variants)}")
  c = base_config()
  variants[arg](c)
  c.variant = arg
  return c
