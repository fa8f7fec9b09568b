"""A training subprocess for the fault soak and tests (`benchmarks/faults.py`, `tests/test_faults.py`).

    python -m benchmarks.fault_worker --workdir=W --overrides='{"num_train_steps": 6}' --out=params.npy \
        [--pause_at=3 --marker=M --release=R] [--fsize_limit=BYTES] \
        [--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=I]
    python -m benchmarks.fault_worker --jobs='[{"dump_step": 2, "workdir": W, "out": F}, {"workdir": W2, ...}]'
    (a job may also say "wait_for": PATH, a file to wait for before it starts)

Trains `vae.py:tiny` (the digits VAE shrunk to seconds) with dotted-key `overrides` through
`genjax.train.trainer.train_and_evaluate` on whatever devices XLA_FLAGS gives this process (with
`--num_processes`: one process of a multi-process job, gloo collectives), then writes the final params (flattened,
float64) to `out` and prints one JSON line {"devices", "step"}. A run stopped by SIGINT/SIGTERM prints
{"devices", "interrupted_at"} and exits with the launcher's status (130 / 143).

Fault-injection points (none changes the numbers a run computes):
- `--pause_at=K`: after K training batches were taken, write the file `--marker` and wait (up to 10 min) for the
  file `--release` before handing out batch K+1. The parent kills or signals the process while it waits, or
  releases it and kills it a moment later. The pause sits in the data iterator (the loop's `train_iter` injection
  point, `HookedIterator`), so nothing else changes.
- `--batch_delay=S`: after the pause, every batch waits S seconds (steps long enough for a signal to land mid-run).
- `--fsize_limit=BYTES`: from the release on (from the start without --pause_at), no file may grow past BYTES
  (RLIMIT_FSIZE): a real "File too large" OS error inside orbax's background writes, as a full disk gives.
- `--nan_at=K`: batch K (counted from 0 in this process) gets a NaN pixel, as a corrupt record would.
- a job with `dump_step=S`: instead of training, restore checkpoint S onto this process's devices, each array
  sharded over all of them along its largest divisible dimension (so 8 → 4 devices really re-shards), verified
  against its checksums, and write it flattened to `out`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- helpers the parents (benchmarks/faults.py, tests/test_faults.py) share -----------------------------------

def worker_env(devices: int, cache_dir=None) -> dict:
  """This environment with `devices` simulated CPU devices (and a shared persistent compilation cache in
  `cache_dir`, when given) for a subprocess that imports genjax from this checkout."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  env.pop("JAX_NUM_CPU_DEVICES", None)
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != ROOT]))
  if cache_dir is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def steps_on_disk(workdir) -> list[int]:
  """Committed checkpoint steps (`genjax.core.checkpoint.committed_steps`)."""
  from genjax.core.checkpoint import committed_steps
  return committed_steps(str(workdir))


def snapshot(workdir) -> dict[str, str]:
  """sha256 of every file under `workdir` but the lock file (which holds only the holder's pid)."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      if name != ".lock":
        with open(os.path.join(root, name), "rb") as f:
          out[os.path.relpath(os.path.join(root, name), workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


def changed_files(before: dict, workdir) -> list[str]:
  """Files of `before` that are gone or different now (new files do not count: nothing was lost)."""
  after = snapshot(workdir)
  return sorted(k for k, v in before.items() if after.get(k) != v)


class HookedIterator:
  """Wraps the loop's train iterator: `hook(index, batch) -> batch` sees every batch (index from 0) first."""

  def __init__(self, it, hook: Callable[[int, dict], dict]):
    self._it, self._hook, self._taken = it, hook, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    index, self._taken = self._taken, self._taken + 1
    return self._hook(index, batch)

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    return self._it.set_state(state)

  def close(self):
    return self._it.close()


def tiny_vae_config(**overrides):
  """`vae.py:tiny` with dotted-key overrides ({"mesh.data": 2, ...}; JSON lists become tuples)."""
  from experiments.configs import vae as vae_configs
  c = vae_configs.get_config("tiny")
  c.update_from_flattened_dict({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
  return c


def hooked_train_iterator(config, hook: Callable[[int, dict], dict]) -> HookedIterator:
  """The loop's own train iterator for `config` (this process's rows), with `hook` on every batch."""
  from genjax.train.trainer import make_train_iterator
  return HookedIterator(make_train_iterator(config), hook)


def flat(tree):
  import jax
  import numpy as np
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(jax.device_get(tree))])


# ---- damage done to a checkpoint directory `<workdir>/checkpoints/<step>` (used by the tests and the soak) ------

def _data_files(step_dir: str) -> list[str]:
  return [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
          if os.path.basename(r) == "d"]


def _flip(step_dir: str) -> None:
  for path in _data_files(step_dir):
    with open(path, "r+b") as f:
      f.seek(40)
      b = f.read(1)
      f.seek(40)
      f.write(bytes([b[0] ^ 0x01]))


