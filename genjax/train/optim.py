"""Optimizers from config: learning-rate schedule, Adam(W)/SGD, global-norm clipping — all optax.

    tx = make_optimizer(config.optimizer, num_train_steps=config.num_train_steps)

`config.optimizer` fields: name ("adam" | "adamw" | "sgd"), learning_rate, schedule ("constant" | "cosine" |
"warmup_cosine"), warmup_steps, b1, b2, eps, weight_decay, grad_clip_norm (0 = no clipping).
"""
from __future__ import annotations

from typing import Any, Mapping

import optax
from genjax.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine")


def _get(cfg: Mapping[str, Any], key: str, default):
  return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def make_schedule(cfg, num_train_steps: int) -> optax.Schedule:
  lr = float(_get(cfg, "learning_rate", 1e-3))
  kind = _get(cfg, "schedule", "constant")
  warmup = int(_get(cfg, "warmup_steps", 0))
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
  name = _get(cfg, "name", "adam")
  lr = make_schedule(cfg, num_train_steps)
  b1, b2 = float(_get(cfg, "b1", 0.9)), float(_get(cfg, "b2", 0.999))
  eps = float(_get(cfg, "eps", 1e-8))
  if name == "adam":
    tx = optax.adam(lr, b1=b1, b2=b2, eps=eps)
  elif name == "adamw":
    tx = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=float(_get(cfg, "weight_decay", 1e-4)))
  elif name == "sgd":
    tx = optax.sgd(lr, momentum=b1 or None)
  else:
    raise ConfigError(f"optimizer.name={name!r} is not one of {OPTIMIZERS}")
  clip = float(_get(cfg, "grad_clip_norm", 0.0))
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx
