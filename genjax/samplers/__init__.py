"""Jitted samplers, importable with jax alone (no Flax, no model class).

Diffusion (`genjax.samplers.diffusion`): NoiseSchedule, ddpm_sample, ddim_sample, dpm_solver_sample,
classifier_free_guidance. Text decoding (`genjax.samplers.decoding`): top_k_logits, top_p_logits, generate,
beam_search and the logit processors they are built from.
"""
from genjax.samplers.diffusion import (NoiseSchedule, classifier_free_guidance, ddim_sample, ddpm_sample,
                                       dpm_solver_sample)
from genjax.samplers.decoding import beam_search, generate, top_k_logits, top_p_logits

__all__ = ["NoiseSchedule", "ddpm_sample", "ddim_sample", "dpm_solver_sample", "classifier_free_guidance",
           "top_k_logits", "top_p_logits", "generate", "beam_search"]
