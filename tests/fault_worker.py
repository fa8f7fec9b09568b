"""A training subprocess for the fault tests and the soak (`tests/test_faults.py`, `benchmarks/faults.py`).

    python -m tests.fault_worker --workdir=W --overrides='{"num_train_steps": 6}' --out=params.npy \
        [--pause_at=3 --marker=M --release=R] [--fsize_limit=BYTES]
    python -m tests.fault_worker --jobs='[{"dump_step": 2, "workdir": W, "out": F}, {"workdir": W2, ...}]'
    (a job may also say "wait_for": PATH, a file to wait for before it starts)

Trains `tests.util.tiny_vae_config(**overrides)` through `experiments.train.run` (the launcher's code path) on
whatever devices XLA_FLAGS gives this process, then writes the final params (flattened, float64) to `out` and
prints one JSON line {"devices", "step"}.

Fault-injection points (none changes the numbers a run computes):
- `--pause_at=K`: after K training batches were taken, write the file `--marker` and wait (up to 10 min) for the
  file `--release` before handing out batch K+1. The parent kills or signals the process while it waits, or
  releases it and kills it a moment later. The pause sits in the data iterator, so nothing else changes.
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


# ---- helpers the parents (tests/test_faults.py, benchmarks/faults.py) share -----------------------------------

def worker_env(devices: int, cache_dir) -> dict:
  """This environment with `devices` simulated CPU devices and a shared persistent compilation cache."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  env.pop("JAX_NUM_CPU_DEVICES", None)
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def steps_on_disk(workdir) -> list[int]:
  """Committed checkpoint steps (orbax's unfinished `<step>.orbax-checkpoint-tmp-*` directories excluded)."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


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


def hook_train_iterator(hook: Callable[[int, dict], dict]) -> Callable[[], None]:
  """Makes the loop's `genjax.data.train_iterator` hand out hooked iterators; returns the undo function."""
  import genjax.data as gdata
  original = gdata.train_iterator
  gdata.train_iterator = lambda *a, **k: HookedIterator(original(*a, **k), hook)
  return lambda: setattr(gdata, "train_iterator", original)


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


def pause_hook(pause_at: int, marker: str, release: str, fsize_limit: int):
  def hook(index: int, batch: dict) -> dict:
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
  from genjax.train.checkpoint import Checkpointer, _is_array_meta
  from tests.util import flat
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


def _train(workdir: str, overrides: dict, out: str) -> dict:
  import jax
  import numpy as np
  from experiments.train import run
  from tests.util import flat, tiny_vae_config
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  state = run(tiny_vae_config(**overrides), workdir)
  if out:
    np.save(out, flat(state.params))
  return {"devices": jax.device_count(), "step": int(jax.device_get(state.step))}


def run_job(job: dict[str, Any]) -> dict:
  deadline = time.time() + 600
  while job.get("wait_for") and not os.path.exists(job["wait_for"]) and time.time() < deadline:
    time.sleep(0.05)                      # a job may wait for a file the parent writes when its input is ready
  if job.get("dump_step") is not None:
    return _dump(job["workdir"], int(job["dump_step"]), job["out"])
  return _train(job["workdir"], job.get("overrides", {}), job.get("out", ""))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="")
  p.add_argument("--overrides", default="{}", help="JSON dict for tests.util.tiny_vae_config(**overrides)")
  p.add_argument("--out", default="")
  p.add_argument("--jobs", default="", help="JSON list of jobs {workdir, overrides, out[, dump_step]}")
  p.add_argument("--pause_at", type=int, default=-1)
  p.add_argument("--marker", default="")
  p.add_argument("--release", default="")
  p.add_argument("--fsize_limit", type=int, default=0)
  p.add_argument("--nan_at", type=int, default=-1)
  args = p.parse_args()
  sys.path.insert(0, ROOT)
  from absl import logging
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  if args.pause_at >= 0:
    hook_train_iterator(pause_hook(args.pause_at, args.marker, args.release, args.fsize_limit))
  if args.nan_at >= 0:
    hook_train_iterator(nan_hook(args.nan_at))
  if args.fsize_limit and args.pause_at < 0:
    _limit_file_size(args.fsize_limit)
  jobs = json.loads(args.jobs) if args.jobs else [
      {"workdir": args.workdir, "overrides": json.loads(args.overrides), "out": args.out}]
  for job in jobs:
    print(json.dumps(run_job(job)), flush=True)


if __name__ == "__main__":
  main()
