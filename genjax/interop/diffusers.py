"""Load diffusers DDPM-style U-Nets and their noise schedules, to run any genjax sampler on them.

A diffusers `UNet2DModel` directory (as `save_pretrained` writes it, or a pipeline directory holding `unet/` and
`scheduler/`, e.g. a local copy of google/ddpm-cifar10-32) loads without torch: config.json is read and checked,
diffusion_pytorch_model.safetensors (or its sharded index) is read with `safetensors` and mapped by name onto the Flax
network in `genjax.interop.diffusers_unet` (NHWC):

    from genjax.interop.diffusers import load_unet, load_schedule, load_sampler_options
    from genjax.samplers import dpm_solver_sample
    apply_fn, params = load_unet("ddpm-cifar10-32")          # apply_fn(params, x [B,H,W,C], t [B]) -> [B,H,W,C]
    sched = load_schedule("ddpm-cifar10-32")                 # NoiseSchedule from scheduler_config.json
    options = load_sampler_options("ddpm-cifar10-32")        # {"prediction": "epsilon", "clip_denoised": (-1, 1)}
    model_fn = jax.tree_util.Partial(apply_fn, params)
    x0 = dpm_solver_sample(model_fn, sched, jax.random.normal(key, (16, 32, 32, 3)), num_steps=20, **options)

    pipe = load_pipeline("ddpm-cifar10-32")                  # the three above in one object
    images = sample_images(pipe, key, 16, sampler="heun", num_steps=18)   # [16, 32, 32, 3] in [0, 1]

`t` may be int or float: a fractional timestep goes straight into the sinusoidal embedding, as in diffusers (the
EDM-style samplers use this). Supported: DownBlock2D / AttnDownBlock2D / UpBlock2D / AttnUpBlock2D (optionally
`UNetRes`-prefixed), UNetMidBlock2D or none, positional time embedding with any `flip_sin_to_cos` / `freq_shift`,
`resnet_time_scale_shift` default | scale_shift, single- or multi-head attention, the old query/key/value/proj_attn
attention weight names. Anything else (cross-attention or skip blocks, class embeddings, Fourier or learned time
embeddings, resnet down/upsampling) is refused with a one-line `CheckpointError` naming the field; config keys that
do not change inference (dropout, num_train_timesteps, ...) are ignored, as diffusers ignores unknown ones.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from genjax.errors import CheckpointError, UserError
from genjax.interop import open_safetensors
from genjax.interop.diffusers_unet import ACTIVATIONS, DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, DiffusersUNet, UNet2DConfig
from genjax.samplers.registry import sampler_names, sampler_spec
from genjax.samplers.schedules import NoiseSchedule

__all__ = ["load_unet", "load_unet_config", "load_schedule", "load_sampler_options", "load_pipeline",
           "sample_images", "DiffusersPipeline", "UNet2DConfig", "SAMPLERS"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}
_LIST_MODULES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out")


# --------------------------------------------------------------------------------------------- U-Net
def load_unet_config(path: str) -> UNet2DConfig:
  """Reads and checks config.json of a `UNet2DModel` directory (or `<path>/unet/`); see module docstring."""
  raw = _read_json(_locate(path, "config.json", "unet"))
  get = lambda key, default=None: raw.get(key, default)
  _refuse_unless(get("_class_name", "UNet2DModel") == "UNet2DModel", "_class_name", get("_class_name"),
                 "UNet2DModel")
  _refuse_unless(get("time_embedding_type", "positional") == "positional", "time_embedding_type",
                 get("time_embedding_type"), "positional")
  _refuse_unless(get("class_embed_type") is None, "class_embed_type", get("class_embed_type"), "null")
  _refuse_unless(get("num_class_embeds") is None, "num_class_embeds", get("num_class_embeds"), "null")
  mid = get("mid_block_type", "UNetMidBlock2D")
  _refuse_unless(mid in (None, "UNetMidBlock2D"), "mid_block_type", mid, "UNetMidBlock2D, null")
  shift = get("resnet_time_scale_shift", "default")
  _refuse_unless(shift in ("default", "scale_shift"), "resnet_time_scale_shift", shift, "default, scale_shift")
  act = get("act_fn", "silu")
  _refuse_unless(act in ACTIVATIONS, "act_fn", act, ", ".join(ACTIVATIONS))
  down = tuple(_strip_res(b) for b in get("down_block_types", ("DownBlock2D",) + ("AttnDownBlock2D",) * 3))
  up = tuple(_strip_res(b) for b in get("up_block_types", ("AttnUpBlock2D",) * 3 + ("UpBlock2D",)))
  for name, kinds, valid in (("down_block_types", down, DOWN_BLOCK_TYPES), ("up_block_types", up, UP_BLOCK_TYPES)):
    for kind in kinds:
      _refuse_unless(kind in valid, name, kind, ", ".join(valid))
  widths = tuple(int(c) for c in get("block_out_channels", (224, 448, 672, 896)))
  if not len(widths) == len(down) == len(up):
    raise CheckpointError(f"config.json: block_out_channels, down_block_types and up_block_types must have the same "
                          f"length, got {len(widths)}, {len(down)}, {len(up)}")
  for name, kinds, key in (("downsample_type", down, "AttnDownBlock2D"), ("upsample_type", up, "AttnUpBlock2D")):
    if any(kind == key for kind in kinds[:-1]):  # only the Attn blocks read it, and not in the last position
      _refuse_unless(get(name, "conv") in ("conv", None), name, get(name), "conv")
  groups = get("norm_num_groups", 32)
  _refuse_unless(isinstance(groups, int) and all(c % groups == 0 for c in widths), "norm_num_groups", groups,
                 f"an int dividing every block_out_channels {list(widths)}")
  head_dim = get("attention_head_dim", 8)
  _refuse_unless(head_dim is None or (isinstance(head_dim, int) and 0 < head_dim <= min(widths)),
                 "attention_head_dim", head_dim, f"null or an int in [1, {min(widths)}]")
  size = get("sample_size")
  if size is not None:
    size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
  return UNet2DConfig(
      sample_size=size, in_channels=int(get("in_channels", 3)), out_channels=int(get("out_channels", 3)),
      down_block_types=down, up_block_types=up, block_out_channels=widths,
      layers_per_block=int(get("layers_per_block", 2)), center_input_sample=bool(get("center_input_sample", False)),
      flip_sin_to_cos=bool(get("flip_sin_to_cos", True)), freq_shift=float(get("freq_shift", 0)),
      time_embedding_dim=get("time_embedding_dim"), mid_block=mid is not None,
      add_attention=bool(get("add_attention", True)),
      mid_block_scale_factor=float(get("mid_block_scale_factor", 1.0)),
      downsample_padding=int(get("downsample_padding", 1)), act_fn=act, attention_head_dim=head_dim,
      norm_num_groups=groups, attn_norm_num_groups=get("attn_norm_num_groups"),
      norm_eps=float(get("norm_eps", 1e-5)), resnet_time_scale_shift=shift)


def load_unet(path: str):
  """Loads a diffusers `UNet2DModel` directory: returns `(apply_fn, params)`.

  `apply_fn(params, x, t)`: x [B, H, W, in_channels] (NHWC, any float; H and W multiples of 2^(number of blocks -
  1)), t [B] int or float timesteps (a scalar is broadcast) -> float32 [B, H, W, out_channels]. Jitted, and int
  and float t share one program; pass `jax.tree_util.Partial(apply_fn, params)` to a sampler. `params` is a Flax
  parameter tree in float32, whatever the checkpoint's storage (float32, float16 or bfloat16).
  """
  cfg = load_unet_config(path)
  net = DiffusersUNet(cfg)
  factor = 2 ** (len(cfg.block_out_channels) - 1)
  params = _convert_weights(_read_weights(_weights_dir(path)), _param_shapes(cfg))
  forward = jax.jit(lambda params, x, t: net.apply({"params": params}, x, t))

  def apply_fn(params, x, t):
    x = jnp.asarray(x)
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels or x.shape[1] % factor or x.shape[2] % factor:
      raise UserError(f"x must be NHWC [batch, height, width, {cfg.in_channels}] with height and width multiples "
                      f"of {factor}, got shape {x.shape}")
    t = jnp.asarray(t)
    if t.ndim == 0:
      t = jnp.broadcast_to(t, (x.shape[0],))
    if t.shape != (x.shape[0],):
      raise UserError(f"t must have shape [batch] = ({x.shape[0]},) or be a scalar, got shape {t.shape}")
    # float32 t, as diffusers' embedding does: int and float timesteps share one compiled program
    return forward(params, x.astype(jnp.float32), t.astype(jnp.float32))

  return apply_fn, params


@functools.lru_cache(maxsize=8)
def _param_shapes(cfg: UNet2DConfig):
  """The Flax parameter tree's shapes for `cfg` (traced once per config, no compute)."""
  size = cfg.sample_size or (2 ** (len(cfg.block_out_channels) - 1),) * 2
  return jax.eval_shape(DiffusersUNet(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, *size, cfg.in_channels)),
                        jnp.zeros((1,)))["params"]


