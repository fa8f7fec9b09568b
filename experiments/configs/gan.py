"""GAN configs (DCGAN family, `genjax.models.gan`): `--config=experiments/configs/gan.py:<variant>`.

  digits   8x8x1 scikit-learn digits, offline; class-conditional, non-saturating loss + lazy R1; 58k + 58k params.
           Measured on a 2-core machine shared with other jobs: 2,000 steps in 1m54s of CPU time (7m54s wall at
           load ~10); the grid is recognisable digits by step 1,000 (a logistic-regression digit classifier agrees
           with the conditioning label on 99% of samples).
  mnist    28x28x1; unconditional, hinge loss + R1.
  cifar10  32x32x3; class-conditional (projection D), hinge loss + lazy R1 — accelerator-sized.

Model fields (`config.model`): `genjax.models.gan.GANConfig` declares each one, its default and its meaning; a variant
sets only what it changes. `config.optimizer` trains the generator, `config.disc_optimizer` the discriminator (both
`make_optimizer`).
"""
from __future__ import annotations

import ml_collections

from experiments.configs.common import every, pick_variant
from genjax.models.fields import config_section
from genjax.models.gan import GANConfig


def _gan(c, dataset: str, **optimizer) -> None:
  """The GAN family on `dataset`: GANConfig's defaults; both optimisers the same, `optimizer` changing the GAN's."""
  c.family = "gan"
  c.dataset.name = dataset
  c.model = config_section(GANConfig)
  # GAN optimisers: Adam with b1 = 0 or 0.5 and no clipping (clipping hides D/G imbalance in the grad norms).
  c.optimizer.update(learning_rate=2e-4, b1=0.5, b2=0.99, grad_clip_norm=0.0)
  c.optimizer.update(optimizer)
  c.disc_optimizer = ml_collections.ConfigDict(c.optimizer.to_dict())


def _digits(c):
  _gan(c, "digits", learning_rate=1e-3)
  c.model.update(latent_dim=32, gen_channels=(64, 32, 16), disc_channels=(16, 32, 64), disc_features=64,
                 conditional=True, r1_gamma=0.1, r1_interval=4)
  c.update(num_train_steps=2000, ema_decay=0.99, checkpoint_every_steps=1000, eval_every_steps=1000,
           num_sample_images=100)
  c.log_every_steps = 100            # a multiple of r1_interval (see disc/r1 in genjax/models/gan.py)


def _mnist(c):
  _gan(c, "mnist")
  c.model.update(gen_channels=(256, 128, 64), disc_channels=(64, 128, 256), disc_features=256, loss="hinge",
                 r1_gamma=1.0, r1_interval=4)
  c.update(batch_size=128, num_train_steps=20000, log_every_steps=200)
  every(c, 2000)


def _cifar10(c):
  _gan(c, "cifar10", b1=0.0)
  c.model.update(latent_dim=128, gen_channels=(512, 256, 128, 64), disc_channels=(64, 128, 256, 512),
                 disc_features=512, conditional=True, loss="hinge", r1_gamma=0.1, r1_interval=16)
  c.update(batch_size=256, num_train_steps=100000, ema_decay=0.9999)
  c.log_every_steps = 400            # a multiple of r1_interval, so the logged disc/r1 mean is unbiased
  every(c, 5000)


VARIANTS = {"digits": _digits, "mnist": _mnist, "cifar10": _cifar10}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return pick_variant("experiments/configs/gan.py", arg, VARIANTS)
