"""experiments/steps_sweep.py: FD against sampler steps for a diffusion model, its compile count, its plot.

A tiny digits U-Net with random weights and a short-trained feature network: the figures are meaningless, the
invariants are not — the same seed and options give the same samples as `experiments.evaluate`, the floor is the
same computation for every point, and changing the step count compiles nothing.
"""
import json
import os

import numpy as np
import pytest

from experiments import evaluate as ev
from experiments import steps_sweep
from genjax.metrics import features as feat
from genjax.models import diffusion
from tests.test_diffusion_model import _unet_params, tiny_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  config = tiny_config("digits")
  task = diffusion.task(config)
  fx = feat.build_feature_extractor("digits", cache_dir=str(tmp_path_factory.mktemp("features")), num_steps=20)
  ref = ev.image_reference(config, num_samples=24, kid_subsets=5, kid_subset_size=24, feature_extractor=fx)
  return task, _unet_params(task), ref


def test_sweep_scores_every_point_and_compiles_once_per_sampler(setup):
  task, params, ref = setup
  samplers = ["ddim", "dpm_solver", "heun"]          # heun: the EDM path, float t through the U-Net
  points = steps_sweep.sweep(task, params, ref, samplers, [2, 3, 5], sample_batch_size=24, log=lambda *_: None)
  assert [(p["sampler"], p["num_steps"]) for p in points] == [(s, n) for s in samplers for n in (2, 3, 5)]
  # The first point of each sampler compiles its program; other step counts are runtime values.
  assert all(p["compiles"] >= 1 for p in points if p["num_steps"] == 2)
  assert [p["compiles"] for p in points if p["num_steps"] != 2] == [0] * 6
  # A point is exactly what experiments.evaluate reports for the same sampler, steps and seed.
  again = ev.image_report(task, params, ref, ev.sampling_key(0), options={"sampler": "ddim", "num_steps": 3},
                          sample_batch_size=24)
  assert again["metrics"] == points[1]["metrics"]
  assert points[1]["metrics"] != points[2]["metrics"]           # the step count really changes the samples
  # Random weights draw no digits: further from every training image than the unseen test digits are.
  assert again["memorization"]["nearest_train_distance_ratio"] > 1.0
  assert set(again["memorizer"]) == set(again["floor"]) == set(again["metrics"])


def test_floor_is_real_vs_real_and_names_the_feature_net(setup):
  *_, ref = setup
  # The floor compares the 297-image test split subsampled to num_samples with the train split's features.
  assert ref.num_samples == 24 and ref.real_features.shape == (1500, 128)
  assert ref.floor["FD-digits"] > 0 and 0 <= ref.floor["precision-digits"] <= 1
  assert ref.info["floor_set"] == "digits test split (24 images)"


def test_bad_sweep_arguments_name_the_choices(setup):
  task, params, ref = setup
  with pytest.raises(ValueError, match="unknown samplers \\['eular'\\]; valid: \\['ddpm', 'ddim', 'dpm_solver', "):
    steps_sweep.sweep(task, params, ref, ["ddim", "eular"], [2])
  assert task.samplers == diffusion.SAMPLERS       # the CLI's default sweep and valid names: the Task's samplers
  assert set(steps_sweep.SAMPLER_LABELS) >= set(diffusion.SAMPLERS)
  with pytest.raises(ValueError, match="num_steps must be positive ints"):
    steps_sweep.sweep(task, params, ref, ["ddim"], [0])
  with pytest.raises(ValueError, match="is missing, not a run directory"):
    steps_sweep.sweep_run("/nonexistent/run", ["ddim"], [2])


def test_plot_writes_a_png(tmp_path):
  from PIL import Image
  result = {"metric": "FD-digits", "num_samples": 10, "variant": "digits", "floor": {"FD-digits": 20.0},
            "points": [{"sampler": s, "num_steps": n, "metrics": {"FD-digits": 100.0 / n + i}}
                       for i, s in enumerate(["ddpm", "ddim"]) for n in (10, 20, 50)]}
  path = str(tmp_path / "fd.png")
  steps_sweep.plot(result, path)
  image = np.asarray(Image.open(path).convert("RGB"))
  assert image.shape == (480, 720, 3)                          # 6 x 4 inches at 120 dpi
  json.dumps(result)                                           # the record the CLI writes is plain JSON
  assert os.path.getsize(path) > 10_000
