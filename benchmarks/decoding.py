r"""Text decoding benchmark: prefill and decode tokens/s of the genjax transformer LM, KV-cached vs recompute.

  python -m benchmarks.decoding --quick --json=/tmp/decoding.json              # CPU-sized
  python -m benchmarks.decoding --lm_config=experiments/configs/lm.py:gpt_small --batch_sizes=1,8,32 \
      --prompt_lens=64,256 --json=decoding_gpu.json                             # on an accelerator
  python -m benchmarks.decoding --lm_config.model.num_layers=1 --new_tokens=8   # any config field overrides

The model is the LM of `experiments/configs/lm.py:<variant>` (`--lm_config`, default `:pydoc`) with random weights
drawn on the host (`common.random_params`); prompts are random bytes, all rows the same length; no EOS (every row
decodes all `new_tokens`). Modes, each timed as the median of >= 5 calls after a warm-up:

  prefill        the prompt through the model into a fresh KV cache (what `generate` does first);
                 tokens_per_second = batch * prompt_len / seconds.
  cached         `genjax.samplers.generate(..., greedy=True)`: prefill + KV-cached decode loop, one program
                 (generate's argmax-only specialisation).
  cached_top_k   the same with temperature 1, top_k 40 (sampling);  cached_top_p: temperature 1, top_p 0.9. The
                 two share generate's sampling program (the first of them to run compiles it).
  recompute      greedy decoding without a cache: every new token runs the whole model over a fixed
                 [batch, prompt_len + new_tokens - 1] buffer (causal mask; static shapes, one program).
  transformers_flax[_top_p]  the peer: `FlaxGPT2LMHeadModel.generate` (GPT-2 of the same width, depth, heads,
                 MLP and vocabulary, random weights), jitted, greedy / top_p 0.9; optional ("peer not installed").

For decode modes tokens_per_second = batch * new_tokens / seconds (prefill included: what a user waits for) and
decode_tokens_per_second subtracts the measured prefill. The modes of one (batch, prompt_len, new_tokens) are timed
round-robin (`common.time_interleaved`), so that their ratios see the same load on a shared machine. Ratios:
`speedup_vs_recompute` (cached), `vs_greedy` (sampling modes: their overhead over greedy), `vs_genjax` (peer seconds
/ genjax seconds of the same setting, also timed round-robin).
`matches_cached` (recompute rows): the fraction of greedy tokens equal to the cached path's.
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

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("prefill", "cached", "recompute", "cached_top_k", "cached_top_p")
SAMPLING = {"cached_top_k": dict(temperature=1.0, top_k=40), "cached_top_p": dict(temperature=1.0, top_p=0.9)}

_LM_CONFIG = config_flags.DEFINE_config_file(
    "lm_config", os.path.join(_REPO, "experiments", "configs", "lm.py") + ":pydoc",
    "The LM config whose model is decoded (fields overridable: --lm_config.model.num_layers=1).", lock_config=False)
_MODES = flags.DEFINE_list("decode_modes", list(MODES), f"Decoding modes to time, from {list(MODES)}.")
_PROMPT_LENS = flags.DEFINE_list("prompt_lens", None, "Prompt lengths (default 16 with --quick, else 64,256).")
_NEW_TOKENS = flags.DEFINE_list("new_tokens", None, "New tokens per row (default 32,256).")

COLUMNS = ("mode", "batch", "prompt_len", "new_tokens", "seconds", "tokens_per_second", "decode_tokens_per_second",
           "speedup_vs_recompute", "vs_greedy", "vs_genjax", "matches_cached", "compiles")


class LMBench:
  """The LM of an lm config: params, its `DecodingModel`, and the jitted prefill / recompute programs."""

  def __init__(self, config, seed: int = 0):
    import flax.linen as nn
    from genjax.models import transformer as tr
    self.cfg = tr.lm_config(config)
    self.module = tr.TransformerLM(self.cfg)
    self.model = tr.decoding_model(self.cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    abstract = nn.unbox(jax.eval_shape(self.module.init, jax.random.key(0), tokens)["params"])
    self.params = common.random_params(abstract, seed)
    self.prefill = jax.jit(functools.partial(_prefill, self.model), static_argnums=0)
    self.recompute = jax.jit(functools.partial(_recompute_greedy, self.model), static_argnums=0)

  def prompts(self, batch: int, prompt_len: int, seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, prompt_len), dtype=np.int32))

  def generate(self, prompts, new_tokens: int, rng=None, **sampling):
    from genjax.samplers import generate
    from genjax.tokenizer import PAD_ID
    if not sampling:
      sampling = dict(greedy=True)
    return generate(self.model, self.params, prompts, rng, max_new_tokens=new_tokens, eos_id=None, pad_id=PAD_ID,
                    **sampling).tokens


def _prefill(model, cache_len: int, params, prompts):
  batch, width = prompts.shape
  positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
  logits, cache = model.step_fn(params, prompts, positions, model.init_cache(batch, cache_len))
  return logits[:, -1], cache


def _recompute_greedy(model, new_tokens: int, params, prompts):
  """Greedy decoding with no KV cache: each token runs the model over the whole (fixed-width) buffer."""
  batch, width = prompts.shape
  length = width + new_tokens - 1            # the longest context the last token needs
  buf = jnp.zeros((batch, length), jnp.int32).at[:, :width].set(prompts)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

  def body(t, carry):
    buf, out = carry
    logits, _ = model.step_fn(params, buf, positions, None)
    tok = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, width - 1 + t, axis=1, keepdims=False), axis=-1)
    tok = tok.astype(jnp.int32)
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, t))
    buf = jax.lax.dynamic_update_slice(buf, tok[:, None], (0, jnp.minimum(width + t, length - 1)))
    return buf, out

  out = jnp.zeros((batch, new_tokens), jnp.int32)
  return jax.lax.fori_loop(0, new_tokens, body, (buf, out))[1]


# --------------------------------------------------------------------------------------------- the peer
def transformers_gpt2(cfg) -> Optional[Callable]:
  """`generate(prompts, new_tokens, top_p=None)` with transformers' FlaxGPT2LMHeadModel at the LM's size, or None
  when transformers (with Flax models) is not importable."""
  try:
    from transformers import FlaxGPT2LMHeadModel, GPT2Config
  except Exception:  # not installed, or a release without Flax
    return None
  from genjax.tokenizer import BOS_ID, PAD_ID
  never = int(cfg.vocab_size)                # an EOS id argmax can never return: every row decodes all tokens
  conf = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.embed_dim,
                    n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.mlp_dim, bos_token_id=BOS_ID,
                    eos_token_id=never, pad_token_id=PAD_ID)
  model = FlaxGPT2LMHeadModel(conf, seed=0, dtype=jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32)
  params = model.params

  @functools.partial(jax.jit, static_argnames=("new_tokens", "top_p"))
  def run(params, prompts, new_tokens, top_p):
    kw = dict(do_sample=False) if top_p is None else dict(do_sample=True, top_p=top_p, top_k=0, temperature=1.0,
                                                           prng_key=jax.random.PRNGKey(0))
    return model.generate(prompts, params=params, max_new_tokens=new_tokens, pad_token_id=PAD_ID,
                          eos_token_id=never, **kw).sequences

  return lambda prompts, new_tokens, top_p=None: run(params, prompts, new_tokens=new_tokens, top_p=top_p)


# --------------------------------------------------------------------------------------------- the benchmark
def _row(mode, batch, prompt_len, new_tokens, timing: Optional[common.Timing] = None, **extra) -> dict:
  r = dict(mode=mode, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, seconds=None,
           tokens_per_second=None, decode_tokens_per_second=None, speedup_vs_recompute=None, vs_greedy=None,
           vs_genjax=None, matches_cached=None, compiles=None, compile_seconds=None, status="ok")
  if timing is not None:
    produced = batch * (new_tokens if new_tokens else prompt_len)
    r.update(seconds=timing.seconds, tokens_per_second=produced / timing.seconds, compiles=timing.compiles,
             compile_seconds=timing.warmup_overhead_seconds)
  r.update(extra)
  return r


def run(config, modes, batches, prompt_lens, new_tokens_list, repeats: int = 5, peers: bool = True) -> list[dict]:
  """Times every (batch, prompt_len, mode, new_tokens); returns the records (see module docstring)."""
  unknown = sorted(set(modes) - set(MODES))
  if unknown:
    raise ValueError(f"unknown decode modes {unknown}; valid: {list(MODES)}")
  bench = LMBench(config)
  longest = max(prompt_lens) + max(new_tokens_list) - 1
  if longest > bench.cfg.max_len:
    raise ValueError(f"prompt_len + new_tokens - 1 = {longest} exceeds the model's max_len={bench.cfg.max_len}")
  peer = transformers_gpt2(bench.cfg) if peers else None
  rng = jax.random.key(3)
  records = []
  for batch in batches:
    for p in prompt_lens:
      prompts = bench.prompts(batch, p)
      for i, n in enumerate(new_tokens_list):
        fns = {}
        for mode in modes:
          if mode == "prefill":      # with the cache `generate` allocates for n new tokens
            fns[mode] = functools.partial(bench.prefill, p + n - 1, bench.params, prompts)
          elif mode == "recompute":
            fns[mode] = functools.partial(bench.recompute, n, bench.params, prompts)
          else:
            fns[mode] = functools.partial(bench.generate, prompts, n, rng, **SAMPLING.get(mode, {}))
        # Round-robin over the modes, so that the ratios between them see the same machine load.
        timings = common.time_interleaved(fns, repeats)
        rows = {mode: _row(mode, batch, p, 0 if mode == "prefill" else n, t) for mode, t in timings.items()}
        prefill = rows.pop("prefill", None)
        if prefill is not None and i == 0:
          records.append(prefill)     # one prefill row per (batch, prompt_len)
        for mode, r in rows.items():
          if mode.startswith("cached") and prefill is not None and r["seconds"] > prefill["seconds"]:
            r["decode_tokens_per_second"] = batch * n / (r["seconds"] - prefill["seconds"])
        _ratios(bench, rows, prompts, n)
        records.extend(rows.values())
        records.extend(_peer_rows(peer, peers, prompts, batch, p, n, fns, repeats))
  return records


def _ratios(bench: LMBench, rows: dict, prompts, n: int) -> None:
  cached = rows.get("cached")
  if cached is None:
    return
  for mode in SAMPLING:
    if mode in rows:
      rows[mode]["vs_greedy"] = rows[mode]["seconds"] / cached["seconds"]
  if "recompute" in rows:
    cached["speedup_vs_recompute"] = rows["recompute"]["seconds"] / cached["seconds"]
    a = np.asarray(bench.generate(prompts, n))
    b = np.asarray(bench.recompute(n, bench.params, prompts))
    rows["recompute"]["matches_cached"] = float(np.mean(a == b))


def _peer_rows(peer, wanted, prompts, batch, p, n, fns, repeats) -> list[dict]:
  """transformers rows; each is timed round-robin with the genjax mode it is compared with."""
  if not wanted:
    return []
  if peer is None:
    return [_row("transformers_flax", batch, p, n, status="peer not installed (pip install 'genjax-zoo[peers]')")]
  out = []
  for mode, top_p, ours in (("transformers_flax", None, "cached"), ("transformers_flax_top_p", 0.9, "cached_top_p")):
    pair = {"peer": lambda: peer(prompts, n, top_p)}
    if ours in fns:
      pair["genjax"] = fns[ours]
    try:
      t = common.time_interleaved(pair, repeats)
    except Exception as e:  # an incompatible transformers release: say so, keep the genjax figures
      return out + [_row(mode, batch, p, n, status=f"peer failed: {type(e).__name__}: {e}"[:200])]
    r = _row(mode, batch, p, n, t["peer"])
    if "genjax" in t:
      r["vs_genjax"] = t["peer"].seconds / t["genjax"].seconds
    out.append(r)
  return out


def summary(records: list[dict]) -> list[str]:
  """Goal lines: cached >= 5x recompute at 256 new tokens; faster than the transformers-Flax peer."""
  lines = []
  for r in records:
    if r["mode"] == "cached" and r["speedup_vs_recompute"] is not None:
      goal = " (goal >= 5x)" if r["new_tokens"] == 256 else ""
      lines.append(f"cached vs recompute, batch {r['batch']}, prompt {r['prompt_len']}, {r['new_tokens']} new "
                   f"tokens: {r['speedup_vs_recompute']:.1f}x faster{goal}")
    if r["mode"].startswith("transformers_flax"):
      if r["status"] != "ok":
        lines.append(f"{r['mode']} (batch {r['batch']}): {r['status']}")
      elif r["vs_genjax"] is not None:
        lines.append(f"{r['mode']} / genjax at batch {r['batch']}, {r['new_tokens']} new tokens: "
                     f"{r['vs_genjax']:.2f}x the time (goal > 1)")
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  batches = common.batch_sizes(quick_default=(1, 4), full_default=(1, 8, 32))
  quick = common.QUICK.value
  prompt_lens = common.parse_ints(_PROMPT_LENS.value or ((16,) if quick else (64, 256)), "prompt_lens")
  new_tokens = common.parse_ints(_NEW_TOKENS.value or (32, 256), "new_tokens")
  info = common.device_info()
  records = common.stamp(run(_LM_CONFIG.value, list(_MODES.value), batches, prompt_lens, new_tokens,
                             common.repeats(), common.PEERS.value), "decoding", info)
  variant = _LM_CONFIG.value.get("variant", "?")
  common.print_table(records, COLUMNS, f"Decoding, LM of lm.py:{variant}, on {common.device_label(info)}; "
                     f"seconds = median of {common.repeats()} after warm-up")
  print("\n".join(summary(records)))
  common.write_json(records, common.JSON.value)


if __name__ == "__main__":
  app.run(main)
