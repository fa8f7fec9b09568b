"""The U-Net noise-prediction network of the diffusion family (Flax linen).

    net = UNet(ch=64, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), num_classes=10)
    variables = net.init(rng, x, t, label)              # x [B, H, W, C], t int32 [B], label int32 [B] or None
    out = net.apply(variables, x, t, label, train=True, rngs={"dropout": key})   # float32, same shape as x

The network is the DDPM design: a sinusoidal timestep embedding through a 2-layer MLP, residual blocks (GroupNorm,
swish, conv, the embedding added in between) at each resolution, self-attention at the spatial resolutions listed in
`attn_resolutions` (and always in the middle, at the lowest resolution), stride-2 convs down, nearest-neighbour
resize + conv up, and skip connections between mirrored levels. Upsampling resizes to the exact size of the skip it
meets, so odd sizes (28 -> 14 -> 7 -> 14 -> 28, 7 -> 4 -> 7) round-trip.

Class conditioning (`num_classes > 0`): an embedding of `num_classes + 1` rows is added to the timestep embedding;
row `num_classes` is the *null label* — the unconditional model used by classifier-free guidance. `label=None`
means "unconditional" (every row gets the null label). The last conv is zero-initialised (the untrained model
predicts 0). `dtype` is the compute dtype (params stay float32); the output is float32.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from genjax.errors import UserError


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal embedding of (integer or real) timesteps `t` [B] -> float32 [B, dim] (sin half, then cos half)."""
  if dim % 2:
    raise UserError(f"timestep embedding dim must be even, got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def _groups(channels: int, max_groups: int) -> int:
  """The largest group count <= max_groups that divides `channels` (GroupNorm needs an exact split)."""
  return math.gcd(channels, max_groups)


class ResBlock(nn.Module):
  """GroupNorm-swish-conv, + projected time embedding, GroupNorm-swish-dropout-conv, + (1x1-projected) skip."""
  out_ch: int
  dropout: float = 0.0
  norm_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb, train: bool):
    h = nn.GroupNorm(_groups(x.shape[-1], self.norm_groups), dtype=self.dtype)(x)
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype)(nn.swish(h))
    h = h + nn.Dense(self.out_ch, dtype=self.dtype)(nn.swish(temb))[:, None, None, :]
    h = nn.GroupNorm(_groups(self.out_ch, self.norm_groups), dtype=self.dtype)(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.swish(h))
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros)(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name="skip")(x)
    return x + h


class AttnBlock(nn.Module):
  """Pre-norm multi-head self-attention over the H*W positions, residual; gcd(channels, num_heads) heads."""
  num_heads: int = 4
  norm_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    heads = math.gcd(c, self.num_heads)
    h = nn.GroupNorm(_groups(c, self.norm_groups), dtype=self.dtype)(x).reshape(b, hgt * wid, c)
    h = nn.MultiHeadDotProductAttention(num_heads=heads, dtype=self.dtype, force_fp32_for_softmax=True,
                                        out_kernel_init=nn.initializers.zeros)(h, h)
    return x + h.reshape(b, hgt, wid, c)


class UNet(nn.Module):
  """DDPM U-Net: `(x [B,H,W,C], t int [B], label int [B] | None) -> prediction` float32 with the shape of x."""
  ch: int = 64
  ch_mult: Sequence[int] = (1, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (4,)    # spatial sizes (H) at which residual blocks get self-attention
  num_heads: int = 4
  dropout: float = 0.0
  norm_groups: int = 32
  num_classes: int = 0                      # 0 = unconditional; else labels 0..num_classes-1, null = num_classes
  out_channels: Optional[int] = None        # None = the input's channel count
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t, label=None, train: bool = False):
    if x.ndim != 4:
      raise UserError(f"UNet expects x of shape [B, H, W, C], got {x.shape}")
    batch = x.shape[0]
    if jnp.shape(t) != (batch,):
      raise UserError(f"UNet expects t of shape [{batch}] (one timestep per example), got {jnp.shape(t)}")
    temb = timestep_embedding(t, self.ch)
    temb = nn.Dense(4 * self.ch, dtype=self.dtype)(temb)
    temb = nn.Dense(4 * self.ch, dtype=self.dtype)(nn.swish(temb))
    if self.num_classes > 0:
      if label is None:
        label = jnp.full((batch,), self.num_classes, jnp.int32)
      elif jnp.shape(label) != (batch,):
        raise UserError(f"UNet expects label of shape [{batch}], got {jnp.shape(label)}")
      temb = temb + nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=self.dtype, name="class_embed")(label)
    elif label is not None:
      raise UserError("label passed to an unconditional UNet (num_classes=0)")

    res_kw = dict(dropout=self.dropout, norm_groups=self.norm_groups, dtype=self.dtype)
    attn_kw = dict(num_heads=self.num_heads, norm_groups=self.norm_groups, dtype=self.dtype)
    h = nn.Conv(self.ch, (3, 3), dtype=self.dtype)(x.astype(self.dtype))
    skips = [h]
    last = len(self.ch_mult) - 1
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = ResBlock(self.ch * mult, **res_kw)(h, temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(**attn_kw)(h)
        skips.append(h)
      if level != last:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype)(h)
        skips.append(h)

    h = ResBlock(h.shape[-1], **res_kw)(h, temb, train)
    h = AttnBlock(**attn_kw)(h)
    h = ResBlock(h.shape[-1], **res_kw)(h, temb, train)

    for level in reversed(range(len(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = ResBlock(self.ch * self.ch_mult[level], **res_kw)(h, temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(**attn_kw)(h)
      if level != 0:
        target = skips[-1].shape
        h = jax.image.resize(h, (batch, target[1], target[2], h.shape[-1]), "nearest")
        h = nn.Conv(h.shape[-1], (3, 3), dtype=self.dtype)(h)
    assert not skips

    h = nn.swish(nn.GroupNorm(_groups(h.shape[-1], self.norm_groups), dtype=self.dtype)(h))
    out_ch = self.out_channels or x.shape[-1]
    h = nn.Conv(out_ch, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros)(h)
    return h.astype(jnp.float32)
