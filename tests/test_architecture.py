"""The package's imports run one way (issue: one-way architecture).

Every `import dakd_jax...` / `from dakd_jax... import ...` in the package, at module level or
inside a function, is read from the source with `ast`. A module may import modules of its own
level or below, never above, and no two modules may reach each other (no cycle). The levels,
bottom first, are written here by hand: they are the rule the code must follow.
"""
import ast
import os

import pytest

PACKAGE_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "dakd_jax")
# Module (or package prefix) -> level; the longest matching prefix decides.
# The bottom is ordered too: the generic helpers (sharding, writers, the Orbax checkpoint
# manager, which knows nothing of models or data) under the domain modules, and the config,
# which reads its allowed values from the domain modules, above them.
LEVELS = {
    "dakd_jax.errors": 0, "dakd_jax.modalities": 0, "dakd_jax.interrupts": 0,
    "dakd_jax.progress": 0, "dakd_jax.host_allocator": 0,
    "dakd_jax.sharding": 1, "dakd_jax.writers": 1, "dakd_jax.checkpoint": 1,
    "dakd_jax.workdir_lock": 1,
    "dakd_jax.stage_checkpoints": 2, "dakd_jax.augment": 2, "dakd_jax.data": 2,
    "dakd_jax.models": 2, "dakd_jax.losses": 2,
    "dakd_jax.config": 3,
    # Image corruptions need only errors and modalities; config reads their names.
    "dakd_jax.evaluation.corruptions": 2,
    "dakd_jax.evaluation": 4, "dakd_jax.deploy": 4,
    "dakd_jax.provenance": 4,  # versions (deploy.packages), devices, git commit
    "dakd_jax.builders": 5,
    "dakd_jax.stage_parts": 6,  # each stage's parts, built once from the builders
    "dakd_jax.train": 7,
    "dakd_jax.stages": 8,
    "dakd_jax.cli": 9,
    "dakd_jax": 10,
}


def module_files():
  """{module name: path} of every module of the package."""
  modules = {}
  for folder, _, files in os.walk(PACKAGE_ROOT):
    for name in files:
      if name.endswith(".py"):
        relative = os.path.relpath(os.path.join(folder, name), os.path.dirname(PACKAGE_ROOT))
        module = relative[:-3].replace(os.sep, ".")
        modules[module.removesuffix(".__init__")] = os.path.join(folder, name)
  return modules


def level_of(module):
  prefixes = [p for p in LEVELS if module == p or module.startswith(p + ".")]
  return LEVELS[max(prefixes, key=len)]


def imports_of(path, modules):
  """The package modules a file imports (anywhere in it), resolved to module names."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
               else node.module for alias in node.names]
    else:
      continue
    found.update(name for name in names if name.split(".")[0] == "dakd_jax")
  return found


@pytest.fixture(scope="module")
def graph():
  modules = module_files()
  return {module: imports_of(path, modules) for module, path in modules.items()}


def test_every_module_has_a_level(graph):
  assert "dakd_jax.stages" in graph and "dakd_jax.evaluation.evaluator" in graph
  for module in graph:
    level_of(module)  # raises ValueError (max of nothing) for an unplaced module


def test_no_module_imports_a_module_above_it(graph):
  upward = sorted(f"{module} (level {level_of(module)}) imports {target} "
                  f"(level {level_of(target)})"
                  for module, targets in graph.items() for target in targets
                  if level_of(target) > level_of(module))
  assert not upward, "\n".join(upward)


def test_no_import_cycle(graph):
  state, cycles = {}, []

  def visit(module, path):
    state[module] = "open"
    for target in sorted(graph.get(module, ())):
      if target == module or target not in graph:
        continue
      if state.get(target) == "open":
        cycles.append(" -> ".join(path[path.index(target):] + [target]))
      elif target not in state:
        visit(target, path + [target])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not cycles, "\n".join(cycles)


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path):
  """The walk must not miss what it is there to catch: a deferred upward import and a cycle."""
  source = tmp_path / "sample.py"
  source.write_text("def f():\n  from dakd_jax.train import loop\n  import dakd_jax.cli\n")
  modules = {"dakd_jax.train.loop": "", "dakd_jax.cli": ""}
  assert imports_of(str(source), modules) == {"dakd_jax.train.loop", "dakd_jax.cli"}
  assert level_of("dakd_jax.train.loop") > level_of("dakd_jax.evaluation.evaluator")
