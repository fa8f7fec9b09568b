r"""Train any genjax family: one absl launcher, one loop (`genjax-train` once installed, `pip install -e .`):

  python -m experiments.train --config=experiments/configs/vae.py:digits --workdir=runs/vae
  python -m experiments.train --config=experiments/configs/ddpm.py:digits --workdir=runs/ddpm \
      --config.num_train_steps=500 --config.parallel=pmap
  python -m experiments.train --config=experiments/configs/gan.py:digits --print_config   # every field, then exit
  # multi-host (run on every host; on GPU/TPU clusters initialize() can discover the rest itself):
  python -m experiments.train --config=... --workdir=... --multihost \
      --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0

Rerunning on the same --workdir resumes from its latest checkpoint. A bad flag, config key or value, or workdir is
one `error: ...` line (exit status 2) before anything is compiled or written.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re

import jax
from absl import flags, logging
from ml_collections import config_flags

from experiments import cli
from genjax.train.preemption import Interrupted
from genjax.train.trainer import train_and_evaluate
from genjax.train.workdir import check_workdir

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and variant, e.g. experiments/configs/vae.py:digits (paths are also looked up "
    "from the repository root). Override any field with --config.<field>=<value>, e.g. "
    "--config.num_train_steps=500; --print_config lists every field.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and sample grids (created if "
                               "missing; rerun on it to resume).")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config (every field, with the "
                                  "--config.* overrides applied) and exit without training.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() before anything else.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_CPU_COLLECTIVES = flags.DEFINE_string("cpu_collectives", "gloo", "CPU collectives for multi-process CPU runs.")


def init_distributed() -> None:
  """Multi-host setup; must run before anything touches the JAX backend."""
  if _CPU_COLLECTIVES.value:
    jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                             process_id=_PROCESS_ID.value)


def run(config, workdir: str):
  """The family's Task (outside weights resolved by `cli.task_for`) → the shared loop. Returns the final
  TrainState."""
  return train_and_evaluate(config, workdir, cli.task_for)   # checks the workdir and the shared config values first


def _config_argument(argv: list[str]) -> tuple[int, str] | None:
  """(index in argv, value) of --config=VALUE / --config VALUE."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return i, arg[len("--config="):]
    if arg == "--config" and i + 1 < len(argv):
      return i + 1, argv[i + 1]
  return None


def resolve_config_path(argv: list[str]) -> list[str]:
  """A relative --config path that is missing here but exists under the repository root is read from there, so
  the launcher works from any directory."""
  found = _config_argument(argv)
  if found is None:
    return argv
  i, value = found
  path, sep, variant = value.partition(":")
  if path and not os.path.isabs(path) and not os.path.exists(path):
    candidate = os.path.join(cli.REPO_ROOT, path)
    if os.path.exists(candidate):
      argv = list(argv)
      argv[i] = argv[i][: len(argv[i]) - len(value)] + candidate + sep + variant
  return argv


def _base_config(config_arg: str):
  """The config file's config without --config.* overrides (for naming the valid fields), or None."""
  path, _, variant = config_arg.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_genjax_config_for_message", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()
  except Exception:   # only used to improve a message; the original error is reported either way
    return None


def unknown_override_message(argv: list[str]) -> str | None:
  """'unknown config field ...' naming the valid fields at that level, for the first --config.* override whose
  path is not in the config."""
  found = _config_argument(argv)
  base = _base_config(found[1]) if found else None
  if base is None:
    return None
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].partition("=")[0]
    node, walked = base, []
    for part in path.split("."):
      if not hasattr(node, "keys") or part not in node:
        where = "config." + ".".join(walked) if walked else "config"
        valid = sorted(node.keys()) if hasattr(node, "keys") else []
        return (f"unknown config field {path!r} in {arg.partition('=')[0]}; {where} has: {', '.join(valid)} "
                f"(see them all with --print_config)")
      node, walked = node[part], walked + [part]
  return None


def parse_flags(argv):
  """absl flag parsing where a user mistake (unknown flag or variant, missing config file, unknown config key,
  stray argument, missing --workdir) is one `error: ...` line and exit status 2 instead of a traceback."""
  argv = resolve_config_path(argv)
  try:
    rest = flags.FLAGS(argv)
    config = _CONFIG.value           # a config file that failed to load raises only when first read
    if config is not None:
      config.get("family")
  except (flags.Error, ValueError, TypeError, KeyError, AttributeError, OSError) as e:
    cli.fail(_flag_error_message(e, argv))
  if len(rest) > 1:
    cli.fail(f"unexpected arguments: {rest[1:]} (flags look like --name=value)")
  if _CONFIG.value is None:
    cli.fail("--config is required, e.g. --config=experiments/configs/vae.py:digits")
  if _WORKDIR.value is None and not _PRINT_CONFIG.value:
    cli.fail("--workdir is required: the directory for checkpoints, metrics and samples, e.g. --workdir=runs/vae")
  return rest


def _flag_error_message(e: Exception, argv: list[str]) -> str:
  if isinstance(e, AttributeError) and e.args and isinstance(e.args[0], KeyError):
    e = e.args[0]                                       # config_flags wraps a bad nested override
  lines = [line.strip() for line in str(e.args[0] if isinstance(e, KeyError) else e).splitlines() if line.strip()]
  if isinstance(e, KeyError):                           # ml_collections: 'modle' \n Did you mean "model" ...
    message = unknown_override_message(argv)
    if message is None:
      message = f"unknown config field {lines[0].strip(chr(39))!r} in a --config.* override"
      message += "".join(f"; {line}" for line in lines[1:])
  elif isinstance(e, OSError) or any(line.startswith("Traceback") for line in lines):
    message = re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])   # the config file's error, without its class
  else:
    message = " ".join(lines)
  if isinstance(e, OSError):
    here = os.path.join(cli.REPO_ROOT, "experiments", "configs")
    names = sorted(os.path.basename(f) for f in glob.glob(os.path.join(here, "*.py")))
    message += f"; configs: {[n for n in names if n not in ('__init__.py', 'common.py')]}"
  return message


def main(argv):
  del argv
  if _PRINT_CONFIG.value:
    print(_CONFIG.value)
    return
  check_workdir(_WORKDIR.value)
  if _MULTIHOST.value:
    init_distributed()
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except Interrupted as e:     # saved at the interrupted step and said so; 130 (SIGINT) / 143 (SIGTERM)
    raise SystemExit(e.exit_code) from None
  logging.info("next: python -m experiments.sample --workdir=%s   (or experiments.evaluate)", _WORKDIR.value)


def entry() -> None:
  """The `genjax-train` console script: `python -m experiments.train` with the same flags."""
  cli.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  entry()
