"""GAN configs (DCGAN family, `genjax.models.gan`): `--config=experiments/configs/gan.py:<variant>`.

  digits   8x8x1 scikit-learn digits, offline; class-conditional, non-saturating loss + lazy R1; 58k + 58k params.
           Measured on a 2-core machine shared with other jobs: 2,000 steps in 1m54s of CPU time (7m54s wall at
           load ~10); the grid is recognisable digits by step 1,000 (a logistic-regression digit classifier agrees
           with the conditioning label on 99% of samples).
  mnist    28x28x1; unconditional, hinge loss + R1.
  cifar10  32x32x3; class-conditional (projection D), hinge loss + lazy R1 — accelerator-sized.

`config.optimizer` trains the generator, `config.disc_optimizer` the discriminator (both `make_optimizer`).
"""
from __future__ import annotations

import ml_collections

from experiments.configs.common import pick_variant


def _gan_defaults(c: ml_collections.ConfigDict) -> None:
  c.family = "gan"
  c.model = ml_collections.ConfigDict(dict(
      latent_dim=64,
      gen_channels=(128, 64),        # lowest resolution first; x2 upsampling between entries
      disc_channels=(32, 64),        # full resolution first; stride-2 conv for every further entry
      disc_features=128,
      conditional=False,
      loss="non_saturating",         # "non_saturating" | "hinge" | "wgan_gp"
      r1_gamma=0.0,                  # 0 = no R1
      r1_interval=1,                 # lazy R1: every k steps, scaled by k
      gp_weight=10.0,                # WGAN-GP only
  ))
  # GAN optimisers: Adam with b1 = 0 or 0.5 and no clipping (clipping hides D/G imbalance in the grad norms).
  c.optimizer.update(name="adam", learning_rate=2e-4, b1=0.5, b2=0.99, schedule="constant", grad_clip_norm=0.0)
  c.disc_optimizer = ml_collections.ConfigDict(c.optimizer.to_dict())


def _digits(c):
  _gan_defaults(c)
  c.dataset.name = "digits"
  c.model.update(latent_dim=32, gen_channels=(64, 32, 16), disc_channels=(16, 32, 64), disc_features=64,
                 conditional=True, loss="non_saturating", r1_gamma=0.1, r1_interval=4)
  c.optimizer.learning_rate = 1e-3
  c.disc_optimizer.learning_rate = 1e-3
  c.batch_size = 64
  c.num_train_steps = 2000
  c.ema_decay = 0.99
  c.log_every_steps = 100            # a multiple of r1_interval (see disc/r1 in genjax/models/gan.py)
  c.checkpoint_every_steps = 1000
  c.sample_every_steps = 500
  c.eval_every_steps = 1000
  c.num_sample_images = 100
  c.num_eval_batches = 4


def _mnist(c):
  _gan_defaults(c)
  c.dataset.name = "mnist"
  c.model.update(latent_dim=64, gen_channels=(256, 128, 64), disc_channels=(64, 128, 256), disc_features=256,
                 conditional=False, loss="hinge", r1_gamma=1.0, r1_interval=4)
  c.batch_size = 128
  c.num_train_steps = 20000
  c.ema_decay = 0.999
  c.log_every_steps = 200
  c.checkpoint_every_steps = 2000
  c.sample_every_steps = 2000
  c.eval_every_steps = 2000


def _cifar10(c):
  _gan_defaults(c)
  c.dataset.name = "cifar10"
  c.model.update(latent_dim=128, gen_channels=(512, 256, 128, 64), disc_channels=(64, 128, 256, 512),
                 disc_features=512, conditional=True, loss="hinge", r1_gamma=0.1, r1_interval=16)
  c.optimizer.update(learning_rate=2e-4, b1=0.0, b2=0.99)
  c.disc_optimizer.update(learning_rate=2e-4, b1=0.0, b2=0.99)
  c.batch_size = 256
  c.num_train_steps = 100000
  c.ema_decay = 0.9999
  c.log_every_steps = 400            # a multiple of r1_interval, so the logged disc/r1 mean is unbiased
  c.checkpoint_every_steps = 5000
  c.sample_every_steps = 5000
  c.eval_every_steps = 5000


VARIANTS = {"digits": _digits, "mnist": _mnist, "cifar10": _cifar10}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return pick_variant("experiments/configs/gan.py", arg, VARIANTS)
