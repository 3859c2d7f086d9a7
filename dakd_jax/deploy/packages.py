"""The optional packages of the `export` extra: the check that they are installed, the one-line
error when they are not, and the library versions recorded in an export's manifest.

Used by every step of `dakd_jax.deploy` that touches ONNX; the rest of the package (and of
dakd_jax) imports without them.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import platform
from typing import Any

from dakd_jax.errors import ExportError  # pylint: disable=unused-import  (re-exported)

EXTRA_MODULES = ("jax2onnx", "onnx", "onnxruntime")
# PyPI names whose versions go in the manifest.
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "numpy", "onnx", "onnxruntime", "jax2onnx",
                      "dakd_jax")
MISSING_EXTRA_MESSAGE = ("stage=export needs the optional packages jax2onnx, onnx and "
                         "onnxruntime: pip install -e '.[export]'")


def check_export_packages() -> dict[str, Any]:
  """Imports the packages of the `export` extra; returns {module name: module}.

  Raises ExportError with the one-line `MISSING_EXTRA_MESSAGE` if any of them is missing.
  """
  try:
    return {name: importlib.import_module(name) for name in EXTRA_MODULES}
  except ImportError as error:
    raise ExportError(MISSING_EXTRA_MESSAGE) from error


def library_versions(names: tuple[str, ...] = VERSIONED_PACKAGES) -> dict[str, str | None]:
  """Installed versions of the PyPI packages `names` (None when absent) and of Python."""
  versions = {"python": platform.python_version()}
  for name in names:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions
