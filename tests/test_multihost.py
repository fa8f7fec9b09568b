"""A real 2-process run on localhost (gloo collectives, 2 simulated devices each) trains and matches one process."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import pytest

from experiments.train import run
from genjax.core.checkpoint import load_run
from tests.util import tiny_vae_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = ["--config.model.latent_dim=4", "--config.model.channels=(8,16)", "--config.model.hidden=32",
              "--config.batch_size=16", "--config.num_train_steps=4", "--config.log_every_steps=2",
              "--config.checkpoint_every_steps=2", "--config.eval_every_steps=0", "--config.sample_every_steps=0",
              "--config.optimizer.schedule=constant", "--config.async_checkpointing=False"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("parallel", ["pjit", "pmap"])
def test_two_processes_match_one(tmp_path, parallel):
  port = _free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  workdir = str(tmp_path / "multi")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.train", "--config=experiments/configs/vae.py:digits",
       f"--workdir={workdir}", f"--config.parallel={parallel}", "--multihost",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}", *TINY_FLAGS],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "4 cpu device(s) (process 0 of 2)" in outs[0] and "4 cpu device(s) (process 1 of 2)" in outs[1]
  _, multi_params = load_run(workdir)
  single = run(tiny_vae_config(parallel="pjit", **{"mesh.data": 4}), str(tmp_path / "single"))
  # Same global batches and per-example keys; only the float32 reduction order differs.
  chex.assert_trees_all_close(multi_params, single.ema_params, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  """SIGTERM to process 1 only: JAX's pre-emption service tells process 0, both stop after the same step, save it
  together and exit 143. (Before: process 1 stopped alone, process 0 blocked in a collective, and neither exited.)
  Resuming a checkpoint bit-for-bit is shown single-process (tests/test_faults.py)."""
  from benchmarks.fault_worker import steps_on_disk, worker_env
  port, workdir, release = _free_port(), str(tmp_path / "run"), str(tmp_path / "go")
  overrides = json.dumps({"num_train_steps": 200, "checkpoint_every_steps": 1000, "log_every_steps": 10})
  markers = [str(tmp_path / f"paused{i}") for i in range(2)]

  def start(i, extra=()):
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.fault_worker", "--workdir", workdir, "--overrides", overrides,
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}", *extra], cwd=ROOT,
        env=worker_env(2, tmp_path / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  procs = [start(i, ["--pause_at=2", f"--marker={markers[i]}", f"--release={release}", "--batch_delay=0.05"])
           for i in range(2)]
  deadline = time.time() + 600
  while not all(os.path.exists(m) for m in markers):
    assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  open(release, "w").close()
  outs = [p.communicate(timeout=600) for p in procs]
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  assert [p.returncode for p in procs] == [143, 143], [err[-2000:] for _, err in outs]
  stopped = results[0]["interrupted_at"]
  assert results[1]["interrupted_at"] == stopped and 2 < stopped < 200
  assert steps_on_disk(workdir) == [stopped]
  assert all(f"SIGTERM: saved a checkpoint at step {stopped}" in err for _, err in outs)
