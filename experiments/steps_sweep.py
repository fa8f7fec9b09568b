r"""Sample quality against sampler steps for a diffusion run: FD-<data> (and KID, precision/recall) of every
sampler at every step count, as JSON and as a PNG plot with the real-vs-real floor.

  python -m experiments.steps_sweep --workdir=runs/ddpm_digits
  python -m experiments.steps_sweep --workdir=runs/ddpm_digits --samplers=ddim,dpm_solver --num_steps=10,20,50 \
      --output=runs/ddpm_digits/fd_vs_steps
  python -m experiments.steps_sweep --diffusers_model=ddpm-cifar10-32 --samplers=ddim,heun --num_samples=64 \
      --output=runs/cifar10/fd_vs_steps

Writes `<output>.json` (one record per sampler × steps: the metrics, sampling seconds) and `<output>.png`
(default output: `<workdir>/fd_vs_steps`). Every point draws the same number of samples (the eval split's size,
or --num_samples) from the same seed as `experiments.evaluate --seed` (so the two agree on a shared point),
scored against the same train-split features as `experiments.evaluate`; the feature network, the train features
and the floor are computed once. The run's sample options other than sampler/num_steps (guidance, eta, label) keep
the config's defaults unless --option sets them. The run's Task says which samplers it takes (`task.samplers`, the
default sweep); a Task without any is one `error:` line. The plot needs matplotlib (`pip install -e ".[plot]"`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
import types

from absl import flags

from experiments import cli
from experiments import evaluate as ev
from experiments.configs import ddpm
from genjax.compiles import CompileCounter
from genjax.data import dataset_info
from genjax.errors import UserError
from genjax.interop import diffusers

FLAGS = flags.FLAGS
SAMPLER_LABELS = {"ddpm": "DDPM (ancestral)", "ddim": "DDIM (eta=0)", "dpm_solver": "DPM-Solver++(2M)",
                  "dpm_solver_3m": "DPM-Solver++(3M)", "dpm_solver_sde": "DPM-Solver++(2M-SDE)", "unipc": "UniPC-2",
                  "euler": "Euler (Karras)", "heun": "Heun (Karras, 2 calls/step)",
                  "euler_ancestral": "Euler-ancestral (Karras)", "midpoint": "midpoint (2 calls/step)"}


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Diffusion run directory written by experiments.train.")
  flags.DEFINE_string("output", None, "Output path without extension (default <workdir>/fd_vs_steps).")
  flags.DEFINE_list("samplers", None, "Samplers to sweep (default: every sampler the run's model takes, "
                    "`task.samplers`; with --diffusers_model every genjax.interop.diffusers.SAMPLERS).")
  flags.DEFINE_list("num_steps", ["10", "20", "50", "100", "250"], "Step counts to sweep.")
  flags.DEFINE_integer("num_samples", 0, "Samples per point; 0 = the size of the eval split.")
  flags.DEFINE_integer("sample_batch_size", 256, "Samples per sampler call (as experiments.evaluate: equal samples).")
  flags.DEFINE_integer("seed", 0, "Sampling seed (the same for every point).")
  flags.DEFINE_multi_string("option", [], "Other sample options as key=value, e.g. --option=guidance=2.0.")
  flags.DEFINE_string("feature_cache", None, "Feature network cache directory.")
  flags.DEFINE_string("diffusers_model", None, "A diffusers UNet2DModel / DDPM pipeline directory to sweep instead "
                      "of a run: FD on the in-repo digits features when it makes 8x8x1 images, else timing only.")
  flags.register_multi_flags_validator(
      ["workdir", "diffusers_model"], lambda given: sum(v is not None for v in given.values()) == 1,
      message="give exactly one of --workdir (a genjax diffusion run) or --diffusers_model (a diffusers directory)")


def check_arguments(samplers, num_steps, valid_samplers) -> None:
  """The sweep's grid: `samplers` among `valid_samplers`, `num_steps` positive ints."""
  bad = [s for s in samplers if s not in valid_samplers]
  if bad or not samplers:
    raise UserError(f"unknown samplers {bad or list(samplers)}; valid: {list(valid_samplers)}")
  if not num_steps or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in num_steps):
    raise UserError(f"num_steps must be positive ints, got {list(num_steps)}")


