"""VAE configs. `--config=experiments/configs/vae.py:digits` (offline, ~1–2 min on 2 CPU cores) or `:mnist`."""
from experiments.configs.common import pick_variant


def _model(c, latent_dim, channels, hidden):
  c.family = "vae"
  c.model.latent_dim = latent_dim
  c.model.channels = channels
  c.model.hidden = hidden
  c.model.likelihood = "bernoulli"   # "bernoulli" | "gaussian"
  c.model.gaussian_sigma = 0.1
  c.model.beta = 1.0
  c.model.iw_samples = 64            # K for the importance-weighted NLL in evaluate


def digits(c):
  _model(c, latent_dim=8, channels=(32, 64), hidden=256)
  c.dataset.name = "digits"
  c.batch_size = 64
  c.num_train_steps = 2000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  c.eval_every_steps = 500
  c.sample_every_steps = 1000
  c.optimizer.learning_rate = 2e-3
  c.optimizer.schedule = "warmup_cosine"
  c.optimizer.warmup_steps = 100
  c.ema_decay = 0.995


def mnist(c):
  _model(c, latent_dim=32, channels=(32, 64), hidden=512)
  c.dataset.name = "mnist"
  c.batch_size = 256
  c.num_train_steps = 20_000
  c.log_every_steps = 200
  c.checkpoint_every_steps = 2000
  c.eval_every_steps = 2000
  c.sample_every_steps = 2000
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "warmup_cosine"
  c.optimizer.warmup_steps = 500


def tiny(c):
  """The digits VAE shrunk to seconds, for tests, the fault soak and smoke runs: constant LR so that runs of
  different lengths share a schedule; no scheduled eval or sample grid but at the end."""
  digits(c)
  c.model.latent_dim, c.model.channels, c.model.hidden = 4, (8, 16), 32
  c.batch_size = 16
  c.num_train_steps = 4
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.eval_every_steps = 0
  c.sample_every_steps = 0
  c.num_eval_batches = 1
  c.num_sample_images = 4
  c.optimizer.schedule = "constant"
  c.async_checkpointing = False


VARIANTS = {"digits": digits, "mnist": mnist, "tiny": tiny}


def get_config(arg=None):
  return pick_variant("vae.py", arg, VARIANTS)
