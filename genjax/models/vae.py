"""Convolutional VAE: Bernoulli or Gaussian likelihood, β-weighted analytic KL, ELBO in nats and bits/dim.

    model = vae_model(config)                      # linen VAE; config.model is typed as VAEConfig
    task = task(config)                            # what the shared loop trains
    mean, logvar = model.apply({"params": p}, x, method="encode")
    images = model.apply({"params": p}, z, method="decode")       # [B, H, W, C] in [0, 1]

The loss is −(E_q[log p(x|z)] − β·KL(q(z|x) ‖ N(0, I))) per image (one reparameterised sample, per-example
keys); `evaluate` reports the β = 1 ELBO in nats and bits/dim on the test split and the importance-weighted NLL
with K = `model.iw_samples` samples (log-mean-exp of log p(x|z) + log p(z) − log q(z|x); ≤ −ELBO, tightening with
K). The Bernoulli likelihood treats grey levels in [0, 1] as Bernoulli means (the usual practice on MNIST-like
data); the Gaussian one uses a fixed σ.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genjax.data import dataset_info, load_arrays
from genjax.dtypes import compute_dtype
from genjax.models.fields import from_config
from genjax.core import Phase, Task, make_optimizer
from genjax.core.random import per_example
from genjax.errors import ConfigError, UserError, show

LIKELIHOODS = ("bernoulli", "gaussian")
SAMPLE_OPTIONS = ("temperature",)


class VAE(nn.Module):
  image_shape: tuple[int, int, int]
  latent_dim: int = 16
  channels: Sequence[int] = (32, 64)
  hidden: int = 256
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    h, w, _ = self.image_shape
    factor = 2 ** len(self.channels)
    if h % factor or w % factor:
      raise ConfigError(f"image {h}×{w} is not divisible by 2**len(channels)={factor}; change model.channels")
    self.enc = [nn.Conv(c, (3, 3), strides=(2, 2), dtype=self.dtype) for c in self.channels]
    self.enc_hidden = nn.Dense(self.hidden, dtype=self.dtype)
    self.enc_out = nn.Dense(2 * self.latent_dim, dtype=jnp.float32)
    self.dec_hidden = nn.Dense(self.hidden, dtype=self.dtype)
    self.dec_in = nn.Dense((h // factor) * (w // factor) * self.channels[-1], dtype=self.dtype)
    self.dec = [nn.ConvTranspose(c, (3, 3), strides=(2, 2), dtype=self.dtype) for c in self.channels[::-1]]
    self.dec_out = nn.Conv(self.image_shape[-1], (3, 3), dtype=jnp.float32)

  def encode(self, x):
    y = x.astype(self.dtype)
    for conv in self.enc:
      y = nn.gelu(conv(y))
    y = nn.gelu(self.enc_hidden(y.reshape(y.shape[0], -1)))
    mean, logvar = jnp.split(self.enc_out(y).astype(jnp.float32), 2, axis=-1)
    return mean, logvar

  def decode_logits(self, z):
    h, w, _ = self.image_shape
    factor = 2 ** len(self.channels)
    y = nn.gelu(self.dec_hidden(z.astype(self.dtype)))
    y = nn.gelu(self.dec_in(y)).reshape(z.shape[0], h // factor, w // factor, self.channels[-1])
    for conv in self.dec:
      y = nn.gelu(conv(y))
    return self.dec_out(y).astype(jnp.float32)

  def decode(self, z):
    return nn.sigmoid(self.decode_logits(z))

  def __call__(self, x, z):
    return self.encode(x), self.decode_logits(z)


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) ‖ N(0, I)) summed over the last axis."""
  return 0.5 * jnp.sum(jnp.exp(logvar) + mean ** 2 - 1.0 - logvar, axis=-1)


def log_likelihood(x: jax.Array, decoder_out: jax.Array, likelihood: str, sigma: float = 0.1) -> jax.Array:
  """log p(x | z) per example, summed over pixels; `decoder_out` is logits (bernoulli) or the mean (gaussian)."""
  axes = tuple(range(1, x.ndim))
  if likelihood == "bernoulli":
    return jnp.sum(x * jax.nn.log_sigmoid(decoder_out) + (1 - x) * jax.nn.log_sigmoid(-decoder_out), axis=axes)
  if likelihood == "gaussian":
    d = math.prod(x.shape[1:])
    return (-0.5 * jnp.sum((x - decoder_out) ** 2, axis=axes) / sigma ** 2
            - d * (math.log(sigma) + 0.5 * math.log(2 * math.pi)))
  raise ConfigError(f"model.likelihood={likelihood!r} is not one of {LIKELIHOODS}")


