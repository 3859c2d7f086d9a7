"""The lock .ci/constraints.txt (README "Reproducible environment"): one exact pin per package,
covering every dependency pyproject.toml declares (runtime and every extra but gpu) at or above
its lower bound, and both README install commands (which CI runs) install with it."""
import os
import re
import subprocess

from packaging.requirements import Requirement
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(REPO, ".ci", "constraints.txt")
NOT_LOCKED_EXTRAS = ("gpu",)  # CUDA wheels: resolved on a GPU machine, jax pinned by the lock


def normalise(name):
  """PEP 503 project name: lower case, runs of -_. as one '-'."""
  return re.sub(r"[-_.]+", "-", name).lower()


def declared_requirements(path=os.path.join(REPO, "pyproject.toml")):
  """{extra ('' for runtime): [Requirement]} from pyproject.toml's [project] lists."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  runtime = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.S | re.M).group(1)
  section = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[|\Z)", text,
                      re.S | re.M).group(1)
  blocks = {"": runtime, **dict(re.findall(r"^(\w+)\s*=\s*\[(.*?)\]\s*$", section,
                                           re.S | re.M))}
  return {extra: [Requirement(text) for text in re.findall(r'"([^"]+)"', block)]
          for extra, block in blocks.items()}


def read_lock(path=LOCK):
  """{normalised name: Version} of the lock; every non-comment line must be `name==version`."""
  pins = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
      assert match, f"{path}: not an exact pin: {line!r}"
      name = normalise(match.group(1))
      assert name not in pins, f"{path}: {name} pinned twice"
      pins[name] = Version(match.group(2))
  return pins


def test_the_lock_pins_every_declared_dependency_within_its_bounds():
  pins = read_lock()
  assert len(pins) > 50  # the whole resolved tree, not only the direct dependencies
  checked = 0
  for extra, requirements in declared_requirements().items():
    if extra in NOT_LOCKED_EXTRAS:
      continue
    for requirement in requirements:
      name = normalise(requirement.name)
      if name == "dakd-jax":  # dev's self-reference to the other extras
        continue
      assert name in pins, f"pyproject {extra or 'runtime'} needs {name}; the lock has no pin"
      assert requirement.specifier.contains(pins[name], prereleases=True), (
          f"the lock pins {name}=={pins[name]}, outside pyproject's {requirement}")
      checked += 1
  assert checked >= 25


def test_the_lock_installs_no_cuda_libraries():
  """The developer install is CPU-only: a CUDA build of torch (any release after the CPU build
  2.13.0 that the CI machines hold) brings ~5 GB of libraries, which filled a CI machine's disk."""
  cuda = sorted(name for name in read_lock()
                if name.startswith(("nvidia-", "cuda-")) or name == "triton")
  assert not cuda, f"the lock installs CUDA libraries {cuda}: pin torch==2.13.0 (CPU build)"


def test_a_pin_outside_a_bound_is_reported(tmp_path):
  lock = tmp_path / "constraints.txt"
  lock.write_text("# header\nnumpy==1.26.4\njax==0.10.2\n")
  pins = read_lock(str(lock))
  numpy_bound = next(r for r in declared_requirements()[""] if r.name == "numpy")
  assert not numpy_bound.specifier.contains(pins["numpy"])
  lock.write_text("numpy>=2\n")
  try:
    read_lock(str(lock))
  except AssertionError as error:
    assert "not an exact pin" in str(error)
  else:
    raise AssertionError("a range in the lock was accepted")


def test_both_readme_install_commands_use_the_lock():
  result = subprocess.run(["bash", os.path.join(REPO, ".ci", "run"), "--print-commands"],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
  demo, tests = result.stdout.splitlines()
  assert "pip install -e . -c .ci/constraints.txt" in demo
  assert "pip install -e '.[dev]' -c .ci/constraints.txt" in tests
