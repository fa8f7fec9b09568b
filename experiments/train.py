r"""Train any genjax family: one absl launcher, one loop.

  python -m experiments.train --config=experiments/configs/vae.py:digits --workdir=runs/vae
  python -m experiments.train --config=experiments/configs/ddpm.py:digits --workdir=runs/ddpm \
      --config.num_train_steps=500 --config.parallel=pmap
  # multi-host (run on every host; on GPU/TPU clusters initialize() can discover the rest itself):
  python -m experiments.train --config=... --workdir=... --multihost \
      --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0

Rerunning on the same --workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import glob
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. experiments/configs/vae.py:digits",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and sample grids.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() before anything else.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_CPU_COLLECTIVES = flags.DEFINE_string("cpu_collectives", "gloo", "CPU collectives for multi-process CPU runs.")


def init_distributed() -> None:
  """Multi-host setup; must run before anything touches the JAX backend."""
  import jax
  if _CPU_COLLECTIVES.value:
    jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                             process_id=_PROCESS_ID.value)


def run(config, workdir: str):
  """get the family's Task → the shared loop. Returns the final TrainState."""
  from genjax.models import get_task
  from genjax.train.trainer import check_config, train_and_evaluate
  check_config(config)   # before the family reads the config: a bad shared value is named, not a traceback
  return train_and_evaluate(config, workdir, get_task(config))


def parse_flags(argv):
  """absl flag parsing where a user mistake (unknown flag or variant, missing config file, unknown config key,
  stray argument) is one `error: ...` line and exit status 1 instead of a traceback or the whole usage text."""
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value.get("family")      # a config file that failed to load raises only when first read
    if not _WORKDIR.value.strip():
      raise ValueError(f"--workdir={_WORKDIR.value!r} is empty; name a directory for checkpoints and metrics")
    if len(rest) > 1:
      raise ValueError(f"unexpected arguments: {rest[1:]}")
    return rest
  except (flags.Error, ValueError, TypeError, KeyError, AttributeError, OSError) as e:
    if isinstance(e, AttributeError) and e.args and isinstance(e.args[0], KeyError):
      e = e.args[0]                                       # config_flags wraps a bad nested override
    lines = [line.strip() for line in str(e.args[0] if isinstance(e, KeyError) else e).splitlines() if line.strip()]
    if isinstance(e, KeyError):                           # ml_collections: 'modle' \n Did you mean "model" ...
      message = f"unknown config field {lines[0].strip(chr(39))!r} in a --config.* override"
      message += "".join(f"; {line}" for line in lines[1:])
    elif isinstance(e, OSError) or any(line.startswith("Traceback") for line in lines):
      message = lines[-1]
    else:
      message = " ".join(lines)
    if isinstance(e, OSError):
      here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
      names = sorted(os.path.basename(f) for f in glob.glob(os.path.join(here, "*.py")))
      message += f"; configs: {[n for n in names if n not in ('__init__.py', 'common.py')]}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _MULTIHOST.value:
    init_distributed()
  import jax
  logging.info("JAX %s: process %d of %d, %d devices (%s)", jax.__version__, jax.process_index(),
               jax.process_count(), jax.device_count(), jax.devices()[0].platform)
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, KeyError, OSError, RuntimeError, FloatingPointError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])   # here, not at import: tests and benchmarks import this
  app.run(main, flags_parser=parse_flags)
