"""Hugging Face causal LMs in and out of genjax: GPT-2 and the Llama family (Llama, Mistral without sliding window,
Qwen2), from a local directory as `save_pretrained` writes it. No network, no torch.

    from genjax.interop import hf
    cfg, params = hf.load_lm("path/to/model")                     # bf16 checkpoints stay bf16 unless dtype= asks
    tok = hf.load_tokenizer("path/to/model")                      # tokenizer.json; eos/pad ids from the config files
    out = genjax.samplers.generate(transformer.decoding_model(cfg), params, [tok.encode("Hello")], rng=rng,
                                   max_new_tokens=32, eos_id=tok.eos_id, pad_id=tok.pad_id or 0)
    hf.save_lm(cfg, params, "out/dir", tokenizer=tok)             # transformers.AutoModelForCausalLM loads it

`load_lm(path, dtype=None, shardings=None, vocab_multiple=1)`: weights are read tensor by tensor with `safetensors`
straight to numpy (`model.safetensors`, or the shards a `model.safetensors.index.json` names). With `shardings`
(boxed abstract params -> their shardings, e.g. `functools.partial(genjax.train.parallel.param_shardings,
mesh=mesh)` for the LM's logical-axis sharding) each param is placed as soon as it is read, so the host holds one
tensor at a time and a model larger than one device loads. `vocab_multiple` pads the embedding
table (and head) to a multiple (for an even "tensor" split); the padding ids get -inf logits and `save_lm` writes
the exact original vocabulary. Anything the converter does not understand (a `model_type`, sliding-window
attention, rope scaling, MoE, extra tensors) is a one-line `UserError` naming the field; `save_lm` checks
everything before it writes, and writes through a temporary directory, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from genjax.core.task import Pretrained
from genjax.data.hf_tokenizer import HFTokenizer, load_tokenizer  # noqa: F401  (users: hf.load_tokenizer)
from genjax.errors import CheckpointError, UserError
from genjax.interop import open_safetensors
from genjax.models.lm_layers import PARAM_DTYPES, LMConfig, TransformerLM, unstack_layers

MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")
_LLAMA_FIELDS = ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                 "max_position_embeddings")
# model_type -> the config.json fields its architecture cannot be read without
REQUIRED_FIELDS = {"gpt2": ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"), "llama": _LLAMA_FIELDS,
                   "mistral": _LLAMA_FIELDS, "qwen2": _LLAMA_FIELDS}
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")   # buffers, not weights


def _read_json(path: str, name: str) -> dict:
  try:
    with open(os.path.join(path, name)) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{os.path.join(path, name)} is not valid JSON ({e})") from None


def read_config(path: str, vocab_multiple: int = 1) -> LMConfig:
  """The LMConfig of the checkpoint in `path` (its config.json); float32 params and compute."""
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise CheckpointError(f"{path!r} has no config.json: not a Hugging Face model directory (save_pretrained "
                          f"writes one)")
  c = _read_json(path, "config.json")
  model_type = c.get("model_type")
  if model_type not in MODEL_TYPES:
    raise UserError(f"model_type={model_type!r} in {path}/config.json is not supported; supported: "
                    f"{', '.join(MODEL_TYPES)}")
  for key in ("num_local_experts", "num_experts", "n_routed_experts"):
    if c.get(key):
      raise UserError(f"{key}={c[key]} in {path}/config.json: mixture-of-experts models are not supported")
  missing = [key for key in REQUIRED_FIELDS[model_type] if c.get(key) is None]
  if missing:
    raise CheckpointError(f"{os.path.join(path, 'config.json')} (model_type={model_type!r}) is missing the required "
                          f"field(s) {', '.join(missing)}; a {model_type} config needs "
                          f"{', '.join(REQUIRED_FIELDS[model_type])}")
  if int(vocab_multiple) < 1:
    raise UserError(f"vocab_multiple={vocab_multiple} must be >= 1")
  cfg = _gpt2_config(c) if model_type == "gpt2" else _llama_config(c, model_type)
  vocab = -(-cfg.token_vocab_size // int(vocab_multiple)) * int(vocab_multiple)
  return dataclasses.replace(cfg, vocab_size=vocab, context_len=cfg.max_len).check()


def _refuse(c: dict, key: str, ok: Callable[[Any], bool], what: str) -> None:
  if key in c and not ok(c[key]):
    raise UserError(f"{key}={c[key]!r} in config.json: {what} is not supported")


def _gpt2_config(c: dict) -> LMConfig:
  _refuse(c, "activation_function", lambda v: v in GELU_TANH, "an MLP activation other than GELU-tanh")
  _refuse(c, "scale_attn_weights", lambda v: v, "unscaled attention")
  _refuse(c, "scale_attn_by_inverse_layer_idx", lambda v: not v, "attention scaled by the layer index")
  _refuse(c, "add_cross_attention", lambda v: not v, "cross-attention")
  d = int(c["n_embd"])
  return LMConfig(vocab_size=int(c["vocab_size"]), embed_dim=d, num_layers=int(c["n_layer"]),
                  num_heads=int(c["n_head"]), mlp_dim=int(c.get("n_inner") or 4 * d), max_len=int(c["n_positions"]),
                  norm="layer", norm_eps=float(c.get("layer_norm_epsilon", 1e-5)), mlp="gelu", positions="learned",
                  use_bias=True, tie_embeddings=bool(c.get("tie_word_embeddings", True)),
                  token_vocab_size=int(c["vocab_size"]))


def _rope_theta(c: dict) -> float:
  rope = c.get("rope_parameters") or {}          # transformers 5; transformers 4 wrote rope_theta / rope_scaling
  if c.get("rope_scaling"):
    rope = {**c["rope_scaling"], **rope}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise UserError(f"rope_parameters.rope_type={kind!r} in config.json: only 'default' RoPE is supported "
                    f"(no rope scaling)")
  return float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))


def _llama_config(c: dict, model_type: str) -> LMConfig:
  _refuse(c, "hidden_act", lambda v: v == "silu", "an MLP activation other than silu (SwiGLU)")
  _refuse(c, "attention_bias", lambda v: not v, "a bias on the attention output (attention_bias)")
  _refuse(c, "mlp_bias", lambda v: not v, "MLP biases (mlp_bias)")
  _refuse(c, "sliding_window", lambda v: v is None or model_type == "qwen2", "sliding-window attention")
  _refuse(c, "use_sliding_window", lambda v: not v, "sliding-window attention")
  _refuse(c, "layer_types", lambda v: all(t == "full_attention" for t in v), "sliding-window attention")
  d, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
  _refuse(c, "head_dim", lambda v: v is None or int(v) == d // heads, "head_dim != hidden_size / heads")
  return LMConfig(vocab_size=int(c["vocab_size"]), embed_dim=d, num_layers=int(c["num_hidden_layers"]),
                  num_heads=heads, mlp_dim=int(c["intermediate_size"]), max_len=int(c["max_position_embeddings"]),
                  rope_base=_rope_theta(c), norm="rms", norm_eps=float(c.get("rms_norm_eps", 1e-6)), mlp="swiglu",
                  num_kv_heads=int(c.get("num_key_value_heads") or heads), qkv_bias=model_type == "qwen2",
                  tie_embeddings=bool(c.get("tie_word_embeddings", False)), token_vocab_size=int(c["vocab_size"]))


# ------------------------------------------------------------------------------------------ the layout maps --------
# One entry per genjax param: its path and (hf names it reads, a function of those arrays -> the genjax array).
# GPT-2's Conv1D stores weights [in, out]; torch.nn.Linear (Llama family) stores [out, in].

def _gpt2_plan(cfg: LMConfig, pre: str) -> dict:
  d, h, k = cfg.embed_dim, cfg.num_heads, cfg.head_dim
  plan = {("embedding",): ([f"{pre}wte.weight"], lambda w: w), ("position_embedding",): ([f"{pre}wpe.weight"], None)}
  for i in range(cfg.num_layers):
    b, g = f"{pre}h.{i}.", f"block_{i}"
    for ours, theirs in (("attention_norm", "ln_1"), ("mlp_norm", "ln_2")):
      plan[(g, ours, "scale")] = ([b + theirs + ".weight"], None)
      plan[(g, ours, "bias")] = ([b + theirs + ".bias"], None)
    for j, name in enumerate(("query", "key", "value")):
      plan[(g, "attention", name, "kernel")] = ([b + "attn.c_attn.weight"],
                                                lambda w, j=j: w[:, j * d:(j + 1) * d].reshape(d, h, k))
      plan[(g, "attention", name, "bias")] = ([b + "attn.c_attn.bias"],
                                              lambda w, j=j: w[j * d:(j + 1) * d].reshape(h, k))
    plan[(g, "attention", "out", "kernel")] = ([b + "attn.c_proj.weight"], lambda w: w.reshape(h, k, d))
    plan[(g, "attention", "out", "bias")] = ([b + "attn.c_proj.bias"], None)
    for ours, theirs in (("mlp_in", "mlp.c_fc"), ("mlp_out", "mlp.c_proj")):
      plan[(g, ours, "kernel")] = ([b + theirs + ".weight"], None)
      plan[(g, ours, "bias")] = ([b + theirs + ".bias"], None)
  plan[("final_norm", "scale")] = ([f"{pre}ln_f.weight"], None)
  plan[("final_norm", "bias")] = ([f"{pre}ln_f.bias"], None)
  return plan


def _llama_plan(cfg: LMConfig, pre: str) -> dict:
  d, h, kv, k = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.head_dim
  plan = {("embedding",): ([f"{pre}embed_tokens.weight"], lambda w: w)}
  for i in range(cfg.num_layers):
    b, g = f"{pre}layers.{i}.", f"block_{i}"
    plan[(g, "attention_norm", "scale")] = ([b + "input_layernorm.weight"], None)
    plan[(g, "mlp_norm", "scale")] = ([b + "post_attention_layernorm.weight"], None)
    for name, proj, heads in (("query", "q_proj", h), ("key", "k_proj", kv), ("value", "v_proj", kv)):
      plan[(g, "attention", name, "kernel")] = ([f"{b}self_attn.{proj}.weight"],
                                                lambda w, n=heads: w.T.reshape(d, n, k))
      if cfg.qkv_bias:
        plan[(g, "attention", name, "bias")] = ([f"{b}self_attn.{proj}.bias"], lambda w, n=heads: w.reshape(n, k))
    plan[(g, "attention", "out", "kernel")] = ([b + "self_attn.o_proj.weight"], lambda w: w.T.reshape(h, k, d))
    for ours, theirs in (("mlp_gate", "gate_proj"), ("mlp_in", "up_proj"), ("mlp_out", "down_proj")):
      plan[(g, ours, "kernel")] = ([f"{b}mlp.{theirs}.weight"], lambda w: w.T)
  plan[("final_norm", "scale")] = ([f"{pre}norm.weight"], None)
  return plan


def _plan(cfg: LMConfig, names: set[str]) -> dict:
  if cfg.positions == "learned":
    pre = "transformer." if "transformer.wte.weight" in names or not names else ""
    plan = _gpt2_plan(cfg, pre)
  else:
    pre = "model." if "model.embed_tokens.weight" in names or not names else ""
    plan = _llama_plan(cfg, pre)
  if not cfg.tie_embeddings:
    plan[("head", "kernel")] = (["lm_head.weight"], lambda w: w.T)
  return plan


def _pad_vocab(cfg: LMConfig, path: tuple, w: np.ndarray) -> np.ndarray:
  extra = cfg.vocab_size - cfg.token_vocab_size
  if extra and path in (("embedding",), ("head", "kernel")):
    axis = 0 if path == ("embedding",) else 1
    w = np.concatenate([w, np.zeros(w.shape[:axis] + (extra,) + w.shape[axis + 1:], w.dtype)], axis=axis)
  return w


# ------------------------------------------------------------------------------------------------ loading --------
class _Tensors:
  """name -> numpy array, read lazily from model.safetensors or the shards of model.safetensors.index.json."""

  def __init__(self, path: str):
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
      weight_map = _read_json(path, "model.safetensors.index.json").get("weight_map", {})
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
      files = ["model.safetensors"]
    else:
      raise CheckpointError(f"{path!r} has neither model.safetensors nor model.safetensors.index.json")
    for f in files:
      if not os.path.isfile(os.path.join(path, f)):
        raise CheckpointError(f"shard {f!r} named by {path}/model.safetensors.index.json is missing")
    self._handles = {f: open_safetensors(os.path.join(path, f), "np") for f in files}
    self.where = {name: f for f, h in self._handles.items() for name in h.keys()}

  def dtype(self, name: str) -> str:
    return self._handles[self.where[name]].get_slice(name).get_dtype()

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self.where:
      raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
    return self._handles[self.where[name]].get_tensor(name)


def _storage_dtype(tensors: _Tensors, dtype: Optional[str]) -> str:
  kinds = {tensors.dtype(n) for n in tensors.where if not n.endswith(_IGNORED_SUFFIXES)}
  bad = sorted(k for k in kinds if k not in SAFETENSORS_DTYPES)
  if bad:
    raise UserError(f"checkpoint tensors of dtype {bad[0]} cannot be held (supported: "
                    f"{', '.join(SAFETENSORS_DTYPES)}); convert the checkpoint or pass dtype=")
  if dtype is not None:
    if dtype not in PARAM_DTYPES:
      raise UserError(f"dtype={dtype!r} is not one of {sorted(PARAM_DTYPES)}")
    return dtype
  return "bfloat16" if "BF16" in kinds else "float16" if "F16" in kinds else "float32"


def abstract_params(cfg: LMConfig):
  """The boxed (logical-axis) abstract params of TransformerLM(cfg): shapes, dtypes, axis names."""
  return jax.eval_shape(lambda: TransformerLM(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def load_lm(path: str, dtype: Optional[str] = None, *, shardings: Optional[Callable[[Any], Any]] = None,
            vocab_multiple: int = 1):
  """(LMConfig, params) of the Hugging Face causal LM in `path`; see the module docstring."""

  cfg = read_config(path, vocab_multiple)
  tensors = _Tensors(path)
  storage = _storage_dtype(tensors, dtype)
  cfg = dataclasses.replace(cfg, param_dtype=storage, dtype="bfloat16" if storage == "bfloat16" else "float32")
  plan = _plan(cfg, set(tensors.where))
  used = {n for names, _ in plan.values() for n in names}
  if cfg.tie_embeddings:
    used.add("lm_head.weight")
  extra = sorted(n for n in tensors.where if n not in used and not n.endswith(_IGNORED_SUFFIXES))
  if extra:
    raise UserError(f"checkpoint tensor {extra[0]!r} (and {len(extra) - 1} more) has no place in this "
                    f"{cfg.norm}-norm/{cfg.mlp} architecture: an option genjax does not support")
  boxed = abstract_params(cfg)
  placed = shardings(boxed) if shardings is not None else None

  def one(path_keys, leaf):
    keys = tuple(k.key for k in path_keys)
    w = _converted(tensors, cfg, plan, keys, leaf.shape)
    if placed is None:
      return jax.device_put(w)
    return jax.make_array_from_callback(w.shape, _get(placed, keys), lambda index: w[index])

  return cfg, jax.tree_util.tree_map_with_path(one, nn.unbox(boxed))


def _converted(tensors: "_Tensors", cfg: LMConfig, plan: dict, keys: tuple, shape) -> np.ndarray:
  """The genjax param at `keys`, converted from the checkpoint's tensors (host numpy, cfg.param_dtype)."""
  if keys not in plan:
    raise UserError(f"param {'/'.join(keys)} has no tensor in the checkpoint")
  names, convert = plan[keys]
  w = np.asarray((convert or (lambda x: x))(*[tensors[n] for n in names]))
  w = _pad_vocab(cfg, keys, w).astype(PARAM_DTYPES[cfg.param_dtype])
  if w.shape != tuple(shape):
    raise CheckpointError(f"tensor {names[0]!r} has shape {w.shape} after conversion, expected {tuple(shape)}")
  return w


