r"""Sample from a trained run: a PNG grid + `.npz` for image families, printed continuations for the LM
(`genjax-sample` once installed, `pip install -e .`):

  python -m experiments.sample --workdir=runs/vae_digits
  python -m experiments.sample --workdir=runs/ddpm_digits --sampler=ddim --num_steps=50 --eta=0 --guidance=3 --label=7
  python -m experiments.sample --workdir=runs/gan_digits --truncation=0.7 --label=3 --interpolate
  python -m experiments.sample --workdir=runs/lm_pydoc --prompt="The return statement" --max_new_tokens=100 \
      --temperature=0.8 --top_p=0.9
  python -m experiments.sample --diffusers_model=ddpm-cifar10-32 --sampler=dpm_solver --num_steps=20 \
      --output=runs/cifar10/ddpm_dpm20
  python -m experiments.sample --hf_model=path/to/gpt2 --prompt="The return statement" --max_new_tokens=50
  python -m experiments.sample --workdir=runs/ddpm_digits --init_image=digit.png --strength=0.6    # edit: img2img
  python -m experiments.sample --workdir=runs/ddpm_digits --init_image=digit.png --inpaint_mask=mask.png  # inpaint
  python -m experiments.sample --workdir=runs/lm_pydoc --prompt="The return" --min_p=0.05 --stop=. --stop=$'\n\n'
  python -m experiments.sample --workdir=runs/lm_pydoc --prompt="The return" --max_new_tokens=300 \
      --allow_longer_context=512          # past the 128-byte context it was trained on, knowingly

Only the sample options you set (`experiments.cli.SAMPLE_OPTIONS`, the same flags as `experiments.evaluate`) are
passed to the family (`task.sample_images(params, rng, n, **options)` or `task.sample_text(params, prompts, rng,
**options)`); a family names any option it does not understand. Image files go under the run (or --output) and
are named from the checkpoint step actually loaded (an older one when the newest is unreadable), the number of
images, the seed and the options (`samples/sample_step2000_n64_seed0_sampler-ddim_num_steps-50.png`), so samples
drawn with other options never overwrite each other. The launcher asks the run's Task what it can do:
`--interpolate` also writes its `task.interpolate` grid (VAE: between test images; GAN: between random latents,
with --label and --truncation), and the editing flags draw with `task.edit` (diffusion); a Task without the
capability is one `error:` line naming what it can do.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import jax
import numpy as np
from absl import flags, logging

from experiments import cli, edit_flags
from genjax.errors import UserError
from genjax.interop import hf
from genjax.interop.diffusers import load_pipeline, sample_images
from genjax.models import transformer
from genjax.train.report import save_image_grid

FLAGS = flags.FLAGS
DIFFUSERS_OPTIONS = ("sampler", "num_steps", "eta")   # the sample options that apply to --diffusers_model
INTERPOLATION_OPTIONS = ("label", "truncation")   # sample options passed on to `task.interpolate`


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Run directory written by experiments.train.")
  flags.DEFINE_integer("num_samples", 64, "Images to draw.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("output", None, "Output path stem (default <workdir>/samples/sample_<step, n, seed, options>; "
                      "required with --diffusers_model).")
  flags.DEFINE_multi_string("prompt", [], "LM prompt(s); repeat the flag for a batch.")
  flags.DEFINE_bool("interpolate", False, "Also write a latent-interpolation grid (VAE, GAN; honours --label and "
                    "--truncation).")
  flags.DEFINE_string("diffusers_model", None, "Sample a diffusers UNet2DModel / DDPM pipeline directory (config.json "
                      "+ diffusion_pytorch_model.safetensors, scheduler_config.json; flat or unet/ + scheduler/) "
                      "instead of a run, with --sampler (any of genjax.interop.diffusers.SAMPLERS; default "
                      "dpm_solver), --num_steps (default 20), --eta.")
  flags.DEFINE_string("hf_model", None, "Decode a Hugging Face causal LM directory (GPT-2 / Llama / Mistral / Qwen2 "
                      "as save_pretrained writes it, with tokenizer.json) instead of a run: --prompt and the LM "
                      "sampling flags; EOS/pad ids come from its config files.")
  edit_flags.define_flags()   # --init_image, --strength, --inpaint_mask, --num_resample (diffusion editing)
  cli.define_sample_option_flags()
  flags.adopt_module_key_flags(cli)          # listed by --help, not only --helpfull
  flags.register_multi_flags_validator(
      ["workdir", "diffusers_model", "hf_model"], lambda given: sum(v is not None for v in given.values()) == 1,
      message="give exactly one of --workdir (a genjax run), --diffusers_model (a diffusers directory) or "
              "--hf_model (a Hugging Face LM directory)")


def output_stem(workdir: str, step: int, num_samples: int, seed: int, options: dict) -> str:
  """<workdir>/samples/sample_step<S>_n<N>_seed<K>[_<option>-<value>...]: a file per distinct request."""
  def value(v) -> str:     # a path option names its file; nothing that would make a directory or an odd name
    text = os.path.splitext(os.path.basename(v))[0] if isinstance(v, str) and os.sep in v else str(v)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "_"
  parts = [f"step{step}", f"n{num_samples}", f"seed{seed}"]
  parts += [f"{k}-{value(options[k])}" for k in cli.SAMPLE_OPTIONS if k in options]
  parts += [f"{k}-{value(options[k])}" for k in sorted(options) if k not in cli.SAMPLE_OPTIONS]
  return os.path.join(workdir, "samples", "sample_" + "_".join(parts))


def check_request(workdir: str, *, num_samples: int, output) -> None:
  """What can be checked before any checkpoint is read."""
  cli.check_run_dir(workdir)
  if num_samples < 1:
    raise UserError(f"--num_samples={num_samples} must be >= 1")
  if output is not None and os.path.isdir(output):
    raise UserError(f"--output={output!r} is a directory; give a path stem such as {output.rstrip('/')}/grid")


def sample_run(workdir: str, *, options: dict, num_samples: int = 64, seed: int = 0, step=None, output=None,
               prompts=(), interpolate: bool = False, edits: Optional[dict] = None) -> dict:
  """Loads the run, samples, writes files; returns {"images" | "texts": ..., "paths": [...], "step": the checkpoint
  step loaded}. `edits`: the editing flags of `experiments.edit_flags` (for a Task that can `edit`)."""
  check_request(workdir, num_samples=num_samples, output=output)
  edit_opts, edit_parts = edit_flags.edit_options(edits or {})

  run = cli.load_run(workdir, step=step)
  task, params = run.task, run.params
  rng = jax.random.PRNGKey(seed)
  if interpolate:
    task.require("interpolate", "--interpolate")
  if edit_opts:
    task.require("edit", "--" + ", --".join(edits))
  if prompts:
    task.require("sample_text", "--prompt")
  if task.sample_text is not None:
    if not prompts:
      raise UserError("this is a text model: give at least one --prompt")
    texts = task.sample_text(params, list(prompts), rng, **options)
    print_texts(prompts, texts, options.get("stop") or ())
    return {"texts": texts, "paths": [], "step": run.step}
  task.require("sample_images", "experiments.sample")
  # The family checks its options on the host (labels, truncation, ...) and jits its own sampler.
  draw = task.edit if edit_opts else task.sample_images
  images = np.asarray(draw(params, rng, num_samples, **options, **edit_opts))
  grid = None
  if interpolate:
    kw = {k: options[k] for k in INTERPOLATION_OPTIONS if k in options}
    grid, cols = task.interpolate(params, jax.random.fold_in(rng, 1), **kw)
  stem = output or "_".join([output_stem(workdir, run.step, num_samples, seed, options)] + edit_parts)
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  paths = [save_image_grid(images, stem + ".png")]
  np.savez(stem + ".npz", images=images)
  paths.append(stem + ".npz")
  if grid is not None:
    paths.append(save_image_grid(np.asarray(grid), stem + "_interpolation.png", columns=cols))
  return {"images": images, "paths": paths, "step": run.step}


def sample_diffusers(model_dir: str, *, options: dict, num_samples: int = 64, seed: int = 0, output=None) -> dict:
  """Samples a diffusers DDPM directory with a genjax sampler (default dpm_solver, 20 steps); with `output` (a path
  stem) writes <output>.png and <output>.npz (the launcher requires --output: there is no run to write under)."""
  extra = [k for k in options if k not in DIFFUSERS_OPTIONS]
  if extra:
    raise UserError(f"--{extra[0]} does not apply to --diffusers_model; valid: --" + ", --".join(DIFFUSERS_OPTIONS))
  if num_samples < 1:
    raise UserError(f"--num_samples={num_samples} must be >= 1")
  images = sample_images(load_pipeline(model_dir), jax.random.PRNGKey(seed), num_samples, **options)
  if output is None:
    return {"images": images, "paths": []}
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  np.savez(output + ".npz", images=images)
  return {"images": images, "paths": [save_image_grid(images, output + ".png"), output + ".npz"]}


def sample_hf(model_dir: str, *, options: dict, prompts, seed: int = 0) -> dict:
  """Continuations of `prompts` by the Hugging Face LM in `model_dir`, decoded with its own tokenizer."""
  if not prompts:
    raise UserError("--hf_model is a text model: give at least one --prompt")
  cfg, params = hf.load_lm(model_dir)
  texts = transformer.sample_text(cfg, params, list(prompts), jax.random.PRNGKey(seed),
                                  tokenizer=hf.load_tokenizer(model_dir), **options)
  print_texts(prompts, texts, options.get("stop") or ())
  return {"texts": texts, "paths": []}


def print_texts(prompts, texts, stops=()) -> None:
  """Each prompt and its continuation; a continuation that ended at a `--stop` string says which one."""
  for p, t in zip(prompts, texts):
    hit = next((s for s in stops if t.endswith(s)), None)
    print(f"--- prompt: {p!r}\n{p}{t}\n" + ("" if hit is None else f"--- stopped at --stop={hit!r}\n"))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # this launcher prints what it does; library INFO lines are noise here
  edits = edit_flags.edits_from_flags()
  if edits and FLAGS.workdir is None:
    raise UserError(f"--{', --'.join(edits)} edit the images of a genjax run: give --workdir")
  if FLAGS.hf_model is not None:
    sample_hf(FLAGS.hf_model, options=cli.sample_options_from_flags(), prompts=FLAGS.prompt, seed=FLAGS.seed)
    return
  if FLAGS.diffusers_model is not None:
    if FLAGS.prompt:
      raise UserError("--prompt needs a text model; --diffusers_model samples images (use --hf_model for a Hugging "
                      "Face LM)")
    if FLAGS.output is None:
      raise UserError("--diffusers_model needs --output=PATH_STEM (e.g. --output=runs/cifar/ddpm_dpm20): there is no "
                      "run directory to write under")
    out = sample_diffusers(FLAGS.diffusers_model, options=cli.sample_options_from_flags(),
                           num_samples=FLAGS.num_samples, seed=FLAGS.seed, output=FLAGS.output)
    for p in out["paths"]:
      print(f"wrote {p}")
    return
  out = sample_run(FLAGS.workdir, options=cli.sample_options_from_flags(), num_samples=FLAGS.num_samples,
                   seed=FLAGS.seed, step=FLAGS.step, output=FLAGS.output, prompts=FLAGS.prompt,
                   interpolate=FLAGS.interpolate, edits=edits)
  for p in out["paths"]:
    print(f"wrote {p}")


def entry() -> None:
  """The `genjax-sample` console script: `python -m experiments.sample` with the same flags."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  entry()
