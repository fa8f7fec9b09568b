"""The shared loop: pjit == pmap, 1 device == 8, resume == no resume, accumulation, NaN stop, errors."""
from __future__ import annotations

import json
import logging
import os
import signal
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.train import run
from genjax.errors import WorkdirError
from genjax.models import get_task
from genjax.core import Phase, Task
from genjax.core.checkpoint import Checkpointer, load_run
from genjax.train.preemption import Interrupted, StopSignals
from genjax.train.report import Progress, log_line
from genjax.train.step import init_state, make_train_step
from genjax.train.trainer import NonFiniteLossError, train_and_evaluate
from tests.util import tiny_vae_config

# Float32 sums in a different order (8-way pmean vs one global mean) drift by ~1e-7 per step; after 4 Adam steps
# the params agree to well within 1e-5.
TOL = 1e-5


def test_eight_devices_are_simulated():
  assert jax.device_count() == 8


@pytest.fixture(scope="module")
def pjit_run(tmp_path_factory):
  """The default tiny run (pjit, params replicated over 8 devices, 4 steps): the reference of the equality tests."""
  return run(tiny_vae_config(), str(tmp_path_factory.mktemp("pjit")))


def test_pjit_matches_pmap(tmp_path, pjit_run):
  a = pjit_run
  b = run(tiny_vae_config(parallel="pmap"), str(tmp_path / "pmap"))
  assert int(a.step) == int(b.step) == 4
  chex.assert_trees_all_close(a.params, b.params, atol=TOL, rtol=0)
  chex.assert_trees_all_close(a.ema_params, b.ema_params, atol=TOL, rtol=0)
  with pytest.raises(AssertionError):              # another seed: some parameter differs by more than 1e-3
    chex.assert_trees_all_close(a.params, run(tiny_vae_config(seed=1), str(tmp_path / "s1")).params, atol=1e-3, rtol=0)


def test_one_device_matches_eight(tmp_path, pjit_run):
  one = run(tiny_vae_config(**{"mesh.data": 1}), str(tmp_path / "one"))
  eight = pjit_run                                          # mesh.data=-1: all 8 devices
  assert len(one.params["enc_0"]["kernel"].sharding.device_set) == 1
  assert len(eight.params["enc_0"]["kernel"].sharding.device_set) == 8
  chex.assert_trees_all_close(one.params, eight.params, atol=TOL, rtol=0)


def test_fsdp_sharding_matches_replicated(tmp_path, pjit_run):
  fsdp = run(tiny_vae_config(param_sharding="fsdp", **{"mesh.data": 2, "mesh.fsdp": 4}), str(tmp_path / "f"))
  kernel = fsdp.params["dec_hidden"]["kernel"]          # [4, 32]: 32 is divisible by fsdp=4
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  chex.assert_trees_all_close(fsdp.params, pjit_run.params, atol=TOL, rtol=0)


@pytest.mark.parametrize("parallel", ["pjit", "pmap"])
def test_resume_equals_uninterrupted(tmp_path, parallel):
  straight = run(tiny_vae_config(parallel=parallel, num_train_steps=6), str(tmp_path / "straight"))
  run(tiny_vae_config(parallel=parallel, num_train_steps=2), str(tmp_path / "resumed"))   # "interrupted" at 2
  resumed = run(tiny_vae_config(parallel=parallel, num_train_steps=6), str(tmp_path / "resumed"))
  assert int(resumed.step) == 6
  chex.assert_trees_all_equal(resumed.params, straight.params)
  chex.assert_trees_all_equal(resumed.opt_states, straight.opt_states)


def test_rerun_of_finished_run_trains_nothing_more(tmp_path):
  first = run(tiny_vae_config(), str(tmp_path))
  again = run(tiny_vae_config(), str(tmp_path))
  chex.assert_trees_all_equal(first.params, again.params)


def test_compilation_cache_dir_keeps_the_compiled_train_step(tmp_path):
  cache = tmp_path / "xla_cache"
  try:
    run(tiny_vae_config(num_train_steps=1, compilation_cache_dir=str(cache)), str(tmp_path / "run"))
  finally:
    jax.config.update("jax_compilation_cache_dir", None)      # this process's later tests compile as before
  assert any(name.startswith("jit_step_fn") for name in os.listdir(cache)), os.listdir(cache)