def sweep(task, params, ref, samplers, num_steps, *, sample_batch_size: int = 256, seed: int = 0, options=None,
          log=print, valid_samplers=()) -> list[dict]:
  """One record per sampler × step count: the metrics against `ref` (an `evaluate.ImageReference`), sampling
  seconds, and the XLA compilations the point caused (the first point of a sampler compiles its program; the
  other step counts should compile nothing)."""
  check_arguments(samplers, num_steps, valid_samplers or task.samplers)
  fd = f"FD-{ref.name}"
  points = []
  for sampler in samplers:
    for n in num_steps:
      with CompileCounter() as cc:
        r = ev.image_report(task, params, ref, ev.sampling_key(seed),
                            options={**(options or {}), "sampler": sampler, "num_steps": n},
                            sample_batch_size=sample_batch_size)
      points.append({"sampler": sampler, "num_steps": n, "metrics": r["metrics"],
                     "sample_seconds": r["sample_seconds"], "compiles": cc.count})
      log(f"{sampler:>10} {n:>5} steps: {fd} {r['metrics'][fd]:8.2f} ({r['metrics'][fd] / ref.floor[fd]:.2f}x "
          f"floor) | {r['sample_seconds']:.1f} s | {cc.count} compilations")
  return points


def sweep_run(workdir: str, samplers, num_steps, *, num_samples: int = 0, sample_batch_size: int = 256,
              seed: int = 0, options=None, feature_cache=None, log=print) -> dict:
  """`sweep` over a trained run whose Task names its `samplers` (diffusion): {"points": [...], "floor": ...,
  "metric": "FD-<data>", ...}. `samplers` None: every one the Task takes."""
  run = cli.load_run(workdir)
  config, params, task = run.config, run.params, run.task
  task.require("samplers", "experiments.steps_sweep")
  samplers = task.samplers if samplers is None else samplers
  check_arguments(samplers, num_steps, task.samplers)
  ref = ev.image_reference(config, num_samples=num_samples, feature_cache=feature_cache)
  fd = f"FD-{ref.name}"
  log(f"floor (real vs real, {ref.num_samples} images): {fd} {ref.floor[fd]:.2f}")
  points = sweep(task, params, ref, samplers, num_steps, sample_batch_size=sample_batch_size, seed=seed,
                 options=options, log=log)
  return {"workdir": os.path.abspath(workdir), "variant": config.variant, "step": run.step, "metric": fd,
          "num_samples": ref.num_samples, "seed": seed, "options": dict(options or {}), "floor": ref.floor,
          "memorizer": ref.memorizer,
          **ref.info, "points": points}


def sweep_diffusers(model_dir: str, samplers, num_steps, *, num_samples: int = 0, sample_batch_size: int = 256,
                    seed: int = 0, options=None, feature_cache=None, log=print) -> dict:
  """The sweep over a diffusers DDPM directory (any genjax sampler). FD needs a feature network for the images'
  domain: a model of 8x8x1 images is scored on the in-repo digits features like a genjax run; any other size is
  timed only (`metric` None, `fd_skipped` says why; FID needs the user's own Inception features)."""
  samplers = diffusers.SAMPLERS if samplers is None else samplers
  check_arguments(samplers, num_steps, diffusers.SAMPLERS)
  extra = [k for k in (options or {}) if k != "eta"]
  if extra:
    raise UserError(f"--option={extra[0]}=... does not apply to --diffusers_model (valid: eta)")
  pipe = diffusers.load_pipeline(model_dir)
  task = types.SimpleNamespace(sample_images=lambda params, rng, n, **o: diffusers.sample_images(
      dataclasses.replace(pipe, params=params), rng, n, **o))
  head = {"diffusers_model": os.path.abspath(model_dir), "variant": os.path.basename(os.path.normpath(model_dir)),
          "seed": seed, "options": dict(options or {})}
  digits = tuple(dataset_info("digits").image_shape)
  if pipe.image_shape() == digits:
    config = ddpm.get_config("digits")
    ref = ev.image_reference(config, num_samples=num_samples, feature_cache=feature_cache)
    fd = f"FD-{ref.name}"
    log(f"floor (real vs real, {ref.num_samples} images): {fd} {ref.floor[fd]:.2f}")
    points = sweep(task, pipe.params, ref, samplers, num_steps, sample_batch_size=sample_batch_size, seed=seed,
                   options=options, log=log, valid_samplers=diffusers.SAMPLERS)
    return {**head, "metric": fd, "num_samples": ref.num_samples, "floor": ref.floor, "memorizer": ref.memorizer,
            **ref.info, "points": points}
  reason = (f"FD skipped: {model_dir!r} makes {'x'.join(map(str, pipe.image_shape()))} images and the in-repo "
            f"feature network scores digits ({'x'.join(map(str, digits))}); FID needs your own Inception features")
  log(reason)
  n, points = num_samples or 64, []
  for sampler in samplers:
    for steps in num_steps:
      with CompileCounter() as cc:
        _, _, seconds = ev.timed_draw(task, pipe.params, ev.sampling_key(seed), n, sample_batch_size,
                                      {**(options or {}), "sampler": sampler, "num_steps": steps})
      points.append({"sampler": sampler, "num_steps": steps, "sample_seconds": round(seconds, 2),
                     "compiles": cc.count})
      log(f"{sampler:>10} {steps:>5} steps: {seconds:.1f} s for {n} samples | {cc.count} compilations")
  return {**head, "metric": None, "fd_skipped": reason, "num_samples": n, "points": points}


