"""genjax.interop.hf against the real thing: tiny random GPT-2 / Llama (GQA, untied head) / Qwen2 models built with
transformers' own classes on PyTorch (CPU), saved with `save_pretrained`, loaded by genjax, compared.

torch and transformers are test-only oracles (the `interop-test` extra); without them these tests skip.
"""
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from genjax.errors import UserError  # noqa: E402
from genjax.interop import hf  # noqa: E402
from genjax.models import transformer as T  # noqa: E402
from genjax.samplers import generate  # noqa: E402

VOCAB, EOS, PAD = 96, 3, 0
COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
ARCHS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=64, **COMMON)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        max_position_embeddings=64, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, **COMMON)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        max_position_embeddings=64, tie_word_embeddings=True, **COMMON)),
}
PROMPTS = [[1, 17, 45, 9, 60, 22, 5], [1, 80, 33], [1, 2, 71, 64, 12]]


def _hf_model(arch, seed=0, dtype=torch.float32):
  torch.manual_seed(seed)
  model = ARCHS[arch]().eval().to(dtype)
  with torch.no_grad():     # HF's init (std 0.02, biases 0, norms 1) hides most mistakes: use O(1) activations
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.3)
  return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """{arch: (hf model, directory)} saved once per module."""
  out = {}
  for arch in ARCHS:
    model = _hf_model(arch)
    path = str(tmp_path_factory.mktemp(arch))
    model.save_pretrained(path)
    out[arch] = (model, path)
  return out


def _padded(prompts, pad=PAD):
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.full((len(prompts), lengths.max()), pad, np.int32)
  for r, p in enumerate(prompts):
    tokens[r, :len(p)] = p
  return tokens, lengths


def _hf_logits(model, tokens, lengths):
  mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int64)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask))
  return out.logits.float().numpy()


def _genjax_logits(cfg, params, tokens):
  """Prefill through `DecodingModel.step_fn` (the path generate uses) into a cache of the prompt width."""
  model = T.decoding_model(cfg)
  cache = model.init_cache(tokens.shape[0], tokens.shape[1])
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  logits, _ = jax.jit(model.step_fn)(params, jnp.asarray(tokens), positions, cache)
  return np.asarray(logits)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_and_greedy_generate_match_transformers(saved, arch):
  model, path = saved[arch]
  cfg, params = hf.load_lm(path)
  assert cfg.token_vocab_size == VOCAB and cfg.param_dtype == "float32"
  tokens, lengths = _padded(PROMPTS)
  ours, theirs = _genjax_logits(cfg, params, tokens), _hf_logits(model, tokens, lengths)
  for r, n in enumerate(lengths):   # every real position of the ragged prompts
    np.testing.assert_allclose(ours[r, :n], theirs[r, :n, :VOCAB], atol=1e-4, rtol=0)
  out = generate(T.decoding_model(cfg), params, tokens, prompt_lengths=lengths, max_new_tokens=32, greedy=True,
                 eos_id=EOS, pad_id=PAD)
  for r, prompt in enumerate(PROMPTS):
    with torch.no_grad():
      ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           do_sample=False, max_new_tokens=32, eos_token_id=EOS, pad_token_id=PAD)[0, len(prompt):]
    ref = ref.numpy()
    n = int(out.lengths[r])
    np.testing.assert_array_equal(np.asarray(out.tokens[r, :n]), ref[:n])
    assert n == 32 or ref[n - 1] == EOS


