"""Tests for the diffusion family (genjax.models.diffusion, genjax.models.unet) and experiments/configs/ddpm.py.

The loss is checked against its formula with hand-computed targets (alpha-bars recomputed here in float64 from the
betas), the eps / v / x0 targets against the sampler library's conversions, the U-Net's shapes and conditioning,
every config at tiny size, the typed model config (DiffusionConfig: defaults as ddpm.py declares them, bad values
named), the sampling options (validation, no recompiles for runtime options), and latent diffusion: building the
task reads nothing, init checks and copies the VAE run, and a latent run samples and evaluates after its VAE run is
deleted (real one- and two-step runs of tiny configs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import ddpm as ddpm_configs
from genjax.compiles import CompileCounter
from genjax.errors import ConfigError, WorkdirError
from genjax.models import diffusion, get_task
from genjax.models.unet import UNet, timestep_embedding
from genjax.samplers.schedules import NoiseSchedule


def _random_like(abstract, seed=0, scale=0.1):
  """Random N(0, scale^2) arrays shaped like `abstract` (from jax.eval_shape), made on the host.

  Real initialisation compiles ~150 threefry initialisers (~20 s of CPU for a tiny U-Net); these tests need only
  params with informative outputs (the real init zeroes the output conv, so it predicts exactly 0).
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), abstract)


def _unet_params(task, seed=0, scale=0.05, **extra):
  abstract = jax.eval_shape(task.init, jax.random.key(0), None)
  return {"unet": _random_like(abstract["unet"], seed, scale), **extra}




def tiny_config(variant):
  c = ddpm_configs.get_config(variant)
  c.model.update(ch=8, num_res_blocks=1, num_heads=2, norm_groups=4, num_timesteps=50, num_sample_steps=3)
  if c.model.space == "latent":
    c.model.vae.update(TINY_VAE)
  c.num_train_steps = 2
  c.batch_size = 4
  return c


# ------------------------------------------------------------------------------------------------ U-Net
@pytest.mark.parametrize("shape,ch_mult,attn", [((8, 8, 1), (1, 2), (4,)), ((28, 28, 1), (1, 2, 2), (7,))])
@pytest.mark.parametrize("conditional", [False, True])
def test_unet_output_shape_equals_input_shape(shape, ch_mult, attn, conditional):
  """Shapes by tracing (jax.eval_shape: no compile); 28 -> 14 -> 7 -> 14 -> 28 needs exact-size upsampling."""
  net = UNet(ch=8, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=attn, num_heads=2, norm_groups=4,
             num_classes=10 if conditional else 0)
  x = jax.ShapeDtypeStruct((3,) + shape, jnp.float32)
  t = jax.ShapeDtypeStruct((3,), jnp.int32)
  label = jax.ShapeDtypeStruct((3,), jnp.int32) if conditional else None
  variables = jax.eval_shape(net.init, jax.random.key(1), x, t, label)
  out = jax.eval_shape(net.apply, variables, x, t, label)
  assert out.shape == x.shape and out.dtype == jnp.float32
  if conditional:  # label=None (the null label) is valid for a conditional net too
    assert jax.eval_shape(net.apply, variables, x, t, None).shape == x.shape


def test_conditional_output_changes_with_label_and_none_is_the_null_label():
  net = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_heads=2, norm_groups=4,
             num_classes=10)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  t = jnp.array([100, 100, 100, 600], jnp.int32)
  apply = jax.jit(net.apply)
  variables = _random_like(jax.eval_shape(net.init, jax.random.key(1), x, t, jnp.zeros(4, jnp.int32)))
  # Rows 0-2 share x and t and differ in the label; the null label (10) is what label=None means.
  out = apply(variables, x.at[1:3].set(x[0]), t, jnp.array([3, 7, 10, 10], jnp.int32))
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  assert float(jnp.max(jnp.abs(out[0] - out[1]))) > 1e-3
  assert float(jnp.max(jnp.abs(out[0] - out[2]))) > 1e-3
  unconditional = apply(variables, x.at[1:3].set(x[0]), t, None)
  np.testing.assert_allclose(unconditional[2:], out[2:], rtol=1e-5, atol=1e-6)
  # The time embedding matters too: the same x and label at another t gives another output.
  moved = apply(variables, x, t.at[0].set(900), jnp.array([3, 7, 10, 10], jnp.int32))
  assert float(jnp.max(jnp.abs(moved[0] - out[0]))) > 1e-3


