r"""The LM train step's compile time against depth and its memory under each remat policy: two sections of
`benchmarks.train_step` (which owns the flags, the configs and the output).

  python -m benchmarks.train_step --train_sections=compile_depth,remat_memory --json=/tmp/lm_step.json
  python -m benchmarks.train_step --train_sections=compile_depth --lm_depths=2,8,24,48 --compile_repeats=5

Both time the step users train: `genjax.train.builder.build(config, task, example_batch).step_fn` (the loop's
shardings and donation), on `--train_lm_config` (default lm.py:pydoc) widened by LM_WIDE (embed 256, MLP 1024,
seq 256, batch 8) so that activations dominate the memory; `--lm_override` sets more keys on top.

  compile_depth  per depth and `model.scan_layers` False / True: compile_seconds = trace + lower + XLA compile
                 (`step_fn.lower(abstract state, device batch).compile()`), `jax.clear_caches()` before each compile
                 and `compiles` (XLA backend compilations, 1 = nothing came from a cache); the median of `repeats`
                 compiles, taken round-robin over the rows so that load changes on a shared machine hit all alike.
                 Goal: flat in depth with scan_layers.
  remat_memory   per `model.remat` policy, unrolled and scanned: `compiled.memory_analysis()` of the step.
                 temp_size_in_bytes: XLA's buffers for intermediates (the activations kept for the backward pass,
                 gradients, optimizer temporaries); argument / output / alias (outputs written into donated
                 arguments) sizes; footprint_bytes = argument + output - alias + temp; peak_memory_in_bytes as XLA
                 reports it (on CPU it is about the argument size: it does not include temp, so it is not a peak).
                 flops_per_step (XLA's cost analysis) shows whether the recomputation is in the program; for a
                 scanned step it counts the loop body once, not once per layer.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax

from benchmarks import common
from genjax.models.lm_layers import REMATS
from genjax.train.throughput import compiled_flops

LM_WIDE = ("model.embed_dim=256", "model.mlp_dim=1024", "dataset.seq_len=256", "batch_size=8")
MEMORY_FIELDS = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "peak_memory_in_bytes")
COLUMNS = ("mode", "layers", "scan_layers", "remat", "compile_seconds", "compiles", "temp_size_in_bytes",
           "footprint_bytes", "flops_per_step")
MEMORY_NOTE = ("XLA's memory_analysis of the compiled step on this device. temp = intermediates (activations saved "
               "for the backward pass, gradients, optimizer temporaries); footprint = argument + output - alias + "
               "temp; peak_memory_in_bytes as XLA reports it")
CPU_MEMORY_NOTE = (" (on CPU about the argument size, not a peak). On CPU an unrolled step's temp is the same for "
                   "every remat policy although the recomputation is in the program (flops_per_step rises): "
                   "XLA:CPU's buffer assignment does not turn it into less memory. Scanned, the saved activations "
                   "are the loop's stacked outputs and remat shrinks them.")


def memory_note() -> str:
  return MEMORY_NOTE + (CPU_MEMORY_NOTE if jax.devices()[0].platform == "cpu" else ".")

MakeConfig = Callable[[int, bool, str], Any]      # (layers, scan_layers, remat) -> config
Measured = tuple[str, Any, dict]                  # (mode, config, the row's fields)


@dataclasses.dataclass
class StepCompile:
  seconds: float                # trace + lower + XLA compile
  xla_seconds: float            # the XLA compile alone (jax.monitoring's backend-compile events)
  compiles: int                 # XLA backend compilations (1: nothing came from a cache)
  compiled: Any


def compile_step(config) -> StepCompile:
  """The loop's step (`build`) lowered on the abstract state and one device batch and compiled, caches cleared."""
  from genjax.models import get_task
  from genjax.train.builder import build
  from genjax.train.trainer import make_train_iterator
  batches = make_train_iterator(config)
  batch = next(batches)
  batches.close()
  built = build(config, get_task(config), {k: v[:1] for k, v in batch.items()})
  device_batch = built.put_batch(batch)
  jax.clear_caches()
  with common.CompileCounter() as cc:
    start = time.perf_counter()
    compiled = built.step_fn.lower(built.restore_target, device_batch).compile()
    seconds = time.perf_counter() - start
  return StepCompile(seconds, cc.seconds, cc.count, compiled)


def memory_fields(compiled) -> dict:
  """The MEMORY_FIELDS of `compiled.memory_analysis()` and footprint_bytes (see the module docstring)."""
  stats = compiled.memory_analysis()
  out = {f: int(getattr(stats, f)) for f in MEMORY_FIELDS}
  out["footprint_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                            - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  return out


def _fields(config, c: StepCompile) -> dict:
  m = config.model
  return dict(layers=int(m.num_layers), scan_layers=bool(m.scan_layers), remat=str(m.remat),
              embed_dim=int(m.embed_dim), seq_len=int(config.dataset.seq_len),
              flops_per_step=compiled_flops(c.compiled))


def compile_depth(make_config: MakeConfig, depths: list[int], repeats: int) -> list[Measured]:
  """("compile_depth", config, fields) per (depth, scan_layers): the median of `repeats` fresh compiles, taken
  round-robin over the rows."""
  configs = {(n, scan): make_config(n, scan, "none") for n in depths for scan in (False, True)}
  runs: dict = {key: [] for key in configs}
  for _ in range(repeats):
    for key, config in configs.items():
      runs[key].append(compile_step(config))
  out = []
  for key, cs in runs.items():
    out.append(("compile_depth", configs[key], dict(
        _fields(configs[key], cs[-1]), compile_seconds=statistics.median(c.seconds for c in cs),
        compile_samples=[c.seconds for c in cs], xla_compile_seconds=statistics.median(c.xla_seconds for c in cs),
        compiles=max(c.compiles for c in cs), **memory_fields(cs[-1].compiled))))
  return out


def remat_memory(make_config: MakeConfig, layers: int, policies=REMATS) -> list[Measured]:
  """("remat_memory", config, fields) per (scan_layers, remat policy): XLA's memory analysis of one compile each."""
  out = []
  for scan in (False, True):
    for remat in policies:
      config = make_config(layers, scan, remat)
      c = compile_step(config)
      out.append(("remat_memory", config, dict(
          _fields(config, c), compile_seconds=c.seconds, xla_compile_seconds=c.xla_seconds, compiles=c.compiles,
          note=memory_note(), **memory_fields(c.compiled))))
  return out


def summary(records: list[dict]) -> list[str]:
  """One line per (section, scan_layers): compile seconds by depth, temp MiB by remat policy."""
  lines = []
  for scan in (False, True):
    kind = "scanned" if scan else "unrolled"
    depth = [r for r in records if r["mode"] == "compile_depth" and r["scan_layers"] == scan]
    if depth:
      secs = " / ".join(f"{r['compile_seconds']:.1f}" for r in depth)
      ratio = depth[-1]["compile_seconds"] / depth[0]["compile_seconds"]
      lines.append(f"compile seconds, {kind}, {'/'.join(str(r['layers']) for r in depth)} layers: {secs} "
                   f"(deepest / shallowest {ratio:.2f}x; goal with scan: flat)")
    mem = [r for r in records if r["mode"] == "remat_memory" and r["scan_layers"] == scan]
    if mem:
      temps = ", ".join(f"{r['remat']} {r['temp_size_in_bytes'] / 2**20:.1f}" for r in mem)
      lines.append(f"temp MiB by remat policy, {mem[0]['layers']} layers {kind}: {temps}")
  return lines