def checkpoint_params(path: str, cfg: LMConfig):
  """The checkpoint's params as boxed (logical-axis) arrays for use inside `jax.jit` — a Task's `init` when
  fine-tuning (`config.model.init_from`). `cfg` is `read_config(path)` with any dtype/param_dtype. Each leaf is read
  on the host by a `jax.pure_callback` when the program runs, so no weight is baked into the compiled program."""
  tensors = _Tensors(path)
  plan = _plan(cfg, set(tensors.where))

  def leaf(path_keys, box):
    keys = tuple(k.key for k in path_keys if hasattr(k, "key"))
    read = lambda: _converted(tensors, cfg, plan, keys, box.value.shape)
    return box.replace_boxed(jax.pure_callback(read, jax.ShapeDtypeStruct(box.value.shape, box.value.dtype)))

  return jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg), is_leaf=lambda x: isinstance(x, nn.Partitioned))


def pretrained(path: str) -> Pretrained:
  """The checkpoint in `path` as the lm family starts from it: its LMConfig, its params read inside the training
  program (`checkpoint_params`) and its tokenizer."""
  return Pretrained(source=path, model_config=read_config(path), load_params=functools.partial(checkpoint_params, path),
                    tokenizer=load_tokenizer(path))


def pretrained_for(config) -> Optional[Pretrained]:
  """The checkpoint `config.model.init_from` names (`pretrained`), or None when the config starts from scratch (no
  such field, or "" / None: the family then names a missing required checkpoint itself). Launchers pass it to
  `genjax.models.get_task(config, pretrained=...)`."""
  init_from = config.model.get("init_from") if "model" in config else None
  return pretrained(init_from) if init_from else None


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


