"""The import graph of genjax/, experiments/ and benchmarks/, read with `ast` (nothing is imported): layers run one
way, no module takes part in an import cycle, and genjax/ imports inside functions only optional heavy dependencies.

Layers, bottom to top (a group may import only the groups `MAY_IMPORT` lists for it, at module level or inside a
function alike):
- bottom: the `genjax` package itself, errors, dtypes, compiles, tokenizer, data, samplers, core (the Task protocol,
  optimizers, per-example randomness, checkpoints);
- genjax.models and genjax.metrics: the bottom only (neither imports the other);
- genjax.train: the bottom only. The loop runs any `genjax.core.task.Task` and never names a family, so it has no
  use for genjax.models (families are chosen above it, by experiments/ through `genjax.models.get_task`);
- genjax.interop: the bottom and genjax.models (checkpoints load into the zoo's own networks), never genjax.train;
- experiments, then benchmarks (benchmarks may import experiments' configs, not the other way round).

A module of genjax/ that no group covers fails `test_every_module_has_a_layer`: a new subpackage is placed here first.
Imports by string (`importlib.import_module`) are not edges; genjax.models' family table is the one such use.
"""
from __future__ import annotations

import ast
import pathlib
from typing import Iterator, NamedTuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("genjax", "experiments", "benchmarks")

BOTTOM = ("genjax", "genjax.errors", "genjax.dtypes", "genjax.compiles", "genjax.tokenizer", "genjax.data",
          "genjax.samplers", "genjax.core")
MAY_IMPORT = {
    **{group: BOTTOM for group in BOTTOM},
    "genjax.models": BOTTOM + ("genjax.models",),
    "genjax.metrics": BOTTOM + ("genjax.metrics",),
    "genjax.train": BOTTOM + ("genjax.train",),
    "genjax.interop": BOTTOM + ("genjax.models", "genjax.interop"),
    "experiments": BOTTOM + ("genjax.models", "genjax.metrics", "genjax.train", "genjax.interop", "experiments"),
    "benchmarks": BOTTOM + ("genjax.models", "genjax.metrics", "genjax.train", "genjax.interop", "experiments",
                            "benchmarks"),
}

# Imported inside a function in genjax/ so that a user who does not need them neither installs nor waits for them.
OPTIONAL_HEAVY = frozenset({
    "torch", "transformers", "diffusers",   # test oracles and benchmark peers (extras interop-test, peers)
    "matplotlib",                           # figures (extras plot, test)
    "tensorflow", "tensorflow_datasets",    # TFDS data sets: only a run on mnist / cifar10 / ... reads them
    "tensorboard", "tensorboardX",          # event files: only a run that writes them (about 2 s to import)
    "sklearn",                              # the `digits` data set: only a run on it (about 1 s to import)
})
# (importing module, imported module) pairs of genjax/ that import inside a function to keep a light module light.
LAZY_SUBMODULES = frozenset({
    ("genjax.metrics", "genjax.metrics.features"),   # the statistics import without Flax; the feature net is Flax
})


