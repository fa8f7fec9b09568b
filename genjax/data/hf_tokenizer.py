"""A Hugging Face tokenizer (`tokenizer.json`, read by the `tokenizers` library) with the interface genjax's LM
code uses (`encode`, `decode`, `eos_id`, `pad_id`, like `genjax.tokenizer.ByteTokenizer`). It lives in the data
layer because `config.dataset.tokenizer=DIR` tokenizes text data sets with it; `genjax.interop.hf.load_tokenizer`
is the same function.

    tok = load_tokenizer("path/to/model")
    ids = tok.encode("Hello world")          # special tokens added as the tokenizer's post-processor says
    tok.decode(ids)                          # special tokens skipped; decoding stops at the first EOS
    tok.eos_id, tok.pad_id, tok.bos_id       # from generation_config.json, config.json, tokenizer_config.json

The special ids come from the model's config files, in the order `transformers` uses them for generation:
generation_config.json, then config.json, then the token strings in tokenizer_config.json / special_tokens_map.json.
A list of EOS ids keeps its first as `eos_id` (all of them in `eos_ids`).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Iterable, Optional

import numpy as np
from tokenizers import Tokenizer

from genjax.errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _json(path: str, name: str) -> dict:
  full = os.path.join(path, name)
  if not os.path.isfile(full):
    return {}
  with open(full) as f:
    return json.load(f)


class HFTokenizer:
  """See the module docstring."""

  def __init__(self, path: str):
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
      raise CheckpointError(f"{path!r} has no tokenizer.json (save the tokenizer with a fast tokenizer's "
                            f"save_pretrained, or pass a directory that has one)")
    self.path = path
    self._tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    files = [_json(path, "generation_config.json"), _json(path, "config.json")]
    token_files = [_json(path, "tokenizer_config.json"), _json(path, "special_tokens_map.json")]

    def special(kind: str) -> list[int]:
      for f in files:
        value = f.get(f"{kind}_token_id")
        if value is not None:
          return [int(v) for v in (value if isinstance(value, list) else [value])]
      for f in token_files:
        token = f.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and self._tok.token_to_id(token) is not None:
          return [self._tok.token_to_id(token)]
      return []

    self.eos_ids = special("eos")
    self.eos_id: Optional[int] = self.eos_ids[0] if self.eos_ids else None
    self.pad_id: Optional[int] = (special("pad") or [None])[0]
    self.bos_id: Optional[int] = (special("bos") or [None])[0]
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    if not isinstance(text, str):
      raise ValueError(f"encode expects a str, got {type(text).__name__}")
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_plain(self, text: str) -> list[int]:
    """`text`'s ids without the special tokens the post-processor adds (e.g. a BOS): for stop strings."""
    return self.encode(text, add_special_tokens=False)

  def decode(self, ids: Iterable[int], stop_at_eos: bool = True, skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in np.asarray(list(ids), np.int64).reshape(-1)]
    if stop_at_eos and self.eos_ids:
      ends = [k for k, i in enumerate(ids) if i in self.eos_ids]
      ids = ids[:ends[0]] if ends else ids
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

  def encode_corpus(self, text: str) -> np.ndarray:
    """A whole text as one int32 id stream (no special tokens), for training windows."""
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def save(self, directory: str) -> None:
    """Copies the tokenizer files (and generation_config.json's special ids are written by save_lm)."""
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(self.path, name)):
        shutil.copyfile(os.path.join(self.path, name), os.path.join(directory, name))


def load_tokenizer(path: str) -> HFTokenizer:
  """The tokenizer of the model directory `path` (its tokenizer.json); see the module docstring."""
  if not os.path.isdir(path):
    raise CheckpointError(f"tokenizer path {path!r} is not a directory")
  return HFTokenizer(path)