def elbo_terms(x, mean, logvar, decode: Callable, eps, likelihood: str, sigma: float = 0.1):
  """(log p(x|z) at z = mean + σ·eps, KL) per example: the reparameterised one-sample ELBO pieces."""
  z = mean + jnp.exp(0.5 * logvar) * eps
  out = decode(z)
  if likelihood == "bernoulli" or likelihood == "gaussian":
    return log_likelihood(x, out, likelihood, sigma), gaussian_kl(mean, logvar)
  raise ConfigError(f"model.likelihood={likelihood!r} is not one of {LIKELIHOODS}")


def log_importance_weight(x, mean, logvar, decode: Callable, eps, likelihood: str, sigma: float = 0.1):
  """log p(x|z) + log N(z; 0, I) − log q(z|x) at z = mean + σ·eps, per example."""
  z = mean + jnp.exp(0.5 * logvar) * eps
  log_prior = -0.5 * jnp.sum(z ** 2 + math.log(2 * math.pi), axis=-1)
  log_q = -0.5 * jnp.sum(eps ** 2 + logvar + math.log(2 * math.pi), axis=-1)
  return log_likelihood(x, decode(z), likelihood, sigma) + log_prior - log_q


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """`config.model` of the VAE family (experiments/configs/vae.py), typed: `from_config(VAEConfig, config.model)`."""
  latent_dim: int = 16
  channels: tuple[int, ...] = (32, 64)   # encoder conv widths (stride 2 each); the decoder mirrors them
  hidden: int = 256                      # width of the dense layer on each side of the latent
  likelihood: str = "bernoulli"          # LIKELIHOODS
  gaussian_sigma: float = 0.1            # the Gaussian likelihood's fixed sigma
  beta: float = 1.0                      # KL weight of the training loss
  iw_samples: int = 64                   # K of the importance-weighted NLL in evaluate

  def check(self) -> "VAEConfig":
    """Raises ConfigError naming the first bad field; returns self."""
    for key in ("latent_dim", "hidden", "iw_samples"):
      if getattr(self, key) < 1:
        raise ConfigError(f"model.{key}={getattr(self, key)!r} must be >= 1")
    if not self.channels or not all(w >= 1 for w in self.channels):
      raise ConfigError(f"model.channels={self.channels!r} must be a non-empty tuple of positive widths")
    if self.likelihood not in LIKELIHOODS:
      raise ConfigError(f"model.likelihood={self.likelihood!r} is not one of {LIKELIHOODS}")
    if not self.gaussian_sigma > 0 or not self.beta >= 0:
      raise ConfigError(f"model.gaussian_sigma={self.gaussian_sigma!r} must be > 0 and model.beta={self.beta!r} "
                        ">= 0")
    return self


def vae_module(cfg: VAEConfig, image_shape, dtype=jnp.float32) -> VAE:
  """The linen VAE of a typed config for images of `image_shape` (H, W, C)."""
  return VAE(image_shape=tuple(image_shape), latent_dim=cfg.latent_dim, channels=cfg.channels, hidden=cfg.hidden,
             dtype=dtype)


def vae_model(config) -> VAE:
  """The linen VAE of a whole config (`config.model`, `config.dataset.name`, `config.compute_dtype`)."""
  info = dataset_info(config.dataset.name)
  if info.kind != "image":
    raise ConfigError(f"the VAE needs an image data set; {config.dataset.name!r} is {info.kind}")
  cfg = from_config(VAEConfig, config.model).check()
  return vae_module(cfg, info.image_shape, compute_dtype(config.compute_dtype))


def _decoder_out(model, params, likelihood):
  def decode(z):
    logits = model.apply({"params": params}, z, method="decode_logits")
    return logits if likelihood == "bernoulli" else jax.nn.sigmoid(logits)
  return decode