# ------------------------------------------------------------------------------------------------- saving --------
def _export_kind(cfg: LMConfig) -> str:
  gpt2 = dict(norm="layer", positions="learned", mlp="gelu", use_bias=True, qkv_bias=False)
  llama = dict(norm="rms", positions="rope", mlp="swiglu", use_bias=False)
  if all(getattr(cfg, k) == v for k, v in gpt2.items()) and cfg.kv_heads == cfg.num_heads:
    return "gpt2"
  if all(getattr(cfg, k) == v for k, v in llama.items()):
    return "qwen2" if cfg.qkv_bias else "llama"
  raise UserError(f"save_lm: an LM with norm={cfg.norm!r}, positions={cfg.positions!r}, mlp={cfg.mlp!r}, "
                  f"use_bias={cfg.use_bias} has no Hugging Face equivalent; exportable: GPT-2 (layer, learned, "
                  f"gelu, use_bias=True) or the Llama family (rms, rope, swiglu, use_bias=False)")


def _hf_config(cfg: LMConfig, kind: str, tokenizer) -> dict:
  vocab = cfg.token_vocab_size or cfg.vocab_size
  ids = {"bos_token_id": getattr(tokenizer, "bos_id", None), "eos_token_id": getattr(tokenizer, "eos_id", None),
         "pad_token_id": getattr(tokenizer, "pad_id", None)}
  common = {"model_type": kind, "vocab_size": vocab, "tie_word_embeddings": cfg.tie_embeddings,
            "dtype": cfg.param_dtype, **ids}
  if kind == "gpt2":
    return {**common, "architectures": ["GPT2LMHeadModel"], "n_embd": cfg.embed_dim, "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads, "n_inner": cfg.mlp_dim, "n_positions": cfg.max_len,
            "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new"}
  arch = "Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM"
  return {**common, "architectures": [arch], "hidden_size": cfg.embed_dim, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
          "intermediate_size": cfg.mlp_dim, "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
          "hidden_act": "silu", "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
          **({"use_sliding_window": False, "sliding_window": None} if kind == "qwen2" else {})}


