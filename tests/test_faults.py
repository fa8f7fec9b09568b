"""Fault tolerance, shown: kill -9 and SIGTERM mid-run then resume bit-for-bit, a second run on the same workdir,
restore onto 4 and 1 devices and pmap → pjit, damaged checkpoints, a failing async save, NaN, bad inputs, no pickle.

Every run here is the tiny digits VAE (tests.util.tiny_vae_config) on 8 simulated devices with fsdp-sharded
params. A real process death or another device count needs a subprocess (benchmarks/fault_worker.py); the rest runs
in-process. The long version with 10 random kill points: `python -m benchmarks.faults`.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.fault_worker import DAMAGE as WORKER_DAMAGE
from benchmarks.fault_worker import (ROOT, changed_files, flat, hooked_train_iterator, nan_hook, snapshot,
                                     steps_on_disk, swap_in_previous_arrays, worker_env)
from experiments.configs import ddpm as ddpm_configs
from experiments.train import run
from genjax.errors import WorkdirError
from genjax.models import get_task
from genjax.core.checkpoint import (CheckpointMismatchError, Checkpointer, CheckpointReadError, CheckpointSaveError,
                                     CheckpointUnreadableError, load_run, load_run_at)
from genjax.core.checksums import array_checksums
from genjax.train.trainer import NonFiniteLossError, train_and_evaluate
from tests.util import tiny_vae_config

# 6 steps, a checkpoint every 2 (kept: 3), async saves, metrics every step, params sharded data=2 × fsdp=4.
CFG = {"num_train_steps": 6, "checkpoint_every_steps": 2, "log_every_steps": 1, "eval_every_steps": -1,
       "sample_every_steps": -1, "async_checkpointing": True, "param_sharding": "fsdp", "mesh.data": 2,
       "mesh.fsdp": 4}
# Another device count sums in another order: after 4 Adam steps params agree to ~1e-7 (tests/test_loop.py).
TOL = 1e-5
TIMEOUT = 600


def cfg(**overrides):
  return tiny_vae_config(**{**CFG, **overrides})


def assert_nothing_lost(before: dict, workdir) -> None:
  assert not changed_files(before, workdir), f"removed or changed: {changed_files(before, workdir)}"


def start_worker(args: list[str], devices: int, cache_dir) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "benchmarks.fault_worker", *args], cwd=ROOT, text=True,
                          env=worker_env(devices, cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_file(path, child: subprocess.Popen, timeout=TIMEOUT) -> None:
  deadline = time.time() + timeout
  while not os.path.exists(path):
    if child.poll() is not None:
      out, err = child.communicate()
      pytest.fail(f"worker exited {child.returncode} before {path} appeared:\n{out}\n{err[-3000:]}")
    assert time.time() < deadline, f"timed out waiting for {path}"
    time.sleep(0.02)


def finish(child: subprocess.Popen, returncode: int = 0) -> tuple[list[dict], str]:
  out, err = child.communicate(timeout=TIMEOUT)
  assert child.returncode == returncode, err[-3000:]
  return [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
  """A persistent compilation cache for this module's runs (in-process and subprocesses): every run compiles the
  same few programs, and a cache hit loads the very executable a compile makes. Switched off again afterwards."""
  from jax.experimental.compilation_cache import compilation_cache
  path = tmp_path_factory.mktemp("jax_cache")
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  previous = {n: getattr(jax.config, n) for n in names}
  for n, v in zip(names, (str(path), 0.0, 0)):
    jax.config.update(n, v)
  compilation_cache.reset_cache()
  yield path
  for n, v in previous.items():
    jax.config.update(n, v)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """The uninterrupted run everything is compared with: checkpoints at 2, 4, 6."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  state = run(cfg(), workdir)
  assert steps_on_disk(workdir) == [2, 4, 6]
  return {"workdir": workdir, "params": jax.device_get(state.params), "opt": jax.device_get(state.opt_states),
          "ema": jax.device_get(state.ema_params)}


def assert_bitwise_equal_to_ref(state, ref) -> None:
  assert int(state.step) == 6
  chex.assert_trees_all_equal(state.params, ref["params"])
  chex.assert_trees_all_equal(state.opt_states, ref["opt"])
  chex.assert_trees_all_equal(state.ema_params, ref["ema"])


def restored_tree(workdir, step):
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    return ckpt.restore(step)[0]
  finally:
    ckpt.close()


