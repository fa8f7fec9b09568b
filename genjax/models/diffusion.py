"""The diffusion family: a U-Net DDPM (pixel space, or the latent space of a trained VAE) on the shared loop.

    task = genjax.models.diffusion.task(config)         # config from experiments/configs/ddpm.py
    python -m experiments.train --config=experiments/configs/ddpm.py:digits --workdir=/tmp/ddpm_digits

Training: images in [0, 1] map to x0 = 2 * image - 1 (pixel space) or to x0 = latent_scale * VAE-encoder mean
(latent space); a timestep t ~ U{0..T-1} and noise eps ~ N(0, I) give x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps;
the U-Net regresses the target of `config.model.prediction` ("epsilon" -> eps, "v" -> sqrt(abar_t) eps -
sqrt(1 - abar_t) x0, "x0" -> x0). The loss is the mean over examples of the per-example mean squared error.
Class-conditional models (`config.model.conditional`) see the label, replaced by the null label `num_classes`
with probability `label_dropout`, so the same network is also the unconditional model classifier-free guidance
needs. Schedules ("linear" | "cosine") and every training target come from `genjax.samplers.schedules`; the loop
keeps the EMA of the params (`config.ema_decay`). Flow matching (`config.model.schedule="flow"`, prediction
"velocity", `ddpm.py:flow_digits`): t ~ U(0, 1) (time-shifted by `flow_shift`), x_t = (1 - t) x0 + t eps, the U-Net
sees t * num_timesteps and regresses eps - x0 (`genjax.samplers.flow`); its samplers are "euler" | "heun" |
"midpoint" (`flow_sample`).

Params: `{"unet": U-Net variables}`; latent diffusion (`config.model.space="latent"`, `ddpm.py:latent_digits`)
adds the frozen `"vae"` variables and `"latent_scale"` (the single phase trains only `params["unet"]`), which the
task's init copies from the trained VAE run in `config.model.vae_workdir` (its architecture is the config's
`model.vae`): building the task reads nothing from disk, and a checkpoint alone samples, evaluates and decodes
(`genjax.models.diffusion_space`; only a training run that starts from scratch reads the VAE run).

Config: `config.model` is read once into `DiffusionConfig` (`from_config(DiffusionConfig, config.model).check()`):
every field with its default (experiments/configs/ddpm.py declares the same), bad values a ConfigError naming the
field, the value and the valid choices.

Editing: `sample_images(params, rng, n, init_image=..., strength=... | inpaint_mask=...)` (img2img / inpainting,
see `genjax.models.diffusion_editing`).

Sampling: `sample_images(params, rng, n, sampler=..., num_steps=..., eta=..., guidance=..., label=...)` runs the
jitted samplers of `genjax.samplers` through its registry (`run_sampler`; `SAMPLERS` = the registry's diffusion
names: DDPM, DDIM, DPM-Solver++ 2M / 3M / 2M-SDE, UniPC, EDM Euler / Heun / Euler-ancestral, each with its
defaults; a flow model takes `FLOW_METHODS`, the registry's flow names; defaults from `config.model`:
sampler, num_sample_steps, eta, guidance); any other option is a ValueError naming the valid ones. Sampling is
one jitted program per (n, sampler, guided-or-not): num_steps, eta, the guidance scale and the label are runtime
values (changing them compiles nothing new). `evaluate` gives the same loss (no label dropout, no dropout) on a
test batch.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from genjax.data import dataset_info
from genjax.dtypes import compute_dtype
from genjax.errors import ConfigError, UserError, show
from genjax.models.diffusion_editing import EDIT_OPTIONS, check_edit_options, edit_images
from genjax.models.diffusion_space import LatentSource, Space, latent_space, pixel_space
from genjax.models.fields import from_config
from genjax.models.unet import UNet
from genjax.models.vae import VAEConfig
from genjax.samplers.flow import FlowSchedule
from genjax.samplers.guidance import classifier_free_guidance
from genjax.samplers.registry import run_sampler, sampler_names
from genjax.samplers.schedules import PREDICTION_ALIASES, PREDICTIONS, NoiseSchedule, check_prediction
from genjax.core.optim import make_optimizer
from genjax.core.random import example_keys
from genjax.core.task import Phase, Task

SCHEDULES = ("linear", "cosine", "flow")
SAMPLERS = sampler_names("diffusion")      # genjax.samplers.registry.DIFFUSION_SAMPLERS
FLOW_METHODS = sampler_names("flow")       # a flow-matching model's samplers: registry.FLOW_SAMPLERS
ETA_SAMPLERS = ("ddim",)                   # the samplers the `eta` option (config.model.eta) goes to
SPACES = ("pixel", "latent")
SAMPLE_OPTIONS = ("sampler", "num_steps", "eta", "guidance", "label")


def _choice(field: str, value, choices) -> None:
  if value not in choices:
    raise ConfigError(f"config.model.{field}={value!r} is not one of {list(choices)}")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """`config.model` of the diffusion family (experiments/configs/ddpm.py), typed: `from_config(DiffusionConfig,
  config.model).check()`. `vae` may be given as a config section: it is read into a `VAEConfig`."""
  ch: int = 64                           # U-Net base width
  ch_mult: tuple[int, ...] = (1, 2)      # channel multiplier per resolution level (a stride-2 conv between levels)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (4,)   # spatial sizes with self-attention (the middle block always has it)
  num_heads: int = 4
  dropout: float = 0.0
  norm_groups: int = 32
  conditional: bool = True               # class-conditional; the null label num_classes is the unconditional model
  label_dropout: float = 0.1             # P(label -> null label) in training: trains the guidance model too
  prediction: str = "epsilon"            # "epsilon" | "v" | "x0" (diffusers' aliases too); "velocity" for "flow"
  schedule: str = "cosine"               # SCHEDULES ("flow": flow matching, prediction "velocity")
  num_timesteps: int = 1000
  beta_start: float = 1e-4               # linear schedule only
  beta_end: float = 0.02                 # linear schedule only
  cosine_s: float = 0.008                # cosine schedule only
  flow_shift: float = 1.0                # flow only: SD3-style shift of training times and sampling grid (1 = none)
  sampler: str = "ddim"                  # default sampler of sample grids: SAMPLERS (FLOW_METHODS for "flow")
  num_sample_steps: int = 50
  eta: float = 0.0
  guidance: float = 1.0                  # classifier-free guidance scale (1 = the plain conditional model)
  clip_denoised: bool = True             # pixel space: clip predicted x0 to the data range [-1, 1] while sampling
  space: str = "pixel"                   # SPACES: "latent" diffuses the latents of the VAE `vae`
  vae_workdir: str = ""                  # latent: the trained VAE run init copies params from (read only there)
  latent_scale: float = 0.0              # latent: x0 = latent_scale * encoder mean; 0 = 1 / std over the data, at init
  vae: VAEConfig = dataclasses.field(default_factory=VAEConfig)   # latent: the VAE run's model section (must equal)

  def __post_init__(self):
    if not isinstance(self.vae, VAEConfig):  # a config section (from_config keeps nested sections as they are)
      object.__setattr__(self, "vae", from_config(VAEConfig, self.vae, "config.model.vae"))

  @property
  def flow(self) -> bool:
    return self.schedule == "flow"

  def check(self) -> "DiffusionConfig":
    """Raises ConfigError naming the first bad field, its value and the valid choices; returns self."""
    _choice("schedule", self.schedule, SCHEDULES)
    if self.flow and self.prediction != "velocity":
      raise ConfigError(f"config.model.schedule='flow' trains a velocity model: set config.model.prediction="
                        f"'velocity', got {self.prediction!r}")
    if not self.flow:
      _choice("prediction", self.prediction, PREDICTIONS + tuple(PREDICTION_ALIASES))
    _choice("sampler", self.sampler, FLOW_METHODS if self.flow else SAMPLERS)
    _choice("space", self.space, SPACES)
    for key in ("ch", "num_res_blocks", "num_heads", "norm_groups", "num_timesteps", "num_sample_steps"):
      if getattr(self, key) < 1:
        raise ConfigError(f"config.model.{key}={getattr(self, key)!r} must be >= 1")
    if not self.ch_mult or min(self.ch_mult) < 1:
      raise ConfigError(f"config.model.ch_mult={self.ch_mult!r} must be a non-empty tuple of multipliers >= 1")
    for key, low, high in (("dropout", 0.0, 1.0), ("label_dropout", 0.0, 1.0)):
      if not low <= getattr(self, key) < high:
        raise ConfigError(f"config.model.{key}={getattr(self, key)!r} must be in [{low}, {high})")
    for key in ("cosine_s", "flow_shift"):
      if not getattr(self, key) > 0:
        raise ConfigError(f"config.model.{key}={getattr(self, key)!r} must be > 0")
    if not 0 < self.beta_start < self.beta_end < 1:
      raise ConfigError(f"config.model.beta_start={self.beta_start!r} and beta_end={self.beta_end!r} must satisfy "
                        "0 < beta_start < beta_end < 1")
    if not self.latent_scale >= 0:
      raise ConfigError(f"config.model.latent_scale={self.latent_scale!r} must be >= 0 (0 = measured at init)")
    if self.space == "latent":
      if not self.vae_workdir:
        raise ConfigError("config.model.vae_workdir is empty: space='latent' needs a trained VAE run's workdir "
                          "(python -m experiments.train --config=experiments/configs/vae.py:digits --workdir=DIR)")
      self.vae.check()
    return self


def model_config(config) -> DiffusionConfig:
  """`config.model` as a checked DiffusionConfig."""
  return from_config(DiffusionConfig, config.model).check()


def make_schedule(cfg: DiffusionConfig):
  """The forward-process schedule named by `cfg.schedule`: "linear" | "cosine" (a `NoiseSchedule`), or "flow" (a
  `FlowSchedule`, rectified flow with `cfg.flow_shift`)."""
  if cfg.schedule == "flow":
    return FlowSchedule(shift=cfg.flow_shift)
  if cfg.schedule == "linear":
    return NoiseSchedule.linear(cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
  if cfg.schedule == "cosine":
    return NoiseSchedule.cosine(cfg.num_timesteps, s=cfg.cosine_s)
  raise ConfigError(f"config.model.schedule={cfg.schedule!r} is not one of {list(SCHEDULES)}")


def make_unet(cfg: DiffusionConfig, num_classes: int, dtype=jnp.float32) -> UNet:
  """The U-Net sized by `cfg` (num_classes 0 = unconditional)."""
  return UNet(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
              attn_resolutions=cfg.attn_resolutions, num_heads=cfg.num_heads, dropout=cfg.dropout,
              norm_groups=cfg.norm_groups, num_classes=num_classes, dtype=dtype)


# A denoiser as the loss sees it: (x_t [B,...], t int32 [B], label int32 [B] | None, keys [B]) -> prediction,
# `keys` one PRNG key per example (for dropout).
ApplyFn = Callable[[jax.Array, jax.Array, Optional[jax.Array], jax.Array], jax.Array]


def _example_keys(rng: jax.Array, batch: int) -> jax.Array:
  """`rng` if it already holds one key per example ([B] typed or [B, 2] raw), else split into `batch` keys."""
  rng = jnp.asarray(rng)
  single = rng.ndim == (0 if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else 1)
  keys = jax.random.split(rng, batch) if single else rng
  if keys.shape[0] != batch:
    raise ValueError(f"got {keys.shape[0]} per-example keys for a batch of {batch}")
  return keys


def diffusion_loss(apply_fn: ApplyFn, schedule, x0: jax.Array, rng: jax.Array, *,
                   prediction: str = "epsilon", label: Optional[jax.Array] = None, null_label: int = 0,
                   label_dropout: float = 0.0, t: Optional[jax.Array] = None,
                   noise: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
  """The denoising loss mean_b mean_{pixels} (apply_fn(x_t, t, label, keys) - target)^2 and its metrics.

  `rng` is one key, or one key per example (`genjax.core.random.example_keys`: then an example draws the same
  numbers however the batch is laid out over devices). Per example: `t` ~ U{0..T-1}, `noise` ~ N(0, I) (unless
  given: tests pass them to check the formula), and with `label` and `label_dropout > 0` the label becomes
  `null_label` with that probability.

  With a `FlowSchedule` (flow matching) `t` is float32 in [0, 1] (`schedule.sample_time`), x_t = (1 - t) x0 + t eps
  and the target is the velocity eps - x0 (`prediction` is then unused).
  """
  flow = isinstance(schedule, FlowSchedule)
  if not flow:
    check_prediction(prediction)
  x0 = jnp.asarray(x0, jnp.float32)
  batch = x0.shape[0]
  keys = _example_keys(rng, batch)
  draw = lambda i, f: jax.vmap(lambda k: f(jax.random.fold_in(k, i)))(keys)
  if t is None and flow:
    t = draw(0, lambda k: schedule.sample_time(k, 1)[0])
  elif t is None:
    t = draw(0, lambda k: jax.random.randint(k, (), 0, schedule.num_timesteps, dtype=jnp.int32))
  if noise is None:
    noise = draw(1, lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))
  if label is not None and label_dropout > 0:
    drop = draw(2, lambda k: jax.random.bernoulli(k, label_dropout))
    label = jnp.where(drop, jnp.int32(null_label), label.astype(jnp.int32))
  x_t = schedule.add_noise(x0, noise, t)
  target = schedule.training_target(x0, noise, t) if flow else schedule.training_target(x0, noise, t, prediction)
  pred = apply_fn(x_t, t, label, draw(3, lambda k: k)).astype(jnp.float32)
  if pred.shape != target.shape:
    raise ValueError(f"model prediction has shape {pred.shape}, expected the data's shape {target.shape}")
  per_example = jnp.mean(jnp.square(pred - target).reshape(batch, -1), axis=1)
  loss = jnp.mean(per_example)
  return loss, {"target_mse": jnp.mean(jnp.square(target))}


def _check_images(images, shape) -> jax.Array:
  images = jnp.asarray(images)
  if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
    raise UserError(f"batch['image'] has shape {images.shape}, expected [B, {', '.join(map(str, shape))}]")
  return images.astype(jnp.float32)


def sample_options(options: dict, defaults: dict, num_timesteps: int, num_classes: int,
                   samplers: tuple = SAMPLERS) -> dict:
  """`options` (None = the default) merged over `defaults` and validated; errors name the bad value and choices.
  `samplers`: the valid sampler names (`FLOW_METHODS` for a flow-matching model)."""
  unknown = sorted(set(options) - set(SAMPLE_OPTIONS))
  if unknown:
    raise UserError(f"unknown diffusion sample options {unknown}; valid: {list(SAMPLE_OPTIONS)}")
  o = {k: (defaults.get(k) if options.get(k) is None else options[k]) for k in SAMPLE_OPTIONS}
  if o["sampler"] not in samplers:
    raise UserError(f"unknown sampler {o['sampler']!r}; valid: {list(samplers)}")
  n = o["num_steps"]
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= num_timesteps:
    raise UserError(f"num_steps must be an int in [1, {num_timesteps}] (the schedule length), got {show(n)}")
  eta = float(o["eta"])
  if not 0.0 <= eta <= 1.0:
    raise UserError(f"eta must be in [0, 1], got {show(o['eta'])}")
  if eta != 0.0 and o["sampler"] not in ETA_SAMPLERS:
    raise UserError(f"eta={eta} applies only to sampler={' | '.join(map(repr, ETA_SAMPLERS))}, "
                    f"got sampler={o['sampler']!r}")
  guidance = float(o["guidance"])
  if not guidance >= 0.0:
    raise UserError(f"guidance must be a scale >= 0 (1 = the plain conditional model), got {show(o['guidance'])}")
  label = o["label"]
  if num_classes == 0:
    if label is not None or guidance != 1.0:
      raise UserError(f"label={show(label)} / guidance={guidance} need a class-conditional model "
                       "(config.model.conditional=True); this one is unconditional")
  elif label is not None and (isinstance(label, bool) or not isinstance(label, (int, np.integer))
                              or not 0 <= label <= num_classes):
    raise UserError(f"label must be None (every class in turn) or an int in [0, {num_classes - 1}] "
                     f"({num_classes} = the null label: unconditional), got {show(label)}")
  return dict(sampler=o["sampler"], num_steps=int(n), eta=eta, guidance=guidance, label=label)


def _model_builder(unet: UNet, num_classes: int, flow_time_scale: Optional[float]):
  """`model_for(params, labels, guidance, guided) -> model_fn(x, t)`: the U-Net as a sampler's model, a pytree
  Partial over the params (one function object per task, so new params / labels / guidance compile nothing).
  `flow_time_scale`: a flow model sees t in [0, 1] scaled to the VP timestep range; None for a VP model."""

  def net(unet_vars, x, t, labels=None):
    return unet.apply(unet_vars, x, t if flow_time_scale is None else t * flow_time_scale, labels)

  def conditional(unet_vars, labels, x, t):
    return net(unet_vars, x, t, labels)

  def labelled(unet_vars, x, t, labels):
    return net(unet_vars, x, t, labels)

  def unconditional(unet_vars, x, t):
    return net(unet_vars, x, t)

  def model_for(params, labels, guidance, guided):
    if num_classes == 0:
      return jax.tree_util.Partial(unconditional, params["unet"])
    if guided:
      return classifier_free_guidance(jax.tree_util.Partial(labelled, params["unet"]), guidance, num_classes, labels)
    return jax.tree_util.Partial(conditional, params["unet"], labels)

  return model_for


def _sample_fn(unet: UNet, schedule, space: Space, defaults: dict, prediction: str,
               num_classes: int, max_steps: int, flow_time_scale: float):
  """`sample_images(params, rng, n, **options) -> [n, H, W, C]` in [0, 1] (see module docstring)."""
  flow = isinstance(schedule, FlowSchedule)
  model_for = _model_builder(unet, num_classes, flow_time_scale if flow else None)
  # A flow model's samplers take no prediction / clipping; eta goes to ETA_SAMPLERS only (sample_options checks).
  fixed = {} if flow else dict(prediction=prediction, clip_denoised=space.clip)

  @functools.partial(jax.jit, static_argnames=("n", "sampler", "guided"))
  def run(params, rng, labels, guidance, num_steps, eta, *, n, sampler, guided):
    noise_rng, step_rng = jax.random.split(rng)
    x_T = jax.random.normal(noise_rng, (n,) + space.shape, jnp.float32)
    options = dict(fixed, eta=eta) if sampler in ETA_SAMPLERS else fixed
    x0 = run_sampler(sampler, model_for(params, labels, guidance, guided), schedule, x_T, rng=step_rng,
                     num_steps=num_steps, space="flow" if flow else "diffusion", **options)
    return space.decode(params, x0)

  def sample_images(params, rng, n: int, **options):
    edits = {k: options.pop(k) for k in EDIT_OPTIONS if options.get(k) is not None}  # see diffusion_editing.py
    if edits:
      check_edit_options(edits, flow=flow, sampler_given=options.get("sampler") is not None)
    o = sample_options(options, defaults, max_steps, num_classes, samplers=FLOW_METHODS if flow else SAMPLERS)
    if o["label"] is None:  # every class in turn: a grid shows them all
      labels = np.arange(n, dtype=np.int32) % max(num_classes, 1)
    else:
      labels = np.full((n,), o["label"], np.int32)
    if edits:  # eager: img2img picks its grid on the host; the samplers it calls are jitted
      if o["label"] is None:  # an edit keeps the image's class: unconditional (the null label) unless one is given
        labels = np.full((n,), num_classes, np.int32)
      guided = bool(num_classes) and o["guidance"] != 1.0
      model_fn = model_for(params, jnp.asarray(labels), jnp.float32(o["guidance"]), guided)
      return edit_images(model_fn, schedule, space, params, rng, int(n), o, edits, prediction)
    return run(params, rng, labels, np.float32(o["guidance"]), np.int32(o["num_steps"]), np.float32(o["eta"]),
               n=int(n), sampler=o["sampler"], guided=bool(num_classes) and o["guidance"] != 1.0)

  return sample_images


def _space(cfg: DiffusionConfig, dataset, image_shape, dtype) -> Space:
  """Pixel space, or the latent space of the VAE run `cfg.vae_workdir` (read by the Task's init, not here)."""
  if cfg.space == "latent":
    source = LatentSource(cfg.vae_workdir, cfg.latent_scale, dataset.name, dataset.train_split, dataset.data_dir)
    return latent_space(cfg.vae, image_shape, dtype, source)
  return pixel_space(image_shape, cfg.clip_denoised)


def task(config) -> Task:
  """The diffusion Task for `config` (see experiments/configs/ddpm.py for the fields); reads nothing from disk."""
  cfg = model_config(config)
  info = dataset_info(config.dataset.name)
  if info.kind != "image":
    raise ConfigError(f"the diffusion family needs an image data set; {config.dataset.name!r} is {info.kind}")
  flow = cfg.flow  # flow matching: the U-Net predicts the velocity eps - x0 at t * num_timesteps
  prediction = "velocity" if flow else check_prediction(cfg.prediction)
  schedule = make_schedule(cfg)
  flow_time_scale = float(cfg.num_timesteps)
  num_classes = int(info.num_classes or 0) if cfg.conditional else 0
  if cfg.conditional and num_classes == 0:
    raise ConfigError(f"config.model.conditional=True but data set {config.dataset.name!r} has no labels")
  dtype = compute_dtype(config.compute_dtype)
  space = _space(cfg, config.dataset, info.image_shape, dtype)
  unet = make_unet(cfg, num_classes, dtype)
  label_dropout = cfg.label_dropout if num_classes else 0.0

  def init(rng, example_batch, extra=space.init_extra):
    del example_batch  # shapes come from the data set's info
    x = jnp.zeros((1,) + space.shape, jnp.float32)
    label = jnp.zeros((1,), jnp.int32) if num_classes else None
    return {"unet": unet.init(rng, x, jnp.zeros((1,), jnp.int32), label), **extra()}

  def objective(params, batch, rng, train: bool):
    x0 = space.encode(params, _check_images(batch["image"], info.image_shape))
    label = jnp.asarray(batch["label"], jnp.int32) if num_classes else None
    # Per-example keys (from the example's id in the global batch), so pjit == pmap for any device layout.
    keys = example_keys(rng, batch) if "example_id" in batch else rng

    def apply_fn(x_t, t, lab, keys):
      t = t * flow_time_scale if flow else t
      if not (train and unet.dropout > 0):
        return unet.apply(params["unet"], x_t, t, lab)
      # Dropout masks per example too: apply one example at a time under vmap (batched again by XLA).
      one = lambda x, tt, ll, k: unet.apply(params["unet"], x[None], tt[None], None if ll is None else ll[None],
                                            train=True, rngs={"dropout": k})[0]
      return jax.vmap(one)(x_t, t, lab, keys)

    return diffusion_loss(apply_fn, schedule, x0, keys, prediction=prediction, label=label,
                          null_label=num_classes, label_dropout=label_dropout if train else 0.0)

  def loss_fn(params, batch, rng, step):
    del step
    return objective(params, batch, rng, train=True)

  def evaluate(params, batch, rng):
    loss, metrics = objective(params, batch, rng, train=False)
    return {"loss": loss, **metrics}

  defaults = dict(sampler=cfg.sampler, num_steps=cfg.num_sample_steps, eta=cfg.eta, guidance=cfg.guidance,
                  label=None)
  max_steps = cfg.num_timesteps
  sample_images = _sample_fn(unet, schedule, space, defaults, prediction, num_classes, max_steps, flow_time_scale)
  sample_options(defaults, defaults, max_steps, num_classes,  # a bad config default fails here
                 samplers=FLOW_METHODS if flow else SAMPLERS)
  optimizer = make_optimizer(config.optimizer, int(config.num_train_steps))
  return Task(init=init, phases=(Phase("diffusion", loss_fn, optimizer, params_key="unet"),),
              sample_images=sample_images, evaluate=evaluate,
              shape_init=functools.partial(init, extra=space.extra_shapes),
              edit=sample_images, samplers=FLOW_METHODS if flow else SAMPLERS)   # edit: see diffusion_editing.py
