r"""GPT-2 from Hugging Face transformers (Flax; releases <= 4.57) as a genjax `DecodingModel`: a worked example of
plugging in a third-party model whose KV cache has ONE write index for the whole batch.

genjax's decoding loop (`genjax.samplers.decoding`) calls `step_fn(params, tokens, positions, cache)` with per-row
positions (rows of different prompt lengths sit at different positions) and repeats / reorders caches by row, so
every cache leaf must be batch-first. HF Flax writes the T new keys of every row at a shared `cache_index` slot and
masks attention by slot. The wrapper bridges the two:

  - each `cache_index` is stored once per row (int32 [B], all equal) and handed to HF as the scalar it expects;
  - `slot_position` int32 [B, C] records which position each slot holds for each row (-1: empty or stale). Before a
    call writes positions p0.. of a row, every slot holding a position >= p0 is marked stale (a right-padding token
    of a shorter prompt, a rejected draft token), and `slot_position >= 0` becomes HF's attention mask; HF's own
    slot-causal mask keeps the T new tokens causal among themselves;
  - the per-row positions go to HF as `position_ids` (GPT-2's learned position table).

Slots are used in call order, so the cache needs prompt width + max_new_tokens - 1 slots (generate's default;
beam_search's one spare step past the end writes a clamped slot whose logits are discarded) and at most
`n_positions`. That fits `generate` and `beam_search`; `speculative_generate` rewrites rejected positions and
would need a slot per token fed, so use it with slot == position caches (genjax's own LM).

    from transformers import FlaxGPT2LMHeadModel, GPT2Config
    from genjax.samplers import generate
    hf = FlaxGPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=4), seed=0)
    model = gpt2_decoding_model(hf)
    out = generate(model, hf.params, [[464, 3290], [40]], rng=rng, max_new_tokens=20, top_p=0.9)

`genjax_lm_from_flax(hf, params, workdir)` goes the other way for the same weights: it writes them as the
checkpoint transformers' PyTorch GPT-2 reads (`config.json` + `model.safetensors`) and loads that with
`genjax.interop.hf.load_lm`, giving genjax's own LM (`genjax.models.transformer`) with HF's exact weights:

    cfg, params = genjax_lm_from_flax(hf, hf.params, "/tmp/gpt2")
    out = generate(transformer.decoding_model(cfg), params, [[464, 3290], [40]], rng=rng, max_new_tokens=20)
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from genjax.samplers import DecodingModel

_INDEX = "cache_index"


def _is_index(path) -> bool:
  return str(getattr(path[-1], "key", path[-1])) == _INDEX


def gpt2_decoding_model(hf_model) -> DecodingModel:
  """The DecodingModel of a `FlaxGPT2LMHeadModel` (params: `hf_model.params`); max_len = `n_positions`."""
  module, max_len = hf_model.module, int(hf_model.config.n_positions)

  def init_cache(batch_size: int, cache_len: int):
    if cache_len > max_len:
      raise ValueError(f"cache_len={cache_len} exceeds GPT-2's n_positions={max_len}")
    shapes = jax.eval_shape(lambda: hf_model.init_cache(batch_size, cache_len))
    hf = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.zeros((batch_size,), jnp.int32) if _is_index(path) else jnp.zeros(s.shape, s.dtype),
        shapes)
    return {"hf": hf, "slot_position": jnp.full((batch_size, cache_len), -1, jnp.int32)}

  def step_fn(params, tokens, positions, cache):
    batch = tokens.shape[0]
    index = next(x for p, x in jax.tree_util.tree_leaves_with_path(cache["hf"]) if _is_index(p))[0]
    slot_position = jnp.where(cache["slot_position"] >= positions[:, :1], -1, cache["slot_position"])
    slot_position = jax.lax.dynamic_update_slice(slot_position, positions.astype(jnp.int32), (0, index))
    hf_cache = jax.tree_util.tree_map_with_path(lambda p, x: x[0] if _is_index(p) else x, cache["hf"])
    out, mutated = module.apply({"params": params, "cache": hf_cache}, tokens, (slot_position >= 0).astype("i4"),
                                positions, deterministic=True, init_cache=False, return_dict=True,
                                mutable=["cache"])
    hf_cache = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.broadcast_to(x, (batch,)) if _is_index(p) else x, mutated["cache"])
    return out.logits, {"hf": hf_cache, "slot_position": slot_position}

  return DecodingModel(step_fn=step_fn, init_cache=init_cache, max_len=max_len)


def torch_state_dict(params) -> dict:
  """HF Flax GPT-2 params as the name -> numpy array dict of transformers' PyTorch GPT-2 (`transformer.h.0.attn.
  c_attn.weight`, ...): Flax's `embedding` / `scale` / `kernel` become `weight`, and a Flax Conv1D kernel, stored
  [out, in], is transposed to PyTorch Conv1D's [in, out]."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(getattr(k, "key", k)) for k in path]
    x = np.asarray(x)
    if keys[-1] == "kernel":
      x = x.T
    out[".".join(keys[:-1] + ["weight" if keys[-1] in ("embedding", "scale", "kernel") else keys[-1]])] = x
  return out


def genjax_lm_from_flax(hf_model, params, workdir: str):
  """(LMConfig, params) of genjax's own LM holding the same weights as the Flax GPT-2 `hf_model` with `params`:
  written to `workdir` as a PyTorch-layout checkpoint, then read back by `genjax.interop.hf.load_lm`."""
  from safetensors.numpy import save_file
  from genjax.interop import hf
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(hf_model.config.to_dict(), f)
  save_file({k: np.ascontiguousarray(v) for k, v in torch_state_dict(params).items()},
            os.path.join(workdir, "model.safetensors"))
  return hf.load_lm(workdir)
