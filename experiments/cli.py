r"""What every launcher in experiments/ shares: the sample-option flags, the one error contract and log setup, and
loading a run with its Task (`load_run`, `task_for`: launchers ask the Task what it can do, never name a family).

The error contract: a mistake the user can make (a flag, a config key or value, a workdir, a checkpoint step, a
sample option) is one line on stderr, `error: <what is wrong, and what would be valid>`, and exit status 2. Flag
parsing errors come from absl; everything else is a `genjax.errors.UserError` raised by the library. Any other
exception is a bug and keeps its traceback.

    # experiments/foo.py
    from experiments import cli
    def define_flags(): cli.define_sample_option_flags(); ...
    def main(argv): ...                              # raise UserError for bad input
    def entry():                                     # the console script ([project.scripts] in pyproject.toml)
      define_flags()
      cli.run(main)
    if __name__ == "__main__":
      entry()

Sample options (`SAMPLE_OPTIONS`) are defined once here and become the same flags in `experiments.sample` and
`experiments.evaluate`; only the ones given on the command line reach the family's sampler, which names any it
does not understand. Adding an option is one line in `SAMPLE_OPTIONS`.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, Optional

from absl import app, flags

from genjax.core.checkpoint import load_run_at
from genjax.core.task import Task
from genjax.errors import UserError
from genjax.interop import hf
from genjax.models import get_task
from genjax.samplers import registry as sampler_registry
from genjax.train.report import setup_logging

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_USER_ERROR = 2

# name -> (kind, help). kind is an absl DEFINE_<kind>. Every entry is a flag of both `sample` and `evaluate`.
SAMPLE_OPTIONS = {
    "sampler": ("string", f"Diffusion sampler: {sampler_registry.help_text()} (default: the config's)."),
    "num_steps": ("integer", "Diffusion sampler steps (default: the config's)."),
    "eta": ("float", "DDIM eta: 0 is deterministic, 1 is DDPM-like noise."),
    "guidance": ("float", "Classifier-free guidance scale for conditional diffusion (1 = no guidance)."),
    "label": ("integer", "Class label for conditional models (diffusion, GAN): an int in [0, num_classes - 1]; "
                         "diffusion also takes num_classes (the null label: unconditional). Default: the classes "
                         "in turn."),
    "truncation": ("float", "GAN truncation t >= 0: each latent coordinate is drawn from N(0, 1) restricted to "
                            "[-t, t]. Smaller t gives cleaner, less varied images; unset = no truncation."),
    "temperature": ("float", "LM sampling temperature (0 = greedy); VAE latent scale (prior std >= 0)."),
    "top_k": ("integer", "LM top-k (0 = off)."),
    "top_p": ("float", "LM nucleus p in (0, 1]."),
    "repetition_penalty": ("float", "LM repetition penalty (HF-style, 1 = off)."),
    "presence_penalty": ("float", "LM presence penalty (0 = off)."),
    "frequency_penalty": ("float", "LM frequency penalty (0 = off)."),
    "num_beams": ("integer", "LM beam search width (1 = sampling)."),
    "length_penalty": ("float", "LM beam search length penalty."),
    "max_new_tokens": ("integer", "LM tokens to generate."),
    "min_p": ("float", "LM min-p in [0, 1] (0 = off): drop tokens below min_p x the most likely token's probability."),
    "stop": ("multi_string", "LM stop string; repeat the flag for several. A row ends once its text ends with one "
                             "(included in the output)."),
    "allow_longer_context": ("integer", "LM: allow prompt + new tokens up to this length, past the context the model "
                                        "was trained on (at most the model's max_len)."),
}


def define_sample_option_flags() -> None:
  """One absl flag per `SAMPLE_OPTIONS` entry, default None (= the family's default)."""
  for name, (kind, help_) in SAMPLE_OPTIONS.items():
    getattr(flags, f"DEFINE_{kind}")(name, None, help_)


def sample_options_from_flags() -> dict:
  """{name: value} of the sample-option flags given on the command line."""
  return {name: flags.FLAGS[name].value for name in SAMPLE_OPTIONS if flags.FLAGS[name].present}


def fail(message: str) -> None:
  """The one way a launcher reports a user's mistake: `error: ...` on stderr, exit status 2."""
  message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing where a bad or missing flag is one `error:` line (exit 2), not absl's usage dump."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e))
  if len(rest) > 1:
    fail(f"unexpected arguments: {rest[1:]} (flags look like --name=value)")
  return rest


def run(main: Callable[[list[str]], None], flags_parser: Callable[[list[str]], list[str]] = parse_flags) -> None:
  """`app.run(main)` under the error contract: flag errors and `UserError` are one `error:` line and exit 2."""
  def guarded(argv):
    setup_logging()
    try:
      main(argv)
    except UserError as e:
      fail(str(e))
  app.run(guarded, flags_parser=flags_parser)


def task_for(config) -> Task:
  """The family's Task for `config`, with the outside weights `config.model.init_from` names read by
  `genjax.interop` (the models never import it): what every launcher trains, samples, evaluates or exports."""
  return get_task(config, pretrained=hf.pretrained_for(config))


def check_run_dir(workdir: str) -> None:
  """A --workdir that cannot hold a trained run (missing, or a file), named before anything is read."""
  if not os.path.isdir(workdir):
    what = "a file" if os.path.exists(workdir) else "missing"
    raise UserError(f"--workdir={workdir!r} is {what}, not a run directory (train one with "
                    f"`python -m experiments.train --config=... --workdir=<a new directory>`)")


@dataclasses.dataclass(frozen=True)
class LoadedRun:
  """A trained run as sample / evaluate / export / steps_sweep use it."""
  config: Any
  params: Any
  step: int                   # the checkpoint actually loaded (an older one when the newest is unreadable)
  task: Task


def load_run(workdir: str, step: Optional[int] = None) -> LoadedRun:
  """The run in `workdir` at `step` (default: its newest readable checkpoint, `genjax.core.checkpoint.load_run_at`)
  and its Task."""
  check_run_dir(workdir)
  config, params, loaded = load_run_at(workdir, step=step)
  return LoadedRun(config, params, loaded, task_for(config))
