r"""Export a trained LM run as a Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer files)
that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads with the same logits. Run from the repository
root:

  python -m experiments.train --config=experiments/configs/lm.py:hf_finetune --config.model.init_from=MODEL \
      --workdir=runs/ft
  python -m experiments.export --workdir=runs/ft --out=runs/ft_hf            # the newest checkpoint (EMA if kept)
  python -m experiments.export --workdir=runs/ft --out=runs/ft_hf --step=100

Exportable: runs whose architecture has a Hugging Face equivalent — fine-tuned checkpoints (`model.init_from`, whose
tokenizer files are copied along) and LMs configured as GPT-2 or the Llama family. genjax's own byte LM (RMSNorm
with a GELU MLP) has none and is refused with one line. `--out` must be new or empty; nothing is written on error.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:   # `python experiments/export.py` from anywhere: run as the module
  import os as _os, runpy as _runpy, sys as _sys
  _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
  _runpy.run_module("experiments.export", run_name="__main__", alter_sys=True)
  _sys.exit()

import os
from typing import Optional

from absl import flags

from experiments import cli
from genjax.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Run directory written by experiments.train (an LM run).")
  flags.DEFINE_string("out", None, "New (or empty) directory for the Hugging Face checkpoint.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest intact one).")


def export_run(workdir: str, out: str, step: Optional[int] = None) -> str:
  """Writes the run's params (the EMA params when the run kept them) to `out` with `genjax.interop.hf.save_lm`;
  returns `out`."""
  if not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir!r} is not a run directory")
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UserError(f"--out={out!r} exists and is not an empty directory; give a new directory")
  from genjax.interop import hf
  from genjax.models import transformer
  from genjax.core.checkpoint import load_run

  config, params = load_run(workdir, step=step)
  if config.family != "lm":
    raise UserError(f"--workdir={workdir!r} holds a {config.family!r} run; only LM runs export to Hugging Face")
  cfg = transformer.lm_config(config)
  return hf.save_lm(cfg, params, out, tokenizer=config.model.init_from or None)


def main(argv):
  del argv
  if not FLAGS.workdir or not FLAGS.out:
    raise UserError("give both --workdir=RUN and --out=DIR")
  print(f"wrote {export_run(FLAGS.workdir, FLAGS.out, FLAGS.step)}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
