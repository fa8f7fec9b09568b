"""The GAN family's latents: (truncated) normal draws keyed per row, and spherical interpolation between them.

    z = sample_latents(rng, 16, latent_dim=64, truncation=0.7)     # [16, 64]; row i from fold_in(rng, i)
    path = slerp(z[0], z[1], jnp.linspace(0.0, 1.0, 8))           # [8, 64] from z[0] to z[1]

`genjax.models.gan` samples and interpolates with these; they are pure JAX (jit- and vmap-safe, `truncation`
may be traced).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from genjax.errors import UserError, show


def check_truncation(truncation) -> None:
  """Python-side check of a user's truncation (None or a float >= 0); traced values pass unchecked."""
  if truncation is None or isinstance(truncation, jax.core.Tracer):
    return
  if not float(truncation) >= 0.0:
    raise UserError(f"truncation={show(truncation)} must be None or a float >= 0")


def draw_latent(key, latent_dim: int, truncation=None):
  """One latent [latent_dim]: N(0, I), or with `truncation` t each coordinate from N(0, 1) restricted to [-t, t]
  (t = 0 gives z = 0, the mode). Smaller t trades variety for fidelity. t may be traced (no recompile per t)."""
  check_truncation(truncation)
  if truncation is None:
    return jax.random.normal(key, (latent_dim,), jnp.float32)
  t = jnp.asarray(truncation, jnp.float32)
  bound = jnp.maximum(t, 1e-6)                 # truncated_normal needs lower < upper; t = 0 is the where below
  z = jax.random.truncated_normal(key, -bound, bound, (latent_dim,), jnp.float32)
  return jnp.where(t > 0, z, jnp.zeros_like(z))


def sample_latents(rng, n: int, latent_dim: int, truncation=None):
  """[n, latent_dim] latents, row i from fold_in(rng, i): a row does not depend on how many are drawn."""
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(n, dtype=jnp.int32))
  return jax.vmap(lambda k: draw_latent(k, latent_dim, truncation))(keys)


def slerp(z0, z1, t):
  """Spherical interpolation between latents z0, z1 [..., d] at fractions t [...] (linear when nearly parallel)."""
  t = jnp.asarray(t, jnp.float32)[..., None]
  n0, n1 = jnp.linalg.norm(z0, axis=-1, keepdims=True), jnp.linalg.norm(z1, axis=-1, keepdims=True)
  cos = jnp.clip(jnp.sum(z0 * z1, -1, keepdims=True) / jnp.maximum(n0 * n1, 1e-12), -1.0, 1.0)
  omega = jnp.arccos(cos)
  so = jnp.sin(omega)
  safe = so > 1e-6
  so_safe = jnp.where(safe, so, 1.0)
  a = jnp.where(safe, jnp.sin((1.0 - t) * omega) / so_safe, 1.0 - t)
  b = jnp.where(safe, jnp.sin(t * omega) / so_safe, t)
  return a * z0 + b * z1
