"""Smoke tests of the benchmarks: each one's `--quick` path, in-process, at the tiniest model sizes.

Benchmarks measure; tests don't time. These check that every benchmark runs end to end through its absl flags,
writes the JSON keys the issue promises, and that the invariants the figures rest on hold: no recompilation when
only num_steps / eta change, overhead_ratio and tokens/s computed from the reported times, greedy decoding without a
cache equal to the KV-cached path, the scaling worker really seeing the simulated device count, and "peer not
installed" rows when diffusers / transformers are absent. No timing assertions.
"""
from __future__ import annotations

import importlib.util
import json

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

# Libraries that register absl flags when first imported (orbax, tensorflow_datasets) are imported here, before any flagsaver
# snapshot: flagsaver restores the flag registry it saw, which would drop flags registered inside its context.
import genjax.data  # noqa: F401,E402
import genjax.models.diffusion  # noqa: F401,E402
import genjax.models.transformer  # noqa: F401,E402
import genjax.models.vae  # noqa: F401,E402
import genjax.train.trainer  # noqa: F401,E402
from benchmarks import common, decoding, samplers, train_step  # noqa: E402
from genjax.train.throughput import peak_flops  # noqa: E402

FLAGS = flags.FLAGS


def _run(module, tmp_path, *args, config_flag=None, model=None) -> list[dict]:
  """Parses `args` (with --quick and --json) and runs the module's main; `model` updates `config_flag`'s
  config.model (config_flags reads command-line overrides from sys.argv at import time, so set them here)."""
  path = tmp_path / f"{module.__name__.split('.')[-1]}.json"
  with flagsaver.flagsaver():
    FLAGS(["bench", "--quick", f"--json={path}", *args])
    if model:
      getattr(FLAGS, config_flag).model.update(model)
    module.main(["bench"])
  records = json.loads(path.read_text())
  assert isinstance(records, list) and records
  return records


def _has_keys(records, keys):
  for r in records:
    missing = set(keys) - set(r)
    assert not missing, f"record {r} misses {missing}"


def test_compile_counter_counts_backend_compiles():
  f = jax.jit(lambda x: x * 3 + 1)
  x = np.arange(4, dtype=np.float32)
  with common.CompileCounter() as first:
    jax.block_until_ready(f(x))
  with common.CompileCounter() as second:
    jax.block_until_ready(f(x))          # cached: no compilation
  with common.CompileCounter() as third:
    jax.block_until_ready(f(x[:3]))      # a new shape: one compilation
  assert (first.count, second.count, third.count) == (1, 0, 1)
  assert first.seconds > 0


def test_time_call_needs_five_repeats_and_reports_the_median():
  with pytest.raises(ValueError, match="at least 5"):
    common.time_call(lambda: 1, repeats=4)
  t = common.time_call(lambda: jax.numpy.ones(3), repeats=5)
  assert len(t.samples) == 5 and t.seconds == sorted(t.samples)[2]


def test_peak_flops_table_and_json_nan():
  assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert peak_flops("cpu") is None
  assert common._jsonable(float("nan")) is None


QUICK_SAMPLERS = ("ddpm", "ddim", "heun", "flow_euler")   # one of each family (DDPM/DDIM share a program)


def test_samplers_quick(tmp_path):
  records = _run(samplers, tmp_path, "--batch_sizes=2", "--num_steps=2,3", f"--samplers={','.join(QUICK_SAMPLERS)}",
                 config_flag="ddpm_config", model=dict(ch=8, ch_mult=(1,), attn_resolutions=(), num_res_blocks=1))
  _has_keys(records, ["sampler", "num_steps", "batch", "seconds", "forward_seconds", "overhead_ratio", "compiles",
                      "samples_per_second", "compile_seconds", "device", "model_calls"])
  ours = [r for r in records if r["sampler"] in samplers.SAMPLERS]
  assert {(r["sampler"], r["num_steps"]) for r in ours} == {(s, n) for s in QUICK_SAMPLERS for n in (2, 3)}
  assert sum(r["first_call_compiles"] for r in ours) >= 3   # the first calls did compile (DDPM/DDIM share one)
  for r in ours:
    assert r["compiles"] == 0, r                    # num_steps / eta changes compile nothing new
    # Heun's last step is Euler: 2 n - 1 model calls; the overhead ratio divides by the calls.
    assert r["model_calls"] == (2 * r["num_steps"] - 1 if r["sampler"] == "heun" else r["num_steps"])
    assert r["overhead_ratio"] == pytest.approx(r["seconds"] / (r["model_calls"] * r["forward_seconds"]))
    assert r["samples_per_second"] == pytest.approx(2 / r["seconds"])
  peer = [r for r in records if r["sampler"] == "diffusers_ddim"]
  assert peer
  if importlib.util.find_spec("diffusers") is None:
    assert peer[0]["status"].startswith("peer not installed") and peer[0]["seconds"] is None


