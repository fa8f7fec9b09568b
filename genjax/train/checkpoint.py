"""Orbax checkpoints of the whole run: train state, data-iterator position and plain metadata (no pickle).

    ckpt = Checkpointer(workdir, keep=3, async_save=True)
    ckpt.save(step, state, data_state={"next_index": ...}, meta={"family": "vae"})
    restored = ckpt.restore_latest(abstract_state)        # None when the workdir has no checkpoint
    config, params = load_run(workdir)                    # for sampling/evaluation: EMA params of the latest step

The state is saved as a nested dict of arrays (`flax.serialization.to_state_dict`), so a checkpoint restores onto
any device layout: the caller passes abstract arrays carrying the target shardings. A checkpoint that cannot be read
(truncated, corrupted) is skipped with a warning and the previous one is used. An async save that failed raises
at the next save or at `wait()`; it is never ignored.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


def state_to_tree(state: Any) -> Any:
  return flax.serialization.to_state_dict(state)


def tree_to_state(target: Any, tree: Any) -> Any:
  return flax.serialization.from_state_dict(target, tree)


class Checkpointer:
  """A CheckpointManager with items "state" (arrays), "data" (iterator position) and "meta" (JSON)."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    self.manager.wait_until_finished()   # surfaces a failed earlier async save before we go on
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state_to_tree(state)),
        data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Optional[Any] = None) -> tuple[Any, dict, dict]:
    """(state tree, data_state, meta) at `step`; `abstract_state` carries target shapes and shardings."""
    target = state_to_tree(abstract_state) if abstract_state is not None else None
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    tree = out["state"]
    return (tree_to_state(abstract_state, tree) if abstract_state is not None else tree), out["data"], out["meta"]

  def restore_latest(self, abstract_state: Optional[Any] = None):
    """(step, state, data_state, meta) of the newest readable checkpoint, or None when there is none."""
    for step in reversed(self.all_steps()):
      try:
        return (step,) + self.restore(step, abstract_state)
      except Exception as e:  # a damaged checkpoint: say so and fall back to the previous one
        logging.warning("checkpoint at step %d in %s cannot be read (%s: %s); trying the previous one",
                        step, self.directory, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{workdir!r} is not a genjax run directory: {CONFIG_FILE} is missing "
                     f"(train one with `python -m experiments.train --config=... --workdir={workdir}`)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _abstract_from_metadata(meta_tree: Any, sharding) -> Any:
  def one(m):
    return jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype), sharding=sharding)
  return jax.tree.map(one, meta_tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def load_run(workdir: str, step: Optional[int] = None) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, params) of a run for sampling/evaluation: the EMA params when the run kept them.

  Arrays land on the first local device whatever device layout wrote them.
  """
  config = load_config(workdir)
  ckpt = Checkpointer(workdir, keep=max(1, int(config.get("keep_checkpoints", 3))), async_save=False)
  steps = ckpt.all_steps() if step is None else [step]
  if not steps:
    raise ValueError(f"no checkpoint in {ckpt.directory}; the run has not saved one yet")
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  for s in reversed(steps):
    try:
      meta_tree = ckpt.manager.item_metadata(s)["state"]
      abstract = _abstract_from_metadata(meta_tree.tree if hasattr(meta_tree, "tree") else meta_tree, sharding)
      out = ckpt.manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
      tree = out["state"]
      ckpt.manager.close()
      params = tree["ema_params"] if tree.get("ema_params") is not None else tree["params"]
      return config, params
    except Exception as e:
      logging.warning("checkpoint at step %d cannot be read (%s); trying the previous one", s, e)
  raise ValueError(f"no readable checkpoint in {ckpt.directory} (steps {steps})")
