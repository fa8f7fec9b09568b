"""Data sets by name: offline built-ins and TFDS, as random-access sources of per-example dicts.

    info = dataset_info("digits")          # kind "image", image_shape (8, 8, 1), num_classes 10
    src = get_source(config.dataset, "train")
    src[0]  # {"image": float32 [8, 8, 1] in [0, 1], "label": int32}

`config.dataset` fields (declared with their defaults in experiments/configs/common.py: name, data_dir,
train_split, eval_split, download; in experiments/configs/lm.py for text: seq_len, tokenizer). `get_source` reads
only the fields its data set needs (data_dir and download for TFDS, seq_len and tokenizer for text) and a missing
one is a ConfigError naming it.

Image examples are `{"image": float32 [H, W, C] in [0, 1], "label": int32}`; text examples are
`{"tokens": int32 [seq_len + 1]}` byte ids (non-overlapping windows of a UTF-8 byte stream).

Built-ins (no download, no internet):
- `digits`: scikit-learn's bundled 1,797 8×8 handwritten digits (values 0–16 scaled to [0, 1]); fixed split: the
  first 1,500 images are `train`, the last 297 `test`.
- `pydoc`: English prose that ships with CPython (`pydoc_data.topics`, ~465 KB), topics joined in sorted order;
  the first 90% of the bytes are `train`, the rest `test`.
TFDS (`tfds.data_source`, ArrayRecord, no TensorFlow): `mnist`, `fashion_mnist`, `cifar10`, `tiny_shakespeare`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import numpy as np
from pydoc_data.topics import topics

from genjax.data.hf_tokenizer import load_tokenizer
from genjax.errors import ConfigError, UserError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  kind: str                                   # "image" | "text"
  image_shape: Optional[tuple[int, int, int]] = None
  num_classes: Optional[int] = None
  splits: tuple[str, ...] = ("train", "test")
  tfds: bool = False


DATASETS = {
    "digits": DatasetInfo("digits", "image", (8, 8, 1), 10),
    "pydoc": DatasetInfo("pydoc", "text"),
    "mnist": DatasetInfo("mnist", "image", (28, 28, 1), 10, tfds=True),
    "fashion_mnist": DatasetInfo("fashion_mnist", "image", (28, 28, 1), 10, tfds=True),
    "cifar10": DatasetInfo("cifar10", "image", (32, 32, 3), 10, tfds=True),
    "tiny_shakespeare": DatasetInfo("tiny_shakespeare", "text", splits=("train", "validation", "test"), tfds=True),
}
DIGITS_NUM_TRAIN = 1500
PYDOC_TRAIN_FRACTION = 0.9


def dataset_info(name: str) -> DatasetInfo:
  if name not in DATASETS:
    raise UserError(f"unknown data set {name!r}; available: {sorted(DATASETS)}")
  return DATASETS[name]


def _check_split(info: DatasetInfo, split: str) -> None:
  base = split.split("[")[0]                  # TFDS slicing such as "train[:90%]" is allowed
  if base not in info.splits:
    raise UserError(f"data set {info.name!r} has no split {split!r}; splits: {list(info.splits)}")


class ImageSource:
  """Random access to images stored as uint8 (TFDS) or arrays already in [0, 1] (built-ins)."""

  def __init__(self, records: Any, scale: float):
    self._records, self._scale = records, scale

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> dict:
    r = self._records[i]
    return {"image": np.asarray(r["image"], np.float32) / self._scale, "label": np.int32(r["label"])}

  def get_batch(self, indices: np.ndarray) -> dict:
    """Examples `indices` stacked: one fancy-indexing op for in-memory arrays, a read per record for TFDS (the
    training pipeline runs it in its prefetch thread)."""
    if isinstance(self._records, _ArrayRecords):
      images, labels = self._records.images[indices], self._records.labels[indices]
    else:
      records = [self._records[int(i)] for i in indices]
      images = np.stack([np.asarray(r["image"]) for r in records])
      labels = np.asarray([r["label"] for r in records])
    return {"image": images.astype(np.float32) / self._scale, "label": labels.astype(np.int32)}


class _ArrayRecords:
  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict:
    return {"image": self.images[i], "label": self.labels[i]}


class TextWindows:
  """Non-overlapping windows of `seq_len + 1` ids over one stream (targets are inputs shifted by 1): the bytes of
  a UTF-8 text, or the int ids a checkpoint's tokenizer made of it (`dataset.tokenizer`)."""

  def __init__(self, data, seq_len: int):
    if seq_len < 1:
      raise ConfigError(f"dataset.seq_len must be >= 1, got {seq_len}")
    self._data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.asarray(data, np.int32)
    self._seq_len = seq_len
    if len(self) == 0:
      raise ConfigError(f"text of {len(self._data)} bytes is too short for dataset.seq_len={seq_len}")

  def __len__(self) -> int:
    return (len(self._data) - 1) // self._seq_len

  def __getitem__(self, i: int) -> dict:
    start = i * self._seq_len
    return {"tokens": self._data[start:start + self._seq_len + 1].astype(np.int32)}

  def get_batch(self, indices: np.ndarray) -> dict:
    starts = np.asarray(indices, np.int64)[:, None] * self._seq_len
    return {"tokens": self._data[starts + np.arange(self._seq_len + 1)].astype(np.int32)}