def copy_run(ref, dst, keep_steps=None) -> str:
  shutil.copytree(ref["workdir"], dst)
  for s in steps_on_disk(dst):
    if keep_steps is not None and s not in keep_steps:
      shutil.rmtree(os.path.join(dst, "checkpoints", str(s)))
  return str(dst)


# ---- process death ---------------------------------------------------------------------------------------------

def test_kill_9_mid_run_then_rerun_is_bit_for_bit(ref, tmp_path, cache_dir):
  workdir, marker, release = str(tmp_path / "run"), str(tmp_path / "paused"), str(tmp_path / "go")
  child = start_worker(["--workdir", workdir, "--overrides", json.dumps(CFG), "--pause_at", "3",
                        "--marker", marker, "--release", release], 8, cache_dir)
  wait_for_file(marker, child)                                     # 3 steps taken; step 2's async save...
  wait_for_file(os.path.join(workdir, "checkpoints", "2"), child)  # ...committed (final name exists)
  child.kill()
  child.communicate(timeout=TIMEOUT)
  assert child.returncode == -signal.SIGKILL
  assert steps_on_disk(workdir) == [2]
  resumed = run(cfg(), workdir)          # the dead process's lock does not block: the kernel released it
  assert_bitwise_equal_to_ref(resumed, ref)


def test_sigterm_saves_the_current_step_second_run_is_refused_resume_is_bit_for_bit(ref, tmp_path, cache_dir):
  workdir, marker, release = str(tmp_path / "run"), str(tmp_path / "paused"), str(tmp_path / "go")
  overrides = {**CFG, "checkpoint_every_steps": 100}                # no scheduled checkpoint before step 6
  child = start_worker(["--workdir", workdir, "--overrides", json.dumps(overrides), "--pause_at", "3",
                        "--marker", marker, "--release", release], 8, cache_dir)
  wait_for_file(marker, child)
  # A second run on the same workdir while the first lives: refused, naming the holder; nothing written.
  before = snapshot(workdir)
  with pytest.raises(WorkdirError, match=rf"in use by another training run \(pid {child.pid} "):
    run(cfg(**overrides), workdir)
  assert_nothing_lost(before, workdir)
  assert snapshot(workdir).keys() == before.keys()
  # Pre-emption notice, then let it take batch 4: it finishes step 4, checkpoints step 4 and exits with 143
  # (128 + SIGTERM) so that a scheduler sees an unfinished run.
  child.send_signal(signal.SIGTERM)
  open(release, "w").close()
  results, err = finish(child, returncode=143)
  assert results == [{"devices": 8, "interrupted_at": 4}]
  assert "SIGTERM: saved a checkpoint at step 4" in err
  assert steps_on_disk(workdir) == [4]
  resumed = run(cfg(**overrides), workdir)
  assert_bitwise_equal_to_ref(resumed, ref)


# ---- other device counts, other parallel path ------------------------------------------------------------------

def test_restore_from_8_devices_onto_4_and_1_and_pmap_on_8_into_pjit_on_1(ref, tmp_path, cache_dir):
  ref_step2 = flat(restored_tree(ref["workdir"], 2))         # the workers write flat vectors (fault_worker.flat)
  pmap_dir = str(tmp_path / "pmap")
  pmap_done = str(tmp_path / "pmap_done")
  jobs4 = [{"dump_step": 2, "workdir": copy_run(ref, tmp_path / "w8_dump4", [2]), "out": str(tmp_path / "d4.npy")},
           {"workdir": copy_run(ref, tmp_path / "w8_to4", [2]), "out": str(tmp_path / "p4.npy"),
            "overrides": {**CFG, "mesh.data": 2, "mesh.fsdp": 2}}]
  on1 = {**CFG, "mesh.data": 1, "mesh.fsdp": 1}
  jobs1 = [{"dump_step": 2, "workdir": copy_run(ref, tmp_path / "w8_dump1", [2]), "out": str(tmp_path / "d1.npy")},
           {"workdir": copy_run(ref, tmp_path / "w8_to1", [2]), "out": str(tmp_path / "p1.npy"), "overrides": on1},
           {"workdir": pmap_dir, "out": str(tmp_path / "pp.npy"), "overrides": on1, "wait_for": pmap_done}]
  four = start_worker(["--jobs", json.dumps(jobs4)], 4, cache_dir)    # these two run while pmap trains here
  one = start_worker(["--jobs", json.dumps(jobs1)], 1, cache_dir)
  try:
    run(cfg(parallel="pmap", param_sharding="replicated", num_train_steps=2, **{"mesh.fsdp": 1, "mesh.data": -1}),
        pmap_dir)
  finally:
    open(pmap_done, "w").close()
  (dump4, train4), _ = finish(four)
  (dump1, train1, pmap1), _ = finish(one)
  assert dump4["devices"] == 4 and dump4["sharded_arrays"] > 0 and dump1["devices"] == 1
  np.testing.assert_array_equal(np.load(tmp_path / "d4.npy"), ref_step2)     # restore itself is exact
  np.testing.assert_array_equal(np.load(tmp_path / "d1.npy"), ref_step2)
  assert train4 == {"devices": 4, "step": 6} and train1 == pmap1 == {"devices": 1, "step": 6}
  for name in ("p4", "p1", "pp"):                                            # training on from there
    np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), flat(ref["params"]), atol=TOL)


