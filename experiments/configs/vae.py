"""VAE configs. `--config=experiments/configs/vae.py:digits` (offline, ~1–2 min on 2 CPU cores) or `:mnist`.

Model fields (`config.model`): `genjax.models.vae.VAEConfig` declares each one, its default and its meaning; a variant
sets only what it changes.
"""
from experiments.configs.common import every, pick_variant
from genjax.models.fields import config_section
from genjax.models.vae import VAEConfig


def _vae(c, dataset: str) -> None:
  """The VAE family on `dataset`: VAEConfig's defaults, a warmup-cosine learning rate."""
  c.family = "vae"
  c.dataset.name = dataset
  c.model = config_section(VAEConfig)
  c.optimizer.schedule = "warmup_cosine"


def digits(c):
  _vae(c, "digits")
  c.model.latent_dim = 8
  c.update(num_train_steps=2000, log_every_steps=100, sample_every_steps=1000, ema_decay=0.995)
  c.optimizer.update(learning_rate=2e-3, warmup_steps=100)


def mnist(c):
  _vae(c, "mnist")
  c.model.update(latent_dim=32, hidden=512)
  c.update(batch_size=256, num_train_steps=20_000, log_every_steps=200)
  every(c, 2000)
  c.optimizer.warmup_steps = 500


def tiny(c):
  """The digits VAE shrunk to seconds, for tests, the fault soak and smoke runs: constant LR so that runs of
  different lengths share a schedule; no scheduled eval or sample grid but at the end."""
  digits(c)
  c.model.update(latent_dim=4, channels=(8, 16), hidden=32)
  c.update(batch_size=16, num_train_steps=4, log_every_steps=2, checkpoint_every_steps=2, eval_every_steps=0,
           sample_every_steps=0, num_eval_batches=1, num_sample_images=4, async_checkpointing=False)
  c.optimizer.schedule = "constant"


VARIANTS = {"digits": digits, "mnist": mnist, "tiny": tiny}


def get_config(arg=None):
  return pick_variant("vae.py", arg, VARIANTS)
