"""What a scale user reads at the start and in every log line: parameter counts, the device layout, FLOPs per step
from XLA's cost analysis of the compiled step, and MFU against the devices' peak.

    flops = step_flops(compiled_step, num_devices)       # None when XLA reports no cost analysis
    peak = peak_flops_per_device(config.peak_flops)      # table below by device kind; None on CPU unless given
    mfu = flops * steps_per_second / (peak * num_devices)

MFU ("model FLOPs utilisation", Chowdhery et al. 2022) here uses the compiled program's FLOPs, which for a
transformer LM are close to the analytic 6 · parameters · tokens of a training step (forward 2, backward 4).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import jax
import numpy as np

from genjax.train.step import select

# Dense bf16 peak FLOP/s per chip, by `device_kind` prefix (vendor data sheets; no sparsity). An unlisted device (and
# every CPU) gets no MFU unless `config.peak_flops` says its peak.
PEAK_FLOPS = (
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12),       # SXM; the PCIe card is lower (756e12) but reports the same kind prefix
    ("NVIDIA A100", 312e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA A10G", 125e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)


def peak_flops(device_kind: str) -> Optional[float]:
  """Dense bf16 peak FLOP/s of one device of this kind, or None (CPU, or a kind not in PEAK_FLOPS)."""
  for prefix, peak in PEAK_FLOPS:
    if device_kind.startswith(prefix):
      return peak
  return None


def peak_flops_per_device(override: float = 0.0) -> Optional[float]:
  """`override` when > 0, else the table's value for this machine's first device."""
  if override and float(override) > 0:
    return float(override)
  return peak_flops(jax.devices()[0].device_kind)


def compiled_flops(compiled) -> Optional[float]:
  """FLOPs of one call of a compiled executable from XLA's cost analysis (None when XLA reports none)."""
  try:
    analysis = compiled.cost_analysis()      # None where the backend does not implement it
  except jax.errors.JaxRuntimeError:         # the analysis itself failed: no MFU in the log, the run goes on
    return None
  if isinstance(analysis, (list, tuple)):   # older jax: one dict per program
    analysis = analysis[0] if analysis else None
  flops = float(analysis.get("flops", 0.0)) if analysis else 0.0
  return flops if flops > 0 and math.isfinite(flops) else None


def step_flops(compiled, num_devices: int) -> Optional[float]:
  """FLOPs of one training step on all devices: XLA analyses one device's program (SPMD / pmap) of the step."""
  per_device = compiled_flops(compiled)
  return None if per_device is None else per_device * num_devices


def count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def format_count(n: float) -> str:
  for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= size:
      return f"{n / size:.3g}{unit}"
  return f"{n:.3g}"


def params_summary(task, params: Any) -> str:
  """`1.23M parameters (disc 0.4M, gen 0.83M)`: the total and, with several phases, each phase's sub-tree."""
  total = count_params(params)
  if len(task.phases) == 1:
    return f"{format_count(total)} parameters ({total:,})"
  parts = ", ".join(f"{ph.name} {format_count(count_params(select(params, ph.params_key)))}" for ph in task.phases)
  return f"{format_count(total)} parameters ({parts})"


def layout_summary(built) -> str:
  """The mesh and how the params lie on it (pjit), or the pmap replication."""
  if built.mesh is None:
    return f"pmap over {jax.local_device_count()} local devices ({jax.device_count()} in all), state replicated"
  mesh = built.mesh
  axes = " × ".join(f"{a}={n}" for a, n in mesh.shape.items())
  params = jax.tree.leaves(built.shardings.params)
  sharded = sum(not s.is_fully_replicated for s in params)
  return (f"mesh {axes} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices; batch over "
          f"{built.batch_devices}; {sharded} of {len(params)} param arrays sharded, the rest replicated")
