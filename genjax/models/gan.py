"""DCGAN family: generator, (projection) discriminator, GAN losses, R1 / WGAN-GP penalties, sampling helpers
(latents and interpolation: `genjax.models.gan_latents`).

Trains through the shared loop as two phases, discriminator then generator, each owning one params sub-tree and
its own optimizer (`config.disc_optimizer` for "disc", `config.optimizer` for "gen"):

    task = genjax.models.gan.task(config)    # params = {"gen": ..., "disc": ...}
    images = task.sample_images(ema_params, rng, 16, truncation=0.7, label=3)
    grid = genjax.models.gan.build(config).interpolation_grid(ema_params, rng, rows=10, cols=8)
    grid, cols = genjax.models.gan.interpolation_images(config, ema_params, rng)   # the Task's `interpolate`
    gan = GAN(gan_config(config), image_shape=(8, 8, 1), num_classes=10, dtype="bfloat16")   # without the data set

`config.model` is read once into the frozen `GANConfig` (`gan_config(config)`; every field is declared with its
default there and in experiments/configs/gan.py): latent_dim; gen_channels (lowest resolution first; the generator
doubles the resolution len-1 times, so H and W must be divisible by 2**(len-1)); disc_channels (a 3x3 conv at full
resolution, then one stride-2 conv per further entry); disc_features (width of the discriminator's feature vector
phi(x)); conditional (label embedding in G, projection discriminator D(x, y) = w.phi(x) + b + embed(y).phi(x));
loss in LOSSES; r1_gamma (0 = off) and r1_interval (lazy R1: applied every r1_interval steps, scaled by it);
gp_weight (WGAN-GP only).

Images are scaled to [-1, 1] for the networks; `sample_images` maps back to [0, 1]. The loop keeps an EMA of all
params; sampling reads `params["gen"]` of whatever tree it is given (the EMA tree from the loop). Training latents
come from `fold_in(rng, example_id)`, so a loss is the same however the loop lays the batch out (pjit == pmap).
Health metrics (the loop adds "<phase>/loss" and "<phase>/grad_norm"): disc/adv_loss, disc/real_acc,
disc/fake_acc, disc/real_logit, disc/fake_logit, disc/r1, disc/gp; gen/fool_rate, gen/fake_logit.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.data import dataset_info
from genjax.dtypes import compute_dtype
from genjax.errors import ConfigError, UserError
from genjax.models.fields import from_config
from genjax.models.gan_latents import check_truncation, draw_latent, sample_latents, slerp  # noqa: F401
from genjax.core.optim import make_optimizer
from genjax.core.random import per_example
from genjax.core.task import Phase, Task

LOSSES = ("non_saturating", "hinge", "wgan_gp")
SAMPLE_OPTIONS = ("truncation", "label")


class Generator(nn.Module):
  """z [B, latent] (+ label [B]) -> image [B, H, W, C] in [-1, 1] (float32)."""
  image_shape: tuple
  channels: Sequence[int]
  num_classes: int = 0            # 0 = unconditional
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, label=None):
    h, w, c = self.image_shape
    scale = 2 ** (len(self.channels) - 1)
    x = z.astype(self.dtype)
    if self.num_classes:
      if label is None:
        raise UserError("a conditional Generator needs a label [B]")
      e = nn.Embed(self.num_classes, z.shape[-1], dtype=self.dtype, name="label_embed")(label)
      x = jnp.concatenate([x, e], axis=-1)
    x = nn.Dense(h // scale * (w // scale) * self.channels[0], dtype=self.dtype)(x)
    x = x.reshape(x.shape[0], h // scale, w // scale, self.channels[0])
    x = nn.relu(nn.GroupNorm(num_groups=math.gcd(self.channels[0], 16), dtype=self.dtype)(x))
    for ch in self.channels[1:]:
      x = nn.ConvTranspose(ch, (4, 4), strides=(2, 2), padding="SAME", dtype=self.dtype)(x)
      x = nn.relu(nn.GroupNorm(num_groups=math.gcd(ch, 16), dtype=self.dtype)(x))
    x = nn.Conv(c, (3, 3), dtype=self.dtype)(x)
    return jnp.tanh(x.astype(jnp.float32))


class Discriminator(nn.Module):
  """image [B, H, W, C] in [-1, 1] (+ label [B]) -> logit [B] (float32); projection term when conditional."""
  channels: Sequence[int]
  features: int
  num_classes: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, label=None):
    x = nn.leaky_relu(nn.Conv(self.channels[0], (3, 3), dtype=self.dtype)(x.astype(self.dtype)), 0.2)
    for ch in self.channels[1:]:
      x = nn.leaky_relu(nn.Conv(ch, (4, 4), strides=(2, 2), padding="SAME", dtype=self.dtype)(x), 0.2)
    phi = nn.leaky_relu(nn.Dense(self.features, dtype=self.dtype)(x.reshape(x.shape[0], -1)), 0.2)
    out = nn.Dense(1, dtype=self.dtype)(phi)[:, 0].astype(jnp.float32)
    if self.num_classes:
      if label is None:
        raise UserError("a conditional Discriminator needs a label [B]")
      e = nn.Embed(self.num_classes, self.features, dtype=self.dtype, name="label_embed")(label)
      out = out + jnp.sum((e * phi).astype(jnp.float32), axis=-1)
    return out


# ---------------------------------------------------------------------------------------------------- losses
def _check_loss(kind):
  if kind not in LOSSES:
    raise ConfigError(f"model.loss={kind!r} is not one of {LOSSES}")


def disc_loss_from_logits(real_logits, fake_logits, kind: str):
  """Mean discriminator loss from logits [B]. non_saturating: softplus(-r) + softplus(f);
  hinge: relu(1 - r) + relu(1 + f); wgan_gp: f - r (the gradient penalty is added separately)."""
  _check_loss(kind)
  r, f = real_logits.astype(jnp.float32), fake_logits.astype(jnp.float32)
  if kind == "non_saturating":
    return jnp.mean(jax.nn.softplus(-r)) + jnp.mean(jax.nn.softplus(f))
  if kind == "hinge":
    return jnp.mean(nn.relu(1.0 - r)) + jnp.mean(nn.relu(1.0 + f))
  return jnp.mean(f) - jnp.mean(r)


def gen_loss_from_logits(fake_logits, kind: str):
  """Mean generator loss from D's logits on fakes [B]: softplus(-f) (non-saturating), -f (hinge, wgan_gp)."""
  _check_loss(kind)
  f = fake_logits.astype(jnp.float32)
  if kind == "non_saturating":
    return jnp.mean(jax.nn.softplus(-f))
  return -jnp.mean(f)


