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
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import optax

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

  def __post_init__(self):
    if not self.phases:
      raise ValueError("a Task needs at least one Phase")
    names = [p.name for p in self.phases]
    if len(set(names)) != len(names):
      raise ValueError(f"phase names must be unique, got {names}")
    keys = [p.params_key for p in self.phases]
    if None in keys and len(keys) > 1:
      raise ValueError("with several phases every phase must name the params sub-tree it owns (params_key)")
