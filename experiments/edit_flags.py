"""`experiments.sample`'s image-editing flags for diffusion runs: img2img and inpainting from PNG files.

  python -m experiments.sample --workdir=runs/ddpm_digits --init_image=digit.png --strength=0.6      # img2img
  python -m experiments.sample --workdir=runs/ddpm_digits --init_image=digit.png --inpaint_mask=mask.png \\
      --num_steps=250 --num_resample=5                                                           # inpainting

`--init_image` is a PNG of the model's H x W (grey or RGB; values / 255); `--inpaint_mask` a PNG of the same H x W,
white = keep the image's pixel, black = fill in. The family gets them as the sample options `init_image`,
`strength`, `inpaint_mask`, `num_resample` (see `genjax.models.diffusion_editing`) and draws `--num_samples` edits.
"""
from __future__ import annotations

import os

import numpy as np
from absl import flags
from PIL import Image

from genjax.errors import UserError

EDIT_FLAGS = ("init_image", "strength", "inpaint_mask", "num_resample")


def define_flags() -> None:
  flags.DEFINE_string("init_image", None, "Diffusion editing: a PNG to edit (the model's H x W), with --strength "
                      "(img2img) or --inpaint_mask (inpainting).")
  flags.DEFINE_float("strength", None, "img2img strength in (0, 1]: the fraction of the sampler's steps run from "
                     "the noised --init_image (1 = sample from noise).")
  flags.DEFINE_string("inpaint_mask", None, "Inpainting mask PNG (H x W): white = keep --init_image's pixel, black "
                      "= fill in.")
  flags.DEFINE_integer("num_resample", None, "Inpainting: RePaint resamplings per step (default 1).")


def edits_from_flags() -> dict:
  """{flag: value} of the editing flags given on the command line."""
  return {name: flags.FLAGS[name].value for name in EDIT_FLAGS if flags.FLAGS[name].present}


def load_png(path: str, flag: str):
  """A PNG as float32 [H, W, 1] (grey) or [H, W, 3] (colour) in [0, 1]."""
  if not os.path.isfile(path):
    raise UserError(f"--{flag}={path!r} is not a file (give a PNG)")
  try:
    with Image.open(path) as im:
      rgb = np.asarray(im.convert("RGB"), np.float32) / 255.0
  except OSError as e:
    raise UserError(f"--{flag}={path!r} is not a readable image: {e}") from None
  return rgb[..., :1] if np.all(rgb == rgb[..., :1]) else rgb


def edit_options(edits: dict) -> tuple[dict, list[str]]:
  """(the family's editing options, output file-name parts) from the editing flags: PNGs loaded, the mask 0 / 1."""
  unknown = sorted(set(edits) - set(EDIT_FLAGS))
  if unknown:
    raise UserError(f"unknown editing options {unknown}; valid: {list(EDIT_FLAGS)}")
  opts, parts = {}, []
  if edits.get("init_image") is not None:
    opts["init_image"] = load_png(edits["init_image"], "init_image")
    parts.append("edit-" + os.path.splitext(os.path.basename(edits["init_image"]))[0])
  if edits.get("inpaint_mask") is not None:
    opts["inpaint_mask"] = (load_png(edits["inpaint_mask"], "inpaint_mask").mean(axis=-1) > 0.5).astype("float32")
    parts.append("mask-" + os.path.splitext(os.path.basename(edits["inpaint_mask"]))[0])
  for name in ("strength", "num_resample"):
    if edits.get(name) is not None:
      opts[name] = edits[name]
      parts.append(f"{name}-{edits[name]}")
  return opts, parts
