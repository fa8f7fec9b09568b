"""The README and docs/*.md cannot drift from the code: their examples run, their commands parse, their layout
page is the tree, and their links lead to files.

Conventions for whoever writes the docs:
- Every ```python block runs as written, alone, in a fresh namespace (a slow one in a fresh process, on the
  machine's own devices rather than the tests' 8 simulated ones), with a fresh temporary directory as the
  working directory (whatever it writes lands there) and the repository root importable (`experiments`). So a
  block carries its own imports, keys and tiny shapes, and builds any artifact it needs (a checkpoint directory:
  a tiny random model written by the library's own export).
- A marker on the line right before a fence: `<!-- doc-test: slow -->` for a block that takes more than a few
  seconds (it trains): it runs under `-m slow` only; `<!-- doc-test: needs NAME -->` for a block that reads an
  artifact the library cannot write itself: the test builds a tiny stand-in called NAME in the working directory
  first (`NEEDS`: "ddpm-cifar10-32", a random diffusers DDPM directory; skipped without torch and diffusers).
- Every command in a ```bash / ```sh block that runs `python -m experiments.<x>` (or the console scripts
  genjax-train / genjax-sample / genjax-evaluate / genjax-export) or `python -m benchmarks.<x>` is checked
  without doing the work, in this process: experiments.train's own parser reads it with `--print_config` added
  (the config file, its variant and every --config.* override resolved); the other launchers' own absl flag
  definitions parse its arguments on a fresh FlagValues (names, value types, required flags); a benchmark's
  flag names are looked up among those its modules define. Lines ending in a backslash continue; `#` starts a
  comment.
- An LM sampling command (`--prompt` with `--max_new_tokens`, on a workdir a documented command trains with an
  lm.py config) fits that config's context: prompt bytes + max_new_tokens <= dataset.seq_len.
- docs/layout.md's first ```text block names every package directory and module (but `__init__.py`) of genjax/,
  experiments/ and benchmarks/, and nothing that does not exist: a line starting with `dir/` lists that
  directory's modules (indented lines continue it).
- Every relative link or image in the pages points to an existing file.
- The README's test command is the one .ci/run runs.
- The usage example at the top of each diffusion sampler module's docstring (its first block of 4-space-indented
  lines) runs as written too.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import glob
import importlib
import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import sys
import textwrap

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
MARK = re.compile(r"^<!-- doc-test: (slow|needs [\w.-]+) -->$")
CONSOLE_SCRIPTS = {"genjax-train": "experiments.train", "genjax-sample": "experiments.sample",
                   "genjax-evaluate": "experiments.evaluate", "genjax-export": "experiments.export"}
TREES = ("genjax", "experiments", "benchmarks")


def fenced_blocks(path: str) -> list[tuple[str, int, str, str]]:
  """(language, line number of the fence, code, marker: "", "slow" or "needs NAME") of every fenced block in a
  markdown file."""
  lines, blocks, i = open(path, encoding="utf-8").read().splitlines(), [], 0
  while i < len(lines):
    match = re.match(r"^```(\w*)\s*$", lines[i])
    if not match:
      i += 1
      continue
    end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
    marker = MARK.match(lines[i - 1].strip()) if i > 0 else None
    blocks.append((match.group(1), i + 1, "\n".join(lines[i + 1:end]), marker.group(1) if marker else ""))
    i = end + 1
  return blocks


def _rel(path: str) -> str:
  return os.path.relpath(path, ROOT)


def tiny_diffusers_ddpm(path: str) -> None:
  """A flat diffusers DDPM directory (config.json, weights, scheduler_config.json): a random 8x8 RGB U-Net."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                               layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                               up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
  unet.save_pretrained(path)
  diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=True).save_pretrained(path)


NEEDS = {"ddpm-cifar10-32": tiny_diffusers_ddpm}
PYTHON_BLOCKS = [pytest.param(path, line, code, marker, id=f"{_rel(path)}:{line}",
                              marks=[pytest.mark.slow] if marker == "slow" else [])
                 for path in PAGES for lang, line, code, marker in fenced_blocks(path) if lang == "python"]


@pytest.mark.parametrize("path,line,code,marker", PYTHON_BLOCKS)
def test_python_block_runs_as_written(path, line, code, marker, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(ROOT)
  if marker.startswith("needs "):
    NEEDS[marker.split()[1]](str(tmp_path / marker.split()[1]))
  if marker == "slow":      # as a reader runs it: its own process, the machine's own devices (not the 8 simulated)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True, capture_output=True,
                          timeout=900)
    assert done.returncode == 0, f"{_rel(path)}:{line}\n{done.stderr[-3000:]}"
    return
  exec(compile(code, f"{_rel(path)}:{line}", "exec"), {"__name__": "__doc_example__"})


def shell_commands(code: str) -> list[list[str]]:
  """argv of each command in a shell block: continuation lines joined, comments dropped, `&&` / `;` / `|`
  chains split."""
  joined = re.sub(r"\\\n", " ", code)
  commands = []
  for line in joined.splitlines():
    words, current = shlex.split(line, comments=True), []
    for word in words + ["&&"]:
      if word in ("&&", ";", "|", "||"):
        if current:
          commands.append(current)
        current = []
      else:
        current.append(word)
  return commands


