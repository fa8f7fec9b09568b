"""Closed-form Gaussian-mixture diffusion models and their exact probability-flow ODE, for sampler accuracy.

Data x0 ~ sum_k pi_k N(mu_k, s_k^2 I). Under the variance-preserving forward process x_t = alpha x0 + sigma eps
(alpha^2 = abar_t, sigma^2 = 1 - abar_t) the marginal at every t is again a mixture, component k being
N(alpha mu_k, (abar s_k^2 + 1 - abar) I); so the optimal noise prediction is exact, a softmax-weighted
(logsumexp) sum of per-component Gaussian predictions:

    mix = MIXTURES["ring"]        # or "wide_1d", "narrow_1d", "offset_1d"
    model_fn = mixture_model_fn(mix, schedule)          # (x [B, D] float32, t [B] int or float) -> eps, jax
    x0 = exact_flow(mix, sigma_max, x_T)             # float64 numpy: the probability-flow ODE solved to convergence

The probability-flow ODE does not depend on the schedule once written in EDM variables (sigma^2 = (1 - abar) / abar,
x_sigma = x_t / alpha): dx_sigma / d log(sigma) = x_sigma - D(x_sigma; sigma), D the exact posterior mean. A
schedule only fixes where it starts (sigma_max = sigma(T - 1), where every genjax sampler's first model call is)
and the scaling of x_T. `exact_flow` integrates it with classical RK4 in u = log(sigma) from sigma_max down to
`SIGMA_MIN`, in float64, and returns D there (O(SIGMA_MIN^2) from the sigma = 0 limit); `exact_flow_checked` runs
it with n and 2n steps and reports the difference, the convergence check.

A float timestep t (the EDM samplers' convention) means the noise level whose log-sigma is the linear
interpolation of the neighbouring integer timesteps' log-sigma (k-diffusion's `sigma_to_t`); integer t reads the
schedule's table. Both are implemented here independently of the library under test.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

SIGMA_MIN = 1e-6        # the ODE is integrated down to here; D(x; SIGMA_MIN) is then the clean sample
MAX_COMPONENTS = 8      # mixtures are padded to this many components (zero weight) so they share programs


@dataclasses.dataclass(frozen=True)
class Mixture:
  """pi_k N(mu_k, s_k^2 I) in D dimensions: weights [K], means [K, D], stds [K] (numpy, float64)."""
  name: str
  weights: np.ndarray
  means: np.ndarray
  stds: np.ndarray
  description: str = ""

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  def padded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log weights, means, stds) padded to MAX_COMPONENTS; padding has log weight -1e30 (never chosen)."""
    k = len(self.weights)
    pad = MAX_COMPONENTS - k
    logw = np.concatenate([np.log(self.weights / self.weights.sum()), np.full(pad, -1e30)])
    means = np.concatenate([self.means, np.zeros((pad, self.dim))])
    stds = np.concatenate([self.stds, np.ones(pad)])
    return logw, means, stds


def _ring(n: int = 8, radius: float = 1.0, std: float = 0.1) -> Mixture:
  angles = 2 * np.pi * np.arange(n) / n
  return Mixture("ring", np.full(n, 1.0 / n), radius * np.stack([np.cos(angles), np.sin(angles)], 1),
                 np.full(n, std), f"2-D ring: {n} components on a circle of radius {radius}, std {std}")


MIXTURES = {
    "ring": _ring(),
    "wide_1d": Mixture("wide_1d", np.array([0.4, 0.6]), np.array([[-0.6], [0.5]]), np.array([0.35, 0.25]),
                       "1-D, two wide overlapping components: 0.4 N(-0.6, 0.35^2) + 0.6 N(0.5, 0.25^2)"),
    "narrow_1d": Mixture("narrow_1d", np.array([0.2, 0.5, 0.3]), np.array([[-0.8], [-0.1], [0.7]]),
                         np.full(3, 0.03), "1-D, three narrow components (std 0.03) at -0.8, -0.1, 0.7, "
                         "weights 0.2 / 0.5 / 0.3"),
    # Image-like: most mass on a narrow "background" far from 0 (digits in [-1, 1] average about -0.7). A grid
    # that starts below T - 1 treats x_T as noisier data than it is; a zero-mean mixture hides that bias.
    "offset_1d": Mixture("offset_1d", np.array([0.7, 0.3]), np.array([[-0.8], [0.5]]), np.array([0.05, 0.3]),
                         "1-D, image-like, mean -0.41: 0.7 N(-0.8, 0.05^2) + 0.3 N(0.5, 0.3^2)"),
}


# --------------------------------------------------------------------------------------------- the jax model
def log_sigma_table(schedule) -> np.ndarray:
  """log(sigma_t) = 0.5 log((1 - abar_t) / abar_t) for t = 0..T-1 (float64, from the schedule's float32 table)."""
  log_abar = np.asarray(schedule.log_alphas_cumprod, np.float64)
  return 0.5 * (np.log(-np.expm1(log_abar)) - log_abar)


