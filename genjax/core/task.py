"""What a model family hands to the shared training loop.

A family never says *how* to train (devices, sharding, checkpoints, logging); it describes *what* to optimise as
pure functions. The loop in `genjax.train.trainer` runs any `Task`:

    Task(
        init=init_params,                      # (rng, example_batch) -> params pytree (a dict)
        phases=(Phase("vae", loss_fn, optimizer=tx),),
        sample_images=sample_fn,               # (params, rng, n, **options) -> [n, H, W, C] float32 in [0, 1]
        sample_text=None,                      # or (params, prompts: list[str], rng, **options) -> list[str]
        evaluate=eval_fn,                      # (params, batch, rng) -> {name: scalar}; averaged over test batches
        shape_init=None,                       # or (rng, example_batch) -> params of init's shapes, reading nothing
        # optional capabilities, None / () where the family has none (launchers ask `task.require(...)`):
        interpolate=None,                      # (params, rng, **options) -> (images [rows·cols, H, W, C], cols)
        edit=None,                             # (params, rng, n, init_image=..., strength=... | inpaint_mask=...,
                                               #  **options) -> [n, H, W, C]: img2img / inpainting
        samplers=(),                           # the names sample_images' `sampler` option accepts
        export=None,                           # an `Export`: what a converter needs to write another library's format
    )

A phase's `loss_fn(params, batch, rng, step) -> (loss, metrics)` sees the *whole* params tree but only the sub-tree
`params[params_key]` (all params when `params_key` is None) is differentiated and updated, by that phase's own
optax optimizer. Phases run in order inside one jitted step; a later phase sees the params the earlier ones
produced; `step` is the int32 training step (for lazy regularisers). A GAN is two phases ("disc" then "gen"); every
other family is one.

`options` are sampler settings a user passes from the command line (`experiments/sample.py --sampler=ddim
--num_steps=50`, `--temperature=0.8`, ...): a family accepts the ones it understands and raises a ValueError naming
any it does not. The loop calls `sample_images(params, rng, n)` with no options (the family's defaults).
`experiments/evaluate.py` calls it outside any jit, so a family jits its own sampling, with options as runtime
values where it can (a diffusion sweep over `num_steps` then compiles once).

Launchers never name a family: they ask the Task (`task.require("interpolate", "--interpolate")` is the one-line
`UserError` naming what this Task can do when it cannot). Weights from outside genjax (`config.model.init_from`)
are resolved above the models, by `genjax.interop`, and handed down as a `Pretrained`; adding a family is one model
module (`genjax.models`) and one config file.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import optax

from genjax.errors import UserError

Params = Any
Batch = Mapping[str, Any]
LossFn = Callable[[Params, Batch, Any, Any], "tuple[Any, Mapping[str, Any]]"]


@dataclasses.dataclass(frozen=True)
class Phase:
  """One optimisation phase: a loss, the params sub-tree it owns, and its optimizer."""
  name: str
  loss_fn: LossFn
  optimizer: optax.GradientTransformation
  params_key: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """Weights a family starts from, read by `genjax.interop` (a launcher resolves `config.model.init_from` and
  passes this down to `genjax.models.get_task`): the checkpoint's architecture, its params and tokenizer."""
  source: str                                   # where it was read from (a directory)
  model_config: Any                             # its architecture as the family describes it (e.g. an LMConfig)
  load_params: Callable[[Any], Params]          # (the model config the family runs) -> params, traceable in jit
  tokenizer: Any = None                         # encode / decode / eos_id / pad_id, or None


@dataclasses.dataclass(frozen=True)
class Export:
  """What a converter needs to write a run's params in another library's format (`experiments.export` picks the
  converter by `format`)."""
  format: str                                   # "huggingface": `genjax.interop.hf.save_lm`
  model_config: Any                             # the architecture the params belong to
  assets: Optional[str] = None                  # a directory whose tokenizer files go along, or None


# Task member -> what it lets a launcher do (for messages).
CAPABILITIES = {"sample_images": "sample images", "sample_text": "sample text", "interpolate": "interpolate",
                "edit": "edit images", "evaluate": "evaluate", "export": "export", "samplers": "choose a sampler"}


@dataclasses.dataclass(frozen=True)
class Task:
  """A model family as the training loop sees it (see module docstring)."""
  init: Callable[[Any, Batch], Params]
  phases: tuple[Phase, ...]
  sample_images: Optional[Callable[..., Any]] = None
  sample_text: Optional[Callable[..., Any]] = None
  evaluate: Optional[Callable[[Params, Batch, Any], Mapping[str, Any]]] = None
  # (rng, example_batch) -> params of init's shapes and dtypes, values irrelevant (e.g. zeros), reading nothing: for
  # a family whose init reads files, the loop's abstract evaluation (shardings, the restore target) traces this
  # instead, so that resuming never runs init. None: init itself is traced.
  shape_init: Optional[Callable[[Any, Batch], Params]] = None
  interpolate: Optional[Callable[..., Any]] = None
  edit: Optional[Callable[..., Any]] = None
  samplers: tuple[str, ...] = ()
  export: Optional[Export] = None
  # Where init's weights come from when they are not a random init (e.g. a Hugging Face checkpoint directory): the
  # loop names it when a run starts without a checkpoint of its own. "" = a random init.
  init_from: str = ""

  def __post_init__(self):
    if not self.phases:
      raise ValueError("a Task needs at least one Phase")
    names = [p.name for p in self.phases]
    if len(set(names)) != len(names):
      raise ValueError(f"phase names must be unique, got {names}")
    keys = [p.params_key for p in self.phases]
    if None in keys and len(keys) > 1:
      raise ValueError("with several phases every phase must name the params sub-tree it owns (params_key)")

  def capabilities(self) -> tuple[str, ...]:
    """The optional members this Task has (`CAPABILITIES` order)."""
    return tuple(name for name in CAPABILITIES if getattr(self, name))

  def require(self, capability: str, wanted_by: str) -> None:
    """UserError naming `wanted_by` (a flag, a launcher) and what this Task can do, when it lacks `capability`."""
    if capability not in CAPABILITIES:
      raise ValueError(f"unknown capability {capability!r}; valid: {list(CAPABILITIES)}")
    if not getattr(self, capability):
      can = ", ".join(CAPABILITIES[c] for c in self.capabilities()) or "only train"
      raise UserError(f"{wanted_by} needs a model that can {CAPABILITIES[capability]}; this run's can: {can}")
