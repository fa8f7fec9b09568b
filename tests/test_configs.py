"""Every listed config (every family, every variant) trains one step through the shared loop.

TFDS variants run on `tfds.testing.mock_data`; text variants with a short sequence; the model sizes stay as listed
(accelerator-sized ones too), only batch, steps and sequence length shrink.
"""
from __future__ import annotations

import importlib
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.train import run
from genjax.data import dataset_info
from tests.util import flat, tiny_vae_config

CONFIG_DIR = pathlib.Path(__file__).parent.parent / "experiments" / "configs"
CONFIG_FILES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "common"))
CASES = [(f, v) for f in CONFIG_FILES for v in importlib.import_module(f"experiments.configs.{f}").VARIANTS]


def test_every_family_has_configs():
  assert {"vae", "ddpm", "gan", "lm"} <= set(CONFIG_FILES)


@pytest.fixture(scope="module")
def vae_workdir(tmp_path_factory):
  """A one-step digits VAE run, for latent diffusion configs."""
  workdir = str(tmp_path_factory.mktemp("vae"))
  run(tiny_vae_config(num_train_steps=1), workdir)
  return workdir


@pytest.mark.parametrize("config_file, variant", CASES)
def test_config_trains_one_step(tmp_path, config_file, variant, request):
  c = importlib.import_module(f"experiments.configs.{config_file}").get_config(variant)
  c.batch_size, c.num_train_steps, c.grad_accum_steps = 8, 1, 1
  c.eval_every_steps = c.sample_every_steps = -1
  c.async_checkpointing = False
  if "vae_workdir" in c.model:
    c.model.vae_workdir = request.getfixturevalue("vae_workdir")
  info = dataset_info(c.dataset.name)
  if info.kind == "text":
    c.dataset.seq_len = 16
  if info.tfds:
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
      state = run(c, str(tmp_path))
  else:
    state = run(c, str(tmp_path))
  assert int(state.step) == 1
  assert np.all(np.isfinite(flat(state.params)))
