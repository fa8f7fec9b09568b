"""The launchers' front door, driven as a user would: each bad input is one `error:` line naming the bad value,
exit status 2, no traceback, and the run directories on disk unchanged (file names and contents hashed before and
after). Subprocesses of one kind run side by side to keep the module to a few tens of seconds."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import cli as cli_lib
from experiments import sample as sample_cli
from experiments.configs import gan as gan_configs
from genjax.errors import CheckpointError, ConfigError, UserError, WorkdirError
from tests.util import tiny_vae_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300


# The conditional digits GAN shrunk to seconds (no R1: one compile fewer), as --config.* overrides.
TINY_GAN = {"model.latent_dim": 4, "model.gen_channels": (8, 4, 4), "model.disc_channels": (4, 4, 8),
            "model.disc_features": 8, "model.r1_gamma": 0.0, "batch_size": 16, "num_train_steps": 1,
            "checkpoint_every_steps": 1, "log_every_steps": 1, "eval_every_steps": -1, "sample_every_steps": -1,
            "async_checkpointing": False}
GAN_CONFIG = "--config=experiments/configs/gan.py:digits"


def tiny_gan_config():
  c = gan_configs.get_config("digits")
  for key, value in TINY_GAN.items():
    *path, last = key.split(".")
    (c[path[0]] if path else c)[last] = value
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A finished tiny conditional GAN run (trained through the launcher's `run`), a file and an empty directory.
  One run only: each costs ~20 s of compiling."""
  from experiments.train import run
  base = tmp_path_factory.mktemp("runs")
  gan = str(base / "gan")
  run(tiny_gan_config(), gan)
  a_file = base / "a_file"
  a_file.write_text("not a run\n")
  empty = base / "empty"
  empty.mkdir()
  return {"gan": gan, "file": str(a_file), "empty": str(empty), "base": str(base)}