# ---- damaged checkpoints ---------------------------------------------------------------------------------------

def _swap_in_step_4(step_dir):
  swap_in_previous_arrays(step_dir, 4)


DAMAGE = {**WORKER_DAMAGE, "another step's arrays": _swap_in_step_4}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one_and_says_so(ref, tmp_path, damage, caplog):
  workdir = copy_run(ref, tmp_path / "run")
  DAMAGE[damage](os.path.join(workdir, "checkpoints", "6"))
  ckpt = Checkpointer(workdir, async_save=False)
  step, tree, data, _ = ckpt.restore_latest()
  ckpt.close()
  assert step == 4 and data == {"next_index": 4}
  assert "checkpoint at step 6" in caplog.text and "cannot be read" in caplog.text
  assert "resumed from step 4" in caplog.text
  assert steps_on_disk(workdir) == [2, 4]                     # the damaged one is moved aside, not deleted
  (moved,) = os.listdir(os.path.join(workdir, "damaged_checkpoints"))
  assert moved.startswith("step_6_")


def test_silently_wrong_arrays_are_caught_by_checksums(ref, tmp_path):
  """Orbax alone restores step 4's arrays under step 6's name without an error; the checksums refuse them."""
  workdir = copy_run(ref, tmp_path / "run")
  _swap_in_step_4(os.path.join(workdir, "checkpoints", "6"))
  with pytest.raises(CheckpointUnreadableError, match="arrays of step 6 fail their checksums"):
    restored_tree(workdir, 6)


def test_resume_after_a_damaged_latest_checkpoint_is_bit_for_bit(ref, tmp_path):
  workdir = copy_run(ref, tmp_path / "run")
  DAMAGE["bit flips in array data"](os.path.join(workdir, "checkpoints", "6"))
  assert_bitwise_equal_to_ref(run(cfg(), workdir), ref)          # from step 4, steps 5 and 6 again


@pytest.mark.parametrize("error", [errno.EIO, errno.EACCES])
def test_an_io_error_while_reading_moves_nothing_and_names_the_path(ref, tmp_path, monkeypatch, error):
  """Trouble is not damage: an OSError reading step 6's metadata (as a failing disk or a permission change gives)
  stops the resume with one error naming the checkpoint; step 6 stays where it is."""
  from etils import epath
  workdir = copy_run(ref, tmp_path / "run")
  before = snapshot(workdir)
  path_type, original = type(epath.Path(workdir)), type(epath.Path(workdir)).read_text

  def read_text(self, *args, **kwargs):
    if f"{os.sep}checkpoints{os.sep}6{os.sep}" in str(self):
      raise OSError(error, f"{os.strerror(error)} (injected)", str(self))
    return original(self, *args, **kwargs)

  monkeypatch.setattr(path_type, "read_text", read_text)
  expected = rf"step 6 in .*checkpoints/6 failed \((OSError|PermissionError): .*{os.strerror(error)}.*nothing was moved"
  with pytest.raises(CheckpointReadError, match=expected):
    run(cfg(num_train_steps=8), workdir)
  monkeypatch.undo()
  assert steps_on_disk(workdir) == [2, 4, 6] and not os.path.exists(os.path.join(workdir, "damaged_checkpoints"))
  assert_nothing_lost(before, workdir)