# --------------------------------------------------------------------------------------------- schedule
def load_schedule(path: str) -> NoiseSchedule:
  """The training `NoiseSchedule` from scheduler_config.json (in `path` or `path/scheduler/`).

  `trained_betas` if given, else `beta_schedule` linear | scaled_linear | squaredcos_cap_v2 with `beta_start`,
  `beta_end` and `num_train_timesteps`, as diffusers' DDPM/DDIM/DPM-Solver schedulers compute them;
  `rescale_betas_zero_snr` gives the zero-terminal-SNR rescaling (Lin et al. 2024).
  """
  raw = _read_json(_locate(path, "scheduler_config.json", "scheduler"))
  zero_snr = bool(raw.get("rescale_betas_zero_snr", False))
  if raw.get("trained_betas") is not None:
    return NoiseSchedule.from_betas(np.asarray(raw["trained_betas"], np.float64), zero_terminal_snr=zero_snr)
  if "beta_schedule" not in raw:
    raise CheckpointError(f"scheduler_config.json of {raw.get('_class_name', 'this scheduler')!r} has no "
                          f"beta_schedule or trained_betas: not a variance-preserving (beta) schedule")
  kind = raw["beta_schedule"]
  _refuse_unless(kind in BETA_SCHEDULES, "beta_schedule", kind, ", ".join(BETA_SCHEDULES))
  num = int(raw.get("num_train_timesteps", 1000))
  if kind == "squaredcos_cap_v2":  # diffusers' cosine: 1 - abar(t+1)/abar(t), s = 0.008, capped at 0.999
    return NoiseSchedule.cosine(num, s=0.008, max_beta=0.999, zero_terminal_snr=zero_snr)
  build = NoiseSchedule.linear if kind == "linear" else NoiseSchedule.scaled_linear
  return build(num, float(raw.get("beta_start", 1e-4)), float(raw.get("beta_end", 0.02)),
               zero_terminal_snr=zero_snr)