def get_examples(source: Any, indices) -> dict:
  """Examples `indices` of `source` as one dict of stacked arrays: the source's own `get_batch` when it has one
  (genjax's sources do), else `source[i]` per index, stacked."""
  indices = np.asarray(indices, np.int64)
  get_batch = getattr(source, "get_batch", None)
  if get_batch is not None:
    return get_batch(indices)
  examples = [source[int(i)] for i in indices]
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits
  d = load_digits()
  return (d.images.astype(np.float32)[..., None] / 16.0), d.target.astype(np.int32)


@functools.lru_cache(maxsize=1)
def pydoc_bytes() -> bytes:
  return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def _tfds_records(info: DatasetInfo, split: str, data_dir: Optional[str], download: bool):
  import tensorflow_datasets as tfds
  try:
    return tfds.data_source(info.name, split=split, data_dir=data_dir, download=download)
  except Exception as e:  # TFDS raises many kinds; the user needs one clear line.
    cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(
        f"TFDS data set {info.name!r} (split {split!r}) is not available under data_dir={data_dir!r} "
        f"({type(e).__name__}: {cause}). Prepare it on a machine with internet, in an environment with TensorFlow "
        f"(`pip install tensorflow-datasets tensorflow-cpu array_record`): `tfds build {info.name} "
        f"--file_format=array_record --data_dir=DIR`, then pass --config.dataset.data_dir=DIR "
        f"(docs/training.md: Data sets). Offline built-ins: digits, pydoc.") from None


def _field(dataset_config: Any, name: str, needed_by: str) -> Any:
  """`dataset_config.<name>`, or a ConfigError naming the field when the config does not declare it."""
  if name not in dataset_config:
    raise ConfigError(f"dataset.{name} is not set; {needed_by} needs it: declare it in the config (text fields in "
                      f"experiments/configs/lm.py, the others in experiments/configs/common.py)")
  return dataset_config[name]


def _token_stream(dataset_config: Any, data: bytes, needed_by: str):
  """The UTF-8 bytes themselves, or with `dataset.tokenizer=DIR` (a Hugging Face model directory) the int32 ids
  its tokenizer.json makes of the text."""
  tokenizer_dir = _field(dataset_config, "tokenizer", needed_by)
  if not tokenizer_dir:
    return data
  return load_tokenizer(tokenizer_dir).encode_corpus(data.decode("utf-8", errors="replace"))


def _tfds_source(info: DatasetInfo, dataset_config: Any, split: str):
  needed_by = f"the TFDS data set {info.name!r}"
  return _tfds_records(info, split, _field(dataset_config, "data_dir", needed_by),
                       bool(_field(dataset_config, "download", needed_by)))


def _text_source(info: DatasetInfo, dataset_config: Any, split: str) -> TextWindows:
  needed_by = f"the text data set {info.name!r}"
  seq_len = int(_field(dataset_config, "seq_len", needed_by))
  if info.name == "pydoc":
    data = pydoc_bytes()
    cut = int(len(data) * PYDOC_TRAIN_FRACTION)
    return TextWindows(_token_stream(dataset_config, data[:cut] if split == "train" else data[cut:], needed_by),
                       seq_len)
  records = _tfds_source(info, dataset_config, split)
  text = "".join(r["text"] if isinstance(r["text"], str) else r["text"].decode("utf-8") for r in records)
  return TextWindows(_token_stream(dataset_config, text.encode("utf-8"), needed_by), seq_len)


def get_source(dataset_config: Any, split: str):
  """The random-access source for `dataset_config.name` and `split` (see module docstring). `dataset_config` is
  `config.dataset` (a ConfigDict) or any mapping with the fields its data set needs."""
  info = dataset_info(_field(dataset_config, "name", "every data set"))
  _check_split(info, split)
  if info.kind == "text":
    return _text_source(info, dataset_config, split)
  if info.name == "digits":
    images, labels = _digits()
    sl = slice(0, DIGITS_NUM_TRAIN) if split == "train" else slice(DIGITS_NUM_TRAIN, None)
    return ImageSource(_ArrayRecords(images[sl], labels[sl]), scale=1.0)
  return ImageSource(_tfds_source(info, dataset_config, split), scale=255.0)


def load_arrays(name: str, split: str, data_dir: Optional[str] = None, max_examples: Optional[int] = None) -> dict:
  """A whole image split in memory: {"image": float32 [N, H, W, C] in [0, 1], "label": int32 [N]}."""
  info = dataset_info(name)
  if info.kind != "image":
    raise UserError(f"load_arrays is for image data sets; {name!r} is {info.kind}")
  src = get_source({"name": name, "data_dir": data_dir, "download": False}, split)
  n = len(src) if max_examples is None else min(len(src), max_examples)
  return get_examples(src, np.arange(n))
