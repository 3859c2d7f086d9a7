"""A plain `pip install -e .` installs every module dakd_jax imports at run time.

Every import in the package (module level and inside functions) is read with `ast`. Each
third-party top-level module is mapped to the distributions that provide it
(`importlib.metadata.packages_distributions()`, in this environment) and must be one of
pyproject.toml's runtime dependencies. A module of an optional extra (or torch, test-only) may
be imported only inside a `try` whose ImportError handler raises a dakd_jax UserError: the
one-line message that names what to install. CI also runs the README's demo in a venv with the
plain install (.ci/run), which fails when this list and the code disagree in a way ast misses.
"""
import ast
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

from dakd_jax import errors
from dakd_jax.deploy import packages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "dakd_jax")


def normalise(name):
  """PEP 503 project name: lower case, runs of -_. as one '-'."""
  return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(block):
  """Project names of the quoted requirements in a TOML array's text."""
  return {normalise(re.match(r"[A-Za-z0-9_.\-]+", text).group(0))
          for text in re.findall(r'"([^"]+)"', block)}


def read_pyproject(path=os.path.join(REPO, "pyproject.toml")):
  """(runtime dependency names, {extra: names}) of pyproject.toml's [project] table."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  runtime = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.S | re.M)
  assert runtime, "pyproject.toml has no [project] dependencies list"
  section = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[|\Z)", text,
                      re.S | re.M).group(1)
  extras = {name: requirement_names(block)
            for name, block in re.findall(r"^(\w+)\s*=\s*\[(.*?)\]\s*$", section, re.S | re.M)}
  return requirement_names(runtime.group(1)), extras


def third_party_imports(path):
  """[(top-level module, guarded by a try that raises a UserError on ImportError, line)]."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  found = []

  def visit(node, guarded):
    if isinstance(node, ast.Try):
      handled = any(catches_import_error(handler) and raises_user_error(handler)
                    for handler in node.handlers)
      for child in node.body:
        visit(child, guarded or handled)
      for child in node.handlers + node.orelse + node.finalbody:
        visit(child, guarded)
      return
    names = []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names = [node.module]
    for name in names:
      top = name.split(".")[0]
      if top not in sys.stdlib_module_names and top not in ("__future__", "dakd_jax"):
        found.append((top, guarded, node.lineno))
    for child in ast.iter_child_nodes(node):
      visit(child, guarded)

  visit(tree, False)
  return found


def catches_import_error(handler):
  names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
  return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
             for n in names)


def raises_user_error(handler):
  """The handler raises one of dakd_jax.errors' UserError classes (called or not)."""
  for node in ast.walk(handler):
    if isinstance(node, ast.Raise) and node.exc is not None:
      target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
      name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", None)
      cls = getattr(errors, name or "", None)
      if isinstance(cls, type) and issubclass(cls, errors.UserError):
        return True
  return False


def package_files():
  return sorted(os.path.join(folder, name) for folder, _, names in os.walk(PACKAGE)
                for name in names if name.endswith(".py"))


def test_every_runtime_import_is_a_runtime_dependency():
  runtime, extras = read_pyproject()
  optional = set().union(*extras.values())
  providers = importlib.metadata.packages_distributions()
  problems = []
  for path in package_files():
    where = os.path.relpath(path, REPO)
    for module, guarded, line in third_party_imports(path):
      if module not in providers:
        problems.append(f"{where}:{line}: {module} is not installed here; which distribution "
                        "provides it cannot be checked")
        continue
      dists = {normalise(d) for d in providers[module]}
      if dists & runtime:
        continue
      if not guarded:
        problems.append(f"{where}:{line}: {module} ({sorted(dists)}) is not a runtime "
                        "dependency and its import raises no one-line UserError when missing")
      elif not dists & optional:
        problems.append(f"{where}:{line}: {module} ({sorted(dists)}) is in no extra of "
                        "pyproject.toml, so its error cannot name one")
  assert not problems, "\n".join(problems)


def test_the_export_extra_lists_the_packages_its_check_imports():
  _, extras = read_pyproject()
  providers = importlib.metadata.packages_distributions()
  for module in packages.EXTRA_MODULES:  # imported by name in check_export_packages
    assert {normalise(d) for d in providers[module]} & extras["export"], module


def test_the_checker_sees_unguarded_and_function_level_imports(tmp_path):
  """The walk must not miss what it is there to catch."""
  source = tmp_path / "sample.py"
  source.write_text(
      "import os\nimport numpy as np\n"
      "def tsne():\n  from sklearn.manifold import TSNE\n"
      "def guarded():\n  try:\n    import torch\n  except ImportError:\n"
      "    raise MissingExtraError('pip install torch')\n"
      "def wrong_guard():\n  try:\n    import onnx\n  except ImportError:\n"
      "    raise RuntimeError('no')\n")
  assert third_party_imports(str(source)) == [
      ("numpy", False, 2), ("sklearn", False, 4), ("torch", True, 7), ("onnx", False, 12)]


def test_pyproject_reading():
  runtime, extras = read_pyproject()
  assert {"matplotlib", "etils", "jax", "pillow", "ml-collections"} <= runtime
  assert "torch" not in runtime and "tensorboard" not in runtime
  assert "torch" in extras["dev"] and "scikit-learn" in extras["analysis"]
  with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
    torch_pin = re.search(r'"torch([^"]*)"', f.read()).group(1)
  assert torch_pin.startswith(">="), torch_pin  # test-only, never an exact pin


def test_ci_runs_the_readme_commands_as_written():
  """.ci/run reads the demo and test commands from README.md: the plain install runs the demo,
  the dev install runs pytest."""
  result = subprocess.run(["bash", os.path.join(REPO, ".ci", "run"), "--print-commands"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
  assert result.returncode == 0, result.stderr
  demo, tests = result.stdout.splitlines()
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  assert f"```bash\n{demo}\n```" in readme and f"```bash\n{tests}\n```" in readme
  assert readme.index(demo) > readme.index("**Run the demo**")
  assert readme.index(tests) > readme.index("**Run the test suite:**")
  assert "pip install -e . " in demo and "[" not in demo and "python run.py" in demo
  assert "pip install -e '.[dev]'" in tests and "pytest" in tests


@pytest.mark.parametrize("heading", ["**Run the demo**", "**Run the test suite:**"])
def test_ci_fails_loudly_without_a_readme_command(tmp_path, heading):
  os.makedirs(tmp_path / ".ci")
  with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
    (tmp_path / ".ci" / "run").write_text(f.read())
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    (tmp_path / "README.md").write_text(f.read().replace(heading, "**Something else**"))
  result = subprocess.run(["bash", str(tmp_path / ".ci" / "run"), "--print-commands"],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 1
  assert result.stderr == (f"ci: README.md has no ```bash block after \"{heading}\"; CI runs "
                           "the README's commands\n")