def launcher(argv: list[str]) -> tuple[str, list[str]] | None:
  """(module, flag arguments) of a genjax launcher or benchmark command, else None."""
  if argv[0] in CONSOLE_SCRIPTS:
    return CONSOLE_SCRIPTS[argv[0]], argv[1:]
  if len(argv) > 2 and argv[0] in ("python", "python3") and argv[1] == "-m" and argv[2].startswith(
      ("experiments.", "benchmarks.")):
    return argv[2], argv[3:]
  return None


DOCUMENTED = [(f"{_rel(path)}:{line}", *found) for path in PAGES for lang, line, code, _ in fenced_blocks(path)
              if lang in ("bash", "sh") for argv in shell_commands(code) for found in [launcher(argv)] if found]


def test_the_docs_document_every_launcher():
  modules = {module for _, module, _ in DOCUMENTED}
  assert {"experiments.train", "experiments.sample", "experiments.evaluate", "experiments.export",
          "experiments.steps_sweep", "benchmarks.samplers", "benchmarks.decoding", "benchmarks.train_step",
          "benchmarks.faults", "benchmarks.sampler_accuracy"} <= modules, modules


@contextlib.contextmanager
def fresh_flag_values():
  """A new FlagValues that absl's `flags.FLAGS` and every absl / ml_collections function taking `flag_values`
  use while the context lasts, so that launchers define and parse their flags on it, in this process."""
  fresh = flags.FlagValues()
  with pytest.MonkeyPatch.context() as mp:
    for module in (flags, config_flags):
      for name in dir(module):
        fn = getattr(module, name)
        signature = _signature(fn)
        if signature is not None and "flag_values" in signature.parameters:
          mp.setattr(module, name, _defaulting_to(fresh, fn, signature))
    mp.setattr(flags, "FLAGS", fresh)
    yield fresh


def _signature(fn):
  try:
    return inspect.signature(fn) if callable(fn) and not isinstance(fn, type) else None
  except (TypeError, ValueError):
    return None


def _defaulting_to(fresh, fn, signature):
  """`fn` with `flag_values=fresh` unless the caller passes flag_values (by keyword or position)."""
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    if "flag_values" not in signature.bind_partial(*args, **kwargs).arguments:
      kwargs["flag_values"] = fresh
    return fn(*args, **kwargs)
  return wrapper


def fresh_module(name: str):
  """A new instance of a module (its module-level flag definitions run again), not entered in sys.modules."""
  module = importlib.util.module_from_spec(importlib.util.find_spec(name))
  module.__spec__.loader.exec_module(module)
  return module


TRAIN_COMMANDS = [pytest.param(args, id=f"{where}:{i}") for i, (where, module, args) in enumerate(DOCUMENTED)
                  if module == "experiments.train"]


@pytest.mark.parametrize("args", TRAIN_COMMANDS)
def test_train_commands_resolve_their_config_and_overrides(args, monkeypatch, capsys):
  """The command with --print_config added, parsed by experiments.train's own flags and parser, in this process:
  the config file, its variant and every --config.* override resolve (no jax, no training)."""
  monkeypatch.chdir(ROOT)
  monkeypatch.syspath_prepend(ROOT)
  argv = ["experiments.train", *args, "--print_config"]
  monkeypatch.setattr(sys, "argv", argv)        # config_flags defines the --config.* override flags from sys.argv
  with fresh_flag_values():
    train = fresh_module("experiments.train")
    try:
      train.parse_flags(argv)
      printed = str(train._CONFIG.value)
    except SystemExit as e:
      pytest.fail(f"{args}: exit {e.code}: {capsys.readouterr().err}")
  assert "family:" in printed


LAUNCHER_COMMANDS = [pytest.param(module, args, id=f"{where}:{module}") for where, module, args in DOCUMENTED
                     if module.startswith("experiments.") and module != "experiments.train"]


@pytest.mark.parametrize("module,args", LAUNCHER_COMMANDS)
def test_launcher_commands_parse_with_the_launchers_flags(module, args, monkeypatch):
  monkeypatch.syspath_prepend(ROOT)
  launcher_module = importlib.import_module(module)
  with fresh_flag_values() as fresh:
    launcher_module.define_flags()
    fresh([module, *args])          # an unknown flag, a bad value or a missing required flag raises here


BENCHMARK_COMMANDS = [pytest.param(module, args, id=f"{where}:{module}") for where, module, args in DOCUMENTED
                      if module.startswith("benchmarks.")]


