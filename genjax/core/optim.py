"""Optimizers from config: learning-rate schedule, Adam(W)/SGD, global-norm clipping — all optax.

    tx = make_optimizer(config.optimizer, num_train_steps=config.num_train_steps)

`config.optimizer` fields: name ("adam" | "adamw" | "sgd"), learning_rate, schedule ("constant" | "cosine" |
"warmup_cosine"), warmup_steps, b1, b2, eps, weight_decay, grad_clip_norm (0 = no clipping). Every field is
declared with its default in experiments/configs/common.py (`base_config().optimizer`); nothing is defaulted here.
"""
from __future__ import annotations

import optax
from genjax.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine")


def make_schedule(cfg, num_train_steps: int) -> optax.Schedule:
  lr = float(cfg.learning_rate)
  kind = cfg.schedule
  warmup = int(cfg.warmup_steps)
  if kind == "constant":
    if warmup > 0:
      return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    return optax.constant_schedule(lr)
  if kind == "cosine":
    return optax.cosine_decay_schedule(lr, max(1, num_train_steps))
  if kind == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(warmup + 1, num_train_steps))
  raise ConfigError(f"optimizer.schedule={kind!r} is not one of {SCHEDULES}")


def make_optimizer(cfg, num_train_steps: int) -> optax.GradientTransformation:
  """Builds `clip_by_global_norm -> {adam, adamw, sgd}(schedule)` from an optimizer config."""
  name = cfg.name
  lr = make_schedule(cfg, num_train_steps)
  b1, b2 = float(cfg.b1), float(cfg.b2)
  eps = float(cfg.eps)
  if name == "adam":
    tx = optax.adam(lr, b1=b1, b2=b2, eps=eps)
  elif name == "adamw":
    tx = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=float(cfg.weight_decay))
  elif name == "sgd":
    tx = optax.sgd(lr, momentum=b1 or None)
  else:
    raise ConfigError(f"optimizer.name={name!r} is not one of {OPTIMIZERS}")
  clip = float(cfg.grad_clip_norm)
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx
