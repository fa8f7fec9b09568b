"""The shared loop: pjit == pmap, 1 device == 8, resume == no resume, accumulation, NaN stop, errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.train import run
from genjax.train import Phase, Task
from genjax.train.checkpoint import Checkpointer, load_run
from genjax.train.trainer import NonFiniteLossError, train_and_evaluate
from tests.util import flat, tiny_vae_config

# Float32 sums in a different order (8-way pmean vs one global mean) drift by ~1e-7 per step; after 4 Adam steps
# the params agree to well within 1e-5.
TOL = 1e-5


def test_eight_devices_are_simulated():
  assert jax.device_count() == 8


def test_pjit_matches_pmap(tmp_path):
  a = run(tiny_vae_config(parallel="pjit"), str(tmp_path / "pjit"))
  b = run(tiny_vae_config(parallel="pmap"), str(tmp_path / "pmap"))
  assert int(a.step) == int(b.step) == 4
  np.testing.assert_allclose(flat(a.params), flat(b.params), atol=TOL)
  np.testing.assert_allclose(flat(a.ema_params), flat(b.ema_params), atol=TOL)
  assert np.abs(flat(a.params) - flat(run(tiny_vae_config(seed=1), str(tmp_path / "s1")).params)).max() > 1e-3


def test_one_device_matches_eight(tmp_path):
  one = run(tiny_vae_config(**{"mesh.data": 1}), str(tmp_path / "one"))
  eight = run(tiny_vae_config(**{"mesh.data": -1}), str(tmp_path / "eight"))
  assert len(one.params["enc_0"]["kernel"].sharding.device_set) == 1
  assert len(eight.params["enc_0"]["kernel"].sharding.device_set) == 8
  np.testing.assert_allclose(flat(one.params), flat(eight.params), atol=TOL)


def test_fsdp_sharding_matches_replicated(tmp_path):
  fsdp = run(tiny_vae_config(param_sharding="fsdp", **{"mesh.data": 2, "mesh.fsdp": 4}), str(tmp_path / "f"))
  kernel = fsdp.params["dec_hidden"]["kernel"]          # [4, 32]: 32 is divisible by fsdp=4
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  repl = run(tiny_vae_config(), str(tmp_path / "r"))
  np.testing.assert_allclose(flat(fsdp.params), flat(repl.params), atol=TOL)


@pytest.mark.parametrize("parallel", ["pjit", "pmap"])
def test_resume_equals_uninterrupted(tmp_path, parallel):
  straight = run(tiny_vae_config(parallel=parallel, num_train_steps=6), str(tmp_path / "straight"))
  run(tiny_vae_config(parallel=parallel, num_train_steps=2), str(tmp_path / "resumed"))   # "interrupted" at 2
  resumed = run(tiny_vae_config(parallel=parallel, num_train_steps=6), str(tmp_path / "resumed"))
  assert int(resumed.step) == 6
  np.testing.assert_array_equal(flat(resumed.params), flat(straight.params))
  np.testing.assert_array_equal(flat(resumed.opt_states), flat(straight.opt_states))


def test_rerun_of_finished_run_trains_nothing_more(tmp_path):
  first = run(tiny_vae_config(), str(tmp_path))
  again = run(tiny_vae_config(), str(tmp_path))
  np.testing.assert_array_equal(flat(first.params), flat(again.params))


def test_pmap_checkpoint_restores_into_pjit(tmp_path):
  run(tiny_vae_config(parallel="pmap", num_train_steps=2), str(tmp_path))
  resumed = run(tiny_vae_config(parallel="pjit", num_train_steps=6), str(tmp_path))
  straight = run(tiny_vae_config(parallel="pjit", num_train_steps=6), str(tmp_path / "straight"))
  np.testing.assert_allclose(flat(resumed.params), flat(straight.params), atol=TOL)


def test_gradient_accumulation_matches_full_batch(tmp_path):
  full = run(tiny_vae_config(), str(tmp_path / "full"))
  accum = run(tiny_vae_config(grad_accum_steps=2), str(tmp_path / "accum"))
  np.testing.assert_allclose(flat(accum.params), flat(full.params), atol=TOL)


def test_outputs_on_disk_and_load_run(tmp_path):
  c = tiny_vae_config(sample_every_steps=4, eval_every_steps=4)
  state = run(c, str(tmp_path))
  assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "config.json").exists()
  assert (tmp_path / "samples" / "step_0000004.png").exists()
  assert list((tmp_path / "tensorboard").iterdir())
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert any('"eval/elbo_nats"' in line for line in lines) and any('"loss"' in line for line in lines)
  config, params = load_run(str(tmp_path))
  assert config.family == "vae"
  np.testing.assert_array_equal(flat(params), flat(state.ema_params))


def _quadratic_task(nan_from_step: int) -> Task:
  """loss = |w - 3|², turned NaN from `nan_from_step` on (an injected fault)."""
  def init(rng, batch):
    return {"w": jnp.zeros((2,))}

  def loss_fn(params, batch, rng, step):
    loss = jnp.sum((params["w"] - 3.0) ** 2)
    return jnp.where(step >= nan_from_step, jnp.nan, loss), {}

  return Task(init=init, phases=(Phase("q", loss_fn, optax.sgd(0.1)),))


def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path):
  c = tiny_vae_config(num_train_steps=10, log_every_steps=1, checkpoint_every_steps=2)
  with pytest.raises(NonFiniteLossError, match="step 6"):
    train_and_evaluate(c, str(tmp_path), _quadratic_task(nan_from_step=5))   # update 6 sees step index 5
  ckpt = Checkpointer(str(tmp_path))
  assert ckpt.all_steps()[-1] == 4
  _, tree, _, _ = ckpt.restore_latest()
  assert np.all(np.isfinite(tree["params"]["w"]))


def test_quadratic_converges_through_the_loop(tmp_path):
  c = tiny_vae_config(num_train_steps=50, log_every_steps=10, checkpoint_every_steps=50)
  state = train_and_evaluate(c, str(tmp_path), _quadratic_task(nan_from_step=10**9))
  np.testing.assert_allclose(np.asarray(state.params["w"]), 3.0, atol=1e-3)   # SGD(0.1) contracts by 0.8/step


@pytest.mark.parametrize("override, message", [
    (dict(parallel="pmapp"), "parallel='pmapp' is not one of"),
    (dict(batch_size=12), "batch_size=12 must be divisible by data×fsdp=8"),
    (dict(**{"mesh.data": 3, "mesh.fsdp": -1}), r"mesh=.* does not divide 8 devices"),
    (dict(**{"mesh.data": 16}), r"mesh=.* needs 16 devices, have 8"),
    (dict(**{"dataset.name": "mnst"}), "unknown data set 'mnst'; available"),
    (dict(**{"dataset.train_split": "validation"}), "has no split 'validation'; splits"),
    (dict(**{"model.likelihood": "poisson"}), "model.likelihood='poisson' is not one of"),
    (dict(**{"optimizer.name": "adamax"}), "optimizer.name='adamax' is not one of"),
    (dict(param_sharding="zero3"), "param_sharding='zero3' is not one of"),
    (dict(num_train_steps=0), "num_train_steps=0 must be >= 1"),
])
def test_bad_config_values_give_one_clear_error(tmp_path, override, message):
  with pytest.raises(ValueError, match=message):
    run(tiny_vae_config(**override), str(tmp_path))


def test_other_family_in_workdir_is_refused(tmp_path):
  run(tiny_vae_config(num_train_steps=1), str(tmp_path))
  c = tiny_vae_config()
  c.family = "gan"
  with pytest.raises(ValueError, match="holds a 'vae' run"):
    train_and_evaluate(c, str(tmp_path), _quadratic_task(10))


def _tiny_gan_config(**overrides):
  """The digits GAN (two phases, lazy R1) shrunk; SGD so the comparison is not dominated by Adam's first steps,
  which move near-zero-gradient weights by ±lr whatever the rounding of the gradient."""
  from experiments.configs import gan as gan_configs
  c = gan_configs.get_config("digits")
  c.model.update(latent_dim=4, gen_channels=(8, 8, 8), disc_channels=(8, 8, 8), disc_features=8, r1_interval=2)
  c.update(batch_size=16, num_train_steps=4, log_every_steps=2, checkpoint_every_steps=2, eval_every_steps=-1,
           sample_every_steps=-1, async_checkpointing=False)
  c.optimizer.update(name="sgd", b1=0.0, learning_rate=0.05)
  c.disc_optimizer.update(name="sgd", b1=0.0, learning_rate=0.05)
  c.update(overrides)
  return c


def test_gan_two_phases_pjit_matches_pmap_and_resume_is_exact(tmp_path):
  pjit = run(_tiny_gan_config(), str(tmp_path / "pjit"))
  pmap = run(_tiny_gan_config(parallel="pmap"), str(tmp_path / "pmap"))
  for part in ("gen", "disc"):
    np.testing.assert_allclose(flat(pjit.params[part]), flat(pmap.params[part]), atol=TOL)
  run(_tiny_gan_config(num_train_steps=2), str(tmp_path / "resumed"))
  resumed = run(_tiny_gan_config(), str(tmp_path / "resumed"))
  np.testing.assert_array_equal(flat(resumed.params), flat(pjit.params))
