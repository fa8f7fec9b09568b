"""Image editing with a diffusion model: img2img (SDEdit) and inpainting (RePaint); jax only (no Flax).

    from genjax.samplers import NoiseSchedule, img2img_sample, inpaint_sample
    schedule = NoiseSchedule.linear()
    edited = img2img_sample(model_fn, schedule, image, strength=0.6, num_steps=50, rng=key)            # DDIM
    edited = img2img_sample(model_fn, schedule, image, strength=0.6, num_steps=18, rng=key, sampler="heun")
    filled = inpaint_sample(model_fn, schedule, x_T, known=image, mask=mask, num_steps=250, rng=key, num_resample=5)

img2img (Meng et al. 2022, SDEdit): noise `image` (in the model's data space, e.g. [-1, 1]) to a noise level set by
`strength` in [0, 1] and denoise it with any sampler of this package. As in diffusers, the sampler's own grid for
`num_steps` steps is cut to its last floor(num_steps * strength) steps; the image is noised to the first of them
(x_t = sqrt(abar_t) image + sqrt(1 - abar_t) eps, eps from `rng`), and the sampler runs that tail with
`timesteps=`. strength 1 is sampling from (almost pure) noise; small strengths keep the image's layout.

Inpainting (Lugmayr et al. 2022, RePaint): `mask` is 1 where `known` holds the pixels to keep and 0 where the model
fills in. Every DDPM step t -> t' combines the model's step for the unknown pixels with `known` noised afresh to t'
for the known ones (the last step to the clean sample puts `known` itself there); `num_resample` > 1 repeats each
step that many times, re-noising the combined x_t' back to t in between (q(x_t | x_t')), which lets the unknown
pixels agree with the known ones (replacement alone is biased: the unknown pixels never see the known ones'
noise-free values until the end). Model calls: num_steps * num_resample.

Runtime values (changing them compiles nothing): strength, num_steps, the mask and the known image, num_resample,
the rng; img2img needs a concrete strength (it sets the grid on the host). rng folding: img2img draws its starting
noise from fold_in(rng, 0) and passes fold_in(rng, 1) to a sampler that draws noise.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import UserError, show
from genjax.samplers.diffusion import _as_key, _concrete, _join_model, _split_model, check_clip, check_x_T, step_table
from genjax.samplers.registry import sampler_spec
from genjax.samplers.schedules import NoiseSchedule, check_prediction
from genjax.samplers.spacing import make_timesteps
from genjax.samplers.steps import SamplerState, ddim_step

__all__ = ["img2img_sample", "inpaint_sample"]


def img2img_sample(model_fn: Callable, schedule: NoiseSchedule, image, *, strength, num_steps, rng,
                   sampler: str = "ddim", **sampler_options) -> jax.Array:
  """SDEdit: `image` noised to the level of `strength`, then denoised by `sampler` (see module docstring).

  Args:
    model_fn: `(x, t) -> prediction`, as for the samplers.
    schedule: the model's training `NoiseSchedule`.
    image: float [B, ...] in the model's data space.
    strength: in (0, 1]; the fraction of the sampler's `num_steps`-step grid that is run (at least 1 step).
    num_steps: the full grid's length (int in [1, T]).
    rng: PRNG key (the starting noise, and the sampler's noise if it draws any).
    sampler: a name of `genjax.samplers.registry.DIFFUSION_SAMPLERS` ("ddim", "dpm_solver_3m", "heun", ...).
    **sampler_options: passed to the sampler (prediction, clip_denoised, eta, spacing, order, s_churn, ...).

  Returns:
    float32 edited images shaped like `image`.
  """
  spec = sampler_spec(sampler)
  if rng is None:
    raise UserError("img2img_sample draws the noise it adds to the image and needs rng (a PRNG key); got rng=None")
  for reserved in ("timesteps", "num_steps", "rng", "x_T"):
    if reserved in sampler_options:
      raise UserError(f"img2img_sample sets the sampler's {reserved} itself; do not pass {reserved}= as an option")
  if not isinstance(schedule, NoiseSchedule):
    raise UserError(f"schedule must be a genjax NoiseSchedule, got {type(schedule)}")
  timesteps = _tail_grid(schedule, strength, num_steps, sampler_options.pop("spacing", spec.defaults()["spacing"]),
                         sampler_options.pop("steps_offset", spec.defaults()["steps_offset"]))
  image = check_x_T(image).astype(jnp.float32)
  key = _as_key(rng)
  noise = jax.random.normal(jax.random.fold_in(key, 0), image.shape, jnp.float32)
  t0 = jnp.full((image.shape[0],), timesteps[0], timesteps.dtype)
  x_start = schedule.add_noise(image, noise, t0)
  return spec(model_fn, schedule, x_start, rng=jax.random.fold_in(key, 1), timesteps=timesteps, **sampler_options)


def _tail_grid(schedule: NoiseSchedule, strength, num_steps, spacing: str, steps_offset) -> np.ndarray:
  """The last floor(num_steps * strength) timesteps of the `num_steps`-step grid (diffusers' init_timestep)."""
  s = _concrete(strength)
  if s is None:
    raise UserError("img2img_sample needs a concrete strength (it picks the timestep grid on the host); "
                    "call it outside jit, strength changes still compile nothing")
  if s.ndim != 0 or not 0.0 < float(s) <= 1.0:
    raise UserError(f"strength must be a scalar in (0, 1], got {show(strength)}")
  n = _concrete(num_steps)
  T = schedule.num_timesteps
  if n is None or n.ndim != 0 or not np.issubdtype(n.dtype, np.integer) or not 1 <= int(n) <= T:
    raise UserError(f"num_steps must be an int in [1, {T}] (the schedule length), got {show(num_steps)}")
  if steps_offset is None:  # DDIM's default: 1 for "leading" (Stable Diffusion's), else 0
    steps_offset = 1 if spacing == "leading" else 0
  full = np.asarray(make_timesteps(schedule, int(n), spacing=spacing, steps_offset=steps_offset))
  keep = min(int(int(n) * float(s)), int(n))
  if keep < 1:
    raise UserError(f"strength={float(s)} with num_steps={int(n)} runs no step (floor(num_steps * strength) = 0); "
                    "raise strength or num_steps")
  return full[int(n) - keep:]


def inpaint_sample(model_fn: Callable, schedule: NoiseSchedule, x_T, *, known, mask, num_steps, rng,
                   num_resample=1, timesteps=None, spacing: str = "trailing", steps_offset=0,
                   prediction: str = "epsilon", clip_denoised=None) -> jax.Array:
  """RePaint inpainting with DDPM steps (see module docstring).

  Args:
    model_fn: `(x, t) -> prediction`, as for the samplers.
    schedule: the model's training `NoiseSchedule`.
    x_T: starting noise [B, ...] (standard normal).
    known: float, x_T's shape: the data-space values to keep where mask is 1.
    mask: float or bool broadcastable to x_T's shape (e.g. [B, H, W, 1] or [H, W, 1]): 1 = known, 0 = fill in.
    num_steps: DDPM steps (int in [1, T]); with timesteps / spacing / steps_offset as in `ddpm_sample`.
    rng: PRNG key (required: every step draws noise).
    num_resample: resamplings per step (int >= 1; runtime).
    prediction, clip_denoised: as in `ddpm_sample`.

  Returns:
    float32 samples shaped like x_T; where mask is 1 they equal `known` (up to the clipping of x0 there).
  """
  if rng is None:
    raise UserError("inpaint_sample draws noise at every step and needs rng (a PRNG key); got rng=None")
  if not isinstance(schedule, NoiseSchedule):
    raise UserError(f"schedule must be a genjax NoiseSchedule, got {type(schedule)}")
  prediction = check_prediction(prediction)
  x_T = check_x_T(x_T)
  known = jnp.asarray(known, jnp.float32)
  if known.shape != x_T.shape:
    raise UserError(f"known has shape {known.shape}, expected x_T's shape {x_T.shape}")
  mask = jnp.asarray(mask)
  try:
    mask = jnp.broadcast_to(mask.astype(jnp.float32), x_T.shape)
  except ValueError:
    raise UserError(f"mask of shape {mask.shape} does not broadcast to x_T's shape {x_T.shape}") from None
  m = _concrete(mask)
  if m is not None and not np.all((m == 0) | (m == 1)):
    raise UserError("mask must hold only 0 (fill in) and 1 (known)")
  r = _concrete(num_resample)
  if r is not None and (r.ndim != 0 or not np.issubdtype(r.dtype, np.integer) or int(r) < 1):
    raise UserError(f"num_resample must be an int >= 1, got {show(num_resample)}")
  table, n = step_table(schedule, num_steps, timesteps, spacing, steps_offset)
  dynamic, static = _split_model(model_fn)
  return _inpaint_loop(dynamic, schedule, x_T.astype(jnp.float32), known, mask, _as_key(rng), table, n,
                       jnp.asarray(num_resample, jnp.int32), check_clip(clip_denoised), model_static=static,
                       prediction=prediction)


@functools.partial(jax.jit, static_argnames=("model_static", "prediction"))
def _inpaint_loop(model_dynamic, schedule, x_T, known, mask, rng, table, num_steps, num_resample, clip, *,
                  model_static, prediction):
  model_fn = _join_model(model_dynamic, model_static)
  batch = x_T.shape[0]
  num_resample = jnp.maximum(num_resample, 1)

  def normal(*keys):
    key = rng
    for k in keys:
      key = jax.random.fold_in(key, k)
    return jax.random.normal(key, x_T.shape, jnp.float32)

  def step(i, x):
    t, t_next = table[i], table[i + 1]
    la, la_next = schedule.log_alpha_bar(t), schedule.log_alpha_bar(t_next)

    def once(u, x):
      out = model_fn(x, jnp.full((batch,), t, t.dtype))
      state = ddim_step(schedule, SamplerState.init(x), out, t, t_next, prediction=prediction, eta=1.0,
                        noise=normal(i, u, 0), clip_denoised=clip)
      # The known pixels, noised afresh to t_next (t_next = -1: alpha 1, sigma 0, i.e. `known` itself).
      known_next = jnp.exp(0.5 * la_next) * known + jnp.sqrt(-jnp.expm1(la_next)) * normal(i, u, 1)
      x_next = mask * known_next + (1.0 - mask) * state.x
      # Resample: back to t by the forward process q(x_t | x_t') (not after the last resampling).
      back = jnp.exp(0.5 * (la - la_next)) * x_next + jnp.sqrt(-jnp.expm1(la - la_next)) * normal(i, u, 2)
      return jnp.where(u + 1 < num_resample, back, x_next)

    return jax.lax.fori_loop(0, num_resample, once, x)

  return jax.lax.fori_loop(0, num_steps, step, x_T)
