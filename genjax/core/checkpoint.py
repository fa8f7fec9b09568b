"""Orbax checkpoints of the whole run: train state (arrays), data-iterator position and plain JSON metadata.

    ckpt = Checkpointer(workdir, keep=3, async_save=True)
    ckpt.save(step, state, data_state={"next_index": ...}, meta={"family": "vae"})
    restored = ckpt.restore_latest(abstract_state, expect_meta={"family": "vae"})   # None: no checkpoint yet
    config, params = load_run(workdir)        # for sampling/evaluation: EMA params of the latest readable step
    config, params, step = load_run_at(workdir)   # ... and the step they are from
    committed_steps(workdir)                  # the finished checkpoints on disk, from the listing alone

What survives what:
- Layout. The state is saved as a nested dict of arrays (`flax.serialization.to_state_dict`) and restored onto the
  device layout the caller's abstract arrays carry: 8 devices → 4 → 1, pmap → pjit. `load_run` restores onto the
  first local device whatever wrote the checkpoint.
- Damage vs. trouble. Every save records a checksum of each array (wrap-around uint32 sums of the raw and of the hashed
  bits, independent of how the array is sharded; any changed element changes it) and a SHA-256 of the
  data-iterator position. Only integrity failures — a checksum mismatch, missing or unparseable files of a
  finished save — count as damage: that checkpoint is moved to `<workdir>/damaged_checkpoints/` (never deleted), a
  warning says so, and the previous checkpoint is used. Orbax/TensorStore alone can restore silently altered values
  from a flipped byte; the checksums catch that. An I/O error while reading (EIO, EACCES, a stale NFS handle, ...)
  says nothing about the checkpoint: it raises `CheckpointReadError` naming the path and moves nothing.
- Wrong run. A checkpoint whose arrays do not match this config's shapes/dtypes, or whose metadata names another
  family, raises `CheckpointMismatchError` naming the first differences; nothing is moved or overwritten.
- Save failures. A failed (async) save raises `CheckpointSaveError` at the next `save`, `check` or `wait` (and
  every later one; `close` raises it if nobody was told yet): it is never ignored, and it deletes nothing older.
- Kill -9. Orbax writes into a temporary directory and renames it when complete, so a process killed mid-save
  leaves the previous checkpoints as they were. `save_config` writes `config.json` atomically too.
- No pickle. Arrays are TensorStore/OCDBT files, everything else JSON: loading a checkpoint never runs code.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from genjax.errors import CheckpointError, WorkdirError
from genjax.core.checksums import CHECKSUM_ALGORITHM, array_checksums, json_sha256, leaves_by_path

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"
INTEGRITY_KEY = "integrity"


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed (disk full, permissions, ...); training must not go on without it."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint belongs to another run: other family, or other array shapes/dtypes than this config makes."""


class CheckpointUnreadableError(CheckpointError):
  """A checkpoint (or every checkpoint in the directory) cannot be read back intact."""


class CheckpointReadError(CheckpointError):
  """Reading a checkpoint failed for a reason outside it (I/O error, permissions): nothing was moved or changed."""