def load_sampler_options(path: str) -> dict:
  """The genjax sampler keyword options implied by scheduler_config.json: `prediction` ("epsilon" | "v" | "x0" from
  `prediction_type` epsilon | v_prediction | sample) and `clip_denoised` ((-r, r) when `clip_sample`, r =
  `clip_sample_range`, else None). Use as `sampler(model_fn, sched, x_T, num_steps=..., **options)`."""
  raw = _read_json(_locate(path, "scheduler_config.json", "scheduler"))
  kind = raw.get("prediction_type", "epsilon")
  _refuse_unless(kind in PREDICTION_TYPES, "prediction_type", kind, ", ".join(PREDICTION_TYPES))
  clip = None
  if raw.get("clip_sample", False):
    r = float(raw.get("clip_sample_range", 1.0))
    clip = (-r, r)
  return {"prediction": PREDICTION_TYPES[kind], "clip_denoised": clip}


# --------------------------------------------------------------------------------------------- sampling
SAMPLERS = sampler_names("diffusion")   # every diffusion sampler of genjax.samplers.registry


@dataclasses.dataclass(frozen=True)
class DiffusersPipeline:
  """A loaded diffusers DDPM directory: the U-Net (`apply_fn`, `params`, `config`), its training `schedule` and the
  sampler options its scheduler config implies (`options`: prediction, clip_denoised)."""
  apply_fn: Callable
  params: Any
  config: UNet2DConfig
  schedule: NoiseSchedule
  options: dict

  @property
  def model_fn(self) -> Callable:
    """`model_fn(x, t)` for the genjax samplers: a pytree Partial, so new params reuse compiled programs."""
    return jax.tree_util.Partial(self.apply_fn, self.params)

  def image_shape(self) -> tuple[int, int, int]:
    """(height, width, channels) of the images the U-Net was configured for (its `sample_size`)."""
    if self.config.sample_size is None:
      raise CheckpointError("config.json has no sample_size: the image size this U-Net samples is unknown")
    return (*self.config.sample_size, self.config.in_channels)


