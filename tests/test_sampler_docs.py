"""The usage example at the top of each diffusion sampler module's docstring runs as written (docs cannot rot)."""

import importlib
import textwrap

import pytest

MODULES = ["genjax.samplers.schedules", "genjax.samplers.spacing", "genjax.samplers.steps",
           "genjax.samplers.diffusion", "genjax.samplers.guidance"]


def first_example(doc: str) -> str:
  """The first block of 4-space-indented lines in a docstring, dedented."""
  lines, block = doc.splitlines(), []
  for line in lines:
    if line.startswith("    "):
      block.append(line)
    elif block:
      break
  return textwrap.dedent("\n".join(block))


@pytest.mark.parametrize("module", MODULES)
def test_module_example_runs(module):
  code = first_example(importlib.import_module(module).__doc__)
  assert "import" in code and len(code.splitlines()) >= 3, code
  exec(compile(code, f"<{module} docstring>", "exec"), {})
