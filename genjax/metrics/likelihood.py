"""Likelihood-based metrics: bits/dim from an ELBO, importance-weighted NLL, perplexity and bits per byte.

    nll = importance_weighted_nll(log_w)        # log_w [..., K] = log p(x, z_k) - log q(z_k | x), z_k ~ q(z | x)
    bpd = bits_per_dim(-elbo, num_dims=64)      # nats per example -> bits per dimension
    ppl = perplexity(mean_token_nll)            # nats per token -> exp(nll)
    bpb = bits_per_byte(mean_token_nll)         # byte-level LM: nats per byte -> bits per byte
    h = unigram_entropy_bits(corpus_bytes)      # the baseline a byte LM should beat
    hx = unigram_cross_entropy_bits(train_bytes, test_bytes)   # ... and its held-out version

The array functions are jax.numpy (usable inside a jitted `evaluate`), accept numpy too, and work elementwise
over leading batch axes. All inputs and outputs are in nats unless the name says bits.

Importance weighting (Burda et al., 2016): with K samples from the encoder, log (1/K) sum_k w_k is a lower bound
on log p(x) whose expectation rises with K toward log p(x); K = 1 is the ELBO. So the importance-weighted NLL is
<= the negative ELBO in expectation and tightens (decreases) as K grows.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from genjax.errors import UserError

LN2 = math.log(2.0)


@functools.partial(jax.jit, static_argnames="axis")
def importance_weighted_nll(log_weights, axis: int = -1):
  """-log (1/K) sum_k exp(log_weights_k) over `axis` (the K importance samples); other axes are kept."""
  lw = jnp.asarray(log_weights)
  if lw.ndim == 0:
    raise UserError("log_weights must have an axis of K importance samples, got a scalar")
  k = lw.shape[axis]
  if k < 1:
    raise UserError(f"log_weights has no importance samples along axis {axis}: shape {lw.shape}")
  return math.log(k) - logsumexp(lw, axis=axis)


@functools.partial(jax.jit, static_argnames="axis")
def negative_elbo(log_weights, axis: int = -1):
  """Monte-Carlo negative ELBO: -mean_k log_weights_k over `axis` (the K = 1 bound averaged over samples)."""
  lw = jnp.asarray(log_weights)
  if lw.ndim == 0:
    raise UserError("log_weights must have an axis of samples, got a scalar")
  return -jnp.mean(lw, axis=axis)


def bits_per_dim(nll_nats, num_dims: int, bin_width: Optional[float] = None):
  """Negative log-likelihood (or negative ELBO) per example in nats -> bits per data dimension.

  `bin_width`: when `nll_nats` is a continuous density over data scaled to a grid with this spacing (1/255 for
  8-bit images scaled to [0, 1], 1/16 for `digits`), pass it to turn the density into a probability of the grid
  cell (adds -num_dims * log(bin_width) nats), which is how image bits/dim are conventionally reported. Leave it
  None for a discrete likelihood (Bernoulli, categorical), which already is a probability.
  """
  if int(num_dims) < 1:
    raise UserError(f"num_dims must be a positive number of data dimensions, got {num_dims}")
  nll = jnp.asarray(nll_nats)
  if bin_width is not None:
    if not 0 < bin_width <= 1:
      raise UserError(f"bin_width must be in (0, 1], got {bin_width}")
    nll = nll - num_dims * math.log(bin_width)
  return nll / (num_dims * LN2)


def perplexity(nll_nats_per_token):
  """exp(mean negative log-likelihood per token in nats)."""
  return jnp.exp(jnp.asarray(nll_nats_per_token))


def bits_per_byte(nll_nats_per_token, bytes_per_token: float = 1.0):
  """Nats per token -> bits per byte of text (bytes_per_token = 1 for a byte-level LM)."""
  if bytes_per_token <= 0:
    raise UserError(f"bytes_per_token must be positive, got {bytes_per_token}")
  return jnp.asarray(nll_nats_per_token) / (LN2 * bytes_per_token)


def _byte_array(data, name: str) -> np.ndarray:
  if isinstance(data, str):
    data = data.encode("utf-8")
  if isinstance(data, (bytes, bytearray)):
    arr = np.frombuffer(bytes(data), dtype=np.uint8)
  else:
    arr = np.asarray(data).reshape(-1)
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 255):
      raise UserError(f"{name} must hold byte ids 0..255, got dtype {arr.dtype} in [{arr.min()}, {arr.max()}]")
  if arr.size == 0:
    raise UserError(f"{name} needs at least one byte")
  return arr.astype(np.int64)


def unigram_entropy_bits(data) -> float:
  """Entropy in bits per byte of the byte frequencies of `data` (bytes, str (UTF-8) or an int array 0..255)."""
  arr = _byte_array(data, "data")
  counts = np.bincount(arr, minlength=256).astype(np.float64)
  p = counts[counts > 0] / arr.size
  return float(-(p * np.log2(p)).sum())


def unigram_cross_entropy_bits(train, test, smoothing: float = 1.0) -> float:
  """Bits per byte of `test` under the byte unigram of `train` with add-`smoothing` counts over all 256 bytes."""
  if smoothing <= 0:
    raise UserError(f"smoothing must be > 0 (a byte unseen in train would have probability 0), got {smoothing}")
  counts = np.bincount(_byte_array(train, "train"), minlength=256).astype(np.float64) + smoothing
  log2p = np.log2(counts / counts.sum())
  return float(-log2p[_byte_array(test, "test")].mean())