def test_unet_rejects_bad_inputs():
  net = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), norm_groups=4)
  x = jnp.zeros((2, 8, 8, 1))
  with pytest.raises(ValueError, match="unconditional"):
    jax.eval_shape(net.init, jax.random.key(0), x, jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="one timestep per example"):
    jax.eval_shape(net.init, jax.random.key(0), x, jnp.zeros(3, jnp.int32))


def test_timestep_embedding_values():
  # dim 4: frequencies exp(-log(1e4) * [0, 1] / 2) = [1, 0.01]; emb(t) = [sin t, sin .01t, cos t, cos .01t].
  emb = timestep_embedding(jnp.array([0, 2]), 4)
  expected = np.array([[0, 0, 1, 1], [np.sin(2), np.sin(0.02), np.cos(2), np.cos(0.02)]])
  np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ loss
def _abar_linear_f64(T, beta_start, beta_end):
  return np.cumprod(1.0 - np.linspace(beta_start, beta_end, T, dtype=np.float64))


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_loss_of_zero_model_is_mean_squared_target(prediction):
  sched = NoiseSchedule.linear(1000, 1e-4, 0.02)
  abar = _abar_linear_f64(1000, 1e-4, 0.02)
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (5, 4, 4, 2)).astype(np.float32)
  noise = rng.standard_normal((5, 4, 4, 2)).astype(np.float32)
  t = np.array([0, 1, 250, 800, 999], np.int32)
  zero_model = lambda x_t, t, label, r: jnp.zeros_like(x_t)
  loss, _ = diffusion.diffusion_loss(zero_model, sched, x0, jax.random.key(0), prediction=prediction, t=t,
                                     noise=noise)
  a = np.sqrt(abar[t])[:, None, None, None]
  s = np.sqrt(1.0 - abar[t])[:, None, None, None]
  target = {"epsilon": noise, "x0": x0, "v": a * noise - s * x0}[prediction]
  np.testing.assert_allclose(float(loss), np.mean(target.astype(np.float64) ** 2), rtol=1e-5)


def test_loss_sees_the_noised_input_and_is_zero_for_the_oracle():
  """A model returning (x_t - sqrt(abar) x0) / sqrt(1 - abar) — the true noise — has zero epsilon loss."""
  sched = NoiseSchedule.cosine(100)
  rng = np.random.default_rng(1)
  x0 = rng.uniform(-1, 1, (6, 3, 3, 1)).astype(np.float32)
  t = np.arange(0, 96, 16, dtype=np.int32)
  oracle = lambda x_t, tt, label, r: sched.eps_from_x0(x0, x_t, tt)
  loss, _ = diffusion.diffusion_loss(oracle, sched, x0, jax.random.key(3), prediction="epsilon", t=t)
  assert float(loss) < 1e-6
  # The same model is wrong by the whole target when asked for x0: loss = mean((eps - x0)^2) > 0.
  loss_x0, _ = diffusion.diffusion_loss(oracle, sched, x0, jax.random.key(3), prediction="x0", t=t)
  assert float(loss_x0) > 0.1


def test_label_dropout_rate():
  """x0 = 0 with an "x0" target and a model that outputs 1 exactly when it sees the null label: loss = drop rate."""
  sched = NoiseSchedule.linear(10)
  n, null = 4000, 10
  x0 = np.zeros((n, 1, 1, 1), np.float32)
  labels = jnp.asarray(np.arange(n) % 10, jnp.int32)
  saw_null = lambda x_t, t, label, r: jnp.broadcast_to((label == null)[:, None, None, None], x_t.shape) * 1.0
  rates = [float(diffusion.diffusion_loss(saw_null, sched, x0, jax.random.key(4), prediction="x0", label=labels,
                                          null_label=null, label_dropout=p)[0]) for p in (0.0, 0.3)]
  assert rates[0] == 0.0
  assert abs(rates[1] - 0.3) < 0.03  # binomial std sqrt(.3 * .7 / 4000) = 0.007; 4 sigma


