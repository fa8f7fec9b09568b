"""Data sets by name (offline built-ins and TFDS) and the resumable per-host batch pipeline."""
from genjax.data.pipeline import eval_batches, train_iterator
from genjax.data.registry import DATASETS, DatasetInfo, dataset_info, get_source, load_arrays

__all__ = ["DATASETS", "DatasetInfo", "dataset_info", "get_source", "load_arrays", "train_iterator",
           "eval_batches"]
