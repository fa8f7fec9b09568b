"""genjax.samplers.registry: one list of sampler names that every caller reads, one dispatch, one call shape.

The registry's names are the diffusion family's, the CLI help's, the diffusers interop's, image editing's and the
sampler benchmark's; an unknown name's error lists them; each entry's dispatch is bit for bit the direct call of the
function it names (with the arguments its name implies); the options each entry declares are exactly its function's
keyword arguments; every sampler takes (model_fn, schedule, x_T, *, num_steps, rng, ...).
"""
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from genjax.errors import UserError
from genjax.samplers import diffusion, edm, editing, flow, registry, steps
from genjax.samplers.flow import FlowSchedule
from genjax.samplers.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.linear(num_timesteps=50)
MU, S = 0.3, 0.5


def gaussian_eps(mu, s, x, t):
  """The optimal eps for data ~ N(mu, s^2) (int or float t)."""
  a = SCHEDULE.alpha_sigma(t)[0][:, None] ** 2
  return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * s * s + 1 - a)


def gaussian_velocity(mu, s, x, t):
  t = t[:, None]
  return (t - (1 - t) * s * s) * (x - (1 - t) * mu) / ((1 - t) ** 2 * s * s + t * t) - mu


EPS = Partial(gaussian_eps, jnp.float32(MU), jnp.float32(S))
VELOCITY = Partial(gaussian_velocity, jnp.float32(MU), jnp.float32(S))
X_T = jax.random.normal(jax.random.key(0), (8, 1), jnp.float32)
KEY = jax.random.key(1)