def _input_grad(disc_fn, x):
  """d sum_b D(x)_b / dx: the per-example input gradient (examples are independent)."""
  return jax.grad(lambda xx: jnp.sum(disc_fn(xx)))(x)


def r1_value(disc_fn, x_real):
  """E_b ||grad_x D(x_b)||^2 over real images; the R1 penalty is gamma/2 times this."""
  g = _input_grad(disc_fn, x_real.astype(jnp.float32))
  return jnp.mean(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=-1))


def gradient_penalty(disc_fn, x_real, x_fake, u):
  """WGAN-GP: E (||grad D(x_hat)|| - 1)^2 at x_hat = u x_real + (1 - u) x_fake, mixing weights u [B] in [0, 1]."""
  u = jnp.asarray(u, jnp.float32).reshape((x_real.shape[0],) + (1,) * (x_real.ndim - 1))
  x_hat = u * x_real.astype(jnp.float32) + (1.0 - u) * x_fake.astype(jnp.float32)
  g = _input_grad(disc_fn, x_hat)
  norm = jnp.sqrt(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=-1) + 1e-12)
  return jnp.mean(jnp.square(norm - 1.0))


# ---------------------------------------------------------------------------------------------------- the family
@dataclasses.dataclass(frozen=True)
class GANConfig:
  """`config.model` of the GAN family (experiments/configs/gan.py), typed: `from_config(GANConfig, config.model)`."""
  latent_dim: int = 64
  gen_channels: tuple[int, ...] = (128, 64)   # lowest resolution first; x2 upsampling between entries
  disc_channels: tuple[int, ...] = (32, 64)   # full resolution first; a stride-2 conv for every further entry
  disc_features: int = 128                    # width of the discriminator's feature vector phi(x)
  conditional: bool = False                   # label embedding in G, projection discriminator
  loss: str = "non_saturating"                # LOSSES
  r1_gamma: float = 0.0                       # 0 = no R1
  r1_interval: int = 1                        # lazy R1: every r1_interval steps, scaled by it
  gp_weight: float = 10.0                     # WGAN-GP only

  def check(self, image_shape: tuple | None = None, num_classes: int | None = None) -> "GANConfig":
    """Raises ConfigError naming the first bad field; with the data set's `image_shape` (H, W, C) and
    `num_classes`, also that the generator can make that size and that a conditional model has labels."""
    _check_loss(self.loss)
    for key in ("latent_dim", "disc_features", "r1_interval"):
      if getattr(self, key) < 1:
        raise ConfigError(f"model.{key}={getattr(self, key)!r} must be >= 1")
    for key in ("gen_channels", "disc_channels"):
      widths = getattr(self, key)
      if not widths or not all(w >= 1 for w in widths):
        raise ConfigError(f"model.{key}={widths!r} must be a non-empty tuple of positive widths")
    if not self.r1_gamma >= 0 or not self.gp_weight >= 0:
      raise ConfigError(f"model.r1_gamma={self.r1_gamma!r} and model.gp_weight={self.gp_weight!r} must be >= 0")
    if image_shape is not None:
      scale, (h, w, _) = 2 ** (len(self.gen_channels) - 1), image_shape
      if h % scale or w % scale:
        raise ConfigError(f"model.gen_channels={self.gen_channels} upsamples x{scale}, which must divide the "
                          f"image size {h}x{w}; use fewer entries")
    if num_classes is not None and self.conditional and num_classes < 2:
      raise ConfigError(f"model.conditional needs a labelled dataset, got num_classes={num_classes}")
    return self