def test_all_checkpoints_damaged_is_an_error_and_touches_nothing(ref, tmp_path):
  workdir = copy_run(ref, tmp_path / "run")
  for s in (2, 4, 6):
    DAMAGE["empty metadata JSON"](os.path.join(workdir, "checkpoints", str(s)))
  before = snapshot(workdir)
  with pytest.raises(CheckpointUnreadableError, match=r"none of the checkpoints \[2, 4, 6\] .* can be read"):
    run(cfg(), workdir)
  assert_nothing_lost(before, workdir)


def test_checksums_see_every_single_bit_and_order_but_not_the_layout():
  x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
  base = array_checksums({"x": x})["x"]
  bits = x.view(np.uint32)
  for i in range(bits.size):
    for b in range(32):
      y = bits.copy().ravel()
      y[i] ^= np.uint32(1 << b)
      assert array_checksums({"x": y.view(np.float32).reshape(2, 4)})["x"] != base, (i, b)
  for other in (x[:, ::-1], x[::-1], x.T.reshape(2, 4), -x):   # same values elsewhere; two sign bits flipped
    assert array_checksums({"x": other})["x"] != base
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("a", "b"))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
  assert array_checksums({"x": sharded})["x"] == base
  tree = {"bf16": jnp.ones((3,), jnp.bfloat16), "i": jnp.arange(5), "b": jnp.array([True, False])}
  assert set(array_checksums(tree)) == {"bf16", "i", "b"}


# ---- failures while running ------------------------------------------------------------------------------------

def test_failing_async_save_stops_the_run_and_a_rerun_recovers_bit_for_bit(ref, tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def disk_full_at_step_4(self, *args, **kwargs):
    if os.path.basename(str(self.get_final())) == "4":
      raise OSError(errno.ENOSPC, "No space left on device (injected)")
    return await original(self, *args, **kwargs)

  workdir = str(tmp_path / "run")
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full_at_step_4)
  with pytest.raises(CheckpointSaveError, match=r"step 4 .* failed .*No space left on device.* step 2"):
    run(cfg(), workdir)
  monkeypatch.undo()
  logged = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert max(logged) <= 6 and steps_on_disk(workdir) == [2]    # stopped by the next save at the latest
  assert_bitwise_equal_to_ref(run(cfg(), workdir), ref)


def test_injected_nan_stops_naming_the_step_and_the_last_good_checkpoint_is_intact(ref, tmp_path):
  workdir = str(tmp_path / "run")
  batches = hooked_train_iterator(cfg(), nan_hook(4))   # a NaN pixel in batch 4 (0-based), which step 5 trains on
  with pytest.raises(NonFiniteLossError, match=r"at step 5; stopped\. Last good checkpoint: step 4"):
    train_and_evaluate(cfg(), workdir, get_task, train_iter=batches)
  assert steps_on_disk(workdir) == [2, 4]
  logged = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert max(logged) == 4
  chex.assert_trees_all_equal(restored_tree(workdir, 4), restored_tree(ref["workdir"], 4))


# ---- no pickle ---------------------------------------------------------------------------------------------------

def test_checkpoints_are_arrays_and_json_only_and_load_without_pickle(ref, monkeypatch):
  for root, _, files in os.walk(os.path.join(ref["workdir"], "checkpoints")):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        head = f.read()
      if os.path.basename(root) == "d" or name == "manifest.ocdbt":   # TensorStore OCDBT / zstd array data
        assert head[:2] == b"\x0c\xdb" or head[:4] == b"\x28\xb5\x2f\xfd", (root, name)
      elif name != "commit_success.txt":
        json.loads(head)                                              # every other file is JSON
      assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), (root, name)

  def refuse(*args, **kwargs):
    raise AssertionError("pickle used while loading a checkpoint")
  for name in ("load", "loads", "Unpickler", "dump", "dumps", "Pickler"):
    monkeypatch.setattr(pickle, name, refuse)
  config, params = load_run(ref["workdir"])
  chex.assert_trees_all_equal(params, ref["ema"])


# ---- bad inputs: one clear error, nothing on disk lost ---------------------------------------------------------