def benchmark_flags(module: str, seen: set | None = None) -> set[str]:
  """Names of the absl flags a benchmarks module defines, itself or through the benchmarks modules it imports, read
  from their source (the benchmarks define flags at import time, and two of them define the same name)."""
  seen = set() if seen is None else seen
  seen.add(module)
  names = set()
  for node in ast.walk(ast.parse(open(importlib.util.find_spec(module).origin, encoding="utf-8").read())):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("DEFINE"):
      if node.args and isinstance(node.args[0], ast.Constant):
        names.add(node.args[0].value)
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks"):
      deps = [f"benchmarks.{a.name}" for a in node.names] if node.module == "benchmarks" else [node.module]
      for dep in deps:
        if dep not in seen and importlib.util.find_spec(dep) is not None:
          names |= benchmark_flags(dep, seen)
  return names


@pytest.mark.parametrize("module,args", BENCHMARK_COMMANDS)
def test_benchmark_commands_name_flags_the_benchmarks_define(module, args, monkeypatch):
  monkeypatch.syspath_prepend(ROOT)
  known = benchmark_flags(module) | {"help", "helpfull", "helpshort"}
  for arg in args:
    name = arg[2:].partition("=")[0].partition(".")[0]        # --ddpm_config.x=...: the config flag's override
    assert arg.startswith("--") and (name in known or name.startswith("no") and name[2:] in known), (module, arg)


def test_lm_sampling_commands_fit_the_trained_context(monkeypatch):
  monkeypatch.syspath_prepend(ROOT)
  from genjax.tokenizer import ByteTokenizer
  trained = {}                                            # workdir -> config argument of its training command
  for _, module, args in DOCUMENTED:
    values = dict(a[2:].partition("=")[::2] for a in args if a.startswith("--"))
    if module == "experiments.train" and "workdir" in values:
      trained[values["workdir"]] = values["config"]
  checked = 0
  for where, module, args in DOCUMENTED:
    values = dict(a[2:].partition("=")[::2] for a in args if a.startswith("--"))
    config_arg = trained.get(values.get("workdir"), "")
    if module != "experiments.sample" or "prompt" not in values or "lm.py" not in config_arg:
      continue
    path, _, variant = config_arg.partition(":")
    seq_len = _load_config(path, variant).dataset.seq_len
    new = int(values.get("max_new_tokens", 0))
    used = len(ByteTokenizer().encode(values["prompt"])) + new
    assert used <= int(values.get("allow_longer_context", seq_len)), (where, args, used, seq_len)
    checked += 1
  assert checked


def _load_config(path: str, variant: str):
  spec = importlib.util.spec_from_file_location("_doc_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def layout_listing() -> dict[str, set[str]]:
  """{directory: modules listed} from docs/layout.md's first ```text block."""
  code = next(code for lang, _, code, _ in fenced_blocks(os.path.join(ROOT, "docs", "layout.md")) if lang == "text")
  listing, current = {}, None
  for line in code.splitlines():
    first = line.split()[0] if line.strip() else ""
    if not line.startswith(" ") and first.endswith("/"):
      current = first.rstrip("/")
      listing.setdefault(current, set())
    elif not line.startswith(" ") and first:
      current = None
    if current is not None:
      listing[current] |= set(re.findall(r"\b(\w+\.py)\b", line))
  return listing


def test_layout_page_is_the_tree():
  listing = {d: mods for d, mods in layout_listing().items() if d.split("/")[0] in TREES}
  tree = {}
  for top in TREES:
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
      dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
      tree[_rel(dirpath)] = {f for f in filenames if f.endswith(".py") and f != "__init__.py"}
  assert sorted(listing) == sorted(tree)
  for directory, modules in tree.items():
    assert listing[directory] == modules, (directory, "missing:", modules - listing[directory],
                                           "not in the tree:", listing[directory] - modules)


LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("path", PAGES, ids=_rel)
def test_relative_links_lead_to_files(path):
  text = open(path, encoding="utf-8").read()
  targets = [t for t in LINK.findall(text) if not re.match(r"^[a-z]+:", t)]
  missing = [t for t in targets if not os.path.exists(os.path.join(os.path.dirname(path), t))]
  assert not missing, missing


@pytest.mark.parametrize("path", PAGES, ids=_rel)
def test_doc_test_markers_are_known(path):
  for line in open(path, encoding="utf-8"):
    if "doc-test:" in line:
      marker = MARK.match(line.strip())
      assert marker and (marker.group(1) == "slow" or marker.group(1).split()[1] in NEEDS), line


DOCSTRING_MODULES = ["genjax.samplers.schedules", "genjax.samplers.spacing", "genjax.samplers.steps",
                     "genjax.samplers.diffusion", "genjax.samplers.guidance"]


def first_example(doc: str) -> str:
  """The first block of 4-space-indented lines in a docstring, dedented."""
  block = []
  for line in doc.splitlines():
    if line.startswith("    "):
      block.append(line)
    elif block:
      break
  return textwrap.dedent("\n".join(block))


@pytest.mark.parametrize("module", DOCSTRING_MODULES)
def test_module_docstring_example_runs(module):
  code = first_example(importlib.import_module(module).__doc__)
  assert "import" in code and len(code.splitlines()) >= 3, code
  exec(compile(code, f"<{module} docstring>", "exec"), {})


def test_readme_test_command_is_what_ci_runs():
  command = 'python -m pytest -n 2 -m "not slow" tests'
  assert command in open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  assert command in open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