# Status words (TensorStore / gRPC) and OS error texts of a read that failed for a reason outside the checkpoint.
_TROUBLE_MARKERS = ("PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                    "Input/output error", "Permission denied", "Stale file handle", "Resource temporarily unavailable")
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def read_trouble(e: BaseException) -> Optional[BaseException]:
  """The exception in `e`'s chain that says the read failed outside the checkpoint (an OSError other than a missing
  file, or a TensorStore status of that kind); None when `e` says the checkpoint itself is damaged."""
  seen: set[int] = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and not isinstance(e, _MISSING):
      return e
    if any(marker in str(e) for marker in _TROUBLE_MARKERS):
      return e
    e = e.__cause__ or e.__context__
  return None


def state_to_tree(state: Any) -> Any:
  return flax.serialization.to_state_dict(state)


def tree_to_state(target: Any, tree: Any) -> Any:
  return flax.serialization.from_state_dict(target, tree)


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _describe(shape, dtype) -> str:
  return f"{np.dtype(dtype).name}{tuple(shape)}"


# ---- the checkpointer ------------------------------------------------------------------------------------------

class Checkpointer:
  """A CheckpointManager with items "state" (arrays), "data" (iterator position) and "meta" (JSON)."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
    self._saved: set[int] = set()       # steps this object saved (a repeated save of one step is a no-op)
    self._in_flight: Optional[int] = None
    self._error: Optional[CheckpointSaveError] = None
    self._error_reported = False

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  # ---- saving ----
  def _fail(self, step: Optional[int], e: BaseException) -> CheckpointSaveError:
    if self._error is None:
      good = [s for s in self.all_steps() if s != step]
      self._error = CheckpointSaveError(
          f"saving the checkpoint of step {step} in {self.directory} failed ({_first_line(e)}); training stopped "
          f"instead of going on unsaved. Last complete checkpoint: step {max(good, default='none')}. Fix the cause "
          "(disk space, permissions) and rerun to resume.")
      self._error.__cause__ = e
    return self._error

  def _raise_if_failed(self) -> None:
    if self._error is not None:
      self._error_reported = True
      raise self._error

  def _finish_in_flight(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # orbax raises a failed background write once; we keep raising it
      self._fail(self._in_flight, e)
    self._raise_if_failed()
    self._in_flight = None

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Starts saving `step` (in the background when async); raises CheckpointSaveError for an earlier failure."""
    self._finish_in_flight()
    if step in self._saved:
      return
    tree = state_to_tree(state)
    integrity = {"algorithm": CHECKSUM_ALGORITHM, "arrays": array_checksums(tree),
                 "data_sha256": json_sha256(data_state)}
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(tree), data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave({**meta, INTEGRITY_KEY: integrity})), force=True)
    except Exception as e:  # any failure to start a save (orbax, tensorstore, the OS) becomes a CheckpointSaveError
      error = self._fail(step, e)
      self._error_reported = True
      raise error from e
    self._saved.add(step)
    self._in_flight = step

  def check(self) -> None:
    """Non-blocking: raises CheckpointSaveError when a background save has already failed."""
    self._raise_if_failed()
    if self._in_flight is not None and not self.manager.is_saving_in_progress():
      self._finish_in_flight()

  def wait(self) -> None:
    """Blocks until the pending save is on disk; raises CheckpointSaveError if it (or an earlier one) failed."""
    self._finish_in_flight()

  def close(self) -> None:
    """Waits for the pending save; raises a save failure nobody has been told about yet."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # as in _finish_in_flight: a failed background write, whatever raised it, is recorded
      self._fail(self._in_flight, e)
    finally:
      self.manager.close()
    if self._error is not None and not self._error_reported:
      self._raise_if_failed()

  # ---- restoring ----
  def _read_meta(self, step: int) -> dict:
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict):
      raise CheckpointUnreadableError(f"metadata of step {step} is {type(meta).__name__}, not a JSON object")
    return meta

  def array_metadata(self, step: int) -> Any:
    """The saved arrays' shapes and dtypes (orbax ArrayMetadata leaves) at `step`, without reading them."""
    tree = self.manager.item_metadata(step)["state"]
    tree = tree.tree if hasattr(tree, "tree") else tree
    if tree is None:
      raise CheckpointUnreadableError(f"the array metadata of step {step} cannot be read")
    return tree

  def _check_fits(self, step: int, meta: dict, saved: dict, target: Optional[Any], expect_meta: Optional[dict]):
    for key, want in (expect_meta or {}).items():
      if meta.get(key) != want:
        raise CheckpointMismatchError(
            f"checkpoint at step {step} in {self.directory} has {key}={meta.get(key)!r}, this config has "
            f"{key}={want!r}; use another --workdir (or the config that wrote it)")
    if target is None:
      return
    want = {k: v for k, v in leaves_by_path(target).items() if hasattr(v, "shape")}
    problems = [f"{k} is missing from the checkpoint" for k in want if k not in saved]
    problems += [f"the checkpoint has {k}, this config does not" for k in saved if k not in want]
    problems += [f"{k} is {_describe(saved[k].shape, saved[k].dtype)} in the checkpoint but "
                 f"{_describe(want[k].shape, want[k].dtype)} in this config" for k in want
                 if k in saved and (tuple(saved[k].shape) != tuple(want[k].shape)
                                    or np.dtype(saved[k].dtype) != np.dtype(want[k].dtype))]
    if problems:
      more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
      raise CheckpointMismatchError(
          f"checkpoint at step {step} in {self.directory} does not fit this config: {'; '.join(problems[:3])}"
          f"{more}. Did config.model change? Use the config that wrote it or another --workdir")

  def _verify(self, step: int, meta: dict, tree: Any, data: Any) -> None:
    integrity = meta.get(INTEGRITY_KEY)
    if integrity is None:
      logging.warning("checkpoint at step %d has no checksums (written by an older genjax); not verified", step)
      return
    if integrity.get("algorithm") != CHECKSUM_ALGORITHM:
      logging.warning("checkpoint at step %d has checksums of another kind (%r); not verified", step,
                      integrity.get("algorithm"))
      return
    expected, actual = integrity.get("arrays", {}), array_checksums(tree)
    bad = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
    if bad:
      raise CheckpointUnreadableError(f"arrays of step {step} fail their checksums: {bad[:3]}"
                                      f"{f' (+{len(bad) - 3} more)' if len(bad) > 3 else ''}")
    if integrity.get("data_sha256") not in (None, json_sha256(data)):
      raise CheckpointUnreadableError(f"the data-iterator position of step {step} fails its checksum")

  def restore(self, step: int, abstract_state: Optional[Any] = None,
              expect_meta: Optional[dict] = None) -> tuple[Any, dict, dict]:
    """(state, data_state, meta) at `step`, verified against its checksums.

    `abstract_state` (a state of jax.ShapeDtypeStruct with shardings) says the target shapes and device layout;
    without it a nested dict of arrays on the first local device comes back. Raises CheckpointMismatchError when
    the checkpoint does not fit `abstract_state`/`expect_meta`, CheckpointUnreadableError (or orbax's error)
    when it is damaged.
    """
    meta = self._read_meta(step)
    array_meta = self.array_metadata(step)
    target = state_to_tree(abstract_state) if abstract_state is not None else None
    self._check_fits(step, meta, leaves_by_path(array_meta, is_leaf=_is_array_meta), target, expect_meta)
    if target is None:
      target = _rebuild(array_meta, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             data=ocp.args.JsonRestore()))
    tree, data = out["state"], out["data"]
    self._verify(step, meta, tree, data)
    meta = {k: v for k, v in meta.items() if k != INTEGRITY_KEY}
    return (tree_to_state(abstract_state, tree) if abstract_state is not None else tree), data, meta

  def newest_readable(self, steps: list[int], read) -> tuple[Optional[tuple[int, Any]], list]:
    """The one "newest readable checkpoint" walk (resume, sampling, evaluation): ((step, read(step)) of the newest
    of `steps` that `read` reads, or None; [(step, error)] of the newer ones skipped). A damaged step is skipped
    with a warning, one that does not fit (CheckpointMismatchError) silently; trouble reading (I/O, permissions)
    raises CheckpointReadError and stops the walk."""
    skipped = []
    for step in reversed(steps):
      try:
        return (step, read(step)), skipped
      except CheckpointMismatchError as e:
        skipped.append((step, e))
      except Exception as e:  # damaged: say so and try the previous one; trouble reading: stop
        self._raise_if_trouble(step, e)
        logging.warning("checkpoint at step %d in %s cannot be read (%s); trying the previous one", step,
                        self.directory, _first_line(e))
        skipped.append((step, e))
    return None, skipped

  def restore_latest(self, abstract_state: Optional[Any] = None, expect_meta: Optional[dict] = None):
    """(step, state, data_state, meta) of the newest intact checkpoint that fits; None when there is none.

    Damaged newer checkpoints are moved to `<workdir>/damaged_checkpoints/` with a warning. Raises
    CheckpointMismatchError when no checkpoint fits this config, CheckpointUnreadableError when all are damaged
    (in both cases nothing on disk is touched).
    """
    steps = self.all_steps()
    found, skipped = self.newest_readable(steps, lambda s: self.restore(s, abstract_state, expect_meta))
    if found is not None:
      step, restored = found
      if skipped:
        moved = self._move_aside([s for s, _ in skipped])
        logging.warning("resumed from step %d: newer checkpoint(s) %s could not be used and were moved to %s",
                        step, [s for s, _ in skipped], moved)
      return (step,) + restored
    if not steps:
      return None
    mismatches = [e for _, e in skipped if isinstance(e, CheckpointMismatchError)]
    if len(mismatches) == len(steps):
      raise mismatches[0]
    reasons = "; ".join(f"step {s}: {_first_line(e)}" for s, e in skipped[:3])
    raise CheckpointUnreadableError(
        f"none of the checkpoints {steps} in {self.directory} can be read intact ({reasons}). Nothing was "
        f"changed; move {self.directory} away to start from scratch")

  def _raise_if_trouble(self, step: int, e: BaseException) -> None:
    trouble = read_trouble(e)
    if trouble is not None:
      raise CheckpointReadError(
          f"reading the checkpoint of step {step} in {os.path.join(self.directory, str(step))} failed "
          f"({_first_line(trouble)}); nothing was moved or changed. Fix the cause (permissions, disk, network "
          "file system) and rerun") from e

  def _move_aside(self, steps: list[int]) -> str:
    target = os.path.join(self.workdir, DAMAGED_DIR)
    if jax.process_index() == 0:
      os.makedirs(target, exist_ok=True)
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for s in steps:
        src = os.path.join(self.directory, str(s))
        if os.path.isdir(src):
          os.replace(src, os.path.join(target, f"step_{s}_{stamp}"))
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("genjax_damaged_checkpoints_moved")
    self.manager.reload()
    return target