def _hf_tensors(cfg: LMConfig, params) -> dict:
  """genjax params -> {hf name: numpy array}: the inverse of the load plan, vocabulary cut to its exact size."""
  params, vocab, linear = nn.unbox(params), cfg.token_vocab_size or cfg.vocab_size, cfg.positions == "rope"
  if cfg.scan_layers:
    params = unstack_layers(params, cfg.num_layers)
  out = {}
  for keys, (names, _) in _plan(cfg, set()).items():
    w, name = np.asarray(_get(params, keys)), names[0]
    if keys == ("embedding",):
      w = w[:vocab]
    elif keys == ("head", "kernel"):
      w = w[:, :vocab].T
    elif "attention" in keys and keys[-1] == "kernel":   # [in, out] after merging the head axes
      w = w.reshape(-1, w.shape[-1]) if keys[-2] == "out" else w.reshape(w.shape[0], -1)
      w = w.T if linear else w
    elif "attention" in keys and keys[-2] != "out":       # q/k/v bias [heads, head_dim]
      w = w.reshape(-1)
    elif keys[-1] == "kernel" and linear:                 # torch.nn.Linear stores [out, in]
      w = w.T
    if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):   # GPT-2's fused q, k, v (in that order)
      out[name] = np.concatenate([out[name], w], axis=-1) if name in out else w
    else:
      out[name] = w
  return {n: np.ascontiguousarray(w) for n, w in out.items()}


