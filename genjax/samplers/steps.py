"""Pure diffusion sampler steps on an explicit state, for hand-written sampling loops (and used by the samplers).

    import jax, jax.numpy as jnp
    from genjax.samplers import NoiseSchedule, SamplerState, dpm_solver_step, make_timesteps
    schedule = NoiseSchedule.linear()
    def model_fn(x, t):                  # the optimal eps for data ~ N(0.3, 0.5^2); put your network here
      a = schedule.alpha_sigma(t)[0][:, None] ** 2
      return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * 0.3) / (a * 0.25 + 1 - a)
    x_T = jax.random.normal(jax.random.key(0), (4096, 1))
    ts = make_timesteps(schedule, 20, spacing="log_snr")          # where the model is called
    state = SamplerState.init(x_T)
    for i in range(len(ts)):
      t, t_next = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)   # -1: the last step lands on the clean sample
      pred = model_fn(state.x, jnp.full((x_T.shape[0],), t))
      state = dpm_solver_step(schedule, state, pred, t, t_next, order=2)
    x0 = state.x                                               # ~ N(0.3, 0.5^2)

Every step takes the state at timestep `t`, the model's raw output there (`prediction="epsilon" | "v" | "x0"`, or
diffusers' "v_prediction" / "sample"), and the next timestep `t_next` (-1 = clean), and returns the next state. t may
be int or float (see `NoiseSchedule.t_to_sigma`); every option may be a traced value (one compiled program for any
value), so the steps can live inside `lax.fori_loop` / `lax.scan` / `jax.jit`. Shared options:

  * `clip_denoised=(lo, hi)`: clip the predicted x0 (the noise estimate is made consistent with the clipped x0);
  * `dynamic_threshold=q` (Imagen, Saharia et al. 2022): per sample, s = max(1, the q-quantile of |x0|) with q on a
    0..1 scale (e.g. 0.995), capped at `threshold_max`; x0 is clipped to [-s, s] and divided by s.

Multistep solvers read their history from the state (`x0_hist`, `lam_hist`: newest first) and warm up by
themselves: step k uses order min(order, k + 1), and the step to the clean sample is always first order (x0).
Pass a smaller `order` for the last steps yourself to get `lower_order_final`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from genjax.errors import UserError
from genjax.samplers.schedules import NoiseSchedule, check_prediction

HISTORY = 3  # data predictions kept in the state: UniPC-3's corrector needs three


class SamplerState(NamedTuple):
  """The loop state of every sampler step (a pytree).

  x: the current sample, float32. step: steps taken so far (int32). x0_hist [history, ...] / lam_hist [history]:
  the last `history` data predictions and the lambda = log(alpha / sigma) at which they were made, newest first.
  x_prev: the sample the last step started from (UniPC's corrector redoes that step). last_order: its order.
  """
  x: jax.Array
  step: jax.Array
  x0_hist: jax.Array
  lam_hist: jax.Array
  x_prev: jax.Array
  last_order: jax.Array

  @classmethod
  def init(cls, x_T, history: int = HISTORY) -> "SamplerState":
    """The state at x_T. `history`: data predictions to keep (DDIM / DDPM need 0, DPM-Solver++ 2, UniPC 3)."""
    x = jnp.asarray(x_T, jnp.float32)
    return cls(x=x, step=jnp.zeros((), jnp.int32), x0_hist=jnp.zeros((history,) + x.shape, jnp.float32),
               lam_hist=jnp.zeros((history,), jnp.float32), x_prev=x, last_order=jnp.ones((), jnp.int32))


# --------------------------------------------------------------------------------------------- shared pieces
def _b(c, x):
  c = jnp.asarray(c, jnp.float32)
  return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def lam_of(schedule: NoiseSchedule, t) -> jax.Array:
  """lambda_t = log(alpha_t / sigma_t) (half the log-SNR) at scalar t; +inf at the clean sample (t < 0)."""
  la = schedule.log_alpha_bar(jnp.asarray(t))
  return jnp.where(jnp.asarray(t) < 0, jnp.inf, 0.5 * (la - jnp.log(-jnp.expm1(la))))


def _alpha_sigma(schedule, t):
  a, s = schedule.alpha_sigma(jnp.asarray(t))
  return a, s


def denoise(schedule: NoiseSchedule, model_output, x, t, *, prediction: str = "epsilon", clip_denoised=None,
            dynamic_threshold=None, threshold_max=1.0) -> tuple[jax.Array, jax.Array]:
  """(x0_hat, eps_hat) from a model output at (x, scalar t), with clipping / dynamic thresholding applied to x0_hat
  and eps_hat made consistent with it; float32."""
  prediction = check_prediction(prediction)
  x = jnp.asarray(x, jnp.float32)
  out = jnp.asarray(model_output)
  if out.shape != x.shape:
    raise UserError(f"model output has shape {out.shape}, expected x's shape {x.shape}")
  tb = jnp.full((x.shape[0],), t, jnp.asarray(t).dtype)
  x0, eps = schedule.split_prediction(out.astype(jnp.float32), x, tb, prediction)
  new = x0
  if dynamic_threshold is not None:
    flat = jnp.abs(new.reshape(new.shape[0], -1))
    s = jnp.quantile(flat, jnp.asarray(dynamic_threshold, jnp.float32), axis=1)
    s = jnp.clip(s, 1.0, jnp.asarray(threshold_max, jnp.float32))
    new = jnp.clip(new, -_b(s, new), _b(s, new)) / _b(s, new)
  if clip_denoised is not None:
    new = jnp.clip(new, clip_denoised[0], clip_denoised[1])
  eps = jnp.where(new == x0, eps, schedule.eps_from_x0(new, x, tb))
  return new, eps


def _is_zero(value) -> bool:
  try:
    return bool(jax.numpy.all(jnp.asarray(value) == 0))
  except jax.errors.ConcretizationTypeError:
    return False


def _push(state: SamplerState, x0, lam) -> tuple[jax.Array, jax.Array]:
  if state.x0_hist.shape[0] == 0:
    return state.x0_hist, state.lam_hist
  return (jnp.concatenate([x0[None], state.x0_hist[:-1]]), jnp.concatenate([lam[None], state.lam_hist[:-1]]))


# --------------------------------------------------------------------------------------------- DDIM / DDPM
def ddim_step(schedule: NoiseSchedule, state: SamplerState, model_output, t, t_next, *, prediction="epsilon",
              eta=0.0, noise=None, clip_denoised=None, dynamic_threshold=None, threshold_max=1.0) -> SamplerState:
  """One DDIM step t -> t_next (Song et al. 2021): x' = alpha' x0 + sqrt(1 - alpha'^2 - s^2) eps + s z, with
  s^2 = eta^2 (sigma'^2 / sigma^2)(1 - abar / abar'). eta > 0 needs `noise` z (standard normal, x's shape)."""
  x0, eps = denoise(schedule, model_output, state.x, t, prediction=prediction, clip_denoised=clip_denoised,
                    dynamic_threshold=dynamic_threshold, threshold_max=threshold_max)
  la, la_next = schedule.log_alpha_bar(jnp.asarray(t)), schedule.log_alpha_bar(jnp.asarray(t_next))
  one_minus, one_minus_next = -jnp.expm1(la), -jnp.expm1(la_next)
  if noise is None:
    if not _is_zero(eta):
      raise UserError(f"ddim_step with eta={eta!r} (possibly > 0) needs `noise` (standard normal, x's shape)")
    eta = 0.0
  var = jnp.asarray(eta, jnp.float32) ** 2 * (one_minus_next / one_minus) * -jnp.expm1(la - la_next)
  x = jnp.exp(0.5 * la_next) * x0 + jnp.sqrt(jnp.maximum(one_minus_next - var, 0.0)) * eps
  if noise is not None:
    x = x + jnp.sqrt(var) * jnp.asarray(noise, jnp.float32)
  return _advance(state, x, x0, lam_of(schedule, t), 1)


DDPM_VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def ddpm_step(schedule: NoiseSchedule, state: SamplerState, model_output, t, t_next, *, noise, prediction="epsilon",
              variance: str = "fixed_small", clip_denoised=None, dynamic_threshold=None,
              threshold_max=1.0) -> SamplerState:
  """One ancestral DDPM step t -> t_next: the posterior mean of q(x_t' | x_t, x0_hat), plus noise of variance
  "fixed_small" (the posterior variance; = DDIM with eta 1), "fixed_large" (beta = 1 - abar / abar', Ho et al.
  2020), or "learned_range" (Nichol & Dhariwal 2021: the model outputs [prediction, v] concatenated on the last
  axis, v in [-1, 1], log variance = (v+1)/2 log beta + (1-v)/2 log posterior-variance). Strided steps use the
  visited t_next's alpha-bar; the step to the clean sample adds no noise."""
  if variance not in DDPM_VARIANCES:
    raise UserError(f"variance={variance!r} is not one of: {', '.join(DDPM_VARIANCES)}")
  x = state.x
  out = jnp.asarray(model_output)
  if variance == "learned_range":
    if out.shape[:-1] != x.shape[:-1] or out.shape[-1] != 2 * x.shape[-1]:
      raise UserError(f"variance='learned_range' needs model output [..., 2 C] = {x.shape[:-1] + (2 * x.shape[-1],)}"
                      f" (prediction, then variance values), got {out.shape}")
    out, v = jnp.split(out, 2, axis=-1)
  x0, _ = denoise(schedule, out, x, t, prediction=prediction, clip_denoised=clip_denoised,
                  dynamic_threshold=dynamic_threshold, threshold_max=threshold_max)
  la, la_next = schedule.log_alpha_bar(jnp.asarray(t)), schedule.log_alpha_bar(jnp.asarray(t_next))
  beta = -jnp.expm1(la - la_next)  # 1 - abar / abar'
  one_minus, one_minus_next = -jnp.expm1(la), -jnp.expm1(la_next)
  # Posterior mean of q(x_t' | x_t, x0): (sqrt(abar') beta x0 + sqrt(abar / abar') (1 - abar') x_t) / (1 - abar).
  mean = (jnp.exp(0.5 * la_next) * beta * x0 + jnp.exp(0.5 * (la - la_next)) * one_minus_next * x) / one_minus
  small = beta * one_minus_next / one_minus
  if variance == "fixed_small":
    var = small
  elif variance == "fixed_large":
    var = beta
  else:
    frac = (v.astype(jnp.float32) + 1.0) / 2.0
    var = jnp.exp(frac * jnp.log(beta) + (1.0 - frac) * jnp.log(jnp.maximum(small, 1e-20)))
  var = jnp.where(jnp.asarray(t_next) < 0, 0.0, var)
  x = mean + jnp.sqrt(var) * jnp.asarray(noise, jnp.float32)
  return _advance(state, x, x0, lam_of(schedule, t), 1)


def _check_history(state: SamplerState, need: int, who: str) -> None:
  if state.x0_hist.shape[0] < need:
    raise UserError(f"{who} needs a state with history >= {need} (SamplerState.init(x_T)), got "
                    f"{state.x0_hist.shape[0]}")


def _advance(state, x, x0, lam, order):
  x0_hist, lam_hist = _push(state, x0, lam)
  return SamplerState(x=x, step=state.step + 1, x0_hist=x0_hist, lam_hist=lam_hist, x_prev=state.x,
                      last_order=jnp.asarray(order, jnp.int32))


# --------------------------------------------------------------------------------------------- DPM-Solver++
def dpm_solver_step(schedule: NoiseSchedule, state: SamplerState, model_output, t, t_next, *, prediction="epsilon",
                    order=2, noise=None, clip_denoised=None, dynamic_threshold=None,
                    threshold_max=1.0) -> SamplerState:
  """One DPM-Solver++ multistep step on the data prediction (Lu et al. 2022): order 1 (= DDIM), 2 (2M) or 3 (3M),
  warmed up from the state's history. With `noise` it is the SDE variant (DPM-Solver++(2M/3M) SDE, Lu et al. 2023's
  "SDE-DPM-Solver++": x' = (sigma'/sigma) e^-h x + alpha' (1 - e^-2h) D + sigma' sqrt(1 - e^-2h) z). Step sizes
  h = lambda' - lambda in lambda = log(alpha / sigma); diffusers' "midpoint" form of the 2nd-order term. Orders 1-2
  equal diffusers' DPMSolverMultistepScheduler step for step; the 3rd-order term's weight is the Taylor-consistent
  one (twice diffusers' and the reference code's), which makes 3M third order (tested on closed forms)."""
  _check_history(state, 2, "dpm_solver_step")
  x = state.x
  x0, _ = denoise(schedule, model_output, x, t, prediction=prediction, clip_denoised=clip_denoised,
                  dynamic_threshold=dynamic_threshold, threshold_max=threshold_max)
  lam, lam_next = lam_of(schedule, t), lam_of(schedule, t_next)
  clean = jnp.asarray(t_next) < 0
  p = jnp.where(clean, 1, jnp.minimum(jnp.asarray(order, jnp.int32), state.step + 1))
  h = jnp.where(clean, 1.0, lam_next - lam)
  m1, m2 = state.x0_hist[0], state.x0_hist[1]
  lam1, lam2 = state.lam_hist[0], state.lam_hist[1]
  r0 = jnp.where(p >= 2, (lam - lam1) / h, 1.0)
  r1 = jnp.where(p >= 3, (lam1 - lam2) / h, 1.0)
  d1_0 = (x0 - m1) / r0
  d1_1 = (m1 - m2) / r1
  d1 = jnp.where(p >= 3, d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1), jnp.where(p >= 2, d1_0, 0.0))
  d2 = jnp.where(p >= 3, (d1_0 - d1_1) / (r0 + r1), 0.0)
  a_next, s_next = _alpha_sigma(schedule, t_next)
  _, s_cur = _alpha_sigma(schedule, t)
  if noise is None:
    em = jnp.expm1(-h)
    p1, p2, _ = _phis(-h)
    c1 = jnp.where(p >= 3, -p1, -0.5 * em)  # (e^-h - 1)/h + 1 for 3M
    # D2 ~ h^2 x0''/2, so the Taylor-consistent weight of D2 is 2 * phi_3 (= -2 phi2(-h) here): Lu et al.'s and
    # diffusers' 3M code use phi_3 alone, which leaves an O(h^3) local error (3M then converges at order 2).
    x_new = (s_next / s_cur) * x - a_next * em * x0 + a_next * c1 * d1 - 2.0 * a_next * p2 * d2
  else:
    em2 = -jnp.expm1(-2.0 * h)  # 1 - e^-2h
    p1, p2, _ = _phis(-2.0 * h)
    c1 = jnp.where(p >= 3, -p1, 0.5 * em2)  # (1 - e^-2h)/(-2h) + 1 for 3M
    # D2's weight: (2 / h^2) int_0^h e^(-2(h-u)) u^2 du = -2 phi2(-2h) (diffusers' 3M SDE has
    # (1 - e^-2h - 2h)/(2h)^2 - 1/2 ~ -1 there, which biases the sampled distribution).
    c2 = -2.0 * p2
    x_new = ((s_next / s_cur) * jnp.exp(-h) * x + a_next * em2 * x0 + a_next * c1 * d1 + a_next * c2 * d2
             + s_next * jnp.sqrt(em2) * jnp.asarray(noise, jnp.float32))
  x_new = jnp.where(clean, x0, x_new)
  return _advance(state, x_new, x0, lam, p)


# --------------------------------------------------------------------------------------------- UniPC
UNIPC_VARIANTS = ("bh1", "bh2")


def _phis(z):
  """(phi1, phi2, phi3)(z) with phi1 = (e^z - 1)/z - 1, phi_{k+1} = phi_k / z - 1/(k+1)!, i.e. phi_k(z) =
  sum_{j>=1} z^j / (j+k)!: a series for |z| < 1 (the closed forms cancel catastrophically in float32 for small
  steps), the closed forms otherwise."""
  small = jnp.abs(z) < 1.0
  zs = jnp.where(small, z, 0.5)
  series = []
  for k in (1, 2, 3):
    term, total, fact = jnp.ones_like(zs), jnp.zeros_like(zs), 1.0
    for j in range(1, k + 1):
      fact *= j
    for j in range(1, 12):
      fact *= j + k
      term = term * zs
      total = total + term / fact
    series.append(total)
  zl = jnp.where(small, 2.0, z)
  p1 = jnp.expm1(zl) / zl - 1.0
  p2 = p1 / zl - 0.5
  p3 = p2 / zl - 1.0 / 6.0
  return tuple(jnp.where(small, a, b) for a, b in zip(series, (p1, p2, p3)))


def _unipc_b(hh, b_h):
  """b_1..b_3 of UniPC (Zhao et al. 2023): b_k = k! phi_k(hh) / B(h)."""
  p1, p2, p3 = _phis(hh)
  return p1 / b_h, 2.0 * p2 / b_h, 6.0 * p3 / b_h


def _sigma_of_lam(lam):
  """sigma = sqrt(1 - abar) at half-log-SNR lam (alpha^2 = sigmoid(2 lam)); 0 at lam = +inf."""
  return jnp.exp(-0.5 * jax.nn.softplus(2.0 * lam))


def unipc_step(schedule: NoiseSchedule, state: SamplerState, model_output, t, t_next, *, prediction="epsilon",
               order=2, variant: str = "bh2", clip_denoised=None, dynamic_threshold=None,
               threshold_max=1.0) -> SamplerState:
  """One UniPC step on the data prediction (Zhao et al. 2023): UniC corrects the state's sample with this model
  output (re-doing the previous step at order last_order + 1, no extra model call), then UniP (order `order`,
  warmed up) predicts x at t_next. `variant` "bh2" (B(h) = e^h - 1) or "bh1" (B(h) = h)."""
  if variant not in UNIPC_VARIANTS:
    raise UserError(f"variant={variant!r} is not one of: {', '.join(UNIPC_VARIANTS)}")
  _check_history(state, 3, "unipc_step")
  expm1_b = variant == "bh2"
  x0, _ = denoise(schedule, model_output, state.x, t, prediction=prediction, clip_denoised=clip_denoised,
                  dynamic_threshold=dynamic_threshold, threshold_max=threshold_max)
  lam = lam_of(schedule, t)
  m, lams = state.x0_hist, state.lam_hist

  # UniC: redo the step (lam_1 -> lam) from x_prev with the new model output x0 as an extra point.
  pc = state.last_order
  lam1 = lams[0]
  h = lam - lam1
  hh = -h
  b_h = jnp.expm1(hh) if expm1_b else hh
  b1, b2, b3 = _unipc_b(hh, b_h)
  r1 = jnp.where(pc >= 2, (lams[1] - lam1) / h, 0.5)
  r2 = jnp.where(pc >= 3, (lams[2] - lam1) / h, 0.25)
  dk1 = (m[1] - m[0]) / r1
  dk2 = (m[2] - m[0]) / r2
  mat = jnp.array([[1.0, 1.0, 1.0], [r1, r2, 1.0], [r1 ** 2, r2 ** 2, 1.0]])
  rho3 = jnp.linalg.solve(mat, jnp.stack([b1, b2, b3]))
  rho_1 = jnp.where(pc == 3, rho3[0], jnp.where(pc == 2, (b1 - b2) / (1.0 - r1), 0.0))
  rho_2 = jnp.where(pc == 3, rho3[1], 0.0)
  rho_t = jnp.where(pc == 3, rho3[2], jnp.where(pc == 2, (b2 - r1 * b1) / (1.0 - r1), 0.5))
  a_cur, s_cur = _alpha_sigma(schedule, t)
  s1 = _sigma_of_lam(lam1)
  corr = ((s_cur / s1) * state.x_prev - a_cur * jnp.expm1(hh) * m[0]
          - a_cur * b_h * (rho_1 * dk1 + rho_2 * dk2 + rho_t * (x0 - m[0])))
  x = jnp.where(state.step > 0, corr, state.x)

  # UniP: predict t -> t_next from x0 and the history.
  clean = jnp.asarray(t_next) < 0
  p = jnp.where(clean, 1, jnp.minimum(jnp.asarray(order, jnp.int32), state.step + 1))
  lam_next = lam_of(schedule, t_next)
  h = jnp.where(clean, 1.0, lam_next - lam)
  hh = -h
  b_h = jnp.expm1(hh) if expm1_b else hh
  b1, b2, _ = _unipc_b(hh, b_h)
  q1 = jnp.where(p >= 2, (lam1 - lam) / h, -1.0)
  q2 = jnp.where(p >= 3, (lams[1] - lam) / h, -2.0)
  e1 = (m[0] - x0) / q1
  e2 = (m[1] - x0) / q2
  rp_1 = jnp.where(p == 3, (b1 * q2 - b2) / (q2 - q1), jnp.where(p == 2, 0.5, 0.0))
  rp_2 = jnp.where(p == 3, (b2 - q1 * b1) / (q2 - q1), 0.0)
  a_next, s_next = _alpha_sigma(schedule, t_next)
  x_new = (s_next / s_cur) * x - a_next * jnp.expm1(hh) * x0 - a_next * b_h * (rp_1 * e1 + rp_2 * e2)
  x_new = jnp.where(clean, x0, x_new)
  x0_hist, lam_hist = _push(state, x0, lam)
  return SamplerState(x=x_new, step=state.step + 1, x0_hist=x0_hist, lam_hist=lam_hist, x_prev=x,
                      last_order=p)