def test_beam_search_matches_transformers_on_grouped_query_attention(saved):
  from genjax.samplers import beam_search
  model, path = saved["llama"]
  cfg, params = hf.load_lm(path)
  tokens, lengths = _padded(PROMPTS)
  out = beam_search(T.decoding_model(cfg), params, tokens, prompt_lengths=lengths, num_beams=3, max_new_tokens=10,
                    length_penalty=1.0, eos_id=EOS, pad_id=PAD)
  for r, prompt in enumerate(PROMPTS):
    with torch.no_grad():
      ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           do_sample=False, num_beams=3, max_new_tokens=10, length_penalty=1.0, early_stopping=False,
                           eos_token_id=EOS, pad_token_id=PAD)[0, len(prompt):].numpy()
    n = int(out.lengths[r, 0])
    np.testing.assert_array_equal(np.asarray(out.sequences[r, 0, :n]), ref[:n])
    assert n == len(ref)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_lm_round_trip_through_transformers(saved, arch, tmp_path):
  model, path = saved[arch]
  cfg, params = hf.load_lm(path, vocab_multiple=64)        # padded for sharding: 96 -> 128 rows
  assert cfg.vocab_size == 128 and params["embedding"].shape[0] == 128
  out = hf.save_lm(cfg, params, str(tmp_path / "export"))
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(back) is type(model) and back.config.vocab_size == VOCAB   # the exact vocabulary is written
  tokens, lengths = _padded(PROMPTS)
  np.testing.assert_allclose(_hf_logits(back, tokens, lengths), _hf_logits(model, tokens, lengths), atol=1e-5, rtol=0)
  cfg2, params2 = hf.load_lm(out, vocab_multiple=64)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_padded_vocabulary_logits_are_minus_inf(saved):
  cfg, params = hf.load_lm(saved["llama"][1], vocab_multiple=64)
  logits = _genjax_logits(cfg, params, _padded(PROMPTS)[0])
  assert np.all(np.isneginf(logits[..., VOCAB:])) and np.all(np.isfinite(logits[..., :VOCAB]))


def test_bfloat16_checkpoint_keeps_bfloat16_storage(tmp_path):
  model = _hf_model("qwen2", dtype=torch.bfloat16)
  model.save_pretrained(str(tmp_path / "bf16"))
  cfg, params = hf.load_lm(str(tmp_path / "bf16"))
  assert cfg.param_dtype == "bfloat16" and cfg.dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  emb = model.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(params["embedding"], np.float32), emb)   # bits kept, not re-rounded
  cfg32, params32 = hf.load_lm(str(tmp_path / "bf16"), dtype="float32")
  assert cfg32.param_dtype == "float32" and params32["embedding"].dtype == jnp.float32
  out = hf.save_lm(cfg, params, str(tmp_path / "export"))
  assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
  back = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert back.model.embed_tokens.weight.dtype == torch.bfloat16
  np.testing.assert_array_equal(back.model.embed_tokens.weight.float().detach().numpy(), emb)


