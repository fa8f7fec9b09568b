r"""Sampler accuracy against the exact probability-flow ODE of Gaussian mixtures, genjax and diffusers side by side.

  python -m benchmarks.sampler_accuracy                      # writes docs/results/sampler_accuracy.{json,png,md}
  python -m benchmarks.sampler_accuracy --quick --json=/tmp/acc.json --png= --markdown=
  pip install -e ".[peers]"                                   # then the same command adds diffusers 0.39's Flax rows

For each mixture in `benchmarks.mixtures.MIXTURES` (a 2-D ring; wide, narrow and image-like 1-D mixtures), each schedule
(linear and cosine, T = 1000) and each NFE budget (5, 10, 20, 50 model calls), every deterministic sampler in
`SAMPLERS` maps the same x_T (`--num_points` standard-normal draws) through the exact mixture model
(`mixtures.mixture_model_fn`, float32) and is scored against the probability-flow ODE solved in float64 to
convergence (`mixtures.exact_flow_checked`: RK4 with n and 2n steps must agree to `GROUND_TRUTH_TOLERANCE`).
Flow-matching samplers get the same mixtures as rectified flows (schedule "flow") and their own exact ODE.
The error is the RMSE over points and coordinates; `calls` is the number of model calls counted by a callback
inside the model (it must equal the sampler's declared count, else the run fails).

Each sampler runs with its defaults (variant "default") and with every structural option it offers: every
`spacing=` it accepts (discovered by calling it; "leading" with steps_offset 0 and 1), and the options in its
`SAMPLERS` entry. Stochastic samplers (DDPM, DDIM eta > 0, DPM-Solver++ 2M-SDE, Euler-ancestral, Heun with churn)
have no ODE solution to match and are not scored here (their tests check them in distribution).
Peers (`benchmarks.accuracy_peers`): diffusers' FlaxDDIMScheduler and FlaxDPMSolverMultistepScheduler with their
options, same model, x_T and NFE. `accuracy_report.goals()` checks the issue's three goals per (schedule, mixture,
NFE) and pooled over the mixtures (geometric mean).

To score another registry sampler (`genjax.samplers.registry`): one `AccuracyCase` line in SAMPLERS.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import accuracy_peers, common, mixtures
from benchmarks.accuracy_report import clean_json, geomean_records, goals, markdown, plot
from genjax.samplers.flow import FlowSchedule
from genjax.samplers.registry import SamplerSpec, sampler_spec

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RESULTS = os.path.join(_REPO, "docs", "results")
NFES = (5, 10, 20, 50)
SCHEDULES = ("linear", "cosine")
GROUND_TRUTH_TOLERANCE = 1e-6      # max |x0(n RK4 steps) - x0(2n)| allowed for the ground truth
SPACING_CANDIDATES = ("trailing", "leading", "linspace", "log_snr", "karras")

_NFE = flags.DEFINE_list("nfe", [str(n) for n in NFES], "Model-call budgets.")
_MIXTURES = flags.DEFINE_list("mixtures", list(mixtures.MIXTURES), f"Mixtures, from {list(mixtures.MIXTURES)}.")
_ACC_SAMPLERS = flags.DEFINE_list("accuracy_samplers", None, "Samplers to score (default: all available).")
_NUM_POINTS = flags.DEFINE_integer("num_points", 500, "x_T draws per mixture.")
_GT_STEPS = flags.DEFINE_integer("ground_truth_steps", 2000, "RK4 steps of the coarse ground truth (fine: 2x).")
_PNG = flags.DEFINE_string("png", os.path.join(_RESULTS, "sampler_accuracy.png"), "Log-log plot ('' = none).")
_MARKDOWN = flags.DEFINE_string("markdown", os.path.join(_RESULTS, "sampler_accuracy.md"),
                                "Markdown tables for docs/results.md ('' = none).")


@dataclasses.dataclass(frozen=True)
class AccuracyCase:
  """A deterministic sampler of the registry (`genjax.samplers.registry`) as scored here: its registry name and
  space, the options this row fixes (UniPC's order 3), its convergence order and extra variants."""
  key: str
  label: str
  sampler: str                          # a registry name
  options: tuple = ()                   # ((name, value), ...) always passed
  order: int = 1
  space: str = "diffusion"              # "diffusion" (model_fn(x, t) -> eps) | "flow" (velocity_fn)
  variants: tuple = ()                  # ((name, ((option, value), ...)), ...) beyond spacings
  reference: str = ""

  @property
  def spec(self) -> SamplerSpec:
    return sampler_spec(self.sampler, self.space)

  def calls(self, num_steps: int) -> int:
    return self.spec.model_calls(num_steps)

  def steps_for(self, nfe: int) -> int:
    """The most steps whose model calls fit in `nfe` (at least 1)."""
    return max(1, (nfe + self.spec.final_saving) // self.spec.calls_per_step)


# EDM's own sigma_max for VP models is 80 (Karras et al. 2022); genjax's default starts at sigma(T - 1).
_EDM_VARIANTS = (("rho=3", (("rho", 3.0),)), ("sigma_max=80", (("sigma_max", 80.0),)),
                 ("quantize", (("quantize", True),)))
_LOF = (("lower_order_final=False", (("lower_order_final", False),)),)
_BH1 = (("bh1", (("variant", "bh1"),)),)
_SHIFT = (("shift=3", (("schedule", FlowSchedule(shift=3.0)),)),)
SAMPLERS = (
    AccuracyCase("ddim", "DDIM (eta=0)", "ddim", reference="Song et al. 2021"),
    AccuracyCase("dpm_solver_2m", "DPM-Solver++ 2M", "dpm_solver", (("order", 2),), order=2, variants=_LOF,
                 reference="Lu et al. 2022"),
    AccuracyCase("dpm_solver_3m", "DPM-Solver++ 3M", "dpm_solver_3m", order=3, variants=_LOF,
                 reference="Lu et al. 2022"),
    AccuracyCase("unipc_2", "UniPC-2 (bh2)", "unipc", (("order", 2),), order=2, variants=_BH1,
                 reference="Zhao et al. 2023"),
    AccuracyCase("unipc_3", "UniPC-3 (bh2)", "unipc", (("order", 3),), order=3, variants=_BH1,
                 reference="Zhao et al. 2023"),
    AccuracyCase("euler", "Euler (Karras sigmas)", "euler", variants=_EDM_VARIANTS, reference="Karras et al. 2022"),
    AccuracyCase("heun", "Heun (Karras sigmas)", "heun", order=2, variants=_EDM_VARIANTS,
                 reference="Karras et al. 2022"),
    AccuracyCase("flow_euler", "flow Euler", "euler", space="flow", variants=_SHIFT, reference="Liu et al. 2022"),
    AccuracyCase("flow_heun", "flow Heun", "heun", order=2, space="flow", variants=_SHIFT, reference="Liu et al. 2022"),
    AccuracyCase("flow_midpoint", "flow midpoint", "midpoint", order=2, space="flow", variants=_SHIFT,
                 reference="Liu et al. 2022"),
)
SAMPLER_KEYS = tuple(s.key for s in SAMPLERS)


def variants(case: AccuracyCase) -> list[tuple[str, dict]]:
  """[("default", {}), (spacing or option name, kwargs), ...]: the structural options to score."""
  names = case.spec.option_names + ("schedule",)
  out = [("default", {})]
  if "spacing" in names:
    offset = {"steps_offset": 0} if "steps_offset" in names else {}
    out += [(s, {"spacing": s, **(offset if s == "leading" else {})}) for s in SPACING_CANDIDATES]
    if offset:
      out.append(("leading+1", {"spacing": "leading", "steps_offset": 1}))
  out += [(name, dict(kw)) for name, kw in case.variants if all(k in names for k, _ in kw)]
  return out


# --------------------------------------------------------------------------------------------- one problem
@dataclasses.dataclass
class Problem:
  """One (schedule, mixture): x_T, the model and its float64 ground truth."""
  schedule_name: str
  mixture: mixtures.Mixture
  schedule: object            # NoiseSchedule, or FlowSchedule for "flow"
  x_T: np.ndarray
  model_fn: Callable
  truth: np.ndarray
  truth_convergence: float    # max |x0(n) - x0(2n)| of the RK4 ground truth


def make_problem(schedule_name: str, mix: mixtures.Mixture, num_points: int, gt_steps: int) -> Problem:
  from genjax.samplers.schedules import NoiseSchedule
  x_T = np.random.default_rng(0).standard_normal((num_points, mix.dim)).astype(np.float32)
  if schedule_name == "flow":
    truth, conv = mixtures.exact_rectified_flow_checked(mix, x_T, gt_steps)
    return Problem("flow", mix, FlowSchedule(), x_T, mixtures.flow_velocity_fn(mix), truth, conv)
  schedule = {"linear": NoiseSchedule.linear, "cosine": NoiseSchedule.cosine}[schedule_name](num_timesteps=1000)
  truth, conv = mixtures.exact_flow_checked(mix, mixtures.sigma_max(schedule), x_T, gt_steps)
  return Problem(schedule_name, mix, schedule, x_T, mixtures.mixture_model_fn(mix, schedule), truth, conv)


def _score(problem: Problem, x: np.ndarray) -> dict:
  err = np.asarray(x, np.float64) - problem.truth
  return {"rmse": float(np.sqrt(np.mean(err ** 2))), "max_abs_error": float(np.max(np.abs(err))),
          "median_abs_error": float(np.median(np.abs(err)))}


def _record(problem, sampler, label, variant, library, nfe, num_steps, expected_calls) -> dict:
  return dict(schedule=problem.schedule_name, mixture=problem.mixture.name, sampler=sampler, label=label,
              variant=variant, library=library, nfe=nfe, num_steps=num_steps, calls=None,
              expected_calls=expected_calls, rmse=None, max_abs_error=None, median_abs_error=None, status="ok")


def run_genjax(problem: Problem, case: AccuracyCase, nfes, all_variants: bool = True) -> list[dict]:
  records = []
  for variant, kwargs in variants(case)[:None if all_variants else 1]:
    for nfe in nfes:
      n = case.steps_for(nfe)
      r = _record(problem, case.key, case.label, variant, "genjax", nfe, n, case.calls(n))
      kw = {**dict(case.options), **kwargs}
      schedule = kw.pop("schedule", problem.schedule)
      mixtures.reset_calls()
      try:
        x = np.asarray(jax.block_until_ready(case.spec(problem.model_fn, schedule, jnp.asarray(problem.x_T),
                                                       num_steps=n, **kw)))
      except ValueError as e:      # an option this sampler does not offer (UserError is a ValueError)
        if variant == "default":
          raise
        records.append({**r, "status": f"unsupported: {e}"[:160]})
        break
      records.append({**r, "calls": mixtures.calls(), **_score(problem, x)})
  return records


def run_peers(problem: Problem, runners, nfes) -> list[dict]:
  records = []
  for runner in runners:
    for nfe in nfes:
      r = _record(problem, runner.key, accuracy_peers.LABELS[runner.key], runner.variant, "diffusers", nfe, nfe, nfe)
      mixtures.reset_calls()
      try:
        x = np.asarray(jax.block_until_ready(runner.sample(problem.model_fn, problem.schedule, problem.x_T, nfe)))
      except Exception as e:  # a diffusers option that crashes (e.g. "leading" in the DPM scheduler): report it
        records.append({**r, "status": f"peer failed: {type(e).__name__}: {e}"[:160]})
        break
      records.append({**r, "calls": mixtures.calls(), **_score(problem, x)})
  return records


def run(mixture_names, schedules, nfes, sampler_keys=None, *, num_points: int = 500, gt_steps: int = 2000,
        peers: bool = True, all_variants: bool = True, log=print) -> dict:
  """Scores every available sampler (and peer) on every (schedule, mixture, NFE); returns the result dict
  (`all_variants=False`: each sampler's defaults only)."""
  unknown = sorted(set(mixture_names) - set(mixtures.MIXTURES))
  if unknown:
    raise ValueError(f"unknown mixtures {unknown}; valid: {list(mixtures.MIXTURES)}")
  bad = sorted(set(schedules) - set(SCHEDULES) - {"flow"})
  if bad:
    raise ValueError(f"unknown schedules {bad}; valid: {list(SCHEDULES) + ['flow']}")
  keys = list(SAMPLER_KEYS if sampler_keys is None else sampler_keys)
  unknown = sorted(set(keys) - set(SAMPLER_KEYS))
  if unknown:
    raise ValueError(f"unknown samplers {unknown}; valid: {list(SAMPLER_KEYS)}")
  cases = [s for s in SAMPLERS if s.key in keys]
  runners = accuracy_peers.peer_runners() if peers else []
  records, truths = [], []
  for schedule_name in schedules:
    for name in mixture_names:
      problem = make_problem(schedule_name, mixtures.MIXTURES[name], num_points, gt_steps)
      if not problem.truth_convergence <= GROUND_TRUTH_TOLERANCE:
        raise RuntimeError(f"ground truth not converged on {schedule_name}/{name}: RK4 n vs 2n steps differ by "
                           f"{problem.truth_convergence:.2e} > {GROUND_TRUTH_TOLERANCE}; raise --ground_truth_steps")
      truths.append({"schedule": schedule_name, "mixture": name, "rk4_steps": 2 * gt_steps,
                     "max_abs_change_from_halving_steps": problem.truth_convergence})
      space = "flow" if schedule_name == "flow" else "diffusion"
      records += [r for case in cases if case.space == space for r in run_genjax(problem, case, nfes, all_variants)]
      if space == "diffusion":
        records += run_peers(problem, runners, nfes)
      log(f"{schedule_name}/{name}: {len(records)} records so far")
  wrong = [r for r in records if r["status"] == "ok" and r["calls"] != r["expected_calls"]]
  if wrong:
    raise RuntimeError(f"model-call count differs from the declared count: {wrong[:3]}")
  return {"nfes": list(nfes), "num_points": num_points, "mixtures": {n: mixtures.MIXTURES[n].description
                                                                     for n in mixture_names},
          "ground_truth": truths,
          "peers": "diffusers " + _diffusers_version() if runners else "not installed",
          "records": records, "goals": goals(records), "goals_geomean": goals(geomean_records(records))}


def _diffusers_version() -> str:
  try:
    import diffusers
    return diffusers.__version__
  except ImportError:
    return "?"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quick = common.QUICK.value
  nfes = common.parse_ints(_NFE.value, "nfe")
  result = run(_MIXTURES.value, list(SCHEDULES) + ["flow"], nfes, _ACC_SAMPLERS.value,
               num_points=64 if quick else _NUM_POINTS.value, gt_steps=500 if quick else _GT_STEPS.value,
               peers=common.PEERS.value)
  result["device"] = common.device_label()
  result["command"] = "python -m benchmarks.sampler_accuracy" + (" --quick" if quick else "")
  md = markdown(result)
  print(md)
  # --quick writes only the outputs named on the command line (never over docs/results).
  wanted = lambda flag: flag.value and (not quick or flags.FLAGS[flag.name].present)  # noqa: E731
  path = common.JSON.value or (None if quick else os.path.join(_RESULTS, "sampler_accuracy.json"))
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(clean_json(result), f, indent=1)
      f.write("\n")
  if wanted(_MARKDOWN):
    with open(_MARKDOWN.value, "w") as f:
      f.write(md + "\n")
  if wanted(_PNG):
    plot(result, _PNG.value)


if __name__ == "__main__":
  app.run(main)
