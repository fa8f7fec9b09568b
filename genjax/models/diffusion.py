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
keeps the EMA of the params (`config.ema_decay`).

Params: `{"unet": U-Net variables}`; latent diffusion adds the frozen `"vae"` variables and `"latent_scale"` (the
single phase trains only `params["unet"]`), so a checkpoint is enough to sample and decode.

Sampling: `sample_images(params, rng, n, sampler=..., num_steps=..., eta=..., guidance=..., label=...)` runs the
jitted samplers of `genjax.samplers.diffusion` (defaults from `config.model`: sampler, num_sample_steps, eta,
guidance); any other option is a ValueError naming the valid ones. `evaluate` gives the same loss on a test batch.
The sampling part lives in `genjax.models.diffusion_sampling`-free form below: see `make_sample_fn`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from genjax.models.diffusion_sample import make_sample_fn
from genjax.models.unet import UNet
from genjax.samplers.schedules import NoiseSchedule, check_prediction
from genjax.train.optim import make_optimizer
from genjax.train.task import Phase, Task

SCHEDULES = ("linear", "cosine")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_schedule(model_config) -> NoiseSchedule:
  """The forward-process schedule named by `config.model.schedule` ("linear" | "cosine")."""
  kind = model_config.schedule
  if kind == "linear":
    return NoiseSchedule.linear(int(model_config.num_timesteps), float(model_config.beta_start),
                                float(model_config.beta_end))
  if kind == "cosine":
    return NoiseSchedule.cosine(int(model_config.num_timesteps), s=float(model_config.get("cosine_s", 0.008)))
  raise ValueError(f"config.model.schedule={kind!r} is not one of {list(SCHEDULES)}")


def compute_dtype(config) -> Any:
  name = config.get("compute_dtype", "float32")
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"config.compute_dtype={name!r} is not one of {sorted(COMPUTE_DTYPES)}")
  return COMPUTE_DTYPES[name]


def make_unet(model_config, num_classes: int, dtype=jnp.float32) -> UNet:
  """The U-Net sized by `config.model` (num_classes 0 = unconditional)."""
  return UNet(ch=int(model_config.ch), ch_mult=tuple(model_config.ch_mult),
              num_res_blocks=int(model_config.num_res_blocks),
              attn_resolutions=tuple(model_config.attn_resolutions), num_heads=int(model_config.num_heads),
              dropout=float(model_config.dropout), norm_groups=int(model_config.norm_groups),
              num_classes=num_classes, dtype=dtype)


# A denoiser as the loss sees it: (x_t [B,...], t int32 [B], label int32 [B] | None, dropout rng | None) -> pred.
ApplyFn = Callable[[jax.Array, jax.Array, Optional[jax.Array], Optional[jax.Array]], jax.Array]