def tree_hash(path: str) -> str:
  """Names and contents of every file and directory under `path` (or of the file `path`)."""
  h = hashlib.sha256()
  if os.path.isfile(path):
    h.update(open(path, "rb").read())
    return h.hexdigest()
  for dirpath, dirnames, filenames in sorted(os.walk(path)):
    dirnames.sort()
    h.update(os.path.relpath(dirpath, path).encode() + b"/\0")
    for name in sorted(filenames):
      h.update(name.encode() + b"\0")
      with open(os.path.join(dirpath, name), "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()


def run_all(commands: dict, cwd: str = ROOT, env=None) -> dict:
  """Runs {name: argv} side by side; {name: CompletedProcess-like (returncode, stdout, stderr)}."""
  env = {**os.environ, **(env or {})}
  children = {name: subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for name, argv in commands.items()}
  out = {}
  for name, child in children.items():
    stdout, stderr = child.communicate(timeout=TIMEOUT)
    out[name] = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
  return out


def assert_one_error_line(name: str, result, *needles: str) -> None:
  text = result.stdout + result.stderr
  assert "Traceback" not in text, (name, text)
  errors = [line for line in text.splitlines() if line.startswith("error:")]
  assert result.returncode == 2 and len(errors) == 1, (name, result.returncode, text)
  for needle in needles:
    assert needle in errors[0], (name, needle, errors[0])


def check_refusals(cases: dict, protected: list[str], also: dict = None, **kw) -> dict:
  """cases: {name: (argv, needles)}; every case must be refused and leave `protected` paths unchanged. `also`:
  more {name: argv} to run alongside (their results are returned with the others')."""
  before = {p: tree_hash(p) for p in protected}
  results = run_all({**{name: argv for name, (argv, _) in cases.items()}, **(also or {})}, **kw)
  for name, (_, needles) in cases.items():
    assert_one_error_line(name, results[name], *needles)
  assert {p: tree_hash(p) for p in protected} == before
  return results


def cli_overrides(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def test_train_refusals(runs, tmp_path):
  import shutil
  train = ["-m", "experiments.train"]
  new = str(tmp_path / "new_run")
  cases = {
      "workdir is a file": ([*train, GAN_CONFIG, f"--workdir={runs['file']}"], [runs["file"], "is a file"]),
      "unknown config key": ([*train, GAN_CONFIG, "--config.model.latnt_dim=3", f"--workdir={runs['gan']}"],
                             ["model.latnt_dim", "config.model has:", "latent_dim", "r1_gamma"]),
      "unknown variant": ([*train, "--config=experiments/configs/gan.py:digitz", f"--workdir={runs['gan']}"],
                          ["'digitz'", "digits"]),
      "unknown data set": ([*train, GAN_CONFIG, "--config.dataset.name=mnistt", f"--workdir={new}"],
                           ["'mnistt'", "digits"]),
      "bad shared value": ([*train, GAN_CONFIG, "--config.parallel=pjt", f"--workdir={new}"], ["'pjt'", "pmap"]),
      "missing workdir": ([*train, GAN_CONFIG], ["--workdir is required"]),
  }   # more flag mistakes: tests/test_faults.py::test_launcher_flag_errors_are_one_line_and_lose_nothing
  finished = shutil.copytree(runs["gan"], str(tmp_path / "finished"))
  rerun = [*train, GAN_CONFIG, *cli_overrides(TINY_GAN), "--config.optimizer.learning_rate=0.5",
           f"--workdir={finished}"]
  results = check_refusals(cases, [runs["gan"], runs["file"]], also={"rerun": rerun})
  assert not os.path.exists(new)          # nothing created for a run that was refused
  # The finished run, rerun with another learning rate: says it is complete and that the change is ignored.
  done = results["rerun"]
  assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
  assert "already complete at step 1" in done.stderr and "optimizer.learning_rate" in done.stderr, done.stderr


def test_sample_refusals(runs):
  sample = ["-m", "experiments.sample", f"--workdir={runs['gan']}"]
  cases = {
      # --label is checked on the host even though the sampler is jitted (it used to write a NaN grid).
      "label out of range": ([*sample, "--label=12"], ["[12]", "[0, 9]"]),
      "negative truncation": ([*sample, "--truncation=-1", "--interpolate"], ["truncation=-1.0"]),
      "option the family lacks": ([*sample, "--temperature=0.5"], ["['temperature']", "truncation", "label"]),
      "missing step": ([*sample, "--step=99"], ["step 99", "[1]"]),
      "no samples": ([*sample, "--num_samples=0"], ["--num_samples=0"]),
      "workdir is a file": (["-m", "experiments.sample", f"--workdir={runs['file']}"], [runs["file"], "a file"]),
      "workdir is not a run": (["-m", "experiments.sample", f"--workdir={runs['empty']}"],
                               [runs["empty"], "config.json"]),
  }
  results = check_refusals(cases, [runs["gan"], runs["file"], runs["empty"]])
  assert f"--workdir={runs['file']}" not in results["workdir is a file"].stderr   # no "train into the file"


def test_evaluate_refusals(runs, tmp_path):
  evaluate = ["-m", "experiments.evaluate", f"--workdir={runs['gan']}"]
  sweep = ["-m", "experiments.steps_sweep", f"--workdir={runs['gan']}"]
  cases = {
      "negative truncation": ([*evaluate, "--truncation=-0.5"], ["truncation=-0.5"]),
      "label out of range": ([*evaluate, "--label=10"], ["[10]", "[0, 9]"]),
      "option the family lacks": ([*evaluate, "--sampler=ddim"], ["['sampler']"]),
      "malformed --option": ([*evaluate, "--option=guidance"], ["'guidance'"]),
      "workdir is a file": (["-m", "experiments.evaluate", f"--workdir={runs['file']}"], [runs["file"], "a file"]),
      # The GAN's Task names no samplers: the sweep says what this run can do instead of naming a family.
      "sweep: a run without samplers": ([*sweep, "--samplers=ddim"], ["experiments.steps_sweep needs a model that can "
                                                                      "choose a sampler", "can: sample images"]),
      "sweep: steps not ints": ([*sweep, "--num_steps=10,x"], ["--num_steps=10,x"]),
  }
  # An empty feature cache: a refusal that came after the feature network would train it (a minute, an extra line).
  cache = str(tmp_path / "features")
  check_refusals(cases, [runs["gan"], runs["file"]], env={"GENJAX_FEATURE_CACHE": cache})
  assert not os.path.exists(cache)


@pytest.mark.slow
def test_vae_trials(tmp_path):
  """The VAE's trials through the launchers (a second trained run: slow)."""
  from experiments.train import run
  vae = str(tmp_path / "vae")
  run(tiny_vae_config(num_train_steps=2, sample_every_steps=-1, eval_every_steps=-1), vae)
  check_refusals({
      "negative temperature": (["-m", "experiments.sample", f"--workdir={vae}", "--temperature=-1"],
                               ["temperature=-1.0"]),
      "option the family lacks": (["-m", "experiments.evaluate", f"--workdir={vae}", "--label=3"],
                                  ["['label']", "temperature"]),
  }, [vae])


def test_launchers_run_from_any_directory_and_explain_their_flags(tmp_path):
  results = run_all({   # `python -m` from elsewhere, with the package importable (as `pip install -e .` makes it)
      "print_config": ["-m", "experiments.train", "--config=experiments/configs/gan.py:digits",
                       "--config.num_train_steps=7", "--print_config"],
      "sample help": ["-m", "experiments.sample", "--help"],
      "evaluate help": ["-m", "experiments.evaluate", "--help"],
  }, cwd=str(tmp_path), env={"PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])})
  printed = results["print_config"]
  assert printed.returncode == 0, printed.stderr
  for field in ("num_train_steps: 7", "disc_optimizer:", "learning_rate:", "latent_dim: 32", "dataset:"):
    assert field in printed.stdout, field
  for name in ("sample help", "evaluate help"):          # one shared definition: the same options, same help
    text = " ".join((results[name].stdout + results[name].stderr).split())
    assert "Traceback" not in text, text
    for flag in ("--truncation", "--label", "--sampler", "--num_steps", "--eta", "--guidance", "--temperature"):
      assert flag in text, (name, flag)
    assert "restricted to" in text                      # what GAN truncation does
  assert os.listdir(tmp_path) == []                      # nothing written where it was run


def test_console_scripts_name_the_launchers_entry_functions():
  import importlib
  import tomllib
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert sorted(scripts) == ["genjax-evaluate", "genjax-export", "genjax-sample", "genjax-train"]
  for name, target in scripts.items():
    module, _, function = target.partition(":")
    assert module == "experiments." + name.removeprefix("genjax-") and callable(
        getattr(importlib.import_module(module), function)), (name, target)


def test_capabilities_a_run_lacks_are_one_line_naming_what_it_can_do(runs, tmp_path):
  from PIL import Image
  png = str(tmp_path / "digit.png")
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
  cases = {
      "edit a GAN run": (["-m", "experiments.sample", f"--workdir={runs['gan']}", f"--init_image={png}",
                          "--strength=0.5"], ["--init_image, --strength needs a model that can edit images",
                                              "can: sample images, interpolate, evaluate"]),
      "export a GAN run": (["-m", "experiments.export", f"--workdir={runs['gan']}", f"--out={tmp_path / 'out'}"],
                           ["experiments.export needs a model that can export", "can: sample images"]),
      "diffusers without --output": (["-m", "experiments.sample", f"--diffusers_model={tmp_path}"],
                                     ["--diffusers_model needs --output"]),
  }
  check_refusals(cases, [runs["gan"]])
  assert sorted(os.listdir(tmp_path)) == ["digit.png"]            # nothing written, here or for --out


def test_samples_are_named_by_the_step_actually_loaded(runs, tmp_path):
  """A damaged newest checkpoint is skipped (read-only, with a warning): the files name the step that was read."""
  import shutil
  workdir = str(tmp_path / "gan")
  shutil.copytree(runs["gan"], workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  shutil.copytree(os.path.join(ckpts, "1"), os.path.join(ckpts, "7"))
  with open(os.path.join(ckpts, "7", "meta", "metadata"), "w"):
    pass                                                           # empty metadata JSON: step 7 is damaged
  out = sample_cli.sample_run(workdir, options={}, num_samples=2)
  assert out["step"] == 1 and os.path.basename(out["paths"][0]) == "sample_step1_n2_seed0.png"
  assert sorted(os.listdir(ckpts)) == ["1", "7"]                   # sampling moved nothing


def test_sample_files_are_named_from_their_options_and_interpolation_honours_them(runs, tmp_path):
  import shutil
  workdir = str(tmp_path / "gan")
  shutil.copytree(runs["gan"], workdir)
  a = sample_cli.sample_run(workdir, options={"label": 3, "truncation": 0.5}, num_samples=4, interpolate=True)
  b = sample_cli.sample_run(workdir, options={"label": 4}, num_samples=4)
  assert [os.path.basename(p) for p in a["paths"]] == [
      "sample_step1_n4_seed0_label-3_truncation-0.5.png", "sample_step1_n4_seed0_label-3_truncation-0.5.npz",
      "sample_step1_n4_seed0_label-3_truncation-0.5_interpolation.png"]
  assert os.path.basename(b["paths"][0]) == "sample_step1_n4_seed0_label-4.png"
  assert all(os.path.exists(p) for p in a["paths"] + b["paths"])     # the second request overwrote nothing
  # The interpolation grid is the family's grid for the same label and truncation (and differs without them).
  from genjax.models import gan
  from genjax.core.checkpoint import load_run
  from genjax.train.report import save_image_grid
  config, params = load_run(workdir)
  key = jax.random.fold_in(jax.random.PRNGKey(0), 1)
  same, cols = gan.interpolation_images(config, params, key, label=3, truncation=0.5)
  other, _ = gan.interpolation_images(config, params, key)
  expect = save_image_grid(np.asarray(same), str(tmp_path / "expect.png"), columns=cols)
  unlike = save_image_grid(np.asarray(other), str(tmp_path / "unlike.png"), columns=cols)
  got = open(a["paths"][2], "rb").read()
  assert got == open(expect, "rb").read() and got != open(unlike, "rb").read()


def test_library_errors_are_user_errors(runs):
  """The same mistakes from Python: UserError subclasses (ValueErrors), raised before anything is compiled."""
  from experiments.configs import vae as vae_configs
  from genjax import data as gdata
  from genjax.models import get_task
  from genjax.core.checkpoint import load_run
  with pytest.raises(ConfigError, match=r"unknown variant 'digitz' for vae.py; valid: \['digits'"):
    vae_configs.get_config("digitz")
  with pytest.raises(UserError, match=r"unknown data set 'mnistt'; available: \["):
    gdata.dataset_info("mnistt")
  with pytest.raises(WorkdirError, match="is a file"):
    load_run(runs["file"])
  with pytest.raises(CheckpointError, match=r"no checkpoint of step 5 .*; steps: \[1\]"):
    load_run(runs["gan"], step=5)
  task = get_task(tiny_gan_config())
  with pytest.raises(UserError, match=r"label values must be in \[0, 9\], got \[-1\]"):
    task.sample_images({}, jax.random.PRNGKey(0), 2, label=-1)
  with pytest.raises(UserError, match=r"temperature=-0.5 must be a float >= 0"):
    get_task(tiny_vae_config()).sample_images({}, jax.random.PRNGKey(0), 2, temperature=-0.5)
  assert issubclass(UserError, ValueError)


def test_a_prompt_for_an_image_run_is_refused_naming_what_it_can_do(runs):
  """--prompt used to be silently ignored by an image family."""
  with pytest.raises(UserError) as e:
    sample_cli.sample_run(runs["gan"], options={}, num_samples=2, prompts=["hello"])
  assert str(e.value) == ("--prompt needs a model that can sample text; this run's can: sample images, interpolate, "
                          "evaluate")


def test_lm_sample_options_are_checked_by_the_decoding_settings():
  """The CLI's LM options (`transformer.sample_text`, behind --workdir and --hf_model) go through DecodingSettings:
  --num_beams=0 (once taken as sampling) is refused with the API's own message, before anything is compiled."""
  from genjax.models import transformer
  from genjax.samplers import DecodingSettings
  cfg = transformer.LMConfig(embed_dim=16, num_layers=1, num_heads=2, mlp_dim=32, max_len=16)
  with pytest.raises(UserError) as api:
    DecodingSettings(max_new_tokens=4, num_beams=0)
  with pytest.raises(UserError) as cli:
    transformer.sample_text(cfg, {}, ["hi"], jax.random.PRNGKey(0), max_new_tokens=4, num_beams=0)
  assert str(cli.value) == str(api.value) == "num_beams=0 must be a positive int"


def test_label_help_and_error_name_the_same_range():
  from genjax.models.diffusion import sample_options
  help_ = cli_lib.SAMPLE_OPTIONS["label"][1]
  assert "an int in [0, num_classes - 1]" in help_ and "num_classes (the null label" in help_, help_
  with pytest.raises(UserError, match=r"an int in \[0, 9\] \(10 = the null label: unconditional\), got 11$"):
    sample_options({"label": 11}, {"sampler": "ddim", "num_steps": 10, "eta": 0.0, "guidance": 1.0}, 100, 10)
