"""Editing with a trained diffusion run: img2img (SDEdit) and inpainting (RePaint), the family's side of
`experiments.sample --init_image=PNG [--strength=S | --inpaint_mask=PNG]`.

    images = task.sample_images(params, rng, n, init_image=img, strength=0.6)                  # img2img
    images = task.sample_images(params, rng, n, init_image=img, inpaint_mask=mask, num_resample=5)

`init_image`: images in [0, 1], [H, W, C] (used for every sample) or [n, H, W, C]; a 3-channel image for a
1-channel model is averaged to grey (and a grey one repeated for an RGB model). img2img runs
`genjax.samplers.img2img_sample` with the `sampler` option (any name of the sampler registry's
DIFFUSION_SAMPLERS) and `num_steps`; inpainting runs `genjax.samplers.inpaint_sample` (RePaint's
DDPM steps, `num_steps` of them, each `num_resample` times) with `inpaint_mask` [H, W] or [H, W, 1] in {0, 1}:
1 = keep the image's pixel, 0 = fill in. Pixel-space VP models only (not flow matching; inpainting not in a VAE's
latent space). strength, the mask and num_resample are runtime values (changing them compiles nothing).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import UserError
from genjax.samplers.editing import inpaint_sample, img2img_sample

EDIT_OPTIONS = ("init_image", "strength", "inpaint_mask", "num_resample")


def check_edit_options(edits: dict, *, flow: bool, sampler_given: bool) -> None:
  """Which combinations make sense; one error naming the offending option otherwise."""
  if "init_image" not in edits:
    raise UserError(f"{sorted(edits)[0]} edits an image: give init_image too (experiments.sample --init_image=PNG)")
  if flow:
    raise UserError("image editing (init_image) needs a VP diffusion model; this run is flow matching")
  if ("strength" in edits) == ("inpaint_mask" in edits):
    raise UserError("init_image needs exactly one of strength (img2img) or inpaint_mask (inpainting)")
  if "num_resample" in edits and "inpaint_mask" not in edits:
    raise UserError("num_resample applies to inpainting (inpaint_mask) only")
  if "inpaint_mask" in edits and sampler_given:
    raise UserError("inpainting runs RePaint's DDPM steps: leave the sampler option unset")


def _as_images(image, shape, n, name) -> np.ndarray:
  img = np.asarray(image, np.float32)
  if img.ndim == 3:
    img = np.broadcast_to(img, (n,) + img.shape)
  if img.ndim != 4 or img.shape[0] != n or img.shape[1:3] != tuple(shape[:2]):
    raise UserError(f"{name} has shape {np.shape(image)}; this model's images are {tuple(shape)} "
                    f"([H, W, C] or [{n}, H, W, C])")
  if img.shape[-1] != shape[-1]:
    if shape[-1] == 1 and img.shape[-1] in (3, 4):
      img = img[..., :3].mean(axis=-1, keepdims=True)
    elif shape[-1] == 3 and img.shape[-1] == 1:
      img = np.repeat(img, 3, axis=-1)
    else:
      raise UserError(f"{name} has {img.shape[-1]} channels; this model's images have {shape[-1]}")
  return img


def edit_images(model_fn, schedule, space, params, rng, n: int, options: dict, edits: dict,
                prediction: str) -> jax.Array:
  """img2img or inpainting with `model_fn` (the run's conditional / guided denoiser); images [n, H, W, C] in
  [0, 1]. `space` is the run's `genjax.models.diffusion_space.Space` (encode / decode / shape / clip, pixel or VAE
  latent); `options` the validated sample options."""
  pixel_shape = tuple(np.shape(space.decode(params, jnp.zeros((1,) + space.shape, jnp.float32)))[1:])
  image = _as_images(edits["init_image"], pixel_shape, n, "init_image")
  if image.min() < 0 or image.max() > 1:
    raise UserError(f"init_image values must lie in [0, 1], got [{image.min()}, {image.max()}]")
  x_image = space.encode(params, jnp.asarray(image))
  key = rng
  kw = dict(prediction=prediction, clip_denoised=space.clip)
  if "inpaint_mask" in edits:
    if x_image.shape[1:] != pixel_shape:
      raise UserError("inpainting needs a pixel-space model; this run diffuses in a VAE's latent space")
    mask = np.asarray(edits["inpaint_mask"], np.float32)
    mask = mask[..., None] if mask.ndim == 2 else mask
    if mask.shape[:2] != pixel_shape[:2] or mask.ndim != 3 or mask.shape[-1] not in (1, pixel_shape[-1]):
      raise UserError(f"inpaint_mask has shape {np.shape(edits['inpaint_mask'])}; expected [H, W] or [H, W, 1] "
                      f"with H, W = {pixel_shape[:2]}")
    x_T = jax.random.normal(jax.random.fold_in(key, 0), x_image.shape, jnp.float32)
    num_resample = int(edits.get("num_resample", 1))
    x0 = inpaint_sample(model_fn, schedule, x_T, known=x_image, mask=mask, num_steps=options["num_steps"],
                        rng=jax.random.fold_in(key, 1), num_resample=num_resample, **kw)
  else:
    extra = {"eta": options["eta"]} if options["eta"] != 0.0 else {}   # sample_options: eta > 0 only for DDIM
    x0 = img2img_sample(model_fn, schedule, x_image, strength=float(edits["strength"]),
                        num_steps=options["num_steps"], rng=key, sampler=options["sampler"], **extra, **kw)
  return space.decode(params, x0)