def test_gradient_accumulation_matches_full_batch(tmp_path, pjit_run):
  accum = run(tiny_vae_config(grad_accum_steps=2), str(tmp_path / "accum"))
  chex.assert_trees_all_close(accum.params, pjit_run.params, atol=TOL, rtol=0)


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
  chex.assert_trees_all_equal(params, state.ema_params)


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


def test_train_step_names_a_batch_field_with_other_rows():
  task = _quadratic_task(nan_from_step=10**9)
  state = init_state(task, jax.random.PRNGKey(0), {}, ema_decay=0.0)
  step_fn = make_train_step(task, ema_decay=0.0)
  batch = {"image": jnp.zeros((4, 2)), "label": jnp.zeros((3,), jnp.int32)}
  with pytest.raises(AssertionError, match=r"'label' has a shape prefix different from expected: \(3,\) != \(4,\)"):
    jax.eval_shape(step_fn, state, batch)
  jax.eval_shape(step_fn, state, {**batch, "label": jnp.zeros((4,), jnp.int32)})


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
  assert set(pjit.params) == {"gen", "disc"}
  chex.assert_trees_all_close(pjit.params, pmap.params, atol=TOL, rtol=0)
  run(_tiny_gan_config(num_train_steps=2), str(tmp_path / "resumed"))
  resumed = run(_tiny_gan_config(), str(tmp_path / "resumed"))
  chex.assert_trees_all_equal(resumed.params, pjit.params)


# ---- signals, hooks, what the log says ---------------------------------------------------------------------------

def _records(workdir) -> list[dict]:
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_sigint_saves_the_step_and_a_crash_rerun_logs_every_step_once(tmp_path):
  """Ctrl-C (a SIGINT sent from the "log" hook at step 3) → checkpoint at 3, Interrupted with exit code 130. Then a
  crash after step 5 was logged (last checkpoint 4) and a rerun from 4: metrics.jsonl holds every step once."""
  workdir, events = str(tmp_path), []

  def hook(event, step, info):
    events.append((event, step))
    if event == "log" and step == 3:
      os.kill(os.getpid(), signal.SIGINT)

  c = tiny_vae_config(num_train_steps=6, log_every_steps=1, checkpoint_every_steps=4)
  with pytest.raises(Interrupted, match="SIGINT: saved a checkpoint at step 3") as stopped:
    train_and_evaluate(c, workdir, get_task, hooks=(hook,))
  assert stopped.value.exit_code == 130 and stopped.value.step == 3
  assert Checkpointer(workdir).all_steps() == [3]
  assert [e for e in events if e[0] != "log"] == [("checkpoint", 3)] and signal.getsignal(signal.SIGINT) is \
      signal.default_int_handler                              # the handler is undone after the run

  def crash(event, step, info):
    if event == "log" and step == 5:
      raise RuntimeError("crash (injected) after step 5 was logged")
  with pytest.raises(RuntimeError, match="crash"):
    train_and_evaluate(c, workdir, get_task, hooks=(crash,))
  assert max(r["step"] for r in _records(workdir)) == 5 and Checkpointer(workdir).all_steps()[-1] == 4
  train_and_evaluate(c, workdir, get_task)
  records = [r for r in _records(workdir) if "loss" in r]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert all(r["time"] > 1.7e9 for r in records)             # Unix wall time (after 2023)
  assert not os.path.exists(os.path.join(workdir, ".lock"))  # removed on a clean exit


def test_second_sigint_exits_at_once(monkeypatch):
  exits = []
  monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
  stop = StopSignals()
  stop._on_signal(signal.SIGINT, None)
  assert exits == [] and stop.should_stop(1)
  stop._on_signal(signal.SIGINT, None)
  assert exits == [130]


