"""Classifier-free guidance as a wrapper that turns a conditional model into a `model_fn(x, t)` for any sampler.

    guided = classifier_free_guidance(cond_model_fn, scale=3.0, uncond_label=10, labels=jnp.full([n], 7))
    x0 = ddim_sample(guided, sched, x_T, num_steps=50)            # or ddpm_sample / dpm_solver_sample

`cond_model_fn(x, t, labels) -> prediction` is the conditional network (x float [batch, ...], t int32 [batch],
labels [batch, ...]: class ids, or embeddings); `uncond_label` is the null / negative label the model was trained
with for dropped conditioning (a scalar, or one per example). The guided prediction is
u + scale * (c - u) with c = cond_model_fn(x, t, labels), u = cond_model_fn(x, t, uncond_label), evaluated in ONE
model call on a doubled batch and combined in float32. scale 0 is the unconditional model, 1 the conditional one,
> 1 extrapolates. The combination is the same in eps, v or x0 space (they are affine in each other at fixed x, t),
so it works with every `prediction=` setting.

`scale`, `uncond_label` and `labels` are runtime values: the wrapper is a `jax.tree_util.Partial` whose array
leaves the samplers trace, so changing the guidance scale or the labels between calls compiles nothing new. Keep
`cond_model_fn` itself stable (build it once, or make it a `jax.tree_util.Partial(apply_fn, params)`): see
`genjax.samplers.diffusion` on how samplers key their compiled programs.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def classifier_free_guidance(cond_model_fn: Callable, scale, uncond_label, labels) -> jax.tree_util.Partial:
  """A `model_fn(x, t)` that applies classifier-free guidance to `cond_model_fn(x, t, labels)`.

  Args:
    cond_model_fn: the conditional model, `(x [B, ...], t int32 [B], labels [B, ...]) -> prediction [B, ...]`.
    scale: guidance scale w, a scalar or one per example [B] (traced; 0 = unconditional, 1 = conditional).
    uncond_label: the null / negative label, a scalar or one per example (traced); broadcast against `labels`.
    labels: the labels to guide towards, [B, ...] (traced), or a scalar used for every example.

  Returns:
    A pytree callable `model_fn(x, t) -> float32 prediction` usable with every sampler in this package.
  """
  if not callable(cond_model_fn):
    raise ValueError(f"cond_model_fn must be callable (x, t, labels) -> prediction, got {type(cond_model_fn)}")
  scale = jnp.asarray(scale, jnp.float32)
  if scale.ndim > 1:
    raise ValueError(f"guidance scale must be a scalar or one per example [batch], got shape {scale.shape}")
  labels = jnp.asarray(labels)
  labels = labels.astype(labels.dtype)  # drop a weak type: weak and strong labels would be two programs
  uncond_label = jnp.asarray(uncond_label, labels.dtype)
  if labels.ndim >= 1 and scale.ndim == 0:
    scale = jnp.broadcast_to(scale, labels.shape[:1])  # scalar and per-example scales share one program
  return jax.tree_util.Partial(_guided_model, cond_model_fn, scale, uncond_label, labels)


def _guided_model(cond_model_fn, scale, uncond_label, labels, x, t):
  """u + scale * (c - u) from one call of `cond_model_fn` on the batch [x; x] with labels [labels; uncond]."""
  batch = x.shape[0]
  if labels.ndim == 0:
    labels = jnp.broadcast_to(labels, (batch,))
  if labels.shape[0] != batch:
    raise ValueError(f"guidance labels have leading dim {labels.shape[0]}, expected the batch size {batch}")
  try:
    uncond = jnp.broadcast_to(uncond_label, labels.shape)
  except ValueError:
    raise ValueError(f"uncond_label of shape {uncond_label.shape} does not broadcast to labels "
                     f"{labels.shape}") from None
  if scale.ndim == 1 and scale.shape[0] != batch:
    raise ValueError(f"per-example guidance scale has shape {scale.shape}, expected ({batch},)")
  out = cond_model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([labels, uncond]))
  if out.shape[0] != 2 * batch:
    raise ValueError(f"cond_model_fn returned leading dim {out.shape[0]} for a doubled batch of {2 * batch}")
  out = out.astype(jnp.float32)
  cond, unc = out[:batch], out[batch:]
  w = scale.reshape(scale.shape + (1,) * (cond.ndim - scale.ndim))
  return unc + w * (cond - unc)
