"""Data: built-ins, the TFDS path through tfds.testing.mock_data, per-host slices, resumable position."""
from __future__ import annotations

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.configs.common import base_config
from genjax import data
from genjax.errors import ConfigError


def cfg(**kw):
  """`config.dataset` as the configs declare it (common.py's fields, the lm configs' text fields), updated by kw."""
  c = base_config().dataset
  c.update(dict(name="digits", seq_len=32, tokenizer=""), **kw)
  return c


def test_digits_is_the_bundled_sklearn_set_with_a_fixed_split():
  train, test = data.get_source(cfg(), "train"), data.get_source(cfg(), "test")
  assert (len(train), len(test)) == (1500, 297)   # scikit-learn ships 1,797 digits
  x = train[0]["image"]
  assert x.shape == (8, 8, 1) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0


def test_pydoc_windows_are_shifted_bytes_of_the_corpus():
  src = data.get_source(cfg(name="pydoc", seq_len=16), "train")
  corpus = data.registry.pydoc_bytes()
  assert len(corpus) > 400_000
  w0, w1 = src[0]["tokens"], src[1]["tokens"]
  assert w0.shape == (17,) and bytes(w0.astype(np.uint8)) == corpus[:17]
  assert w1[0] == w0[-1]        # windows step by seq_len: each window's last byte starts the next


@pytest.mark.parametrize("name, kind, shape", [("mnist", "image", (28, 28, 1)), ("fashion_mnist", "image", (28, 28, 1)),
                                              ("cifar10", "image", (32, 32, 3)), ("tiny_shakespeare", "text", None)])
def test_tfds_path_with_mock_data(name, kind, shape):
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    src = data.get_source(cfg(name=name, seq_len=4), "train")
    ex = src[0]
    if kind == "image":
      assert ex["image"].shape == shape and ex["image"].dtype == np.float32 and ex["image"].max() <= 1.0
      batch = next(data.train_iterator(src, global_batch=4, seed=0))
      assert batch["image"].shape == (4,) + shape and batch["label"].dtype == np.int32
    else:
      assert ex["tokens"].shape == (5,) and ex["tokens"].dtype == np.int32


def test_missing_tfds_data_offline_is_one_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r"TFDS data set 'mnist' .* not available .*tfds build mnist"):
    data.get_source(cfg(name="mnist", data_dir=str(tmp_path)), "train")


def test_unknown_names_list_the_valid_ones():
  with pytest.raises(ValueError, match=r"unknown data set 'mnits'; available: \['cifar10', 'digits'"):
    data.get_source(cfg(name="mnits"), "train")
  with pytest.raises(ValueError, match=r"has no split 'valid'; splits: \['train', 'test'\]"):
    data.get_source(cfg(), "valid")


def test_a_field_the_data_set_needs_is_read_as_declared_or_named_in_one_config_error():
  c = base_config()
  c.dataset.name = "pydoc"                                       # a config without the lm text fields
  with pytest.raises(ConfigError, match=r"^dataset.seq_len is not set; the text data set 'pydoc' needs it"):
    data.get_source(c.dataset, "train")
  with pytest.raises(ConfigError, match=r"^dataset.tokenizer is not set; the text data set 'pydoc' needs it"):
    data.get_source(ml_collections.ConfigDict(dict(name="pydoc", seq_len=8)), "train")
  with pytest.raises(ConfigError, match=r"^dataset.download is not set; the TFDS data set 'mnist' needs it"):
    data.get_source({"name": "mnist", "data_dir": None}, "train")
  assert len(data.get_source({"name": "digits"}, "test")) == 297     # a built-in image set needs only its name
  assert len(data.get_source(cfg(name="pydoc", seq_len=1000), "test")[0]["tokens"]) == 1001


def test_two_hosts_read_disjoint_halves_that_make_the_single_host_batch():
  src = data.get_source(cfg(), "train")
  one = data.train_iterator(src, global_batch=8, seed=3)
  hosts = [data.train_iterator(src, global_batch=8, seed=3, process_index=p, process_count=2) for p in range(2)]
  for _ in range(200):   # > one epoch (1500 / 8): reshuffled epochs stay aligned too
    full = next(one)
    halves = [next(h) for h in hosts]
    np.testing.assert_array_equal(np.concatenate([h["label"] for h in halves]), full["label"])
    np.testing.assert_array_equal(np.concatenate([h["example_id"] for h in halves]), np.arange(8))


def test_iterator_resumes_at_the_saved_position():
  src = data.get_source(cfg(), "train")
  it = data.train_iterator(src, global_batch=8, seed=1)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it)["image"] for _ in range(3)]
  fresh = data.train_iterator(src, global_batch=8, seed=1)
  fresh.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(fresh)["image"], e)


def test_epochs_are_reshuffled_and_cover_every_example():
  src = data.get_source(cfg(), "test")          # 297 examples
  it = data.train_iterator(src, global_batch=27, seed=0)
  epoch1 = np.concatenate([next(it)["image"].reshape(27, -1) for _ in range(11)])
  epoch2 = np.concatenate([next(it)["image"].reshape(27, -1) for _ in range(11)])
  all_images = np.stack([src[i]["image"].ravel() for i in range(len(src))])
  key = lambda a: sorted(map(bytes, a))   # noqa: E731
  assert key(epoch1) == key(all_images) == key(epoch2)
  assert not np.array_equal(epoch1, epoch2)


def test_batch_not_divisible_by_processes_is_refused():
  with pytest.raises(ValueError, match="batch_size=9 must be a positive multiple of the process count 2"):
    data.train_iterator(data.get_source(cfg(), "train"), global_batch=9, seed=0, process_count=2)


@pytest.mark.parametrize("name", ["digits", "pydoc"])
def test_batched_reads_equal_per_example_reads(name):
  src = data.get_source(cfg(name=name, seq_len=16), "train")
  idx = np.array([5, 0, 5, len(src) - 1, 17])
  got = data.registry.get_examples(src, idx)
  for k, v in got.items():
    np.testing.assert_array_equal(v, np.stack([src[int(i)][k] for i in idx]))
    assert v.dtype == np.asarray(src[0][k]).dtype


def test_tfds_batched_reads_equal_per_example_reads():
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    src = data.get_source(cfg(name="mnist"), "train")
    idx = np.array([3, 1, 11])
    got = data.registry.get_examples(src, idx)
    np.testing.assert_array_equal(got["image"], np.stack([src[int(i)]["image"] for i in idx]))
    np.testing.assert_array_equal(got["label"], [src[int(i)]["label"] for i in idx])
    assert got["image"].dtype == np.float32 and got["label"].dtype == np.int32


def test_prefetching_changes_nothing_and_resumes_mid_prefetch():
  src = data.get_source(cfg(), "test")                          # 297 examples: batches of 40 span epochs
  plain = data.train_iterator(src, global_batch=40, seed=5, prefetch=0)
  ahead = data.train_iterator(src, global_batch=40, seed=5, prefetch=3)
  stream = [next(plain) for _ in range(20)]
  for expected in stream[:9]:
    got = next(ahead)
    for k in expected:
      np.testing.assert_array_equal(got[k], expected[k])
  ahead.set_state({"next_index": 4})                            # back in time, with batches 9..12 in flight
  np.testing.assert_array_equal(next(ahead)["image"], stream[4]["image"])
  ahead.set_state({"next_index": 15})                           # and forward
  np.testing.assert_array_equal(next(ahead)["image"], stream[15]["image"])
  ahead.close()
  np.testing.assert_array_equal(next(ahead)["image"], stream[16]["image"])   # still usable, unprefetched
  # Epoch 0 is a permutation of the split: batches 0..6 hold examples 0..279 of it, each once.
  seen = np.concatenate([plain.indices(b) for b in range(7)])
  assert len(set(seen.tolist())) == 280
  with pytest.raises(ValueError, match="next_index"):
    plain.set_state({"position": 3})
