"""Tests for genjax.samplers.editing: RePaint inpainting against a closed-form conditional, SDEdit img2img.

Multivariate Gaussian data x0 ~ N(mu, Sigma) has the optimal noise prediction eps(x, t) = sqrt(1 - a) Sigma_t^-1
(x - sqrt(a) mu), Sigma_t = a Sigma + (1 - a) I, and the conditional of the unknown dims given the known ones is
Gaussian in closed form: mean mu_u + Sigma_uk Sigma_kk^-1 (x_k - mu_k), variance
Sigma_uu - Sigma_uk Sigma_kk^-1 Sigma_ku.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from genjax.compiles import CompileCounter
from genjax.errors import UserError
from genjax.samplers.diffusion import ddim_sample
from genjax.samplers.edm import heun_sample
from genjax.samplers.editing import img2img_sample, inpaint_sample
from genjax.samplers.schedules import NoiseSchedule
from genjax.samplers.spacing import make_timesteps

SCHED = NoiseSchedule.linear(num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
MU = np.array([0.3, -0.2])
SIGMA = 0.25 * np.array([[1.0, 0.8], [0.8, 1.0]])  # correlation 0.8


def gaussian_eps(mu, lam, u, x, t):
  """Optimal eps for N(mu, U diag(lam) U^T) data (Sigma_t^-1 applied in Sigma's eigenbasis)."""
  a = jnp.exp(SCHED.log_alpha_bar(t))[:, None]
  r = (x - jnp.sqrt(a) * mu) @ u
  return jnp.sqrt(1 - a) * (r / (a * lam + 1 - a)) @ u.T


LAM, U = np.linalg.eigh(SIGMA)
MODEL = Partial(gaussian_eps, jnp.asarray(MU, jnp.float32), jnp.asarray(LAM, jnp.float32),
                jnp.asarray(U, jnp.float32))
N = 2000
X_T = jax.random.normal(jax.random.key(0), (N, 2), jnp.float32)
KNOWN_VALUE = 0.8
KNOWN = jnp.tile(jnp.asarray([[KNOWN_VALUE, 0.0]], jnp.float32), (N, 1))
MASK = jnp.asarray([1.0, 0.0])
COND_MEAN = MU[1] + SIGMA[1, 0] / SIGMA[0, 0] * (KNOWN_VALUE - MU[0])  # 0.2
COND_VAR = SIGMA[1, 1] - SIGMA[1, 0] ** 2 / SIGMA[0, 0]  # 0.09 (the prior's: -0.2 and 0.25)


def test_inpainting_recovers_the_conditional_with_resampling():
  inpaint = lambda r: np.asarray(inpaint_sample(MODEL, SCHED, X_T, known=KNOWN, mask=MASK, num_steps=300,
                                                rng=jax.random.key(1), num_resample=r), np.float64)
  plain = inpaint(1)
  with CompileCounter() as cc:
    resampled = inpaint(10)  # num_resample is a runtime value
  assert cc.count == 0
  np.testing.assert_array_equal(plain[:, 0], np.float32(KNOWN_VALUE))  # known pixels are `known` at the end
  np.testing.assert_array_equal(resampled[:, 0], np.float32(KNOWN_VALUE))
  # Measured (300 DDPM steps, N = 2000): replacement alone (num_resample=1) mean 0.054, var 0.124: it hardly
  # conditions; num_resample=10: mean 0.187, var 0.075 (strided DDPM's own variance loss, repeated by the
  # resampling, keeps the variance ~15% low; 1000 steps x 5 resamplings: 0.164 / 0.089).
  assert abs(plain[:, 1].mean() - COND_MEAN) > 0.1  # replacement alone is biased towards the prior
  assert abs(resampled[:, 1].mean() - COND_MEAN) < 0.03
  assert abs(resampled[:, 1].var() - COND_VAR) < 0.25 * COND_VAR
  assert abs(plain[:, 1].var() - COND_VAR) > 0.025  # vs the prior's 0.25: closer to 0.09, but not there


def test_inpainting_with_a_runtime_mask():
  both_known = inpaint_sample(MODEL, SCHED, X_T[:8], known=KNOWN[:8] + 0.1, mask=jnp.ones((2,)), num_steps=20,
                              rng=jax.random.key(2))
  np.testing.assert_allclose(both_known, KNOWN[:8] + 0.1, atol=1e-6)
  with CompileCounter() as cc:
    none_known = inpaint_sample(MODEL, SCHED, X_T[:8], known=KNOWN[:8], mask=jnp.zeros((2,)), num_steps=20,
                                rng=jax.random.key(2))
  assert cc.count == 0
  assert not np.allclose(none_known[:, 0], KNOWN_VALUE, atol=0.05)


N_LINE = 64
IMAGE = jnp.tile(jnp.asarray([[0.6, 0.1]], jnp.float32), (N_LINE, 1))  # mu + 0.6 std along Sigma's long axis


def test_img2img_runs_the_tail_of_the_samplers_grid():
  key = jax.random.key(3)
  # The documented rng use: the starting noise from fold_in(rng, 0).
  noise = jax.random.normal(jax.random.fold_in(key, 0), IMAGE.shape, jnp.float32)
  start = lambda t: SCHED.add_noise(IMAGE, noise, jnp.full((N_LINE,), t))
  # strength 1: the whole trailing grid from T-1, from x_T = sqrt(abar_999) image + ... = noise to 0.006.
  out = img2img_sample(MODEL, SCHED, IMAGE, strength=1.0, num_steps=25, rng=key, spacing="trailing")
  np.testing.assert_allclose(out, ddim_sample(MODEL, SCHED, start(999), num_steps=25, spacing="trailing"),
                             atol=1e-5)
  np.testing.assert_allclose(start(999), noise, atol=0.01)
  # strength 0.5 of 10 steps: the last 5 of the 10-step grid, the image noised to the first of them (diffusers').
  full = np.asarray(make_timesteps(SCHED, 10, spacing="trailing"))
  with CompileCounter() as cc:
    half = img2img_sample(MODEL, SCHED, IMAGE, strength=0.5, num_steps=10, rng=key, spacing="trailing")
  assert cc.count <= 2  # the noising; the DDIM program is the one above (strength and the grid are runtime)
  np.testing.assert_allclose(half, ddim_sample(MODEL, SCHED, start(int(full[5])), timesteps=full[5:]), atol=1e-5)
  # An EDM sampler: its Karras grid (float timesteps), the same tail rule.
  karras = np.asarray(make_timesteps(SCHED, 12, spacing="karras"))
  heun = img2img_sample(MODEL, SCHED, IMAGE, strength=0.5, num_steps=12, rng=key, sampler="heun")
  np.testing.assert_allclose(heun, heun_sample(MODEL, SCHED, start(float(karras[6])), timesteps=karras[6:]),
                             atol=1e-5)


def test_img2img_at_small_strength_stays_close_to_the_image():
  key = jax.random.key(4)
  distance = lambda s: float(jnp.sqrt(jnp.mean(jnp.sum(
      (img2img_sample(MODEL, SCHED, IMAGE, strength=s, num_steps=50, rng=key) - IMAGE) ** 2, axis=1))))
  near = distance(0.02)  # 1 of 50 steps: noised to t = 19, sqrt(1 - abar) = 0.074 per coordinate
  with CompileCounter() as cc:
    d = [distance(s) for s in (0.1, 0.5, 1.0)]  # strength is a runtime value
  assert cc.count == 0
  # Measured RMS distances: 0.091 (strength 0.02), 0.30, 0.67, 0.71 (1.0). A fresh sample of N(mu, Sigma) is at
  # sqrt(|mu - image|^2 + tr Sigma) = 0.82 from the image in expectation.
  assert near < 0.15 and near < d[0] < d[1] < d[2]
  assert abs(d[2] - 0.82) < 0.2


@pytest.mark.parametrize("call, match", [
    (lambda: img2img_sample(MODEL, SCHED, IMAGE, strength=0.0, num_steps=10, rng=jax.random.key(0)), "strength"),
    (lambda: img2img_sample(MODEL, SCHED, IMAGE, strength=0.05, num_steps=10, rng=jax.random.key(0)), "no step"),
    (lambda: img2img_sample(MODEL, SCHED, IMAGE, strength=0.5, num_steps=10, rng=None), "needs rng"),
    (lambda: img2img_sample(MODEL, SCHED, IMAGE, strength=0.5, num_steps=10, rng=jax.random.key(0),
                            sampler="plms"), "sampler='plms' is not one of"),
    (lambda: inpaint_sample(MODEL, SCHED, X_T, known=KNOWN, mask=jnp.ones((3,)), num_steps=5,
                            rng=jax.random.key(0)), "does not broadcast"),
    (lambda: inpaint_sample(MODEL, SCHED, X_T, known=KNOWN, mask=MASK * 0.5, num_steps=5,
                            rng=jax.random.key(0)), "only 0"),
    (lambda: inpaint_sample(MODEL, SCHED, X_T, known=KNOWN, mask=MASK, num_steps=5, rng=None), "needs rng"),
    (lambda: inpaint_sample(MODEL, SCHED, X_T, known=KNOWN, mask=MASK, num_steps=5, rng=jax.random.key(0),
                            num_resample=0), "num_resample"),
])
def test_bad_arguments_raise_one_clear_error(call, match):
  with pytest.raises(UserError, match=match):
    call()


# ------------------------------------------------------------------------------------------------ a diffusion run
@pytest.mark.slow  # ~30 s of CPU: compiles the U-Net inside RePaint's and DDIM's loops
def test_a_diffusion_run_edits_images():
  from experiments.configs import ddpm as ddpm_configs
  from genjax.models import diffusion
  c = ddpm_configs.get_config("digits")
  c.model.update(ch=8, num_res_blocks=1, num_heads=2, norm_groups=4, num_timesteps=50, num_sample_steps=3)
  task = diffusion.task(c)
  abstract = jax.eval_shape(task.init, jax.random.key(0), None)
  leaves, treedef = jax.tree_util.tree_flatten(abstract["unet"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = {"unet": jax.tree_util.tree_unflatten(
      treedef, [0.05 * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)])}
  image = np.asarray(jax.random.uniform(jax.random.key(2), (8, 8, 1)))
  mask = np.zeros((8, 8), np.float32)
  mask[:4] = 1.0  # keep the top half
  filled = np.asarray(task.sample_images(params, jax.random.key(3), 2, init_image=image, inpaint_mask=mask,
                                         num_resample=2))
  assert filled.shape == (2, 8, 8, 1)
  np.testing.assert_allclose(filled[:, :4], np.broadcast_to(image[:4], (2, 4, 8, 1)), atol=1e-5)
  edited = np.asarray(task.sample_images(params, jax.random.key(3), 2, init_image=image, strength=0.7))
  assert edited.shape == (2, 8, 8, 1) and 0.0 <= edited.min() and edited.max() <= 1.0
  for options, match in [(dict(strength=0.5), "give init_image too"),
                         (dict(init_image=image), "exactly one of strength"),
                         (dict(init_image=image, inpaint_mask=mask, sampler="ddim"), "leave the sampler"),
                         (dict(init_image=image[:4], strength=0.5), "this model's images are")]:
    with pytest.raises(UserError, match=match):
      task.sample_images(params, jax.random.key(3), 2, **options)