BAD_CONFIGS = {   # override → the error it must raise, run on a copy of the finished reference run
    "parallel": (dict(parallel="pmapp"), ValueError, r"parallel='pmapp' is not one of \('pjit', 'pmap'\)"),
    "batch vs devices": (dict(batch_size=12), ValueError, r"batch_size=12 must be divisible by data×fsdp=8"),
    "mesh": ({"mesh.data": -1, "mesh.fsdp": 3}, ValueError, r"mesh=.*'fsdp': 3.* does not divide 8 devices"),
    "data set name": ({"dataset.name": "mnst"}, ValueError, r"unknown data set 'mnst'; available: \[.*'digits'"),
    "split": ({"dataset.train_split": "validation"}, ValueError, r"no split 'validation'; splits: \['train'"),
    "likelihood": ({"model.likelihood": "poisson"}, ValueError, r"model.likelihood='poisson' is not one of"),
    "optimizer": ({"optimizer.name": "adamax"}, ValueError, r"optimizer.name='adamax' is not one of"),
    "schedule": ({"optimizer.schedule": "linear"}, ValueError, r"optimizer.schedule='linear' is not one of"),
    "param sharding": (dict(param_sharding="zero3"), ValueError, r"param_sharding='zero3' is not one of"),
    "steps": (dict(num_train_steps=-5), ValueError, r"num_train_steps=-5 must be >= 1"),
    "ema": (dict(ema_decay=1.5), ValueError, r"ema_decay=1.5 must be in \[0, 1\)"),
    "keep": (dict(keep_checkpoints=0), ValueError, r"keep_checkpoints=0 must be >= 1"),
    "family": (dict(family="vqvae"), ValueError, r"unknown model family 'vqvae'; valid: \['diffusion', 'gan'"),
    "image size vs model": ({"model.channels": (8, 16, 32, 64)}, ValueError,
                            r"image 8×8 is not divisible by 2\*\*len\(channels\)=16; change model.channels"),
    "text data for an image model": ({"dataset.name": "pydoc"}, ValueError, r"image data set; 'pydoc' is text"),
    "TFDS data set not prepared": ({"dataset.name": "mnist"}, ValueError, r"TFDS data set 'mnist'.*tfds build mnist"),
    "grad accumulation": (dict(grad_accum_steps=3, num_train_steps=8), ValueError,   # before anything runs
                          r"batch_size=\d+ must be divisible by grad_accum_steps=3 .*divisors of \d+"),
    "seed": (dict(seed=-1), ValueError, r"seed=-1"),
    "model changed under a run": ({"model.hidden": 64}, CheckpointMismatchError,
                                  r"does not fit this config: .*dec_hidden/bias is float32\(32,\) in the checkpoint "
                                  r"but float32\(64,\) in this config"),
    "dtype float16": (dict(compute_dtype="float16"), ValueError, r"compute_dtype='float16' is not one of"),
    "dtype typo": (dict(compute_dtype="bf16"), ValueError, r"compute_dtype='bf16' is not one of"),
    "latent size": ({"model.latent_dim": 0}, ValueError, r"latent_dim=0"),
}
NOT_YET = {}  # bad inputs found by these tests whose fix is still pending in another file (none now)


@pytest.fixture
def finished_run(ref, tmp_path):
  workdir = copy_run(ref, tmp_path / "run")
  return workdir, snapshot(workdir)


@pytest.mark.parametrize("name", [pytest.param(k, marks=pytest.mark.xfail(reason=NOT_YET[k], strict=True))
                                  if k in NOT_YET else k for k in BAD_CONFIGS])
def test_bad_config_value_gives_one_clear_error_and_loses_nothing(finished_run, name):
  workdir, before = finished_run
  overrides, error, message = BAD_CONFIGS[name]
  try:
    with pytest.raises(error, match=message):
      run(cfg(**overrides), workdir)
  finally:
    assert_nothing_lost(before, workdir)


def _ddpm_config():
  c = ddpm_configs.get_config("digits")
  c.model.ch, c.model.num_res_blocks, c.batch_size = 8, 1, 16
  return c


def test_checkpoint_of_another_family_is_refused(finished_run):
  workdir, before = finished_run
  with pytest.raises(ValueError, match=r"holds a 'vae' run; this config trains 'diffusion'"):
    run(_ddpm_config(), workdir)
  os.remove(os.path.join(workdir, "config.json"))                     # only the checkpoints say whose they are
  before.pop("config.json")
  with pytest.raises(CheckpointMismatchError, match=r"has family='vae', this config has family='diffusion'"):
    run(_ddpm_config(), workdir)
  assert_nothing_lost(before, workdir)


