"""Diffusion noise schedules and the prediction-parameterisation algebra shared by training and sampling.

A `NoiseSchedule` is a small frozen pytree of float32 arrays describing the forward process
q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) on the discrete training timesteps t = 0 .. T-1:

    import jax, jax.numpy as jnp
    from genjax.samplers import NoiseSchedule
    schedule = NoiseSchedule.linear(num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    schedule = NoiseSchedule.cosine(num_timesteps=1000, s=0.008)
    schedule = NoiseSchedule.scaled_linear(zero_terminal_snr=True)   # Stable Diffusion's, rescaled (Lin et al. 2024)
    schedule.alphas_cumprod                                   # float32 [T]
    sigma = schedule.t_to_sigma(jnp.asarray([500.0, 500.5]))  # sqrt((1 - abar) / abar); float t: log-sigma interpolated
    t = schedule.sigma_to_t(sigma)                            # float32 [500.0, 500.5], the inverse
    x0, noise = jnp.ones((2, 3)), jax.random.normal(jax.random.key(0), (2, 3))
    x_t = schedule.add_noise(x0, noise, jnp.asarray([10, 900]))
    v = schedule.training_target(x0, noise, jnp.asarray([10, 900]), "v_prediction")   # diffusers' name for "v"

Training side (what a model family needs for its loss; `t` is int32 [batch] in [0, T)):

    x_t = schedule.add_noise(x0, noise, t)                    # a sample of q(x_t | x_0)
    y = schedule.training_target(x0, noise, t, "v")           # regression target for "epsilon" | "v" | "x0"
                                                           # (diffusers' "v_prediction" / "sample" accepted)

Sampling side (used by `genjax.samplers.diffusion`, public for users writing their own samplers):

    x0_hat, eps_hat = schedule.split_prediction(pred, x_t, t, "v")
    v_hat = schedule.convert_prediction(pred, x_t, t, source="epsilon", dest="v")

With alpha = sqrt(abar_t) and sigma = sqrt(1 - abar_t): x_t = alpha x0 + sigma eps and v = alpha eps - sigma x0, so
x0 = alpha x_t - sigma v and eps = sigma x_t + alpha v. All schedule arithmetic is float32 whatever the model's dtype
(bfloat16 alpha-bars round 1 - abar to 0 near t = 0 and give NaN); the tables are built in float64 on the host and
`log_alphas_cumprod` keeps 1 - abar and ratios of alpha-bars accurate in float32. Every method taking `t` accepts
int timesteps (table lookup) and float ones (log-sigma interpolation between neighbours; float t = k equals int
k). The schedule is a pytree, so it can be passed to (and traced by) `jax.jit`: a schedule with different values
but the same T compiles nothing new. Build schedules with the constructors (`linear`, `cosine`, `scaled_linear`,
`from_betas`), which fill every field consistently.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import UserError, show

PREDICTIONS = ("epsilon", "v", "x0")
# diffusers' names for the same parameterisations, accepted wherever `prediction=` is.
PREDICTION_ALIASES = {"v_prediction": "v", "sample": "x0"}


def check_prediction(prediction: str) -> str:
  """The canonical name ("epsilon" | "v" | "x0") of `prediction`, which may also be one of diffusers' names
  ("v_prediction", "sample"); raises a UserError naming the valid choices otherwise."""
  canonical = PREDICTION_ALIASES.get(prediction, prediction) if isinstance(prediction, str) else prediction
  if canonical not in PREDICTIONS:
    raise UserError(f"prediction={prediction!r} is not one of: "
                    f"{', '.join(PREDICTIONS + tuple(PREDICTION_ALIASES))}")
  return canonical


def _bcast(coef: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes per-example coefficients [batch] (or a scalar) so they broadcast against `like` [batch, ...]."""
  return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """Discrete-time variance-preserving noise schedule (a pytree of float32 [T] arrays; see module docstring).

  Attributes:
    betas: beta_t, the per-step noise variances.
    alphas_cumprod: abar_t = prod_{s <= t} (1 - beta_s).
    log_alphas_cumprod: log(abar_t), computed in float64; used for accurate 1 - abar and alpha-bar ratios.
  """
  betas: jax.Array
  alphas_cumprod: jax.Array
  log_alphas_cumprod: jax.Array

  # ----------------------------------------------------------------------------------------------- constructors
  @classmethod
  def from_betas(cls, betas, *, zero_terminal_snr: bool = False) -> "NoiseSchedule":
    """A schedule from concrete per-step variances `betas` [T], each in (0, 1).

    zero_terminal_snr: rescale so that abar_{T-1} = 0 exactly (pure noise at the last step, Lin et al. 2024,
      Algorithm 1): sqrt(abar) is shifted to end at 0 and scaled to keep sqrt(abar_0), so beta_{T-1} becomes 1.
      The model must then predict "v" or "x0" (epsilon carries no information about x0 at abar = 0), and
      sigma = sqrt((1 - abar) / abar) is infinite at t = T-1.
    """
    b = np.asarray(betas, dtype=np.float64)
    if b.ndim != 1 or b.shape[0] < 1:
      raise UserError(f"betas must be a non-empty 1-D array, got shape {b.shape}")
    if not (np.all(b > 0) and np.all(b < 1)):
      raise UserError(f"betas must lie in (0, 1), got min {b.min()} and max {b.max()}")
    log_abar = np.cumsum(np.log1p(-b))
    if zero_terminal_snr:
      if b.shape[0] < 2:
        raise UserError("zero_terminal_snr needs at least 2 timesteps")
      sqrt_abar = np.exp(0.5 * log_abar)
      sqrt_abar = (sqrt_abar - sqrt_abar[-1]) * (sqrt_abar[0] / (sqrt_abar[0] - sqrt_abar[-1]))
      with np.errstate(divide="ignore"):
        log_abar = 2.0 * np.log(sqrt_abar)  # -inf at T-1
      b = -np.expm1(np.diff(log_abar, prepend=0.0))  # 1 - abar_t / abar_{t-1}; exactly 1 at T-1
    return cls(betas=jnp.asarray(b, jnp.float32), alphas_cumprod=jnp.asarray(np.exp(log_abar), jnp.float32),
               log_alphas_cumprod=jnp.asarray(log_abar, jnp.float32))

  @classmethod
  def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, *,
             zero_terminal_snr: bool = False) -> "NoiseSchedule":
    """Betas linear from `beta_start` to `beta_end` over `num_timesteps` steps (Ho et al. 2020)."""
    _check_num_timesteps(num_timesteps)
    _check_beta_range(beta_start, beta_end)
    return cls.from_betas(np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64),
                          zero_terminal_snr=zero_terminal_snr)

  @classmethod
  def scaled_linear(cls, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, *,
                    zero_terminal_snr: bool = False) -> "NoiseSchedule":
    """Stable Diffusion's schedule: sqrt(beta) linear from sqrt(beta_start) to sqrt(beta_end) (diffusers'
    "scaled_linear"; the defaults are Stable Diffusion's)."""
    _check_num_timesteps(num_timesteps)
    _check_beta_range(beta_start, beta_end)
    root = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=np.float64)
    return cls.from_betas(root ** 2, zero_terminal_snr=zero_terminal_snr)

  @classmethod
  def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999, *,
             zero_terminal_snr: bool = False) -> "NoiseSchedule":
    """abar(t) proportional to cos^2(((t / T) + s) / (1 + s) * pi / 2) (Nichol & Dhariwal 2021).

    Betas are 1 - abar(t + 1) / abar(t), capped at `max_beta` so that the last step stays finite.
    """
    _check_num_timesteps(num_timesteps)
    if not s > 0.0:
      raise UserError(f"cosine schedule offset s must be > 0, got {s}")
    if not 0.0 < max_beta < 1.0:
      raise UserError(f"max_beta must lie in (0, 1), got {max_beta}")
    f = lambda u: math.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2
    grid = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    abar = np.array([f(u) for u in grid]) / f(0.0)
    betas = np.clip(1.0 - abar[1:] / abar[:-1], 1e-12, max_beta)
    return cls.from_betas(betas, zero_terminal_snr=zero_terminal_snr)

  # ----------------------------------------------------------------------------------------------- properties
  @property
  def num_timesteps(self) -> int:
    """T, the number of training timesteps (static: the arrays' length)."""
    return self.betas.shape[0]

  @property
  def log_snr(self) -> jax.Array:
    """lambda_t = log(abar_t / (1 - abar_t)), float32 [T], decreasing in t."""
    return self.log_alphas_cumprod - jnp.log(-jnp.expm1(self.log_alphas_cumprod))

  @property
  def log_sigmas(self) -> jax.Array:
    """log sigma_t, sigma_t = sqrt((1 - abar_t) / abar_t) (the VE / EDM noise level), float32 [T], increasing."""
    return 0.5 * (jnp.log(-jnp.expm1(self.log_alphas_cumprod)) - self.log_alphas_cumprod)

  def t_to_sigma(self, t) -> jax.Array:
    """sigma = sqrt((1 - abar_t) / abar_t) at timesteps `t` (int, or float in [0, T-1]), float32 shaped like t.

    A float t between two training timesteps gets the sigma whose log is the linear interpolation of their
    log-sigmas (k-diffusion's convention); t is clamped to [0, T-1].
    """
    return jnp.exp(self._log_sigma_at(jnp.asarray(t)))

  def sigma_to_t(self, sigma) -> jax.Array:
    """The float32 timestep t whose `t_to_sigma(t)` is `sigma` (the inverse of `t_to_sigma`); sigmas outside the
    schedule's range clamp to t = 0 or T-1 (with zero terminal SNR, finite sigmas above sigma_{T-2} map to T-2)."""
    log_sigma = jnp.log(jnp.asarray(sigma, jnp.float32))
    ls, last = self.log_sigmas, float(self.num_timesteps - 1)
    t = jnp.interp(log_sigma, ls, jnp.arange(self.num_timesteps, dtype=jnp.float32))
    return jnp.where(log_sigma >= ls[-1], last, t)  # sigma = inf at a zero-terminal-SNR end is t = T-1

  def _log_sigma_at(self, t) -> jax.Array:
    ls = self.log_sigmas
    if jnp.issubdtype(t.dtype, jnp.integer):
      return ls[jnp.clip(t, 0, self.num_timesteps - 1)]
    t = jnp.clip(t.astype(jnp.float32), 0.0, self.num_timesteps - 1)
    lo = jnp.floor(t).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, self.num_timesteps - 1)
    w = t - lo
    return jnp.where(w > 0, (1.0 - w) * ls[lo] + w * ls[hi], ls[lo])  # no 0 * inf at a zero-SNR end

  def log_alpha_bar(self, t) -> jax.Array:
    """log(abar_t), float32 shaped like `t`: int t from the table, float t by log-sigma interpolation
    (`t_to_sigma`); t < 0 (int -1 or any negative float) is the clean data, log 1 = 0."""
    t = jnp.asarray(t)
    if jnp.issubdtype(t.dtype, jnp.integer):
      la = self.log_alphas_cumprod[jnp.clip(t, 0, self.num_timesteps - 1)]
    elif jnp.issubdtype(t.dtype, jnp.floating):
      la = -jax.nn.softplus(2.0 * self._log_sigma_at(t))  # abar = 1 / (1 + sigma^2)
    else:
      raise UserError(f"timesteps t must be integers in [0, {self.num_timesteps}) or floats, got dtype {t.dtype}")
    return jnp.where(t >= 0, la, 0.0)

  def alpha_sigma(self, t) -> tuple[jax.Array, jax.Array]:
    """(sqrt(abar_t), sqrt(1 - abar_t)) as float32 arrays shaped like `t` (see `log_alpha_bar` for int / float
    t); t = -1 means the clean data (alpha 1, sigma 0), which is where every sampler's last step lands."""
    log_abar = self.log_alpha_bar(t)
    return jnp.exp(0.5 * log_abar), jnp.sqrt(-jnp.expm1(log_abar))

  # ----------------------------------------------------------------------------------------------- training side
  def add_noise(self, x0, noise, t) -> jax.Array:
    """A sample of q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, in float32.

    Args:
      x0: clean data [batch, ...]. noise: standard normal, same shape. t: int [batch] (or scalar) in [0, T).
    """
    x0, noise = _as_f32(x0), _as_f32(noise)
    _check_same_shape(x0, noise, "noise")
    alpha, sigma = self.alpha_sigma(t)
    return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise

  def training_target(self, x0, noise, t, prediction: str = "epsilon") -> jax.Array:
    """The regression target of a model predicting `prediction` for x_t = add_noise(x0, noise, t), in float32.

    "epsilon" -> noise; "x0" -> x0; "v" -> sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (Salimans & Ho 2022).
    """
    prediction = check_prediction(prediction)
    x0, noise = _as_f32(x0), _as_f32(noise)
    _check_same_shape(x0, noise, "noise")
    if prediction == "epsilon":
      return noise
    if prediction == "x0":
      return x0
    alpha, sigma = self.alpha_sigma(t)
    return _bcast(alpha, x0) * noise - _bcast(sigma, x0) * x0

  # ----------------------------------------------------------------------------------------------- sampling side
  def split_prediction(self, pred, x_t, t, prediction: str = "epsilon") -> tuple[jax.Array, jax.Array]:
    """(x0_hat, eps_hat) implied by a model output `pred` of kind `prediction` at (x_t, t), both float32.

    t: int [batch] or a scalar, in [0, T). Dividing by sqrt(abar_t) (epsilon) or sqrt(1 - abar_t) (x0) is exact
    arithmetic here; how well-conditioned it is depends on t (large t for epsilon, small t for x0).
    """
    prediction = check_prediction(prediction)
    pred, x_t = _as_f32(pred), _as_f32(x_t)
    _check_same_shape(x_t, pred, "model prediction")
    alpha, sigma = self.alpha_sigma(t)
    alpha, sigma = _bcast(alpha, x_t), _bcast(sigma, x_t)
    if prediction == "epsilon":
      return (x_t - sigma * pred) / alpha, pred
    if prediction == "x0":
      return pred, (x_t - alpha * pred) / sigma
    return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred

  def eps_from_x0(self, x0, x_t, t) -> jax.Array:
    """The noise consistent with (x_t, x0) at t: (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), float32."""
    x0, x_t = _as_f32(x0), _as_f32(x_t)
    alpha, sigma = self.alpha_sigma(t)
    return (x_t - _bcast(alpha, x_t) * x0) / _bcast(sigma, x_t)

  def convert_prediction(self, pred, x_t, t, source: str, dest: str) -> jax.Array:
    """Re-expresses a model output of kind `source` as kind `dest` ("epsilon" | "v" | "x0") at (x_t, t)."""
    dest = check_prediction(dest)
    x0, eps = self.split_prediction(pred, x_t, t, source)
    if dest == "epsilon":
      return eps
    if dest == "x0":
      return x0
    alpha, sigma = self.alpha_sigma(t)
    return _bcast(alpha, x_t) * eps - _bcast(sigma, x_t) * x0


jax.tree_util.register_dataclass(NoiseSchedule, data_fields=["betas", "alphas_cumprod", "log_alphas_cumprod"],
                                 meta_fields=[])


def _check_beta_range(beta_start, beta_end) -> None:
  if not 0.0 < beta_start <= beta_end < 1.0:
    raise UserError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")


def _check_num_timesteps(num_timesteps) -> None:
  if not isinstance(num_timesteps, (int, np.integer)) or isinstance(num_timesteps, bool) or num_timesteps < 1:
    raise UserError(f"num_timesteps must be a positive int, got {show(num_timesteps)}")


def _as_f32(x) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise UserError(f"expected a floating-point array, got dtype {x.dtype}")
  return x.astype(jnp.float32)


def _check_same_shape(ref: jax.Array, other: jax.Array, name: str) -> None:
  if ref.shape != other.shape:
    raise UserError(f"{name} has shape {other.shape}, expected the data's shape {ref.shape}")