def _truncate(step_dir: str) -> None:
  for path in _data_files(step_dir):
    os.truncate(path, os.path.getsize(path) // 2)


def _write(relpath: str, text: str):
  def damage(step_dir: str) -> None:
    with open(os.path.join(step_dir, relpath), "w") as f:
      f.write(text)
  return damage


def swap_in_previous_arrays(step_dir: str, previous_step: int) -> None:
  """Another step's (self-consistent) arrays under this step's name: orbax restores them without complaint."""
  shutil.rmtree(os.path.join(step_dir, "state"))
  shutil.copytree(os.path.join(os.path.dirname(step_dir), str(previous_step), "state"),
                  os.path.join(step_dir, "state"))


DAMAGE = {
    "bit flips in array data": _flip,
    "truncated array data": _truncate,
    "deleted OCDBT manifest": lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
    "half-written array metadata": _write("state/_METADATA", '{"tree_metadata": {"'),
    "empty metadata JSON": _write("meta/metadata", ""),
}


def _limit_file_size(limit: int) -> None:
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def pause_hook(pause_at: int, marker: str, release: str, fsize_limit: int, batch_delay: float = 0.0):
  def hook(index: int, batch: dict) -> dict:
    if index > pause_at:
      time.sleep(batch_delay)           # a slower step after the pause, so that signals arrive mid-run
    if index == pause_at:
      with open(marker, "w") as f:
        f.write(str(pause_at))
      deadline = time.time() + 600
      while not os.path.exists(release) and time.time() < deadline:
        time.sleep(0.005)
      if fsize_limit:
        _limit_file_size(fsize_limit)
    return batch
  return hook


def nan_hook(nan_at: int):
  def hook(index: int, batch: dict) -> dict:
    if index == nan_at:
      import numpy as np
      image = np.array(batch["image"], np.float32)
      image.flat[0] = np.nan
      batch = {**batch, "image": image}
    return batch
  return hook


def _dump(workdir: str, step: int, out: str) -> dict:
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from genjax.core.checkpoint import Checkpointer, _is_array_meta
  devices = jax.devices()
  mesh = Mesh(np.asarray(devices), ("d",))

  def sharding(m) -> NamedSharding:
    for dim in sorted(range(len(m.shape)), key=lambda d: -m.shape[d]):
      if m.shape[dim] % len(devices) == 0:
        return NamedSharding(mesh, P(*[("d" if i == dim else None) for i in range(len(m.shape))]))
    return NamedSharding(mesh, P())

  ckpt = Checkpointer(workdir, async_save=False)
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding(m)),
                        ckpt.array_metadata(step), is_leaf=_is_array_meta)
  tree, _, _ = ckpt.restore(step, target)
  ckpt.close()
  np.save(out, flat(tree))
  sharded = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(tree))
  return {"devices": len(devices), "dumped_step": step, "sharded_arrays": sharded,
          "arrays": len(jax.tree.leaves(tree))}


def _train(workdir: str, overrides: dict, out: str, hook) -> dict:
  import jax
  import numpy as np
  from genjax.models import get_task
  from genjax.train.trainer import Interrupted, train_and_evaluate
  config = tiny_vae_config(**overrides)
  train_iter = hooked_train_iterator(config, hook) if hook else None
  try:
    state = train_and_evaluate(config, workdir, get_task, train_iter=train_iter)
  except Interrupted as e:
    print(json.dumps({"devices": jax.device_count(), "interrupted_at": e.step}), flush=True)
    sys.exit(e.exit_code)
  if out and jax.process_index() == 0:
    np.save(out, flat(state.params))
  return {"devices": jax.device_count(), "step": int(jax.device_get(state.step))}


def run_job(job: dict[str, Any], hook=None) -> dict:
  deadline = time.time() + 600
  while job.get("wait_for") and not os.path.exists(job["wait_for"]) and time.time() < deadline:
    time.sleep(0.05)                      # a job may wait for a file the parent writes when its input is ready
  if job.get("dump_step") is not None:
    return _dump(job["workdir"], int(job["dump_step"]), job["out"])
  return _train(job["workdir"], job.get("overrides", {}), job.get("out", ""), hook)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="")
  p.add_argument("--overrides", default="{}", help="JSON dict of dotted config keys for vae.py:tiny")
  p.add_argument("--out", default="")
  p.add_argument("--jobs", default="", help="JSON list of jobs {workdir, overrides, out[, dump_step]}")
  p.add_argument("--pause_at", type=int, default=-1)
  p.add_argument("--marker", default="")
  p.add_argument("--release", default="")
  p.add_argument("--fsize_limit", type=int, default=0)
  p.add_argument("--nan_at", type=int, default=-1)
  p.add_argument("--batch_delay", type=float, default=0.0, help="seconds of sleep per batch after the pause")
  p.add_argument("--coordinator_address", default="", help="host:port of process 0 (multi-process job)")
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--process_id", type=int, default=0)
  args = p.parse_args()
  sys.path.insert(0, ROOT)
  if args.num_processes > 1:
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator_address, num_processes=args.num_processes,
                               process_id=args.process_id)
  from absl import logging
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  hook = None
  if args.pause_at >= 0:
    hook = pause_hook(args.pause_at, args.marker, args.release, args.fsize_limit, args.batch_delay)
  if args.nan_at >= 0:
    hook = nan_hook(args.nan_at)
  if args.fsize_limit and args.pause_at < 0:
    _limit_file_size(args.fsize_limit)
  jobs = json.loads(args.jobs) if args.jobs else [
      {"workdir": args.workdir, "overrides": json.loads(args.overrides), "out": args.out}]
  for job in jobs:
    print(json.dumps(run_job(job, hook)), flush=True)


if __name__ == "__main__":
  main()
