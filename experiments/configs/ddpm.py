"""Diffusion configs (U-Net DDPM family, `genjax.models.diffusion`): `--config=experiments/configs/ddpm.py:<variant>`.

  digits         8x8x1 scikit-learn digits, offline; class-conditional with label dropout (guidance-ready), small
                 U-Net that gives recognisable digits in minutes on 2 CPU cores (the README has the measured time).
  flow_digits    digits with the flow-matching (rectified flow) objective instead of DDPM: the same U-Net regresses
                 the velocity eps - x0 of x_t = (1 - t) x0 + t eps (t in [0, 1], seen by the U-Net as
                 t * num_timesteps); sampled by integrating the ODE from noise (sampler "euler" | "heun" |
                 "midpoint", `genjax.samplers.flow_sample`).
  mnist          28x28x1, class-conditional; accelerator-sized.
  cifar10        32x32x3, the DDPM paper's U-Net shape (ch 128, mults 1-2-2-2, attention at 16x16, dropout 0.1);
                 accelerator-sized, bf16 compute.
  latent_digits  the diffusion model trained in the latent space of a trained VAE run (`model.space="latent"`;
                 `--config.model.vae_workdir=DIR`, default /tmp/genjax/vae_digits: train it first with
                 `python -m experiments.train --config=experiments/configs/vae.py:digits --workdir=DIR`). The VAE's
                 architecture is `model.vae` (vae.py:digits' model section; the run's must equal it). Only a run that
                 starts from scratch reads the VAE run: its params and the latent scale are copied into this run's
                 params, so its checkpoints resume, sample and evaluate without the VAE run.

Model fields (`config.model`, typed as `genjax.models.diffusion.DiffusionConfig`): the U-Net shape (ch, ch_mult,
num_res_blocks, attn_resolutions, num_heads, dropout, norm_groups); conditional + label_dropout (classifier-free
guidance); prediction ("epsilon" | "v" | "x0"; "velocity" for flow); schedule ("linear" | "cosine" | "flow") with
num_timesteps, beta_start, beta_end, cosine_s, flow_shift; the default sampler used for the loop's sample grids
(sampler, num_sample_steps, eta, guidance); clip_denoised; space ("pixel" | "latent") with, for latent,
vae_workdir, latent_scale (0 = 1 / std of the VAE encoder means over up to 4,096 training images, measured when
the run starts) and vae (the VAE's model section, `genjax.models.vae.VAEConfig`).
"""
from __future__ import annotations

import ml_collections

from experiments.configs import vae as vae_configs
from experiments.configs.common import pick_variant


def _ddpm_defaults(c: ml_collections.ConfigDict) -> None:
  c.family = "diffusion"
  c.model = ml_collections.ConfigDict(dict(
      ch=64,
      ch_mult=(1, 2),                 # channel multiplier per resolution level (a stride-2 conv between levels)
      num_res_blocks=2,
      attn_resolutions=(4,),          # spatial sizes that get self-attention (the middle block always has it)
      num_heads=4,
      dropout=0.0,
      norm_groups=32,
      conditional=True,               # class-conditional; the null label (index num_classes) is the unconditional
      label_dropout=0.1,              # P(label -> null label) during training: trains the guidance model too
      prediction="epsilon",           # "epsilon" | "v" | "x0"
      schedule="cosine",              # "linear" | "cosine" | "flow" (flow matching: prediction "velocity")
      num_timesteps=1000,
      beta_start=1e-4,                # linear schedule only
      beta_end=0.02,                  # linear schedule only
      cosine_s=0.008,                 # cosine schedule only
      flow_shift=1.0,                 # flow only: SD3-style time shift of training times and sampling grid (1 = none)
      sampler="ddim",                 # default sampler for sample grids: genjax.models.diffusion.SAMPLERS
      num_sample_steps=50,
      eta=0.0,
      guidance=1.0,                   # classifier-free guidance scale (1 = plain conditional model)
      clip_denoised=True,             # clip the predicted x0 to the data range [-1, 1] while sampling
      space="pixel",                  # "pixel" | "latent": diffuse the latents of the VAE `vae` (latent_digits)
      vae_workdir="",                 # latent: the trained VAE run whose params init copies (only init reads it)
      latent_scale=0.0,               # latent: x0 = latent_scale * encoder mean; 0 = 1 / std over the data, at init
      vae=vae_configs.get_config("digits").model,   # latent: the VAE's model section; the run's must equal it
  ))
  c.optimizer.update(name="adam", learning_rate=2e-4, schedule="constant", warmup_steps=500, grad_clip_norm=1.0)