def test_unwritable_or_wrong_workdir(tmp_path, monkeypatch):
  locked = tmp_path / "locked"
  locked.mkdir()
  os.chmod(locked, 0o555)
  if os.geteuid() == 0:                  # root writes anywhere: make the check see what another user would
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(locked) and mode & os.W_OK
                        else real(p, mode, **k))
  with pytest.raises(PermissionError, match=rf"workdir '{locked}' is not writable"):
    run(cfg(), str(locked))
  with pytest.raises(ValueError, match=r"is not a genjax run directory: config.json is missing"):
    load_run(str(tmp_path))


def test_load_run_reports_the_step_it_fell_back_to(ref, tmp_path):
  workdir = copy_run(ref, tmp_path / "run")
  DAMAGE["bit flips in array data"](os.path.join(workdir, "checkpoints", "6"))
  _, params, step = load_run_at(workdir)
  assert step == 4 and steps_on_disk(workdir) == [2, 4, 6]            # read-only: nothing moved
  chex.assert_trees_all_equal(params, restored_tree(ref["workdir"], 4)["ema_params"])


def test_load_run_names_the_steps_there_are(ref):
  with pytest.raises(ValueError, match=r"no checkpoint of step 5 .*; steps: \[2, 4, 6\]"):
    load_run(ref["workdir"], step=5)


def test_prompt_longer_than_the_cache_and_unknown_sample_options():
  """Both are refused before any params are touched (so none are needed here)."""
  from experiments.configs import lm as lm_configs
  from genjax.models import get_task
  c = lm_configs.get_config("pydoc")
  c.model.update(embed_dim=16, num_layers=1, num_heads=2, mlp_dim=32, max_len=32)
  with pytest.raises(ValueError, match=r"the longest prompt \(40 tokens\) \+ max_new_tokens=4 = 44 does not fit in "
                                       r"the model's context max_len=32"):
    get_task(c).sample_text({}, ["x" * 40], jax.random.PRNGKey(1), max_new_tokens=4)
  with pytest.raises(ValueError, match=r"unknown VAE sample options \['sampler'\]; valid: \['temperature'\]"):
    get_task(cfg()).sample_images({}, jax.random.PRNGKey(0), 2, sampler="ddim")


LAUNCHER_ERRORS = {   # argv after --config → the one line it must print (exit status 2)
    "variant": (["experiments/configs/vae.py:digitz"], r"unknown variant 'digitz' for vae.py; valid: \['digits'"),
    "no variant": (["experiments/configs/vae.py"], r"vae.py needs a variant, e.g. vae.py:digits; valid:"),
    "config file": (["experiments/configs/nope.py:x"], r"No such file .*'experiments/configs/nope.py'; configs: \["),
    "config key": (["experiments/configs/vae.py:digits", "--config.modle.hidden=3"],
                   r"unknown config field 'modle.hidden' in --config.modle.hidden; config has: .*\bmodel\b"),
    "config value type": (["experiments/configs/vae.py:digits", "--config.num_train_steps=abc"],
                          r"--config.num_train_steps=abc: invalid literal for int"),
    "flag": (["experiments/configs/vae.py:digits", "--bogus=1"], r"Unknown command line flag 'bogus'"),
    "stray argument": (["experiments/configs/vae.py:digits", "extra"], r"unexpected arguments: \['extra'\]"),
}


def test_launcher_flag_errors_are_one_line_and_lose_nothing(finished_run):
  workdir, before = finished_run
  children = {name: subprocess.Popen(
      [sys.executable, "-m", "experiments.train", f"--config={argv[0]}", *argv[1:], f"--workdir={workdir}"],
      cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name, (argv, _) in
      LAUNCHER_ERRORS.items()}
  missing_workdir = subprocess.run([sys.executable, "-m", "experiments.train",
                                    "--config=experiments/configs/vae.py:digits"], cwd=ROOT, text=True,
                                   capture_output=True, timeout=TIMEOUT)
  for name, child in children.items():
    out, err = child.communicate(timeout=TIMEOUT)
    lines = err.strip().splitlines()
    assert child.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
    assert re.search(LAUNCHER_ERRORS[name][1], lines[0]), (name, lines[0])
  assert missing_workdir.returncode == 2
  assert missing_workdir.stderr.strip().startswith("error: --workdir is required")
  assert_nothing_lost(before, workdir)