def _is_array_meta(m: Any) -> bool:
  return hasattr(m, "shape") and hasattr(m, "dtype")


def _rebuild(array_meta: Any, sharding) -> Any:
  """Abstract arrays (ShapeDtypeStruct on `sharding`) from orbax's saved array metadata."""
  def one(m):
    return jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype), sharding=sharding)
  return jax.tree.map(one, array_meta, is_leaf=_is_array_meta)


# ---- config and run loading ------------------------------------------------------------------------------------

def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes `config.json` atomically (a kill mid-write leaves the old file, never half a file)."""
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"{workdir!r} is a file, not a genjax run directory")
  if not os.path.exists(path):
    raise WorkdirError(f"{workdir!r} is not a genjax run directory: {CONFIG_FILE} is missing "
                       f"(train one with `python -m experiments.train --config=... --workdir={workdir}`)")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (ValueError, UnicodeDecodeError) as e:
    raise WorkdirError(f"{path} is not valid JSON ({_first_line(e)}); restore it or use another --workdir") from None


def load_run(workdir: str, step: Optional[int] = None) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, params) of a run for sampling/evaluation: `load_run_at` without the step."""
  config, params, _ = load_run_at(workdir, step)
  return config, params


def load_run_at(workdir: str, step: Optional[int] = None) -> tuple[ml_collections.ConfigDict, Any, int]:
  """(config, params, the step they are from) of a run: the EMA params when the run kept them.

  Arrays land on the first local device whatever device layout wrote them. Without `step`, the newest intact
  checkpoint (damaged ones are skipped with a warning, not moved: this is a read-only path), so the step returned
  can be older than the newest on disk.
  """
  config = load_config(workdir)
  ckpt = Checkpointer(workdir, keep=max(1, int(config.keep_checkpoints)), async_save=False)
  try:
    steps = ckpt.all_steps()
    if step is not None and step not in steps:
      raise CheckpointError(f"no checkpoint of step {step} in {ckpt.directory}; steps: {steps}")
    if not steps:
      raise CheckpointError(f"no checkpoint in {ckpt.directory}; the run has not saved one yet")
    found, skipped = ckpt.newest_readable([step] if step is not None else steps, lambda s: ckpt.restore(s)[0])
    if found is None:
      errors = [f"step {s}: {_first_line(e)}" for s, e in skipped]
      raise CheckpointUnreadableError(f"no readable checkpoint in {ckpt.directory} ({'; '.join(errors[:3])})")
    loaded, tree = found
    params = tree["ema_params"] if tree.get("ema_params") is not None else tree["params"]
    return config, params, loaded
  finally:
    ckpt.manager.close()


def committed_steps(workdir: str) -> list[int]:
  """The steps with a finished checkpoint in `workdir` (orbax's unfinished `<step>.orbax-checkpoint-tmp-*`
  directories excluded), read from the directory listing alone: nothing is opened."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []
