"""Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, then three special ids (PAD, BOS, EOS).

Any Python `str` that UTF-8 can encode round-trips: `decode(encode(text)) == text`. Decoding model output never
fails: special ids are dropped (decoding stops at the first EOS) and invalid byte sequences become U+FFFD.

    from genjax.tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    ids = tok.encode("héllo")                      # [104, 195, 169, 108, 108, 111]
    tok.decode(ids)                                # "héllo"
    tokens, lengths = tok.encode_batch(["a", "bcd"], add_bos=True)   # right-padded int32 [2, 4], lengths [2, 4]

Models may use a larger embedding table than `vocab_size` (`padded_vocab_size(multiple)`) for efficient sharding;
the ids above `EOS_ID` are then never produced by the tokenizer and the LM masks them out when decoding.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from genjax.errors import UserError

NUM_BYTES = 256
PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
VOCAB_SIZE = 259          # 256 bytes + PAD + BOS + EOS
SPECIAL_IDS = {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID}


def padded_vocab_size(multiple: int = 64) -> int:
  """`VOCAB_SIZE` rounded up to a multiple of `multiple` (embedding tables that shard evenly)."""
  if multiple < 1:
    raise UserError(f"multiple must be >= 1, got {multiple}")
  return -(-VOCAB_SIZE // multiple) * multiple


class ByteTokenizer:
  """UTF-8 bytes as token ids; PAD/BOS/EOS after them (see module docstring)."""
  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID
  vocab_size = VOCAB_SIZE

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    if not isinstance(text, str):
      raise UserError(f"encode expects a str, got {type(text).__name__}")
    ids = list(text.encode("utf-8"))
    return ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])

  def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
    """Bytes -> text; special ids are skipped, decoding stops at the first EOS (unless `stop_at_eos=False`)."""
    out = bytearray()
    for i in np.asarray(list(ids), dtype=np.int64).reshape(-1):
      if i == EOS_ID and stop_at_eos:
        break
      if 0 <= i < NUM_BYTES:
        out.append(int(i))
      elif i < 0:
        raise UserError(f"token id {int(i)} is negative")
    return out.decode("utf-8", errors="replace")

  def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False,
                   pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 [B, L] ids (L = longest, or `pad_to`) and int32 [B] lengths."""
    if isinstance(texts, str):
      raise UserError("encode_batch expects a list of str, got a single str")
    seqs = [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
    lengths = np.array([len(s) for s in seqs], dtype=np.int32)
    width = int(lengths.max(initial=0)) if pad_to is None else int(pad_to)
    if lengths.size and lengths.max() > width:
      raise UserError(f"a text encodes to {int(lengths.max())} ids, longer than pad_to={width}")
    out = np.full((len(seqs), width), PAD_ID, dtype=np.int32)
    for i, s in enumerate(seqs):
      out[i, :len(s)] = s
    return out, lengths

  def decode_batch(self, ids: np.ndarray, stop_at_eos: bool = True) -> list[str]:
    return [self.decode(row, stop_at_eos=stop_at_eos) for row in np.asarray(ids)]