def load_pipeline(path: str) -> DiffusersPipeline:
  """`load_unet` + `load_schedule` + `load_sampler_options` on one directory (flat, or `unet/` + `scheduler/`)."""
  apply_fn, params = load_unet(path)
  return DiffusersPipeline(apply_fn, params, load_unet_config(path), load_schedule(path), load_sampler_options(path))


def sample_images(pipe: DiffusersPipeline, rng, num_samples: int, *, sampler: str = "dpm_solver",
                  num_steps: int = 20, **options) -> np.ndarray:
  """`num_samples` images in [0, 1], float32 NHWC, drawn with the genjax sampler `sampler` (one of `SAMPLERS`, the
  sampler registry's names) in `num_steps` steps from x_T ~ N(0, I) (drawn from the first half of `rng`; the sampler
  gets the second). `options` go to the sampler (e.g. eta=0.5 for ddim, spacing="trailing", order=3) and override
  the scheduler config's prediction / clip_denoised. The model's [-1, 1] range is mapped to [0, 1] as diffusers'
  DDPMPipeline does."""
  spec = sampler_spec(sampler)
  if not isinstance(num_samples, int) or num_samples < 1:
    raise UserError(f"num_samples={num_samples!r} must be a positive int")
  noise_rng, sampler_rng = jax.random.split(rng)
  x_T = jax.random.normal(noise_rng, (num_samples, *pipe.image_shape()), jnp.float32)
  x0 = spec(pipe.model_fn, pipe.schedule, x_T, num_steps=num_steps, rng=sampler_rng, **{**pipe.options, **options})
  return np.clip((np.asarray(x0, np.float32) + 1.0) / 2.0, 0.0, 1.0)


# --------------------------------------------------------------------------------------------- helpers
def _refuse_unless(ok: bool, field: str, value: Any, valid: str) -> None:
  if not ok:
    raise CheckpointError(f"unsupported diffusers option {field}={value!r}; supported: {valid}")


def _strip_res(kind: str) -> str:
  return kind[len("UNetRes"):] if isinstance(kind, str) and kind.startswith("UNetRes") else kind


def _locate(path: str, name: str, subfolder: str) -> str:
  """`path/name`, else `path/subfolder/name` (a pipeline directory), else a one-line CheckpointError."""
  if not os.path.isdir(path):
    raise CheckpointError(f"diffusers model directory {path!r} does not exist or is not a directory")
  for candidate in (os.path.join(path, name), os.path.join(path, subfolder, name)):
    if os.path.isfile(candidate):
      return candidate
  raise CheckpointError(f"no {name} in {path!r} or {os.path.join(path, subfolder)!r}: not a diffusers "
                        f"{'UNet2DModel' if subfolder == 'unet' else 'scheduler'} directory")


def _read_json(file: str) -> dict:
  try:
    with open(file) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {file}: {e}") from None


def _weights_dir(path: str) -> str:
  return os.path.dirname(_locate(path, "config.json", "unet"))