def test_every_sampler_is_benchmarked():
  from genjax.models.diffusion import SAMPLERS
  from genjax.samplers.flow import FLOW_METHODS
  assert set(SAMPLERS) | {f"flow_{m}" for m in FLOW_METHODS} == set(samplers.SAMPLERS)
  with pytest.raises(ValueError, match="unknown sampler 'ddmi'"):
    samplers.sampler_call(None, "ddmi", None, None, 2)


def test_decoding_quick(tmp_path):
  records = _run(decoding, tmp_path, "--batch_sizes=2", "--prompt_lens=4", "--new_tokens=6", "--hf_new_tokens=6",
                 "--hf_vocab=64", config_flag="lm_config",
                 model=dict(num_layers=1, embed_dim=16, num_heads=2, mlp_dim=32, max_len=32))
  _has_keys(records, ["mode", "batch", "prompt_len", "new_tokens", "tokens_per_second", "seconds"])
  by_mode = {r["mode"]: r for r in records}
  assert set(decoding.MODES) <= set(by_mode)
  assert by_mode["prefill"]["tokens_per_second"] == pytest.approx(2 * 4 / by_mode["prefill"]["seconds"])
  cached, recompute = by_mode["cached"], by_mode["recompute"]
  assert cached["tokens_per_second"] == pytest.approx(2 * 6 / cached["seconds"])
  assert cached["speedup_vs_recompute"] == pytest.approx(recompute["seconds"] / cached["seconds"])
  assert recompute["matches_cached"] == 1.0        # greedy without a cache == greedy with the KV cache
  # Greedy ("cached") has its own argmax-only program; top-k and top-p are runtime values of one sampling program,
  # compiled by whichever of them runs first.
  assert sorted(by_mode[mode]["compiles"] for mode in decoding.SAMPLING) == [0, 1]
  peer = by_mode["transformers_flax"]          # HF generate vs genjax on one GPT-2, or why it could not run
  if peer["status"] == "ok":
    ours = by_mode["genjax_gpt2"]
    assert peer["vs_genjax"] == pytest.approx(peer["seconds"] / ours["seconds"])
    assert ours["host_fraction"] == pytest.approx(ours["host_seconds"] / ours["program_seconds"])
    assert ours["compiles_new_batch"] == 1         # one program per new batch size, nothing else
    assert ours["matches_hf"] == 1.0               # genjax's own LM with HF's weights: HF's greedy tokens
    assert by_mode["genjax_hf_module"]["matches_hf"] == 1.0
  else:
    assert peer["status"].startswith("peer not installed")


def test_hf_gpt2_wrapper_decodes_like_a_full_forward():
  """benchmarks/hf_gpt2.py (a cache with a shared write index, wrapped): greedy generate on mixed-length prompts and
  its log-probs equal HF's own full forward without a cache; beam search with one beam agrees. Runs where
  transformers still has Flax models (<= 4.57, the `peers` extra), else skips."""
  transformers = pytest.importorskip("transformers")
  if not hasattr(transformers, "FlaxGPT2LMHeadModel"):
    pytest.skip(f"transformers {transformers.__version__} has no Flax models")
  from benchmarks.hf_gpt2 import gpt2_decoding_model
  from genjax.samplers import beam_search, generate
  hf = transformers.FlaxGPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50,
                                                                n_positions=24), seed=0)
  model, prompts, n = gpt2_decoding_model(hf), [[5, 6, 7, 8, 9], [11, 12], [40, 41, 42]], 6
  out = generate(model, hf.params, prompts, greedy=True, max_new_tokens=n)
  for r, p in enumerate(prompts):
    seq = list(p)
    for _ in range(n):
      seq.append(int(np.argmax(hf(np.array([seq]), params=hf.params).logits[0, -1])))
    assert seq[len(p):] == list(np.asarray(out.tokens[r]))
    logp = jax.nn.log_softmax(hf(np.array([seq[:-1]]), params=hf.params).logits[0])
    np.testing.assert_allclose(out.logprobs[r], [logp[len(p) - 1 + t, seq[len(p) + t]] for t in range(n)],
                               rtol=1e-4, atol=1e-5)
  beams = beam_search(model, hf.params, prompts, num_beams=1, max_new_tokens=n, length_penalty=0.0)
  np.testing.assert_array_equal(beams.sequences[:, 0], out.tokens)