def diffusion_loss(apply_fn: ApplyFn, schedule: NoiseSchedule, x0: jax.Array, rng: jax.Array, *,
                   prediction: str = "epsilon", label: Optional[jax.Array] = None, null_label: int = 0,
                   label_dropout: float = 0.0, t: Optional[jax.Array] = None,
                   noise: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
  """The denoising loss mean_b mean_{pixels} (apply_fn(x_t, t, label) - target)^2 and its metrics.

  `t` ~ U{0..T-1} and `noise` ~ N(0, I) are drawn from `rng` unless given (tests pass them to check the formula).
  With `label` given and `label_dropout > 0`, each label becomes `null_label` with that probability.
  """
  check_prediction(prediction)
  x0 = jnp.asarray(x0, jnp.float32)
  batch = x0.shape[0]
  t_rng, noise_rng, drop_rng, model_rng = jax.random.split(rng, 4)
  if t is None:
    t = jax.random.randint(t_rng, (batch,), 0, schedule.num_timesteps, dtype=jnp.int32)
  if noise is None:
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  if label is not None and label_dropout > 0:
    drop = jax.random.bernoulli(drop_rng, label_dropout, (batch,))
    label = jnp.where(drop, jnp.int32(null_label), label.astype(jnp.int32))
  x_t = schedule.add_noise(x0, noise, t)
  target = schedule.training_target(x0, noise, t, prediction)
  pred = apply_fn(x_t, t, label, model_rng).astype(jnp.float32)
  if pred.shape != target.shape:
    raise ValueError(f"model prediction has shape {pred.shape}, expected the data's shape {target.shape}")
  per_example = jnp.mean(jnp.square(pred - target).reshape(batch, -1), axis=1)
  loss = jnp.mean(per_example)
  return loss, {"target_mse": jnp.mean(jnp.square(target))}


@dataclasses.dataclass(frozen=True)
class _Space:
  """Where diffusion happens: `encode(params, images, rng) -> x0`, `decode(params, x) -> images in [0, 1]`."""
  shape: tuple[int, ...]                      # one example's x0 shape
  encode: Callable[[Any, jax.Array], jax.Array]
  decode: Callable[[Any, jax.Array], jax.Array]
  clip: Optional[tuple[float, float]]
  init_extra: Callable[[], dict]              # params besides "unet" (frozen)


def _pixel_space(image_shape, clip: bool) -> _Space:
  return _Space(shape=tuple(image_shape), encode=lambda params, img: 2.0 * img - 1.0,
                decode=lambda params, x: jnp.clip((x + 1.0) / 2.0, 0.0, 1.0),
                clip=(-1.0, 1.0) if clip else None, init_extra=dict)


def _check_images(images, shape) -> jax.Array:
  images = jnp.asarray(images)
  if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
    raise ValueError(f"batch['image'] has shape {images.shape}, expected [B, {', '.join(map(str, shape))}]")
  return images.astype(jnp.float32)


def task(config) -> Task:
  """The diffusion Task for `config` (see experiments/configs/ddpm.py for the fields)."""
  from genjax.data import dataset_info
  m = config.model
  info = dataset_info(config.dataset.name)
  if info.kind != "image":
    raise ValueError(f"the diffusion family needs an image data set; {config.dataset.name!r} is {info.kind}")
  prediction = check_prediction(m.prediction)
  schedule = make_schedule(m)
  num_classes = int(info.num_classes or 0) if m.conditional else 0
  if m.conditional and num_classes == 0:
    raise ValueError(f"config.model.conditional=True but data set {config.dataset.name!r} has no labels")
  if m.get("vae_workdir", ""):
    from genjax.models.latent import latent_space
    space = latent_space(config, info)
  else:
    space = _pixel_space(info.image_shape, bool(m.clip_denoised))
  unet = make_unet(m, num_classes, compute_dtype(config))
  label_dropout = float(m.label_dropout) if num_classes else 0.0
  if not 0.0 <= label_dropout < 1.0:
    raise ValueError(f"config.model.label_dropout must be in [0, 1), got {label_dropout}")

  def init(rng, example_batch):
    x = jnp.zeros((1,) + space.shape, jnp.float32)
    label = jnp.zeros((1,), jnp.int32) if num_classes else None
    return {"unet": unet.init(rng, x, jnp.zeros((1,), jnp.int32), label), **space.init_extra()}

  def objective(params, batch, rng, train: bool):
    enc_rng, loss_rng = jax.random.split(rng)
    x0 = space.encode(params, _check_images(batch["image"], info.image_shape))
    label = jnp.asarray(batch["label"], jnp.int32) if num_classes else None

    def apply_fn(x_t, t, lab, drop_rng):
      return unet.apply(params["unet"], x_t, t, lab, train=train, rngs={"dropout": drop_rng})

    return diffusion_loss(apply_fn, schedule, x0, loss_rng, prediction=prediction, label=label,
                          null_label=num_classes, label_dropout=label_dropout if train else 0.0)

  def loss_fn(params, batch, rng, step):
    del step
    return objective(params, batch, rng, train=True)

  def evaluate(params, batch, rng):
    loss, _ = objective(params, batch, rng, train=False)
    return {"loss": loss}

  sample_images = make_sample_fn(unet, schedule, space, m, prediction=prediction, num_classes=num_classes)
  optimizer = make_optimizer(config.optimizer, int(config.num_train_steps))
  return Task(init=init, phases=(Phase("diffusion", loss_fn, optimizer, params_key="unet"),),
              sample_images=sample_images, evaluate=evaluate)
