"""Diffusion configs (U-Net DDPM family, `genjax.models.diffusion`): `--config=experiments/configs/ddpm.py:<variant>`.

  digits         8x8x1 scikit-learn digits, offline; class-conditional with label dropout (guidance-ready), small
                 U-Net that gives recognisable digits in minutes on 2 CPU cores (docs/results.md has the measured time).
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

Model fields (`config.model`): `genjax.models.diffusion.DiffusionConfig` declares each one, its default and its
meaning (the U-Net shape; conditioning and classifier-free guidance; prediction and schedule; the default sampler of
the loop's sample grids; pixel or latent space, with the VAE's model section `vae`, a `genjax.models.vae.VAEConfig`).
A variant sets only what it changes.
"""
from __future__ import annotations

from experiments.configs import vae as vae_configs
from experiments.configs.common import every, pick_variant
from genjax.models.diffusion import DiffusionConfig
from genjax.models.fields import config_section


def _ddpm(c, dataset: str) -> None:
  """The diffusion family on `dataset`: DiffusionConfig's defaults, batch 128, Adam at 2e-4 after 500 warmup steps."""
  c.family = "diffusion"
  c.dataset.name = dataset
  c.model = config_section(DiffusionConfig)
  c.model.vae = vae_configs.get_config("digits").model   # latent: the VAE run of vae.py:digits (the run's must equal)
  c.optimizer.update(learning_rate=2e-4, warmup_steps=500)
  c.batch_size = 128


def _digits(c):
  _ddpm(c, "digits")           # 1,000 steps (base_config's): recognisable digits from ~500, clean ones by 1,000
  c.model.update(ch=32, num_res_blocks=1, norm_groups=8)
  c.optimizer.update(learning_rate=2e-3, warmup_steps=100)
  c.update(ema_decay=0.995, log_every_steps=100, sample_every_steps=250, num_sample_images=100, num_eval_batches=2)


def _flow_digits(c):
  _digits(c)
  # schedule "flow" + prediction "velocity" select flow matching; num_timesteps is then only the U-Net's time scale
  # and the cap on num_steps. clip_denoised does not apply (decoding clips the final images to [0, 1]).
  c.model.update(schedule="flow", prediction="velocity", sampler="heun", num_sample_steps=25, clip_denoised=False)


def _mnist(c):
  _ddpm(c, "mnist")
  c.model.update(ch_mult=(1, 2, 2), attn_resolutions=(7,), dropout=0.1, guidance=2.0)
  c.optimizer.warmup_steps = 1000
  c.update(num_train_steps=50000, ema_decay=0.9995, log_every_steps=200, num_sample_images=100)
  every(c, 5000)


def _cifar10(c):
  _ddpm(c, "cifar10")
  c.model.update(ch=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), dropout=0.1, schedule="linear",
                 num_sample_steps=20, sampler="dpm_solver", guidance=2.0)
  c.optimizer.warmup_steps = 5000
  c.update(compute_dtype="bfloat16", num_train_steps=400000, ema_decay=0.9999, log_every_steps=500)
  every(c, 10000)


def _latent_digits(c):
  _digits(c)
  c.num_train_steps = 2000           # ~20 steps/s on 2 CPU cores: the latent is a vector
  # The VAE latent is a vector [d], diffused as [1, 1, d]: one level, no downsampling. There is no data range to
  # clip predicted x0 to, so predict v: with the cosine schedule abar_{T-1} ~ 2e-9, and x0 = (x - sigma eps) / alpha
  # from an eps-prediction amplifies its error ~2e4x at the first sampling step (x0 = alpha x - sigma v does not).
  c.model.update(space="latent", vae_workdir="/tmp/genjax/vae_digits")   # the VAE run of vae.py:digits
  c.model.update(ch=64, ch_mult=(1,), num_res_blocks=2, attn_resolutions=(), clip_denoised=False, prediction="v")
  c.optimizer.learning_rate = 1e-3


VARIANTS = {"digits": _digits, "flow_digits": _flow_digits, "mnist": _mnist, "cifar10": _cifar10,
            "latent_digits": _latent_digits}


def get_config(arg=None):
  return pick_variant("ddpm.py", arg, VARIANTS)
