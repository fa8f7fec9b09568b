r"""Export a trained LM run as a Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer files)
that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads with the same logits (`genjax-export` once
installed, `pip install -e .`):

  python -m experiments.train --config=experiments/configs/lm.py:hf_finetune --config.model.init_from=MODEL \
      --workdir=runs/ft
  python -m experiments.export --workdir=runs/ft --out=runs/ft_hf            # the newest checkpoint (EMA if kept)
  python -m experiments.export --workdir=runs/ft --out=runs/ft_hf --step=100

Exportable: runs whose architecture has a Hugging Face equivalent — fine-tuned checkpoints (`model.init_from`, whose
tokenizer files are copied along) and LMs configured as GPT-2 or the Llama family. genjax's own byte LM (RMSNorm
with a GELU MLP) has none and is refused with one line. `--out` must be new or empty; nothing is written on error.
The launcher asks the run's Task: a Task without `export` (image families) is one `error:` line naming what it can
do; `Export.format` picks the converter (`EXPORTERS`).
"""
from __future__ import annotations

import os
from typing import Optional

from absl import flags

from experiments import cli
from genjax.errors import UserError
from genjax.interop import hf

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Run directory written by experiments.train (an LM run).")
  flags.DEFINE_string("out", None, "New (or empty) directory for the Hugging Face checkpoint.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest intact one).")


def _huggingface(spec, params, out: str) -> str:
  return hf.save_lm(spec.model_config, params, out, tokenizer=spec.assets)


EXPORTERS = {"huggingface": _huggingface}   # Export.format -> (spec, params, out) -> out


def export_run(workdir: str, out: str, step: Optional[int] = None) -> str:
  """Writes the run's params (the EMA params when the run kept them) to `out` with the converter of its Task's
  `export` (`genjax.interop.hf.save_lm` for an LM); returns `out`."""
  cli.check_run_dir(workdir)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UserError(f"--out={out!r} exists and is not an empty directory; give a new directory")
  run = cli.load_run(workdir, step=step)
  run.task.require("export", "experiments.export")
  return EXPORTERS[run.task.export.format](run.task.export, run.params, out)


def main(argv):
  del argv
  if not FLAGS.workdir or not FLAGS.out:
    raise UserError("give both --workdir=RUN and --out=DIR")
  print(f"wrote {export_run(FLAGS.workdir, FLAGS.out, FLAGS.step)}")


def entry() -> None:
  """The `genjax-export` console script: `python -m experiments.export` with the same flags."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  entry()