def test_log_line_is_at_most_120_columns_and_keeps_losses_and_rates():
  metrics = {f"{p}/{k}": 1.23456 for p in ("disc", "gen") for k in ("loss", "grad_norm", "r1_penalty", "real_score",
                                                                     "fake_score", "accuracy")}
  metrics.update(lr=2e-4, finite=1.0)
  rates = {"steps_per_second": 12.5, "examples_per_second": 800.0, "mfu": 0.41, "eta_seconds": 130.0}
  line = log_line(100, 2000, metrics, rates)
  assert len(line) <= 120, line
  assert line.startswith("step 100/2000 | disc/loss 1.235 | gen/loss 1.235 | lr 0.0002")
  assert line.endswith("| 12.5 steps/s | 800 ex/s | MFU 41.0% | ETA 2m10s")


def test_progress_counts_neither_the_compile_nor_excluded_time(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(time, "perf_counter", lambda: now[0])
  p = Progress(0, 100)
  now[0] = 60.0                          # step 1 took a minute: compilation
  p.start(1)
  now[0] = 70.0                          # steps 2..10: 9 steps in 10 s, 5 of which were an evaluation
  p.exclude(5.0)
  rates = p.interval(10)
  assert rates["steps_per_second"] == pytest.approx(9 / 5.0)
  assert rates["eta_seconds"] == pytest.approx(90 * 5.0 / 9)


def test_lm_flops_per_step_match_6_n_tokens_and_mfu_uses_the_peak(tmp_path):
  """FLOPs of the compiled step (XLA cost analysis) vs the analytic count (Kaplan et al. 2020): 6 · N · tokens for
  the weight matmuls (N without the input embedding table, a gather) plus 12 · layers · T · d per token for dense
  attention scores and values; optimizer and elementwise work make up the rest (measured: +5.9%). One device:
  with the params replicated over 8, every device repeats the optimizer update and XLA counts it 8 times (226M
  instead of 200M FLOPs here)."""
  from experiments.configs import lm as lm_configs
  c = lm_configs.get_config("pydoc")
  c.model.update(embed_dim=64, num_layers=2, num_heads=2, mlp_dim=256, max_len=32)
  c.dataset.seq_len = 16
  c.update(batch_size=16, num_train_steps=2, log_every_steps=2, checkpoint_every_steps=2, eval_every_steps=-1,
           sample_every_steps=-1, async_checkpointing=False, peak_flops=1e9, profile_steps="1,2")
  c.mesh.data = 1
  logged = {}
  state = train_and_evaluate(c, str(tmp_path), get_task,
                             hooks=(lambda event, step, info: logged.update(info) if event == "log" else None,))
  n = sum(x.size for x in jax.tree.leaves(state.params)) - state.params["embedding"].size
  tokens, t, d, layers = 16 * 16, 16, 64, 2
  analytic = 6 * n * tokens + 12 * layers * t * d * tokens
  assert logged["flops_per_step"] == pytest.approx(analytic, rel=0.10)
  assert logged["tokens_per_second"] == pytest.approx(logged["steps_per_second"] * tokens)
  assert logged["mfu"] == pytest.approx(logged["flops_per_step"] * logged["steps_per_second"] / 1e9)
  traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files]   # profile_steps="1,2": step 2
  assert any(f.endswith(".xplane.pb") for f in traces), traces


def test_refused_runs_leave_no_litter_and_a_file_is_not_a_workdir(tmp_path, caplog):
  new = tmp_path / "new"
  with pytest.raises(ValueError, match="batch_size=12 must be divisible"):
    run(tiny_vae_config(batch_size=12), str(new))
  assert not new.exists()                                     # checked before anything was created
  a_file = tmp_path / "file"
  a_file.write_text("mine")
  with pytest.raises(WorkdirError, match="is a file, not a directory"):
    train_and_evaluate(tiny_vae_config(), str(a_file), get_task)
  assert a_file.read_text() == "mine"
  done = tmp_path / "done"
  run(tiny_vae_config(num_train_steps=2), str(done))
  events = sorted((done / "tensorboard").iterdir())
  caplog.set_level(logging.INFO)
  run(tiny_vae_config(num_train_steps=2, **{"optimizer.learning_rate": 0.5}), str(done))
  assert "already complete at step 2" in caplog.text and "ignored: optimizer.learning_rate" in caplog.text
  assert sorted((done / "tensorboard").iterdir()) == events   # no empty events file for a run that logged nothing
  assert not (done / ".lock").exists()
