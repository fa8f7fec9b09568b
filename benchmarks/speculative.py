r"""Speculative decoding benchmark: tokens/s of `speculative_generate` (a trained 1-layer draft proposing for the
trained `lm.py:pydoc` LM) against plain `generate` on the same target, greedy and sampling, with the acceptance rate.

  python -m experiments.train --config=experiments/configs/lm.py:pydoc --workdir=runs/lm_pydoc
  python -m experiments.train --config=experiments/configs/lm.py:pydoc_draft --workdir=runs/lm_pydoc_draft
  python -m benchmarks.speculative --target_workdir=runs/lm_pydoc --draft_workdir=runs/lm_pydoc_draft \
      --batch_sizes=1,8 --json=docs/results/speculative_cpu.json

Prompts are `--prompt_len`-byte windows of pydoc's held-out 10% (the test split); every row decodes `--new_tokens`
bytes (no EOS), within the target's trained context. Modes, timed round-robin per batch size (median of >= 5 calls
after a warm-up):

  generate[_sample]            plain `generate`, greedy / temperature 0.8 + top_p 0.95
  speculative_k<K>[_sample]    `speculative_generate` with K draft tokens per target call, same settings

tokens_per_second = batch * new_tokens / seconds; speedup = generate seconds / speculative seconds (same settings);
acceptance_rate from the output; matches_greedy (greedy rows): the fraction of tokens equal to plain greedy's (1.0
up to float rounding of scoring K + 1 tokens in one call).
"""
from __future__ import annotations

import jax
import numpy as np
from absl import app, flags

from benchmarks import common

_TARGET = flags.DEFINE_string("target_workdir", None, "Trained target LM run (lm.py:pydoc).")
_DRAFT = flags.DEFINE_string("draft_workdir", None, "Trained draft LM run (lm.py:pydoc_draft).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt bytes.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 96, "New tokens per row (prompt + new must fit the context).")
_DRAFT_TOKENS = flags.DEFINE_list("num_draft_tokens", ["2", "4"], "Draft tokens per target call to time.")

COLUMNS = ("mode", "batch", "num_draft_tokens", "seconds", "tokens_per_second", "speedup", "acceptance_rate",
           "matches_greedy")
SAMPLE = dict(temperature=0.8, top_p=0.95)


def _load(workdir: str):
  import flax.linen as nn
  from genjax.models import transformer as tr
  from genjax.core.checkpoint import load_run
  config, params = load_run(workdir)
  cfg = tr.lm_config(config)
  return tr.decoding_model(cfg), nn.unbox(params)


def held_out_prompts(batch: int, length: int) -> np.ndarray:
  from genjax.data.registry import PYDOC_TRAIN_FRACTION, pydoc_bytes
  data = pydoc_bytes()
  test = np.frombuffer(data[int(len(data) * PYDOC_TRAIN_FRACTION):], np.uint8).astype(np.int32)
  starts = np.linspace(0, len(test) - length - 1, batch).astype(int)
  return np.stack([test[s:s + length] for s in starts])


def run(target_dir: str, draft_dir: str, batches, prompt_len: int, new_tokens: int, ks, repeats: int) -> list[dict]:
  from genjax.samplers import generate, speculative_generate
  target, target_params = _load(target_dir)
  draft, draft_params = _load(draft_dir)
  rng = jax.random.key(0)
  records = []
  for batch in batches:
    prompts = held_out_prompts(batch, prompt_len)
    fns, outputs = {}, {}
    for suffix, kw in (("", dict(greedy=True)), ("_sample", SAMPLE)):
      fns["generate" + suffix] = (lambda kw=kw: generate(target, target_params, prompts, rng=rng,
                                                         max_new_tokens=new_tokens, **kw))
      for k in ks:
        fns[f"speculative_k{k}{suffix}"] = (lambda kw=kw, k=k: speculative_generate(
            target, target_params, draft, draft_params, prompts, rng=rng, max_new_tokens=new_tokens,
            num_draft_tokens=k, **kw))
    for name, fn in fns.items():
      outputs[name] = jax.block_until_ready(fn())
    timings = common.time_interleaved({n: (lambda f=f: f().tokens) for n, f in fns.items()}, repeats)
    for name, t in timings.items():
      sample = name.endswith("_sample")
      base = "generate_sample" if sample else "generate"
      k = None if name.startswith("generate") else int(name.split("_k")[1].split("_")[0])
      r = dict(mode=name, batch=batch, num_draft_tokens=k, prompt_len=prompt_len, new_tokens=new_tokens,
               seconds=t.seconds, tokens_per_second=batch * new_tokens / t.seconds,
               speedup=timings[base].seconds / t.seconds, acceptance_rate=None, matches_greedy=None,
               compiles=t.compiles, status="ok")
      if k is not None:
        r["acceptance_rate"] = float(outputs[name].acceptance_rate)
        if not sample:
          r["matches_greedy"] = float(np.mean(np.asarray(outputs[name].tokens) == np.asarray(outputs[base].tokens)))
      records.append(r)
  return records


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _TARGET.value or not _DRAFT.value:
    raise app.UsageError("give --target_workdir and --draft_workdir (trained lm.py:pydoc and lm.py:pydoc_draft runs)")
  batches = common.batch_sizes(quick_default=(1,), full_default=(1, 8))
  ks = common.parse_ints(_DRAFT_TOKENS.value, "num_draft_tokens")
  info = common.device_info()
  records = common.stamp(run(_TARGET.value, _DRAFT.value, batches, _PROMPT_LEN.value, _NEW_TOKENS.value, ks,
                             common.repeats()), "speculative", info)
  common.print_table(records, COLUMNS, f"Speculative decoding on {common.device_label(info)}; seconds = median of "
                     f"{common.repeats()} after warm-up; {_PROMPT_LEN.value}-byte prompts, {_NEW_TOKENS.value} new")
  common.write_json(records, common.JSON.value)


if __name__ == "__main__":
  app.run(main)