def test_loss_draws_per_example_so_the_batch_layout_does_not_matter():
  """pjit sees the global batch, pmap a shard per device; with example ids every example draws the same t, noise,
  label drop and dropout mask either way, so the loss of the whole batch is the mean of the shards' losses."""
  config = tiny_config("digits")
  config.model.update(ch_mult=(1,), attn_resolutions=(), dropout=0.5)
  task = diffusion.task(config)
  params = _unet_params(task, scale=0.2)
  rng = np.random.default_rng(3)
  batch = {"image": jnp.asarray(rng.uniform(0, 1, (4, 8, 8, 1)), jnp.float32),
           "label": jnp.arange(4, dtype=jnp.int32), "example_id": jnp.arange(4, dtype=jnp.int32)}
  loss_fn = jax.jit(task.phases[0].loss_fn)
  key = jax.random.key(7)
  whole = float(loss_fn(params, batch, key, 0)[0])
  halves = [float(loss_fn(params, jax.tree.map(lambda x: x[sl], batch), key, 0)[0])
            for sl in (slice(0, 2), slice(2, 4))]
  np.testing.assert_allclose(whole, np.mean(halves), rtol=1e-5)
  # ... and the draws do depend on the key (a test that could fail).
  assert abs(float(loss_fn(params, batch, jax.random.key(8), 0)[0]) - whole) > 1e-4


@pytest.mark.parametrize("source", ["epsilon", "v", "x0"])
@pytest.mark.parametrize("dest", ["epsilon", "v", "x0"])
def test_training_targets_round_trip_through_sampler_conversions(source, dest):
  sched = NoiseSchedule.cosine(1000)
  rng = np.random.default_rng(2)
  x0 = rng.uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.array([5, 300, 600, 900], np.int32)  # away from t -> T where x0 = (x_t - sigma eps) / alpha amplifies
  x_t = sched.add_noise(x0, noise, t)
  converted = sched.convert_prediction(sched.training_target(x0, noise, t, source), x_t, t, source, dest)
  np.testing.assert_allclose(converted, sched.training_target(x0, noise, t, dest), atol=2e-4)
  x0_hat, eps_hat = sched.split_prediction(sched.training_target(x0, noise, t, source), x_t, t, source)
  np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
  np.testing.assert_allclose(eps_hat, noise, atol=2e-4)


# ------------------------------------------------------------------------------------------------ configs
TINY_VAE = dict(latent_dim=4, channels=(8,), hidden=16)


def _fake_vae_run(monkeypatch, scale=0.7):
  """Stands in for the VAE run a latent config names: random params of its (tiny) architecture, read through
  `load_vae_run` (nothing on disk)."""
  from experiments.configs import vae as vae_configs
  from genjax.models import diffusion_space
  from genjax.models.vae import VAEConfig
  cfg = VAEConfig(**{**vae_configs.get_config("digits").model, **TINY_VAE})
  params = _random_like(diffusion_space.vae_param_shapes(cfg, (8, 8, 1)), seed=5, scale=0.3)
  monkeypatch.setattr(diffusion_space, "load_vae_run", lambda vae_cfg, image_shape, source: (params, scale))


@pytest.mark.parametrize("variant", sorted(ddpm_configs.VARIANTS))
def test_every_config_builds_and_evaluates_its_loss(variant, monkeypatch):
  from genjax.data import dataset_info
  if variant == "latent_digits":
    _fake_vae_run(monkeypatch)
  config = tiny_config(variant)
  assert config.family == "diffusion"
  task = get_task(config)
  info = dataset_info(config.dataset.name)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.uniform(0, 1, (4,) + info.image_shape), jnp.float32),
           "label": jnp.asarray(rng.integers(0, info.num_classes, 4), jnp.int32)}
  abstract = jax.eval_shape(task.init, jax.random.key(0), batch)
  params = _unet_params(task, **{k: _random_like(v, scale=0.3) for k, v in abstract.items() if k != "unet"})
  assert set(params) == ({"unet", "vae", "latent_scale"} if variant == "latent_digits" else {"unet"})
  loss, metrics = jax.jit(task.phases[0].loss_fn)(params, batch, jax.random.key(1), jnp.int32(0))
  # Target eps: its mean square is near 1 (a 4-example batch); small random params predict small values.
  assert 0.3 < float(metrics["target_mse"]) < 3.0
  assert np.isfinite(float(loss)) and abs(float(loss) - float(metrics["target_mse"])) < 1.0
  evaluated = jax.eval_shape(task.evaluate, params, batch, jax.random.key(2))
  assert "loss" in evaluated and evaluated["loss"].shape == ()