def gan_config(config) -> GANConfig:
  """The typed, checked `config.model` of a whole GAN config (data-dependent checks happen in `GAN`)."""
  return from_config(GANConfig, config.model).check()


class GAN:
  """The modules and pure functions of one GAN config; `task()` wraps them for the loop."""

  def __init__(self, cfg: GANConfig, image_shape, num_classes: int, dtype: str = "float32"):
    if not isinstance(cfg, GANConfig):
      raise TypeError(f"GAN needs a GANConfig (gan_config(config)), got {type(cfg).__name__}")
    self.image_shape = tuple(int(s) for s in image_shape)
    if len(self.image_shape) != 3:
      raise UserError(f"image_shape must be (H, W, C), got {image_shape!r}")
    self.cfg = cfg.check(self.image_shape, int(num_classes))
    self.loss, self.latent_dim, self.r1_interval = cfg.loss, cfg.latent_dim, cfg.r1_interval
    self.r1_gamma, self.gp_weight = cfg.r1_gamma, cfg.gp_weight
    self.num_classes = int(num_classes) if cfg.conditional else 0
    act = compute_dtype(dtype)
    self.gen = Generator(self.image_shape, cfg.gen_channels, self.num_classes, act)
    self.disc = Discriminator(cfg.disc_channels, cfg.disc_features, self.num_classes, act)
    self._sample = jax.jit(self._sample_impl, static_argnames=("n",))
    self._grid = jax.jit(self._grid_impl, static_argnames=("rows", "cols"))

  # -- helpers -------------------------------------------------------------------------------------------------
  def _labels(self, batch):
    return batch["label"].astype(jnp.int32) if self.num_classes else None

  def _d(self, disc_params, x, label):
    return self.disc.apply({"params": disc_params}, x, label)

  def _g(self, gen_params, z, label):
    return self.gen.apply({"params": gen_params}, z, label)

  def _generate_impl(self, gen_params, z, label):
    return (self._g(gen_params, z, label) + 1.0) * 0.5

  @staticmethod
  def _real(batch, image_shape):
    x = batch["image"]
    if x.ndim != 4 or tuple(x.shape[1:]) != image_shape:
      raise UserError(f"batch['image'] must be [B, {', '.join(map(str, image_shape))}], got {tuple(x.shape)}")
    return x.astype(jnp.float32) * 2.0 - 1.0

  # -- Task pieces ---------------------------------------------------------------------------------------------
  def init(self, rng, example_batch):
    x = self._real(example_batch, self.image_shape)[:1]
    label = jnp.zeros((1,), jnp.int32) if self.num_classes else None
    g_rng, d_rng = jax.random.split(rng)
    z = jnp.zeros((1, self.latent_dim), jnp.float32)
    return {"gen": self.gen.init(g_rng, z, label)["params"], "disc": self.disc.init(d_rng, x, label)["params"]}

  def _batch_latents(self, rng, batch):
    """One latent per example from fold_in(rng, example_id): the same draws however the batch is split."""
    return per_example(lambda k: draw_latent(k, self.latent_dim), rng, batch)

  def _d_logits(self, params, batch, rng):
    x, label = self._real(batch, self.image_shape), self._labels(batch)
    fake = jax.lax.stop_gradient(self._g(params["gen"], self._batch_latents(rng, batch), label))
    d = lambda xx: self._d(params["disc"], xx, label)     # noqa: E731
    return x, fake, d, d(x), d(fake)

  def disc_loss(self, params, batch, rng, step):
    """Discriminator phase: adversarial loss (+ WGAN-GP) (+ lazy R1 on reals). Only params['disc'] is trained.

    Metrics (the loop prefixes "disc/" and adds loss = the total and grad_norm): adv_loss, real_acc (D(real) > 0),
    fake_acc (D(fake) < 0), real_logit, fake_logit, gp (wgan_gp), r1 (E||grad_x D(real)||^2 estimate: r1_interval
    times the value on R1 steps, 0 between them, so its mean over a window of whole intervals is the mean value).
    """
    z_rng, gp_rng = jax.random.split(rng)
    x, fake, d, real_logits, fake_logits = self._d_logits(params, batch, z_rng)
    adv = disc_loss_from_logits(real_logits, fake_logits, self.loss)
    loss = adv
    metrics = {"adv_loss": adv, "real_acc": jnp.mean((real_logits > 0).astype(jnp.float32)),
               "fake_acc": jnp.mean((fake_logits < 0).astype(jnp.float32)),
               "real_logit": jnp.mean(real_logits), "fake_logit": jnp.mean(fake_logits)}
    if self.loss == "wgan_gp":
      gp = gradient_penalty(d, x, fake, per_example(jax.random.uniform, gp_rng, batch))
      loss = loss + self.gp_weight * gp
      metrics["gp"] = gp
    if self.r1_gamma > 0:
      k = self.r1_interval
      if k == 1:
        r1 = r1_value(d, x)
      else:
        # Lazy R1: the double backprop costs about as much as the rest of the disc step, so skip it between R1
        # steps with lax.cond (jnp.where would compute it every step). The predicate is the replicated step, so
        # every device takes the same branch.
        r1 = jax.lax.cond(jnp.asarray(step, jnp.int32) % k == 0, lambda: k * r1_value(d, x),
                          lambda: jnp.zeros((), jnp.float32))
      # gamma/2 * k * E||grad||^2 every k-th step: the same expected regulariser per step as plain R1.
      loss = loss + 0.5 * self.r1_gamma * r1
      metrics["r1"] = r1
    return loss, metrics

  def gen_loss(self, params, batch, rng, step):
    """Generator phase on D(G(z)) with the batch's labels; only params['gen'] is trained.
    Metrics ("gen/" prefix, plus the loop's loss and grad_norm): fool_rate (D(fake) > 0), fake_logit."""
    del step
    label = self._labels(batch)
    fake_logits = self._d(params["disc"], self._g(params["gen"], self._batch_latents(rng, batch), label), label)
    loss = gen_loss_from_logits(fake_logits, self.loss)
    return loss, {"fool_rate": jnp.mean((fake_logits > 0).astype(jnp.float32)),
                  "fake_logit": jnp.mean(fake_logits)}

  def evaluate(self, params, batch, rng):
    """Test-batch health: both losses and D's accuracies (no R1: it measures D's smoothness, not the data)."""
    _, _, _, real_logits, fake_logits = self._d_logits(params, batch, rng)
    return {"d_loss": disc_loss_from_logits(real_logits, fake_logits, self.loss),
            "g_loss": gen_loss_from_logits(fake_logits, self.loss),
            "d_real_acc": jnp.mean((real_logits > 0).astype(jnp.float32)),
            "d_fake_acc": jnp.mean((fake_logits < 0).astype(jnp.float32))}

  def _resolve_labels(self, label, n):
    if not self.num_classes:
      if label is not None:
        raise ConfigError("label= needs a conditional model (model.conditional=True); this one is unconditional")
      return None
    if label is None:
      return jnp.arange(n, dtype=jnp.int32) % self.num_classes     # a grid that cycles through the classes
    lab = jnp.asarray(label)
    lab = jnp.broadcast_to(lab, (n,)) if lab.ndim == 0 else lab
    if lab.shape != (n,) or not jnp.issubdtype(lab.dtype, jnp.integer):
      raise UserError(f"label must be an int or [n={n}] ints, got {lab.dtype} of shape {tuple(lab.shape)}")
    try:
      values = np.asarray(lab)
    except jax.errors.TracerArrayConversionError:
      values = None                                      # traced inside a caller's jit: cannot check the values
    if values is not None and (values.min() < 0 or values.max() >= self.num_classes):
      raise UserError(f"label values must be in [0, {self.num_classes - 1}], got {sorted(set(values.tolist()))}")
    return lab.astype(jnp.int32)

  def sample_images(self, params, rng, n: int, truncation=None, label=None, **unknown):
    """n images [n, H, W, C] in [0, 1] from params['gen']; options (SAMPLE_OPTIONS): truncation (float >= 0 or
    None), label (int or [n] ints; conditional models only — default cycles 0, 1, ..., num_classes-1)."""
    if unknown:
      raise UserError(f"unknown sample option(s) {sorted(unknown)} for the GAN family; valid: {list(SAMPLE_OPTIONS)}")
    label = self._resolve_labels(label, int(n))
    check_truncation(truncation)
    return self._sample(params["gen"], rng, label, truncation, n=int(n))

  def _sample_impl(self, gen_params, rng, label, truncation, n):
    return self._generate_impl(gen_params, sample_latents(rng, n, self.latent_dim, truncation), label)

  def interpolation_grid(self, params, rng, rows: int, cols: int, truncation=None, label=None):
    """[rows*cols, H, W, C] in [0, 1]: row r walks (slerp) from one random latent to another in `cols` steps,
    all with the same label per row (conditional: `label` int/[rows], default the classes in turn)."""
    if rows < 1 or cols < 2:
      raise UserError(f"interpolation_grid needs rows >= 1 and cols >= 2, got rows={rows}, cols={cols}")
    check_truncation(truncation)
    return self._grid(params["gen"], rng, self._resolve_labels(label, rows), truncation, rows=int(rows),
                      cols=int(cols))

  def _grid_impl(self, gen_params, rng, row_labels, truncation, rows, cols):
    r0, r1 = jax.random.split(rng)
    z0 = sample_latents(r0, rows, self.latent_dim, truncation)
    z1 = sample_latents(r1, rows, self.latent_dim, truncation)
    t = jnp.linspace(0.0, 1.0, cols)
    z = slerp(z0[:, None, :], z1[:, None, :], jnp.broadcast_to(t, (rows, cols))).reshape(rows * cols, -1)
    labels = None if row_labels is None else jnp.repeat(row_labels, cols)
    return self._generate_impl(gen_params, z, labels)


