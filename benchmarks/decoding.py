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

The peer (`--peer=hf`, default; needs transformers <= 4.57 with Flax: the `peers` extra) is ONE GPT-2
(`FlaxGPT2LMHeadModel`, random weights, the LM config's width / depth / heads / MLP, `--hf_vocab` ids), timed
round-robin, greedy and top_p 0.9:
  transformers_flax[_top_p]   HF's own jitted `generate`;
  genjax_gpt2[_top_p]         `genjax.samplers.generate` on genjax's own LM holding the same weights (written as a
                              PyTorch-layout checkpoint and read by `genjax.interop.hf.load_lm`: what a user
                              decoding a GPT-2 checkpoint with genjax runs; `matches_hf`: the fraction of its greedy
                              tokens equal to HF's, 1.0 when the models agree);
  genjax_hf_module[_top_p]    `genjax.samplers.generate` driving HF's own Flax module through
                              `benchmarks.hf_gpt2.gpt2_decoding_model` (the same model code: the decoding loops alone);
  vs_genjax = HF seconds / that genjax row's seconds (goal >= 1.3 for genjax_gpt2); host_seconds (host_seconds_best)
  = the median (least) time a genjax_gpt2 `generate` call takes to return (jax runs the program asynchronously:
  checks, packing, argument transfer, dispatch; the median also holds waits for a core on a loaded machine),
  host_fraction = host_seconds / its compiled program alone (the same arguments, captured from one call; goal
  <= 0.1); compiles_new_batch = programs compiled by the first call at a batch size not seen before (goal: 1).

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
import statistics
import tempfile
import time
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
_PEER = flags.DEFINE_enum("peer", "hf", ["hf", "none"], "hf: also time HF Flax GPT-2 generate vs genjax on it.")
_HF_VOCAB = flags.DEFINE_integer("hf_vocab", 50257, "Vocabulary of the peer GPT-2 (GPT-2's own by default).")
_HF_NEW_TOKENS = flags.DEFINE_integer("hf_new_tokens", 128, "New tokens per row in the peer comparison.")

COLUMNS = ("mode", "batch", "prompt_len", "new_tokens", "seconds", "tokens_per_second", "decode_tokens_per_second",
           "speedup_vs_recompute", "vs_greedy", "vs_genjax", "host_fraction", "compiles_new_batch", "compiles")


class LMBench:
  """The LM of an lm config: params, its `DecodingModel`, and the jitted prefill / recompute programs."""

  def __init__(self, config, seed: int = 0):
    import flax.linen as nn
    from genjax.models import transformer as tr
    self.cfg = tr.lm_config(config)
    self.module = tr.TransformerLM(self.cfg)
    self.model = tr.decoding_model(self.cfg, max_len=self.cfg.max_len)   # random weights: no trained context
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
    return generate(self.model, self.params, prompts, rng=rng, max_new_tokens=new_tokens, eos_id=None, pad_id=PAD_ID,
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
class HFPeer:
  """One GPT-2 (transformers' FlaxGPT2LMHeadModel at the LM's size), decoded by HF generate and by genjax."""

  def __init__(self, cfg, vocab: int):
    from transformers import FlaxGPT2LMHeadModel, GPT2Config
    from benchmarks.hf_gpt2 import genjax_lm_from_flax, gpt2_decoding_model
    from genjax.models import transformer as tr
    self.never = vocab                  # an EOS id argmax can never return: every row decodes all tokens
    conf = GPT2Config(vocab_size=vocab, n_positions=cfg.max_len, n_embd=cfg.embed_dim, n_layer=cfg.num_layers,
                      n_head=cfg.num_heads, n_inner=cfg.mlp_dim, bos_token_id=0, eos_token_id=self.never,
                      pad_token_id=0)
    self.hf = FlaxGPT2LMHeadModel(conf, seed=0, _do_init=False)
    abstract = jax.eval_shape(lambda: self.hf.init_weights(jax.random.PRNGKey(0), (1, 8)))
    self.params = common.random_params(abstract, 0)
    self.model = gpt2_decoding_model(self.hf)
    self.vocab = vocab
    with tempfile.TemporaryDirectory() as workdir:    # genjax's own LM with the same weights
      native_cfg, self.native_params = genjax_lm_from_flax(self.hf, self.params, workdir)
    self.native = tr.decoding_model(native_cfg)

    @functools.partial(jax.jit, static_argnames=("new_tokens", "top_p"))
    def hf_generate(params, prompts, new_tokens, top_p):
      kw = dict(do_sample=False) if top_p is None else dict(do_sample=True, top_p=top_p, top_k=0, temperature=1.0,
                                                             prng_key=jax.random.PRNGKey(0))
      return self.hf.generate(prompts, params=params, max_new_tokens=new_tokens, pad_token_id=0,
                              eos_token_id=self.never, **kw).sequences
    self._hf_generate = hf_generate

  def prompts(self, batch: int, prompt_len: int, seed: int = 1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, self.vocab, (batch, prompt_len), dtype=np.int32))

  def hf_fn(self, prompts, new_tokens: int, top_p):
    return lambda: self._hf_generate(self.params, prompts, new_tokens=new_tokens, top_p=top_p)

  def genjax_fn(self, prompts, new_tokens: int, top_p, native: bool = True):
    """genjax generate on genjax's own GPT-2 (`native`) or on HF's module through the wrapper."""
    from genjax.samplers import generate
    kw = dict(greedy=True) if top_p is None else dict(temperature=1.0, top_p=top_p)
    rng = jax.random.key(0)
    model, params = (self.native, self.native_params) if native else (self.model, self.params)
    prompts = np.asarray(prompts)
    return lambda: generate(model, params, prompts, rng=rng, max_new_tokens=new_tokens, pad_id=0, **kw).tokens


def _program_only(call: Callable):
  """genjax's compiled decode program alone, with the arguments one `generate` call passed it (captured)."""
  from genjax.samplers import decoding
  jitted, captured = decoding._generate_jit, []
  decoding._generate_jit = lambda *args: captured.append(args) or jitted(*args)
  try:
    jax.block_until_ready(call())
  finally:
    decoding._generate_jit = jitted
  args = captured[0]
  return lambda: jitted(*args).tokens


def _dispatch_seconds(call: Callable, repeats: int) -> tuple[float, float]:
  """(median, best) time a call takes to return: jax runs the compiled program asynchronously, so for `generate`
  this is its host work (checks, packing, argument transfer, dispatch); each call is then waited for. On a loaded
  machine the median also holds waits for a core (the program's thread competes with the caller's)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = call()
    times.append(time.perf_counter() - start)
    jax.block_until_ready(out)
  return statistics.median(times), min(times)


def peer_records(cfg, batches, prompt_len: int, new_tokens: int, repeats: int, vocab: int) -> list[dict]:
  """HF generate vs genjax generate on one GPT-2 (see module docstring); a status row when HF is unavailable."""
  try:
    peer = HFPeer(cfg, vocab)
  except ImportError as e:  # not installed, or a release without Flax
    return [_row("transformers_flax", batches[0], prompt_len, new_tokens,
                 status=f"peer not installed (pip install 'genjax-zoo[peers]'): {e}"[:200])]
  from genjax.compiles import CompileCounter
  out = []
  for batch in batches:
    prompts = peer.prompts(batch, prompt_len)
    for suffix, top_p in (("", None), ("_top_p", 0.9)):
      ours = peer.genjax_fn(prompts, new_tokens, top_p)
      fns = {"hf": peer.hf_fn(prompts, new_tokens, top_p), "genjax": ours,
             "module": peer.genjax_fn(prompts, new_tokens, top_p, native=False), "program": _program_only(ours)}
      t = common.time_interleaved(fns, repeats)
      hf_row = _row("transformers_flax" + suffix, batch, prompt_len, new_tokens, t["hf"])
      ours_row = _row("genjax_gpt2" + suffix, batch, prompt_len, new_tokens, t["genjax"])
      module_row = _row("genjax_hf_module" + suffix, batch, prompt_len, new_tokens, t["module"])
      hf_row["vs_genjax"] = ours_row["vs_genjax"] = t["hf"].seconds / t["genjax"].seconds
      module_row["vs_genjax"] = t["hf"].seconds / t["module"].seconds
      ours_row["program_seconds"] = t["program"].seconds
      ours_row["host_seconds"], ours_row["host_seconds_best"] = _dispatch_seconds(ours, repeats)
      ours_row["host_fraction"] = ours_row["host_seconds"] / t["program"].seconds
      if top_p is None:      # greedy: the same weights must give HF's tokens
        theirs = np.asarray(fns["hf"]())[:, prompt_len:]
        ours_row["matches_hf"] = float(np.mean(np.asarray(ours()) == theirs))
        module_row["matches_hf"] = float(np.mean(np.asarray(fns["module"]()) == theirs))
      new_batch = peer.prompts(batch + 1, prompt_len)
      for row, fn in ((ours_row, peer.genjax_fn(new_batch, new_tokens, top_p)),
                      (hf_row, peer.hf_fn(new_batch, new_tokens, top_p))):
        with CompileCounter() as cc:
          jax.block_until_ready(fn())
        row["compiles_new_batch"] = cc.count
      out += [hf_row, ours_row, module_row]
  return out


# --------------------------------------------------------------------------------------------- the benchmark
def _row(mode, batch, prompt_len, new_tokens, timing: Optional[common.Timing] = None, **extra) -> dict:
  r = dict(mode=mode, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, seconds=None,
           tokens_per_second=None, decode_tokens_per_second=None, speedup_vs_recompute=None, vs_greedy=None,
           vs_genjax=None, matches_cached=None, host_fraction=None, compiles_new_batch=None, compiles=None,
           compile_seconds=None, status="ok")
  if timing is not None:
    produced = batch * (new_tokens if new_tokens else prompt_len)
    r.update(seconds=timing.seconds, tokens_per_second=produced / timing.seconds, compiles=timing.compiles,
             compile_seconds=timing.warmup_overhead_seconds)
  r.update(extra)
  return r


def run(config, modes, batches, prompt_lens, new_tokens_list, repeats: int = 5, peers: bool = True,
        hf_new_tokens: int = 128, hf_vocab: int = 50257) -> list[dict]:
  """Times every (batch, prompt_len, mode, new_tokens); returns the records (see module docstring)."""
  unknown = sorted(set(modes) - set(MODES))
  if unknown:
    raise ValueError(f"unknown decode modes {unknown}; valid: {list(MODES)}")
  bench = LMBench(config)
  longest = max(prompt_lens) + max(new_tokens_list) - 1
  if longest > bench.cfg.max_len:
    raise ValueError(f"prompt_len + new_tokens - 1 = {longest} exceeds the model's max_len={bench.cfg.max_len}")
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
  if peers:
    records.extend(peer_records(bench.cfg, batches, min(prompt_lens), hf_new_tokens, repeats, hf_vocab))
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
        lines.append(f"{r['mode']} / genjax on the same GPT-2 at batch {r['batch']}, {r['new_tokens']} new tokens: "
                     f"{r['vs_genjax']:.2f}x the time (goal >= 1.3)")
    if r["mode"].startswith("genjax_hf_module") and r["vs_genjax"] is not None:
      lines.append(f"{r['mode']}: HF generate / genjax generate, both on HF's Flax module, batch {r['batch']}: "
                   f"{r['vs_genjax']:.2f}x the time")
    if r["mode"].startswith("genjax_gpt2") and r.get("matches_hf") is not None:
      lines.append(f"{r['mode']} batch {r['batch']}: {100 * r['matches_hf']:.1f}% of greedy tokens equal HF's")
    if r["mode"].startswith("genjax_gpt2") and r.get("host_fraction") is not None:
      lines.append(f"{r['mode']} batch {r['batch']}: host work {1e3 * r['host_seconds']:.2f} ms (best "
                   f"{1e3 * r['host_seconds_best']:.2f}) = {100 * r['host_fraction']:.1f}% of the program "
                   f"(goal <= 10%); a new batch size compiled "
                   f"{r['compiles_new_batch']} program(s) (goal 1)")
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
                             common.repeats(), common.PEERS.value and _PEER.value == "hf", _HF_NEW_TOKENS.value,
                             _HF_VOCAB.value), "decoding", info)
  variant = _LM_CONFIG.value.get("variant", "?")
  common.print_table(records, COLUMNS, f"Decoding, LM of lm.py:{variant}, on {common.device_label(info)}; "
                     f"seconds = median of {common.repeats()} after warm-up")
  print("\n".join(summary(records)))
  common.write_json(records, common.JSON.value)


if __name__ == "__main__":
  app.run(main)