def test_model_config_declares_every_field_with_the_dataclass_defaults():
  """experiments/configs/ddpm.py and DiffusionConfig hold the same fields and defaults (the VAE section is the
  one of vae.py:digits, which latent_digits reads)."""
  from experiments.configs import vae as vae_configs
  from genjax.models.fields import from_config, to_dict
  declared = ddpm_configs.get_config("mnist").model.to_dict()   # mnist changes only U-Net and sampling fields
  defaults = to_dict(diffusion.DiffusionConfig())
  assert set(declared) == set(defaults)
  changed = {"ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "num_sample_steps", "guidance", "vae"}
  assert {k: v for k, v in declared.items() if k not in changed} == \
      {k: v for k, v in defaults.items() if k not in changed}
  assert declared["vae"] == vae_configs.get_config("digits").model.to_dict()
  for variant in ddpm_configs.VARIANTS:
    cfg = from_config(diffusion.DiffusionConfig, ddpm_configs.get_config(variant).model).check()
    assert cfg.space == ("latent" if variant == "latent_digits" else "pixel")
    assert cfg.vae.latent_dim == vae_configs.get_config("digits").model.latent_dim


@pytest.mark.parametrize("field,value,match", [
    ("space", "lattice", r"config.model.space='lattice' is not one of \['pixel', 'latent'\]"),
    ("label_dropout", 1.0, r"config.model.label_dropout=1.0 must be in \[0.0, 1.0\)"),
    ("flow_shift", 0.0, r"config.model.flow_shift=0.0 must be > 0"),
    ("cosine_s", -1.0, r"config.model.cosine_s=-1.0 must be > 0"),
    ("ch_mult", (), r"config.model.ch_mult=\(\) must be a non-empty tuple"),
    ("latent_scale", -1.0, r"config.model.latent_scale=-1.0 must be >= 0"),
    ("colour", 3, r"unknown config.model fields \['colour'\]"),
])
def test_bad_model_fields_are_named(field, value, match):
  config = tiny_config("digits")
  with config.unlocked():
    config.model[field] = value
  with pytest.raises(ConfigError, match=match):
    diffusion.task(config)


def test_flow_config_names_its_samplers_and_prediction():
  config = tiny_config("flow_digits")
  config.model.sampler = "ddim"
  with pytest.raises(ConfigError, match=r"config.model.sampler='ddim' is not one of \['euler', 'heun', 'midpoint'\]"):
    diffusion.task(config)
  config = tiny_config("flow_digits")
  config.model.prediction = "epsilon"
  with pytest.raises(ConfigError, match="prediction='velocity'"):
    diffusion.task(config)
  flow, pixels = diffusion.task(tiny_config("flow_digits")), diffusion.task(tiny_config("digits"))
  assert flow.samplers == diffusion.FLOW_METHODS == ("euler", "heun", "midpoint")   # what a steps sweep may ask for
  assert pixels.samplers == diffusion.SAMPLERS and pixels.edit is pixels.sample_images   # editing: the same sampler


def test_latent_config_needs_a_vae_workdir_and_a_valid_vae():
  config = tiny_config("latent_digits")
  config.model.vae_workdir = ""
  with pytest.raises(ConfigError, match="config.model.vae_workdir is empty"):
    diffusion.task(config)
  config = tiny_config("latent_digits")
  config.model.vae.likelihood = "poisson"
  with pytest.raises(ConfigError, match="likelihood='poisson'"):
    diffusion.task(config)


def _latent_params(config, scale=2.0):
  """Random params of a latent config's U-Net and VAE, shaped from the config alone (no init, nothing read)."""
  from genjax.models import diffusion_space
  cfg = diffusion.model_config(config)
  d, i32 = cfg.vae.latent_dim, jax.ShapeDtypeStruct((1,), jnp.int32)
  unet = jax.eval_shape(diffusion.make_unet(cfg, 10).init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, 1, 1, d), jnp.float32), i32, i32)
  return {"unet": _random_like(unet, scale=0.05), "latent_scale": jnp.float32(scale),
          "vae": _random_like(diffusion_space.vae_param_shapes(cfg.vae, (8, 8, 1)), seed=5, scale=0.3)}


