"""What the three benchmarks share: the common absl flags, timing, compile counting, device facts and output.

    from benchmarks import common
    with common.CompileCounter() as cc:           # counts XLA backend compilations (jax.monitoring events)
      t = common.time_call(lambda: fn(x), repeats=5)   # warm-up call first, then the median of >= 5 timed calls
    ts = common.time_interleaved({"a": f, "b": g}, repeats=5)   # the same, calls round-robin: for ratios
    t.first_seconds, t.seconds, cc.count, cc.seconds
    common.write_json(records, path); common.print_table(records, columns, title)
    params = common.random_params(jax.eval_shape(module.init, rng, x))   # host-drawn weights, nothing compiled

Timing rules (every benchmark follows them): a warm-up call compiles first; each timed call ends with
`jax.block_until_ready` on its result; the reported time is the median of at least 5 calls; ratios (overhead,
speed-ups, peer comparisons) are taken between figures measured in the same process, because the machines these
run on are shared and absolute times drift. Compilations are counted with a `jax.monitoring` duration listener on
jax's backend-compile event ("/jax/core/compile/backend_compile_duration", emitted once per XLA compilation; a
persistent-cache hit does not emit it).

Flags defined here (each benchmark module adds its own, with distinct names, so all three can be imported into one
process): --json, --quick, --repeats, --batch_sizes, --peers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from genjax.compiles import CompileCounter  # noqa: F401  (re-exported: benchmarks use common.CompileCounter)

JSON = flags.DEFINE_string("json", None, "Write the records (a JSON list of objects) to this path.")
QUICK = flags.DEFINE_bool("quick", False, "Small CPU-sized run (minutes on a laptop-class CPU).")
REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per figure after the warm-up (the median is reported; "
                               "at least 5).")
BATCH_SIZES = flags.DEFINE_list("batch_sizes", None, "Batch sizes to run (default: per benchmark and --quick).")
PEERS = flags.DEFINE_bool("peers", True, "Time the peer libraries (diffusers / transformers Flax) when installed.")

MIN_REPEATS = 5

# The dense bf16 peak FLOP/s table MFU is reported against is the training loop's (one table for both).


# --------------------------------------------------------------------------------------------- flags -> settings
def batch_sizes(quick_default: Sequence[int], full_default: Sequence[int]) -> list[int]:
  """--batch_sizes, or the benchmark's default for --quick / full runs; errors name the bad value."""
  if BATCH_SIZES.value:
    return parse_ints(BATCH_SIZES.value, "batch_sizes")
  return list(quick_default if QUICK.value else full_default)


def parse_ints(values: Iterable[Any], name: str, minimum: int = 1) -> list[int]:
  out = []
  for v in values:
    try:
      n = int(v)
    except (TypeError, ValueError):
      raise ValueError(f"--{name} must be a comma-separated list of integers, got {v!r}") from None
    if n < minimum:
      raise ValueError(f"--{name} values must be >= {minimum}, got {n}")
    out.append(n)
  if not out:
    raise ValueError(f"--{name} is empty")
  return out


def repeats() -> int:
  if REPEATS.value < MIN_REPEATS:
    raise ValueError(f"--repeats={REPEATS.value}: the median needs at least {MIN_REPEATS} timed calls")
  return int(REPEATS.value)


# --------------------------------------------------------------------------------------------- timing
@dataclasses.dataclass
class Timing:
  first_seconds: float          # the warm-up call (compile + one run)
  seconds: float                # median of the timed calls
  samples: list[float]
  compiles: int                 # backend compilations during the warm-up and timed calls
  compile_seconds: float        # their summed XLA compile time

  @property
  def warmup_overhead_seconds(self) -> float:
    """First call minus a steady call: compilation plus tracing/lowering, as a user waits for it."""
    return max(self.first_seconds - self.seconds, 0.0)


