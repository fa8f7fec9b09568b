r"""Training throughput per family: the bare jitted step vs the full shared loop, FLOPs, MFU, data-parallel scaling.

  python -m benchmarks.train_step --quick --json=/tmp/train_step.json           # CPU-sized
  python -m benchmarks.train_step --train_configs=ddpm.py:cifar10 --log_every=50 --json=train_gpu.json
  python -m benchmarks.train_step --train_configs=vae.py:digits --train_override=model.hidden=32 \
      --train_override=batch_size=16 --scaling_devices=1,2                      # overrides apply where the key exists

For each config (`--train_configs`, files in experiments/configs/, default one per family: ddpm, vae, gan, lm on
their offline data sets), at the config's global batch:

  bare_step   the loop's own step function from the loop's builder (`genjax.train.builder.build`: the pjit
              shardings and donation the loop uses), fed one device-resident batch: steps/s = median over >= 5 runs of
              `log_every` back-to-back steps (blocked at the end of each run).
  full_loop   `genjax.train.trainer.train_and_evaluate` as users run it: data pipeline, host-to-device batches,
              metrics logging every `log_every` steps (metrics.jsonl + TensorBoard) and async orbax checkpoints, in a
              temporary workdir; timed by the loop's "log" hook (called right after each metrics write), so
              compilation (before the first write) is excluded. The run saves
              every 3 log intervals so that the save cost can be measured: `steady_steps_per_second` (intervals
              without a save), `checkpoint_seconds` (the extra time of an interval holding a save), and
              `steps_per_second` = the two combined at the config's own `checkpoint_every_steps`
              (`window_steps_per_second`: the raw window, a save every 3 intervals). The task's evaluation and sample
              grids are switched off (periodic extras, not per-step work). `vs_bare` = full-loop / bare steps/s
              (goal >= 0.95).
  FLOPs       per step, from XLA's cost analysis of the compiled bare step (`jit(...).lower(...).compile()`);
              achieved TFLOP/s, and MFU against the device's dense bf16 peak on GPUs/TPUs (table in
              benchmarks/common.py); "n/a" on CPU or an unlisted device.
  scaling     the bare pjit step of one config (`--scaling_config`, default the first) at a fixed global batch over
              1/2/4/8 devices. These are SIMULATED CPU devices (`--xla_force_host_platform_device_count`, one
              subprocess per count): they share the host's cores, so this shows the data-parallel path working and
              its overhead, not accelerator speed-up.

Two more sections (`--train_sections`, default all three: throughput = the rows above) time the LM step as `build`
makes it (benchmarks/train_step_lm.py says exactly how): compile_depth = compile seconds of `--lm_depths` (2,8,24)
layers with and without `model.scan_layers`; remat_memory = `compiled.memory_analysis()` of the step at
`--remat_layers` (8) layers for each `model.remat` policy, unrolled and scanned.

  python -m benchmarks.train_step --train_sections=compile_depth,remat_memory --json=/tmp/lm_step.json
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

import jax
from absl import app, flags

from benchmarks import common
from benchmarks import train_step_lm as lm
from benchmarks.fault_worker import worker_env
from genjax.errors import UserError, check_choice
from genjax.train.throughput import compiled_flops, peak_flops

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = ("ddpm.py:digits", "vae.py:digits", "gan.py:digits", "lm.py:pydoc")
LOOP_INTERVALS = 6                 # measured log intervals of the full loop (plus one that holds compilation)
CHECKPOINT_EVERY_INTERVALS = 3
WORKER_TIMEOUT_S = 1800
SIMULATED_NOTE = "simulated CPU devices sharing the host's cores: shows the data-parallel path, not speed-up"
SECTIONS = ("throughput", "compile_depth", "remat_memory")

_CONFIGS = flags.DEFINE_list("train_configs", list(DEFAULT_CONFIGS),
                             "Configs (experiments/configs/<file>:<variant>) to benchmark, one per family.")
_OVERRIDES = flags.DEFINE_multi_string("train_override", [], "key=value set on every config that has the key, "
                                       "e.g. model.hidden=32 or batch_size=16 (values are Python literals).")
_LOG_EVERY = flags.DEFINE_integer("log_every", None, "Steps per timed run / log interval (default 5 with --quick, "
                                  "else 20).")
_SCALING_DEVICES = flags.DEFINE_list("scaling_devices", ["1", "2", "4", "8"],
                                     "Simulated device counts for the data-parallel scaling rows (empty: skip).")
_SCALING_CONFIG = flags.DEFINE_string("scaling_config", None, "Config for the scaling rows (default: the first).")
_WORKER = flags.DEFINE_integer("scaling_worker", 0, "Internal: run one scaling measurement in this process.")
_SECTIONS = flags.DEFINE_list("train_sections", list(SECTIONS), f"Sections to run, of {', '.join(SECTIONS)}.")
_LM_CONFIG = flags.DEFINE_string("train_lm_config", "lm.py:pydoc", "LM config of the compile_depth / remat_memory "
                                  "rows.")
_LM_OVERRIDES = flags.DEFINE_multi_string("lm_override", [], "key=value set on the LM config after the widening "
                                          f"{', '.join(lm.LM_WIDE)}.")
_LM_DEPTHS = flags.DEFINE_list("lm_depths", ["2", "8", "24"], "Layer counts of the compile_depth rows.")
_COMPILE_REPEATS = flags.DEFINE_integer("compile_repeats", None, "Fresh compiles per compile_depth row (median; "
                                        "default 1 with --quick, else 3).")
_REMAT_LAYERS = flags.DEFINE_integer("remat_layers", 8, "Layer count of the remat_memory rows.")
_REMAT_POLICIES = flags.DEFINE_list("remat_policies", list(lm.REMATS), "model.remat policies of the remat_memory rows.")

COLUMNS = ("family", "mode", "batch", "devices", "steps_per_second", "examples_per_second", "vs_bare",
           "checkpoint_seconds", "flops_per_step", "tflops_per_second", "mfu", "speedup_vs_1_device")


# --------------------------------------------------------------------------------------------- configs
def load_config(spec: str, overrides=()):
  """`ddpm.py:digits` (or a path to a config file + `:variant`) -> ConfigDict with `overrides` applied."""
  import importlib.util
  path, _, variant = spec.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(_REPO, "experiments", "configs", path)
  if not os.path.exists(path):
    raise ValueError(f"config file {spec!r} not found; e.g. {', '.join(DEFAULT_CONFIGS)}")
  module_spec = importlib.util.spec_from_file_location(f"_bench_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant or None)
  for key, value in overrides:
    apply_override(config, key, value)
  return config


def parse_overrides(items) -> list[tuple[str, object]]:
  out = []
  for item in items:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--train_override must be key=value, got {item!r}")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    out.append((key.strip(), value))
  return out


def _parent(config, key: str):
  """(the ConfigDict holding `key`'s last part, that part), or (None, part) when the path does not exist."""
  *path, last = key.split(".")
  node = config
  for p in path:
    if not hasattr(node, "keys") or p not in node:
      return None, last
    node = node[p]
  return (node, last) if hasattr(node, "keys") and last in node else (None, last)


def apply_override(config, key: str, value) -> bool:
  """Sets config.<key> = value when the key exists (True), else leaves the config alone (False)."""
  node, last = _parent(config, key)
  if node is None:
    return False
  node[last] = value
  return True


def _family(config) -> str:
  return str(config.family)


# --------------------------------------------------------------------------------------------- the bare step
@dataclasses.dataclass
class BareStep:
  steps_per_second: float
  flops_per_device: Optional[float]     # XLA cost analysis of the compiled (per-device SPMD) program
  compile_seconds: float
  devices: int


def bare_step(config, log_every: int, repeats: int, state=None) -> BareStep:
  """The loop's step from the loop's own builder (`genjax.train.builder.build`: shardings, donation), on one
  device-resident batch (see docstring).

  `state`: a TrainState to start from with the loop's shardings (the full loop's final state: saves compiling the
  initialisation a second time); None = initialise as the loop does.
  """
  from genjax.models import get_task
  from genjax.train.builder import build
  from genjax.train.trainer import make_train_iterator
  batches = make_train_iterator(config)
  batch = next(batches)
  batches.close()
  built = build(config, get_task(config), {k: v[:1] for k, v in batch.items()})
  if state is None:
    state = built.init_fn(jax.random.PRNGKey(int(config.seed)))
  device_batch = built.put_batch(batch)
  start = time.perf_counter()
  compiled = built.step_fn.lower(state, device_batch).compile()
  state, _ = compiled(state, device_batch)
  jax.block_until_ready(state)
  compile_seconds = time.perf_counter() - start
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(log_every):
      state, metrics = compiled(state, device_batch)
    jax.block_until_ready((state, metrics))
    samples.append(log_every / (time.perf_counter() - start))
  devices = built.mesh.devices.size if built.mesh is not None else jax.device_count()
  return BareStep(statistics.median(samples), compiled_flops(compiled), compile_seconds, devices)


# --------------------------------------------------------------------------------------------- the full loop
@dataclasses.dataclass
class LoopTiming:
  steady_steps_per_second: float       # log intervals with no checkpoint save in them
  checkpoint_seconds: Optional[float]  # extra wall time of an interval that holds an async save (mean)
  window_steps_per_second: float       # the whole measured window, saves every CHECKPOINT_EVERY_INTERVALS included

  def amortized(self, checkpoint_every_steps: int) -> float:
    """Steps/s with one save per `checkpoint_every_steps` steps (the config's cadence)."""
    extra = (self.checkpoint_seconds or 0.0) / max(int(checkpoint_every_steps), 1)
    return 1.0 / (1.0 / self.steady_steps_per_second + extra)


def full_loop(config, log_every: int):
  """(LoopTiming, the final TrainState) of `train_and_evaluate`, timed by its "log" hook (see module docstring).

  Stamps come at steps L, 2L, ..., (LOOP_INTERVALS + 1) L; a save at step s (a multiple of
  CHECKPOINT_EVERY_INTERVALS * L) runs right after the stamp at s, so its cost falls in the interval (s, s + L].
  """
  from genjax.models import get_task
  from genjax.train.trainer import train_and_evaluate
  c = copy.deepcopy(config)
  every = log_every * CHECKPOINT_EVERY_INTERVALS
  c.num_train_steps = log_every * (LOOP_INTERVALS + 1)
  c.log_every_steps = log_every
  c.checkpoint_every_steps = every
  c.eval_every_steps = 0
  c.sample_every_steps = 0
  c.async_checkpointing = True
  task = dataclasses.replace(get_task(c), evaluate=None, sample_images=None, sample_text=None)
  workdir = tempfile.mkdtemp(prefix="genjax_bench_loop_")
  stamps: list = []

  def stamp(event: str, step: int, info: dict) -> None:
    if event == "log":
      stamps.append((time.perf_counter(), int(step)))

  try:
    state = train_and_evaluate(c, workdir, task, hooks=(stamp,))
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  if len(stamps) < 3:
    raise RuntimeError(f"the loop logged {len(stamps)} times; need >= 3 to time it")
  clean, saving = [], []
  for (t0, s0), (t1, s1) in zip(stamps, stamps[1:]):
    (saving if s0 % every == 0 else clean).append((s1 - s0, t1 - t0))
  steady = sum(n for n, _ in clean) / sum(dt for _, dt in clean)
  ckpt = statistics.mean(dt - n / steady for n, dt in saving) if saving else None
  (ta, sa), (tb, sb) = stamps[0], stamps[-1]
  return LoopTiming(steady, None if ckpt is None else max(ckpt, 0.0), (sb - sa) / (tb - ta)), state


# --------------------------------------------------------------------------------------------- scaling
def scaling_rows(spec: str, overrides: list[str], device_counts: list[int], log_every: int,
                 repeats: int) -> list[dict]:
  """One subprocess per simulated device count, each timing the bare pjit step at the same global batch."""
  rows = []
  with tempfile.TemporaryDirectory(prefix="genjax_bench_scaling_") as tmp:
    for n in device_counts:
      out = os.path.join(tmp, f"devices_{n}.json")
      cmd = [sys.executable, "-m", "benchmarks.train_step", f"--scaling_worker={n}", f"--train_configs={spec}",
             f"--json={out}", f"--log_every={log_every}", f"--repeats={repeats}"]
      cmd += [f"--train_override={o}" for o in overrides]
      try:
        proc = subprocess.run(cmd, cwd=_REPO, env=worker_env(n), capture_output=True, text=True,
                              timeout=WORKER_TIMEOUT_S)
      except subprocess.TimeoutExpired:
        rows.append(_row("scaling", spec, None, n, simulated=True,
                         status=f"worker timed out after {WORKER_TIMEOUT_S} s"))
        continue
      if proc.returncode != 0 or not os.path.exists(out):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        rows.append(_row("scaling", spec, None, n, simulated=True,
                         status=f"worker failed (rc {proc.returncode}): {tail[0]}"[:200]))
        continue
      with open(out) as f:
        rows.extend(json.load(f))
  base = next((r["steps_per_second"] for r in rows if r["devices"] == 1 and r["steps_per_second"]), None)
  for r in rows:
    if base and r["steps_per_second"]:
      r["speedup_vs_1_device"] = r["steps_per_second"] / base
      r["efficiency"] = r["speedup_vs_1_device"] / r["devices"]
  return rows


def worker_main(num_devices: int) -> None:
  """Runs inside a scaling subprocess: checks the simulated device count, times the bare step, writes JSON."""
  if jax.device_count() != num_devices:
    raise RuntimeError(f"scaling worker expected {num_devices} devices, JAX sees {jax.device_count()} "
                       f"(XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
  spec = _CONFIGS.value[0]
  config = load_config(spec, parse_overrides(_OVERRIDES.value))
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
  b = bare_step(config, _log_every(), common.repeats())
  r = _row("scaling", spec, config, num_devices, steps=b.steps_per_second)
  r.update(simulated=True, note=SIMULATED_NOTE)
  _throughput(r, b.flops_per_device, common.device_info())
  common.write_json(common.stamp([r], "train_step"), common.JSON.value)


# --------------------------------------------------------------------------------------------- LM depth and remat
def lm_rows(sections: list[str]) -> list[dict]:
  """The compile_depth / remat_memory rows (benchmarks/train_step_lm.py) of `--train_lm_config` + LM_WIDE."""
  overrides = parse_overrides(lm.LM_WIDE) + parse_overrides(_LM_OVERRIDES.value)
  base = load_config(_LM_CONFIG.value)
  unknown = [k for k, _ in overrides if _parent(base, k)[0] is None]
  if unknown:
    raise UserError(f"--lm_override keys {unknown} are not in {_LM_CONFIG.value}")

  def make_config(layers: int, scan: bool, remat: str):
    depth = [("model.num_layers", layers), ("model.scan_layers", scan), ("model.remat", remat)]
    return load_config(_LM_CONFIG.value, overrides + depth)

  measured = []
  if "compile_depth" in sections:
    measured += lm.compile_depth(make_config, common.parse_ints(_LM_DEPTHS.value, "lm_depths"), _compile_repeats())
  if "remat_memory" in sections:
    policies = [check_choice("--remat_policies", p, lm.REMATS) for p in _REMAT_POLICIES.value]
    measured += lm.remat_memory(make_config, common.parse_ints([_REMAT_LAYERS.value], "remat_layers")[0], policies)
  return [_row(mode, _LM_CONFIG.value, config, jax.device_count(), **f) for mode, config, f in measured]


# --------------------------------------------------------------------------------------------- the benchmark
def _row(mode: str, spec: str, config, devices: Optional[int], steps: Optional[float] = None, **extra) -> dict:
  batch = int(config.batch_size) if config is not None else None
  r = dict(family=_family(config) if config is not None else spec.split(".")[0], config=spec, mode=mode,
           batch=batch, devices=devices, steps_per_second=steps,
           examples_per_second=steps * batch if steps and batch else None, vs_bare=None, flops_per_step=None,
           tflops_per_second=None, mfu=None, speedup_vs_1_device=None, simulated=False, status="ok")
  r.update(extra)
  return r


def _throughput(r: dict, flops_per_device: Optional[float], info: dict) -> None:
  """FLOPs per step (XLA's cost analysis of an SPMD program counts one device's share: times the device count),
  achieved TFLOP/s and, on a known accelerator, MFU against devices x the per-device peak."""
  devices = int(r["devices"] or 1)
  flops = flops_per_device * devices if flops_per_device else None
  r["flops_per_step"] = flops
  if flops and r["steps_per_second"]:
    achieved = flops * r["steps_per_second"]
    r["tflops_per_second"] = achieved / 1e12
    peak = peak_flops(info["device_kind"]) if common.on_accelerator() else None
    r["mfu"] = achieved / (peak * devices) if peak else None


def run(specs, overrides: list[str], log_every: int, repeats: int, scaling_devices: list[int],
        scaling_spec: Optional[str]) -> list[dict]:
  parsed = parse_overrides(overrides)
  configs = {spec: load_config(spec, ()) for spec in specs}
  unused = [k for k, _ in parsed if all(_parent(c, k)[0] is None for c in configs.values())]
  if unused:
    raise ValueError(f"--train_override keys {unused} exist in none of {list(specs)}")
  info = common.device_info()
  records = []
  for spec in specs:
    config = load_config(spec, parsed)
    lt, final_state = full_loop(config, log_every)
    b = bare_step(config, log_every, repeats, state=final_state)
    del final_state
    bare = _row("bare_step", spec, config, b.devices, b.steps_per_second, compile_seconds=b.compile_seconds)
    _throughput(bare, b.flops_per_device, info)
    rate = lt.amortized(int(config.checkpoint_every_steps))
    loop = _row("full_loop", spec, config, b.devices, rate, vs_bare=rate / b.steps_per_second,
                steady_steps_per_second=lt.steady_steps_per_second, checkpoint_seconds=lt.checkpoint_seconds,
                checkpoint_every_steps=int(config.checkpoint_every_steps),
                window_steps_per_second=lt.window_steps_per_second)
    _throughput(loop, b.flops_per_device, info)
    records += [bare, loop]
  if scaling_devices:
    records += scaling_rows(scaling_spec or specs[0], overrides, scaling_devices, log_every, repeats)
  return records


def summary(records: list[dict]) -> list[str]:
  lines = []
  for r in records:
    if r["mode"] == "full_loop" and r["vs_bare"] is not None:
      lines.append(f"{r['family']}: full loop at {r['vs_bare']:.3f}x the bare step's steps/s (goal >= 0.95)")
    if r["status"] != "ok":
      lines.append(f"{r['family']} {r['mode']} ({r['devices']} devices): {r['status']}")
  if any(r["mode"] == "scaling" for r in records):
    lines.append(f"scaling rows: {SIMULATED_NOTE}")
  if not common.on_accelerator():
    lines.append("MFU: n/a on CPU (no peak to compare against); FLOPs are XLA's cost analysis of the compiled step")
  return lines


def _log_every() -> int:
  value = _LOG_EVERY.value or (5 if common.QUICK.value else 20)
  if value < 1:
    raise ValueError(f"--log_every must be >= 1, got {value}")
  return int(value)


def _compile_repeats() -> int:
  value = _COMPILE_REPEATS.value or (1 if common.QUICK.value else 3)
  if value < 1:
    raise UserError(f"--compile_repeats must be >= 1, got {value}")
  return int(value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKER.value:
    worker_main(_WORKER.value)
    return
  sections = [check_choice("--train_sections", s, SECTIONS) for s in _SECTIONS.value]
  info = common.device_info()
  records = []
  if "throughput" in sections:
    devices = common.parse_ints(_SCALING_DEVICES.value, "scaling_devices") if _SCALING_DEVICES.value else []
    records = common.stamp(run(list(_CONFIGS.value), list(_OVERRIDES.value), _log_every(), common.repeats(),
                               devices, _SCALING_CONFIG.value), "train_step", info)
    common.print_table(records, COLUMNS, f"Train step vs full loop on {common.device_label(info)} "
                       "(scaling rows: simulated CPU devices)")
    print("\n".join(summary(records)))
  lm_records = lm_rows(sections)
  if lm_records:
    common.stamp(lm_records, "train_step", info)
    common.print_table(lm_records, lm.COLUMNS, f"LM train step: compile time by depth, memory by remat policy "
                       f"({_LM_CONFIG.value}, {', '.join(lm.LM_WIDE + tuple(_LM_OVERRIDES.value))})")
    print("\n".join(lm.summary(lm_records)))
  common.write_json(records + lm_records, common.JSON.value)


if __name__ == "__main__":
  app.run(main)
