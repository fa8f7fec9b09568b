"""Devices for the loop: the mesh, parameter/batch shardings (pjit path), the replicated layout (pmap path) and
`Built`, what either path (`genjax.train.builder`, `genjax.train.pmap_path`) hands the loop.

Mesh axes are ("data", "fsdp", "tensor"), sizes from `config.mesh` with -1 = the remaining devices. The batch is
split over ("data", "fsdp"). Params are placed by, in order: logical-axis annotations
(`nn.with_logical_partitioning`) mapped to mesh axes by `LOGICAL_AXIS_RULES`; else `config.param_sharding`:
"replicated", or "fsdp" (the largest dimension divisible by the fsdp size goes over "fsdp").
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from genjax.errors import ConfigError
from genjax.train.step import TrainState

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
PARALLEL_MODES = ("pjit", "pmap")
PARAM_SHARDINGS = ("replicated", "fsdp")
LOGICAL_AXIS_RULES = (("batch", BATCH_AXES), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
                      ("kv", None), ("vocab", "tensor"), ("layers", None), ("norm", None))


@dataclasses.dataclass(frozen=True)
class Built:
  """What the loop needs to run a task on its devices (fields in the module docstring's order of use)."""
  parallel: str
  init_fn: Callable[[jax.Array], TrainState]       # rng -> state in step_fn's layout
  step_fn: Callable[[TrainState, Any], tuple]      # (state, device batch) -> (state, metrics); donates state
  put_batch: Callable[[dict], Any]                 # this process's rows of a batch -> step_fn's batch
  put_eval_batch: Callable[[dict], Any]            # this process's rows -> what jitted eval takes with view(state)
  restore_target: TrainState                       # abstract state (with shardings) a checkpoint restores onto
  place: Callable[[TrainState], TrainState]        # a restored state -> step_fn's layout
  view: Callable[[TrainState], TrainState]         # step_fn's layout -> one logical state
  to_save: Callable[[TrainState], TrainState]      # step_fn's layout -> what the checkpointer saves
  shardings: Optional[TrainState]                  # pjit: a NamedSharding per state leaf; pmap: None
  mesh: Optional[jax.sharding.Mesh]                # pjit only
  batch_devices: int                               # devices the global batch is split over


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves -1 in {"data", "fsdp", "tensor"} sizes; errors name the config and the device count."""
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f"unknown mesh axes {sorted(unknown)}; valid: {list(MESH_AXES)}")
  sizes = [int(mesh_config[a]) if a in mesh_config else 1 for a in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"mesh={dict(zip(MESH_AXES, sizes))}: sizes must be positive, at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"mesh={dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) > num_devices:
    raise ConfigError(f"mesh={dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
  """A mesh over all devices, or over the first prod(sizes) of them when the sizes are explicit and smaller.

  Devices are placed by `mesh_utils.create_device_mesh`, which knows the physical topology of TPU slices and GPU
  hosts (the innermost mesh axes land on the fastest links); elsewhere it keeps the device order."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  used = math.prod(shape)
  if used < len(devices) and jax.process_count() > 1:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))} uses {used} of {len(devices)} devices; "
                     "multi-host runs must use every device (set one size to -1)")
  try:
    arranged = mesh_utils.create_device_mesh(shape, devices=list(devices[:used]), allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):   # a subset that no topology rule covers
    arranged = np.asarray(devices[:used]).reshape(shape)
  return Mesh(arranged, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
  if fsdp <= 1 or not shape:
    return P()
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % fsdp == 0:
      return P(*[("fsdp" if i == d else None) for i in range(len(shape))])
  return P()


def param_shardings(boxed_abstract_params: Any, mesh: Mesh, mode: str = "replicated",
                    rules=LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a (possibly `nn.Partitioned`-boxed) abstract params tree; the result is unboxed."""
  if mode not in PARAM_SHARDINGS:
    raise ConfigError(f"param_sharding={mode!r} is not one of {PARAM_SHARDINGS}")
  fsdp = mesh.shape["fsdp"]

  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      spec = nn.logical_to_mesh_axes(leaf.names, rules)
      return NamedSharding(mesh, spec)
    return NamedSharding(mesh, _fsdp_spec(tuple(leaf.shape), fsdp) if mode == "fsdp" else P())

  return jax.tree.map(one, boxed_abstract_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
  """This process's slice → one global jax.Array per field, sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def split_for_pmap(local_batch: Mapping[str, np.ndarray], num_local_devices: int) -> dict:
  """[b, ...] → [num_local_devices, b / num_local_devices, ...] for `jax.pmap`."""
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    if v.shape[0] % num_local_devices:
      raise ValueError(f"local batch of {v.shape[0]} is not divisible by {num_local_devices} local devices")
    out[k] = v.reshape((num_local_devices, v.shape[0] // num_local_devices) + v.shape[1:])
  return out


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """An abstract tree (jax.ShapeDtypeStruct leaves) with a sharding per leaf, e.g. a checkpoint's restore target."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