def test_sharded_checkpoint_loads_onto_a_2x4_mesh_with_logical_axis_shardings(tmp_path):
  from genjax.train import parallel
  torch.manual_seed(1)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, intermediate_size=64,
      max_position_embeddings=64, tie_word_embeddings=False, **COMMON)).eval()
  model.save_pretrained(str(tmp_path), max_shard_size="20KB")
  index = json.load(open(tmp_path / "model.safetensors.index.json"))
  assert len(set(index["weight_map"].values())) > 2
  mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  cfg, params = hf.load_lm(str(tmp_path), shardings=functools.partial(parallel.param_shardings, mesh=mesh),
                           vocab_multiple=4)
  P = jax.sharding.PartitionSpec
  assert params["embedding"].sharding.spec == P("tensor", "fsdp")
  assert params["head"]["kernel"].sharding.spec == P("fsdp", "tensor")
  attn = params["block_1"]["attention"]
  assert attn["query"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
  assert attn["key"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
  assert attn["out"]["kernel"].sharding.spec == P("tensor", None, "fsdp")
  assert params["block_0"]["mlp_gate"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert params["final_norm"]["scale"].sharding.spec == P(None)
  assert len(params["embedding"].addressable_shards) == 8
  assert params["embedding"].addressable_shards[0].data.shape == (VOCAB // 4, 16)
  tokens, lengths = _padded(PROMPTS)
  ours, theirs = _genjax_logits(cfg, params, tokens), _hf_logits(model, tokens, lengths)
  for r, n in enumerate(lengths):
    np.testing.assert_allclose(ours[r, :n], theirs[r, :n], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------- tokenizer ---------
def test_load_tokenizer_matches_autotokenizer(tmp_path):
  from pydoc_data.topics import topics
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
  text = [topics[k] for k in sorted(topics)[:60]]
  bpe = Tokenizer(models.BPE(unk_token="<unk>"))
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                              pad_token="<pad>", unk_token="<unk>")
  fast.save_pretrained(str(tmp_path))
  ours, theirs = hf.load_tokenizer(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert (ours.eos_id, ours.pad_id, ours.bos_id) == (theirs.eos_token_id, theirs.pad_token_id, theirs.bos_token_id)
  assert (ours.eos_id, ours.pad_id) == (2, 0)
  samples = ["The return statement", "  def f(x):\n\treturn x ** 2  # ok", "héllo wörld 日本語 🦜", "",
             topics["return"][:400]]
  for s in samples:
    ids = ours.encode(s)
    assert ids == theirs.encode(s), s
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == s
  ids = ours.encode("a b c") + [ours.eos_id] + ours.encode("never")
  assert ours.decode(ids) == "a b c"                     # decoding stops at EOS


# -------------------------------------------------------------------------------------------------- errors ---------
def _one_line(excinfo, *needles):
  msg = str(excinfo.value)
  assert "\n" not in msg and all(n in msg for n in needles), msg


def _write_config(path, **fields):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(fields, f)
  return str(path)


def test_unsupported_checkpoints_are_one_line_errors(saved, tmp_path):
  with pytest.raises(UserError) as e:
    hf.load_lm(str(tmp_path))
  _one_line(e, "no config.json")
  with pytest.raises(UserError) as e:
    hf.load_lm(_write_config(tmp_path / "moe", model_type="mixtral"))
  _one_line(e, "model_type='mixtral'", "gpt2, llama, mistral, qwen2")
  qwen = json.load(open(os.path.join(saved["qwen2"][1], "config.json")))
  assert qwen["sliding_window"] is None and qwen["use_sliding_window"] is False
  hf.read_config(saved["qwen2"][1])                      # the fields' presence is fine: only their values count
  with pytest.raises(UserError) as e:
    hf.read_config(_write_config(tmp_path / "sw", **{**qwen, "use_sliding_window": True}))
  _one_line(e, "use_sliding_window=True", "sliding-window")
  with pytest.raises(UserError) as e:
    hf.read_config(_write_config(tmp_path / "mistral", **{**qwen, "model_type": "mistral", "sliding_window": 4096}))
  _one_line(e, "sliding_window=4096")
  assert hf.read_config(_write_config(tmp_path / "mistral_full",
                                      **{**qwen, "model_type": "mistral", "sliding_window": None})).num_kv_heads == 2
  with pytest.raises(UserError) as e:
    hf.read_config(_write_config(tmp_path / "moe2", **{**qwen, "num_experts": 8}))
  _one_line(e, "num_experts=8", "mixture-of-experts")
  with pytest.raises(UserError) as e:
    hf.read_config(_write_config(tmp_path / "yarn", **{**qwen, "rope_parameters": {"rope_type": "yarn",
                                                                                    "rope_theta": 1e4}}))
  _one_line(e, "rope_type='yarn'")
  with pytest.raises(UserError) as e:
    hf.load_lm(saved["gpt2"][1], dtype="float64")
  _one_line(e, "dtype='float64'", "bfloat16")


def test_missing_shard_is_a_one_line_error(saved, tmp_path):
  model, _ = saved["llama"]
  model.save_pretrained(str(tmp_path), max_shard_size="20KB")
  shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[1]
  os.remove(tmp_path / shard)
  with pytest.raises(UserError) as e:
    hf.load_lm(str(tmp_path))
  _one_line(e, f"shard {shard!r}", "missing")


def test_damaged_weights_and_incomplete_configs_are_one_line_checkpoint_errors(saved, tmp_path):
  """A truncated or garbage model.safetensors (it was a raw SafetensorError traceback) and a config.json without a
  field the architecture needs (it was `KeyError: 'n_embd'`): CheckpointErrors naming the file and what is wrong."""
  import shutil
  from genjax.errors import CheckpointError
  weights = os.path.join(saved["gpt2"][1], "model.safetensors")
  data = open(weights, "rb").read()
  for name, content in (("truncated", data[:len(data) // 2]), ("garbage", b"not safetensors at all " * 4)):
    path = tmp_path / name
    shutil.copytree(saved["gpt2"][1], path)
    (path / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError) as e:
      hf.load_lm(str(path))
    _one_line(e, str(path / "model.safetensors"), "is truncated or not a safetensors file")
  config = json.load(open(os.path.join(saved["gpt2"][1], "config.json")))
  del config["n_embd"], config["n_head"]
  with pytest.raises(CheckpointError) as e:
    hf.read_config(_write_config(tmp_path / "incomplete", **config))
  _one_line(e, str(tmp_path / "incomplete" / "config.json"), "missing the required field(s) n_embd, n_head")


def test_save_lm_refuses_before_writing_anything(saved, tmp_path):
  native = T.LMConfig(embed_dim=16, num_layers=1, num_heads=2, mlp_dim=32)
  params = nn.unbox(hf.abstract_params(native))
  with pytest.raises(UserError) as e:
    hf.save_lm(native, params, str(tmp_path / "native"))
  _one_line(e, "mlp='gelu'", "no Hugging Face equivalent")
  assert not os.path.exists(tmp_path / "native")
  cfg, params = hf.load_lm(saved["gpt2"][1])
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("x")
  with pytest.raises(UserError) as e:
    hf.save_lm(cfg, params, str(tmp_path / "full"))
  _one_line(e, "not an empty directory")
  assert os.listdir(tmp_path / "full") == ["keep.txt"] and not [p for p in os.listdir(tmp_path) if
                                                                p.startswith(".save_lm")]


# ------------------------------------------------------------------------------- fine-tune, export, decode ---------
def test_hf_finetune_starts_from_the_checkpoint_and_exports_back(tmp_path):
  from experiments import export, sample
  from experiments.configs import lm as lm_configs
  from experiments.train import run
  from genjax.models import get_task
  from genjax.core.checkpoint import load_run
  from genjax.train.trainer import start_message
  from tests.hf_fixtures import tiny_checkpoint
  model_dir = tiny_checkpoint(str(tmp_path / "model"))
  c = lm_configs.get_config("hf_finetune")
  c.model.init_from = model_dir
  assert c.dataset.tokenizer == model_dir                    # the data are tokenized with the checkpoint's tokenizer
  c.dataset.seq_len, c.batch_size, c.num_train_steps = 16, 8, 1
  c.eval_every_steps = c.sample_every_steps = -1
  c.optimizer.learning_rate, c.optimizer.warmup_steps, c.async_checkpointing = 1e-2, 0, False
  task = get_task(c, pretrained=hf.pretrained_for(c))
  _, loaded = hf.load_lm(model_dir)
  init = nn.unbox(jax.jit(task.init)(jax.random.key(0), {"tokens": np.zeros((1, 17), np.int32)}))
  jax.tree.map(np.testing.assert_array_equal, init, loaded)  # step 0 is the checkpoint, not a random init
  assert start_message(task) == f"starting from the weights in {model_dir}"   # what the log says at step 0
  run(c, str(tmp_path / "run"))
  out = export.export_run(str(tmp_path / "run"), str(tmp_path / "export"))
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
  config, params = load_run(str(tmp_path / "run"))
  tok = transformers.AutoTokenizer.from_pretrained(out)
  ids = hf.load_tokenizer(out).encode("The return statement")
  assert ids == tok.encode("The return statement")
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens = np.asarray([ids], np.int32)
  theirs = _hf_logits(back, tokens, np.array([len(ids)]))
  ours, _ = T.TransformerLM(T.lm_config(config, hf.pretrained_for(config))).apply({"params": params},
                                                                                 jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5, rtol=0)
  before = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval(), tokens, np.array([3]))
  assert np.abs(before - theirs).max() > 1e-3                # training moved the weights that were exported
  texts = sample.sample_hf(out, options=dict(max_new_tokens=5, temperature=0.0), prompts=["The", "x"])["texts"]
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
  with pytest.raises(UserError) as e:
    export.export_run(str(tmp_path / "run"), out)
  _one_line(e, "not an empty directory")


def test_command_lines_report_bad_directories_in_one_line(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for args, needle in ((["experiments.sample", f"--hf_model={tmp_path}", "--prompt=x"], "has no config.json"),
                       (["experiments.export", f"--workdir={tmp_path}"], "give both --workdir=RUN and --out=DIR")):
    done = subprocess.run([sys.executable, "-m", *args], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().startswith("error:") and needle in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
