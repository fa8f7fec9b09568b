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
flags.mark_flags_as_required(["config", "workdir"])


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
  from genjax.train.trainer import train_and_evaluate
  return train_and_evaluate(config, workdir, get_task(config))


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
  except (ValueError, KeyError, PermissionError, RuntimeError, FloatingPointError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
