"""Shared pytest setup.

Grain reads absl flags at import/use time and raises UnparsedFlagAccessError unless they are
parsed; pytest never calls absl.app.run, so mark them parsed here (also in worker processes,
which import this module again).

Compiled programs are shared by the whole session through JAX's persistent compilation cache:
most tests train or evaluate the same tiny network at the same shapes, in this process, in
xdist workers and in `run.py` subprocesses, and compiling is most of a tiny run's time. The
first process to import this module (pytest itself, before xdist starts its workers, which
inherit the environment) makes a fresh folder and removes it at the end; results do not depend
on it (a cached program is the same compiled program). DAKD_TEST_COMPILATION_CACHE=0 turns it
off, e.g. to time compilation itself. The session's programs are compiled quickly
(tests/xla_flags.py says how, why and which runs are the exceptions); DAKD_TEST_QUICK_COMPILE=0
keeps XLA's defaults.
"""
import os
import shutil
import sys
import tempfile

from absl import flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from tests import xla_flags  # noqa: E402  (the repository is on the path from here)

if (os.environ.get("DAKD_TEST_QUICK_COMPILE", "1") != "0"
    and xla_flags.QUICK_COMPILE not in os.environ.get("XLA_FLAGS", "")):
  # Before anything imports jax; xdist workers and subprocesses inherit it.
  os.environ["XLA_FLAGS"] = xla_flags.with_quick_compile(os.environ.get("XLA_FLAGS", ""))

_CACHE_OWNER = "DAKD_TEST_COMPILATION_CACHE_OWNER"
if (os.environ.get("DAKD_TEST_COMPILATION_CACHE", "1") != "0"
    and "JAX_COMPILATION_CACHE_DIR" not in os.environ):
  # Set before anything imports jax, which reads these once.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dakd-jax-test-compiled-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  os.environ[_CACHE_OWNER] = str(os.getpid())


def pytest_unconfigure(config):
  if os.environ.get(_CACHE_OWNER) == str(os.getpid()):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_configure(config):
  # In pytest and in each xdist worker: the in-process runs allocate as run.py's processes do.
  # (Imported here: the package imports jax, which must see the environment set above.)
  from dakd_jax import host_allocator  # pylint: disable=import-outside-toplevel
  host_allocator.keep_freed_memory()
  # pytest-xdist reorders loadfile's files by their number of tests unless told not to
  # (--no-loadscope-reorder): keep the order pytest_collection_modifyitems gives them.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  """Files with the most slow tests first. The README runs `-n 2 --dist loadfile`: each file
  goes whole to one worker (its module fixtures are built once), the next file to whichever
  worker is free, so the long files start at once and the short ones fill the gaps instead of
  one long file running alone at the end. Stable: a file's tests keep their order."""
  slow_per_file = {}
  for item in items:
    slow_per_file[item.path] = (slow_per_file.get(item.path, 0)
                                + (item.get_closest_marker("slow") is not None))
  items.sort(key=lambda item: -slow_per_file[item.path])
