"""Classifier-free guidance as a wrapper that turns a conditional model into a `model_fn(x, t)` for any sampler.

    import jax, jax.numpy as jnp
    from genjax.samplers import NoiseSchedule, classifier_free_guidance, ddim_sample
    schedule = NoiseSchedule.linear()
    def cond_model_fn(x, t, labels):     # optimal eps for class y ~ N(0.1 y, 0.5^2), null label 10 ~ N(0, 0.5^2)
      mu = jnp.where(labels == 10, 0.0, 0.1 * labels)[:, None]
      a = schedule.alpha_sigma(t)[0][:, None] ** 2
      return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * 0.25 + 1 - a)
    x_T, n = jax.random.normal(jax.random.key(0), (256, 1)), 256
    guided = classifier_free_guidance(cond_model_fn, scale=3.0, uncond_label=10, labels=jnp.full([n], 7))
    x0 = ddim_sample(guided, schedule, x_T, num_steps=50)            # or any sampler in genjax.samplers
    guided = classifier_free_guidance(cond_model_fn, scale=7.5, uncond_label=10, labels=jnp.full([n], 7),
                                      rescale=0.7, interval=(0, 700))

`cond_model_fn(x, t, labels) -> prediction` is the conditional network (x float [batch, ...], t int32 [batch],
labels [batch, ...]: class ids, or embeddings); `uncond_label` is the null / negative label the model was trained
with for dropped conditioning (a scalar, or one per example). The guided prediction is
u + scale * (c - u) with c = cond_model_fn(x, t, labels), u = cond_model_fn(x, t, uncond_label), evaluated in ONE
model call on a doubled batch and combined in float32. scale 0 is the unconditional model, 1 the conditional one,
> 1 extrapolates. The combination is the same in eps, v or x0 space (they are affine in each other at fixed x, t),
so it works with every `prediction=` setting.

Extras: `rescale=phi` (Lin et al. 2024's guidance rescale) and `interval=(t_lo, t_hi)` (guide only at those
timesteps, Kynkaeaenniemi et al. 2024).

`scale`, `uncond_label`, `labels`, `rescale` and `interval` are runtime values: the wrapper is a
`jax.tree_util.Partial` whose array leaves the samplers trace, so changing any of them between calls compiles
nothing new. Keep
`cond_model_fn` itself stable (build it once, or make it a `jax.tree_util.Partial(apply_fn, params)`): see
`genjax.samplers.diffusion` on how samplers key their compiled programs.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import UserError, show


def classifier_free_guidance(cond_model_fn: Callable, scale, uncond_label, labels, *, rescale=0.0,
                             interval=None) -> jax.tree_util.Partial:
  """A `model_fn(x, t)` that applies classifier-free guidance to `cond_model_fn(x, t, labels)`.

  Args:
    cond_model_fn: the conditional model, `(x [B, ...], t [B], labels [B, ...]) -> prediction [B, ...]`.
    scale: guidance scale w, a scalar or one per example [B] (traced; 0 = unconditional, 1 = conditional).
    uncond_label: the null / negative label, a scalar or one per example (traced); broadcast against `labels`.
    labels: the labels to guide towards, [B, ...] (traced), or a scalar used for every example.
    rescale: guidance rescale phi in [0, 1] (Lin et al. 2024, diffusers' `guidance_rescale`; traced): the guided
      prediction g is blended with g * std(c) / std(g) (stds per example over all non-batch axes) as
      phi * rescaled + (1 - phi) * g, which undoes the over-exposure of large scales (the paper uses v-prediction
      and phi = 0.7). 0 = plain guidance.
    interval: optional (t_lo, t_hi) (traced): guidance applies only at timesteps t_lo <= t <= t_hi; outside it the
      prediction is the conditional one (scale 1), as in Kynkaeaenniemi et al. 2024. None = every timestep.

  Returns:
    A pytree callable `model_fn(x, t) -> float32 prediction` usable with every sampler in this package.
  """
  if not callable(cond_model_fn):
    raise UserError(f"cond_model_fn must be callable (x, t, labels) -> prediction, got {type(cond_model_fn)}")
  scale = jnp.asarray(scale, jnp.float32)
  if scale.ndim > 1:
    raise UserError(f"guidance scale must be a scalar or one per example [batch], got shape {scale.shape}")
  labels = jnp.asarray(labels)
  labels = labels.astype(labels.dtype)  # drop a weak type: weak and strong labels would be two programs
  uncond_label = jnp.asarray(uncond_label, labels.dtype)
  if labels.ndim >= 1 and scale.ndim == 0:
    scale = jnp.broadcast_to(scale, labels.shape[:1])  # scalar and per-example scales share one program
  r = _concrete(rescale)
  if r is not None and (r.ndim != 0 or not 0.0 <= float(r) <= 1.0):
    raise UserError(f"guidance rescale must be a scalar in [0, 1], got {show(rescale)}")
  if interval is None:
    interval = (-jnp.inf, jnp.inf)
  if not isinstance(interval, (tuple, list)) or len(interval) != 2:
    raise UserError(f"guidance interval must be None or a (t_lo, t_hi) pair, got {interval!r}")
  lo, hi = (_concrete(v) for v in interval)
  if lo is not None and hi is not None and not float(lo) <= float(hi):
    raise UserError(f"guidance interval needs t_lo <= t_hi, got {interval!r}")
  window = jnp.asarray(interval, jnp.float32)
  return jax.tree_util.Partial(_guided_model, cond_model_fn, scale, uncond_label, labels,
                               jnp.asarray(rescale, jnp.float32), window)


def _concrete(value):
  try:
    return np.asarray(value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _guided_model(cond_model_fn, scale, uncond_label, labels, rescale, window, x, t):
  """u + w (c - u) from one call of `cond_model_fn` on the batch [x; x] with labels [labels; uncond], rescaled
  and restricted to the timestep window (see `classifier_free_guidance`)."""
  batch = x.shape[0]
  if labels.ndim == 0:
    labels = jnp.broadcast_to(labels, (batch,))
  if labels.shape[0] != batch:
    raise UserError(f"guidance labels have leading dim {labels.shape[0]}, expected the batch size {batch}")
  try:
    uncond = jnp.broadcast_to(uncond_label, labels.shape)
  except ValueError:
    raise UserError(f"uncond_label of shape {uncond_label.shape} does not broadcast to labels "
                    f"{labels.shape}") from None
  if scale.ndim == 1 and scale.shape[0] != batch:
    raise UserError(f"per-example guidance scale has shape {scale.shape}, expected ({batch},)")
  out = cond_model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([labels, uncond]))
  if out.shape[0] != 2 * batch:
    raise UserError(f"cond_model_fn returned leading dim {out.shape[0]} for a doubled batch of {2 * batch}")
  out = out.astype(jnp.float32)
  cond, unc = out[:batch], out[batch:]
  tb = jnp.broadcast_to(jnp.asarray(t), (batch,)).astype(jnp.float32)
  w = jnp.where((tb >= window[0]) & (tb <= window[1]), scale, 1.0)
  guided = unc + _bcast(w, cond) * (cond - unc)
  axes = tuple(range(1, cond.ndim))
  std_ratio = jnp.std(cond, axis=axes, keepdims=True) / jnp.maximum(jnp.std(guided, axis=axes, keepdims=True),
                                                                    1e-12)
  return rescale * (guided * std_ratio) + (1.0 - rescale) * guided


def _bcast(v, like):
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))
