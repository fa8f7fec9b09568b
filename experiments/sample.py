r"""Sample from a trained run: a PNG grid + `.npz` for image families, printed continuations for the LM.

  python -m experiments.sample --workdir=runs/vae
  python -m experiments.sample --workdir=runs/ddpm --sampler=ddim --num_steps=50 --eta=0 --guidance=3 --label=7
  python -m experiments.sample --workdir=runs/gan --truncation=0.7 --interpolate
  python -m experiments.sample --workdir=runs/lm --prompt="The return statement" --max_new_tokens=200 \
      --temperature=0.8 --top_p=0.9

Only the sampler flags you set are passed to the family (`task.sample_images(params, rng, n, **options)` or
`task.sample_text(params, prompts, rng, **options)`); a family names any option it does not understand.
`--interpolate` also writes a latent-interpolation grid for families that have one (VAE: between test images;
GAN: between random latents).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
# name -> (kind, help). Each becomes a flag whose value reaches the family only when given on the command line.
SAMPLER_FLAGS = {
    "sampler": ("string", "diffusion: ddpm | ddim | dpm_solver"),
    "num_steps": ("integer", "diffusion sampler steps"),
    "eta": ("float", "DDIM eta (0 = deterministic)"),
    "guidance": ("float", "classifier-free guidance scale"),
    "label": ("integer", "class label for conditional models"),
    "truncation": ("float", "GAN truncation"),
    "temperature": ("float", "LM sampling temperature / VAE latent scale"),
    "top_k": ("integer", "LM top-k"),
    "top_p": ("float", "LM nucleus p"),
    "repetition_penalty": ("float", "LM repetition penalty (HF-style)"),
    "presence_penalty": ("float", "LM presence penalty"),
    "frequency_penalty": ("float", "LM frequency penalty"),
    "num_beams": ("integer", "LM beam search width (1 = sampling)"),
    "max_new_tokens": ("integer", "LM tokens to generate"),
}


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Run directory written by experiments.train.")
  flags.DEFINE_integer("num_samples", 64, "Images to draw.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("output", None, "Output path stem (default <workdir>/samples/sample_<sampler>).")
  flags.DEFINE_multi_string("prompt", [], "LM prompt(s); repeat the flag for a batch.")
  flags.DEFINE_bool("interpolate", False, "Also write a latent-interpolation grid (VAE, GAN).")
  for name, (kind, help_) in SAMPLER_FLAGS.items():
    getattr(flags, f"DEFINE_{kind}")(name, None, help_)
  flags.mark_flags_as_required(["workdir"])


def sample_run(workdir: str, *, options: dict, num_samples: int = 64, seed: int = 0, step=None, output=None,
               prompts=(), interpolate: bool = False) -> dict:
  """Loads the run, samples, writes files; returns {"images" | "texts": ..., "paths": [...]}."""
  import jax
  import numpy as np
  from genjax.models import family_module, get_task
  from genjax.train.checkpoint import load_run
  from genjax.train.report import save_image_grid

  config, params = load_run(workdir, step=step)
  task = get_task(config)
  rng = jax.random.PRNGKey(seed)
  stem = output or os.path.join(workdir, "samples", "sample_" + str(options.get("sampler", "default")))
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  if task.sample_text is not None:
    if not prompts:
      raise ValueError("this is a text model: give at least one --prompt")
    texts = task.sample_text(params, list(prompts), rng, **options)
    for p, t in zip(prompts, texts):
      print(f"--- prompt: {p!r}\n{p}{t}\n")
    return {"texts": texts, "paths": []}
  if task.sample_images is None:
    raise ValueError(f"family {config.family!r} has no sampler")
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  images = np.asarray(jax.jit(lambda p, r: task.sample_images(p, r, num_samples, **options))(params, rng))
  paths = [save_image_grid(images, stem + ".png")]
  np.savez(stem + ".npz", images=images)
  paths.append(stem + ".npz")
  module = family_module(config.family)
  if interpolate:
    if not hasattr(module, "interpolation_images"):
      raise ValueError(f"family {config.family!r} has no interpolation grid")
    grid, cols = module.interpolation_images(config, params, jax.random.fold_in(rng, 1))
    paths.append(save_image_grid(np.asarray(grid), stem + "_interpolation.png", columns=cols))
  return {"images": images, "paths": paths}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  options = {name: FLAGS[name].value for name in SAMPLER_FLAGS if FLAGS[name].present}
  try:
    out = sample_run(FLAGS.workdir, options=options, num_samples=FLAGS.num_samples, seed=FLAGS.seed,
                     step=FLAGS.step, output=FLAGS.output, prompts=FLAGS.prompt, interpolate=FLAGS.interpolate)
  except (ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  for p in out["paths"]:
    logging.info("wrote %s", p)
    print(p)


if __name__ == "__main__":
  define_flags()
  app.run(main)