def sigma_max(schedule) -> float:
  """sigma at the last training timestep T - 1, where the samplers start."""
  return float(np.exp(log_sigma_table(schedule)[-1]))


def _mixture_eps(params, x, t):
  """Exact eps_hat(x_t, t) of a padded mixture; `params` = (logw [K], means [K, D], stds [K], log_sigma [T])."""
  logw, means, stds, log_sigma_tab = params
  T = log_sigma_tab.shape[0]
  if jnp.issubdtype(t.dtype, jnp.integer):
    log_sigma = log_sigma_tab[jnp.clip(t, 0, T - 1)]
  else:  # log-sigma linear between the neighbouring integer timesteps (k-diffusion's sigma_to_t convention)
    tc = jnp.clip(t.astype(jnp.float32), 0.0, T - 1.0)
    lo = jnp.floor(tc).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, T - 1)
    frac = tc - lo
    log_sigma = (1 - frac) * log_sigma_tab[lo] + frac * log_sigma_tab[hi]
  abar = jax.nn.sigmoid(-2.0 * log_sigma)[:, None, None]        # 1 / (1 + sigma^2), [B, 1, 1]
  alpha, sig = jnp.sqrt(abar), jnp.sqrt(jax.nn.sigmoid(2.0 * log_sigma))[:, None, None]
  var = abar * stds[None, :, None] ** 2 + (1.0 - abar)          # [B, K, 1]
  diff = x[:, None, :] - alpha * means[None]                      # [B, K, D]
  d = x.shape[-1]
  logp = logw[None] - 0.5 * d * jnp.log(var[..., 0]) - 0.5 * jnp.sum(diff ** 2, -1) / var[..., 0]
  resp = jax.nn.softmax(logp, axis=-1)[..., None]                 # [B, K, 1]
  return jnp.sum(resp * sig * diff / var, axis=1)


def _counted_eps(params, x, t):
  jax.debug.callback(_count_call)
  return _mixture_eps(params, x, t)


_CALLS = [0]


def _count_call():
  _CALLS[0] += 1


def reset_calls() -> None:
  _CALLS[0] = 0


def calls() -> int:
  """Model calls executed since `reset_calls` (by the callback inside `mixture_model_fn(..., count=True)`)."""
  return _CALLS[0]


def mixture_params(mix: Mixture, schedule) -> tuple:
  logw, means, stds = mix.padded()
  return tuple(jnp.asarray(a, jnp.float32) for a in (logw, means, stds, log_sigma_table(schedule)))


def mixture_model_fn(mix: Mixture, schedule, count: bool = True):
  """`model_fn(x [B, D], t [B]) -> eps_hat`, a `jax.tree_util.Partial` (one function object for every mixture and
  schedule: the samplers compile once per shape). With `count`, every executed call bumps `calls()`."""
  return jax.tree_util.Partial(_counted_eps if count else _mixture_eps, mixture_params(mix, schedule))


# --------------------------------------------------------------------------------------------- the exact ODE
def denoise(mix: Mixture, x: np.ndarray, sigma: float) -> np.ndarray:
  """The exact posterior mean D(x_sigma; sigma) = E[x0 | x0 + sigma n = x], float64, x [B, D]."""
  var = mix.stds ** 2 + sigma ** 2                                 # [K]
  diff = x[:, None, :] - mix.means[None]                           # [B, K, D]
  logp = np.log(mix.weights)[None] - 0.5 * mix.dim * np.log(var)[None] - 0.5 * np.sum(diff ** 2, -1) / var[None]
  logp -= logp.max(axis=1, keepdims=True)
  resp = np.exp(logp)
  resp /= resp.sum(axis=1, keepdims=True)
  post = mix.means[None] + (mix.stds ** 2 / var)[None, :, None] * diff
  return np.sum(resp[..., None] * post, axis=1)


def exact_flow(mix: Mixture, sigma_start: float, x_T: np.ndarray, num_steps: int = 4000) -> np.ndarray:
  """The probability-flow ODE from VP state x_T at noise level `sigma_start` to the clean sample (float64 RK4 in
  log-sigma with `num_steps` uniform steps, then D at SIGMA_MIN)."""
  x = np.asarray(x_T, np.float64) * np.sqrt(1.0 + sigma_start ** 2)   # x_sigma = x_t / alpha
  u = np.linspace(np.log(sigma_start), np.log(SIGMA_MIN), num_steps + 1)
  f = lambda y, uu: y - denoise(mix, y, float(np.exp(uu)))         # noqa: E731
  for u0, u1 in zip(u[:-1], u[1:]):
    h = u1 - u0
    k1 = f(x, u0)
    k2 = f(x + 0.5 * h * k1, u0 + 0.5 * h)
    k3 = f(x + 0.5 * h * k2, u0 + 0.5 * h)
    k4 = f(x + h * k3, u1)
    x = x + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
  return denoise(mix, x, SIGMA_MIN)