def cli_sampler_names(help_text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(diffusion names, flow names) as the --sampler help lists them."""
  match = re.fullmatch(r"Diffusion sampler: (.*); flow-matching runs: (.*) \(default: the config's\)\.", help_text)
  assert match, help_text
  return tuple(match.group(1).split(" | ")), tuple(match.group(2).split(" | "))


def test_every_caller_lists_the_registry_names():
  from benchmarks import samplers as bench
  from experiments import cli
  from genjax.interop import diffusers
  from genjax.models import diffusion as family
  names, flow_names = registry.sampler_names(), registry.sampler_names("flow")
  assert names == ("ddpm", "ddim", "dpm_solver", "dpm_solver_3m", "dpm_solver_sde", "unipc", "euler", "heun",
                   "euler_ancestral")
  assert flow_names == flow.FLOW_METHODS == ("euler", "heun", "midpoint")
  assert cli_sampler_names(cli.SAMPLE_OPTIONS["sampler"][1]) == (names, flow_names)
  assert diffusers.SAMPLERS == names                       # the interop now has dpm_solver_3m / dpm_solver_sde too
  assert family.SAMPLERS == names and family.FLOW_METHODS == flow_names
  assert bench.SAMPLERS == names + tuple(f"flow_{m}" for m in flow_names)


def test_an_unknown_name_lists_the_valid_ones():
  with pytest.raises(UserError, match="sampler='plms' is not one of: " + ", ".join(registry.sampler_names())):
    registry.run_sampler("plms", EPS, SCHEDULE, X_T, num_steps=2)
  with pytest.raises(UserError, match="sampler='ddim' is not one of: euler, heun, midpoint"):
    registry.sampler_spec("ddim", "flow")
  with pytest.raises(UserError, match="space='pixel' is not one of: diffusion, flow"):
    registry.sampler_names("pixel")
  with pytest.raises(UserError, match="sampler='plms' is not one of: ddpm, ddim"):   # editing reads the registry
    editing.img2img_sample(EPS, SCHEDULE, X_T, strength=0.5, num_steps=4, rng=KEY, sampler="plms")


def test_options_a_name_fixes_or_lacks_are_refused_naming_the_valid_ones():
  with pytest.raises(UserError, match="option 'order' does not apply to sampler='dpm_solver_3m'; valid: "
                                      "lower_order_final, timesteps"):
    registry.run_sampler("dpm_solver_3m", EPS, SCHEDULE, X_T, num_steps=4, order=2)
  with pytest.raises(UserError, match="option 'eta' does not apply to sampler='unipc'"):
    registry.run_sampler("unipc", EPS, SCHEDULE, X_T, num_steps=4, eta=0.5)
  with pytest.raises(UserError, match="option 'prediction' does not apply to sampler='heun'; valid: $"):
    registry.run_sampler("heun", VELOCITY, FlowSchedule(), X_T, num_steps=4, space="flow", prediction="v")


@pytest.mark.parametrize("spec", [*registry.DIFFUSION_SAMPLERS.values(), *registry.FLOW_SAMPLERS.values()],
                         ids=lambda s: f"{s.space}-{s.name}")
def test_declared_options_are_the_functions_keywords_with_their_defaults(spec):
  params = inspect.signature(spec.function).parameters
  model_arg = list(params)[0]                              # model_fn, or velocity_fn for flow_sample
  calls = (set(registry.CALL_ARGUMENTS) - {"model_fn"}) | {model_arg}
  assert set(spec.option_names) | {k for k, _ in spec.fixed} | calls == set(params)
  assert not set(spec.option_names) & {k for k, _ in spec.fixed}
  assert list(params)[1:3] == ["schedule", "x_T"]          # one name for the schedule argument
  assert params["rng"].kind is inspect.Parameter.KEYWORD_ONLY and params["num_steps"].kind is params["rng"].kind
  for option in spec.options:
    if option.choices:                                     # the function's default is one of the valid values
      assert spec.defaults()[option.name] in option.choices, option
  assert spec.kind in registry.KINDS and spec.model_calls(5) >= 5


DIRECT = {   # name -> the direct call it must equal, bit for bit
    "ddpm": lambda: diffusion.ddpm_sample(EPS, SCHEDULE, X_T, rng=KEY, num_steps=6),
    "ddim": lambda: diffusion.ddim_sample(EPS, SCHEDULE, X_T, rng=KEY, num_steps=6),
    "dpm_solver": lambda: diffusion.dpm_solver_sample(EPS, SCHEDULE, X_T, rng=KEY, num_steps=6),
    "dpm_solver_3m": lambda: diffusion.dpm_solver_sample(EPS, SCHEDULE, X_T, rng=KEY, num_steps=6, order=3),
    "dpm_solver_sde": lambda: diffusion.dpm_solver_sample(EPS, SCHEDULE, X_T, rng=KEY, num_steps=6, stochastic=True),
    "unipc": lambda: diffusion.unipc_sample(EPS, SCHEDULE, X_T, num_steps=6),
    "euler": lambda: edm.euler_sample(EPS, SCHEDULE, X_T, num_steps=6),
    "heun": lambda: edm.heun_sample(EPS, SCHEDULE, X_T, num_steps=6),
    "euler_ancestral": lambda: edm.euler_ancestral_sample(EPS, SCHEDULE, X_T, rng=KEY, num_steps=6),
    "flow_euler": lambda: flow.flow_sample(VELOCITY, FlowSchedule(2.0), X_T, num_steps=6),
    "flow_heun": lambda: flow.flow_sample(VELOCITY, FlowSchedule(2.0), X_T, num_steps=6, method="heun"),
    "flow_midpoint": lambda: flow.flow_sample(VELOCITY, FlowSchedule(2.0), X_T, num_steps=6, method="midpoint"),
}


@pytest.mark.parametrize("name", list(DIRECT))
def test_dispatch_is_the_direct_call_bit_for_bit(name):
  space, sampler = ("flow", name[len("flow_"):]) if name.startswith("flow_") else ("diffusion", name)
  model_fn, schedule = (VELOCITY, FlowSchedule(2.0)) if space == "flow" else (EPS, SCHEDULE)
  got = registry.run_sampler(sampler, model_fn, schedule, X_T, rng=KEY, num_steps=6, space=space)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(DIRECT[name]()))
  assert np.all(np.isfinite(np.asarray(got)))


def test_every_diffusion_sampler_edits_images():
  """img2img takes any registry name (dpm_solver_3m / dpm_solver_sde included) and passes options through."""
  image = jnp.full((8, 1), 0.3, jnp.float32)
  kw = dict(strength=0.5, num_steps=6, rng=KEY)
  for name in registry.sampler_names():
    out = editing.img2img_sample(EPS, SCHEDULE, image, sampler=name, **kw)
    assert out.shape == image.shape and np.all(np.isfinite(np.asarray(out))), name
  kw.update(strength=1.0)                                  # 6 steps: 3M differs from 2M
  plain = editing.img2img_sample(EPS, SCHEDULE, image, sampler="dpm_solver", order=3, **kw)
  np.testing.assert_array_equal(editing.img2img_sample(EPS, SCHEDULE, image, sampler="dpm_solver_3m", **kw), plain)


def test_the_step_functions_name_their_schedule_argument_schedule():
  for fn in (steps.ddim_step, steps.ddpm_step, steps.dpm_solver_step, steps.unipc_step, steps.denoise,
             steps.lam_of, editing.inpaint_sample, editing.img2img_sample):
    assert "schedule" in inspect.signature(fn).parameters and "sched" not in inspect.signature(fn).parameters, fn
  for fn in (editing.inpaint_sample, editing.img2img_sample):
    assert inspect.signature(fn).parameters["rng"].kind is inspect.Parameter.KEYWORD_ONLY
