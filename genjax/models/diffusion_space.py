"""Where a diffusion model diffuses: pixel space, or the latent space of a trained VAE (`config.model.space`).

    space = pixel_space(image_shape, clip=True)
    space = latent_space(cfg.vae, image_shape, dtype, LatentSource(cfg.vae_workdir, cfg.latent_scale, "digits"))
    x0 = space.encode(params, images)        # images [B, H, W, C] in [0, 1] -> x0 [B, *space.shape]
    images = space.decode(params, x0)        # -> [B, H, W, C] in [0, 1]
    extra = space.init_extra()               # inside the task's init: the frozen params besides "unet"
    zeros = space.extra_shapes()             # the same shapes, reading nothing (the task's shape_init)

Pixel space: x0 = 2 * image - 1, predicted x0 clipped to [-1, 1] while sampling when `clip`.

Latent space: the VAE's architecture is part of the diffusion config (`config.model.vae`, the VAE run's model
section typed as `genjax.models.vae.VAEConfig`), so building the task reads nothing from disk. x0 = latent_scale *
VAE-encoder mean, diffused as [1, 1, latent_dim]; decoding divides by the scale and runs the VAE decoder. The frozen
VAE variables and the scale are params (params["vae"], params["latent_scale"]), saved in every checkpoint of the
diffusion run: sampling and evaluating it never need the VAE run again.

They are read from the VAE run when the task's init is first traced (`jax.ensure_compile_time_eval`, once per
task), and enter the jitted init as constants; the loop's abstract evaluation traces the task's `shape_init`
instead (zeros of the same shapes), so only a run that starts from scratch reads the VAE run. `load_vae_run`
checks that `config.model.vae_workdir` holds a 'vae' run on the data set's image shape whose model config equals
`config.model.vae` (ConfigError naming the fields that differ and the run's values), loads its params (EMA when
kept) and, for `latent_scale` 0, measures 1 / std of the encoder means over the first `LATENT_SCALE_IMAGES`
training images. Resuming, sampling and evaluating never read the VAE run. (A `jax.pure_callback` could not do the
read: an error raised in it, such as a missing VAE run, hangs a program that runs on several devices.)
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from genjax.data import dataset_info, load_arrays
from genjax.errors import ConfigError, WorkdirError
from genjax.models.fields import from_config, to_dict
from genjax.models.vae import VAE, VAEConfig, vae_module
from genjax.core.checkpoint import CONFIG_FILE, load_config, load_run

LATENT_SCALE_IMAGES = 4096   # training images whose encoder means set latent_scale 0


@dataclasses.dataclass(frozen=True)
class Space:
  """Where diffusion happens: x0 = encode(params, images), images = decode(params, x) in [0, 1]."""
  shape: tuple[int, ...]                      # one example's x0 shape [h, w, c]
  encode: Callable[[Any, jax.Array], jax.Array]
  decode: Callable[[Any, jax.Array], jax.Array]
  clip: Optional[tuple[float, float]]         # the data range the samplers clip predicted x0 to
  init_extra: Callable[[], dict]              # frozen params besides "unet" (called inside the task's init)
  extra_shapes: Callable[[], dict]            # zeros shaped like init_extra's values, reading nothing


@dataclasses.dataclass(frozen=True)
class LatentSource:
  """Where init gets the latent space's values: the VAE run, the scale (0 = measured), the data to measure on."""
  vae_workdir: str
  latent_scale: float
  dataset: str
  train_split: str = "train"
  data_dir: Optional[str] = None


def pixel_space(image_shape, clip: bool) -> Space:
  return Space(shape=tuple(image_shape), encode=lambda params, img: 2.0 * img - 1.0,
               decode=lambda params, x: jnp.clip((x + 1.0) / 2.0, 0.0, 1.0),
               clip=(-1.0, 1.0) if clip else None, init_extra=dict, extra_shapes=dict)


