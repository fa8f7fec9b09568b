"""The diffusers `UNet2DModel` network in Flax linen (NHWC), for checkpoints loaded by `genjax.interop.diffusers`.

Same computation as diffusers' PyTorch `UNet2DModel` built from DownBlock2D / AttnDownBlock2D / UpBlock2D /
AttnUpBlock2D and UNetMidBlock2D: a sinusoidal timestep embedding (`flip_sin_to_cos`, `freq_shift`) through a
two-layer MLP; pre-norm ResNet blocks (group norm, `default` additive or `scale_shift` time conditioning, 1x1
shortcut when the width changes, `output_scale_factor`); single- or multi-head self-attention with group norm and
a residual; stride-2 conv downsampling (with diffusers' asymmetric (0, 1) padding when `downsample_padding=0`) and
nearest-neighbour 2x upsampling + conv; skip connections popped in reverse order. Module and parameter names mirror
diffusers' state-dict keys (`down_blocks.0.resnets.1.conv1.weight` -> `down_blocks_0/resnets_1/conv1/kernel`), which
is what lets the loader map a checkpoint by name. Use it through the loader:

    from genjax.interop.diffusers import load_unet
    apply_fn, params = load_unet("ddpm-cifar10-32")
    eps = apply_fn(params, x, t)          # x float [B, H, W, C] NHWC, t int or float [B] -> [B, H, W, C_out]

or directly, e.g. with random weights of the same architecture:

    net = DiffusersUNet(load_unet_config("ddpm-cifar10-32"))
    params = net.init(rng, x, t)["params"]
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch.nn.GELU() is the exact erf form
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class UNet2DConfig:
  """The `UNet2DModel` options that shape the computation (names as in diffusers' config.json).

  `attention_head_dim=None` means one head per attention layer; `attn_norm_num_groups=None` means diffusers'
  default (the mid block's attention has a group norm with `norm_num_groups` groups under `default` time
  conditioning and none under `scale_shift`).
  """
  sample_size: tuple[int, int]
  in_channels: int
  out_channels: int
  down_block_types: tuple[str, ...]
  up_block_types: tuple[str, ...]
  block_out_channels: tuple[int, ...]
  layers_per_block: int = 2
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  time_embedding_dim: Optional[int] = None
  mid_block: bool = True
  add_attention: bool = True
  mid_block_scale_factor: float = 1.0
  downsample_padding: int = 1
  act_fn: str = "silu"
  attention_head_dim: Optional[int] = 8
  norm_num_groups: int = 32
  attn_norm_num_groups: Optional[int] = None
  norm_eps: float = 1e-5
  resnet_time_scale_shift: str = "default"


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps t [B], as diffusers' `get_timestep_embedding`:
  frequencies exp(-log(max_period) i / (dim/2 - freq_shift)), [sin, cos] (or [cos, sin] when flipped), zero-padded
  to an odd `dim`. Computed in float32."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _group_norm(groups: int, eps: float, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, name=name)


def _conv3x3(features: int, name: str, stride: int = 1, padding=((1, 1), (1, 1))) -> nn.Conv:
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=padding, name=name)


class ResnetBlock(nn.Module):
  """diffusers `ResnetBlock2D` (pre-norm, time-conditioned; `up`/`down` variants are not used by these blocks)."""
  out_channels: int
  cfg: UNet2DConfig
  output_scale_factor: float = 1.0

  @nn.compact
  def __call__(self, x, temb):
    cfg, act = self.cfg, ACTIVATIONS[self.cfg.act_fn]
    scale_shift = cfg.resnet_time_scale_shift == "scale_shift"
    h = act(_group_norm(cfg.norm_num_groups, cfg.norm_eps, "norm1")(x))
    h = _conv3x3(self.out_channels, "conv1")(h)
    temb = nn.Dense(self.out_channels * (2 if scale_shift else 1), name="time_emb_proj")(act(temb))
    temb = temb[:, None, None, :]
    norm2 = _group_norm(cfg.norm_num_groups, cfg.norm_eps, "norm2")
    if scale_shift:
      scale, shift = jnp.split(temb, 2, axis=-1)
      h = norm2(h) * (1.0 + scale) + shift
    else:
      h = norm2(h + temb)
    h = _conv3x3(self.out_channels, "conv2")(act(h))
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), name="conv_shortcut")(x)
    return (x + h) / self.output_scale_factor


class SelfAttention(nn.Module):
  """diffusers `Attention` as used by the attention blocks: optional group norm, multi-head softmax attention
  over the H*W positions (scale 1/sqrt(head_dim)), output projection, residual, divide by `rescale`."""
  heads: int
  head_dim: int
  norm_groups: Optional[int]
  eps: float
  rescale: float = 1.0

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = x if self.norm_groups is None else _group_norm(self.norm_groups, self.eps, "group_norm")(x)
    h = h.reshape(b, hgt * wid, c)
    inner = self.heads * self.head_dim
    split = lambda y: y.reshape(b, hgt * wid, self.heads, self.head_dim)
    q = split(nn.Dense(inner, name="to_q")(h))
    k = split(nn.Dense(inner, name="to_k")(h))
    v = split(nn.Dense(inner, name="to_v")(h))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, hgt * wid, inner)
    out = nn.Dense(c, name="to_out_0")(out).reshape(b, hgt, wid, c)
    return (out + x) / self.rescale


def _attention(cfg: UNet2DConfig, channels: int, name: str, norm_groups: Optional[int],
               rescale: float = 1.0) -> SelfAttention:
  head_dim = channels if cfg.attention_head_dim is None else cfg.attention_head_dim
  return SelfAttention(heads=channels // head_dim, head_dim=head_dim, norm_groups=norm_groups, eps=cfg.norm_eps,
                       rescale=rescale, name=name)


class DownBlock(nn.Module):
  """DownBlock2D / AttnDownBlock2D: `layers_per_block` ResNets (each followed by attention in the Attn variant),
  then a stride-2 conv unless it is the last block. Returns (h, skips)."""
  out_channels: int
  attention: bool
  add_downsample: bool
  cfg: UNet2DConfig

  @nn.compact
  def __call__(self, h, temb):
    skips = []
    for i in range(self.cfg.layers_per_block):
      h = ResnetBlock(self.out_channels, self.cfg, name=f"resnets_{i}")(h, temb)
      if self.attention:
        h = _attention(self.cfg, self.out_channels, f"attentions_{i}", self.cfg.norm_num_groups)(h)
      skips.append(h)
    if self.add_downsample:
      p = self.cfg.downsample_padding
      pad = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
      h = DownsampleConv(self.out_channels, pad, name="downsamplers_0")(h)
      skips.append(h)
    return h, skips


class DownsampleConv(nn.Module):
  """diffusers `Downsample2D(use_conv=True)`: a 3x3 stride-2 conv (its parameters live under `conv`)."""
  features: int
  padding: tuple

  @nn.compact
  def __call__(self, h):
    return _conv3x3(self.features, "conv", stride=2, padding=self.padding)(h)


class UpsampleConv(nn.Module):
  """diffusers `Upsample2D(use_conv=True)`: nearest-neighbour 2x, then a 3x3 conv (parameters under `conv`)."""
  features: int

  @nn.compact
  def __call__(self, h):
    h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
    return _conv3x3(self.features, "conv")(h)


class UpBlock(nn.Module):
  """UpBlock2D / AttnUpBlock2D: `layers_per_block + 1` ResNets on [h, popped skip] (each followed by attention in
  the Attn variant), then 2x upsampling unless it is the last block."""
  out_channels: int
  attention: bool
  add_upsample: bool
  cfg: UNet2DConfig

  @nn.compact
  def __call__(self, h, skips, temb):
    for i, skip in enumerate(reversed(skips)):
      h = jnp.concatenate([h, skip], axis=-1)
      h = ResnetBlock(self.out_channels, self.cfg, name=f"resnets_{i}")(h, temb)
      if self.attention:
        h = _attention(self.cfg, self.out_channels, f"attentions_{i}", self.cfg.norm_num_groups)(h)
    if self.add_upsample:
      h = UpsampleConv(self.out_channels, name="upsamplers_0")(h)
    return h


class MidBlock(nn.Module):
  """UNetMidBlock2D: ResNet, optional attention, ResNet, all scaled by `mid_block_scale_factor`."""
  cfg: UNet2DConfig

  @nn.compact
  def __call__(self, h, temb):
    cfg, channels = self.cfg, self.cfg.block_out_channels[-1]
    h = ResnetBlock(channels, cfg, cfg.mid_block_scale_factor, name="resnets_0")(h, temb)
    if cfg.add_attention:
      groups = cfg.attn_norm_num_groups
      if groups is None and cfg.resnet_time_scale_shift == "default":
        groups = cfg.norm_num_groups
      h = _attention(cfg, channels, "attentions_0", groups, cfg.mid_block_scale_factor)(h)
    return ResnetBlock(channels, cfg, cfg.mid_block_scale_factor, name="resnets_1")(h, temb)


class TimestepMLP(nn.Module):
  """diffusers `TimestepEmbedding`: Dense -> SiLU -> Dense."""
  features: int

  @nn.compact
  def __call__(self, emb):
    return nn.Dense(self.features, name="linear_2")(jax.nn.silu(nn.Dense(self.features, name="linear_1")(emb)))


class DiffusersUNet(nn.Module):
  """diffusers `UNet2DModel` (see module docstring). `__call__(x [B, H, W, C], t [B]) -> [B, H, W, out_channels]`;
  t may be int or float (fractional timesteps go straight into the sinusoidal embedding, as in diffusers)."""
  cfg: UNet2DConfig

  @nn.compact
  def __call__(self, x, t):
    cfg = self.cfg
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    if cfg.center_input_sample:
      x = 2.0 * x - 1.0
    temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).astype(x.dtype)
    temb = TimestepMLP(cfg.time_embedding_dim or 4 * cfg.block_out_channels[0], name="time_embedding")(temb)
    h = _conv3x3(cfg.block_out_channels[0], "conv_in")(x)
    skips = [h]
    last = len(cfg.block_out_channels) - 1
    for i, (kind, width) in enumerate(zip(cfg.down_block_types, cfg.block_out_channels)):
      h, block_skips = DownBlock(width, kind == "AttnDownBlock2D", i != last, cfg, name=f"down_blocks_{i}")(h, temb)
      skips += block_skips
    if cfg.mid_block:
      h = MidBlock(cfg, name="mid_block")(h, temb)
    n = cfg.layers_per_block + 1
    for i, (kind, width) in enumerate(zip(cfg.up_block_types, reversed(cfg.block_out_channels))):
      block_skips, skips = skips[-n:], skips[:-n]
      h = UpBlock(width, kind == "AttnUpBlock2D", i != last, cfg, name=f"up_blocks_{i}")(h, block_skips, temb)
    h = jax.nn.silu(_group_norm(cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out")(h))
    return _conv3x3(cfg.out_channels, "conv_out")(h)