class Import(NamedTuple):
  module: str          # the importing module
  line: int
  target: str          # the imported name, absolute (`genjax.train.step`, `jax.numpy`)
  in_function: bool    # inside a def, lambda or class body rather than at module level
  statement: str       # the import statement as written (for messages)


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_sources() -> dict[str, tuple[pathlib.Path, str]]:
  """Every module of PACKAGES: dotted name -> (path, source)."""
  paths = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
  return {module_name(p): (p, p.read_text(encoding="utf-8")) for p in paths}


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
  """The module an ImportFrom names, with a relative import resolved against the importing module."""
  if not node.level:
    return node.module or ""
  parts = module.split(".")
  base = parts[:len(parts) - node.level + (1 if is_package else 0)]
  return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, source: str, is_package: bool = False) -> Iterator[Import]:
  """Each imported name of `module` with its line; `from a import b` yields `a.b` (callers resolve it to a module)."""
  nested = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)

  def walk(node: ast.AST, in_function: bool) -> Iterator[Import]:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.Import):
        yield from (Import(module, child.lineno, a.name, in_function, ast.unparse(child)) for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = _absolute(module, is_package, child)
        yield from (Import(module, child.lineno, f"{base}.{a.name}", in_function, ast.unparse(child))
                    for a in child.names)
      yield from walk(child, in_function or isinstance(child, nested))

  yield from walk(ast.parse(source), False)


def resolve(target: str, modules: set[str]) -> str | None:
  """The longest known module `target` names (`genjax.data.load_arrays` -> `genjax.data`); None outside `modules`."""
  parts = target.split(".")
  for n in range(len(parts), 0, -1):
    prefix = ".".join(parts[:n])
    if prefix in modules:
      return prefix
  return None


def group_of(module: str) -> str | None:
  """The MAY_IMPORT group a module belongs to (longest prefix; the `genjax` group is the package's __init__ only)."""
  parts = module.split(".")
  for n in range(len(parts), 0, -1):
    prefix = ".".join(parts[:n])
    if prefix in MAY_IMPORT and (prefix != "genjax" or n == len(parts)):
      return prefix
  return None


def all_imports(sources: dict[str, tuple[pathlib.Path, str]]) -> list[Import]:
  return [imp for module, (path, source) in sources.items()
          for imp in imports_of(module, source, is_package=path.name == "__init__.py")]


def internal_edges(imports: list[Import], modules: set[str]) -> list[tuple[Import, str]]:
  """(import, imported module) for each import of a module of PACKAGES."""
  return [(imp, dep) for imp in imports if (dep := resolve(imp.target, modules)) is not None and dep != imp.module]


def upward_edges(imports: list[Import], modules: set[str]) -> list[str]:
  bad = []
  for imp, dep in internal_edges(imports, modules):
    source_group, dep_group = group_of(imp.module), group_of(dep)
    if source_group is not None and dep_group not in MAY_IMPORT[source_group]:
      bad.append(f"{imp.module}:{imp.line} imports {dep} ({source_group} may not import {dep_group})")
  return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), each sorted; iterative, so deep graphs
  do not hit the recursion limit."""
  index, low, on_stack, stack, found = {}, {}, set(), [], []
  for start in sorted(graph):
    if start in index:
      continue
    work = [(start, iter(sorted(graph.get(start, ()))))]
    index[start] = low[start] = len(index)
    stack.append(start)
    on_stack.add(start)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = len(index)
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph.get(child, ())))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1:
          found.append(sorted(component))
  return found


def module_graph(imports: list[Import], modules: set[str]) -> dict[str, set[str]]:
  graph = {m: set() for m in modules}
  for imp, dep in internal_edges(imports, modules):
    graph[imp.module].add(dep)
  return graph


def allowed_in_function(imp: Import, modules: set[str]) -> bool:
  return (imp.target.split(".")[0] in OPTIONAL_HEAVY
          or (imp.module, resolve(imp.target, modules)) in LAZY_SUBMODULES)


def function_level_imports(imports: list[Import], paths: dict[str, pathlib.Path]) -> list[str]:
  """Imports inside functions in genjax/ not `allowed_in_function`, as `file:line: statement` (one per statement)."""
  return list(dict.fromkeys(f"{paths[imp.module].relative_to(ROOT)}:{imp.line}: {imp.statement}" for imp in imports
                            if imp.in_function and imp.module.split(".")[0] == "genjax"
                            and not allowed_in_function(imp, set(paths))))


SOURCES = read_sources()
MODULES = set(SOURCES)
IMPORTS = all_imports(SOURCES)


def test_every_module_has_a_layer():
  assert [m for m in sorted(MODULES) if group_of(m) is None] == []


def test_no_upward_imports():
  assert upward_edges(IMPORTS, MODULES) == []


def test_no_import_cycles():
  assert cycles(module_graph(IMPORTS, MODULES)) == []


def test_function_level_imports_are_optional_heavy_dependencies():
  paths = {m: p for m, (p, _) in SOURCES.items()}
  assert function_level_imports(IMPORTS, paths) == []


# The checker itself, on made-up modules: each rule catches what it is for.

def _fake(sources: dict[str, str]) -> tuple[list[Import], set[str]]:
  imports = [imp for m, s in sources.items() for imp in imports_of(m, s, is_package=m in ("genjax.core",))]
  return imports, set(sources)


def test_checker_finds_an_upward_edge_inside_a_function():
  imports, modules = _fake({"genjax.core.task": "def f():\n  from genjax.train import step\n",
                            "genjax.train.step": "", "genjax.train": ""})
  assert upward_edges(imports, modules) == [
      "genjax.core.task:2 imports genjax.train.step (genjax.core may not import genjax.train)"]


def test_checker_resolves_from_package_import_module_and_relative_imports():
  imports, modules = _fake({"genjax.core": "from . import task\n", "genjax.core.task": "", "genjax": "",
                            "genjax.models.vae": "from genjax import core\nfrom genjax.core.task import Task\n"})
  edges = sorted((imp.module, dep) for imp, dep in internal_edges(imports, modules))
  assert edges == [("genjax.core", "genjax.core.task"), ("genjax.models.vae", "genjax.core"),
                   ("genjax.models.vae", "genjax.core.task")]


def test_checker_finds_a_cycle_and_not_a_diamond():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert cycles({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) == []


def test_checker_allows_only_optional_heavy_imports_in_functions():
  source = ("import jax\ndef f():\n  import torch\n  import jax.numpy as jnp\nclass C:\n"
            "  from genjax import errors, dtypes\n")
  imports, _ = _fake({"genjax.core.task": source})
  found = function_level_imports(imports, {"genjax.core.task": ROOT / "genjax/core/task.py",
                                           "genjax.errors": ROOT / "genjax/errors.py"})
  assert found == ["genjax/core/task.py:4: import jax.numpy as jnp",
                   "genjax/core/task.py:6: from genjax import errors, dtypes"]
