"""GAN family (genjax.models.gan): loss formulas, penalties, phase isolation, sampling options, configs."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import gan as gan_configs
from experiments.configs.common import base_config
from genjax.errors import ConfigError
from genjax.models import gan
from genjax.models.fields import to_dict
from genjax.train.step import init_state, make_train_step
from genjax.core.task import Task

SHAPE = (8, 8, 1)


def tiny_config(**model):
  c = gan_configs.get_config("digits")
  c.model.update(latent_dim=8, gen_channels=(16, 8), disc_channels=(8, 16), disc_features=16)
  c.model.update(**model)
  return c


def batch(n=8, seed=0):
  r = np.random.default_rng(seed)
  return {"image": r.uniform(size=(n,) + SHAPE).astype(np.float32), "label": (np.arange(n) % 10).astype(np.int32),
          "example_id": np.arange(n, dtype=np.int32)}


@functools.lru_cache(maxsize=None)
def _init_params(conditional: bool):
  # Compiling init is the slowest part of these tests; the losses and R1 settings do not change the params.
  # Eager, because op-by-op compiles are shared between the conditional and unconditional inits (jit: 2x).
  g = gan.GAN(gan.gan_config(tiny_config(conditional=conditional)), SHAPE, 10)
  return g.init(jax.random.PRNGKey(0), batch())


def built(skip_init=False, **model):
  """A tiny GAN (conditional unless told otherwise) and its params (None with skip_init)."""
  model.setdefault("conditional", True)
  g = gan.GAN(gan.gan_config(tiny_config(**model)), SHAPE, 10)
  return g, None if skip_init else _init_params(bool(model["conditional"]))


# ------------------------------------------------------------------------------------------- losses on logits
REAL = np.array([2.0, 0.5, -1.0], np.float32)
FAKE = np.array([-2.0, -0.5, 1.0], np.float32)


def softplus(v):
  return np.log1p(np.exp(v))


def test_non_saturating_losses_match_formula():
  d = gan.disc_loss_from_logits(jnp.asarray(REAL), jnp.asarray(FAKE), "non_saturating")
  g = gan.gen_loss_from_logits(jnp.asarray(FAKE), "non_saturating")
  np.testing.assert_allclose(d, softplus(-REAL).mean() + softplus(FAKE).mean(), rtol=1e-6)
  np.testing.assert_allclose(g, softplus(-FAKE).mean(), rtol=1e-6)
  # At logits 0 both terms are log 2: D loss 2 log 2, G loss log 2.
  np.testing.assert_allclose(gan.disc_loss_from_logits(jnp.zeros(4), jnp.zeros(4), "non_saturating"),
                             2 * math.log(2), rtol=1e-6)


def test_hinge_losses_match_hand_values():
  # relu(1 - [2, .5, -1]) = [0, .5, 2]; relu(1 + [-2, -.5, 1]) = [0, .5, 2]: each mean 2.5 / 3.
  d = gan.disc_loss_from_logits(jnp.asarray(REAL), jnp.asarray(FAKE), "hinge")
  np.testing.assert_allclose(d, 5.0 / 3.0, rtol=1e-6)
  np.testing.assert_allclose(gan.gen_loss_from_logits(jnp.asarray(FAKE), "hinge"), -FAKE.mean(), rtol=1e-6)


def test_wgan_losses_match_formula():
  d = gan.disc_loss_from_logits(jnp.asarray(REAL), jnp.asarray(FAKE), "wgan_gp")
  np.testing.assert_allclose(d, FAKE.mean() - REAL.mean(), rtol=1e-6)
  np.testing.assert_allclose(gan.gen_loss_from_logits(jnp.asarray(FAKE), "wgan_gp"), -FAKE.mean(), rtol=1e-6)


def test_unknown_loss_names_the_choices():
  with pytest.raises(ValueError, match="non_saturating"):
    gan.disc_loss_from_logits(jnp.zeros(2), jnp.zeros(2), "lsgan")


# ------------------------------------------------------------------------------------------- penalties
def test_r1_and_gradient_penalty_closed_forms():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 4, 4, 1)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(2).normal(size=(4, 4, 1)), jnp.float32)
  linear = lambda v: jnp.sum(v * w, axis=(1, 2, 3))            # noqa: E731  grad_x = w for every example
  np.testing.assert_allclose(gan.r1_value(linear, x), jnp.sum(w * w), rtol=1e-5)
  quad = lambda v: 0.5 * jnp.sum(v * v, axis=(1, 2, 3))        # noqa: E731  grad_x = x
  np.testing.assert_allclose(gan.r1_value(quad, x), jnp.mean(jnp.sum(x * x, axis=(1, 2, 3))), rtol=1e-5)
  # Linear D with ||w|| = 3: the penalty (||grad|| - 1)^2 = 4 wherever it is evaluated.
  w3 = 3.0 * w / jnp.linalg.norm(w)
  lin3 = lambda v: jnp.sum(v * w3, axis=(1, 2, 3))             # noqa: E731
  np.testing.assert_allclose(gan.gradient_penalty(lin3, x, -x, jnp.linspace(0, 1, 5)), 4.0, rtol=1e-5)


def test_lazy_r1_applies_every_interval_scaled_by_it():
  gamma, k = 0.5, 4
  g, params = built(r1_gamma=gamma, r1_interval=k, loss="non_saturating")
  b, rng = batch(), jax.random.PRNGKey(3)
  loss_fn = jax.jit(g.disc_loss)                 # the step is data: one compile serves every step
  losses = {s: loss_fn(params, b, rng, jnp.int32(s)) for s in (0, 1, 4, 5)}
  x = jnp.asarray(b["image"]) * 2 - 1
  r1 = jax.jit(lambda p: gan.r1_value(lambda v: g._d(p["disc"], v, jnp.asarray(b["label"])), x))(params)
  for s in (0, 4):                   # R1 steps: adv + gamma/2 * k * E||grad||^2
    loss, m = losses[s]
    np.testing.assert_allclose(loss, m["adv_loss"] + 0.5 * gamma * k * r1, rtol=1e-5)
    np.testing.assert_allclose(m["r1"], k * r1, rtol=1e-5)
  for s in (1, 5):                   # in between: no penalty
    loss, m = losses[s]
    np.testing.assert_allclose(loss, m["adv_loss"], rtol=1e-6)
    assert float(m["r1"]) == 0.0
  assert float(r1) > 0


# ------------------------------------------------------------------------------------------- phases
def one_phase_step(params, name):
  t = gan.make_task(tiny_config(r1_gamma=0.1, r1_interval=2), SHAPE, 10)
  phase = next(p for p in t.phases if p.name == name)
  task = Task(init=lambda *_: params, phases=(phase,))
  state = init_state(task, jax.random.PRNGKey(0), batch(), ema_decay=0.0)
  new, metrics = jax.jit(make_train_step(task, ema_decay=0.0))(state, batch())
  return state.params, new.params, metrics


def tree_equal(a, b):
  return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name,owner,other", [("disc", "disc", "gen"), ("gen", "gen", "disc")])
def test_a_phase_updates_only_its_own_params(name, owner, other):
  _, params = built()
  before, after, metrics = one_phase_step(params, name)
  assert tree_equal(before[other], after[other]), f"the {name} phase changed params[{other!r}]"
  assert not tree_equal(before[owner], after[owner]), f"the {name} phase did not update params[{owner!r}]"
  assert float(metrics["grad_norm"]) > 0


def test_disc_loss_does_not_reach_the_generator():
  # Even differentiated w.r.t. everything, the disc loss gives the generator zero gradient (fakes are detached).
  g, params = built(r1_gamma=1.0, r1_interval=1, loss="wgan_gp")
  grads = jax.jit(jax.grad(lambda p: g.disc_loss(p, batch(), jax.random.PRNGKey(1), jnp.int32(0))[0]))(params)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(grads["gen"]))
  assert any(float(jnp.abs(x).max()) > 0.0 for x in jax.tree.leaves(grads["disc"]))


@pytest.mark.parametrize("loss,conditional,r1_gamma", [("wgan_gp", True, 0.2), ("non_saturating", False, 0.0)])
def test_losses_do_not_depend_on_how_the_batch_is_split(loss, conditional, r1_gamma):
  # The pmap path sees halves of the global batch with the same rng: per-example latents (and WGAN-GP mixing
  # weights) keep the draws equal, so the mean of the halves' losses is the full batch's loss.
  g, params = built(loss=loss, r1_gamma=r1_gamma, r1_interval=1, conditional=conditional)
  b, rng = batch(8), jax.random.PRNGKey(5)
  halves = [{k: v[i * 4:(i + 1) * 4] for k, v in b.items()} for i in range(2)]
  for fn in (jax.jit(g.disc_loss), jax.jit(g.gen_loss)):
    full = fn(params, b, rng, jnp.int32(0))
    parts = [fn(params, h, rng, jnp.int32(0)) for h in halves]
    np.testing.assert_allclose(full[0], np.mean([p[0] for p in parts]), rtol=1e-5)
    for key in full[1]:
      np.testing.assert_allclose(full[1][key], np.mean([p[1][key] for p in parts]), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- sampling
def test_conditional_samples_change_with_the_label_only():
  g, params = built(conditional=True)
  rng = jax.random.PRNGKey(7)
  a, a2, b = (g.sample_images(params, rng, 6, label=lab) for lab in (2, 2, 5))
  assert a.shape == (6,) + SHAPE and a.dtype == jnp.float32
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  np.testing.assert_array_equal(a, a2)
  assert float(jnp.abs(a - b).max()) > 1e-3
  per_row = g.sample_images(params, rng, 6, label=np.array([2, 5, 2, 5, 2, 5]))
  np.testing.assert_allclose(per_row[0::2], a[0::2], atol=1e-6)
  np.testing.assert_allclose(per_row[1::2], b[1::2], atol=1e-6)


def test_sample_rows_do_not_depend_on_n_and_truncation_bounds_latents():
  g, params = built()                                  # default labels cycle 0..9, so the first rows agree too
  rng = jax.random.PRNGKey(8)
  np.testing.assert_allclose(g.sample_images(params, rng, 3), g.sample_images(params, rng, 7)[:3], atol=1e-6)
  z = gan.sample_latents(rng, 256, 8, truncation=0.5)
  # N(0, 1) restricted to [-.5, .5]: var = 1 - 2(.5)phi(.5) / (2 Phi(.5) - 1) = 0.0806, std 0.2839 (clipping
  # instead would give std 0.43). 2048 draws: standard error of the std ~0.005.
  assert float(jnp.abs(z).max()) <= 0.5 and abs(float(jnp.std(z)) - 0.2839) < 0.02
  zero = g.sample_images(params, rng, 4, truncation=0.0, label=3)        # z = 0 for every row: one image
  np.testing.assert_allclose(zero, jnp.broadcast_to(zero[:1], zero.shape), atol=1e-6)


def test_sample_options_are_checked():
  gc, pc = built(conditional=True)
  g, params = built(conditional=False, skip_init=True)       # the checks run before the params are used
  with pytest.raises(ValueError, match="truncation"):
    g.sample_images(params, jax.random.PRNGKey(0), 2, temperature=0.5)
  with pytest.raises(ValueError, match="unconditional"):
    g.sample_images(params, jax.random.PRNGKey(0), 2, label=1)
  with pytest.raises(ValueError, match=">= 0"):
    g.sample_images(params, jax.random.PRNGKey(0), 2, truncation=-1.0)
  with pytest.raises(ValueError, match=r"\[0, 9\]"):
    gc.sample_images(pc, jax.random.PRNGKey(0), 2, label=10)


def test_interpolation_grid_ends_at_its_latents():
  g, params = built(conditional=True)
  rng = jax.random.PRNGKey(9)
  grid = g.interpolation_grid(params, rng, rows=3, cols=5, label=4).reshape((3, 5) + SHAPE)
  r0, r1 = jax.random.split(rng)
  lab = jnp.full((3,), 4, jnp.int32)
  start = g._generate_impl(params["gen"], gan.sample_latents(r0, 3, 8), lab)
  end = g._generate_impl(params["gen"], gan.sample_latents(r1, 3, 8), lab)
  np.testing.assert_allclose(grid[:, 0], start, atol=1e-5)
  np.testing.assert_allclose(grid[:, -1], end, atol=1e-5)
  images, cols = gan.interpolation_images(tiny_config(), params, rng, rows=3, cols=5, label=4)  # the Task's
  assert cols == 5
  same, _ = gan.task(tiny_config()).interpolate(params, rng, rows=3, cols=5, label=4)
  np.testing.assert_array_equal(same, images)
  np.testing.assert_allclose(images, grid.reshape(images.shape), atol=1e-6)
  z0, z1 = jnp.array([[3.0, 0.0]]), jnp.array([[0.0, 3.0]])          # slerp keeps the norm of equal-norm ends
  np.testing.assert_allclose(gan.slerp(z0, z1, jnp.array([0.5])), [[3 / math.sqrt(2)] * 2], rtol=1e-5)


# ------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("variant,shape", [("digits", (8, 8, 1)), ("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_every_config_builds_and_traces(variant, shape):
  # Shapes and dtypes only (eval_shape, no compile): the lead's loop tests train every config for real.
  c = gan_configs.get_config(variant)
  assert c.family == "gan" and c.disc_optimizer.learning_rate > 0
  t = gan.make_task(c, shape, 10)
  assert [p.name for p in t.phases] == ["disc", "gen"] and [p.params_key for p in t.phases] == ["disc", "gen"]
  b = {"image": np.full((2,) + shape, 0.5, np.float32), "label": np.array([1, 3], np.int32),
       "example_id": np.arange(2, dtype=np.int32)}
  params = jax.eval_shape(t.init, jax.random.PRNGKey(0), b)
  assert set(params) == {"gen", "disc"}
  for p in t.phases:
    loss, metrics = jax.eval_shape(p.loss_fn, params, b, jax.random.PRNGKey(1), jnp.int32(0))
    assert loss.shape == () and loss.dtype == jnp.float32 and all(m.shape == () for m in metrics.values())
  images = jax.eval_shape(lambda q: t.sample_images(q, jax.random.PRNGKey(2), 3), params)
  assert images.shape == (3,) + shape and images.dtype == jnp.float32
  ev = jax.eval_shape(t.evaluate, params, b, jax.random.PRNGKey(3))
  assert {"d_loss", "g_loss", "d_real_acc", "d_fake_acc"} <= set(ev)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  c = tiny_config(conditional=True)
  c.compute_dtype = "bfloat16"
  t = gan.make_task(c, SHAPE, 10)
  shapes = jax.eval_shape(t.init, jax.random.PRNGKey(0), batch())
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  params = _init_params(True)
  loss, _ = jax.jit(t.phases[1].loss_fn)(params, batch(), jax.random.PRNGKey(1), jnp.int32(0))
  f32_loss, _ = jax.jit(built()[0].gen_loss)(params, batch(), jax.random.PRNGKey(1), jnp.int32(0))
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  np.testing.assert_allclose(loss, f32_loss, rtol=0.05)                 # bf16 activations: ~3 significant digits
  assert t.sample_images(params, jax.random.PRNGKey(2), 2).dtype == jnp.float32


def test_config_errors_name_the_bad_value():
  with pytest.raises(ValueError, match="gen_channels"):
    gan.GAN(gan.gan_config(tiny_config(gen_channels=(8,) * 5)), SHAPE, 10)  # x16 upsampling cannot make 8x8
  with pytest.raises(ValueError, match="unknown variant"):
    gan_configs.get_config("celeba")
  with pytest.raises(ValueError, match="r1_interval"):
    gan.GAN(gan.gan_config(tiny_config(r1_interval=0)), SHAPE, 10)
  with pytest.raises(ValueError, match="lsgan"):
    gan.GAN(gan.gan_config(tiny_config(loss="lsgan")), SHAPE, 10)
  with pytest.raises(ValueError, match="image"):
    gan.GAN(gan.gan_config(tiny_config()), SHAPE, 10)._real({"image": np.zeros((2, 28, 28, 1))}, SHAPE)


def test_the_config_file_declares_every_field_with_the_dataclass_defaults():
  c = base_config()
  gan_configs._gan(c, "digits")
  assert c.model.to_dict() == to_dict(gan.GANConfig())          # one set of fields, one set of defaults
  for variant in gan_configs.VARIANTS:
    cfg = gan.gan_config(gan_configs.get_config(variant))
    assert isinstance(cfg, gan.GANConfig) and isinstance(cfg.gen_channels, tuple)


def test_typed_config_errors_name_the_field_and_the_choices():
  with pytest.raises(ConfigError, match=r"unknown config.model fields \['hidden'\]; valid: .*'latent_dim'"):
    gan.gan_config(tiny_config(hidden=3))
  with pytest.raises(ConfigError, match=r"model.disc_channels=\(\) must be a non-empty tuple"):
    gan.gan_config(tiny_config(disc_channels=()))
  with pytest.raises(ConfigError, match=r"model.r1_gamma=-1.0 .* must be >= 0"):
    gan.gan_config(tiny_config(r1_gamma=-1.0))
  with pytest.raises(ConfigError, match=r"model.conditional needs a labelled dataset, got num_classes=0"):
    gan.GAN(gan.gan_config(tiny_config(conditional=True)), SHAPE, 0)
  with pytest.raises(ConfigError, match=r"compute_dtype='float16' is not one of \['bfloat16', 'float32'\]"):
    gan.GAN(gan.gan_config(tiny_config()), SHAPE, 10, "float16")
  with pytest.raises(TypeError, match="GANConfig"):
    gan.GAN(tiny_config().model, SHAPE, 10)                      # the raw ConfigDict is not accepted