def task(config) -> Task:
  model = vae_model(config)
  cfg = from_config(VAEConfig, config.model)
  likelihood, beta, sigma = cfg.likelihood, cfg.beta, cfg.gaussian_sigma

  def init(rng, batch):
    x = batch["image"]
    return model.init(rng, x, jnp.zeros((x.shape[0], model.latent_dim)))["params"]

  def terms(params, batch, rng):
    x = batch["image"]
    mean, logvar = model.apply({"params": params}, x, method="encode")
    eps = per_example(lambda k: jax.random.normal(k, (model.latent_dim,)), rng, batch)
    return elbo_terms(x, mean, logvar, _decoder_out(model, params, likelihood), eps, likelihood, sigma)

  def loss_fn(params, batch, rng, step):
    ll, kl = terms(params, batch, rng)
    return jnp.mean(-ll + beta * kl), {"recon_nll": -jnp.mean(ll), "kl": jnp.mean(kl)}

  iw_samples = cfg.iw_samples

  def evaluate(params, batch, rng):
    ll, kl = terms(params, batch, rng)
    elbo = jnp.mean(ll - kl)
    dims = math.prod(batch["image"].shape[1:])
    x = batch["image"]
    mean, logvar = model.apply({"params": params}, x, method="encode")
    eps = per_example(lambda k: jax.random.normal(k, (iw_samples, model.latent_dim)), jax.random.fold_in(rng, 1),
                      batch)
    decode = _decoder_out(model, params, likelihood)
    log_w = jax.vmap(lambda e: log_importance_weight(x, mean, logvar, decode, e, likelihood, sigma),
                     in_axes=1, out_axes=1)(eps)
    iw_nll = -jnp.mean(jax.nn.logsumexp(log_w, axis=1) - math.log(iw_samples))
    return {"elbo_nats": elbo, "bits_per_dim": -elbo / (dims * math.log(2)), "kl": jnp.mean(kl),
            "iw_nll_nats": iw_nll}

  @functools.partial(jax.jit, static_argnames="n")
  def prior_samples(params, rng, temperature, n):
    z = temperature * jax.random.normal(rng, (n, model.latent_dim))
    return model.apply({"params": params}, z, method="decode")

  def sample_images(params, rng, n, temperature: float = 1.0, **unknown):
    if unknown:
      raise UserError(f"unknown VAE sample options {sorted(unknown)}; valid: {list(SAMPLE_OPTIONS)}")
    if not isinstance(temperature, jax.core.Tracer) and (isinstance(temperature, bool) or
                                                         not float(temperature) >= 0.0):
      raise UserError(f"temperature={show(temperature)} must be a float >= 0 (the prior's scale: 1 samples the prior, "
                      f"0 decodes its mean)")
    return prior_samples(params, rng, jnp.float32(temperature), n=int(n))

  def interpolate(params, rng, **options):
    if options:
      raise UserError(f"the VAE's interpolation grid takes no options, got {sorted(options)} (it interpolates "
                      f"between the codes of test images)")
    return interpolation_images(config, params, rng)

  optimizer = make_optimizer(config.optimizer, int(config.num_train_steps))
  return Task(init=init, phases=(Phase("vae", loss_fn, optimizer),), sample_images=sample_images,
              evaluate=evaluate, interpolate=interpolate)


def interpolation_images(config, params, rng, rows: int = 8, cols: int = 8):
  """(images, cols): rows of decoded interpolations between pairs of test images drawn with `rng`."""
  x = load_arrays(config.dataset.name, config.dataset.eval_split, config.dataset.data_dir)["image"]
  idx = jax.random.choice(rng, len(x), (2 * rows,), replace=False)
  pairs = jnp.asarray(x)[idx]
  return interpolation_grid(vae_model(config), params, pairs[:rows], pairs[rows:], cols), cols


def interpolation_grid(model: VAE, params, x_a: jax.Array, x_b: jax.Array, num: int = 8) -> jax.Array:
  """Decoded posterior means along the straight line between the codes of x_a[i] and x_b[i]: [rows·num, H, W, C]."""
  za, _ = model.apply({"params": params}, x_a, method="encode")
  zb, _ = model.apply({"params": params}, x_b, method="encode")
  w = jnp.linspace(0.0, 1.0, num)[None, :, None]
  z = ((1 - w) * za[:, None] + w * zb[:, None]).reshape(-1, za.shape[-1])
  return model.apply({"params": params}, z, method="decode")