def _digits(c):
  _ddpm_defaults(c)
  c.dataset.name = "digits"
  c.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), norm_groups=8,
                 num_sample_steps=50, guidance=1.0)
  c.optimizer.update(learning_rate=2e-3, warmup_steps=100)
  c.batch_size = 128
  c.num_train_steps = 1000           # recognisable digits from ~500 steps, clean ones by 1000 (see the README)
  c.ema_decay = 0.995
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  c.sample_every_steps = 250
  c.eval_every_steps = 500
  c.num_sample_images = 100
  c.num_eval_batches = 2


def _flow_digits(c):
  _digits(c)
  # schedule "flow" + prediction "velocity" select flow matching; num_timesteps is then only the U-Net's time scale
  # and the cap on num_steps. clip_denoised does not apply (decoding clips the final images to [0, 1]).
  c.model.update(schedule="flow", prediction="velocity", sampler="heun", num_sample_steps=25, clip_denoised=False,
                 flow_shift=1.0)


def _mnist(c):
  _ddpm_defaults(c)
  c.dataset.name = "mnist"
  c.model.update(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,), dropout=0.1,
                 num_sample_steps=50, guidance=2.0)
  c.optimizer.update(learning_rate=2e-4, warmup_steps=1000)
  c.batch_size = 128
  c.num_train_steps = 50000
  c.ema_decay = 0.9995
  c.log_every_steps = 200
  c.checkpoint_every_steps = 5000
  c.sample_every_steps = 5000
  c.eval_every_steps = 5000
  c.num_sample_images = 100


def _cifar10(c):
  _ddpm_defaults(c)
  c.dataset.name = "cifar10"
  c.model.update(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
                 prediction="epsilon", schedule="linear", num_sample_steps=20, sampler="dpm_solver", guidance=2.0)
  c.optimizer.update(learning_rate=2e-4, warmup_steps=5000)
  c.compute_dtype = "bfloat16"
  c.batch_size = 128
  c.num_train_steps = 400000
  c.ema_decay = 0.9999
  c.log_every_steps = 500
  c.checkpoint_every_steps = 10000
  c.sample_every_steps = 10000
  c.eval_every_steps = 10000
  c.num_sample_images = 64


def _latent_digits(c):
  _digits(c)
  c.num_train_steps = 2000           # ~20 steps/s on 2 CPU cores: the latent is a vector
  # The VAE latent is a vector [d], diffused as [1, 1, d]: one level, no downsampling. There is no data range to
  # clip predicted x0 to, so predict v: with the cosine schedule abar_{T-1} ~ 2e-9, and x0 = (x - sigma eps) / alpha
  # from an eps-prediction amplifies its error ~2e4x at the first sampling step (x0 = alpha x - sigma v does not).
  c.model.update(space="latent", vae_workdir="/tmp/genjax/vae_digits", latent_scale=0.0,
                 vae=vae_configs.get_config("digits").model)   # the VAE run of vae.py:digits
  c.model.update(ch=64, ch_mult=(1,), num_res_blocks=2, attn_resolutions=(), clip_denoised=False, prediction="v")
  c.optimizer.update(learning_rate=1e-3)


VARIANTS = {"digits": _digits, "flow_digits": _flow_digits, "mnist": _mnist, "cifar10": _cifar10,
            "latent_digits": _latent_digits}


def get_config(arg=None) -> ml_collections.ConfigDict:
  return pick_variant("ddpm.py", arg, VARIANTS)