def _read_weights(folder: str) -> dict[str, np.ndarray]:
  """All tensors of the (possibly sharded) safetensors checkpoint in `folder`, as host numpy arrays."""
  single, index = os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, WEIGHTS_INDEX_NAME)
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
    files = [os.path.join(folder, s) for s in shards]
    for f in files:
      if not os.path.isfile(f):
        raise CheckpointError(f"missing shard {os.path.basename(f)} listed in {index}")
  else:
    others = [f for f in os.listdir(folder) if f.startswith("diffusion_pytorch_model")]
    raise CheckpointError(f"no {WEIGHTS_NAME} in {folder!r} (found: {others or 'nothing'}); genjax reads "
                          f"safetensors only, never pickled torch files")
  tensors = {}
  for f in files:
    with open_safetensors(f, "flax") as reader:     # its flax framework reads bfloat16 too (numpy cannot)
      for key in reader.keys():
        tensors[key] = np.asarray(jax.device_get(reader.get_tensor(key)))
  return tensors


def _flax_path(key: str) -> tuple[tuple[str, ...], str]:
  """'down_blocks.0.attentions.1.query.weight' -> (('down_blocks_0', 'attentions_1', 'to_q'), 'weight')."""
  parts: list[str] = []
  for part in key.split("."):
    if part.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{part}"
    else:
      parts.append(part)
  *modules, leaf = parts
  if len(modules) >= 2 and modules[-2].startswith("attentions_"):  # old checkpoints' attention weight names
    modules[-1] = _OLD_ATTENTION_NAMES.get(modules[-1], modules[-1])
  return tuple(modules), leaf


def _diffusers_key(flax_path: tuple[str, ...]) -> str:
  """The diffusers state-dict key of a Flax parameter path (inverse of `_flax_path`), for error messages."""
  *modules, leaf = flax_path
  names = []
  for module in modules:
    base, _, index = module.rpartition("_")
    names.append(f"{base}.{index}" if base in _LIST_MODULES and index.isdigit() else module)
  return ".".join(names + ["bias" if leaf == "bias" else "weight"])


def _convert_weights(tensors: dict[str, np.ndarray], expected) -> dict:
  """Maps diffusers state-dict tensors onto the Flax tree `expected` (shapes from `eval_shape`): conv OIHW -> HWIO,
  linear [out, in] -> [in, out], norm weight -> scale. Every expected leaf must be filled and no tensor left over."""
  want = traverse_util.flatten_dict(expected)
  out = {}
  for key, value in tensors.items():
    modules, leaf = _flax_path(key)
    if leaf == "bias":
      target, array = modules + ("bias",), value
    elif leaf == "weight" and value.ndim == 1:
      target, array = modules + ("scale",), value
    elif leaf == "weight" and value.ndim == 4 and (modules + ("kernel",)) in want and \
        len(want[modules + ("kernel",)].shape) == 2:  # a 1x1 conv stored where a linear layer is expected
      target, array = modules + ("kernel",), value[:, :, 0, 0].T
    elif leaf == "weight" and value.ndim == 4:
      target, array = modules + ("kernel",), value.transpose(2, 3, 1, 0)
    elif leaf == "weight" and value.ndim == 2:
      target, array = modules + ("kernel",), value.T
    else:
      raise CheckpointError(f"unexpected tensor {key} of shape {value.shape} in the checkpoint")
    if target not in want:
      raise CheckpointError(f"unexpected tensor {key} in the checkpoint: config.json describes no such layer")
    if tuple(array.shape) != tuple(want[target].shape):
      raise CheckpointError(f"tensor {key} has shape {value.shape}, config.json implies "
                            f"{_torch_shape(want[target].shape, target[-1])}")
    out[target] = jnp.asarray(np.asarray(array, dtype=np.float32))
  missing = [p for p in want if p not in out]
  if missing:
    raise CheckpointError(f"the checkpoint lacks {_diffusers_key(missing[0])} ({len(missing)} tensors missing) "
                          f"that config.json implies")
  return traverse_util.unflatten_dict(out)


def _torch_shape(shape: tuple, leaf: str) -> Optional[tuple]:
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)
