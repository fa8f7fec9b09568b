"""The one sampler registry: every diffusion and flow sampler by name, its options, and the one dispatch; jax only.

    from genjax.samplers import run_sampler, sampler_spec, sampler_names
    x0 = run_sampler("dpm_solver_3m", model_fn, schedule, x_T, rng=key, num_steps=20)   # any name, same call
    x0 = run_sampler("heun", model_fn, schedule, x_T, rng=key, num_steps=18, s_churn=40.0)
    x0 = run_sampler("midpoint", velocity_fn, FlowSchedule(shift=3.0), x_T, rng=key, num_steps=10, space="flow")
    sampler_names()                      # ('ddpm', 'ddim', 'dpm_solver', ..., 'euler_ancestral')
    sampler_spec("unipc").defaults()     # {'order': 2, 'variant': 'bh2', ...}: the function's own defaults

Two name spaces: `DIFFUSION_SAMPLERS` (models that predict noise / v / x0 on a `NoiseSchedule`: the VP samplers of
`genjax.samplers.diffusion` and the EDM / Karras samplers of `genjax.samplers.edm`) and `FLOW_SAMPLERS` (velocity
models on a `FlowSchedule`: the methods of `genjax.samplers.flow`); "euler" and "heun" exist in both. A
`SamplerSpec` is a sampler function plus the arguments its name fixes (dpm_solver_3m = `dpm_solver_sample` with
order=3) and the options a caller may pass, each marked runtime (a traced value: changing it compiles nothing) or
structural (part of the compiled program's key), with its valid values where they are a fixed set; the defaults
are the function's own. Every caller (the diffusion family, image editing, the diffusers interop, the CLIs, the
benchmarks) dispatches through `run_sampler` / `SamplerSpec.__call__`, so adding a sampler is one entry here and an
unknown name is a one-line UserError listing the valid ones.

Every sampler has the call shape `fn(model_fn, schedule, x_T, *, num_steps, rng, **options)`; `rng` is unused by
the deterministic ones.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Callable, Mapping

import jax

from genjax.errors import UserError, check_choice
from genjax.samplers import diffusion, edm, flow
from genjax.samplers.schedules import PREDICTION_ALIASES, PREDICTIONS
from genjax.samplers.spacing import SPACINGS
from genjax.samplers.steps import DDPM_VARIANCES, UNIPC_VARIANTS

__all__ = ["SamplerOption", "SamplerSpec", "DIFFUSION_SAMPLERS", "FLOW_SAMPLERS", "SPACES", "KINDS", "sampler_spec",
           "sampler_names", "run_sampler", "help_text"]

SPACES = ("diffusion", "flow")
KINDS = ("vp", "edm", "flow")   # noise-prediction samplers, EDM / Karras samplers, flow-matching ODE methods
CALL_ARGUMENTS = ("model_fn", "schedule", "x_T", "num_steps", "rng")   # what every sampler takes (not options)


@dataclasses.dataclass(frozen=True)
class SamplerOption:
  """A keyword option of a sampler: `runtime` (traced: any value shares one compiled program) or structural (part
  of the program's key), and its valid values when they are a fixed set (`choices`, empty otherwise)."""
  name: str
  runtime: bool
  choices: tuple = ()


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """One named sampler: `function(model_fn, schedule, x_T, *, num_steps, rng, **fixed, **options)`.

  Attributes:
    name: the registry name (a CLI / config value).
    kind: one of KINDS.
    function: the sampler function.
    fixed: ((argument, value), ...) the name implies (dpm_solver_3m: order=3); a caller cannot pass them.
    options: the SamplerOptions a caller may pass.
    help: one line for --help and the docs.
    calls_per_step: model calls per step; final_saving: calls saved on the last step (Heun's last step is Euler).
  """
  name: str
  kind: str
  function: Callable
  fixed: tuple = ()
  options: tuple = ()
  help: str = ""
  calls_per_step: int = 1
  final_saving: int = 0

  @property
  def space(self) -> str:
    """"flow" for flow-matching methods, else "diffusion"."""
    return "flow" if self.kind == "flow" else "diffusion"

  @property
  def option_names(self) -> tuple[str, ...]:
    """The options' names in the function signature's order."""
    order = list(inspect.signature(self.function).parameters)
    return tuple(sorted((o.name for o in self.options), key=order.index))

  def defaults(self) -> dict:
    """{option: the function's default} for every option of this sampler (None = the function picks)."""
    params = inspect.signature(self.function).parameters
    return {name: params[name].default for name in self.option_names}

  def model_calls(self, num_steps: int) -> int:
    """Model calls per sample for `num_steps` steps."""
    return self.calls_per_step * num_steps - self.final_saving

  def __call__(self, model_fn: Callable, schedule, x_T, *, rng=None, num_steps=None, **options) -> jax.Array:
    """Runs the sampler: `options` must be among `option_names` (one UserError naming the valid ones)."""
    for key in options:
      if key not in self.option_names:
        raise UserError(f"option {key!r} does not apply to sampler={self.name!r}; valid: "
                        f"{', '.join(self.option_names)}")
    return self.function(model_fn, schedule, x_T, num_steps=num_steps, rng=rng, **dict(self.fixed), **options)


def _opts(*specs) -> tuple[SamplerOption, ...]:
  """SamplerOptions from (name, runtime[, choices]) tuples."""
  return tuple(SamplerOption(*s) for s in specs)


_PREDICTION = ("prediction", False, PREDICTIONS + tuple(PREDICTION_ALIASES))
_GRID = _opts(("timesteps", True), ("spacing", False, SPACINGS), ("steps_offset", True))
_OUTPUT = _opts(_PREDICTION, ("clip_denoised", True), ("dynamic_threshold", True), ("threshold_max", True))
_MULTISTEP = _opts(("order", True, (1, 2, 3)), ("lower_order_final", True, (True, False)))
_KARRAS = _opts(("s_noise", True), ("rho", True), ("sigma_min", True), ("sigma_max", True),
                ("quantize", False, (False, True)))
_CHURN = _opts(("s_churn", True), ("s_tmin", True), ("s_tmax", True))


def _entries(*specs: SamplerSpec) -> Mapping[str, SamplerSpec]:
  return types.MappingProxyType({s.name: s for s in specs})


DIFFUSION_SAMPLERS: Mapping[str, SamplerSpec] = _entries(
    SamplerSpec("ddpm", "vp", diffusion.ddpm_sample,
                options=_GRID + _OUTPUT + _opts(("variance", False, DDPM_VARIANCES)),
                help="ancestral DDPM (Ho et al. 2020), exact on strided steps; stochastic"),
    SamplerSpec("ddim", "vp", diffusion.ddim_sample, options=_GRID + _OUTPUT + _opts(("eta", True)),
                help="DDIM (Song et al. 2021): eta 0 deterministic, eta 1 = strided DDPM"),
    SamplerSpec("dpm_solver", "vp", diffusion.dpm_solver_sample, fixed=(("stochastic", False),),
                options=_GRID + _OUTPUT + _MULTISTEP, help="DPM-Solver++(2M) (Lu et al. 2022); order= 1 | 2 | 3"),
    SamplerSpec("dpm_solver_3m", "vp", diffusion.dpm_solver_sample, fixed=(("order", 3), ("stochastic", False)),
                options=_GRID + _OUTPUT + _MULTISTEP[1:], help="DPM-Solver++(3M) (Lu et al. 2022)"),
    SamplerSpec("dpm_solver_sde", "vp", diffusion.dpm_solver_sample, fixed=(("stochastic", True),),
                options=_GRID + _OUTPUT + _MULTISTEP, help="DPM-Solver++(2M) SDE (Lu et al. 2023); stochastic"),
    SamplerSpec("unipc", "vp", diffusion.unipc_sample,
                options=_GRID + _OUTPUT + _MULTISTEP + _opts(("variant", False, UNIPC_VARIANTS)),
                help="UniPC-bh2 predictor-corrector (Zhao et al. 2023)"),
    SamplerSpec("euler", "edm", edm.euler_sample, options=_GRID + _OUTPUT + _CHURN + _KARRAS,
                help="Euler on a Karras sigma grid (Karras et al. 2022); float t"),
    SamplerSpec("heun", "edm", edm.heun_sample, options=_GRID + _OUTPUT + _CHURN + _KARRAS, calls_per_step=2,
                final_saving=1, help="Heun, EDM's Algorithm 2 (Karras et al. 2022): 2 num_steps - 1 calls; float t"),
    SamplerSpec("euler_ancestral", "edm", edm.euler_ancestral_sample,
                options=_GRID + _OUTPUT + _opts(("eta", True)) + _KARRAS,
                help="Euler-ancestral on a Karras sigma grid (k-diffusion); stochastic, float t"),
)

FLOW_SAMPLERS: Mapping[str, SamplerSpec] = _entries(
    SamplerSpec("euler", "flow", flow.flow_sample, fixed=(("method", "euler"),),
                help="Euler on the rectified-flow ODE (Liu et al. 2022): 1 call a step"),
    SamplerSpec("heun", "flow", flow.flow_sample, fixed=(("method", "heun"),), calls_per_step=2,
                help="Heun (trapezoidal) on the rectified-flow ODE: 2 calls a step, order 2"),
    SamplerSpec("midpoint", "flow", flow.flow_sample, fixed=(("method", "midpoint"),), calls_per_step=2,
                help="explicit midpoint on the rectified-flow ODE: 2 calls a step, order 2"),
)

_BY_SPACE = {"diffusion": DIFFUSION_SAMPLERS, "flow": FLOW_SAMPLERS}


def sampler_names(space: str = "diffusion") -> tuple[str, ...]:
  """The registry names of `space` ("diffusion" | "flow"), in registry order."""
  return tuple(_BY_SPACE[check_choice("space", space, SPACES)])


def sampler_spec(name: str, space: str = "diffusion") -> SamplerSpec:
  """The SamplerSpec of `name` in `space`; an unknown name is a UserError listing the valid ones."""
  samplers = _BY_SPACE[check_choice("space", space, SPACES)]
  return samplers[check_choice("sampler", name, samplers)]


def run_sampler(name: str, model_fn: Callable, schedule, x_T, *, rng=None, num_steps=None, space: str = "diffusion",
                **options) -> jax.Array:
  """The one dispatch: sampler `name` of `space` on (model_fn, schedule, x_T) with `options` (checked against the
  sampler's; see `SamplerSpec.__call__`). Returns what the sampler function returns, bit for bit."""
  return sampler_spec(name, space)(model_fn, schedule, x_T, rng=rng, num_steps=num_steps, **options)


def help_text() -> str:
  """The sampler names for a CLI's --help: the diffusion samplers, then the flow-matching ones."""
  return f"{' | '.join(sampler_names())}; flow-matching runs: {' | '.join(sampler_names('flow'))}"