TINY_VAE = ("model.channels=(4,8)", "model.hidden=8", "model.latent_dim=2", "batch_size=8", "model.iw_samples=2")


def test_train_step_quick(tmp_path):
  records = _run(train_step, tmp_path, "--train_sections=throughput", "--train_configs=vae.py:digits", "--log_every=2",
                 "--scaling_devices=",
                 *[f"--train_override={o}" for o in TINY_VAE])
  _has_keys(records, ["family", "mode", "batch", "devices", "steps_per_second", "examples_per_second",
                      "flops_per_step", "mfu", "vs_bare", "device"])
  by_mode = {r["mode"]: r for r in records}
  assert set(by_mode) == {"bare_step", "full_loop"}
  bare, loop = by_mode["bare_step"], by_mode["full_loop"]
  assert bare["family"] == "vae" and bare["batch"] == 8 and bare["flops_per_step"] > 0
  assert bare["devices"] == jax.device_count()
  assert bare["mfu"] is None                         # CPU: no peak to compare against
  assert loop["vs_bare"] == pytest.approx(loop["steps_per_second"] / bare["steps_per_second"])
  assert loop["examples_per_second"] == pytest.approx(8 * loop["steps_per_second"])
  # The loop saved once inside the measured window; amortised over the config's cadence (vae.py:digits: 500).
  assert loop["checkpoint_every_steps"] == 500 and loop["checkpoint_seconds"] is not None
  expected = 1 / (1 / loop["steady_steps_per_second"] + loop["checkpoint_seconds"] / 500)
  assert loop["steps_per_second"] == pytest.approx(expected)


TINY_LM = ("model.embed_dim=16", "model.num_heads=2", "model.mlp_dim=32", "dataset.seq_len=8", "batch_size=8")


def test_train_step_lm_compile_depth_and_remat_memory(tmp_path):
  # One depth and one policy: each compile of the whole train step costs seconds even for this tiny LM.
  records = _run(train_step, tmp_path, "--train_sections=compile_depth,remat_memory", "--lm_depths=1",
                 "--remat_layers=1", "--remat_policies=full", *[f"--lm_override={o}" for o in TINY_LM])
  _has_keys(records, ["layers", "scan_layers", "remat", "compile_seconds", "compiles", "temp_size_in_bytes",
                      "argument_size_in_bytes", "output_size_in_bytes", "footprint_bytes", "flops_per_step"])
  depth = {(r["layers"], r["scan_layers"]): r for r in records if r["mode"] == "compile_depth"}
  memory = {r["scan_layers"]: r for r in records if r["mode"] == "remat_memory"}
  assert set(depth) == {(1, False), (1, True)} and set(memory) == {False, True}
  assert all(r["compiles"] == 1 and r["compile_seconds"] > 0 and r["embed_dim"] == 16 for r in records)
  assert all(r["remat"] == "none" for r in depth.values()) and all(r["remat"] == "full" for r in memory.values())
  for r in records:
    assert r["footprint_bytes"] == (r["argument_size_in_bytes"] + r["output_size_in_bytes"]
                                    - r["alias_size_in_bytes"] + r["temp_size_in_bytes"])
  # remat reached the model: the step recomputes the block's forward pass, more FLOPs than with remat="none".
  assert memory[False]["flops_per_step"] > depth[(1, False)]["flops_per_step"]


@pytest.mark.slow
def test_train_step_scaling_worker_sees_simulated_devices():
  rows = train_step.scaling_rows("vae.py:digits", list(TINY_VAE), [2], log_every=2, repeats=5)
  assert len(rows) == 1 and rows[0]["status"] == "ok", rows
  r = rows[0]
  assert r["mode"] == "scaling" and r["devices"] == 2 and r["simulated"] and "x2" in r["device"]
  assert r["steps_per_second"] > 0 and r["flops_per_step"] > 0