def test_building_a_latent_task_reads_nothing(tmp_path):
  """The VAE architecture comes from config.model.vae: with no VAE run anywhere the task builds and samples from
  params alone; only init (its first trace) reads the run."""
  config = tiny_config("latent_digits")
  config.model.vae_workdir = str(tmp_path / "no_such_run")
  task = get_task(config)
  out = task.sample_images(_latent_params(config), jax.random.key(1), 2, num_steps=2)
  assert out.shape == (2, 8, 8, 1) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  with pytest.raises(WorkdirError, match=r"vae_workdir='.*no_such_run' holds no VAE run \(config.json is missing\)"):
    jax.eval_shape(task.init, jax.random.key(0), None)


# ------------------------------------------------------------------------------------------------ sampling
@pytest.fixture(scope="module")
def digits_task():
  config = tiny_config("digits")
  task = diffusion.task(config)
  return task, _unet_params(task)


def test_sample_images_shape_range_and_label(digits_task):
  task, params = digits_task
  out = task.sample_images(params, jax.random.key(2), 6, guidance=2.0)  # the program the next test reuses
  assert out.shape == (6, 8, 8, 1) and out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  same = task.sample_images(params, jax.random.key(2), 6, guidance=2.0)
  np.testing.assert_array_equal(out, same)
  other = task.sample_images(params, jax.random.key(2), 6, guidance=2.0, label=3)
  assert float(jnp.max(jnp.abs(other - out))) > 1e-4
  np.testing.assert_array_equal(other[3], out[3])  # row 3 was already label 3 (labels cycle 0..9 by default)


def test_runtime_options_compile_nothing_new(digits_task):
  task, params = digits_task
  rng = jax.random.key(3)
  task.sample_images(params, rng, 6, sampler="ddim", guidance=2.0).block_until_ready()   # warm up
  task.sample_images(params, rng, 6, sampler="ddpm").block_until_ready()
  with CompileCounter() as compiles:
    task.sample_images(params, rng, 6, sampler="ddim", num_steps=5, eta=0.5, guidance=3.0, label=7)
    task.sample_images(params, rng, 6, sampler="ddim", num_steps=2, eta=0.0, guidance=0.5, label=1)
    task.sample_images(params, rng, 6, sampler="ddpm", num_steps=4, label=2).block_until_ready()
  assert compiles.count == 0, f"{compiles.count} new compilations"


@pytest.mark.parametrize("options,match", [
    (dict(temperature=1.0), "unknown diffusion sample options \\['temperature'\\]"),
    (dict(sampler="plms"), "unknown sampler 'plms'"),
    (dict(num_steps=0), "num_steps must be an int in \\[1, 50\\]"),
    (dict(num_steps=51), "num_steps"),
    (dict(eta=0.5, sampler="dpm_solver"), "eta=0.5 applies only to sampler='ddim'"),
    (dict(eta=1.5), "eta must be in"),
    (dict(guidance=-1.0), "guidance must be"),
    (dict(label=11), "label must be None"),
])
def test_bad_sample_options_name_the_valid_choices(digits_task, options, match):
  task, params = digits_task
  with pytest.raises(ValueError, match=match):
    task.sample_images(params, jax.random.key(0), 2, **options)


def test_unconditional_model_rejects_label_and_guidance():
  config = tiny_config("digits")
  config.model.conditional = False
  task = diffusion.task(config)
  params = jax.eval_shape(task.init, jax.random.key(0), None)
  with pytest.raises(ValueError, match="class-conditional"):
    task.sample_images(params, jax.random.key(0), 2, label=1)
  with pytest.raises(ValueError, match="class-conditional"):
    task.sample_images(params, jax.random.key(0), 2, guidance=3.0)


def test_bad_config_values_name_the_choices():
  for field, value, match in [("schedule", "sigmoid", "linear"), ("prediction", "score", "epsilon"),
                              ("sampler", "plms", "ddim")]:
    config = tiny_config("digits")
    config.model[field] = value
    with pytest.raises(ValueError, match=match):
      diffusion.task(config)


# ------------------------------------------------------------------------------------------------ latent runs
@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
  """A one-step `vae.py:tiny` run on one device (no eval, no samples): the VAE a latent config starts from."""
  from genjax.train.trainer import train_and_evaluate
  from tests.util import tiny_vae_config
  config = tiny_vae_config(num_train_steps=1, eval_every_steps=-1, sample_every_steps=-1, **{"mesh.data": 1})
  workdir = str(tmp_path_factory.mktemp("vae"))
  state = train_and_evaluate(config, workdir, get_task)
  return config, workdir, jax.device_get(state.ema_params)   # the params a checkpoint reader gets