def make_task(config, image_shape, num_classes: int) -> Task:
  """The GAN Task for a config and a known data shape (tests use this; `task` reads the shape from the dataset)."""
  gan = GAN(gan_config(config), image_shape, num_classes, config.compute_dtype)
  steps = int(config.num_train_steps)
  disc_opt_cfg = config.disc_optimizer
  return Task(
      init=gan.init,
      phases=(Phase("disc", gan.disc_loss, make_optimizer(disc_opt_cfg, steps), params_key="disc"),
              Phase("gen", gan.gen_loss, make_optimizer(config.optimizer, steps), params_key="gen")),
      sample_images=gan.sample_images,
      evaluate=gan.evaluate,
      interpolate=functools.partial(interpolation_images, config))


def _image_info(config):
  info = dataset_info(config.dataset.name)
  if info.kind != "image":
    raise ConfigError(f"the GAN family needs an image dataset; {config.dataset.name!r} is {info.kind!r}")
  return info


def build(config) -> GAN:
  """The GAN object (modules, losses, interpolation_grid) for a config, shaped by its dataset."""
  info = _image_info(config)
  return GAN(gan_config(config), info.image_shape, info.num_classes, config.compute_dtype)


def interpolation_images(config, params, rng, rows: int | None = None, cols: int = 8, truncation=None, label=None):
  """(images, cols), the Task's `interpolate` (`experiments/sample.py --interpolate`): the latent interpolation grid,
  one row per class (the row's label) for conditional models, else 8 rows."""
  gan = build(config)
  rows = int(rows or (gan.num_classes or 8))
  if gan.num_classes and label is None:
    label = np.arange(rows) % gan.num_classes
  return gan.interpolation_grid(params, rng, rows, cols, truncation=truncation, label=label), cols


def task(config) -> Task:
  """Entry point for the shared loop (`genjax.models.get_task`): two phases, "disc" then "gen"."""
  info = _image_info(config)
  return make_task(config, info.image_shape, info.num_classes)
