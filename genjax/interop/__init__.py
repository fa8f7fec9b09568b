"""Other people's checkpoints in and out of genjax (no network, no torch).

- `genjax.interop.hf`: Hugging Face causal LMs (GPT-2, Llama, Mistral, Qwen2) — `load_lm`, `load_tokenizer`,
  `save_lm`, and `pretrained_for(config)`: the checkpoint `config.model.init_from` names, as the lm family starts
  from it. The models never import this package: a launcher resolves a config's outside weights here and passes
  them down, `genjax.models.get_task(config, pretrained=hf.pretrained_for(config))`.
- `genjax.interop.diffusers`: diffusers `UNet2DModel` DDPM U-Nets and their schedules — `load_unet`,
  `load_schedule`, `load_sampler_options`, `load_pipeline` / `sample_images` (any genjax diffusion sampler).

Submodules are imported on use (`from genjax.interop import hf`); the package itself holds what both share.
"""
from safetensors import SafetensorError, safe_open

from genjax.errors import CheckpointError


def open_safetensors(file: str, framework: str):
  """`safetensors.safe_open(file, framework)`, where a file that is truncated or not safetensors at all is a one-line
  `genjax.errors.CheckpointError` naming it (safetensors reads the header, and checks the file's length against it,
  on opening)."""
  try:
    return safe_open(file, framework=framework)
  except SafetensorError as e:
    raise CheckpointError(f"{file} is truncated or not a safetensors file ({e}); download or save it again") from None