def _tiny_latent_config(vae_config, vae_workdir):
  c = tiny_config("latent_digits")
  c.model.update(ch_mult=(1,), vae_workdir=vae_workdir)
  c.model.vae = vae_config.model.copy_and_resolve_references()
  c.update(dict(batch_size=8, num_train_steps=1, eval_every_steps=-1, sample_every_steps=-1, log_every_steps=1,
                checkpoint_every_steps=1, async_checkpointing=False))
  c.mesh.data = 1   # one device: the loop's programs compile once, not for 8 simulated devices
  return c


def test_latent_run_samples_and_evaluates_after_its_vae_run_is_deleted(vae_run, tmp_path):
  """Init copies the VAE params and the measured latent scale into the run's params; once the run has a
  checkpoint, the VAE run can go: the stored config builds the task again and the checkpoint samples and
  evaluates."""
  import shutil
  from genjax.data import load_arrays
  from genjax.models.vae import vae_model
  from genjax.core.checkpoint import load_run
  from genjax.train.trainer import train_and_evaluate
  from tests.util import flat
  vae_config, vae_workdir, vae_params = vae_run
  copy = shutil.copytree(vae_workdir, str(tmp_path / "vae"))
  train_and_evaluate(_tiny_latent_config(vae_config, copy), str(tmp_path / "ldm"), get_task)
  shutil.rmtree(copy)
  stored, params = load_run(str(tmp_path / "ldm"))    # the EMA of frozen params is those params (up to rounding)
  task = get_task(stored)
  np.testing.assert_allclose(flat(params["vae"]), flat(vae_params), rtol=1e-6, atol=1e-7)
  images = load_arrays("digits", "train")["image"]
  std = jax.jit(lambda p, x: jnp.std(vae_model(vae_config).apply({"params": p}, x, method="encode")[0]))
  # latent_scale 0 in the config = 1 / std of the encoder means over the training split (all 1,500 images).
  np.testing.assert_allclose(float(params["latent_scale"]) * float(std(vae_params, images)), 1.0, rtol=1e-4)
  out = task.sample_images(params, jax.random.key(1), 4, num_steps=2)
  assert out.shape == (4, 8, 8, 1) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  batch = {"image": jnp.asarray(images[:4]), "label": jnp.arange(4, dtype=jnp.int32)}
  assert np.isfinite(float(jax.jit(task.evaluate)(params, batch, jax.random.key(2))["loss"]))
  # Resuming training reads nothing either: the loop's abstract evaluation traces the task's shape_init.
  longer = stored.copy_and_resolve_references()
  longer.num_train_steps = 2
  assert int(train_and_evaluate(longer, str(tmp_path / "ldm"), get_task).step) == 2


def test_init_checks_the_vae_run_against_config_model_vae(tmp_path):
  """The check reads the run's config.json only (it comes before the params), so a config file is run enough."""
  from genjax.core.checkpoint import save_config
  from tests.util import tiny_vae_config
  vae_config = tiny_vae_config()
  for name in ("vae", "ddpm"):
    (tmp_path / name).mkdir()
  save_config(str(tmp_path / "vae"), vae_config)
  config = _tiny_latent_config(vae_config, str(tmp_path / "vae"))
  config.model.vae.update(dict(latent_dim=5, hidden=64))
  task = get_task(config)    # builds: nothing is read yet
  with pytest.raises(ConfigError, match=r"in \['latent_dim', 'hidden'\]: the run has latent_dim=4, hidden=32, "
                                        r"this config latent_dim=5, hidden=64"):
    jax.eval_shape(task.init, jax.random.key(0), None)
  config.dataset.name = "mnist"   # the VAE run's digits are 8x8x1
  config.model.vae.update(dict(latent_dim=4, hidden=32))
  with pytest.raises(ConfigError, match=r"models 'digits' images of shape \(8, 8, 1\); this config's data set has "
                                        r"\(28, 28, 1\)"):
    jax.eval_shape(get_task(config).init, jax.random.key(0), None)
  save_config(str(tmp_path / "ddpm"), tiny_config("digits"))   # a diffusion run's config.json
  config = _tiny_latent_config(vae_config, str(tmp_path / "ddpm"))
  with pytest.raises(ConfigError, match="is a 'diffusion' run, not a 'vae' run"):
    jax.eval_shape(get_task(config).init, jax.random.key(0), None)