def exact_flow_checked(mix: Mixture, sigma_start: float, x_T: np.ndarray, num_steps: int = 2000):
  """(x0 from 2 * num_steps RK4 steps, max |difference| to num_steps steps): the ground truth and its convergence."""
  coarse = exact_flow(mix, sigma_start, x_T, num_steps)
  fine = exact_flow(mix, sigma_start, x_T, 2 * num_steps)
  return fine, float(np.max(np.abs(fine - coarse)))


# --------------------------------------------------------------------------------------------- rectified flow
# x_t = (1 - t) x0 + t eps, t in [0, 1]: component k of the marginal is N((1 - t) mu_k, V_k I) with
# V_k = (1 - t)^2 s_k^2 + t^2, and the exact velocity E[eps - x0 | x_t] is the responsibility-weighted sum of
# E[eps | x_t, k] - E[x0 | x_t, k] = (t - (1 - t) s_k^2) (x - (1 - t) mu_k) / V_k - mu_k, regular on all of [0, 1].
def _flow_velocity(params, x, t):
  """Exact velocity of a padded mixture at (x [B, D], t float [B] in [0, 1]); params as `_mixture_eps` (no table)."""
  logw, means, stds = params
  t = t.astype(jnp.float32)[:, None, None]
  var = (1.0 - t) ** 2 * stds[None, :, None] ** 2 + t ** 2        # [B, K, 1]
  diff = x[:, None, :] - (1.0 - t) * means[None]                    # [B, K, D]
  d = x.shape[-1]
  logp = logw[None] - 0.5 * d * jnp.log(var[..., 0]) - 0.5 * jnp.sum(diff ** 2, -1) / var[..., 0]
  resp = jax.nn.softmax(logp, axis=-1)[..., None]
  v = (t - (1.0 - t) * stds[None, :, None] ** 2) * diff / var - means[None]
  return jnp.sum(resp * v, axis=1)


def _counted_velocity(params, x, t):
  jax.debug.callback(_count_call)
  return _flow_velocity(params, x, t)


def flow_velocity_fn(mix: Mixture, count: bool = True):
  """`velocity_fn(x [B, D], t float [B]) -> E[eps - x0 | x_t]` for rectified flow on `mix` (a Partial)."""
  logw, means, stds = mix.padded()
  params = tuple(jnp.asarray(a, jnp.float32) for a in (logw, means, stds))
  return jax.tree_util.Partial(_counted_velocity if count else _flow_velocity, params)


def flow_velocity(mix: Mixture, x: np.ndarray, t: float) -> np.ndarray:
  """The exact rectified-flow velocity in float64 numpy, x [B, D]."""
  var = (1.0 - t) ** 2 * mix.stds ** 2 + t ** 2                    # [K]
  diff = x[:, None, :] - (1.0 - t) * mix.means[None]
  logp = np.log(mix.weights)[None] - 0.5 * mix.dim * np.log(var)[None] - 0.5 * np.sum(diff ** 2, -1) / var[None]
  logp -= logp.max(axis=1, keepdims=True)
  resp = np.exp(logp)
  resp /= resp.sum(axis=1, keepdims=True)
  v = ((t - (1.0 - t) * mix.stds ** 2) / var)[None, :, None] * diff - mix.means[None]
  return np.sum(resp[..., None] * v, axis=1)


def exact_rectified_flow(mix: Mixture, x_1: np.ndarray, num_steps: int = 4000) -> np.ndarray:
  """The rectified-flow ODE dx/dt = v(x, t) from t = 1 (x_1) to t = 0, float64 RK4 with uniform steps."""
  x = np.asarray(x_1, np.float64)
  ts = np.linspace(1.0, 0.0, num_steps + 1)
  f = lambda y, tt: flow_velocity(mix, y, float(tt))              # noqa: E731
  for t0, t1 in zip(ts[:-1], ts[1:]):
    h = t1 - t0
    k1 = f(x, t0)
    k2 = f(x + 0.5 * h * k1, t0 + 0.5 * h)
    k3 = f(x + 0.5 * h * k2, t0 + 0.5 * h)
    k4 = f(x + h * k3, t1)
    x = x + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
  return x


def exact_rectified_flow_checked(mix: Mixture, x_1: np.ndarray, num_steps: int = 2000):
  """(x0 from 2 * num_steps RK4 steps, max |difference| to num_steps steps)."""
  coarse = exact_rectified_flow(mix, x_1, num_steps)
  fine = exact_rectified_flow(mix, x_1, 2 * num_steps)
  return fine, float(np.max(np.abs(fine - coarse)))
