"""Jitted samplers, importable with jax alone (no Flax, no model class).

Diffusion: `NoiseSchedule` (`.schedules`), ddpm_sample, ddim_sample, dpm_solver_sample, unipc_sample
(`.diffusion`), their pure steps for hand-written loops: SamplerState, ddim_step, ddpm_step, dpm_solver_step,
unipc_step, denoise (`.steps`), step grids: make_timesteps, SPACINGS (`.spacing`), classifier_free_guidance
(`.guidance`); EDM / Karras samplers euler_sample, heun_sample, euler_ancestral_sample, karras_sigmas (`.edm`);
flow matching FlowSchedule, flow_sample (`.flow`); editing img2img_sample, inpaint_sample (`.editing`); the one
sampler registry every caller dispatches through: SamplerSpec, SamplerOption, DIFFUSION_SAMPLERS, FLOW_SAMPLERS,
sampler_spec, sampler_names, run_sampler, help_text (`.registry`). Text decoding (`genjax.samplers.decoding`):
top_k_logits, top_p_logits, min_p_logits, filter_logits, generate, beam_search, DecodingModel (the model
interface), DecodingSettings (every decoding knob as one frozen value, `.settings`), GenerateOutput,
BeamSearchOutput and the logit processors they are built from; exact speculative decoding
(`genjax.samplers.speculative`): speculative_generate, SpeculativeOutput.
"""
from genjax.samplers.diffusion import ddim_sample, ddpm_sample, dpm_solver_sample, unipc_sample
from genjax.samplers.edm import euler_ancestral_sample, euler_sample, heun_sample, karras_sigmas
from genjax.samplers.editing import img2img_sample, inpaint_sample
from genjax.samplers.flow import FlowSchedule, flow_sample
from genjax.samplers.guidance import classifier_free_guidance
from genjax.samplers.registry import (DIFFUSION_SAMPLERS, FLOW_SAMPLERS, SamplerOption, SamplerSpec, help_text,
                                      run_sampler, sampler_names, sampler_spec)
from genjax.samplers.schedules import PREDICTIONS, NoiseSchedule
from genjax.samplers.spacing import SPACINGS, make_timesteps
from genjax.samplers.steps import SamplerState, ddim_step, ddpm_step, denoise, dpm_solver_step, unipc_step
from genjax.samplers.decoding import (BeamSearchOutput, DecodingModel, GenerateOutput, beam_search, filter_logits,
                                      generate, min_p_logits, top_k_logits, top_p_logits)
from genjax.samplers.settings import DecodingSettings
from genjax.samplers.speculative import SpeculativeOutput, speculative_generate

__all__ = ["NoiseSchedule", "PREDICTIONS", "ddpm_sample", "ddim_sample", "dpm_solver_sample", "unipc_sample",
           "classifier_free_guidance", "SPACINGS", "make_timesteps", "SamplerState", "denoise", "ddim_step",
           "ddpm_step", "dpm_solver_step", "unipc_step",
           "euler_sample", "heun_sample", "euler_ancestral_sample", "karras_sigmas", "FlowSchedule", "flow_sample",
           "img2img_sample", "inpaint_sample", "SamplerSpec", "SamplerOption", "DIFFUSION_SAMPLERS", "FLOW_SAMPLERS",
           "sampler_spec", "sampler_names", "run_sampler", "help_text",
           "top_k_logits", "top_p_logits", "min_p_logits", "filter_logits", "generate", "beam_search", "DecodingModel",
           "DecodingSettings", "GenerateOutput", "BeamSearchOutput", "speculative_generate", "SpeculativeOutput"]