def latent_space(vae_cfg: VAEConfig, image_shape, dtype, source: LatentSource) -> Space:
  """The latent space of a VAE with architecture `vae_cfg` (see module docstring); nothing is read here."""
  image_shape = tuple(image_shape)
  vae = vae_module(vae_cfg, image_shape, dtype)
  d = int(vae_cfg.latent_dim)

  def encode(params, images):
    mean, _ = vae.apply({"params": params["vae"]}, images, method="encode")
    return (params["latent_scale"] * mean).reshape(-1, 1, 1, d)

  def decode(params, x):
    z = x.reshape(-1, d) / params["latent_scale"]
    return jnp.clip(vae.apply({"params": params["vae"]}, z, method="decode"), 0.0, 1.0)

  @functools.lru_cache(maxsize=None)
  def init_values():  # read once per task, eagerly even inside init's trace; errors are not cached
    with jax.ensure_compile_time_eval():
      params, scale = load_vae_run(vae_cfg, image_shape, source)
      return jax.tree.map(jnp.asarray, params), jnp.asarray(scale, jnp.float32)

  def init_extra():
    params, scale = init_values()
    return {"vae": params, "latent_scale": scale}

  def extra_shapes():
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), vae_param_shapes(vae_cfg, image_shape))
    return {"vae": zeros, "latent_scale": jnp.zeros((), jnp.float32)}

  return Space(shape=(1, 1, d), encode=encode, decode=decode, clip=None, init_extra=init_extra,
               extra_shapes=extra_shapes)


def vae_param_shapes(vae_cfg: VAEConfig, image_shape) -> Any:
  """The VAE's params as float32 ShapeDtypeStructs, from its config alone (abstract init: nothing runs)."""
  vae = vae_module(vae_cfg, tuple(image_shape))
  x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  z = jax.ShapeDtypeStruct((1, vae_cfg.latent_dim), jnp.float32)
  abstract = jax.eval_shape(vae.init, jax.random.key(0), x, z)["params"]
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), abstract)


def check_vae_run(vae_cfg: VAEConfig, image_shape, workdir: str) -> None:
  """WorkdirError unless `workdir` holds a run; ConfigError unless it is a 'vae' run on images of `image_shape` whose
  model config is `vae_cfg`."""
  if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    raise WorkdirError(f"config.model.vae_workdir={workdir!r} holds no VAE run ({CONFIG_FILE} is missing): train one "
                       "with python -m experiments.train --config=experiments/configs/vae.py:digits "
                       f"--workdir={workdir}")
  run = load_config(workdir)
  family = run["family"] if "family" in run else None
  if family != "vae":
    raise ConfigError(f"config.model.vae_workdir={workdir!r} is a {family!r} run, not a 'vae' run")
  theirs = to_dict(from_config(VAEConfig, run.model, f"the model config of the VAE run in {workdir!r}"))
  ours = to_dict(vae_cfg)
  differ = [k for k in ours if ours[k] != theirs[k]]
  if differ:
    raise ConfigError(
        f"config.model.vae differs from the model config of the VAE run in {workdir!r} in {differ}: the run has "
        f"{', '.join(f'{k}={theirs[k]!r}' for k in differ)}, this config "
        f"{', '.join(f'{k}={ours[k]!r}' for k in differ)}; set config.model.vae to the run's model section")
  shape = tuple(dataset_info(run.dataset.name).image_shape)
  if shape != tuple(image_shape):
    raise ConfigError(f"the VAE run in {workdir!r} models {run.dataset.name!r} images of shape {shape}; this "
                      f"config's data set has {tuple(image_shape)}")


def load_vae_run(vae_cfg: VAEConfig, image_shape, source: LatentSource) -> tuple[Any, float]:
  """(the VAE run's params, latent_scale) after `check_vae_run` (see module docstring)."""
  if not source.vae_workdir:
    raise ConfigError("config.model.vae_workdir is empty: latent diffusion starts from a trained VAE run's workdir "
                      "(python -m experiments.train --config=experiments/configs/vae.py:digits --workdir=DIR)")
  check_vae_run(vae_cfg, image_shape, source.vae_workdir)
  _, params = load_run(source.vae_workdir)
  params = jax.device_get(params)
  want = vae_param_shapes(vae_cfg, image_shape)
  if jax.tree.structure(params) != jax.tree.structure(want) or any(
      np.shape(a) != b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want))):
    raise ConfigError(f"the params of the VAE run in {source.vae_workdir!r} do not fit config.model.vae")
  scale = float(source.latent_scale)
  if scale <= 0:
    scale = measure_latent_scale(vae_module(vae_cfg, tuple(image_shape)), params, source)
  return params, scale


def measure_latent_scale(vae: VAE, params, source: LatentSource) -> float:
  """1 / std of the VAE encoder means over the first LATENT_SCALE_IMAGES training images."""
  images = load_arrays(source.dataset, source.train_split, data_dir=source.data_dir,
                       max_examples=LATENT_SCALE_IMAGES)["image"]
  encode = jax.jit(lambda p, x: jnp.std(vae.apply({"params": p}, x, method="encode")[0]))
  std = float(encode(params, np.asarray(images, np.float32)))
  return 1.0 / max(std, 1e-6)
