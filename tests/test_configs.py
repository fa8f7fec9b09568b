"""Every listed config (every family, every variant) trains one step through the shared loop.

TFDS variants run on `tfds.testing.mock_data`; text variants with a short sequence. Accelerator-sized configs (more
than `FULL_WIDTH_MAX_PARAMS` parameters) are proven in two parts that fit a 2-core CI machine: the full-width train
step is evaluated abstractly (`jax.eval_shape`: every shape and dtype of init and step, nothing compiled), then one
real step runs through the loop at reduced width and one residual block per level (`REDUCED_WIDTH`). Smaller configs
train their real step at full width. Batch, steps and sequence length shrink in every case. The latent-diffusion
config is evaluated abstractly here; its real training run is in tests/test_diffusion_model.py.

Config files declare no default a second time: a variant writes only settings that change a value (its family's typed
model defaults and base_config's loop settings are declared once), and `--print_config` shows every typed field.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import pathlib
import types
from unittest import mock

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
import yaml

from experiments import train
from experiments.configs.common import base_config
from experiments.train import run
from genjax.data import dataset_info
from genjax.errors import ConfigError
from genjax.models.diffusion import DiffusionConfig
from genjax.models.fields import config_section
from genjax.models.gan import GANConfig
from genjax.models.lm_layers import LMConfig
from genjax.models.transformer import DERIVED_FIELDS, RUN_FIELDS
from genjax.models.vae import VAEConfig
from tests.util import flat

CONFIG_DIR = pathlib.Path(__file__).parent.parent / "experiments" / "configs"
CONFIG_FILES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "common"))
CASES = [(f, v) for f in CONFIG_FILES for v in importlib.import_module(f"experiments.configs.{f}").VARIANTS]


def test_every_family_has_configs():
  assert {"vae", "ddpm", "gan", "lm"} <= set(CONFIG_FILES)


TYPED_CONFIGS = {"vae": VAEConfig, "diffusion": DiffusionConfig, "gan": GANConfig, "lm": LMConfig}


def _variant(config_file: str, variant: str):
  return importlib.import_module(f"experiments.configs.{config_file}").VARIANTS[variant]


def _restated_settings(variant) -> list[str]:
  """`key=value` for every setting the variant function writes over an equal value: a typed model default, a
  base_config loop setting or anything else the config already held, restated."""
  found, write = [], ml_collections.ConfigDict.__setitem__

  def recording(section, key, value):
    if key in section and not isinstance(value, ml_collections.FieldReference):
      old = section[key]
      if old == value and isinstance(old, bool) == isinstance(value, bool):
        found.append(f"{key}={value!r}")
    write(section, key, value)

  with mock.patch.object(ml_collections.ConfigDict, "__setitem__", recording):
    variant(base_config())
  return found


def test_config_files_set_only_what_a_variant_changes():
  restated = {f"{f}.py:{v}": _restated_settings(_variant(f, v)) for f, v in CASES}
  assert {case: found for case, found in restated.items() if found} == {}


def test_a_restated_default_is_found():
  def restating(c):
    c.model = config_section(GANConfig)
    c.model.update(latent_dim=GANConfig.latent_dim, loss="hinge")
    c.log_every_steps = base_config().log_every_steps
  assert _restated_settings(restating) == [f"latent_dim={GANConfig.latent_dim}",
                                           f"log_every_steps={base_config().log_every_steps}"]


def _typed_fields(cfg, names=None) -> dict:
  """{field: None, or the same for a nested dataclass} of the dataclass instance `cfg` (only `names` if given)."""
  return {f.name: _typed_fields(getattr(cfg, f.name)) if dataclasses.is_dataclass(getattr(cfg, f.name)) else None
          for f in dataclasses.fields(cfg) if f.init and (names is None or f.name in names)}


def _printed_fields(section: dict) -> dict:
  return {k: _printed_fields(v) if isinstance(v, dict) else None for k, v in section.items()}


def _expected_model_fields(c) -> dict:
  """Every field of the family's typed config; lm: those a config sets (the rest follow other settings) and
  init_from, and when fine-tuning a checkpoint only those that say how it runs."""
  cls = TYPED_CONFIGS[c.family]
  if cls is not LMConfig:
    return _typed_fields(cls())
  fine_tune = c.model.init_from != ""                    # hf_finetune: None until --config.model.init_from=DIR
  names = RUN_FIELDS if fine_tune else {f.name for f in dataclasses.fields(LMConfig)} - set(DERIVED_FIELDS)
  return {**_typed_fields(LMConfig(), names), "init_from": None}


def test_print_config_lists_every_typed_field_of_the_family(monkeypatch, capsys):
  monkeypatch.setattr(train, "_PRINT_CONFIG", types.SimpleNamespace(value=True))
  for config_file, variant in CASES:
    c = importlib.import_module(f"experiments.configs.{config_file}").get_config(variant)
    monkeypatch.setattr(train, "_CONFIG", types.SimpleNamespace(value=c))
    train.main([])
    printed = yaml.load(capsys.readouterr().out, Loader=yaml.FullLoader)
    assert _printed_fields(printed["model"]) == _expected_model_fields(c), (config_file, variant)


def test_config_section_names_the_valid_fields():
  assert config_section(GANConfig, only=["latent_dim"]).to_dict() == {"latent_dim": GANConfig.latent_dim}
  with pytest.raises(ConfigError, match=r"GANConfig has no fields \['latnt_dim'\]; valid: .*'latent_dim'"):
    config_section(GANConfig, only=["latnt_dim"])


def test_grad_accum_steps_must_divide_the_batch(tmp_path):
  """Refused before anything runs (it used to fail inside the compiled step), naming both values."""
  from experiments.configs import vae as vae_configs
  c = vae_configs.get_config("digits")
  c.batch_size, c.grad_accum_steps = 64, 3
  with pytest.raises(ConfigError, match=r"batch_size=64 must be divisible by grad_accum_steps=3 .*divisors of 64"):
    run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
  """A tiny Hugging Face LM directory (no torch needed), for the fine-tuning config."""
  from tests.hf_fixtures import tiny_checkpoint
  return tiny_checkpoint(str(tmp_path_factory.mktemp("hf") / "model"))


FULL_WIDTH_MAX_PARAMS = 2_000_000
# Per family: the model fields that set the width (and the U-Net's residual blocks per level), as functions of the
# config's value (layers and heads kept divisible; group norms still divide the channels).
REDUCED_WIDTH = {
    "lm": dict(embed_dim=lambda v: 64, num_heads=lambda v: 2, mlp_dim=lambda v: 128, num_layers=lambda v: 2,
               num_kv_heads=lambda v: 2 if v else v),
    "diffusion": dict(ch=lambda v: 16, norm_groups=lambda v: 4, num_res_blocks=lambda v: 1),
    "gan": dict(gen_channels=lambda v: tuple(max(8, c // 8) for c in v),
                disc_channels=lambda v: tuple(max(8, c // 8) for c in v), disc_features=lambda v: max(8, v // 8)),
    "vae": dict(channels=lambda v: tuple(max(8, c // 8) for c in v), hidden=lambda v: max(8, v // 8)),
}


def _one_step_config(config_file, variant, request):
  c = importlib.import_module(f"experiments.configs.{config_file}").get_config(variant)
  c.batch_size, c.num_train_steps, c.grad_accum_steps = 8, 1, 1
  c.eval_every_steps = c.sample_every_steps = -1
  c.async_checkpointing = False
  if "init_from" in c.model and c.model.init_from is None:       # hf_finetune: its checkpoint must be given
    c.model.init_from = request.getfixturevalue("hf_checkpoint")
  if dataset_info(c.dataset.name).kind == "text":
    c.dataset.seq_len = 16
  return c


def _full_width_step_shapes(c) -> int:
  """Parameter count of the config's train step, evaluated abstractly (shapes and dtypes only)."""
  import jax
  from genjax import data as gdata
  from genjax.models import get_task
  from genjax.train.builder import abstract_state, step_kwargs
  from genjax.train.step import make_train_step
  task = get_task(c)
  source = gdata.get_source(c.dataset, c.dataset.train_split)
  batch = next(gdata.eval_batches(source, global_batch=c.batch_size, num_batches=1))
  example = {k: v[:1] for k, v in batch.items()}
  state = abstract_state(task, c, example)
  new_state, metrics = jax.eval_shape(make_train_step(task, **step_kwargs(c)), state, batch)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state.params) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), state.params)
  assert "loss" in metrics or any(k.endswith("/loss") for k in metrics)
  return sum(x.size for x in jax.tree.leaves(state.params))


def _reduce_width(c) -> None:
  for key, shrink in REDUCED_WIDTH.get(c.family, {}).items():
    if key in c.model:
      c.model[key] = shrink(c.model[key])


@pytest.mark.parametrize("config_file, variant", CASES)
def test_config_trains_one_step(tmp_path, config_file, variant, request):
  c = _one_step_config(config_file, variant, request)
  mock = tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE) \
      if dataset_info(c.dataset.name).tfds else contextlib.nullcontext()
  if c.family == "diffusion" and c.model.space == "latent":
    # Abstract only (the task's shape_init reads no VAE run): tests/test_diffusion_model.py's
    # test_latent_run_samples_and_evaluates_after_its_vae_run_is_deleted trains this config (at tiny widths, from a
    # real VAE run) through the loop, resumes, samples and evaluates it.
    assert _full_width_step_shapes(c) > 0
    return
  with mock:
    fine_tune = bool(c.model.get("init_from"))             # hf_finetune: the checkpoint's own width
    if not fine_tune and _full_width_step_shapes(c) > FULL_WIDTH_MAX_PARAMS:
      _reduce_width(c)
    state = run(c, str(tmp_path))
  assert int(state.step) == 1
  assert np.all(np.isfinite(flat(state.params)))