def save_lm(config: LMConfig, params, path: str, tokenizer=None) -> str:
  """Writes `path` (a new or empty directory) so that `transformers.AutoModelForCausalLM.from_pretrained(path)`
  loads the same model: config.json, model.safetensors (params in their storage dtype, vocabulary at its exact
  size), generation_config.json, and the tokenizer files when `tokenizer` (a `load_tokenizer` result or a
  directory) is given. Returns `path`."""
  kind = _export_kind(config)
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise UserError(f"save_lm: {path!r} exists and is not an empty directory; give a new directory")
  if isinstance(tokenizer, str):
    tokenizer = load_tokenizer(tokenizer)
  if tokenizer is not None and not isinstance(tokenizer, HFTokenizer):
    raise UserError(f"save_lm: tokenizer must be a load_tokenizer() result or a directory, got "
                    f"{type(tokenizer).__name__}")
  hf_config = _hf_config(config, kind, tokenizer)
  tensors = _hf_tensors(config, params)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".save_lm_", dir=parent)
  try:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    generation = {k: v for k, v in hf_config.items() if k.endswith("_token_id") and v is not None}
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump(generation, f, indent=2)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
      tokenizer.save(tmp)
    if os.path.isdir(path):
      os.rmdir(path)
    os.replace(tmp, path)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
  return path