def _timed(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


@dataclasses.dataclass
class FirstCall:
  seconds: float                # wall time of the first call (trace + lower + compile + one run)
  compiles: int                 # backend compilations it triggered
  xla_compile_seconds: float    # their summed XLA compile time

  def overhead(self, steady_seconds: float) -> float:
    """The wait a user sees on the first call beyond a steady call: compilation plus tracing/lowering."""
    return max(self.seconds - steady_seconds, 0.0)


def first_call(fn: Callable[[], Any]) -> FirstCall:
  """Times one call (blocked until ready) and counts the compilations it triggers."""
  with CompileCounter() as cc:
    seconds = _timed(fn)
  return FirstCall(seconds, cc.count, cc.seconds)


def time_call(fn: Callable[[], Any], repeats: int = MIN_REPEATS, warmup: bool = True) -> Timing:
  """Warm-up call (timed separately), then the median of `repeats` (>= 5) calls, each blocked until ready."""
  if repeats < MIN_REPEATS:
    raise ValueError(f"repeats={repeats}: the median needs at least {MIN_REPEATS} timed calls")
  with CompileCounter() as cc:
    first = _timed(fn) if warmup else math.nan
    samples = [_timed(fn) for _ in range(repeats)]
  return Timing(first, statistics.median(samples), samples, cc.count, cc.seconds)


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int = MIN_REPEATS) -> dict[str, Timing]:
  """Like `time_call` for several functions whose times will be compared: after one warm-up call each, the timed
  calls go round-robin (a, b, c, a, b, c, ...), so that load changes on a shared machine hit all of them alike."""
  if repeats < MIN_REPEATS:
    raise ValueError(f"repeats={repeats}: the median needs at least {MIN_REPEATS} timed calls")
  counters = {name: CompileCounter() for name in fns}
  firsts, samples = {}, {name: [] for name in fns}
  for name, fn in fns.items():
    with counters[name]:
      firsts[name] = _timed(fn)
  for _ in range(repeats):
    for name, fn in fns.items():
      with counters[name]:
        samples[name].append(_timed(fn))
  return {name: Timing(firsts[name], statistics.median(samples[name]), samples[name], counters[name].count,
                       counters[name].seconds) for name in fns}


# --------------------------------------------------------------------------------------------- model weights
def random_params(abstract_params: Any, seed: int = 0) -> Any:
  """Random weights with the shapes/dtypes of `abstract_params` (e.g. `jax.eval_shape(module.init, ...)`), drawn
  on the host with numpy, so that no XLA program is compiled for them (a jitted Flax `init` costs seconds of
  compilation per model on CPU, mostly its random-number code). Leaves with >= 2 dims ~ N(0, 1 / fan_in) with fan_in
  the product of all but the last dim; 1-D leaves named "scale" ~ 1 + N(0, 0.01^2), other 1-D/0-D leaves
  ~ N(0, 0.01^2). Benchmark timings do not depend on the values; they only need to be finite and not degenerate."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    shape, dtype = tuple(leaf.shape), leaf.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      return jnp.zeros(shape, dtype)
    name = str(getattr(path[-1], "key", path[-1])) if path else ""
    if len(shape) >= 2:
      values = rng.standard_normal(shape) / np.sqrt(max(int(np.prod(shape[:-1])), 1))
    else:
      values = (1.0 if name == "scale" else 0.0) + 0.01 * rng.standard_normal(shape)
    return jnp.asarray(values.astype(np.dtype(dtype)))

  return jax.tree_util.tree_map_with_path(draw, abstract_params)


# --------------------------------------------------------------------------------------------- the machine
def device_info() -> dict:
  """Platform, device kind and count, jax version and host: stamped on every record."""
  devices = jax.devices()
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind, "num_devices": len(devices),
          "jax": jax.__version__, "host_cpus": os.cpu_count(), "python": platform.python_version()}


def device_label(info: Optional[dict] = None) -> str:
  info = info or device_info()
  return f"{info['device_kind']} x{info['num_devices']} ({info['platform']}, jax {info['jax']})"


def on_accelerator() -> bool:
  return jax.devices()[0].platform in ("gpu", "tpu", "cuda", "rocm")


# --------------------------------------------------------------------------------------------- output
def write_json(records: list[dict], path: Optional[str]) -> None:
  """Writes `records` (a list of flat dicts, NaN/inf as null) to `path` (no-op for None)."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump([{k: _jsonable(v) for k, v in r.items()} for r in records], f, indent=1)
    f.write("\n")


def _jsonable(v):
  if isinstance(v, float) and not math.isfinite(v):
    return None
  if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy / jax scalars
    return _jsonable(v.item())
  return v


def fmt(v: Any) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "n/a"
  if isinstance(v, bool):
    return "yes" if v else "no"
  if isinstance(v, float):
    if v == 0:
      return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
      return f"{v:.3g}"
    return f"{v:.4g}" if a < 100 else f"{v:.1f}"
  return str(v)


def format_table(records: list[dict], columns: Sequence[str], title: str = "") -> str:
  """A plain fixed-width table of `columns` (missing values print as "-")."""
  rows = [[fmt(r[c]) if c in r else "-" for c in columns] for r in records]
  widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)]
  line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
  out = ([title] if title else []) + [line, "-" * len(line)]
  out += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
  return "\n".join(out)


def print_table(records: list[dict], columns: Sequence[str], title: str = "") -> None:
  print(format_table(records, columns, title), flush=True)


def stamp(records: list[dict], benchmark: str, info: Optional[dict] = None) -> list[dict]:
  """Adds the benchmark name and the device facts to every record (in place) and returns them."""
  info = info or device_info()
  for r in records:
    r.setdefault("benchmark", benchmark)
    r.setdefault("device", device_label(info))
    r.setdefault("platform", info["platform"])
  return records