def plot(result: dict, path: str) -> None:
  """FD against steps (log axis), a line per sampler, the floor dashed."""
  try:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    raise UserError("the plot needs matplotlib: pip install -e '.[plot]' (the JSON was written)") from None
  metric = result["metric"]
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for sampler in dict.fromkeys(p["sampler"] for p in result["points"]):
    pts = [p for p in result["points"] if p["sampler"] == sampler]
    ax.plot([p["num_steps"] for p in pts], [p["metrics"][metric] for p in pts], marker="o",
            label=SAMPLER_LABELS.get(sampler, sampler))
  ax.axhline(result["floor"][metric], color="gray", linestyle="--", label="floor: test split vs train")
  if "memorizer" in result:
    ax.axhline(result["memorizer"][metric], color="gray", linestyle=":", label="memorizer: train images")
  ax.set_xscale("log")
  steps = sorted({p["num_steps"] for p in result["points"]})
  ax.set_xticks(steps, [str(s) for s in steps])
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  ax.set_yscale("log")
  ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
  ax.set_xlabel("sampler steps")
  ax.set_ylabel(f"{metric} (lower is better)")
  ax.set_title(f"{result.get('variant') or 'diffusion'}: {metric} vs steps ({result['num_samples']} samples)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv):
  del argv
  f = FLAGS
  if not all(s.strip().isdigit() for s in f.num_steps):
    raise UserError(f"--num_steps={','.join(f.num_steps)} must be a comma-separated list of positive ints")
  steps = [int(s) for s in f.num_steps]
  if f.diffusers_model and f.output is None:
    raise UserError("--diffusers_model needs --output=PATH (without extension, e.g. --output=runs/cifar/fd_vs_steps): "
                    "there is no run directory to write under")
  t0 = time.time()
  run = functools.partial(sweep_diffusers, f.diffusers_model) if f.diffusers_model else \
      functools.partial(sweep_run, f.workdir)
  result = run(f.samplers, steps, num_samples=f.num_samples, sample_batch_size=f.sample_batch_size, seed=f.seed,
               options=ev.parse_options({}, f.option), feature_cache=f.feature_cache)
  result["seconds"] = round(time.time() - t0, 1)
  result["command"] = "python -m experiments.steps_sweep " + " ".join(sys.argv[1:])
  out = f.output or os.path.join(f.workdir, "fd_vs_steps")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".json", "w") as fh:
    json.dump(result, fh, indent=2)
  if result["metric"] is None:
    print(f"wrote {out}.json (no plot: {result['fd_skipped']})")
    return
  plot(result, out + ".png")
  print(f"wrote {out}.json and {out}.png")


def entry() -> None:
  """`python -m experiments.steps_sweep`: the launcher's flags, then `main` under the error contract."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  entry()
