r"""Diffusion sampler benchmark: every genjax sampler x num_steps x batch, driven by a real genjax U-Net.

  python -m benchmarks.samplers --quick --json=/tmp/samplers.json               # CPU-sized
  python -m benchmarks.samplers --ddpm_config=experiments/configs/ddpm.py:cifar10 --batch_sizes=1,16,64 \
      --json=samplers_gpu.json                                                   # on an accelerator
  python -m benchmarks.samplers --ddpm_config.model.ch=8 --num_steps=2,4         # any config field overrides
  python -m benchmarks.samplers --diffusers_model=ddpm-cifar10-32 --batch_sizes=16 # a diffusers DDPM checkpoint

The U-Net is the one `experiments/configs/ddpm.py:<variant>` trains (`--ddpm_config`, default `:digits`), with
random weights drawn on the host (`common.random_params`: no compilation spent on initialisation, and no
zero-initialised output layer making every prediction 0; timing does not depend on the values). Each sampler is
called the way the library documents for "no recompilation": the model is
`jax.tree_util.Partial(apply_fn, variables, labels)` with one `apply_fn` for the whole run, so num_steps and eta
are runtime values.

Samplers (`SAMPLER_SPECS`): every sampler of the registry `genjax.samplers.registry`: ddpm, ddim, dpm_solver (2M),
dpm_solver_3m, dpm_solver_sde (2M-SDE), unipc, euler, heun, euler_ancestral (EDM / Karras grid: the U-Net gets float
t), and its flow methods as flow_euler, flow_heun, flow_midpoint (the U-Net stands in for a velocity model), each
with its defaults.

Per row: `seconds` (median of >= 5 calls after a warm-up), `samples_per_second`, `forward_seconds` (one U-Net
forward at that batch: one jitted `fori_loop` of 10 dependent forwards (each output, clipped to [-4, 4], is the
next input), median of >= 5 calls, divided by 10 — the model-only cost of a sampler step, without per-call
dispatch; its calls alternate with the sampler's so that both see the same machine load),
`model_calls` (per sample: num_steps, 2 num_steps - 1 for Heun, 2 num_steps for flow Heun / midpoint),
`overhead_ratio = seconds / (model_calls * forward_seconds)` (1.0 is the physical limit; the excess is the
sampler's own arithmetic, loop and call overhead),
`compiles` (XLA compilations during the row: its warm-up, its timed calls and, for DDIM, extra calls with eta 0.5
and 1.0 — after the program was built once for this sampler and batch, so the goal is 0) and `compile_seconds` (the
wait for that first build: first call minus a steady call).

Peer: diffusers' `FlaxDDIMScheduler` stepped in a `lax.fori_loop` around the same U-Net (num_steps static, as its
API requires), side by side (`vs_genjax` = peer seconds / genjax DDIM seconds, same process). Optional: without
diffusers a row says "peer not installed". Install with `pip install 'genjax-zoo[peers]'`.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common
from benchmarks.accuracy_peers import SchedulerCarry
from genjax.samplers.flow import FlowSchedule
from genjax.samplers.registry import DIFFUSION_SAMPLERS, FLOW_SAMPLERS

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The benchmark's names: the registry's diffusion samplers, and its flow methods as flow_<method>.
SAMPLER_SPECS = {**DIFFUSION_SAMPLERS, **{f"flow_{name}": spec for name, spec in FLOW_SAMPLERS.items()}}
SAMPLERS = tuple(SAMPLER_SPECS)
DEFAULT_NUM_STEPS = (10, 20, 50, 100)
DDIM_ETAS = (0.5, 1.0)          # extra DDIM calls per row: a changed eta must not compile anything
FORWARD_CHAIN = 10              # back-to-back forwards per forward-time sample

_DDPM_CONFIG = config_flags.DEFINE_config_file(
    "ddpm_config", os.path.join(_REPO, "experiments", "configs", "ddpm.py") + ":digits",
    "The diffusion config whose U-Net drives the samplers (fields overridable: --ddpm_config.model.ch=8).",
    lock_config=False)
_SAMPLERS = flags.DEFINE_list("samplers", list(SAMPLERS), f"Samplers to time, from {list(SAMPLERS)}.")
_DIFFUSERS_MODEL = flags.DEFINE_string(
    "diffusers_model", None, "A diffusers UNet2DModel / DDPM pipeline directory whose U-Net (its real weights, "
    "schedule and prediction type) drives the samplers instead of --ddpm_config's.")
_NUM_STEPS = flags.DEFINE_list("num_steps", [str(n) for n in DEFAULT_NUM_STEPS], "Model calls per sample.")

COLUMNS = ("sampler", "batch", "num_steps", "seconds", "samples_per_second", "forward_seconds", "overhead_ratio",
           "compiles", "compile_seconds", "vs_genjax")


class DiffusionBench:
  """The U-Net of a ddpm config, its schedule, and the callables the samplers and the peer need."""

  def __init__(self, config, seed: int = 0):
    from genjax.data import dataset_info
    from genjax.dtypes import compute_dtype
    from genjax.models import diffusion as dm
    m = dm.model_config(config)
    if m.space == "latent":
      raise ValueError("latent diffusion configs need a trained VAE run; benchmark a pixel-space config "
                       "(ddpm.py:digits | mnist | cifar10)")
    info = dataset_info(config.dataset.name)
    self.num_classes = int(info.num_classes or 0) if m.conditional else 0
    self.image_shape = tuple(info.image_shape)
    self.schedule = dm.make_schedule(m)
    self.prediction = m.prediction
    self.clip = (-1.0, 1.0) if m.clip_denoised else None
    self.unet = dm.make_unet(m, self.num_classes, compute_dtype(config.compute_dtype))
    unet, conditional = self.unet, self.num_classes > 0

    def apply_fn(variables, labels, x, t):   # one function object for the whole run: no recompiles
      return unet.apply(variables, x, t, labels if conditional else None)

    self.apply_fn = apply_fn

    @jax.jit
    def forward_chain(variables, labels, x, t):
      body = lambda i, y: jnp.clip(apply_fn(variables, labels, y, t).astype(jnp.float32), -4.0, 4.0)  # noqa: E731
      return jax.lax.fori_loop(0, FORWARD_CHAIN, body, x)

    self.forward_chain = forward_chain
    x = jnp.zeros((1,) + self.image_shape, jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    label = jnp.zeros((1,), jnp.int32) if conditional else None
    self.variables = common.random_params(jax.eval_shape(unet.init, jax.random.key(0), x, t, label), seed)

  def inputs(self, batch: int, seed: int = 1):
    x_T = np.random.default_rng(seed).standard_normal((batch,) + self.image_shape).astype(np.float32)
    labels = np.arange(batch, dtype=np.int32) % max(self.num_classes, 1)
    return jnp.asarray(x_T), jnp.asarray(labels)

  def model_fn(self, labels) -> Callable:
    return jax.tree_util.Partial(self.apply_fn, self.variables, labels)


class DiffusersBench(DiffusionBench):
  """The same bench around a diffusers `UNet2DModel` directory (`--diffusers_model`), loaded by
  `genjax.interop.diffusers.load_pipeline`: its weights, training schedule, prediction type and clipping."""

  def __init__(self, path: str):  # pylint: disable=super-init-not-called
    from genjax.interop.diffusers import load_pipeline
    pipe = load_pipeline(path)
    self.num_classes, self.image_shape, self.schedule = 0, pipe.image_shape(), pipe.schedule
    self.prediction, self.clip = pipe.options["prediction"], pipe.options["clip_denoised"]
    unet_apply = pipe.apply_fn
    self.apply_fn = lambda variables, labels, x, t: unet_apply(variables, x, t)  # noqa: E731
    self.forward_chain = jax.jit(lambda variables, labels, x, t: jax.lax.fori_loop(
        0, FORWARD_CHAIN, lambda i, y: jnp.clip(unet_apply(variables, y, t).astype(jnp.float32), -4.0, 4.0), x))
    self.variables = pipe.params


def sampler_call(bench: DiffusionBench, name: str, model_fn, x_T, num_steps: int, eta: float = 0.0):
  """One call of sampler `name` (a key of SAMPLER_SPECS) with the bench's prediction/clip and a fixed rng; `eta`
  goes to DDIM only."""
  if name not in SAMPLER_SPECS:
    raise ValueError(f"unknown sampler {name!r}; valid: {list(SAMPLERS)}")
  spec, rng = SAMPLER_SPECS[name], jax.random.key(7)
  if spec.space == "flow":  # the U-Net stands in for a velocity model (float t in [0, 1]): the cost is the same
    return spec(model_fn, FlowSchedule(), x_T, rng=rng, num_steps=num_steps)
  options = {"eta": eta} if name == "ddim" else {}
  return spec(model_fn, bench.schedule, x_T, rng=rng, num_steps=num_steps, prediction=bench.prediction,
              clip_denoised=bench.clip, **options)


# --------------------------------------------------------------------------------------------- the peer
def _peer_prediction(prediction: str) -> str:
  return {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}[prediction]


def diffusers_ddim(bench: DiffusionBench) -> Optional[Callable]:
  """`sample(labels, x_T, num_steps)` with diffusers' FlaxDDIMScheduler around the same U-Net, or None when
  diffusers (with its Flax schedulers) is not importable."""
  try:
    from diffusers import FlaxDDIMScheduler
  except (ImportError, RuntimeError):  # absent or no Flax schedulers; RuntimeError: diffusers' lazy import failed
    return None
  scheduler = FlaxDDIMScheduler(num_train_timesteps=bench.schedule.num_timesteps,
                                trained_betas=np.asarray(bench.schedule.betas), set_alpha_to_one=True,
                                prediction_type=_peer_prediction(bench.prediction))
  apply_fn, variables = bench.apply_fn, bench.variables

  @functools.partial(jax.jit, static_argnames="num_steps")
  def sample(variables, labels, x_T, num_steps):
    state = scheduler.set_timesteps(scheduler.create_state(), num_steps, x_T.shape)

    def body(i, carry: SchedulerCarry) -> SchedulerCarry:
      x, state = carry.x, carry.state
      t = state.timesteps[i]
      eps = apply_fn(variables, labels, x, jnp.full((x.shape[0],), t, jnp.int32))
      x, state = scheduler.step(state, eps, t, x, return_dict=False)[:2]
      return SchedulerCarry(x, state)

    return jax.lax.fori_loop(0, num_steps, body, SchedulerCarry(x_T, state)).x

  return lambda labels, x_T, num_steps: sample(variables, labels, x_T, num_steps=num_steps)


def _row(sampler: str, batch: int, num_steps: Optional[int], **extra) -> dict:
  r = dict(sampler=sampler, batch=batch, num_steps=num_steps, seconds=None, samples_per_second=None,
           forward_seconds=None, model_calls=None, overhead_ratio=None, compiles=None, compile_seconds=None,
           vs_genjax=None, status="ok")
  r.update(extra)
  return r


def _fill(r: dict, timing: common.Timing, fwd: float, model_calls: int) -> dict:
  r.update(seconds=timing.seconds, samples_per_second=r["batch"] / timing.seconds, forward_seconds=fwd,
           model_calls=model_calls, overhead_ratio=timing.seconds / (model_calls * fwd))
  return r


# --------------------------------------------------------------------------------------------- the benchmark
def run(config, samplers, num_steps_list, batches, repeats: int = 5, peers: bool = True,
        diffusers_model: Optional[str] = None) -> list[dict]:
  """Times every (batch, sampler, num_steps); returns the records (see module docstring for the fields).
  `diffusers_model`: a diffusers UNet2DModel directory to drive the samplers instead of `config`'s U-Net."""
  unknown = sorted(set(samplers) - set(SAMPLERS))
  if unknown:
    raise ValueError(f"unknown samplers {unknown}; valid: {list(SAMPLERS)}")
  bench = DiffusersBench(diffusers_model) if diffusers_model else None
  T = bench.schedule.num_timesteps if bench else int(config.model.num_timesteps)
  bad = [n for n in num_steps_list if not 1 <= n <= T]
  if bad:
    raise ValueError(f"num_steps {bad} outside [1, {T}] (the schedule length)")
  bench = bench or DiffusionBench(config)
  peer = diffusers_ddim(bench) if peers else None
  records = []
  for batch in batches:
    x_T, labels = bench.inputs(batch)
    model_fn = bench.model_fn(labels)
    t_mid = jnp.full((batch,), bench.schedule.num_timesteps // 2, jnp.int32)
    forward = lambda: bench.forward_chain(bench.variables, labels, x_T, t_mid)  # noqa: E731
    jax.block_until_ready(forward())     # compile the forward chain before any row counts compilations
    for name in samplers:
      # Build the program once for this sampler and batch; every row after that must compile nothing.
      first = common.first_call(lambda: sampler_call(bench, name, model_fn, x_T, num_steps_list[0]))
      steady_first = None
      for n in num_steps_list:
        with common.CompileCounter() as cc:
          # Sampler and forward calls alternate, so that the ratio sees the same machine load.
          t = common.time_interleaved({"sampler": lambda: sampler_call(bench, name, model_fn, x_T, n),
                                       "forward": forward}, repeats)
          if name == "ddim":
            for eta in DDIM_ETAS:
              jax.block_until_ready(sampler_call(bench, name, model_fn, x_T, n, eta=eta))
        steady_first = t["sampler"].seconds if steady_first is None else steady_first
        calls = SAMPLER_SPECS[name].model_calls(n)
        r = _fill(_row(name, batch, n), t["sampler"], t["forward"].seconds / FORWARD_CHAIN, calls)
        r.update(compiles=cc.count, compile_seconds=first.overhead(steady_first),
                 first_call_compiles=first.compiles)
        records.append(r)
    ddim = lambda n: sampler_call(bench, "ddim", model_fn, x_T, n)  # noqa: E731
    records.extend(_peer_rows(peer, peers, labels, x_T, batch, num_steps_list, forward, ddim, repeats))
  return records


def _peer_rows(peer, wanted: bool, labels, x_T, batch, num_steps_list, forward, ddim, repeats) -> list[dict]:
  """diffusers rows; each step count is timed round-robin with genjax DDIM and the forward chain."""
  if not wanted:
    return []
  if peer is None:
    return [_row("diffusers_ddim", batch, None, status="peer not installed (pip install 'genjax-zoo[peers]')")]
  rows = []
  for n in num_steps_list:
    try:
      t = common.time_interleaved({"peer": lambda: peer(labels, x_T, n), "genjax": lambda: ddim(n),
                                   "forward": forward}, repeats)
    except Exception as e:  # an incompatible diffusers release: say so, keep the genjax figures
      return rows + [_row("diffusers_ddim", batch, n, status=f"peer failed: {type(e).__name__}: {e}"[:200])]
    r = _fill(_row("diffusers_ddim", batch, n), t["peer"], t["forward"].seconds / FORWARD_CHAIN, n)
    r.update(compiles=t["peer"].compiles, compile_seconds=t["peer"].warmup_overhead_seconds,
             vs_genjax=t["peer"].seconds / t["genjax"].seconds)
    rows.append(r)
  return rows


def summary(records: list[dict]) -> list[str]:
  """Goal lines: recompiles on num_steps/eta change (goal 0) and DDIM-50 overhead (goal <= 1.05)."""
  ours = [r for r in records if r["sampler"] in SAMPLERS and r["status"] == "ok"]
  lines = [f"recompilations when only num_steps/eta change: {sum(r['compiles'] for r in ours)} (goal 0)"]
  for r in ours:
    if r["sampler"] == "ddim" and r["num_steps"] == 50:
      lines.append(f"DDIM-50 overhead_ratio at batch {r['batch']}: {r['overhead_ratio']:.3f} (goal <= 1.05)")
  for batch in dict.fromkeys(r["batch"] for r in ours):
    per = {}
    for r in ours:
      if r["batch"] == batch:   # the largest step count of each sampler
        per[r["sampler"]] = r
    lines.append(f"overhead_ratio per sampler at batch {batch}, {max(r['num_steps'] for r in per.values())} steps: "
                 + ", ".join(f"{s} {r['overhead_ratio']:.2f} ({r['compiles']} recompiles)" for s, r in per.items()))
  peer = [r for r in records if r["sampler"] == "diffusers_ddim"]
  for r in peer:
    if r["status"] != "ok":
      lines.append(f"diffusers_ddim (batch {r['batch']}): {r['status']}")
    elif r["vs_genjax"] is not None:
      lines.append(f"diffusers_ddim / genjax ddim at {r['num_steps']} steps, batch {r['batch']}: "
                   f"{r['vs_genjax']:.2f}x the time; it compiled {r['compiles']} time(s) for this step count")
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  batches = common.batch_sizes(quick_default=(1, 8), full_default=(1, 16, 64))
  num_steps_list = common.parse_ints(_NUM_STEPS.value, "num_steps")
  info = common.device_info()
  records = common.stamp(run(_DDPM_CONFIG.value, list(_SAMPLERS.value), num_steps_list, batches,
                             common.repeats(), common.PEERS.value, _DIFFUSERS_MODEL.value), "samplers", info)
  variant = _DDPM_CONFIG.value.get("variant", "?")
  unet = f"diffusers {_DIFFUSERS_MODEL.value}" if _DIFFUSERS_MODEL.value else f"ddpm.py:{variant}"
  common.print_table(records, COLUMNS, f"Diffusion samplers, U-Net of {unet}, on "
                     f"{common.device_label(info)}; seconds = median of {common.repeats()} after warm-up")
  print("\n".join(summary(records)))
  common.write_json(records, common.JSON.value)


if __name__ == "__main__":
  app.run(main)
